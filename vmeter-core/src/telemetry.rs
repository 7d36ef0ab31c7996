//! Logging setup and the metrics of every service: counters, gauges and latency histograms
//! on `prometheus-client`, exposed in the OpenMetrics text format at `/metrics`.
//!
//! A metric is asked for by name and labels ([`counter`], [`gauge`], [`histogram`]) and kept
//! by its user as a cheap handle: the hot path is an atomic add, the registry's lock is taken
//! only when a handle is made.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use prometheus_client::metrics;
use prometheus_client::registry::Registry;

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

/// Label pairs of one series, in the order given.
type Labels = Vec<(String, String)>;

/// A histogram's bucket layout.
type NewHistogram = fn() -> metrics::histogram::Histogram;

enum Family {
    Counter(metrics::family::Family<Labels, metrics::counter::Counter>),
    Gauge(metrics::family::Family<Labels, metrics::gauge::Gauge>),
    Histogram(metrics::family::Family<Labels, metrics::histogram::Histogram, NewHistogram>),
    /// Metrics without labels are registered alone: a family would write `name{} 1`.
    PlainCounter(metrics::counter::Counter),
    PlainGauge(metrics::gauge::Gauge),
    PlainHistogram(metrics::histogram::Histogram),
}

/// Every metric of the process: prometheus-client's registry, and each family by name so
/// that a metric can be asked for by name and labels wherever it is counted.
struct Metrics {
    registry: Registry,
    families: HashMap<&'static str, Family>,
}

static METRICS: LazyLock<Mutex<Metrics>> = LazyLock::new(|| {
    Mutex::new(Metrics {
        registry: Registry::default(),
        families: HashMap::new(),
    })
});

/// Label pairs with their values escaped as the exposition format wants (`\\`, `\"`,
/// `\n`): the encoder writes values as they are.
fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            (k.to_string(), v)
        })
        .collect()
}

/// A monotonically increasing count (a cheap handle: keep it, counting is one atomic add).
#[derive(Clone, Debug)]
pub struct Counter(metrics::counter::Counter);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.0.inc();
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// A value that goes up and down.
#[derive(Clone, Debug)]
pub struct Gauge(metrics::gauge::Gauge);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.set(v);
    }

    /// Current value.
    pub fn get(&self) -> i64 {
        self.0.get()
    }
}

/// A distribution of observations in fixed buckets (a cheap handle, like [`Counter`]).
#[derive(Clone, Debug)]
pub struct Histogram(metrics::histogram::Histogram);

impl Histogram {
    /// Records one observation, in the histogram's unit (seconds for every vmeter histogram).
    pub fn observe(&self, v: f64) {
        self.0.observe(v);
    }

    /// Records the time since `start`, s.
    pub fn observe_since(&self, start: std::time::Instant) {
        self.0.observe(start.elapsed().as_secs_f64());
    }
}

/// Bucket layouts of vmeter's histograms, all in seconds.
#[derive(Clone, Copy, Debug)]
pub enum Buckets {
    /// Work that takes milliseconds to seconds (a batch, a libvirt call, an API request):
    /// 0.5 ms to ~33 s, doubling.
    Latency,
    /// How old a sample is when it is stored: 0.25 s to ~4.5 h, doubling.
    Age,
}

fn latency_buckets() -> metrics::histogram::Histogram {
    metrics::histogram::Histogram::new(metrics::histogram::exponential_buckets(0.0005, 2.0, 17))
}

fn age_buckets() -> metrics::histogram::Histogram {
    metrics::histogram::Histogram::new(metrics::histogram::exponential_buckets(0.25, 2.0, 17))
}

/// Registers `name` on first use. Counters are registered without their `_total` suffix,
/// which the OpenMetrics encoder adds back; help texts without their final period, which it
/// adds too.
fn family<'a>(
    m: &'a mut Metrics,
    name: &'static str,
    help: &'static str,
    new: impl FnOnce() -> Family,
) -> &'a Family {
    let Metrics { registry, families } = m;
    families.entry(name).or_insert_with(|| {
        let f = new();
        let help = help.strip_suffix('.').unwrap_or(help);
        let bare = name.strip_suffix("_total").unwrap_or(name);
        match &f {
            Family::Counter(c) => registry.register(bare, help, c.clone()),
            Family::PlainCounter(c) => registry.register(bare, help, c.clone()),
            Family::Gauge(g) => registry.register(name, help, g.clone()),
            Family::PlainGauge(g) => registry.register(name, help, g.clone()),
            Family::Histogram(h) => registry.register(name, help, h.clone()),
            Family::PlainHistogram(h) => registry.register(name, help, h.clone()),
        }
        f
    })
}

