//! Controller benchmarks (issue #11): programs that print numbers, never timed assertions.
//!
//!   cargo bench --bench controller -- overhead    [--runs N] [--create-samples N]
//!   cargo bench --bench controller -- termination [--runs N] [--orphans N]
//!   cargo bench --bench controller -- scale       [--jobs N] [--steady-seconds S]
//!
//! Each prints a table and then one JSON line (`{"bench": ...}`) so runs can be compared. They
//! need the real components of `tests/env/up.sh` (`GPU_TRAINER_ENV_DIR` set, its `env` sourced);
//! `tests/bench.sh` sets everything up, runs all of them and tears it down. The operator measured
//! is `gpu-trainer run` as its own process, built with this benchmark (release under `cargo
//! bench`), against `fake-vastai` in this process (it answers at once) and the test sshd.

#[path = "../../tests/common/mod.rs"]
mod common;

mod bench_util;
mod overhead;
mod scale;
mod termination;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "gpu-trainer controller benchmarks")]
struct Args {
    #[command(subcommand)]
    command: Command,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, global = true, hide = true)]
    bench: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Time from `kubectl apply` to the rent request, and from `running` to training launched.
    Overhead(overhead::OverheadArgs),
    /// Time from deleting a GpuInstance to the provider no longer listing it; orphan lifetime.
    Termination(termination::TerminationArgs),
    /// Many jobs training at once: memory, CPU, API writes, provider requests, SSH, restart.
    Scale(scale::ScaleArgs),
}

fn main() {
    // `cargo test --all-targets` runs this binary too, with the test harness's flags and filter
    // (`--include-ignored`, a test name): only `cargo bench`, which passes `--bench`, runs a
    // benchmark, and only when one is named.
    let given: Vec<String> = std::env::args().skip(1).collect();
    let by_cargo_bench = given.iter().any(|a| a == "--bench");
    let named = given.iter().any(|a| !a.starts_with('-'));
    if !(by_cargo_bench && named) {
        println!(
            "nothing to measure: cargo bench --bench controller -- overhead|termination|scale \
             (tests/bench.sh runs them all)"
        );
        return;
    }
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        match args.command {
            Command::Overhead(a) => overhead::run(a).await,
            Command::Termination(a) => termination::run(a).await,
            Command::Scale(a) => scale::run(a).await,
        }
    });
}
