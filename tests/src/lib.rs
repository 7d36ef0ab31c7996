//! Helpers for vmeter's end-to-end tests: isolated broker names and database per test,
//! starting the real binaries as child processes.
//!
//! Prerequisite: RabbitMQ and PostgreSQL running as `deploy/setup.sh` leaves them, and the
//! binaries built (`cargo build --workspace --bins`); `deploy/test.sh` does both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `cpu_util` gauge sample (%, owner `u`/`p`, source `openstack`, metadata
/// `{"host": "h1"}`) of resource `rid` at `ts`, as the notification service publishes them.
pub fn cpu_util_sample(
    rid: &str,
    volume: f64,
    ts: chrono::DateTime<chrono::Utc>,
) -> vmeter_core::Sample {
    let mut md = vmeter_core::Metadata::new();
    md.insert("host".into(), "h1".into());
    vmeter_core::Sample {
        name: "cpu_util".into(),
        kind: vmeter_core::SampleType::Gauge,
        unit: "%".into(),
        volume,
        user_id: Some("u".into()),
        project_id: Some("p".into()),
        resource_id: rid.into(),
        timestamp: ts,
        resource_metadata: std::sync::Arc::new(md),
        source: "openstack".into(),
        message_id: uuid::Uuid::new_v4(),
        monotonic_time: None,
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Directory of the workspace binaries (next to the test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// Base AMQP URL (vhost /vmeter, the vhost's admin user) and the database URL: from
/// `VMETER_TEST_AMQP_URL` / `VMETER_TEST_PG_URL`, else from the credentials
/// `deploy/setup.sh` made (`/etc/vmeter/credentials.env`).
pub fn amqp_url() -> String {
    vmeter_core::config::local_amqp_url("ADMIN")
}

pub fn pg_admin_url() -> String {
    vmeter_core::config::local_pg_url()
}

/// A free TCP port on loopback (for what is not one of our services: an address nobody
/// listens on, another program's port). Our services take [`listen_addr`].
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Listening sockets made by [`listen_addr`], by address, until a service takes them.
static LISTENERS: std::sync::Mutex<Vec<(String, std::net::TcpListener)>> =
    std::sync::Mutex::new(Vec::new());

/// An HTTP address for a service: a socket bound now on port 0 and kept listening, which
/// [`Service::start`] hands to the service whose `VMETER_HTTP__LISTEN` is this address
/// (descriptor 3, `LISTEN_FDS=1`, as systemd's socket activation does). No port is free
/// between choosing it and the service listening on it, so nothing can take it meanwhile.
/// A service started again on the address binds it itself.
pub fn listen_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let addr = l.local_addr().unwrap().to_string();
    LISTENERS
        .lock()
        .expect("not poisoned")
        .push((addr.clone(), l));
    addr
}

/// The socket [`listen_addr`] made for `addr`, if no service has taken it yet.
pub fn take_listener(addr: &str) -> Option<std::net::TcpListener> {
    let mut all = LISTENERS.lock().expect("not poisoned");
    let at = all.iter().position(|(a, _)| a == addr)?;
    Some(all.swap_remove(at).1)
}

/// The vhost of the machine's broker (`MQ_VHOST` of the credentials `deploy/setup.sh`
/// made; `/vmeter` by default).
pub fn vhost() -> String {
    let cred = std::env::var("VMETER_CREDENTIALS")
        .unwrap_or_else(|_| "/etc/vmeter/credentials.env".into());
    std::fs::read_to_string(&cred)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MQ_VHOST=").map(str::to_string))
        .unwrap_or_else(|| "/vmeter".into())
}

/// Names unique to one test run, so tests never see each other's traffic. Dropped (at the
/// end of the test, or while a failed test unwinds), they take with them what the test made
/// under them: its queues and exchanges, its database and its directories ([`Names::dir`]).
/// A test's own cleanup at its end is then only the first of two.
pub struct Names {
    pub id: String,
    pub exchange: String,
    pub raw_queue: String,
    pub processed_queue: String,
    pub dlx: String,
    pub dead_queue: String,
    pub database: String,
    /// The broker's addresses for the services (`broker.url`, then `failover_urls`): the
    /// machine's node ([`amqp_url`]), or a cluster's nodes ([`Names::on_brokers`]).
    pub broker_urls: Vec<String>,
    /// Directories to remove on drop.
    dirs: std::sync::Mutex<Vec<PathBuf>>,
}

impl Drop for Names {
    fn drop(&mut self) {
        for d in self.dirs.get_mut().map(std::mem::take).unwrap_or_default() {
            let _ = std::fs::remove_dir_all(d);
        }
        let queues = [
            self.raw_queue.clone(),
            self.processed_queue.clone(),
            self.dead_queue.clone(),
        ];
        let exchanges = [self.exchange.clone(), self.dlx.clone()];
        let database = self.database.clone();
        let urls = self.broker_urls.clone();
        // On a thread of its own: a drop cannot await, and the runtime of the test may be the
        // one unwinding. Bounded, so a broker or database that is away cannot hang the suite.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let cleanup = async {
                    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
                    let mut connected = None;
                    for url in &urls {
                        let props = lapin::ConnectionProperties::default();
                        if let Ok(c) = lapin::Connection::connect(url, props).await {
                            connected = Some(c);
                            break;
                        }
                    }
                    if let Some(conn) = connected
                        && let Ok(ch) = conn.create_channel().await
                    {
                        for q in &queues {
                            let _ = ch
                                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                                .await;
                        }
                        for e in &exchanges {
                            let _ = ch
                                .exchange_delete(
                                    e.as_str().into(),
                                    ExchangeDeleteOptions::default(),
                                )
                                .await;
                        }
                        let _ = conn.close(200, "cleanup".into()).await;
                    }
                    if let Ok(admin) = sqlx::PgPool::connect(&pg_admin_url()).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "drop database if exists {database} with (force)"
                        )))
                        .execute(&admin)
                        .await;
                        admin.close().await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(20), cleanup).await;
            });
        })
        .join();
    }
}

