//! vmeter's compute agent as a library: the libvirt inspector (bulk stats with per-domain
//! fallback), polling sources, the on-disk spool and the polling loop. The binary
//! `agent-compute` is a thin CLI over it; benches drive the same code path.

pub mod bulk;
pub mod config;
pub mod domain_xml;
pub mod inspector;
pub mod meter;
pub mod poller;
pub mod sources;
pub mod spool;
