//! The API's Keystone v3 authentication against a real Keystone: installed from PyPI into a
//! throwaway virtualenv by the README's test command (`VMETER_KEYSTONE_VENV`, default
//! `/opt/vmeter-test/keystone`), SQLite backend, `keystone-manage bootstrap`, served by
//! `tests/keystone/serve.py`. Users, projects, roles and the catalog are made through
//! Keystone's own API; callers log in as OpenStack users do, including the real
//! python-ceilometerclient with an ordinary Keystone login (catalog lookup of `metering`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmeter_e2e::http::{get_json, request};
use vmeter_e2e::{
    Names, Service, create_database, drop_database, free_port, listen_addr, repo_root,
};

fn venv() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("VMETER_KEYSTONE_VENV")
            .unwrap_or_else(|_| "/opt/vmeter-test/keystone".into()),
    );
    assert!(
        dir.join("bin/keystone-manage").exists(),
        "Keystone is not installed in {}: deploy/test.sh installs it",
        dir.display()
    );
    dir
}

/// Keystone's process, killed on drop.
struct KeystoneProcess(Child);

impl Drop for KeystoneProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn manage(conf: &Path, args: &[&str]) {
    let out = Command::new(venv().join("bin/keystone-manage"))
        .arg("--config-file")
        .arg(conf)
        .args(args)
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("run keystone-manage");
    assert!(
        out.status.success(),
        "keystone-manage {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small Keystone v3 admin client.
struct Ks {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Ks {
    /// Password login; `scope` a project name, or none (unscoped).
    async fn login(
        http: &reqwest::Client,
        url: &str,
        user: &str,
        pw: &str,
        scope: Option<&str>,
    ) -> String {
        let mut auth = json!({"identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"id": "default"}, "password": pw}}}});
        if let Some(p) = scope {
            auth["scope"] = json!({"project": {"name": p, "domain": {"id": "default"}}});
        }
        let res = http
            .post(format!("{url}/auth/tokens"))
            .json(&json!({ "auth": auth }))
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status().as_u16(),
            201,
            "login {user}: {:?}",
            res.text().await
        );
        res.headers()["x-subject-token"]
            .to_str()
            .unwrap()
            .to_string()
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.url))
            .header("X-Auth-Token", &self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn create(&self, path: &str, kind: &str, body: Value) -> String {
        let v = self
            .call(reqwest::Method::POST, path, Some(json!({ kind: body })))
            .await;
        v[kind]["id"].as_str().unwrap().to_string()
    }

    /// The id of role `name`, created if bootstrap did not make it.
    async fn role(&self, name: &str) -> String {
        let v = self
            .call(reqwest::Method::GET, &format!("/roles?name={name}"), None)
            .await;
        match v["roles"][0]["id"].as_str() {
            Some(id) => id.to_string(),
            None => self.create("/roles", "role", json!({ "name": name })).await,
        }
    }

    async fn grant(&self, project: &str, user: &str, role: &str) {
        self.call(
            reqwest::Method::PUT,
            &format!("/projects/{project}/users/{user}/roles/{role}"),
            None,
        )
        .await;
    }
}

fn sample(rid: &str, project: &str, minutes_ago: i64, v: f64) -> Value {
    let ts = chrono::Utc::now() - chrono::Duration::minutes(minutes_ago);
    json!({"counter_name": "cpu_util", "counter_type": "gauge", "counter_unit": "%",
           "counter_volume": v, "resource_id": rid, "project_id": project, "user_id": "u",
           "timestamp": ts.format("%Y-%m-%dT%H:%M:%S").to_string(), "resource_metadata": {}})
}

fn scrape(metrics: &str, result: &str) -> f64 {
    vmeter_core::telemetry::scrape(
        metrics,
        &format!("vmeter_api_keystone_validations_total{{result=\"{result}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keystone_tokens_scope_projects_and_the_real_client_logs_in() {
    let venv = venv();
    let names = Names::new("ks");
    let dir = names.dir("ks");
    std::fs::create_dir_all(dir.join("fernet")).unwrap();
    std::fs::create_dir_all(dir.join("credential")).unwrap();
    let kport = free_port();
    let kurl = format!("http://127.0.0.1:{kport}/v3");
    let conf = dir.join("keystone.conf");
    std::fs::write(
        &conf,
        format!(
            "[DEFAULT]\nlog_file = {d}/keystone.log\n[database]\nconnection = sqlite:///{d}/keystone.db\n\
             [token]\nprovider = fernet\n[fernet_tokens]\nkey_repository = {d}/fernet\n\
             [credential]\nkey_repository = {d}/credential\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let admin_pw = format!("admin-{}", names.id);
    manage(&conf, &["db_sync"]);
    for keys in ["fernet_setup", "credential_setup"] {
        let owner = ["--keystone-user", "root", "--keystone-group", "root"];
        manage(&conf, &[&[keys][..], &owner[..]].concat());
    }
    manage(
        &conf,
        &[
            "bootstrap",
            "--bootstrap-password",
            &admin_pw,
            "--bootstrap-public-url",
            &format!("{kurl}/"),
            "--bootstrap-region-id",
            "RegionOne",
        ],
    );
    let _keystone = KeystoneProcess(
        Command::new(venv.join("bin/python"))
            .arg(repo_root().join("tests/keystone/serve.py"))
            .arg(kport.to_string())
            .arg(&conf)
            .env("PYTHONWARNINGS", "ignore")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
            .spawn()
            .expect("start Keystone"),
    );
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http
        .get(&kurl)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "Keystone did not answer: {}",
            std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Keystone's admin makes two tenants, a user of the first, the collector's service
    // user (role `service`, as Keystone's default policy wants for validating tokens), and
    // puts the collector in the catalog as `metering`.
    let admin_token = Ks::login(&http, &kurl, "admin", &admin_pw, Some("admin")).await;
    let ks = Ks {
        http: http.clone(),
        url: kurl.clone(),
        token: admin_token.clone(),
    };
    let project = |name: &str| json!({"name": name, "domain_id": "default"});
    let tenant_a = ks.create("/projects", "project", project("tenant-a")).await;
    let tenant_b = ks.create("/projects", "project", project("tenant-b")).await;
    let service_project = ks.create("/projects", "project", project("service")).await;
    let user = |name: &str, pw: &str| json!({"name": name, "password": pw, "domain_id": "default"});
    let alice = ks.create("/users", "user", user("alice", "alice-pw")).await;
    let svc = ks
        .create("/users", "user", user("vmeter", "vmeter-pw"))
        .await;
    let (member, service_role) = (ks.role("member").await, ks.role("service").await);
    ks.grant(&tenant_a, &alice, &member).await;
    ks.grant(&service_project, &svc, &service_role).await;

    let addr = listen_addr();
    let metering = ks
        .create(
            "/services",
            "service",
            json!({"type": "metering", "name": "ceilometer"}),
        )
        .await;
    ks.create(
        "/endpoints",
        "endpoint",
        json!({"service_id": metering, "interface": "public", "url": format!("http://{addr}"), "region_id": "RegionOne"}),
    )
    .await;

    // The collector, with Keystone and no static token.
    let admin_db = create_database(&names).await;
    std::fs::write(dir.join("keystone_password"), "vmeter-pw\n").unwrap();
    let mut env = names.env("ks-secret");
    for (k, v) in [
        ("VMETER_DATABASE__URL", names.db_url()),
        ("VMETER_HTTP__LISTEN", addr.clone()),
        ("VMETER_HTTP__KEYSTONE__URL", kurl.clone()),
        ("VMETER_HTTP__KEYSTONE__USERNAME", "vmeter".into()),
        (
            "VMETER_HTTP__KEYSTONE__PASSWORD_FILE",
            dir.join("keystone_password").display().to_string(),
        ),
        ("VMETER_HTTP__KEYSTONE__PROJECT_NAME", "service".into()),
    ] {
        env.push((k.into(), v));
    }
    let collector = Service::start("collector", "collector", &[], &env, &dir);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "{}",
            collector.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Keystone's admin (role admin) posts for both tenants.
    let body = json!([
        sample("vm-a", &tenant_a, 30, 10.0),
        sample("vm-a", &tenant_a, 20, 30.0),
        sample("vm-b", &tenant_b, 25, 90.0),
    ]);
    let (code, text) = request(
        &addr,
        "POST",
        "/v2/meters/cpu_util?direct=true",
        &[("X-Auth-Token", &admin_token)],
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(code, 201, "{text}\n{}", collector.log_text());
    let (code, all) = get_json(&addr, "/v2/samples", Some(&admin_token)).await;
    assert_eq!(
        (code, all.as_array().map(Vec::len)),
        (200, Some(3)),
        "{all}"
    );

    // alice's token, scoped to tenant-a: tenant-a's samples only, on every endpoint.
    let alice_token = Ks::login(&http, &kurl, "alice", "alice-pw", Some("tenant-a")).await;
    let (_, before) = request(&addr, "GET", "/metrics", &[], None).await;
    let (code, mine) = get_json(&addr, "/v2/samples", Some(&alice_token)).await;
    assert_eq!(code, 200, "{mine}");
    let rids: Vec<&str> = mine
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["resource_id"].as_str().unwrap())
        .collect();
    assert_eq!(rids, ["vm-a", "vm-a"], "{mine}");
    for _ in 0..4 {
        let (code, st) =
            get_json(&addr, "/v2/meters/cpu_util/statistics", Some(&alice_token)).await;
        assert_eq!(code, 200, "{st}");
        assert_eq!(
            (&st[0]["count"], &st[0]["avg"]),
            (&json!(2), &json!(20.0)),
            "{st}"
        );
    }
    let (code, r) = get_json(&addr, "/v2/resources", Some(&alice_token)).await;
    assert_eq!((code, r.as_array().map(Vec::len)), (200, Some(1)), "{r}");
    let (code, _) = get_json(
        &addr,
        &format!("/v2/samples?q.field=project_id&q.value={tenant_b}"),
        Some(&alice_token),
    )
    .await;
    assert_eq!(code, 401, "another project");
    // alice may not post for tenant-b.
    let (code, _) = request(
        &addr,
        "POST",
        "/v2/meters/cpu_util?direct=true",
        &[("X-Auth-Token", &alice_token)],
        Some(&json!([sample("vm-x", &tenant_b, 5, 1.0)]).to_string()),
    )
    .await;
    assert_eq!(code, 400, "a sample for another project");
    // Five requests with alice's token: Keystone asked once, the cache answered the rest.
    let (_, after) = request(&addr, "GET", "/metrics", &[], None).await;
    assert_eq!(
        scrape(&after, "valid") - scrape(&before, "valid"),
        1.0,
        "{after}"
    );
    assert!(
        scrape(&after, "cached") - scrape(&before, "cached") >= 6.0,
        "{after}"
    );

    // Refused: an unscoped token, a revoked token, a made-up token.
    let unscoped = Ks::login(&http, &kurl, "alice", "alice-pw", None).await;
    let (code, body) = get_json(&addr, "/v2/samples", Some(&unscoped)).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.to_string().contains("not scoped"), "{body}");
    let revoked = Ks::login(&http, &kurl, "alice", "alice-pw", Some("tenant-a")).await;
    let res = http
        .delete(format!("{kurl}/auth/tokens"))
        .header("X-Auth-Token", &admin_token)
        .header("X-Subject-Token", &revoked)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 204);
    assert_eq!(get_json(&addr, "/v2/samples", Some(&revoked)).await.0, 401);
    assert_eq!(
        get_json(&addr, "/v2/samples", Some("gAAAAAmadeup")).await.0,
        401
    );
    assert_eq!(get_json(&addr, "/v2/samples", None).await.0, 401);
    // Hostile tokens: oversized, and bytes a fernet token never has. Refused (401), never
    // a Keystone failure (503) or a crash.
    let huge = "A".repeat(16 * 1024);
    assert_eq!(get_json(&addr, "/v2/samples", Some(&huge)).await.0, 401);
    assert_eq!(
        get_json(&addr, "/v2/samples", Some("%00'\";--")).await.0,
        401
    );

    // The real python-ceilometerclient, logging in to Keystone as alice and finding the
    // collector in the catalog.
    let client = PathBuf::from(
        std::env::var("VMETER_CEILOMETERCLIENT_VENV")
            .unwrap_or_else(|_| "/opt/vmeter-test/ceilometerclient".into()),
    );
    let out = Command::new(client.join("bin/ceilometer"))
        .args([
            "--os-auth-url",
            &kurl,
            "--os-username",
            "alice",
            "--os-password",
            "alice-pw",
            "--os-project-name",
            "tenant-a",
            "--os-user-domain-id",
            "default",
            "--os-project-domain-id",
            "default",
            "statistics",
            "-m",
            "cpu_util",
        ])
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("run the ceilometer CLI");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        collector.log_text()
    );
    let cells = |l: &str| -> Vec<String> {
        l.trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let mut lines = stdout.lines().filter(|l| l.starts_with('|')).map(cells);
    let header = lines.next().expect("a table header");
    let row = lines.next().expect("one statistics row");
    let col = |name: &str| {
        let at = header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("{name} in {header:?}"));
        row[at].clone()
    };
    assert_eq!(
        (col("Max"), col("Min"), col("Count")),
        ("30.0".into(), "10.0".into(), "2".into()),
        "{stdout}"
    );

    drop(collector);
    drop_database(&admin_db, &names).await;
    let _ = std::fs::remove_dir_all(&dir);
}
