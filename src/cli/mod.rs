//! The `gpu-trainer` command line. Each subcommand lives in its own file; this one parses
//! arguments, sets up logging and prints errors once, with their chain.

mod bench;
mod bench_transfer;
mod crd;
mod dataset;
mod fake_vastai;
mod launch;
mod offers;
mod operator;
mod parse_log;
mod run;
mod sweep;
mod tools;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Runs model training on GPUs rented from the Vast.ai marketplace, from Kubernetes or a terminal.
#[derive(Parser, Debug)]
#[command(name = "gpu-trainer", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the TrainingJob and GpuInstance CustomResourceDefinitions as YAML.
    Crd(crd::CrdArgs),
    /// Run one TrainingJob from a terminal, without a cluster.
    Launch(launch::LaunchArgs),
    /// Run the operator: controllers, sweeper, health and metrics endpoints.
    Run(run::RunArgs),
    /// Find (and with --force, destroy) instances no GpuInstance accounts for.
    Sweep(sweep::SweepArgs),
    /// Search the Vast.ai marketplace and print matching offers.
    Offers(offers::OffersArgs),
    /// Run a local server that speaks the Vast.ai API (for development and tests).
    FakeVastai(fake_vastai::FakeVastaiArgs),
    /// Print what the monitor makes of a saved training log, as JSON.
    ParseLog(parse_log::ParseLogArgs),
    /// Benchmarks that print numbers: log parser throughput, SSH transfer against scp.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Check or pack a dataset folder.
    Dataset(dataset::DatasetArgs),
    /// List or show the declarative training tools.
    Tools(tools::ToolsArgs),
}

/// Entry point of the binary: parse, run, report.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd(args) => crd::run(args),
        Command::Launch(args) => launch::run(args),
        Command::Run(args) => run::run(args),
        Command::Sweep(args) => sweep::run(args),
        Command::Offers(args) => offers::run(args),
        Command::FakeVastai(args) => fake_vastai::run(args),
        Command::ParseLog(args) => parse_log::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Dataset(args) => dataset::run(args),
        Command::Tools(args) => tools::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if is_broken_pipe(&err) {
                // `gpu-trainer crd | head` closing the pipe early is not an error (Unix convention).
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Resolves on Ctrl-C or SIGTERM (how Kubernetes stops a pod).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
