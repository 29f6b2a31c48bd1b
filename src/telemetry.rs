//! Logging set-up for the binary: structured JSON lines by default (what log pipelines in a
//! cluster expect) or human-readable output with `--log-format pretty`.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line with structured fields.
    #[default]
    Json,
    /// Human-readable, for terminals.
    Pretty,
}

/// Installs the global subscriber. `RUST_LOG` overrides `default_filter` (e.g. `info`,
/// `gpu_trainer=debug,kube=warn`). Calling it twice is harmless (the second call is ignored), so
/// tests that start several components in one process can all call it.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry.with(fmt::layer().compact().with_writer(std::io::stderr)).try_init(),
    };
    // Already initialised (tests, or a library user with their own subscriber): keep theirs.
    drop(result);
}
