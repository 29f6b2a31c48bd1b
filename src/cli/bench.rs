//! `gpu-trainer bench parser`: log-parser throughput on a synthetic ai-toolkit log and the
//! memory it holds. It prints numbers and asserts nothing: timings depend on the machine.
//!
//! The log is generated in blocks and fed through the parser block by block, the way the poller
//! reads a growing file, so the measured memory is the parser's, not the log's. Peak memory is
//! the process's `VmHWM` (Linux); its growth from before the run shows whether it depends on
//! the log's size (run with two sizes to compare).
//!
//! Throughput is reported twice: per second of CPU time of the parsing thread (Linux
//! `/proc/thread-self/schedstat`), which is what "on one core" means and stays meaningful on a
//! busy machine, and per second of wall-clock time.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::monitor::{LogEvent, ParserKind};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Parser throughput in MB/s and peak memory on a synthetic ai-toolkit log.
    Parser(ParserBenchArgs),
    /// Upload the same file with our SSH transport and with `scp`, and compare throughput.
    #[command(
        after_help = "Example:\n  gpu-trainer bench transfer --host 127.0.0.1 --port 2222 --user root --key ~/.ssh/id_ed25519"
    )]
    Transfer(super::bench_transfer::TransferArgs),
}

#[derive(Args, Debug)]
pub struct ParserBenchArgs {
    /// Size of the synthetic log in MB (10^6 bytes).
    #[arg(long, value_name = "N", default_value_t = 100)]
    size_mb: u64,
    /// Bytes per chunk fed to the parser.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    chunk_bytes: usize,
}

#[derive(Serialize)]
struct ParserBenchResult {
    bench: &'static str,
    bytes: u64,
    wall_seconds: f64,
    mb_per_wall_second: f64,
    cpu_seconds: Option<f64>,
    mb_per_cpu_second: Option<f64>,
    progress_events: u64,
    other_events: u64,
    final_step: Option<u64>,
    parser_buffered_bytes: usize,
    peak_rss_before_kib: Option<u64>,
    peak_rss_after_kib: Option<u64>,
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Parser(args) => parser(args),
        BenchCommand::Transfer(args) => super::bench_transfer::run_transfer(args),
    }
}

fn parser(args: ParserBenchArgs) -> anyhow::Result<()> {
    let target = args.size_mb * 1_000_000;
    let chunk_bytes = args.chunk_bytes.max(1);
    let peak_before = peak_rss_kib();
    let mut generator = SyntheticAiToolkitLog::new(20_000_000);
    let mut parser = ParserKind::AiToolkit.parser();
    let (mut progress_events, mut other_events, mut final_step) = (0u64, 0u64, None);
    let mut block = Vec::with_capacity(chunk_bytes + 4096);
    let mut fed = 0u64;
    let mut parse_seconds = 0.0;
    let mut cpu_nanos = Some(0u64);
    while fed < target {
        block.clear();
        generator.fill(&mut block, chunk_bytes);
        // Only the parser is timed; generating the log is not part of the measurement.
        let cpu_before = thread_cpu_nanos();
        let started = Instant::now();
        parser.feed(&block, &mut |event| match event {
            LogEvent::Progress(reading) => {
                progress_events += 1;
                final_step = Some(reading.step);
            }
            _ => other_events += 1,
        });
        parse_seconds += started.elapsed().as_secs_f64();
        cpu_nanos = match (cpu_nanos, cpu_before, thread_cpu_nanos()) {
            (Some(total), Some(before), Some(after)) => Some(total + after.saturating_sub(before)),
            _ => None,
        };
        fed += block.len() as u64;
    }
    let peak_after = peak_rss_kib();
    let mb_per_second = fed as f64 / 1e6 / parse_seconds.max(1e-9);
    let cpu_seconds = cpu_nanos.map(|n| n as f64 / 1e9);
    let mb_per_cpu_second = cpu_seconds.map(|s| fed as f64 / 1e6 / s.max(1e-9));
    let result = ParserBenchResult {
        bench: "parser",
        bytes: fed,
        wall_seconds: parse_seconds,
        mb_per_wall_second: mb_per_second,
        cpu_seconds,
        mb_per_cpu_second,
        progress_events,
        other_events,
        final_step,
        parser_buffered_bytes: parser.buffered_bytes(),
        peak_rss_before_kib: peak_before,
        peak_rss_after_kib: peak_after,
    };
    let mut table = String::new();
    let kib = |v: Option<u64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v} KiB"));
    writeln!(table, "{:<28} {:.1} MB", "log (synthetic ai-toolkit)", fed as f64 / 1e6)?;
    let or_na = |v: Option<f64>, unit: &str| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.3} {unit}"));
    writeln!(table, "{:<28} {}", "parse CPU time", or_na(cpu_seconds, "s"))?;
    writeln!(table, "{:<28} {}", "throughput (one core, CPU)", or_na(mb_per_cpu_second, "MB/s"))?;
    writeln!(table, "{:<28} {:.3} s", "parse wall time", parse_seconds)?;
    writeln!(table, "{:<28} {:.1} MB/s", "throughput (wall clock)", mb_per_second)?;
    writeln!(table, "{:<28} {}", "bar redraws parsed", progress_events)?;
    writeln!(table, "{:<28} {}", "other events", other_events)?;
    writeln!(table, "{:<28} {} bytes", "parser buffers", parser.buffered_bytes())?;
    writeln!(table, "{:<28} {}", "peak RSS before", kib(peak_before))?;
    writeln!(table, "{:<28} {}", "peak RSS after", kib(peak_after))?;
    print!("{table}");
    println!("{}", serde_json::to_string(&result).context("failed to encode the result")?);
    Ok(())
}

