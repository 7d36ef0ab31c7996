//! The Debian packages as installed by the README's test command (`deploy/package.sh`, then
//! `dpkg -i`): the three installed binaries, started the way their installed systemd units
//! say (`ExecStart`, as the unit's `User`), with the installed configs in /etc/vmeter as
//! their base, carry samples from libvirt's demo node to PostgreSQL. The test's own broker
//! and database names are environment overrides on top, as an operator's would be.
//!
//! No systemd runs on these machines: the units' sandboxing is not applied here; the units
//! are checked by `systemd-analyze verify` and `security --offline` in deploy/test.sh
//! (docs/packages.md).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Row;
use vmeter_e2e::{
    Names, Service, create_database, drop_database, give_socket, listen_addr, repo_root,
    take_listener,
};

/// The tests of this file change and read the installed system's files: one at a time.
static SYSTEM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `key=` values of an installed unit, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let path = format!("/lib/systemd/system/{unit}.service");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{path}: {e} (deploy/test.sh builds and installs the packages)")
    });
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

/// uid and gid of a system user.
fn user_ids(user: &str) -> (u32, u32) {
    let out = Command::new("getent")
        .args(["passwd", user])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let f: Vec<&str> = line.trim().split(':').collect();
    assert!(
        f.len() >= 4,
        "no user {user}: is the package installed? ({line})"
    );
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

/// Starts an installed unit's `ExecStart` as its `User`, with `env` over the installed
/// config, handing it its HTTP socket (as a socket unit would).
fn start_unit(unit: &'static str, env: &[(String, String)], log_dir: &Path) -> Service {
    let exec = unit_values(unit, "ExecStart");
    let argv: Vec<&str> = exec[0].split_whitespace().collect();
    let user = &unit_values(unit, "User")[0];
    let (uid, gid) = user_ids(user);
    let log = log_dir.join(format!("{unit}.log"));
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .env_remove("VMETER_CONFIG")
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .gid(gid)
        .uid(uid);
    let listener = env
        .iter()
        .find(|(k, _)| k == "VMETER_HTTP__LISTEN")
        .and_then(|(_, addr)| take_listener(addr));
    if let Some(l) = &listener {
        give_socket(&mut cmd, l);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", argv[0]));
    drop(listener);
    Service {
        name: unit,
        child,
        log,
    }
}

/// A directory of the test under /var/lib/vmeter (the units' state directory), owned by
/// the service user, removed at the end even when the test fails.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_packages_carry_samples_from_libvirt_to_postgres() {
    let _one = SYSTEM.lock().await;
    for bin in ["agent-compute", "notification", "collector"] {
        let path = format!("/usr/bin/{bin}");
        let meta = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{path}: {e} (deploy/test.sh installs the packages)"));
        assert!(
            meta.permissions().mode() & 0o111 != 0,
            "{path} is executable"
        );
        let config = format!("/etc/vmeter/{bin}.yaml");
        let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{config} holds passwords: not world-readable");
    }
    let names = Names::new("pkg");
    let logs = names.dir("pkg");
    let admin = create_database(&names).await;
    let (uid, gid) = user_ids("vmeter");
    let state = StateDir(PathBuf::from(format!("/var/lib/vmeter/test-{}", names.id)));
    std::fs::create_dir_all(&state.0).unwrap();
    std::os::unix::fs::chown(&state.0, Some(uid), Some(gid)).unwrap();
    // The demo node where the service user can read it.
    let node = state.0.join("demo-node.xml");
    std::fs::copy(repo_root().join("deploy/demo-node.xml"), &node).unwrap();
    std::os::unix::fs::chown(&node, Some(uid), Some(gid)).unwrap();

    // The test's names over the installed configs; the telemetry secret is the installed
    // one (/etc/vmeter/telemetry_secret, readable by the vmeter group).
    let mut common = names.env("unused");
    common.retain(|(k, _)| k != "VMETER_SIGNING__TELEMETRY_SECRET");
    let mut env = common.clone();
    env.push(("VMETER_DATABASE__URL".into(), names.db_url()));
    let collector_http = listen_addr();
    env.push(("VMETER_HTTP__LISTEN".into(), collector_http.clone()));
    let collector = start_unit("vmeter-collector", &env, &logs);

    let mut env = common.clone();
    env.push((
        "VMETER_PIPELINE__STATE_FILE".into(),
        state.0.join("state.json").display().to_string(),
    ));
    env.push(("VMETER_HTTP__LISTEN".into(), listen_addr()));
    let notification = start_unit("vmeter-notification", &env, &logs);

    // The agent as the other tests run it, on the demo node copied above.
    let mut env = names.agent_env("unused", &state.0.join("spool"), &listen_addr());
    env.retain(|(k, _)| k != "VMETER_SIGNING__TELEMETRY_SECRET" && k != "VMETER_LIBVIRT__URI");
    env.push((
        "VMETER_LIBVIRT__URI".into(),
        format!("test://{}", node.display()),
    ));
    let agent = start_unit("vmeter-agent-compute", &env, &logs);

    let diag = || {
        format!(
            "--- collector:\n{}\n--- notification:\n{}\n--- agent:\n{}",
            collector.log_text(),
            notification.log_text(),
            agent.log_text()
        )
    };
    // Each runs as the unit's user.
    for s in [&collector, &notification, &agent] {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", s.child.id())).unwrap_or_default();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
        assert!(
            uid_line.split_whitespace().nth(1) == Some(&uid.to_string()),
            "{} runs as {uid_line}\n{}",
            s.name,
            diag()
        );
    }

    // cpu_util of the four demo VMs, computed by the installed pipeline.yaml, in PostgreSQL.
    let pool = sqlx::PgPool::connect(&names.db_url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows = sqlx::query(
            "select resource_id, count(*) as n from samples where meter = 'cpu_util' group by 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        if rows.len() == 4 && rows.iter().all(|r| r.get::<i64, _>("n") >= 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cpu_util from {} VMs\n{}",
            rows.len(),
            diag()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The installed collector's API answers.
    let (code, body) =
        vmeter_e2e::http::request(&collector_http, "GET", "/v2/meters", &[], None).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("cpu_util"), "{body}");

    pool.close().await;
    drop((agent, notification, collector));
    drop_database(&admin, &names).await;
}

/// A config file put back when dropped (the test edits the installed system's).
struct Restore(PathBuf, Vec<u8>);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, &self.1);
    }
}

