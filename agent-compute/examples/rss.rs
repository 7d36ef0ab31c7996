//! Memory of the inspector alone: RSS after opening `URI` and after each of four cycles
//! (samples built and dropped, nothing published), then after dropping the inspector.
//! With the domains behind libvirtd (`test+unix:///abs/node.xml`) the growth is the
//! agent's per-domain state (parsed XML, metadata maps).
//!
//! `cargo run --release -p agent-compute --example rss -- test+unix:///tmp/vmeter-bench-node-1000.xml`
//! (the node file is written by `cargo bench -p agent-compute --bench poll`).

use agent_compute::inspector::{Guard, Inspector, Options};
use std::sync::Arc;
use std::time::Duration;

fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("RssAnon"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    virt::error::clear_error_callback();
    let uri = std::env::args()
        .nth(1)
        .expect("usage: rss URI (e.g. test+unix:///tmp/vmeter-bench-node-1000.xml)");
    println!("start: {}", rss());
    let opts = Options {
        host: "h".into(),
        bulk: true,
        xml_refresh: Duration::from_secs(3600),
        contract: Default::default(),
    };
    let mut i = Inspector::open(&uri, opts, Arc::new(Guard::default())).expect("open");
    println!("open: {}", rss());
    for c in 0..4 {
        let mut n = 0;
        i.poll_each(&mut |_r, _s, _md| n += 1).expect("poll");
        println!("cycle {c} ({n} samples): {}", rss());
    }
    drop(i);
    // SAFETY: malloc_trim only releases free heap memory to the OS.
    unsafe { libc::malloc_trim(0) };
    println!("inspector dropped: {}", rss());
}
