//! `gpu-trainer bench transfer`: upload throughput of our SSH transport (russh, streamed exec channel,
//! with the checksum verification every upload does) against OpenSSH's `scp` for the same file to
//! the same server. Prints a table and one JSON line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::remote::ssh::{SshExec, SshKey, SshOptions, SshTarget};
use crate::remote::{RemoteExec, RunOptions, shell_quote};

#[derive(Args, Debug)]
pub struct TransferArgs {
    #[arg(long)]
    host: String,
    #[arg(long, default_value_t = 22)]
    port: u16,
    #[arg(long)]
    user: String,
    /// Private key file (ed25519).
    #[arg(long)]
    key: PathBuf,
    /// Size of the generated test file, in MiB (ignored with --file).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Upload this file instead of a generated one.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Folder on the server to upload into (emptied of the test files afterwards).
    #[arg(long, default_value = "/tmp/gpu-trainer-bench")]
    remote_dir: String,
    /// Runs per transport; the best is reported.
    #[arg(long, default_value_t = 1)]
    runs: u32,
}

/// Incompressible, fast to generate (xorshift), so generation does not dominate.
fn generate(path: &Path, size: u64) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

pub fn run_transfer(args: TransferArgs) -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        // Phase timings of the upload (debug level) go to stderr.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let rt =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("failed to start tokio")?;
    rt.block_on(transfer(args))
}

async fn transfer(args: TransferArgs) -> anyhow::Result<()> {
    let tmp = std::env::temp_dir().join(format!("gpu-trainer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let file = match &args.file {
        Some(f) => f.clone(),
        None => {
            let f = tmp.join("bench.bin");
            eprintln!("generating {} MiB test file {}", args.size_mib, f.display());
            generate(&f, args.size_mib * 1024 * 1024)?;
            f
        }
    };
    let bytes = std::fs::metadata(&file)?.len();
    let key = SshKey::from_file(&args.key)?;
    let target = SshTarget { host: args.host.clone(), port: args.port, user: args.user.clone() };
    let exec = SshExec::connect(target, key, None, SshOptions::default()).await?;
    let dir = shell_quote(&args.remote_dir)?;
    let cleanup = format!("rm -f {dir}/ours.bin {dir}/scp.bin");
    exec.run(&format!("mkdir -p {dir} && {cleanup}"), RunOptions::default()).await?;

    let mut ours = Duration::MAX;
    let mut scp = Duration::MAX;
    for run in 1..=args.runs {
        exec.run(&cleanup, RunOptions::default()).await?;
        let start = Instant::now();
        let report = exec.upload(&file, &format!("{}/ours.bin", args.remote_dir)).await?;
        let took = start.elapsed();
        anyhow::ensure!(!report.skipped, "the upload was skipped; remove the remote file first");
        eprintln!("run {run}: gpu-trainer {:.1} MiB/s (sha256 {})", mib_s(bytes, took), report.sha256);
        ours = ours.min(took);

        exec.run(&cleanup, RunOptions::default()).await?;
        let start = Instant::now();
        let status = tokio::process::Command::new("scp")
            .args([
                "-q",
                "-B",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg("-P")
            .arg(args.port.to_string())
            .arg("-i")
            .arg(&args.key)
            .arg(&file)
            .arg(format!("{}@{}:{}/scp.bin", args.user, args.host, args.remote_dir))
            .status()
            .await
            .context("failed to run scp")?;
        let took = start.elapsed();
        anyhow::ensure!(status.success(), "scp failed: {status}");
        eprintln!("run {run}: scp         {:.1} MiB/s", mib_s(bytes, took));
        scp = scp.min(took);
    }
    exec.run(&cleanup, RunOptions::default()).await?;
    exec.close().await;
    if args.file.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }

    let (o, s) = (mib_s(bytes, ours), mib_s(bytes, scp));
    println!("{:<34} {:>10} {:>10}", "transport", "seconds", "MiB/s");
    println!("{:<34} {:>10.2} {:>10.1}", "gpu-trainer (russh, verified)", ours.as_secs_f64(), o);
    println!("{:<34} {:>10.2} {:>10.1}", "scp (OpenSSH)", scp.as_secs_f64(), s);
    println!("ratio gpu-trainer/scp: {:.2}", o / s);
    println!(
        "{}",
        serde_json::json!({
            "bench": "transfer", "bytes": bytes, "host": args.host, "runs": args.runs,
            "ours_seconds": ours.as_secs_f64(), "ours_mib_s": o,
            "scp_seconds": scp.as_secs_f64(), "scp_mib_s": s, "ratio": o / s,
        })
    );
    Ok(())
}
