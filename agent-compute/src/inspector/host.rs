//! Facts of the host the agent runs on: its clocks, its name, the libvirt URI to open.

/// The embedded demo node (libvirt test driver), selected with `libvirt.uri: demo`.
pub const DEMO_NODE_XML: &str = include_str!("../../../deploy/demo-node.xml");

/// Host monotonic clock, seconds (CLOCK_MONOTONIC: does not jump with NTP or settimeofday).
pub fn monotonic_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The system host name.
pub fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Resolves `demo` to a test-driver URI over a file holding the embedded demo node.
pub fn resolve_uri(uri: &str) -> std::io::Result<String> {
    if uri != "demo" {
        return Ok(uri.to_string());
    }
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("vmeter-demo-node-{}-{n}.xml", std::process::id()));
    std::fs::write(&path, DEMO_NODE_XML)?;
    Ok(format!("test://{}", path.display()))
}
