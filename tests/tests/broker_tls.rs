//! An agent that reaches the broker only over TLS (`amqps://` on 5671, the broker's
//! certificate verified against the CA deploy/setup.sh made) with credentials of its own,
//! which let it publish raw samples and nothing else. Without the CA the certificate is
//! refused and nothing is published (the batches wait in the spool).

use std::process::Command;
use std::time::{Duration, Instant};

use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use vmeter_core::amqp::{self, BrokerConfig};
use vmeter_e2e::{Names, Service, broker, listen_addr};

const CA: &str = "/etc/vmeter/tls/ca.pem";
const SECRET: &str = "tls-secret";

/// A broker user of this test, removed when dropped (also when the test fails).
struct User(String);

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.0])
            .output();
    }
}

/// Waits for at least 20 of the agent's samples in the raw queue (60 s at most).
async fn samples_arrive(conn: &Connection, names: &Names, agent: &Service) {
    let got = broker::take(
        conn,
        &names.raw_queue,
        20,
        Duration::from_secs(5),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        got.len() >= 20,
        "{} samples\n{}",
        got.len(),
        agent.log_text()
    );
}

/// The test's topology, declared by the broker's admin (an agent declares nothing).
fn topology(names: &Names) -> BrokerConfig {
    BrokerConfig {
        url: vmeter_core::config::local_amqp_url("ADMIN"),
        exchange: names.exchange.clone(),
        raw_queue: names.raw_queue.clone(),
        processed_queue: names.processed_queue.clone(),
        dead_letter_exchange: names.dlx.clone(),
        dead_letter_queue: names.dead_queue.clone(),
        ..Default::default()
    }
}

