//! `agent-compute`: poll libvirt on this hypervisor and publish signed sample batches.

use agent_compute::{inspector, poller, sources};

// The system allocator (glibc), not mimalloc: a cycle no longer builds samples (they are
// encoded straight into batches), so it allocates little, and glibc keeps the resident
// memory lower: 29 MiB against 46 MiB with 1,000 domains (docs/agent.md, "Performance").

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmeter_core::service as skeleton;
use vmeter_core::{http, shutdown, telemetry};

use agent_compute::config::Config;

#[derive(Parser)]
#[command(
    name = "agent-compute",
    version,
    about = "vmeter compute agent: polls libvirt and publishes samples"
)]
struct Cli {
    /// Config file (YAML). Default: /etc/vmeter/agent-compute.yaml if it exists.
    #[arg(long, global = true, env = "VMETER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Poll once and print the samples as JSON lines, without any broker.
    PollOnce {
        /// libvirt URI (default: libvirt.uri from the config; `demo` for the demo node).
        #[arg(long)]
        uri: Option<String>,
        /// `json`: one JSON line per sample (Ceilometer field names); `text`: a table.
        #[arg(long, default_value = "json", value_parser = ["json", "text"])]
        format: String,
    },
    /// Validate the config file and exit.
    CheckConfig,
}

/// `broker.frame_max` unless configured, bytes.
const AGENT_FRAME_MAX: u32 = 16 * 1024;

fn main() -> ExitCode {
    // Fault-injection builds only: fail points from `FAILPOINTS` (tests/tests/failpoints.rs).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let mut cfg: Config = match skeleton::load_config(cli.config.as_deref(), "agent-compute") {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = cfg.signing.resolve() {
        return skeleton::config_error(e);
    }
    // Small AMQP frames: the client's I/O buffers are 32 frames each (8 MiB at the broker's
    // 128 KiB), the largest item of this agent's memory otherwise.
    cfg.broker.frame_max.get_or_insert(AGENT_FRAME_MAX);
    if let Err(e) = cfg.validate() {
        return skeleton::config_error(format!("config: {e}"));
    }
    let (sources, source_warnings) = match &cfg.polling.sources_file {
        Some(p) => match sources::load(p) {
            Ok(x) => x,
            Err(e) => return skeleton::config_error(format!("polling.sources_file: {e}")),
        },
        None => (sources::every_meter(cfg.polling.interval_secs), Vec::new()),
    };
    let host = cfg
        .libvirt
        .host
        .clone()
        .unwrap_or_else(inspector::system_hostname);
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::CheckConfig => {
            for w in &source_warnings {
                println!("warning: {w}");
            }
            for s in &sources {
                println!("source {}: every {} s", s.name, s.interval.as_secs_f64());
            }
            println!("config OK");
            ExitCode::SUCCESS
        }
        Cmd::PollOnce { uri, format } => {
            telemetry::init_logging(&cfg.log);
            virt::error::clear_error_callback();
            let uri = match inspector::resolve_uri(uri.as_deref().unwrap_or(&cfg.libvirt.uri)) {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = inspector::Options {
                host,
                bulk: cfg.libvirt.bulk_stats,
                xml_refresh: std::time::Duration::from_secs_f64(cfg.libvirt.xml_refresh_secs),
                contract: cfg.contract.clone(),
            };
            let guard = std::sync::Arc::new(inspector::Guard::default());
            let mut insp = match inspector::Inspector::open(&uri, opts, guard) {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("error: cannot open libvirt {uri}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match insp.poll() {
                Ok((samples, stats)) => {
                    if format == "text" {
                        println!(
                            "{:<34} {:<11} {:>22} {:<9} resource",
                            "meter", "type", "volume", "unit"
                        );
                    }
                    for s in &samples {
                        if format == "text" {
                            println!(
                                "{:<34} {:<11} {:>22} {:<9} {}",
                                s.name,
                                s.kind.as_str(),
                                s.volume,
                                s.unit,
                                s.resource_id
                            );
                        } else {
                            println!("{}", serde_json::to_string(&poll_json(s)).expect("json"));
                        }
                    }
                    eprintln!(
                        "{} domains, {} skipped, {} samples; stats groups in bulk: {}; per domain: {}",
                        stats.domains,
                        stats.skipped,
                        stats.samples,
                        agent_compute::bulk::group::names(insp.bulk_groups()),
                        agent_compute::bulk::group::names(
                            agent_compute::bulk::group::ALL & !insp.bulk_groups()
                        ),
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: polling {uri}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run => {
            telemetry::init_logging(&cfg.log);
            for w in &source_warnings {
                tracing::warn!("{w}");
            }
            let uri = match inspector::resolve_uri(&cfg.libvirt.uri) {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            skeleton::runtime().block_on(async move {
                let stop = shutdown::on_signals();
                let health = http::Health::default();
                let listener = match skeleton::bind(cfg.http.listen).await {
                    Ok(l) => l,
                    Err(code) => return code,
                };
                let app = http::router(health.clone());
                let work = poller::run(cfg, sources, uri, host, health, stop.clone());
                skeleton::serve_with("Agent", listener, app, stop, work).await
            })
        }
    }
}

fn poll_json(s: &vmeter_core::Sample) -> serde_json::Value {
    serde_json::json!({
        "name": s.name, "type": s.kind.as_str(), "unit": s.unit, "volume": s.volume,
        "user_id": s.user_id, "project_id": s.project_id, "resource_id": s.resource_id,
        "timestamp": vmeter_core::sample::format_timestamp(&s.timestamp),
        "resource_metadata": s.resource_metadata, "source": s.source,
        "message_id": s.message_id.to_string(), "monotonic_time": s.monotonic_time,
    })
}
