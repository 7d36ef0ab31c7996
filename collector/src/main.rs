//! `collector`: store processed samples in PostgreSQL and serve the v2 API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use collector::config::Config;
use collector::store::{self, Store};
use collector::{api, ingest, jobs};
use vmeter_core::amqp::Backoff;
use vmeter_core::service as skeleton;
use vmeter_core::{http, shutdown, telemetry};

#[derive(Parser)]
#[command(
    name = "collector",
    version,
    about = "vmeter collector: PostgreSQL storage and the v2 query API"
)]
struct Cli {
    /// Config file (YAML). Default: /etc/vmeter/collector.yaml if it exists.
    #[arg(long, global = true, env = "VMETER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run ingest and the API (the default).
    Run,
    /// Validate the config file and exit.
    CheckConfig,
    /// Apply database migrations and exit.
    Migrate,
}

/// Decoded samples are many small short-lived allocations (see notification's bench).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Fault-injection builds only: fail points from `FAILPOINTS` (tests/tests/failpoints.rs).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let mut cfg: Config = match skeleton::load_config(cli.config.as_deref(), "collector") {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = cfg.signing.resolve().and_then(|()| cfg.validate()) {
        return skeleton::config_error(e);
    }
    // The HTTPS certificate and key are read now: check-config checks them too.
    let tls = match cfg.http.tls() {
        Ok(t) => t,
        Err(e) => return skeleton::config_error(e),
    };
    if matches!(cli.cmd, Some(Cmd::CheckConfig)) {
        println!("config OK");
        return ExitCode::SUCCESS;
    }
    telemetry::init_logging(&cfg.log);
    let migrate_only = matches!(cli.cmd, Some(Cmd::Migrate));
    skeleton::runtime().block_on(async move {
        let mut stop = shutdown::on_signals();
        let pool = match store::pool(&cfg.database.url, cfg.database.max_connections) {
            Ok(p) => p,
            Err(e) => {
                return skeleton::config_error(format!("database.url {}: {e}", vmeter_core::amqp::redact_url(&cfg.database.url)));
            }
        };
        let mut store = Store::new(pool.clone());
        // The database may not be up yet: retry with back-off, saying so.
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            match store.migrate().await {
                Ok(()) => break,
                Err(sqlx::migrate::MigrateError::Execute(e)) if !matches!(e, sqlx::Error::Database(_)) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(url = %vmeter_core::amqp::redact_url(&cfg.database.url), error = %e, retry_in_ms = wait.as_millis() as u64, "PostgreSQL unreachable; retrying.");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown::wait(&mut stop) => return ExitCode::SUCCESS,
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "Database migration failed.");
                    return ExitCode::FAILURE;
                }
            }
        }
        tracing::info!("Database schema is current.");
        if migrate_only {
            return ExitCode::SUCCESS;
        }
        if let Err(e) = store.ensure_partitions_around(chrono::Utc::now(), cfg.database.partitions_ahead_days).await {
            tracing::warn!(error = %e, "Could not create partitions ahead; they will be created on first insert.");
        }
        let health = http::Health::default();
        let maintenance = tokio::spawn(jobs::maintain(Store::new(pool.clone()), cfg.database.clone(), stop.clone()));
        let rollups = tokio::spawn(jobs::roll_up(Store::new(pool.clone()), cfg.database.clone(), stop.clone()));
        let keystone = match cfg.http.keystone.clone().map(collector::keystone::Keystone::new).transpose() {
            Ok(k) => k.map(Arc::new),
            Err(e) => return skeleton::config_error(format!("http.keystone: {e}")),
        };
        let auth = api::Auth {
            admin: cfg.http.admin_tokens.clone(),
            projects: cfg.http.project_tokens.clone(),
            keystone,
        };
        if !auth.enabled() {
            tracing::warn!(listen = %cfg.http.listen, "API authentication is off (no http.admin_tokens / http.project_tokens): every caller is admin.");
        }
        let raw = Arc::new(collector::raw::RawPublisher::new(cfg.broker.clone(), cfg.signing.signer("collector-api")));
        let app = http::router(health.clone()).merge(api::router(api::Api {
            pool,
            default_limit: cfg.http.default_limit,
            max_limit: cfg.http.max_limit,
            contract: cfg.contract.clone(),
            auth: Arc::new(auth),
            raw: Some(raw),
        }));
        let listener = match skeleton::bind(cfg.http.listen).await {
            Ok(l) => l,
            Err(code) => return code,
        };
        let ingest = ingest::run(cfg, store.pool().clone(), health, stop.clone());
        let code = match tls {
            None => skeleton::serve_with("Collector", listener, app, stop, ingest).await,
            Some(tls) => match vmeter_core::tls_server::TlsListener::new(listener, tls) {
                Ok(l) => {
                    tracing::info!("The API is served over HTTPS.");
                    skeleton::serve_with("Collector", l, app, stop, ingest).await
                }
                Err(e) => {
                    tracing::error!(error = %e, "Cannot serve HTTPS; stopping.");
                    std::process::ExitCode::FAILURE
                }
            },
        };
        maintenance.abort();
        rollups.abort();
        code
    })
}
