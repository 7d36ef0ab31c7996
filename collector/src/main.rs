//! `collector`: store processed samples in PostgreSQL and serve the v2 API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use collector::config::Config;
use collector::store::{self, Store};
use collector::{api, ingest};
use vmeter_core::amqp::Backoff;
use vmeter_core::{config, http, shutdown, telemetry};

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
    let mut cfg =
        match config::load::<Config>(cli.config.as_deref(), &config::default_path("collector")) {
            Ok((c, _)) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
    if let Err(e) = cfg.signing.resolve().and_then(|()| cfg.validate()) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if matches!(cli.cmd, Some(Cmd::CheckConfig)) {
        println!("config OK");
        return ExitCode::SUCCESS;
    }
    telemetry::init_logging(&cfg.log);
    let migrate_only = matches!(cli.cmd, Some(Cmd::Migrate));
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async move {
        let mut stop = shutdown::on_signals();
        let pool = match store::pool(&cfg.database.url, cfg.database.max_connections) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: database.url {}: {e}", vmeter_core::amqp::redact_url(&cfg.database.url));
                return ExitCode::from(2);
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
        let maintenance = tokio::spawn(maintain(Store::new(pool.clone()), cfg.database.clone(), stop.clone()));
        let rollups = tokio::spawn(roll_up(Store::new(pool.clone()), cfg.database.clone(), stop.clone()));
        let keystone = match cfg.http.keystone.clone().map(collector::keystone::Keystone::new).transpose() {
            Ok(k) => k.map(Arc::new),
            Err(e) => {
                tracing::error!(error = %e, "Invalid http.keystone configuration.");
                return ExitCode::from(2);
            }
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
        let listen = cfg.http.listen;
        let mut web = tokio::spawn(http::serve(listen, app, stop.clone()));
        // A web server that cannot bind must stop the collector, not be noticed at exit.
        let stopping = stop.clone();
        let ingest = ingest::run(cfg, store.pool().clone(), health, stop);
        tokio::pin!(ingest);
        let result = tokio::select! {
            r = &mut ingest => r,
            w = &mut web => {
                if *stopping.borrow() && matches!(w, Ok(Ok(()))) {
                    // Graceful shutdown: the server finished first; let ingest finish too.
                    ingest.await
                } else {
                    let msg = match w {
                        Ok(Err(e)) => e.to_string(),
                        _ => "HTTP server stopped".to_string(),
                    };
                    tracing::error!(%listen, error = %msg, "HTTP API could not serve.");
                    return ExitCode::FAILURE;
                }
            }
        };
        web.abort();
        maintenance.abort();
        rollups.abort();
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "Collector failed.");
                ExitCode::FAILURE
            }
        }
    })
}

/// Every `maintenance_interval_secs`: create partitions ahead and apply `retention_days`.
async fn maintain(
    mut store: Store,
    cfg: collector::config::DatabaseConfig,
    mut stop: shutdown::Shutdown,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.maintenance_interval_secs.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown::wait(&mut stop) => return,
        }
        let now = chrono::Utc::now();
        if let Err(e) = store
            .ensure_partitions_around(now, cfg.partitions_ahead_days)
            .await
        {
            tracing::warn!(error = %e, "Could not create partitions ahead; retrying next round.");
        }
        let Some(days) = cfg.retention_days else {
            continue;
        };
        match store.apply_retention(now, days).await {
            Ok(r) if r.partitions.is_empty() => tracing::debug!("Retention: nothing expired."),
            Ok(r) => tracing::info!(
                dropped = ?r.partitions,
                series = r.series,
                resources = r.resources,
                meters = r.meters,
                retention_days = days,
                "Retention: expired partitions dropped, empty series/resources/meters pruned."
            ),
            Err(e) => tracing::warn!(error = %e, "Retention failed; retrying next round."),
        }
    }
}

/// Every `rollup_interval_secs`: roll up the hours that closed (docs/storage.md, "Rollups").
/// A backlog is worked off 24 hours per round, without waiting for the next tick.
async fn roll_up(
    store: Store,
    cfg: collector::config::DatabaseConfig,
    mut stop: shutdown::Shutdown,
) {
    if cfg.rollup_interval_secs == 0 {
        return;
    }
    let hours = vmeter_core::telemetry::counter(
        "vmeter_rollup_hours_total",
        "Hours rolled up by the rollup job (one transaction each).",
        &[],
    );
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.rollup_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lag =
        chrono::Duration::seconds(cfg.rollup_lag_secs.min(i64::MAX as u64 / 2_000_000) as i64);
    let mut caught_up = true;
    loop {
        if caught_up {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown::wait(&mut stop) => return,
            }
        }
        let started = std::time::Instant::now();
        match store.roll_up(chrono::Utc::now(), lag, 24).await {
            Ok(run) => {
                hours.add(u64::from(run.hours));
                caught_up = run.caught_up;
                if run.hours > 0 {
                    tracing::info!(
                        hours = run.hours,
                        rows = run.rows,
                        watermark = ?run.watermark,
                        caught_up = run.caught_up,
                        ms = started.elapsed().as_millis() as u64,
                        "Rolled up closed hours."
                    );
                }
            }
            Err(e) => {
                caught_up = true;
                tracing::warn!(error = %e, "Rollup failed; retrying next round.");
            }
        }
    }
}
