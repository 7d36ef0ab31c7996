//! Polling sources: which meters are polled how often.
//!
//! Ceilometer's `polling.yaml` shape, read from `polling.sources_file`:
//!
//! ```yaml
//! sources:
//!   - name: cpu_fast
//!     interval: 10          # seconds
//!     meters: [cpu, cpu_util]
//!   - name: everything_else
//!     interval: 300
//!     meters: ["*", "!cpu"]
//! ```
//!
//! Meter selection follows pipeline.yaml's rules ([`vmeter_core::meters::MeterFilter`]).
//! `resources` and `discovery` (Ceilometer keys for other pollsters) are accepted and
//! ignored with a warning. Without a file there is one source, `all`, of every meter every
//! `polling.interval_secs`.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use vmeter_core::meters::MeterFilter;

/// A validated source.
#[derive(Debug, Clone)]
pub struct PollingSource {
    pub name: String,
    pub interval: Duration,
    pub filter: MeterFilter,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    sources: Vec<RawSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    interval: f64,
    meters: Vec<String>,
    #[serde(default)]
    resources: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    discovery: Option<serde_yaml_ng::Value>,
}

/// The single default source.
pub fn every_meter(interval_secs: f64) -> Vec<PollingSource> {
    vec![PollingSource {
        name: "all".into(),
        interval: Duration::from_secs_f64(interval_secs),
        filter: MeterFilter::new(&["*".to_string()]).expect("valid"),
    }]
}

/// Loads and validates a polling.yaml; errors name the file, the line where known and the
/// source. Returns the sources and warnings.
pub fn load(path: &Path) -> Result<(Vec<PollingSource>, Vec<String>), String> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
    parse(&text, &file)
}

/// [`load`] on text.
pub fn parse(text: &str, file: &str) -> Result<(Vec<PollingSource>, Vec<String>), String> {
    let raw: RawFile = serde_yaml_ng::from_str(text).map_err(|e| match e.location() {
        Some(l) => format!("{file}:{}: {e}", l.line()),
        None => format!("{file}: {e}"),
    })?;
    let line_of = |name: &str| {
        text.lines()
            .position(|l| {
                l.trim_start()
                    .trim_start_matches("- ")
                    .trim()
                    .strip_prefix("name:")
                    .is_some_and(|v| v.trim().trim_matches(|c| c == '"' || c == '\'') == name)
            })
            .map_or(String::new(), |i| format!(":{}", i + 1))
    };
    if raw.sources.is_empty() {
        return Err(format!("{file}: no sources"));
    }
    let mut out: Vec<PollingSource> = Vec::new();
    let mut warnings = Vec::new();
    for s in raw.sources {
        let at = line_of(&s.name);
        if out.iter().any(|o| o.name == s.name) {
            return Err(format!("{file}{at}: duplicated source name {}", s.name));
        }
        if !s.interval.is_finite() || s.interval <= 0.0 {
            return Err(format!(
                "{file}{at}: source {}: interval must be > 0 seconds, got {}",
                s.name, s.interval
            ));
        }
        let filter = MeterFilter::new(&s.meters)
            .map_err(|e| format!("{file}{at}: source {}: {e}", s.name))?;
        if s.resources.is_some() || s.discovery.is_some() {
            warnings.push(format!(
                "{file}{at}: source {}: resources/discovery are ignored (the agent polls the local hypervisor)",
                s.name
            ));
        }
        out.push(PollingSource {
            name: s.name,
            interval: Duration::from_secs_f64(s.interval),
            filter,
        });
    }
    Ok((out, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ceilometer_shape() {
        let (s, w) = parse(
            "---\nsources:\n  - name: fast\n    interval: 10\n    meters: [cpu]\n  - name: rest\n    interval: 300\n    meters: ['*', '!cpu']\n    discovery: [local_instances]\n",
            "polling.yaml",
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].interval, Duration::from_secs(10));
        assert!(s[0].filter.matches("cpu") && !s[0].filter.matches("memory"));
        assert!(!s[1].filter.matches("cpu") && s[1].filter.matches("disk.device.read.bytes"));
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn errors_name_file_line_and_source() {
        let e = parse(
            "sources:\n  - name: a\n    interval: 10\n    meters: [cpu]\n  - name: b\n    interval: 0\n    meters: [cpu]\n",
            "p.yaml",
        )
        .unwrap_err();
        assert_eq!(e, "p.yaml:5: source b: interval must be > 0 seconds, got 0");
        let e = parse(
            "sources:\n  - name: a\n    interval: 10\n    meters: [cpu, '!x']\n",
            "p.yaml",
        )
        .unwrap_err();
        assert!(e.starts_with("p.yaml:2: source a: Both included"), "{e}");
        let e = parse("sources:\n  - name: a\n    intervall: 10\n", "p.yaml").unwrap_err();
        assert!(e.starts_with("p.yaml:3:") && e.contains("intervall"), "{e}");
    }
}
