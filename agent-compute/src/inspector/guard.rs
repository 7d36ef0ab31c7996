//! What the libvirt thread is doing now (for the scheduler's overrun report and the call
//! time histogram), and the domains an abandoned call is still blocked on.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the libvirt thread is doing now, and the domains that a previous, abandoned call
/// is still blocked on. Shared between the libvirt thread and the scheduler, which reads it
/// when a call overruns `call_timeout`.
#[derive(Debug, Default)]
pub struct Guard {
    in_flight: Mutex<Slot>,
    quarantined: Arc<Mutex<HashSet<String>>>,
}

/// The call in progress, kept in place: entering a call copies the domain's name and UUID
/// into buffers that are reused (a call is entered several times per domain per cycle).
#[derive(Debug, Default)]
struct Slot {
    call: Option<&'static str>,
    has_domain: bool,
    name: String,
    uuid: String,
    since: Option<Instant>,
    /// `vmeter_agent_libvirt_call_seconds{call}` handles, made once per call kind.
    timers: Vec<(&'static str, vmeter_core::telemetry::Histogram)>,
}

/// One libvirt call in progress.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// `bulk stats`, `per-domain stats`, `domain xml`, `host stats`, `open connection`.
    pub call: &'static str,
    /// Domain name and UUID, for per-domain calls.
    pub domain: Option<(String, String)>,
    pub since: Instant,
}

impl Guard {
    /// A guard for another libvirt thread: its own call in progress, the same quarantine.
    pub fn sibling(&self) -> Guard {
        Guard {
            in_flight: Mutex::default(),
            quarantined: self.quarantined.clone(),
        }
    }

    /// Records the call about to be made.
    pub fn enter(&self, call: &'static str, domain: Option<(&str, &str)>) {
        let mut g = self.in_flight.lock().expect("guard poisoned");
        g.call = Some(call);
        g.has_domain = domain.is_some();
        if let Some((n, u)) = domain {
            g.name.clear();
            g.name.push_str(n);
            g.uuid.clear();
            g.uuid.push_str(u);
        }
        g.since = Some(Instant::now());
    }

    /// Records that no call is in progress, and how long the call took.
    pub fn leave(&self) {
        let mut g = self.in_flight.lock().expect("guard poisoned");
        let Some(call) = g.call.take() else {
            return;
        };
        let Some(since) = g.since else {
            return;
        };
        let at = match g.timers.iter().position(|(c, _)| *c == call) {
            Some(at) => at,
            None => {
                g.timers.push((
                    call,
                    vmeter_core::telemetry::histogram(
                        "vmeter_agent_libvirt_call_seconds",
                        "Time of each libvirt call that returned, by call.",
                        &[("call", call)],
                        vmeter_core::telemetry::Buckets::Latency,
                    ),
                ));
                g.timers.len() - 1
            }
        };
        g.timers[at].1.observe_since(since);
    }

    /// The call in progress, if any.
    pub fn in_flight(&self) -> Option<InFlight> {
        let g = self.in_flight.lock().expect("guard poisoned");
        Some(InFlight {
            call: g.call?,
            domain: g.has_domain.then(|| (g.name.clone(), g.uuid.clone())),
            since: g.since?,
        })
    }

    /// Skips `uuid`'s per-domain calls until [`Guard::release`].
    pub fn quarantine(&self, uuid: &str) {
        self.quarantined
            .lock()
            .expect("guard poisoned")
            .insert(uuid.to_string());
    }

    /// Ends a quarantine (the blocked call returned).
    pub fn release(&self, uuid: &str) {
        self.quarantined
            .lock()
            .expect("guard poisoned")
            .remove(uuid);
    }

    pub(crate) fn is_quarantined(&self, uuid: &str) -> bool {
        let q = self.quarantined.lock().expect("guard poisoned");
        !q.is_empty() && q.contains(uuid)
    }
}
