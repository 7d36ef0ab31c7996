//! Running a [`PipelineDef`]: publish contexts, transformer chains, flushes.
//!
//! One consumed message is one publish context: for each pipeline in order, the samples its
//! source selects go through its sink's transformer chain; survivors are emitted for the
//! sink's publishers; then every pipeline is flushed (transformer i's flush output continues
//! through transformers i+1..n). Pipelines that share a sink share its transformer instances.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use vmeter_core::Sample;

use crate::definition::PipelineDef;
use crate::transformers::{Cx, DropReason, Dropped, Transformer};

/// Samples a pipeline publishes at once (one `publish_samples` call per publisher).
#[derive(Debug)]
pub struct Emission {
    /// Index into [`PipelineDef::pipelines`].
    pub pipeline: usize,
    pub samples: Vec<Sample>,
}

/// One sink's transformer state as saved on shutdown.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SinkState {
    pub name: String,
    /// [`SinkDef::fingerprint`](crate::definition::SinkDef) at save time.
    pub fingerprint: String,
    /// One entry per transformer, in chain order.
    pub transformers: Vec<serde_json::Value>,
}

/// The live pipelines with their transformer state.
pub struct Runtime {
    def: Arc<PipelineDef>,
    /// Per sink: its transformer chain.
    chains: Vec<Vec<Box<dyn Transformer>>>,
    /// Drops recorded since the last [`take_drops`](Self::take_drops).
    drops: Vec<Dropped>,
    /// Meter name → index into `route_table`.
    routes: crate::transformers::FastMap<String, u32>,
    /// Per route: for each pipeline, whether its source selects the meter.
    route_table: Vec<Box<[bool]>>,
    /// Newest sample timestamp seen: the stream's own clock, which eviction measures
    /// quietness against (a backlog replayed after an outage is not "quiet").
    newest: Option<DateTime<Utc>>,
}

/// Distinct meter names whose routes are cached before the cache is reset.
const MAX_ROUTES: usize = 4096;

impl Runtime {
    /// Fresh state for `def`.
    pub fn new(def: Arc<PipelineDef>) -> Self {
        let chains = def
            .sinks
            .iter()
            .map(|s| s.transformers.iter().map(|t| t.build()).collect())
            .collect();
        Runtime {
            def,
            chains,
            drops: Vec::new(),
            routes: Default::default(),
            route_table: Vec::new(),
            newest: None,
        }
    }

    /// Replaces the definition (hot reload). Sinks whose name and transformer definition
    /// ([`SinkDef::fingerprint`](crate::definition::SinkDef)) are unchanged keep their
    /// transformer instances and state; other sinks start fresh. Returns the names of the
    /// sinks that kept their state.
    pub fn reload(&mut self, def: Arc<PipelineDef>) -> Vec<String> {
        let mut old: Vec<Option<Vec<Box<dyn Transformer>>>> = std::mem::take(&mut self.chains)
            .into_iter()
            .map(Some)
            .collect();
        let mut kept = Vec::new();
        let chains = def
            .sinks
            .iter()
            .map(|s| {
                let same = self
                    .def
                    .sinks
                    .iter()
                    .position(|o| o.name == s.name && o.fingerprint == s.fingerprint);
                match same.and_then(|i| old[i].take()) {
                    Some(chain) => {
                        kept.push(s.name.clone());
                        chain
                    }
                    None => s.transformers.iter().map(|t| t.build()).collect(),
                }
            })
            .collect();
        self.chains = chains;
        self.def = def;
        self.routes.clear();
        self.route_table.clear();
        kept
    }

    /// The transformer state of every sink, for [`restore`](Self::restore) after a planned
    /// restart.
    pub fn snapshot(&self) -> Vec<SinkState> {
        self.def
            .sinks
            .iter()
            .zip(&self.chains)
            .map(|(s, chain)| SinkState {
                name: s.name.clone(),
                fingerprint: s.fingerprint.clone(),
                transformers: chain.iter().map(|t| t.save_state()).collect(),
            })
            .collect()
    }