/// The control host's scripted install (deploy/install-control.sh): broker and database
/// set up, the two packages installed, their passwords filled in from the credentials
/// file, and both configs accepted by the installed binaries (`check-config`, which the
/// script runs as user vmeter).
#[test]
fn the_control_host_install_fills_and_checks_the_configs() {
    let _one = SYSTEM.blocking_lock();
    let debs: Vec<PathBuf> = ["vmeter-notification_", "vmeter-collector_"]
        .iter()
        .map(|prefix| {
            std::fs::read_dir(repo_root().join("target/debian"))
                .expect("deploy/test.sh builds the packages first")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
                })
                .expect("the package")
        })
        .collect();
    let configs = [
        "/etc/vmeter/notification.yaml",
        "/etc/vmeter/collector.yaml",
    ];
    let _restore: Vec<Restore> = configs
        .iter()
        .map(|c| Restore(PathBuf::from(c), std::fs::read(c).unwrap()))
        .collect();
    let out = Command::new("bash")
        .arg(repo_root().join("deploy/install-control.sh"))
        .args(&debs)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "install-control.sh: {said}");
    assert!(said.contains("[install-control] installed"), "{said}");
    for c in configs {
        let text = std::fs::read_to_string(c).unwrap();
        assert!(!text.contains(":PASSWORD@"), "{c} still has a placeholder");
        let mode = std::fs::metadata(c).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{c}");
    }
}
