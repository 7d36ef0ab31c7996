//! `pipeline.yaml`: parsing and validation into a [`PipelineDef`].
//!
//! Format and rules: Ceilometer 11's decoupled sources/sinks (docs/pipeline.md). A file either
//! loads completely or not at all; every problem found is reported, each naming the file, the
//! line where it can be located, and the source/sink concerned.

use std::path::Path;

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::meters::MeterFilter;
use crate::transformers::TransformerSpec;

/// One load problem, for an operator's terminal.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadError {
    /// 1-based line in the file, when it could be located.
    pub line: Option<usize>,
    /// What is wrong, naming the source/sink/key concerned.
    pub message: String,
}

/// All problems of a file that did not load.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.render())]
pub struct LoadErrors {
    /// The file (or `<input>`).
    pub file: String,
    pub errors: Vec<LoadError>,
}

impl LoadErrors {
    fn render(&self) -> String {
        self.errors
            .iter()
            .map(|e| match e.line {
                Some(l) => format!("{}:{}: {}", self.file, l, e.message),
                None => format!("{}: {}", self.file, e.message),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A publisher URL of a sink.
#[derive(Debug, Clone, PartialEq)]
pub enum PublisherUrl {
    /// `notifier://`: the processed queue, i.e. storage through the collector.
    Notifier,
    /// `log://`: one log line per sample.
    Log,
    /// `file:///path`: JSON lines appended to a file.
    File(std::path::PathBuf),
    /// `test://`: Ceilometer's in-memory test publisher; vmeter discards (replay prints it).
    Test,
}

impl PublisherUrl {
    /// Parses a publisher string; `notifier` without `://` gets it appended (as Ceilometer).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = if s.contains("://") {
            s.to_string()
        } else {
            format!("{s}://")
        };
        let (scheme, rest) = s.split_once("://").expect("contains ://");
        let rest = rest.split('?').next().unwrap_or("");
        match scheme {
            "notifier" => Ok(PublisherUrl::Notifier),
            "log" => Ok(PublisherUrl::Log),
            "test" => Ok(PublisherUrl::Test),
            "file" if !rest.is_empty() => Ok(PublisherUrl::File(rest.into())),
            "file" => Err(
                "file:// publisher needs a path, e.g. file:///var/log/vmeter/samples.jsonl".into(),
            ),
            other => Err(format!(
                "unknown publisher scheme {other:?} (supported: notifier://, file://PATH, log://, test://)"
            )),
        }
    }

    /// The URL as written back in outputs.
    pub fn url(&self) -> String {
        match self {
            PublisherUrl::Notifier => "notifier://".into(),
            PublisherUrl::Log => "log://".into(),
            PublisherUrl::Test => "test://".into(),
            PublisherUrl::File(p) => format!("file://{}", p.display()),
        }
    }
}

/// A validated source.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceDef {
    pub name: String,
    pub filter: MeterFilter,
    /// Indices into [`PipelineDef::sinks`].
    pub sinks: Vec<usize>,
}

/// A validated sink.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkDef {
    pub name: String,
    pub transformers: Vec<TransformerSpec>,
    pub publishers: Vec<PublisherUrl>,
    /// The sink's `transformers:` as written (canonical JSON of the parsed YAML): two sinks
    /// with the same name and fingerprint have interchangeable transformer state (hot
    /// reload keeps it, a saved state file restores it).
    pub fingerprint: String,
}

/// A pipeline: one (source, sink) pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineRef {
    /// `source:sink`, or `source` when both names are equal.
    pub name: String,
    pub source: usize,
    pub sink: usize,
}

/// A fully validated pipeline.yaml.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineDef {
    pub sources: Vec<SourceDef>,
    pub sinks: Vec<SinkDef>,
    /// In Ceilometer's order: source order, then the source's sink-list order.
    pub pipelines: Vec<PipelineRef>,
    /// Non-fatal remarks (ignored legacy keys, policies that fell back to defaults).
    pub warnings: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    sources: Option<Vec<RawSource>>,
    sinks: Option<Vec<RawSink>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Option<String>,
    meters: Option<Vec<String>>,
    sinks: Option<Vec<String>>,
    /// Polling keys of Ceilometer ≤ 7 pipeline files; they belong to polling.yaml now.
    interval: Option<Value>,
    resources: Option<Value>,
    discovery: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    name: Option<String>,
    transformers: Option<Vec<RawTransformer>>,
    publishers: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransformer {
    name: String,
    parameters: Option<Value>,
}

/// Loads and validates a file.
pub fn load_file(path: &Path) -> Result<PipelineDef, LoadErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &file),
        Err(e) => Err(LoadErrors {
            file,
            errors: vec![LoadError {
                line: None,
                message: format!("cannot read: {e}"),
            }],
        }),
    }
}

