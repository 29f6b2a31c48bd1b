//! The `gpu-trainer` command line. Each subcommand lives in its own file; this one parses
//! arguments, sets up logging and prints errors once, with their chain.

mod bench_transfer;
mod crd;
mod dataset;
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
    /// Check or pack a dataset folder.
    Dataset(dataset::DatasetArgs),
    /// List or show the declarative training tools.
    Tools(tools::ToolsArgs),
    /// Benchmarks (SSH transfer throughput against scp).
    Bench(bench_transfer::BenchArgs),
}

/// Entry point of the binary: parse, run, report.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd(args) => crd::run(args),
        Command::Dataset(args) => dataset::run(args),
        Command::Tools(args) => tools::run(args),
        Command::Bench(args) => bench_transfer::run(args),
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
