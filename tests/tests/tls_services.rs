//! TLS on the collector's other two network links (the broker's: `broker_tls.rs`), with the
//! CA and certificates `deploy/setup.sh` made:
//!
//! - to PostgreSQL: `sslmode=verify-full&sslrootcert=…` in `database.url`; the collector's
//!   connections are encrypted (`pg_stat_ssl`), and without the CA the server's certificate
//!   is refused;
//! - its API over HTTPS (`http.tls_cert_file`/`tls_key_file`): the API and the dashboard
//!   answer over verified TLS, plain HTTP and unverified clients get nothing, a client that
//!   connects and never says a word holds no one up, and a key that is not the
//!   certificate's is a config error naming the key.

use std::time::{Duration, Instant};

use vmeter_e2e::{Names, Service, create_database, drop_database, listen_addr};

const CA: &str = "/etc/vmeter/tls/ca.pem";
const CERT: &str = "/etc/vmeter/tls/collector.pem";
const KEY: &str = "/etc/vmeter/tls/collector.key";

fn tls_db_url(names: &Names) -> String {
    format!("{}?sslmode=verify-full&sslrootcert={CA}", names.db_url())
}

async fn wait_healthy(addr: &str, collector: &Service) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && vmeter_e2e::http::get_json(addr, "/health", None).await.0 == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "collector not healthy:\n{}",
            collector.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_talks_to_postgresql_over_verified_tls() {
    let names = Names::new("pgtls");
    let logs = names.dir("pgtls");
    let admin = create_database(&names).await;

    // A client with the CA: encrypted, the server's certificate verified (verify-full:
    // chain and host name).
    let pool = sqlx::PgPool::connect(&tls_db_url(&names))
        .await
        .expect("TLS with the demo CA");
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl);
    // Without it (system roots only) the certificate is refused.
    let refused = sqlx::PgPool::connect(&format!("{}?sslmode=verify-full", names.db_url())).await;
    let e = refused
        .expect_err("the demo CA is not a system root")
        .to_string();
    assert!(
        e.to_lowercase().contains("certificate") || e.to_lowercase().contains("tls"),
        "{e}"
    );

    // The collector with that URL: healthy, and every one of its connections encrypted.
    let addr = listen_addr();
    let mut env = names.env("pgtls-secret");
    env.push(("VMETER_DATABASE__URL".into(), tls_db_url(&names)));
    env.push(("VMETER_HTTP__LISTEN".into(), addr.clone()));
    let collector = Service::start("collector", "collector", &[], &env, &logs);
    wait_healthy(&addr, &collector).await;
    let (plain, encrypted): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where not s.ssl), count(*) filter (where s.ssl)
           from pg_stat_activity a join pg_stat_ssl s using (pid)
          where a.datname = current_database() and a.pid <> pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(encrypted >= 1, "the collector has no encrypted connection");
    assert_eq!(plain, 0, "the collector has unencrypted connections");

    pool.close().await;
    drop(collector);
    drop_database(&admin, &names).await;
}

fn client(with_ca: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if with_ca {
        let pem = std::fs::read(CA).expect("deploy/setup.sh's CA");
        b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_and_the_dashboard_are_served_over_https() {
    let names = Names::new("https");
    let logs = names.dir("https");
    let admin = create_database(&names).await;
    let addr = listen_addr();
    let port = addr.rsplit_once(':').unwrap().1.to_string();
    let mut env = names.env("https-secret");
    env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    env.push(("VMETER_HTTP__LISTEN".into(), addr.clone()));
    env.push(("VMETER_HTTP__TLS_CERT_FILE".into(), CERT.into()));
    env.push(("VMETER_HTTP__TLS_KEY_FILE".into(), KEY.into()));
    env.push(("VMETER_HTTP__ADMIN_TOKENS".into(), "[https-admin]".into()));
    let collector = Service::start("collector", "collector", &[], &env, &logs);

    // A client that connects and never says a word, held open meanwhile.
    let silent = tokio::net::TcpStream::connect(&addr).await.unwrap();

    let https = client(true);
    let base = format!("https://localhost:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    // Healthy (200) once its database and broker are up; until then no answer or a 503.
    loop {
        let answer = https.get(format!("{base}/health")).send().await;
        if answer.as_ref().is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not healthy over HTTPS: {answer:?}\n{}",
            collector.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let meters = https
        .get(format!("{base}/v2/meters"))
        .header("X-Auth-Token", "https-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(meters.status(), 200);
    assert_eq!(meters.text().await.unwrap(), "[]");
    let page = https
        .get(format!("https://127.0.0.1:{port}/dashboard/"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("vmeter dashboard"));
    // The same without the token: refused, over TLS as well.
    let anon = https.get(format!("{base}/v2/meters")).send().await.unwrap();
    assert_eq!(anon.status(), 401);

    // Without the CA: the certificate is refused. Plain HTTP: no answer.
    let e = client(false)
        .get(format!("{base}/health"))
        .send()
        .await
        .expect_err("an unknown CA");
    assert!(
        format!("{e:?}").to_lowercase().contains("certificate"),
        "{e:?}"
    );
    let plain = client(false)
        .get(format!("http://localhost:{port}/health"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    drop(silent);

    drop(collector);
    drop_database(&admin, &names).await;
}

#[test]
fn a_key_that_is_not_the_certificates_is_a_config_error() {
    let names = Names::new("tlskey");
    let logs = names.dir("tlskey");
    let mut env = names.env("tlskey-secret");
    env.push(("VMETER_HTTP__LISTEN".into(), "127.0.0.1:0".into()));
    env.push(("VMETER_HTTP__TLS_CERT_FILE".into(), CERT.into()));
    // The broker's key: a valid key, of another certificate.
    env.push((
        "VMETER_HTTP__TLS_KEY_FILE".into(),
        "/etc/vmeter/tls/postgres.key".into(),
    ));
    let mut collector = Service::start("collector", "collector", &[], &env, &logs);
    let status = collector.child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "{}", collector.log_text());
    let log = collector.log_text();
    assert!(
        log.contains("http.tls_cert_file") && log.contains(CERT),
        "{log}"
    );
    // Only one of the two: named as well.
    let mut env = names.env("tlskey-secret");
    env.push(("VMETER_HTTP__TLS_CERT_FILE".into(), CERT.into()));
    let mut collector = Service::start("collector", "collector", &[], &env, &logs);
    let status = collector.child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "{}", collector.log_text());
    assert!(collector.log_text().contains("tls_key_file"));
}