    /// Restores a [`snapshot`](Self::snapshot) into the sinks with the same name and
    /// definition. Returns (restored sink names, (skipped sink name, why)).
    pub fn restore(&mut self, saved: Vec<SinkState>) -> (Vec<String>, Vec<(String, String)>) {
        let (mut restored, mut skipped) = (Vec::new(), Vec::new());
        for st in saved {
            let Some(i) = self.def.sinks.iter().position(|s| s.name == st.name) else {
                skipped.push((st.name, "no such sink any more".into()));
                continue;
            };
            if self.def.sinks[i].fingerprint != st.fingerprint
                || self.chains[i].len() != st.transformers.len()
            {
                skipped.push((st.name, "its transformers changed".into()));
                continue;
            }
            let fresh: Vec<Box<dyn Transformer>> = self.def.sinks[i]
                .transformers
                .iter()
                .map(|t| t.build())
                .collect();
            let mut chain = fresh;
            let mut error = None;
            for (t, v) in chain.iter_mut().zip(st.transformers) {
                if let Err(e) = t.restore_state(v) {
                    error = Some(e);
                    break;
                }
            }
            match error {
                None => {
                    self.chains[i] = chain;
                    restored.push(st.name);
                }
                Some(e) => skipped.push((st.name, format!("unreadable state: {e}"))),
            }
        }
        (restored, skipped)
    }

    /// The definition being run.
    pub fn def(&self) -> &Arc<PipelineDef> {
        &self.def
    }

    /// Drops recorded since the last call.
    /// Forgets, in every transformer, the series that have been quiet for `ttl`: whose
    /// newest sample is older than `ttl` before the stream's newest sample (or `now`, if
    /// earlier). Returns how many series were forgotten ([`Transformer::evict`]).
    pub fn evict_quiet(&mut self, ttl: chrono::Duration, now: DateTime<Utc>) -> usize {
        let Some(cutoff) = self
            .newest
            .map(|t| t.min(now))
            .and_then(|t| t.checked_sub_signed(ttl))
        else {
            return 0;
        };
        self.evict(cutoff)
    }

    /// Forgets, in every transformer, the series whose newest sample is older than `cutoff`
    /// ([`Transformer::evict`]); returns how many series were forgotten.
    pub fn evict(&mut self, cutoff: DateTime<Utc>) -> usize {
        self.chains
            .iter_mut()
            .flat_map(|c| c.iter_mut())
            .map(|t| t.evict(cutoff))
            .sum()
    }

    pub fn take_drops(&mut self) -> Vec<Dropped> {
        std::mem::take(&mut self.drops)
    }

    /// Runs one publish context (one consumed message) and the flush that ends it.
    ///
    /// Pipelines run in definition order, each over all samples (Ceilometer's order, which
    /// matters when two pipelines share a sink). A sample is cloned for every matching
    /// pipeline but the last, which takes it by value.
    pub fn publish_context(&mut self, samples: Vec<Sample>, now: DateTime<Utc>) -> Vec<Emission> {
        let mut out = Vec::new();
        let valid = self.finite(samples);
        if let Some(t) = valid.iter().map(|s| s.timestamp).max() {
            self.newest = self.newest.max(Some(t));
        }
        let npipes = self.def.pipelines.len();
        if self.routes.len() >= MAX_ROUTES {
            // A stream of ever-new meter names must not grow memory without bound. Reset
            // only here: route indices must stay valid for the whole context.
            self.routes.clear();
            self.route_table.clear();
        }
        // Per sample: its route (pipelines that select its meter) and the last of them.
        let mut routed: Vec<(Option<Sample>, u32, usize)> = Vec::with_capacity(valid.len());
        for s in valid {
            let r = self.route(&s.name);
            let last = self.route_table[r as usize]
                .iter()
                .rposition(|m| *m)
                .unwrap_or(usize::MAX);
            if last != usize::MAX {
                routed.push((Some(s), r, last));
            } else {
                self.drops.push(Dropped {
                    reason: DropReason::NotSelected,
                    detail: format!("{} {}: no source selects this meter", s.name, s.resource_id),
                });
            }
        }
        for pi in 0..npipes {
            let def = &*self.def;
            let p = &def.pipelines[pi];
            let sink = &def.sinks[p.sink];
            let chain = &mut self.chains[p.sink];
            let mut survivors = Vec::new();
            for (slot, r, last) in routed.iter_mut() {
                if !self.route_table[*r as usize][pi] {
                    continue;
                }
                let s = if *last == pi {
                    slot.take().expect("sample moved only at its last pipeline")
                } else {
                    slot.as_ref().expect("sample still present").clone()
                };
                let mut cx = Cx {
                    now,
                    sink: &sink.name,
                    index: 0,
                    drops: &mut self.drops,
                };
                if let Some(o) = run_chain(chain, 0, s, &mut cx) {
                    survivors.push(o);
                }
            }
            if !survivors.is_empty() {
                out.push(Emission {
                    pipeline: pi,
                    samples: survivors,
                });
            }
        }
        self.flush_into(now, &mut out);
        out
    }