/// The counter `name{labels}` (`name` ends in `_total`), created on first use.
pub fn counter(name: &'static str, help: &'static str, pairs: &[(&str, &str)]) -> Counter {
    let mut m = METRICS.lock().expect("metrics registry poisoned");
    let plain = pairs.is_empty();
    match family(&mut m, name, help, || {
        if plain {
            Family::PlainCounter(Default::default())
        } else {
            Family::Counter(Default::default())
        }
    }) {
        Family::Counter(f) if !plain => Counter(f.get_or_create_owned(&labels(pairs))),
        Family::PlainCounter(c) if plain => Counter(c.clone()),
        _ => panic!("metric {name} asked for as another kind or with other labels"),
    }
}

/// The gauge `name{labels}`, created on first use.
pub fn gauge(name: &'static str, help: &'static str, pairs: &[(&str, &str)]) -> Gauge {
    let mut m = METRICS.lock().expect("metrics registry poisoned");
    let plain = pairs.is_empty();
    match family(&mut m, name, help, || {
        if plain {
            Family::PlainGauge(Default::default())
        } else {
            Family::Gauge(Default::default())
        }
    }) {
        Family::Gauge(f) if !plain => Gauge(f.get_or_create_owned(&labels(pairs))),
        Family::PlainGauge(g) if plain => Gauge(g.clone()),
        _ => panic!("metric {name} asked for as another kind or with other labels"),
    }
}

/// The histogram `name{labels}` (`name` ends in `_seconds`), created on first use with
/// `buckets` (a family keeps the layout it was created with).
pub fn histogram(
    name: &'static str,
    help: &'static str,
    pairs: &[(&str, &str)],
    buckets: Buckets,
) -> Histogram {
    let mut m = METRICS.lock().expect("metrics registry poisoned");
    let new: NewHistogram = match buckets {
        Buckets::Latency => latency_buckets,
        Buckets::Age => age_buckets,
    };
    let plain = pairs.is_empty();
    match family(&mut m, name, help, || {
        if plain {
            Family::PlainHistogram(new())
        } else {
            Family::Histogram(metrics::family::Family::new_with_constructor(new))
        }
    }) {
        Family::Histogram(f) if !plain => Histogram(f.get_or_create_owned(&labels(pairs))),
        Family::PlainHistogram(h) if plain => Histogram(h.clone()),
        _ => panic!("metric {name} asked for as another kind or with other labels"),
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

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// All metrics in the OpenMetrics text format (which Prometheus scrapes).
pub fn render() -> String {
    let m = METRICS.lock().expect("metrics registry poisoned");
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &m.registry)
        .expect("writing to a String cannot fail");
    out
}

/// Why a sample was dropped: the `reason` label of `vmeter_samples_dropped_total`. Every
/// place that drops a sample names one of these, so the metric is the complete account
/// of losses and its labels are a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The sample breaks a rule of the sample contract (every door).
    Contract(crate::contract::Rule),
    /// Agent: a libvirt call overran `libvirt.call_timeout_secs`; the rest of the cycle is lost.
    LibvirtTimeout,
    /// Agent: the spool was full; its oldest batch went.
    SpoolFull,
    /// Agent: a batch could not be written to the spool.
    SpoolWriteError,
    /// Agent: a spooled batch could not be read back.
    SpoolUnreadable,
    /// Notification: outputs not published when shutdown came.
    UnpublishedAtShutdown,
    /// Notification: the `file://` publisher could not write.
    FilePublisherError,
    /// Notification: a sample no pipeline source selects.
    NotSelected,
    /// Notification: a volume a transformer cannot use.
    InvalidVolume,
    /// Notification: the first sample of a series (a rate needs two).
    NoPredecessor,
    /// Notification: older than its series' last sample.
    OutOfOrder,
    /// Notification: a redelivery of a sample already transformed.
    Duplicate,
    /// Notification: a cumulative counter went down (`delta`).
    NegativeDelta,
    /// Notification: a `scale` expression failed.
    ScaleError,
    /// Notification: an arithmetic expression failed or gave a non-finite value.
    ExprError,
    /// Collector: PostgreSQL refused the sample, with its SQLSTATE if it gave one.
    RejectedByDatabase(Option<[u8; 5]>),
}