/// Nanoseconds this thread has run on a CPU (`/proc/thread-self/schedstat`, first field).
fn thread_cpu_nanos() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// `VmHWM` from `/proc/self/status`, in KiB; `None` where it does not exist.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// An endless ai-toolkit log: a bar drawn twice per step, a save and a sample run every 250
/// steps, like a real FLUX LoRA run.
struct SyntheticAiToolkitLog {
    step: u64,
    total: u64,
    seed: u64,
}

impl SyntheticAiToolkitLog {
    fn new(total: u64) -> Self {
        Self { step: 0, total, seed: 0x9e37_79b9_7f4a_7c15 }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift: enough variety in the digits, no dependency.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }

    fn fill(&mut self, out: &mut Vec<u8>, at_least: usize) {
        let name = "my_first_flux_lora_v1";
        if self.step == 0 {
            out.extend_from_slice(format!("Running 1 job\n# Running job: {name}\n").as_bytes());
        }
        while out.len() < at_least {
            self.step += 1;
            let step = self.step;
            let pct = step * 100 / self.total;
            let full = (step * 10 / self.total) as usize;
            let cells: String = "█".repeat(full) + &" ".repeat(10 - full);
            let elapsed = step * 10 / 24;
            let remaining = (self.total - step.min(self.total)) * 10 / 24;
            let loss = 0.3 + (self.next_random() % 1000) as f64 / 10_000.0;
            let rate = 2.3 + (self.next_random() % 20) as f64 / 100.0;
            for postfix_loss in [0.5, loss] {
                let _ = write!(
                    Bytes(out),
                    "\r{name}: {pct:3}%|{cells}| {step}/{} [{}<{}, {rate:5.2}it/s, lr: 1.0e-04 loss: {postfix_loss:.3e}]",
                    self.total,
                    clock(elapsed),
                    clock(remaining),
                );
            }
            if step.is_multiple_of(250) {
                let _ = write!(
                    Bytes(out),
                    "\nSaving at step {step}\nSaved checkpoint to output/{name}/{name}_{step:09}.safetensors\n\
                     Generating Samples: 100%|██████████| 10/10 [00:42<00:00,  4.20s/it]\n"
                );
            }
        }
    }
}

fn clock(seconds: u64) -> String {
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    if h > 0 { format!("{h}:{m:02}:{s:02}") } else { format!("{m:02}:{s:02}") }
}

/// `fmt::Write` into a byte buffer without an intermediate `String`.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
