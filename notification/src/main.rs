//! `notification`: run the service, or the operator tools `check` and `replay`.

use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use notification::definition;
use notification::service::{self, Config};
use vmeter_core::service as skeleton;
use vmeter_core::{http, shutdown, telemetry};

/// Samples are many small short-lived allocations; mimalloc roughly doubles pipeline
/// throughput over glibc malloc (`cargo bench -p notification --bench pipeline`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "notification",
    version,
    about = "vmeter notification service: applies pipeline.yaml to the raw sample stream"
)]
struct Cli {
    /// Config file (YAML). Default: /etc/vmeter/notification.yaml if it exists.
    #[arg(long, global = true, env = "VMETER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the service (the default).
    Run,
    /// Validate a pipeline.yaml and print its pipelines; exit non-zero listing every error.
    Check { pipeline: PathBuf },
    /// Run a pipeline offline on JSON lines (no broker).
    Replay {
        #[arg(long)]
        pipeline: PathBuf,
        /// Input file, or `-` for stdin.
        #[arg(long, default_value = "-")]
        input: String,
    },
    /// Validate this service's config file and pipeline.yaml.
    CheckConfig,
}

fn main() -> ExitCode {
    // Fault-injection builds only: fail points from `FAILPOINTS` (tests/tests/failpoints.rs).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::Check { pipeline } => check(&pipeline),
        Cmd::Replay { pipeline, input } => replay(&pipeline, &input),
        Cmd::CheckConfig => match load(&cli.config) {
            Ok((cfg, def)) => {
                println!(
                    "config OK; pipeline {} OK ({} pipelines)",
                    cfg.pipeline.file.display(),
                    def.pipelines.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Run => {
            let (cfg, def) = match load(&cli.config) {
                Ok(x) => x,
                Err(code) => return code,
            };
            telemetry::init_logging(&cfg.log);
            for w in &def.warnings {
                tracing::warn!("{}: {w}", cfg.pipeline.file.display());
            }
            skeleton::runtime().block_on(async move {
                let stop = shutdown::on_signals();
                let health = http::Health::default();
                let listener = match skeleton::bind(cfg.http.listen).await {
                    Ok(l) => l,
                    Err(code) => return code,
                };
                let app = http::router(health.clone());
                let work = service::run(cfg, Arc::new(def), health, stop.clone());
                skeleton::serve_with("Notification service", listener, app, stop, work).await
            })
        }
    }
}

fn load(path: &Option<PathBuf>) -> Result<(Config, definition::PipelineDef), ExitCode> {
    let mut cfg: Config = skeleton::load_config(path.as_deref(), "notification")?;
    cfg.signing.resolve().map_err(skeleton::config_error)?;
    let def = definition::load_file(&cfg.pipeline.file)
        .map_err(|e| skeleton::config_error(format!("pipeline does not load:\n{e}")))?;
    Ok((cfg, def))
}

fn check(path: &std::path::Path) -> ExitCode {
    match definition::load_file(path) {
        Ok(def) => {
            for w in &def.warnings {
                println!("warning: {w}");
            }
            for p in &def.pipelines {
                let sink = &def.sinks[p.sink];
                let chain: Vec<_> = sink.transformers.iter().map(|t| t.name()).collect();
                let pubs: Vec<_> = sink.publishers.iter().map(|u| u.url()).collect();
                println!(
                    "{}: transformers [{}] -> publishers [{}]",
                    p.name,
                    chain.join(", "),
                    pubs.join(", ")
                );
            }
            println!("OK: {} pipelines", def.pipelines.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!("{} error(s); nothing loaded", e.errors.len());
            ExitCode::from(1)
        }
    }
}

fn replay(pipeline: &std::path::Path, input: &str) -> ExitCode {
    let def = match definition::load_file(pipeline) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut err = std::io::stderr();
    let result = if input == "-" {
        notification::replay::run(def, std::io::stdin().lock(), &mut out, &mut err)
    } else {
        match std::fs::File::open(input) {
            Ok(f) => notification::replay::run(def, BufReader::new(f), &mut out, &mut err),
            Err(e) => {
                eprintln!("error: {input}: {e}");
                return ExitCode::from(1);
            }
        }
    };
    match result {
        Ok(s) => {
            drop(out);
            eprintln!(
                "replay: {} contexts, {} samples in, {} published, {} bad lines, dropped {:?}",
                s.contexts, s.samples_in, s.samples_out, s.bad_lines, s.dropped
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