/// The test's topology declared, and this agent's own broker user made as an operator makes
/// one (deploy/add-agent.sh) on the test's exchange: write to it with routing key
/// sample.raw, nothing else. Returns the admin connection, the user (deleted on drop) and
/// the `amqps://` URL the script printed.
async fn agent_user(names: &Names) -> (Connection, User, String) {
    let conn = broker::connect().await;
    let ch = conn.create_channel().await.unwrap();
    amqp::declare_topology(&ch, &topology(names)).await.unwrap();
    let out = Command::new("bash")
        .arg(vmeter_e2e::repo_root().join("deploy/add-agent.sh"))
        .args([names.id.as_str(), "localhost"])
        .env("VMETER_EXCHANGE", &names.exchange)
        .output()
        .unwrap();
    let user = User(format!("vmeter-agent-{}", names.id));
    assert!(
        out.status.success(),
        "add-agent.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        url.starts_with(&format!("amqps://{}:", user.0)) && url.contains("@localhost:5671/"),
        "{url}"
    );
    (conn, user, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_publishes_over_verified_tls_with_its_own_credentials_only() {
    let names = Names::new("tls");
    let dir = names.dir("tls");
    let (conn, user, url) = agent_user(&names).await;

    let agent_env = |ca: Option<&str>, spool: &str| {
        let mut env = names.agent_env(SECRET, &dir.join(spool), &listen_addr());
        env.retain(|(k, _)| k != "VMETER_BROKER__URL");
        env.push(("VMETER_BROKER__URL".into(), url.clone()));
        if let Some(ca) = ca {
            env.push(("VMETER_BROKER__TLS_CA_FILE".into(), ca.into()));
        }
        env
    };

    // Without the CA: the broker's certificate is not trusted; nothing goes out.
    let untrusting = Service::start(
        "agent-no-ca",
        "agent-compute",
        &[],
        &agent_env(None, "spool-a"),
        &dir,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !untrusting.log_text().contains("Broker unreachable") {
        assert!(Instant::now() < deadline, "{}", untrusting.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = untrusting.log_text();
    assert!(
        log.to_lowercase().contains("certificate"),
        "the log says the certificate is the reason:\n{log}"
    );
    drop(untrusting);
    let none = broker::take(
        &conn,
        &names.raw_queue,
        1,
        Duration::from_millis(500),
        Duration::from_secs(2),
    )
    .await;
    assert!(none.is_empty(), "published without a trusted certificate");

    // With the CA: samples arrive, over a TLS connection of the agent's user.
    let agent = Service::start(
        "agent-tls",
        "agent-compute",
        &[],
        &agent_env(Some(CA), "spool-b"),
        &dir,
    );
    samples_arrive(&conn, &names, &agent).await;
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "user", "ssl", "ssl_protocol"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    let mine: Vec<&str> = listed.lines().filter(|l| l.starts_with(&user.0)).collect();
    assert!(!mine.is_empty(), "{listed}");
    assert!(
        mine.iter()
            .all(|l| l.contains("true") && l.contains("tlsv1.")),
        "every connection of the agent's user is TLS: {mine:?}"
    );
    drop(agent);

    // Its credentials publish raw samples and nothing else.
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: Some(std::fs::read_to_string(CA).unwrap()),
    };
    let as_agent = Connection::connect_with_config(
        &url,
        ConnectionProperties::default(),
        tls,
        lapin::runtime::default_runtime().unwrap(),
    )
    .await
    .expect("the agent's user connects over TLS");
    let c = as_agent.create_channel().await.unwrap();
    let consume = c
        .basic_consume(
            names.raw_queue.as_str().into(),
            "snoop".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(consume.is_err(), "the agent's user may not consume");
    let c = as_agent.create_channel().await.unwrap();
    let publish = c
        .basic_publish(
            names.exchange.as_str().into(),
            "sample.processed".into(),
            BasicPublishOptions::default(),
            b"forged",
            BasicProperties::default(),
        )
        .await;
    let refused = match publish {
        Err(_) => true,
        // The refusal closes the channel asynchronously.
        Ok(confirm) => {
            confirm.await.is_err() || {
                tokio::time::sleep(Duration::from_millis(300)).await;
                !c.status().connected()
            }
        }
    };
    assert!(
        refused,
        "the agent's user may not publish processed samples"
    );
    let _ = as_agent.close(200, "done".into()).await;

    broker::cleanup(&conn, &names).await;
}

/// A config file put back when dropped (the test edits the installed system's).
struct Restore(std::path::PathBuf, Vec<u8>);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, &self.1);
    }
}

/// A hypervisor as an operator installs one: deploy/add-agent.sh on the broker host, then
/// deploy/install-hypervisor.sh with the package, that URL, the CA and the secret. The
/// installed agent, with the config the script wrote, publishes over TLS as its own user
/// (only the test's broker names, libvirt node and directories are overridden).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hypervisor_installed_by_the_script_publishes_over_tls() {
    use std::os::unix::process::CommandExt;

    let deb = std::fs::read_dir(vmeter_e2e::repo_root().join("target/debian"))
        .expect("deploy/test.sh builds the packages first")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmeter-agent-compute_"))
        })
        .expect("the agent's package");
    let names = Names::new("hyp");
    let dir = names.dir("hyp");
    let (conn, _user, url) = agent_user(&names).await;

    let config = std::path::PathBuf::from("/etc/vmeter/agent-compute.yaml");
    let _config = Restore(config.clone(), std::fs::read(&config).unwrap());
    // What an operator copies to the hypervisor: the CA and the secret.
    let secret = dir.join("secret");
    std::fs::copy("/etc/vmeter/telemetry_secret", &secret).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::copy(CA, &ca).unwrap();
    // Two broker nodes, as with a cluster: the first is down (a closed port), so the agent
    // has to fail over to the second.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = closed.local_addr().unwrap().port();
    drop(closed);
    let (head, tail) = url.rsplit_once('@').unwrap();
    let dead = format!(
        "{head}@localhost:{dead_port}/{}",
        tail.split_once('/').unwrap().1
    );
    let out = Command::new("bash")
        .arg(vmeter_e2e::repo_root().join("deploy/install-hypervisor.sh"))
        .arg(&deb)
        .arg(format!("{dead},{url}"))
        .arg(&ca)
        .arg(&secret)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install-hypervisor.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(written.contains(&format!("  url: \"{dead}\"")), "{written}");
    assert!(
        written.contains(&format!("\n  failover_urls: [\"{url}\"]\n")),
        "{written}"
    );
    assert!(
        written.contains("\n  tls_ca_file: /etc/vmeter/tls/ca.pem\n"),
        "{written}"
    );

    // The installed agent with the written config, as user vmeter; the test's names on top.
    let ids = Command::new("id").args(["-u", "vmeter"]).output().unwrap();
    let uid: u32 = String::from_utf8_lossy(&ids.stdout).trim().parse().unwrap();
    let gids = Command::new("id").args(["-g", "vmeter"]).output().unwrap();
    let gid: u32 = String::from_utf8_lossy(&gids.stdout)
        .trim()
        .parse()
        .unwrap();
    let work = tempfile_dir(&dir, uid, gid);
    let node = work.join("demo-node.xml");
    std::fs::copy(vmeter_e2e::repo_root().join("deploy/demo-node.xml"), &node).unwrap();
    let log = dir.join("agent.log");
    let child = Command::new("/usr/bin/agent-compute")
        .args(["--config", "/etc/vmeter/agent-compute.yaml"])
        .env_remove("VMETER_CONFIG")
        .env("VMETER_BROKER__EXCHANGE", &names.exchange)
        .env("VMETER_BROKER__RAW_QUEUE", &names.raw_queue)
        .env("VMETER_BROKER__PROCESSED_QUEUE", &names.processed_queue)
        .env("VMETER_BROKER__DEAD_LETTER_EXCHANGE", &names.dlx)
        .env("VMETER_BROKER__DEAD_LETTER_QUEUE", &names.dead_queue)
        .env("VMETER_LIBVIRT__URI", format!("test://{}", node.display()))
        .env("VMETER_POLLING__INTERVAL_SECS", "1")
        .env("VMETER_POLLING__SHUFFLE_TIME_SECS", "0")
        .env("VMETER_SPOOL__DIR", work.join("spool"))
        .env("VMETER_HTTP__LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .gid(gid)
        .uid(uid)
        .spawn()
        .unwrap();
    let agent = Service {
        name: "installed-agent",
        child,
        log,
    };
    samples_arrive(&conn, &names, &agent).await;
    drop(agent);
    broker::cleanup(&conn, &names).await;
}

/// A directory under `dir` that user `uid` owns.
fn tempfile_dir(dir: &std::path::Path, uid: u32, gid: u32) -> std::path::PathBuf {
    let work = dir.join("vmeter");
    std::fs::create_dir_all(&work).unwrap();
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
    std::os::unix::fs::chown(&work, Some(uid), Some(gid)).unwrap();
    work
}
