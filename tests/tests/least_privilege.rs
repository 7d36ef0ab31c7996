//! The pipeline with the credentials `deploy/setup.sh` made: each service as its own
//! RabbitMQ user with only the permissions it needs, the database role's random password
//! and the telemetry secret from its file, on the default vhost and names. The agent's user
//! can publish raw samples and do nothing else: the broker refuses it every other action.
//! Needs the credentials file readable (root, as the README's test command runs).

use std::time::{Duration, Instant};

use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use vmeter_core::config::{local_amqp_url, local_credentials};
use vmeter_e2e::{Names, Service, create_database, drop_database, listen_addr, repo_root};

/// Whether the broker refused `what` with ACCESS_REFUSED (403), on its own channel.
async fn refused<F, Fut, T>(conn: &Connection, what: F) -> bool
where
    F: FnOnce(lapin::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, lapin::Error>>,
{
    let ch = conn.create_channel().await.unwrap();
    match what(ch).await {
        Ok(_) => false,
        Err(e) => {
            let text = format!("{e:?} {e}");
            assert!(
                text.contains("403")
                    || text.contains("ACCESS_REFUSED")
                    || text.contains("access to"),
                "not a refusal: {text}"
            );
            true
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_runs_with_only_its_permissions() {
    let creds = local_credentials();
    let Some(secret) = creds.get("TELEMETRY_SECRET").cloned() else {
        eprintln!(
            "SKIPPED: no readable credentials from deploy/setup.sh (run as root after setup)"
        );
        return;
    };
    let names = Names::new("lp");
    let logs = names.dir("lp");
    let admin = create_database(&names).await;
    // Default names and vhost; only the database is this test's own.
    let base = |role: &str| {
        vec![
            ("VMETER_BROKER__URL".to_string(), local_amqp_url(role)),
            (
                "VMETER_SIGNING__TELEMETRY_SECRET".into(),
                format!("\"{secret}\""),
            ),
            ("VMETER_HTTP__LISTEN".into(), listen_addr()),
        ]
    };
    let mut env = base("COLLECTOR");
    env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    let collector = Service::start("collector", "collector", &[], &env, &logs);
    let mut env = base("NOTIFICATION");
    env.push((
        "VMETER_PIPELINE__FILE".into(),
        repo_root().join("pipeline.yaml").display().to_string(),
    ));
    env.push(("VMETER_PIPELINE__STATE_FILE".into(), "\"\"".into()));
    let notification = Service::start("notification", "notification", &[], &env, &logs);
    let mut env = base("AGENT");
    env.push((
        "VMETER_LIBVIRT__URI".into(),
        format!(
            "test://{}",
            repo_root().join("deploy/demo-node.xml").display()
        ),
    ));
    env.push(("VMETER_POLLING__INTERVAL_SECS".into(), "2".into()));
    env.push(("VMETER_POLLING__SHUFFLE_TIME_SECS".into(), "0".into()));
    env.push((
        "VMETER_SPOOL__DIR".into(),
        logs.join("spool").display().to_string(),
    ));
    let agent = Service::start("agent", "agent-compute", &[], &env, &logs);
    let diag = || {
        format!(
            "--- collector:\n{}\n--- notification:\n{}\n--- agent:\n{}",
            collector.log_text(),
            notification.log_text(),
            agent.log_text()
        )
    };

    // The pipeline flows: cpu_util of the demo VMs reaches this test's database.
    let pool = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let n: i64 = sqlx::query_scalar(
            "select count(distinct resource_id) from samples where meter = 'cpu_util' and resource_id like '9b3e4f5a-%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
        if n == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cpu_util never reached PostgreSQL ({n} VMs)\n{}",
            diag()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The agent's user: publishing raw samples is all it may do.
    let conn = Connection::connect(&local_amqp_url("AGENT"), ConnectionProperties::default())
        .await
        .expect("the agent's user logs in");
    // A signed empty batch: valid, so the notification service just acks it.
    let body = vmeter_core::wire::encode(&[]);
    let mut headers = FieldTable::default();
    headers.insert(
        vmeter_core::wire::FORMAT_HEADER.into(),
        lapin::types::AMQPValue::LongLongInt(vmeter_core::wire::FORMAT_VERSION),
    );
    headers.insert(
        vmeter_core::wire::SIGNATURE_HEADER.into(),
        lapin::types::AMQPValue::LongString(
            vmeter_core::signing::Signer::new(&secret)
                .sign(&body)
                .unwrap()
                .into(),
        ),
    );
    let publish = |key: &'static str, exchange: &'static str| {
        let (body, headers) = (body.clone(), headers.clone());
        move |ch: lapin::Channel| async move {
            ch.confirm_select(Default::default()).await?;
            ch.basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_headers(headers),
            )
            .await?
            .await
        }
    };
    assert!(
        !refused(&conn, publish("sample.raw", "vmeter")).await,
        "publishing raw samples must be allowed"
    );
    assert!(
        refused(&conn, publish("sample.processed", "vmeter")).await,
        "the agent published processed samples"
    );
    assert!(
        refused(&conn, publish("sample.raw", "vmeter.dlx")).await,
        "the agent wrote to the dead-letter exchange"
    );
    assert!(
        refused(&conn, |ch| async move {
            ch.basic_consume(
                "vmeter.samples.raw".into(),
                "spy".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        })
        .await,
        "the agent consumed the raw queue"
    );
    assert!(
        refused(&conn, |ch| async move {
            ch.queue_declare(
                "vmeter.spy".into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
        })
        .await,
        "the agent declared a queue"
    );
    assert!(
        refused(&conn, |ch| async move {
            ch.queue_delete("vmeter.samples.raw".into(), Default::default())
                .await
        })
        .await,
        "the agent deleted the raw queue"
    );
    let _ = conn.close(200, "done".into()).await;
    // guest has no access to the vhost at all.
    let guest = Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2fvmeter",
        ConnectionProperties::default(),
    )
    .await;
    assert!(guest.is_err(), "guest can open the vmeter vhost");

    pool.close().await;
    drop(agent);
    drop(notification);
    drop(collector);
    drop_database(&admin, &names).await;
    let _ = std::fs::remove_dir_all(&logs);
}

/// The shipped example configs load (signing on, from the secret file deploy/setup.sh
/// makes); a missing or empty secret file is a config error (exit 2) naming the key.
#[test]
fn shipped_configs_load_with_signing_on() {
    let root = repo_root();
    let run = |bin: &str, config: &std::path::Path, env: &[(&str, String)]| {
        std::process::Command::new(vmeter_e2e::bin_dir().join(bin))
            .args(["--config", &config.display().to_string(), "check-config"])
            .env_remove("VMETER_CONFIG")
            .envs(env.iter().map(|(k, v)| (*k, v.clone())))
            .output()
            .expect("the binaries are built")
    };
    let pipeline = (
        "VMETER_PIPELINE__FILE",
        root.join("pipeline.yaml").display().to_string(),
    );
    for bin in ["agent-compute", "notification", "collector"] {
        let cfg = root.join(format!("deploy/config/{bin}.yaml"));
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(
            text.contains("telemetry_secret_file: /etc/vmeter/telemetry_secret"),
            "{bin}: signing must be on"
        );
        assert!(
            !text.contains("guest"),
            "{bin}: no guest user in shipped configs"
        );
        let out = run(bin, &cfg, std::slice::from_ref(&pipeline));
        assert!(
            out.status.success(),
            "{bin}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The same config with the secret file missing, then empty.
        let dir = std::env::temp_dir().join(format!("vmeter-cfg-{}-{bin}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("secret");
        std::fs::write(&empty, "\n").unwrap();
        for secret in [dir.join("missing"), empty] {
            let bad = dir.join(format!("{bin}.yaml"));
            std::fs::write(
                &bad,
                text.replace(
                    "/etc/vmeter/telemetry_secret",
                    &secret.display().to_string(),
                ),
            )
            .unwrap();
            let out = run(bin, &bad, std::slice::from_ref(&pipeline));
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{bin}: {err}");
            assert!(
                err.contains("signing.telemetry_secret_file"),
                "{bin}: {err}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
