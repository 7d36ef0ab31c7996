//! The service skeleton (`vmeter_core::service`) in the three real binaries: a service whose
//! HTTP address is taken must stop with exit code 1, naming the address, instead of running
//! on without `/health` and `/metrics` (which notification and the agent did before).

use std::time::{Duration, Instant};

use vmeter_e2e::{Names, Service, create_database, drop_database, repo_root};

/// Waits up to 60 s for `s` to exit; its exit code.
fn exit_code(s: &mut Service) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = s.child.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_http_address_stops_every_service() {
    let names = Names::new("skel");
    let dir = names.dir("skel");
    let admin = create_database(&names).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();

    let agent_env = names.agent_env(SECRET, &dir.join("spool"), &addr);
    let mut notification_env = names.env(SECRET);
    notification_env.push((
        "VMETER_PIPELINE__FILE".into(),
        repo_root().join("pipeline.yaml").display().to_string(),
    ));
    notification_env.push(("VMETER_HTTP__LISTEN".into(), addr.clone()));
    let mut collector_env = names.env(SECRET);
    collector_env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    collector_env.push(("VMETER_HTTP__LISTEN".into(), addr.clone()));

    for (name, env) in [
        ("agent-compute", agent_env),
        ("notification", notification_env),
        ("collector", collector_env),
    ] {
        let mut s = Service::start(name, name, &[], &env, &dir);
        let code = exit_code(&mut s);
        assert_eq!(
            code,
            Some(1),
            "{name} with {addr} taken: exit code\n{}",
            s.log_text()
        );
        assert!(
            s.log_text().contains(&addr),
            "{name}: the log names the address\n{}",
            s.log_text()
        );
    }
    drop(taken);
    drop_database(&admin, &names).await;
    let _ = std::fs::remove_dir_all(&dir);
}

const SECRET: &str = "skeleton-secret";

/// A service started with its HTTP socket (descriptor 3, `LISTEN_FDS=1`, as systemd's socket
/// activation passes it) serves on that socket and does not bind `http.listen` (here an
/// address that is taken: binding it would stop the service). Started with `LISTEN_FDS` and
/// no socket, it stops with exit code 1 and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_serves_on_the_socket_it_is_given() {
    let names = Names::new("sock");
    let dir = names.dir("sock");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let configured = taken.local_addr().unwrap().to_string();
    let given = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let served = given.local_addr().unwrap().to_string();
    let env = names.agent_env(SECRET, &dir.join("spool"), &configured);
    let agent =
        Service::start_with_socket("agent-sock", "agent-compute", &[], &env, &dir, Some(given));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let (code, _) = vmeter_e2e::http::request(&served, "GET", "/health", &[], None).await;
        if code != 0 {
            break code;
        }
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status == 200 || status == 503,
        "{status}\n{}",
        agent.log_text()
    );
    drop(agent);

    let mut env = names.agent_env(SECRET, &dir.join("spool"), &configured);
    env.push(("LISTEN_FDS".into(), "1".into()));
    let mut bad =
        Service::start_with_socket("agent-nosock", "agent-compute", &[], &env, &dir, None);
    assert_eq!(exit_code(&mut bad), Some(1), "{}", bad.log_text());
    assert!(bad.log_text().contains("LISTEN_FDS"), "{}", bad.log_text());
    drop(taken);
}
