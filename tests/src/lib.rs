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

/// Broker-side helpers: publish signed batches like an agent, read what a service published.
pub mod browser;
pub mod load;

pub mod broker {
    use std::time::{Duration, Instant};

    use lapin::options::{
        BasicAckOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    use vmeter_core::{Sample, signing::Signer, wire};

    use super::{Names, amqp_url};

    pub async fn connect() -> Connection {
        Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ from deploy/setup.sh must be running")
    }

    /// Waits until no message of `queue` is delivered and unacknowledged (asked of the
    /// machine's node with `rabbitmqctl`): the consumer acked all it took. Before a crash
    /// that must not redeliver anything.
    pub async fn wait_all_acked(queue: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let out = std::process::Command::new("rabbitmqctl")
                .args(["-q", "list_queues", "-p", &super::vhost()])
                .args(["name", "messages_unacknowledged", "--formatter", "json"])
                .output()
                .expect("rabbitmqctl");
            let rows: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            let unacked = rows
                .iter()
                .find(|r| r["name"] == queue)
                .and_then(|r| r["messages_unacknowledged"].as_u64());
            if unacked == Some(0) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{queue}: {unacked:?} messages still unacknowledged"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The consumer count of `queue`, `None` while it does not exist.
    async fn consumers(conn: &Connection, queue: &str) -> Option<u32> {
        // A failed passive declare closes the channel: use a fresh one per try.
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()
        .map(|q| q.consumer_count())
    }

    /// Waits until `queue` exists (a service declares its topology at start).
    pub async fn wait_for_queue(conn: &Connection, queue: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while consumers(conn, queue).await.is_none() {
            assert!(Instant::now() < deadline, "queue {queue} never appeared");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `queue` has a consumer: the service that consumes it has declared and
    /// bound it (a queue that merely exists may not be bound yet, and a mandatory publish
    /// to it would come back unroutable).
    pub async fn wait_for_consumer(conn: &Connection, queue: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while consumers(conn, queue).await.unwrap_or(0) == 0 {
            assert!(Instant::now() < deadline, "nobody consumes queue {queue}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publishes one signed batch (persistent, mandatory, confirmed) as an agent would.
    pub async fn publish(
        conn: &Connection,
        names: &Names,
        routing_key: &str,
        samples: &[Sample],
        secret: &str,
    ) {
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        let c = publish_on(&ch, names, routing_key, &wire::encode(samples), secret)
            .await
            .await
            .unwrap();
        assert!(
            c.is_ack() && c.take_message().is_none(),
            "a test message was not routed to a queue"
        );
        let _ = ch.close(200, "done".into()).await;
    }

    /// Publishes an encoded body on a confirm channel; returns the pending confirmation.
    pub async fn publish_on(
        ch: &lapin::Channel,
        names: &Names,
        routing_key: &str,
        body: &[u8],
        secret: &str,
    ) -> lapin::PublisherConfirm {
        let mut h = FieldTable::default();
        h.insert(
            wire::FORMAT_HEADER.into(),
            AMQPValue::LongLongInt(wire::FORMAT_VERSION),
        );
        h.insert(
            wire::SIGNATURE_HEADER.into(),
            AMQPValue::LongString(Signer::new(secret).sign(body).unwrap().into()),
        );
        ch.basic_publish(
            names.exchange.as_str().into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(h),
        )
        .await
        .unwrap()
    }

    /// Takes every message from `queue` until it stayed empty for `quiet` or `want`
    /// samples arrived (whichever first, bounded by `timeout`); returns their samples.
    /// Uses a consumer (basic.get is refused on single-active-consumer quorum queues).
    pub async fn take(
        conn: &Connection,
        queue: &str,
        want: usize,
        quiet: Duration,
        timeout: Duration,
    ) -> Vec<Sample> {
        let mut n = 0;
        let mut out = Vec::new();
        consume(conn, queue, quiet, timeout, |d| {
            let samples = wire::decode(&d.data, None).expect("vmeter batch");
            n += samples.len();
            out.extend(samples);
            n < want
        })
        .await;
        out
    }

    /// Like [`take`], message by message, with each message's dead-letter reason header
    /// ([`wire::DEAD_REASON_HEADER`], empty when absent). Bodies that are not vmeter batches
    /// give no samples.
    pub async fn take_dead(
        conn: &Connection,
        queue: &str,
        want_messages: usize,
        quiet: Duration,
        timeout: Duration,
    ) -> Vec<(String, Vec<Sample>)> {
        let mut out = Vec::new();
        consume(conn, queue, quiet, timeout, |d| {
            let reason = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(wire::DEAD_REASON_HEADER).cloned())
                .map(|v| match v {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            out.push((reason, wire::decode(&d.data, None).unwrap_or_default()));
            out.len() < want_messages
        })
        .await;
        out
    }

    /// Consumes `queue`, acking each delivery after `each` saw it, until `each` says
    /// enough, the queue stayed empty for `quiet`, or `timeout` passed. Closing the channel
    /// returns anything delivered but not acked to the queue.
    async fn consume(
        conn: &Connection,
        queue: &str,
        quiet: Duration,
        timeout: Duration,
        mut each: impl FnMut(&lapin::message::Delivery) -> bool,
    ) {
        use futures::StreamExt;
        let ch = conn.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "e2e-take".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let wait = quiet.min(deadline.saturating_duration_since(Instant::now()));
            match tokio::time::timeout(wait, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    let more = each(&d);
                    d.acker.ack(BasicAckOptions::default()).await.unwrap();
                    if !more {
                        break;
                    }
                }
                Ok(_) | Err(_) => break,
            }
        }
        let _ = ch.close(200, "done".into()).await;
    }

    /// Every sample arriving on `queue` during `period` (for a producer that keeps going).
    pub async fn collect_for(conn: &Connection, queue: &str, period: Duration) -> Vec<Sample> {
        let started = Instant::now();
        let mut got = Vec::new();
        while started.elapsed() < period {
            got.extend(
                take(
                    conn,
                    queue,
                    usize::MAX,
                    Duration::from_millis(500),
                    Duration::from_secs(2),
                )
                .await,
            );
        }
        got
    }

    /// Deletes this run's queues and exchanges.
    pub async fn cleanup(conn: &Connection, names: &Names) {
        let ch = conn.create_channel().await.unwrap();
        for q in [&names.raw_queue, &names.processed_queue, &names.dead_queue] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in [&names.exchange, &names.dlx] {
            let _ = ch
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

/// A minimal HTTP/1.1 client for the API tests (one request per connection).
pub mod http {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends a request; returns (status, body). `headers` are `(name, value)` pairs.
    pub async fn request(
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, body)
    }

    fn dechunk(mut body: &str) -> String {
        let mut out = String::new();
        while let Some((size, rest)) = body.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || rest.len() < n {
                break;
            }
            out.push_str(&rest[..n]);
            body = rest[n..].trim_start_matches("\r\n");
        }
        out
    }

    /// GET returning (status, parsed JSON or `Null`).
    pub async fn get_json(addr: &str, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let (code, body) = request(addr, "GET", path, &headers, None).await;
        (
            code,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }
}