    /// Index into `route_table` of the pipelines that select meter `name` (cached: meter
    /// names are few, globbing them per sample is not free).
    fn route(&mut self, name: &str) -> u32 {
        if let Some(r) = self.routes.get(name) {
            return *r;
        }
        let def = &*self.def;
        let row: Box<[bool]> = def
            .pipelines
            .iter()
            .map(|p| def.sources[p.source].filter.matches(name))
            .collect();
        let idx = self.route_table.len() as u32;
        self.route_table.push(row);
        self.routes.insert(name.to_string(), idx);
        idx
    }

    /// Ceilometer's `pipeline.publish_data` on one pipeline, without the flush that a
    /// publish context adds. Used by the conformance runner, which drives pipelines one by
    /// one like the upstream tests do.
    pub fn publish_one(
        &mut self,
        pipeline: usize,
        samples: Vec<Sample>,
        now: DateTime<Utc>,
    ) -> Vec<Emission> {
        let mut out = Vec::new();
        let valid = self.finite(samples);
        if let Some(t) = valid.iter().map(|s| s.timestamp).max() {
            self.newest = self.newest.max(Some(t));
        }
        self.publish_into(pipeline, &valid, now, &mut out);
        out
    }

    /// Flushes one pipeline (Ceilometer's `pipeline.flush()`).
    pub fn flush_one(&mut self, pipeline: usize, now: DateTime<Utc>) -> Vec<Emission> {
        let mut out = Vec::new();
        self.flush_pipeline(pipeline, now, &mut out);
        out
    }

    /// Keeps samples with a finite volume; the others are counted as `invalid_volume`.
    fn finite(&mut self, samples: Vec<Sample>) -> Vec<Sample> {
        let mut valid = Vec::with_capacity(samples.len());
        for s in samples {
            if s.volume.is_finite() {
                valid.push(s);
            } else {
                self.drops.push(Dropped {
                    reason: DropReason::InvalidVolume,
                    detail: format!(
                        "{} {}: volume {} is not a finite number",
                        s.name, s.resource_id, s.volume
                    ),
                });
            }
        }
        valid
    }

    fn publish_into(
        &mut self,
        pi: usize,
        valid: &[Sample],
        now: DateTime<Utc>,
        out: &mut Vec<Emission>,
    ) {
        let def = &*self.def;
        let p = &def.pipelines[pi];
        let filter = &def.sources[p.source].filter;
        let sink = &def.sinks[p.sink];
        let chain = &mut self.chains[p.sink];
        let mut survivors = Vec::new();
        for s in valid.iter().filter(|s| filter.matches(&s.name)) {
            let mut cx = Cx {
                now,
                sink: &sink.name,
                index: 0,
                drops: &mut self.drops,
            };
            if let Some(o) = run_chain(chain, 0, s.clone(), &mut cx) {
                survivors.push(o);
            }
        }
        if !survivors.is_empty() {
            out.push(Emission {
                pipeline: pi,
                samples: survivors,
            });
        }
    }