impl DropReason {
    /// The metric label (and dead-letter reason header).
    pub fn label(&self) -> std::borrow::Cow<'static, str> {
        use std::borrow::Cow;
        Cow::Borrowed(match self {
            DropReason::Contract(rule) => rule.label(),
            DropReason::LibvirtTimeout => "libvirt_timeout",
            DropReason::SpoolFull => "spool_full",
            DropReason::SpoolWriteError => "spool_write_error",
            DropReason::SpoolUnreadable => "spool_unreadable",
            DropReason::UnpublishedAtShutdown => "unpublished_at_shutdown",
            DropReason::FilePublisherError => "file_publisher_error",
            DropReason::NotSelected => "not_selected",
            DropReason::InvalidVolume => "invalid_volume",
            DropReason::NoPredecessor => "no_predecessor",
            DropReason::OutOfOrder => "out_of_order",
            DropReason::Duplicate => "duplicate",
            DropReason::NegativeDelta => "negative_delta",
            DropReason::ScaleError => "scale_error",
            DropReason::ExprError => "expr_error",
            DropReason::RejectedByDatabase(None) => "rejected_by_database",
            DropReason::RejectedByDatabase(Some(code)) => {
                return Cow::Owned(format!(
                    "rejected_by_database:{}",
                    String::from_utf8_lossy(code)
                ));
            }
        })
    }

    /// Drops that are part of normal operation (the first sample of a series, a
    /// redelivery, a counter reset, a sample no pipeline wants): logged at debug level;
    /// every other reason is a warning.
    pub fn is_expected(&self) -> bool {
        matches!(
            self,
            DropReason::NoPredecessor
                | DropReason::Duplicate
                | DropReason::NegativeDelta
                | DropReason::NotSelected
        )
    }

    /// [`RejectedByDatabase`](Self::RejectedByDatabase) from a SQLSTATE as PostgreSQL gives
    /// it (five characters; anything else is kept as unknown).
    pub fn rejected_by_database(sqlstate: Option<&str>) -> DropReason {
        DropReason::RejectedByDatabase(
            sqlstate.and_then(|c| <[u8; 5]>::try_from(c.as_bytes()).ok()),
        )
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

/// Counts a dropped sample with its reason and logs it.
pub fn sample_dropped(service: &str, reason: DropReason, detail: &str) {
    dropped(service, reason).inc();
    tracing::warn!(service, reason = %reason, detail, "Sample dropped.");
}

/// The `vmeter_samples_dropped_total{service,reason}` counter, for callers that count
/// several samples at once and log once.
pub fn dropped(service: &str, reason: DropReason) -> Counter {
    counter(
        "vmeter_samples_dropped_total",
        "Samples dropped, by service and reason.",
        &[("service", service), ("reason", &reason.label())],
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

    #[test]
    fn histograms_render_buckets_sum_and_count() {
        let h = histogram(
            "vmeter_test_call_seconds",
            "Calls.",
            &[("call", "x")],
            Buckets::Latency,
        );
        h.observe(0.003);
        h.observe(20.0);
        let text = render();
        assert!(
            text.contains("# TYPE vmeter_test_call_seconds histogram"),
            "{text}"
        );
        assert_eq!(
            scrape(&text, "vmeter_test_call_seconds_count{call=\"x\"}"),
            2.0
        );
        assert_eq!(
            scrape(&text, "vmeter_test_call_seconds_sum{call=\"x\"}"),
            20.003
        );
        // 0.5 ms doubling: 4 ms is the first bucket to hold 3 ms; 20 s only +Inf's and
        // 32.768 s's.
        assert_eq!(
            scrape(
                &text,
                "vmeter_test_call_seconds_bucket{le=\"0.004\",call=\"x\"}"
            ) + scrape(
                &text,
                "vmeter_test_call_seconds_bucket{call=\"x\",le=\"0.004\"}"
            ),
            1.0,
            "{text}"
        );
        let plain = histogram("vmeter_test_plain_seconds", "Plain.", &[], Buckets::Age);
        plain.observe(1.0);
        assert_eq!(scrape(&render(), "vmeter_test_plain_seconds_count "), 1.0);
    }
}
