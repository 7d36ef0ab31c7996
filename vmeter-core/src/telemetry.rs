//! Logging setup and a minimal Prometheus counter/gauge registry.
//!
//! Metrics are created once by name + labels and cached by their users as cheap handles, so
//! the hot path is one atomic add. `render()` produces the Prometheus text format.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use serde::{Deserialize, Serialize};

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// `log:` section of every service config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `info,notification=debug`; `RUST_LOG` wins if set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Installs the global tracing subscriber (stderr). Safe to call once per process.
pub fn init_logging(cfg: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

type Key = (&'static str, String);

struct Entry {
    help: &'static str,
    kind: &'static str,
    value: Value,
}

enum Value {
    Counter(Arc<AtomicU64>),
    Gauge(Arc<AtomicI64>),
}

static REGISTRY: LazyLock<Mutex<BTreeMap<Key, Entry>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

fn label_string(labels: &[(&str, &str)]) -> String {
    labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A monotonically increasing count.
#[derive(Clone, Debug)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Clone, Debug)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The counter `name{labels}`, created on first use.
pub fn counter(name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Counter {
    let mut reg = REGISTRY.lock().expect("metrics registry poisoned");
    let e = reg
        .entry((name, label_string(labels)))
        .or_insert_with(|| Entry {
            help,
            kind: "counter",
            value: Value::Counter(Arc::default()),
        });
    match &e.value {
        Value::Counter(c) => Counter(c.clone()),
        Value::Gauge(_) => panic!("metric {name} registered as gauge and counter"),
    }
}

/// The gauge `name{labels}`, created on first use.
pub fn gauge(name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Gauge {
    let mut reg = REGISTRY.lock().expect("metrics registry poisoned");
    let e = reg
        .entry((name, label_string(labels)))
        .or_insert_with(|| Entry {
            help,
            kind: "gauge",
            value: Value::Gauge(Arc::default()),
        });
    match &e.value {
        Value::Gauge(g) => Gauge(g.clone()),
        Value::Counter(_) => panic!("metric {name} registered as counter and gauge"),
    }
}

/// The sum of the values of the series in `text` (the exposition format, as [`render`]
/// writes it) whose line starts with `prefix`: a name, or a name and the start of its
/// labels. 0 when there is none. For the tests and benches that read `/metrics`.
pub fn scrape(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// All metrics in the Prometheus text exposition format.
pub fn render() -> String {
    let reg = REGISTRY.lock().expect("metrics registry poisoned");
    let mut out = String::new();
    let mut last = "";
    for ((name, labels), e) in reg.iter() {
        if *name != last {
            out.push_str(&format!(
                "# HELP {name} {}\n# TYPE {name} {}\n",
                e.help, e.kind
            ));
            last = name;
        }
        let v = match &e.value {
            Value::Counter(c) => c.load(Ordering::Relaxed).to_string(),
            Value::Gauge(g) => g.load(Ordering::Relaxed).to_string(),
        };
        if labels.is_empty() {
            out.push_str(&format!("{name} {v}\n"));
        } else {
            out.push_str(&format!("{name}{{{labels}}} {v}\n"));
        }
    }
    out
}

/// Counts a dropped sample with its reason and logs it. Every place that drops a sample calls
/// this, so `vmeter_samples_dropped_total` is the complete account of losses.
pub fn sample_dropped(service: &str, reason: &str, detail: &str) {
    dropped(service, reason).inc();
    tracing::warn!(service, reason, detail, "Sample dropped.");
}

/// The `vmeter_samples_dropped_total{service,reason}` counter, for callers that count
/// several samples at once and log once.
pub fn dropped(service: &str, reason: &str) -> Counter {
    counter(
        "vmeter_samples_dropped_total",
        "Samples dropped, by service and reason.",
        &[("service", service), ("reason", reason)],
    )
}

/// Counts a message sent to the dead-letter queue with its reason.
pub fn dead_lettered(service: &str, reason: &str) {
    counter(
        "vmeter_dead_lettered_total",
        "Messages dead-lettered, by service and reason.",
        &[("service", service), ("reason", reason)],
    )
    .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_sums_the_series_a_prefix_selects() {
        let text = "# HELP a_total x\n# TYPE a_total counter\na_total{path=\"x\"} 2\na_total{path=\"y\"} 3\nb 7\n";
        assert_eq!(scrape(text, "a_total"), 5.0);
        assert_eq!(scrape(text, "a_total{path=\"y\"}"), 3.0);
        assert_eq!(scrape(text, "c"), 0.0);
    }

    #[test]
    fn counters_render_with_labels() {
        let c = counter("vmeter_test_total", "Test.", &[("reason", "a\"b")]);
        c.add(3);
        counter("vmeter_test_total", "Test.", &[("reason", "a\"b")]).inc();
        let g = gauge("vmeter_test_depth", "Depth.", &[]);
        g.set(-2);
        let text = render();
        assert!(
            text.contains("vmeter_test_total{reason=\"a\\\"b\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE vmeter_test_depth gauge\nvmeter_test_depth -2"),
            "{text}"
        );
    }
}