    /// Flushes every pipeline (the end of a context, or the timer).
    pub fn flush(&mut self, now: DateTime<Utc>) -> Vec<Emission> {
        let mut out = Vec::new();
        self.flush_into(now, &mut out);
        out
    }

    fn flush_into(&mut self, now: DateTime<Utc>, out: &mut Vec<Emission>) {
        for pi in 0..self.def.pipelines.len() {
            self.flush_pipeline(pi, now, out);
        }
    }

    fn flush_pipeline(&mut self, pi: usize, now: DateTime<Utc>, out: &mut Vec<Emission>) {
        let def = &*self.def;
        let p = &def.pipelines[pi];
        let sink = &def.sinks[p.sink];
        let chain = &mut self.chains[p.sink];
        for i in 0..chain.len() {
            let mut cx = Cx {
                now,
                sink: &sink.name,
                index: i,
                drops: &mut self.drops,
            };
            let flushed = chain[i].flush(&mut cx);
            if flushed.is_empty() {
                continue;
            }
            let survivors: Vec<Sample> = flushed
                .into_iter()
                .filter_map(|s| run_chain(chain, i + 1, s, &mut cx))
                .collect();
            if !survivors.is_empty() {
                out.push(Emission {
                    pipeline: pi,
                    samples: survivors,
                });
            }
        }
    }
}