impl Names {
    pub fn new(tag: &str) -> Self {
        let id = format!("{tag}{}x{}", std::process::id(), fastrand_u32());
        Names {
            exchange: format!("e2e.{id}"),
            raw_queue: format!("e2e.{id}.raw"),
            processed_queue: format!("e2e.{id}.processed"),
            dlx: format!("e2e.{id}.dlx"),
            dead_queue: format!("e2e.{id}.dead"),
            database: format!("vmeter_e2e_{id}"),
            id,
            broker_urls: vec![amqp_url()],
            dirs: Default::default(),
        }
    }

    /// Names whose services use the broker at `urls` (the nodes of a cluster: the first is
    /// `broker.url`, the others `broker.failover_urls`).
    pub fn on_brokers(tag: &str, urls: Vec<String>) -> Self {
        assert!(!urls.is_empty(), "at least one broker address");
        let mut names = Names::new(tag);
        names.broker_urls = urls;
        names
    }

    /// A new directory `vmeter-<what>-<id>` under the system's temporary directory, removed
    /// when these names are dropped.
    pub fn dir(&self, what: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmeter-{what}-{}", self.id));
        std::fs::create_dir_all(&d).expect("a temporary directory");
        self.dirs.lock().expect("not poisoned").push(d.clone());
        d
    }

    /// Environment overrides that point a service at these names.
    pub fn env(&self, secret: &str) -> Vec<(String, String)> {
        let failover = serde_json::to_string(&self.broker_urls[1..]).expect("strings");
        vec![
            ("VMETER_BROKER__URL".into(), self.broker_urls[0].clone()),
            // A YAML flow list (JSON is YAML).
            ("VMETER_BROKER__FAILOVER_URLS".into(), failover),
            ("VMETER_BROKER__EXCHANGE".into(), self.exchange.clone()),
            ("VMETER_BROKER__RAW_QUEUE".into(), self.raw_queue.clone()),
            (
                "VMETER_BROKER__PROCESSED_QUEUE".into(),
                self.processed_queue.clone(),
            ),
            (
                "VMETER_BROKER__DEAD_LETTER_EXCHANGE".into(),
                self.dlx.clone(),
            ),
            (
                "VMETER_BROKER__DEAD_LETTER_QUEUE".into(),
                self.dead_queue.clone(),
            ),
            (
                "VMETER_SIGNING__TELEMETRY_SECRET".into(),
                format!("\"{secret}\""),
            ),
            ("VMETER_LOG__LEVEL".into(), "info".into()),
            // Fixtures carry fixed dates (2026-03-01, …): no age window, the rest of the
            // sample contract applies. The window itself: tests/tests/hostile_input.rs.
            ("VMETER_CONTRACT__MAX_AGE_DAYS".into(), String::new()),
        ]
    }

