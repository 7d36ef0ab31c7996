//! Running a [`PipelineDef`]: publish contexts, transformer chains, flushes.
//!
//! One consumed message is one publish context: for each pipeline in order, the samples its
//! source selects go through its sink's transformer chain; survivors are emitted for the
//! sink's publishers; then every pipeline is flushed (transformer i's flush output continues
//! through transformers i+1..n). Pipelines that share a sink share its transformer instances.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use vmeter_core::Sample;

use crate::definition::PipelineDef;
use crate::transformers::{Cx, Dropped, Transformer};

/// Samples a pipeline publishes at once (one `publish_samples` call per publisher).
#[derive(Debug)]
pub struct Emission {
    /// Index into [`PipelineDef::pipelines`].
    pub pipeline: usize,
    pub samples: Vec<Sample>,
}

/// The live pipelines with their transformer state.
pub struct Runtime {
    def: Arc<PipelineDef>,
    /// Per sink: its transformer chain.
    chains: Vec<Vec<Box<dyn Transformer>>>,
    /// Drops recorded since the last [`take_drops`](Self::take_drops).
    drops: Vec<Dropped>,
    /// Meter name → index into `route_table`.
    routes: HashMap<String, u32>,
    /// Per route: for each pipeline, whether its source selects the meter.
    route_table: Vec<Box<[bool]>>,
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
            routes: HashMap::new(),
            route_table: Vec::new(),
        }
    }

    /// The definition being run.
    pub fn def(&self) -> &Arc<PipelineDef> {
        &self.def
    }

    /// Drops recorded since the last call.
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
                    reason: "invalid_volume",
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
