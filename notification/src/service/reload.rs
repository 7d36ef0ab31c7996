//! State across restarts (restored at start) and hot reload of `pipeline.yaml` (SIGHUP, content checks).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use vmeter_core::Sample;
use vmeter_core::shutdown::Shutdown;
use vmeter_core::telemetry;

use super::config::{Config, PipelineConfig};
use crate::definition::{self, PipelineDef};
use crate::pipeline::Runtime;
use crate::state;

/// Restores the state file (if any) into `rt` and `pending`, logging what happened.
pub(super) fn restore_state(
    path: &std::path::Path,
    cfg: &Config,
    rt: &mut Runtime,
    pending: &mut Vec<Sample>,
) {
    let max_age = Duration::from_secs(cfg.pipeline.state_max_age_secs);
    let outcome = |result: &str| {
        telemetry::counter(
            "vmeter_notification_state_loads_total",
            "State file reads at start-up, by result (restored, fresh: none saved, unusable).",
            &[("result", result)],
        )
        .inc();
    };
    match state::take(path, max_age, Utc::now()) {
        Ok(Some(saved)) => {
            let age = (Utc::now() - saved.saved_at).num_seconds();
            let (restored, skipped) = rt.restore(saved.sinks);
            for (sink, why) in &skipped {
                tracing::warn!(sink = %sink, reason = %why, "Saved state not restored for this sink.");
            }
            *pending = saved.pending;
            tracing::info!(
                path = %path.display(),
                age_s = age,
                restored = ?restored,
                unpublished = pending.len(),
                "Transformer state restored."
            );
            outcome("restored");
        }
        Ok(None) => {
            tracing::info!(path = %path.display(), "No saved state; starting fresh.");
            outcome("fresh");
        }
        Err(e) => {
            tracing::warn!(error = %e, "Saved state not used; starting fresh.");
            outcome("unusable");
        }
    }
}

/// Watches the pipeline file (SIGHUP, and a content check every `reload_check_secs`).
/// Sends every new definition that validates; a file that does not is refused with all
/// its errors logged, and the running pipeline stays.
pub(super) fn spawn_reload_watcher(
    cfg: &PipelineConfig,
    initial: Arc<PipelineDef>,
    mut shutdown: Shutdown,
) -> tokio::sync::watch::Receiver<Arc<PipelineDef>> {
    let (tx, rx) = tokio::sync::watch::channel(initial);
    let path = cfg.file.clone();
    let every = (cfg.reload_check_secs > 0).then(|| Duration::from_secs(cfg.reload_check_secs));
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "No SIGHUP handler; pipeline reload by file change only.");
                return;
            }
        };
        let mut seen = std::fs::read(&path).ok();
        let mut tick = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let forced = tokio::select! {
                _ = vmeter_core::shutdown::wait(&mut shutdown) => return,
                _ = hup.recv() => true,
                _ = tick.tick(), if every.is_some() => false,
            };
            let text = match std::fs::read(&path) {
                Ok(t) => t,
                Err(e) => {
                    if forced {
                        tracing::error!(path = %path.display(), error = %e, "Pipeline reload refused: cannot read the file; the running pipeline stays.");
                    }
                    continue;
                }
            };
            if !forced && seen.as_ref() == Some(&text) {
                continue;
            }
            seen = Some(text.clone());
            let result =
                definition::parse(&String::from_utf8_lossy(&text), &path.display().to_string());
            match result {
                Ok(def) => {
                    for w in &def.warnings {
                        tracing::warn!("{}: {w}", path.display());
                    }
                    telemetry::counter(
                        "vmeter_notification_reloads_total",
                        "Pipeline reloads, by result.",
                        &[("result", "accepted")],
                    )
                    .inc();
                    let _ = tx.send(Arc::new(def));
                }
                Err(errors) => {
                    telemetry::counter(
                        "vmeter_notification_reloads_total",
                        "Pipeline reloads, by result.",
                        &[("result", "refused")],
                    )
                    .inc();
                    for e in &errors.errors {
                        tracing::error!(file = %path.display(), line = e.line, "{}", e.message);
                    }
                    tracing::error!(path = %path.display(), errors = errors.errors.len(), "Pipeline reload refused; the running pipeline stays.");
                }
            }
        }
    });
    rx
}

/// Swaps in a new definition between two messages.
pub(super) fn apply_reload(rt: &mut Runtime, def: Arc<PipelineDef>) {
    if *def == **rt.def() {
        tracing::info!("Pipeline file re-read; no change.");
        return;
    }
    let kept = rt.reload(def.clone());
    telemetry::counter(
        "vmeter_notification_reloads_applied_total",
        "Pipeline definitions swapped in (a changed file that validated).",
        &[],
    )
    .inc();
    let fresh: Vec<&str> = def
        .sinks
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| !kept.iter().any(|k| k == n))
        .collect();
    tracing::info!(
        pipelines = def.pipelines.len(),
        kept_state = ?kept,
        fresh_state = ?fresh,
        "Pipeline reloaded."
    );
}