fn run_chain(
    chain: &mut [Box<dyn Transformer>],
    from: usize,
    s: Sample,
    cx: &mut Cx<'_>,
) -> Option<Sample> {
    let mut cur = s;
    for (i, t) in chain.iter_mut().enumerate().skip(from) {
        cx.index = i;
        cur = t.handle(cur, cx)?;
    }
    Some(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use vmeter_core::SampleType;

    /// One sink per transformer kind, all fed with the same meters.
    const ALL_SIX: &str = r#"
sources:
  - {name: s, meters: ["cpu", "memory", "memory.usage"], sinks: [rate, conv, delta, acc, agg, arith]}
sinks:
  - {name: rate, transformers: [{name: rate_of_change, parameters: {target: {name: r, scale: "volume * 0 + 2"}}}], publishers: ["test://"]}
  - {name: conv, transformers: [{name: unit_conversion, parameters: {target: {name: c, scale: 0.5}}}], publishers: ["test://"]}
  - {name: delta, transformers: [{name: delta}], publishers: ["test://"]}
  - {name: acc, transformers: [{name: accumulator, parameters: {size: 5}}], publishers: ["test://"]}
  - {name: agg, transformers: [{name: aggregator, parameters: {size: 7}}], publishers: ["test://"]}
  - {name: arith, transformers: [{name: arithmetic, parameters: {target: {name: m, expr: "100 * $(memory.usage) / $(memory)"}}}], publishers: ["test://"]}
"#;

    fn input() -> Vec<Vec<Sample>> {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        (0..12)
            .map(|k| {
                ["cpu", "memory", "memory.usage"]
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (k + i) % 4 != 0)
                    .map(|(i, name)| Sample {
                        name: (*name).into(),
                        kind: if i == 0 {
                            SampleType::Cumulative
                        } else {
                            SampleType::Gauge
                        },
                        unit: "x".into(),
                        volume: (k * k + i) as f64,
                        user_id: None,
                        project_id: Some("p".into()),
                        resource_id: format!("r{}", k % 2),
                        timestamp: t0 + chrono::Duration::seconds(k as i64 * 10),
                        resource_metadata: Default::default(),
                        source: "openstack".into(),
                        message_id: uuid::Uuid::from_u128((k * 10 + i) as u128),
                        monotonic_time: None,
                    })
                    .collect()
            })
            .collect()
    }

    fn run(rt: &mut Runtime, contexts: Vec<Vec<Sample>>) -> Vec<(usize, Sample)> {
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 1, 0, 0).unwrap();
        contexts
            .into_iter()
            .flat_map(|c| rt.publish_context(c, now))
            .flat_map(|e| e.samples.into_iter().map(move |s| (e.pipeline, s)))
            .collect()
    }

    fn def(text: &str) -> Arc<PipelineDef> {
        Arc::new(crate::definition::parse(text, "t.yaml").unwrap())
    }

    #[test]
    fn snapshot_and_restore_continue_exactly_where_they_stopped() {
        let all = input();
        let mut straight = Runtime::new(def(ALL_SIX));
        let expected = run(&mut straight, all.clone());
        for pipeline in 0..6 {
            assert!(
                expected.iter().any(|(p, _)| *p == pipeline),
                "every sink emits something in this input (pipeline {pipeline})"
            );
        }

        let (first, second) = all.split_at(5);
        let mut before = Runtime::new(def(ALL_SIX));
        let mut got = run(&mut before, first.to_vec());
        // Through JSON, as in the state file.
        let text = serde_json::to_string(&before.snapshot()).unwrap();
        let mut after = Runtime::new(def(ALL_SIX));
        let (restored, skipped) = after.restore(serde_json::from_str(&text).unwrap());
        assert_eq!(restored.len(), 6, "{skipped:?}");
        got.extend(run(&mut after, second.to_vec()));
        assert_eq!(got, expected);
    }

    #[test]
    fn quiet_series_are_forgotten_and_start_afresh() {
        let mut rt = Runtime::new(def(ALL_SIX));
        let mut all = input();
        run(&mut rt, all.drain(..4).collect());
        // r0 and r1 have predecessors in rate and delta, cached meters in arith.
        let t = |h: i64| {
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(h)
        };
        assert_eq!(
            rt.evict_quiet(chrono::Duration::hours(1), t(5)),
            0,
            "nothing is quiet yet"
        );
        // Only r1 speaks, two hours later.
        let mut later = input().remove(1);
        for s in &mut later {
            s.timestamp = t(2);
            s.message_id = uuid::Uuid::new_v4();
        }
        run(&mut rt, vec![later.clone()]);
        let evicted = rt.evict_quiet(chrono::Duration::hours(1), t(5));
        // r0: cpu in rate and delta, memory and memory.usage in delta... each series once.
        assert!(evicted >= 3, "evicted {evicted}");
        assert_eq!(
            rt.evict_quiet(chrono::Duration::hours(1), t(5)),
            0,
            "already gone"
        );
        // r1 kept its predecessor: its next cpu sample gives a rate at once.
        for s in &mut later {
            s.timestamp = t(2) + chrono::Duration::seconds(10);
            s.message_id = uuid::Uuid::new_v4();
        }
        let out = run(&mut rt, vec![later]);
        assert!(
            out.iter()
                .any(|(_, s)| s.name == "r" && s.resource_id == "r1")
        );
        // The stream's clock, not the wall clock: a backlog hours old evicts nothing of itself.
        assert_eq!(rt.evict_quiet(chrono::Duration::hours(1), t(100)), 0);
    }

    #[test]
    fn samples_no_source_selects_are_counted() {
        let mut rt = Runtime::new(def(ALL_SIX));
        let mut s = input().remove(1).remove(0);
        s.name = "disk.read.bytes".into();
        run(&mut rt, vec![vec![s]]);
        let drops = rt.take_drops();
        assert_eq!(drops.len(), 1, "{drops:?}");
        assert_eq!(drops[0].reason, DropReason::NotSelected);
    }

    #[test]
    fn restore_and_reload_skip_changed_sinks() {
        let mut rt = Runtime::new(def(ALL_SIX));
        run(&mut rt, input());
        let snap = rt.snapshot();
        let changed = ALL_SIX.replace("size: 5", "size: 6").replace(
            "{name: delta}",
            "{name: delta, parameters: {growth_only: true}}",
        );
        let mut other = Runtime::new(def(&changed));
        let (restored, skipped) = other.restore(snap);
        assert_eq!(restored, ["rate", "conv", "agg", "arith"]);
        let skipped: Vec<&str> = skipped.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(skipped, ["delta", "acc"]);

        let kept = rt.reload(def(&changed));
        assert_eq!(kept, ["rate", "conv", "agg", "arith"]);
    }
}