/// Validates pipeline.yaml text; `file` is used in error messages.
pub fn parse(text: &str, file: &str) -> Result<PipelineDef, LoadErrors> {
    let fail = |errors: Vec<LoadError>| LoadErrors {
        file: file.to_string(),
        errors,
    };
    let raw: RawFile = serde_yaml_ng::from_str(text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        fail(vec![LoadError {
            line,
            message: strip_location(&e.to_string()),
        }])
    })?;
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let (Some(raw_sources), Some(raw_sinks)) = (raw.sources, raw.sinks) else {
        return Err(fail(vec![LoadError {
            line: None,
            message: "Both sources & sinks are required".into(),
        }]));
    };

    let mut sinks = Vec::new();
    for (i, rs) in raw_sinks.into_iter().enumerate() {
        let Some(name) = rs.name.clone() else {
            errors.push(LoadError {
                line: None,
                message: format!("sinks[{i}]: Required field name not specified"),
            });
            continue;
        };
        let line = find_name_line(text, &name);
        let at = |message: String| LoadError { line, message };
        if sinks.iter().any(|s: &SinkDef| s.name == name) {
            errors.push(at(format!("Duplicated sink names: {name}")));
            continue;
        }
        let raw_transformers = rs.transformers.unwrap_or_default();
        let fingerprint = serde_yaml_ng::to_string(
            &raw_transformers
                .iter()
                .map(|t| (&t.name, &t.parameters))
                .collect::<Vec<_>>(),
        )
        .unwrap_or_default();
        let mut transformers = Vec::new();
        for (ti, t) in raw_transformers.into_iter().enumerate() {
            match TransformerSpec::from_config(
                &t.name,
                t.parameters.unwrap_or(Value::Null),
                &mut warnings,
            ) {
                Ok(spec) => transformers.push(spec),
                Err(msg) => {
                    let line = find_line_after(text, &t.name, line).or(line);
                    errors.push(LoadError {
                        line,
                        message: format!("sink {name}: transformer {ti} ({}): {msg}", t.name),
                    });
                }
            }
        }
        let mut publishers = Vec::new();
        match rs.publishers {
            Some(p) if !p.is_empty() => {
                for url in p {
                    match PublisherUrl::parse(&url) {
                        Ok(u) => publishers.push(u),
                        Err(msg) => errors.push(LoadError {
                            line: find_line_after(text, &url, line).or(line),
                            message: format!("sink {name}: {msg}"),
                        }),
                    }
                }
            }
            _ => errors.push(at(format!("sink {name}: No publisher specified"))),
        }
        sinks.push(SinkDef {
            name,
            transformers,
            publishers,
            fingerprint,
        });
    }

    let mut sources: Vec<SourceDef> = Vec::new();
    for (i, rsrc) in raw_sources.into_iter().enumerate() {
        let Some(name) = rsrc.name.clone() else {
            errors.push(LoadError {
                line: None,
                message: format!("sources[{i}]: Required field name not specified"),
            });
            continue;
        };
        let line = find_name_line(text, &name);
        let at = |message: String| LoadError { line, message };
        if sources.iter().any(|s| s.name == name) {
            errors.push(at(format!("Duplicated source names: {name}")));
            continue;
        }
        if rsrc.interval.is_some() || rsrc.resources.is_some() || rsrc.discovery.is_some() {
            warnings.push(format!("source {name}: interval/resources/discovery are polling settings (polling.yaml); ignored here"));
        }
        let filter = match &rsrc.meters {
            None => {
                errors.push(at(format!("source {name}: Missing meters value")));
                None
            }
            Some(m) => match MeterFilter::new(m) {
                Ok(f) => Some(f),
                Err(msg) => {
                    errors.push(at(format!("source {name}: {msg}")));
                    None
                }
            },
        };
        let mut sink_idx = Vec::new();
        match &rsrc.sinks {
            None => errors.push(at(format!(
                "source {name}: Required field sinks not specified"
            ))),
            Some(s) if s.is_empty() => errors.push(at(format!("No sink defined in source {name}"))),
            Some(s) => {
                for sink in s {
                    match sinks.iter().position(|d| &d.name == sink) {
                        Some(idx) => sink_idx.push(idx),
                        None => errors.push(at(format!("Dangling sink {sink} from source {name}"))),
                    }
                }
            }
        }
        if let Some(filter) = filter {
            sources.push(SourceDef {
                name,
                filter,
                sinks: sink_idx,
            });
        }
    }

    let mut pipelines: Vec<PipelineRef> = Vec::new();
    for (si, src) in sources.iter().enumerate() {
        for &k in &src.sinks {
            let sink = &sinks[k].name;
            let name = if &src.name == sink {
                src.name.clone()
            } else {
                format!("{}:{}", src.name, sink)
            };
            if pipelines.iter().any(|p| p.name == name) {
                errors.push(LoadError {
                    line: find_name_line(text, &src.name),
                    message: format!("Duplicate pipeline name: {name}"),
                });
                continue;
            }
            pipelines.push(PipelineRef {
                name,
                source: si,
                sink: k,
            });
        }
    }

    if !errors.is_empty() {
        return Err(fail(errors));
    }
    Ok(PipelineDef {
        sources,
        sinks,
        pipelines,
        warnings,
    })
}

fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Line of `name: <name>` (a list item's name key), 1-based.
fn find_name_line(text: &str, name: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let t = l.trim_start().trim_start_matches("- ").trim();
            t.strip_prefix("name:")
                .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'') == name)
                .unwrap_or(false)
        })
        .map(|i| i + 1)
}

/// First line at or after `after` that contains `needle`.
fn find_line_after(text: &str, needle: &str, after: Option<usize>) -> Option<usize> {
    let start = after.unwrap_or(1).saturating_sub(1);
    text.lines()
        .enumerate()
        .skip(start)
        .find(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = include_str!("../../pipeline.yaml");

    #[test]
    fn default_pipeline_loads_with_five_pipelines() {
        let d = parse(DEFAULT, "pipeline.yaml").unwrap();
        let names: Vec<_> = d.pipelines.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "meter_source:meter_sink",
                "cpu_source:cpu_sink",
                "cpu_source:cpu_delta_sink",
                "disk_source:disk_sink",
                "network_source:network_sink"
            ]
        );
    }

    fn errs(text: &str) -> String {
        parse(text, "p.yaml").unwrap_err().to_string()
    }

    #[test]
    fn reports_every_problem_with_file_line_and_name() {
        let text = "\
sources:
  - name: a
    meters: [cpu, '!x']
    sinks: [s1]
  - name: b
    meters: [cpu]
    sinks: [nope]
sinks:
  - name: s1
    transformers:
      - name: rate_of_change
        parameters:
          target: {scal: 2}
    publishers: [notifier://]
";
        let e = errs(text);
        assert!(
            e.contains("p.yaml:2: source a: Both included and excluded meters specified"),
            "{e}"
        );
        assert!(
            e.contains("p.yaml:5: Dangling sink nope from source b"),
            "{e}"
        );
        assert!(
            e.contains("sink s1: transformer 0 (rate_of_change)") && e.contains("scal"),
            "{e}"
        );
    }

    #[test]
    fn syntax_and_type_errors_have_lines() {
        let e = errs("sources:\n  - name: a\n    meters: [cpu\nsinks: []\n");
        assert!(e.starts_with("p.yaml:"), "{e}");
        let e = errs("sources: []\nsinks: []\nextra: 1\n");
        assert!(e.contains("p.yaml:3:") && e.contains("extra"), "{e}");
    }

    #[test]
    fn structural_rules() {
        assert!(errs("sources: []\n").contains("Both sources & sinks are required"));
        let base = |src: &str, sink: &str| format!("sources:\n{src}sinks:\n{sink}");
        let sink = "  - name: s\n    publishers: [log]\n";
        assert!(
            errs(&base("  - name: a\n    meters: [x]\n    sinks: []\n", sink))
                .contains("No sink defined in source a")
        );
        assert!(
            errs(&base("  - name: a\n    meters: [x]\n", sink))
                .contains("Required field sinks not specified")
        );
        assert!(
            errs(&base("  - name: a\n    sinks: [s]\n", sink)).contains("Missing meters value")
        );
        assert!(
            errs(&base(
                "  - name: a\n    meters: [x]\n    sinks: [s]\n",
                "  - name: s\n"
            ))
            .contains("No publisher specified")
        );
        assert!(
            errs(&base(
                "  - name: a\n    meters: [x]\n    sinks: [s]\n",
                "  - name: s\n    publishers: [kafka://x]\n"
            ))
            .contains("unknown publisher scheme")
        );
        assert!(errs(&base("  - name: a\n    meters: [x]\n    sinks: [s]\n  - name: a\n    meters: [y]\n    sinks: [s]\n", sink)).contains("Duplicated source names: a"));
        assert!(
            errs(&base(
                "  - name: a\n    meters: [x]\n    sinks: [s]\n",
                "  - name: s\n    publishers: [log]\n    transformers: [{name: magic}]\n"
            ))
            .contains("No transformer named magic")
        );
        let ok = parse(
            &base("  - name: s\n    meters: ['*']\n    sinks: [s]\n", sink),
            "p",
        )
        .unwrap();
        assert_eq!(ok.pipelines[0].name, "s");
    }

    #[test]
    fn publisher_urls() {
        assert_eq!(
            PublisherUrl::parse("notifier").unwrap(),
            PublisherUrl::Notifier
        );
        assert_eq!(
            PublisherUrl::parse("notifier://?per_meter_topic=1").unwrap(),
            PublisherUrl::Notifier
        );
        assert_eq!(
            PublisherUrl::parse("file:///tmp/x.jsonl").unwrap(),
            PublisherUrl::File("/tmp/x.jsonl".into())
        );
        assert!(PublisherUrl::parse("file://").is_err());
    }
}
