//! The state file: transformer state carried over a planned restart.
//!
//! On graceful shutdown the service writes every sink's transformer state (predecessors of
//! `rate_of_change`/`delta`, samples held by `accumulator`/`aggregator`/`arithmetic`) and
//! the outputs it could not yet publish, atomically (temporary file, fsync, rename). At start
//! it reads the file, restores the sinks whose definition is unchanged, and deletes the file:
//! a later crash must not bring back state older than the stream it would be applied to.
//! A file older than `max_age` is ignored for the same reason (after a long stop, a rate
//! over the gap would be an average, not what the operator expects).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vmeter_core::Sample;

use crate::pipeline::SinkState;

/// Version of the file layout this build writes and reads.
pub const FORMAT: u32 = 1;

/// Contents of the state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    pub format: u32,
    pub saved_at: DateTime<Utc>,
    /// Per sink, in definition order.
    pub sinks: Vec<SinkState>,
    /// Outputs produced but not confirmed by the broker when the service stopped; their
    /// inputs were not acked, come back redelivered and are then recognised as duplicates,
    /// so these must be published first at the next start.
    pub pending: Vec<Sample>,
}

/// Why a state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a vmeter state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: format {found}, this build reads {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("{path}: saved {age_secs} s ago, older than the limit of {max_secs} s; ignored")]
    TooOld {
        path: PathBuf,
        age_secs: i64,
        max_secs: u64,
    },
}

/// Writes `saved` to `path` atomically (write a temporary file, fsync, rename, fsync dir).
pub fn save(path: &Path, saved: &Saved) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        let body = serde_json::to_vec(saved).expect("state serialises to JSON");
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads and removes the state file. `Ok(None)` when there is none. A file that is
/// unreadable, of another format or older than `max_age` is removed too and reported.
pub fn take(
    path: &Path,
    max_age: Duration,
    now: DateTime<Utc>,
) -> Result<Option<Saved>, StateError> {
    let body = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    // Whatever happens next, this file must not be applied twice.
    let _ = std::fs::remove_file(path);
    let saved: Saved = serde_json::from_slice(&body).map_err(|source| StateError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    if saved.format != FORMAT {
        return Err(StateError::Format {
            path: path.to_path_buf(),
            found: saved.format,
        });
    }
    let age = (now - saved.saved_at).num_seconds();
    if age > max_age.as_secs() as i64 {
        return Err(StateError::TooOld {
            path: path.to_path_buf(),
            age_secs: age,
            max_secs: max_age.as_secs(),
        });
    }
    Ok(Some(saved))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(at: DateTime<Utc>) -> Saved {
        Saved {
            format: FORMAT,
            saved_at: at,
            sinks: vec![SinkState {
                name: "cpu_sink".into(),
                fingerprint: "fp".into(),
                transformers: vec![serde_json::json!({"a": 1})],
            }],
            pending: Vec::new(),
        }
    }

    #[test]
    fn round_trip_then_gone() {
        let dir = std::env::temp_dir().join(format!("vmeter-state-{}", std::process::id()));
        let path = dir.join("sub/state.json");
        let now = Utc::now();
        save(&path, &saved(now)).unwrap();
        let back = take(&path, Duration::from_secs(60), now).unwrap().unwrap();
        assert_eq!(back, saved(now));
        assert!(
            take(&path, Duration::from_secs(60), now).unwrap().is_none(),
            "read once"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn too_old_and_garbage_are_refused_and_removed() {
        let dir = std::env::temp_dir().join(format!("vmeter-state2-{}", std::process::id()));
        let path = dir.join("state.json");
        let now = Utc::now();
        save(&path, &saved(now - chrono::Duration::seconds(3600))).unwrap();
        assert!(matches!(
            take(&path, Duration::from_secs(900), now),
            Err(StateError::TooOld { .. })
        ));
        assert!(!path.exists());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            take(&path, Duration::from_secs(900), now),
            Err(StateError::Parse { .. })
        ));
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