    /// [`env`](Self::env) for an agent polling the demo node (libvirt's test driver) every
    /// second from the start, spooling into `spool`, serving `/health` and `/metrics` on
    /// `http`.
    pub fn agent_env(&self, secret: &str, spool: &Path, http: &str) -> Vec<(String, String)> {
        let mut env = self.env(secret);
        env.push((
            "VMETER_LIBVIRT__URI".into(),
            format!(
                "test://{}",
                repo_root().join("deploy/demo-node.xml").display()
            ),
        ));
        env.push(("VMETER_POLLING__INTERVAL_SECS".into(), "1".into()));
        env.push(("VMETER_POLLING__SHUFFLE_TIME_SECS".into(), "0".into()));
        env.push(("VMETER_SPOOL__DIR".into(), spool.display().to_string()));
        env.push(("VMETER_HTTP__LISTEN".into(), http.to_string()));
        env
    }

    /// The test database URL.
    pub fn db_url(&self) -> String {
        let admin = pg_admin_url();
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b.to_string())
            .unwrap_or(admin);
        format!("{base}/{}", self.database)
    }
}

/// Creates this run's database (`names.database`); returns a pool on the admin database,
/// for [`drop_database`].
pub async fn create_database(names: &Names) -> sqlx::PgPool {
    let admin = sqlx::PgPool::connect(&pg_admin_url())
        .await
        .expect("PostgreSQL from deploy/setup.sh must be running");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "create database {}",
        names.database
    )))
    .execute(&admin)
    .await
    .unwrap();
    admin
}

/// Drops this run's database, disconnecting whoever still uses it.
pub async fn drop_database(admin: &sqlx::PgPool, names: &Names) {
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database if exists {} with (force)",
        names.database
    )))
    .execute(admin)
    .await;
}

fn fastrand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(13)
}

/// Makes `cmd`'s process start with `listener` as descriptor 3 and `LISTEN_FDS=1` (systemd's
/// socket activation; `vmeter_core::service::bind` takes it). Drop `listener` after the
/// spawn: the child has its own copy.
pub fn give_socket(cmd: &mut Command, listener: &std::net::TcpListener) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    cmd.env("LISTEN_FDS", "1");
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl) on
    // descriptors this process owns; descriptor 3 is the child's listening socket.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A child process killed (SIGTERM, then SIGKILL) when dropped; its log goes to a file.
pub struct Service {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
}

impl Service {
    /// Starts `bin` with `args` and `env` (plus the inherited environment).
    pub fn start(
        name: &'static str,
        bin: &str,
        args: &[&str],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> Service {
        let listener = env
            .iter()
            .find(|(k, _)| k == "VMETER_HTTP__LISTEN")
            .and_then(|(_, addr)| take_listener(addr));
        Self::start_with_socket(name, bin, args, env, log_dir, listener)
    }

    /// [`start`](Self::start), handing `listener` (if any) to the service as its HTTP socket
    /// (descriptor 3, `LISTEN_FDS=1`).
    pub fn start_with_socket(
        name: &'static str,
        bin: &str,
        args: &[&str],
        env: &[(String, String)],
        log_dir: &Path,
        listener: Option<std::net::TcpListener>,
    ) -> Service {
        let log = log_dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let path = bin_dir().join(bin);
        assert!(
            path.exists(),
            "{} is not built; run `cargo build --workspace --bins` first (deploy/test.sh does)",
            path.display()
        );
        let mut cmd = Command::new(&path);
        // Built-in defaults under the test's overrides, not /etc/vmeter/<binary>.yaml (which
        // the packages install on this machine): an empty config file.
        cmd.args(args)
            .env("VMETER_CONFIG", "/dev/null")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(f);
        if let Some(l) = &listener {
            give_socket(&mut cmd, l);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", path.display()));
        // The child has its copy of the socket; this process's goes.
        drop(listener);
        Service { name, child, log }
    }

    /// The log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asks it to stop and waits up to 10 s.
    pub fn stop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

pub mod broker;
pub mod browser;
pub mod http;
pub mod load;
