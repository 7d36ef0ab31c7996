//! The collector's background jobs: daily partitions ahead and retention, and the rollup
//! of closed hours. Each runs on its own timer until shutdown; a failed round is logged and
//! retried at the next tick.

use std::time::Duration;

use vmeter_core::shutdown;

use crate::config::DatabaseConfig;
use crate::store::Store;

/// Every `maintenance_interval_secs`: create partitions ahead and apply `retention_days`.
pub async fn maintain(mut store: Store, cfg: DatabaseConfig, mut stop: shutdown::Shutdown) {
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

/// Every `rollup_interval_secs`: roll up the hours that closed (docs/storage.md, "Rollups"),
/// then, with `database.compaction`, compact the rolled-up hours.
/// A backlog is worked off 24 hours per round, without waiting for the next tick.
pub async fn roll_up(store: Store, cfg: DatabaseConfig, mut stop: shutdown::Shutdown) {
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
        if cfg.compaction {
            let started = std::time::Instant::now();
            match store.compact(24).await {
                Ok(run) => {
                    caught_up &= run.caught_up;
                    if run.hours > 0 {
                        tracing::info!(
                            hours = run.hours,
                            samples = run.samples,
                            bytes = run.bytes,
                            watermark = ?run.watermark,
                            caught_up = run.caught_up,
                            ms = started.elapsed().as_millis() as u64,
                            "Compacted rolled-up hours."
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Compaction failed; retrying next round."),
            }
            match store.drop_compacted_days().await {
                Ok(days) if !days.is_empty() => tracing::info!(
                    dropped = ?days,
                    "Dropped the narrow partitions of compacted days."
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "Dropping compacted days' partitions failed; retrying next round.")
                }
            }
        }
    }
}
