//! `gpu-trainer launch`: run one TrainingJob from a terminal with the same engine the operator
//! uses, without Kubernetes.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::api::{TrainingJob, TrainingJobPhase, TrainingJobStatus};
use crate::engine::env::{FileSecrets, Secrets};
use crate::launch::rent::{self, RentSpec};
use crate::launch::{LocalRun, MachineSpec, Update};
use crate::monitor::poller::TrainingStatus;
use crate::provider::config::{ENV_API_KEY, ProviderConfig};
use crate::provider::vastai::VastClient;
use crate::remote::ssh::{SshKey, SshTarget};
use crate::remote::tool::ToolRegistry;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Provider {
    /// This machine: the trainer runs in a work dir next to the job file.
    Local,
    /// The existing machine in `spec.provider.ssh` (host, port, user), with `--ssh-key`.
    Ssh,
    /// A machine rented on Vast.ai that matches `spec.resources` (VASTAI_API_KEY), destroyed
    /// when the job ends and on `--cancel`.
    Vastai,
}

/// Run one TrainingJob without a cluster. State is kept next to the job file, so Ctrl-C and a
/// second `launch` continue the same run.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  gpu-trainer launch examples/quickstart.yaml --watch\n  \
    gpu-trainer launch examples/quickstart.yaml --dry-run\n  gpu-trainer launch examples/quickstart.yaml --cancel\n  \
    VASTAI_API_KEY=... gpu-trainer launch job.yaml --provider vastai --dry-run")]
pub struct LaunchArgs {
    /// The TrainingJob YAML file.
    file: PathBuf,
    /// Where the GPU comes from.
    #[arg(long, value_enum, default_value = "local")]
    provider: Provider,
    /// Show a live progress bar (step, loss, rate, ETA, cost). On by default in a terminal.
    #[arg(long)]
    watch: bool,
    /// Print what would run and what it would cost, and stop.
    #[arg(long)]
    dry_run: bool,
    /// Stop the run of this job and release its machine.
    #[arg(long, conflicts_with = "dry_run")]
    cancel: bool,
    /// Start over, forgetting an earlier finished run of this job.
    #[arg(long, conflicts_with_all = ["dry_run", "cancel"])]
    restart: bool,
    /// Folder for state and work dirs [default: `.gpu-trainer` next to the job file].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Private key (OpenSSH, ed25519) for `--provider ssh`.
    #[arg(long, value_name = "FILE", required_if_eq("provider", "ssh"))]
    ssh_key: Option<PathBuf>,
    /// Base of the work dirs on the machine for `--provider ssh` and `vastai`.
    #[arg(long, value_name = "DIR", default_value = crate::remote::launch::DEFAULT_REMOTE_BASE)]
    remote_base: String,
    /// File holding the Vast.ai API key for `--provider vastai` [default: $VASTAI_API_KEY].
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// A Secret for `spec.env[].valueFrom.secretKeyRef`: NAME is the Secret's name, FILE holds
    /// its keys as KEY=VALUE lines (as `kubectl create secret generic NAME --from-env-file=FILE`
    /// reads them). Repeatable. Values stay in memory; they are never written to the state file.
    #[arg(long = "secret", value_name = "NAME=FILE")]
    secrets: Vec<String>,
    /// Folder of the tool registry [default: config/tools].
    #[arg(long, env = "GPU_TRAINER_TOOLS_DIR", value_name = "DIR")]
    tools_dir: Option<PathBuf>,
    /// Largest final model brought back from the machine with `--provider ssh` and `vastai`, in
    /// GB (10^9 bytes) [default: 4 times the size the machine reports, at least 1 GiB]. The
    /// download stops at the limit.
    #[arg(long, value_name = "GB", value_parser = parse_gb)]
    max_download_gb: Option<f64>,
}

/// A positive number of GB.
fn parse_gb(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(gb) if gb.is_finite() && gb > 0.0 => Ok(gb),
        _ => Err(format!("{text:?} is not a positive number of GB")),
    }
}

/// GB (10^9 bytes) as bytes, saturating.
fn gb_to_bytes(gb: f64) -> u64 {
    (gb * 1e9).min(u64::MAX as f64) as u64
}

pub fn run(args: LaunchArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("failed to read {}", args.file.display()))?;
    let job: TrainingJob = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is not a valid TrainingJob", args.file.display()))?;
    let state_dir = state_dir(&args)?;
    let tools_dir = ToolRegistry::default_dir(args.tools_dir.as_deref());
    let machine = machine_spec(&args, &job, &state_dir)?;
    let secrets: std::sync::Arc<dyn Secrets> = std::sync::Arc::new(FileSecrets::load(&args.secrets)?);
    let name = job.metadata.name.clone().unwrap_or_default();
    let runtime = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
    let prepare = |job: TrainingJob| {
        runtime
            .block_on(LocalRun::prepare(
                job,
                &args.file,
                &state_dir,
                &tools_dir,
                machine.clone(),
                secrets.clone(),
            ))
            .with_context(|| format!("job {} cannot run", args.file.display()))
    };
    if args.restart {
        let state = state_dir.join(format!("{name}.json"));
        if state.exists() {
            // Forgetting a run must not forget a machine it still rents.
            let mut earlier = prepare(job.clone())?;
            if let Some(id) =
                runtime.block_on(earlier.release()).context("failed to release the earlier run's machine")?
            {
                println!("destroyed instance {id} of the earlier run");
            }
            std::fs::remove_file(&state).with_context(|| format!("failed to remove {}", state.display()))?;
        }
    }
    let mut run = prepare(job)?.with_max_download_bytes(args.max_download_gb.map(gb_to_bytes));

    if args.dry_run {
        return print_dry_run(&run, &machine, &runtime, args.provider);
    }

    if args.cancel {
        match (runtime.block_on(run.cancel())?, &machine) {
            (Some(id), _) => println!("cancelled {name}; the trainer is stopped and instance {id} destroyed"),
            (None, MachineSpec::Vastai(_)) => println!("cancelled {name}; no instance was rented"),
            (None, _) => println!("cancelled {name}; the trainer is stopped"),
        }
        return Ok(());
    }
    if run.state.status.phase.is_finished() {
        return already_finished(&mut run, &runtime);
    }

    let watch = args.watch || std::io::stderr().is_terminal();
    let bar = progress_bar(watch);
    let mut view = ProgressView { bar: &bar, watch, last_line: String::new(), last_message: String::new() };
    let mut observer = |update: Update<'_>| view.show(update);
    let poll_every = Duration::from_secs(1);
    let result = runtime.block_on(async {
        tokio::select! {
            result = run.run(poll_every, &mut observer) => Some(result),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    bar.finish_and_clear();
    match result {
        None => {
            report_interrupted(&args, &run);
            Ok(())
        }
        Some(result) => {
            let status = result?;
            report(&name, &run, &run.final_model_path());
            exit_for(&status)
        }
    }
}

/// The state dir (`--state-dir`, else `.gpu-trainer` next to the job file), made and absolute:
/// commands run with the work dir as their current directory.
fn state_dir(args: &LaunchArgs) -> anyhow::Result<PathBuf> {
    let dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| args.file.parent().unwrap_or(Path::new(".")).join(".gpu-trainer"));
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    dir.canonicalize().with_context(|| format!("failed to resolve {}", dir.display()))
}

/// A job that finished: its result again, and a machine a launcher stopped between the end of
/// the job and the release left behind is released.
fn already_finished(run: &mut LocalRun, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    if let Some(id) = runtime.block_on(run.release()).context("failed to release the machine")? {
        println!("destroyed instance {id}");
    }
    report(&run.name(), run, &run.final_model_path());
    println!("(already finished; `--restart` runs it again)");
    exit_for(&run.state.status)
}

/// A progress bar on a terminal, hidden otherwise (plain lines are printed instead).
fn progress_bar(watch: bool) -> ProgressBar {
    let bar = if watch { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:30} {pos}/{len} steps  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Where the job runs, from `--provider` and its flags.
fn machine_spec(args: &LaunchArgs, job: &TrainingJob, state_dir: &Path) -> anyhow::Result<MachineSpec> {
    Ok(match args.provider {
        Provider::Local => MachineSpec::Local,
        Provider::Ssh => {
            let Some(ssh) = job.spec.provider.ssh.clone() else {
                bail!(
                    "spec.provider.ssh: `--provider ssh` needs the machine's host, port and user in the job"
                );
            };
            let key_file = args.ssh_key.clone().context("--ssh-key is required with --provider ssh")?;
            let key =
                SshKey::from_file(&key_file).with_context(|| format!("--ssh-key {}", key_file.display()))?;
            MachineSpec::Ssh {
                target: SshTarget { host: ssh.host, port: ssh.port, user: ssh.user },
                key,
                remote_base: args.remote_base.clone(),
            }
        }
        Provider::Vastai => {
            let config = provider_config(args.api_key_file.as_deref())?;
            let client = VastClient::from_config(&config).context("failed to set up the Vast.ai client")?;
            let name = job.metadata.name.clone().unwrap_or_default();
            let key = job_key(state_dir, &name)?;
            MachineSpec::Vastai(Box::new(RentSpec::new(
                std::sync::Arc::new(client),
                config,
                key,
                args.remote_base.clone(),
            )))
        }
    })
}

/// `--dry-run`: what would run where, at what cost; nothing is rented.
fn print_dry_run(
    run: &LocalRun,
    machine: &MachineSpec,
    runtime: &tokio::runtime::Runtime,
    provider: Provider,
) -> anyhow::Result<()> {
    let name = run.name();
    let tool = run.tool();
    println!("job:       {name} ({})", tool.tool);
    match machine {
        MachineSpec::Vastai(rent_spec) => {
            let selection = runtime
                .block_on(rent::choose_offer(
                    &*rent_spec.provider,
                    &run.job().spec.resources,
                    &rent_spec.config,
                    &[],
                ))
                .context("no machine to rent")?;
            let offer = &selection.offer;
            let spec = &run.job().spec;
            let (ceiling, why) = rent::cost_ceiling(
                offer.price_per_hour,
                spec.active_deadline_seconds,
                spec.budget.as_ref().map(|b| b.max_total_cost),
            );
            println!("machine:   {}", crate::machine::offer::describe_offer(offer));
            println!(
                "           chosen from {} matching offers ({})",
                selection.candidates,
                rent::requirements_text(&crate::provider::select::Criteria::from_requirements(
                    &spec.resources,
                    &rent_spec.config,
                    &[]
                ))
            );
            println!("cost:      at most ${ceiling:.2} ({why}); billed per second while rented");
            println!(
                "image:     {}, disk {} GB",
                run.image(),
                spec.resources.disk_gb.unwrap_or(rent_spec.config.default_disk_gb)
            );
        }
        _ => println!("machine:   {provider:?} provider, $0.00/h, estimated cost $0.00"),
    }
    println!("work dir:  {}", run.layout().work_dir());
    println!("params:    {}", serde_json::to_string(&tool.params)?);
    for (i, cmd) in tool.bootstrap.iter().enumerate() {
        println!("bootstrap {}: {cmd}", i + 1);
    }
    println!("run:       {}", tool.run);
    println!("model:     {}", run.final_model_path());
    if matches!(machine, MachineSpec::Vastai(_)) {
        println!("nothing was rented (--dry-run)");
    }
    Ok(())
}

/// The terminal's view of a run: a progress bar (or plain lines when not on a terminal), and
/// each change of what the run is doing.
struct ProgressView<'b> {
    bar: &'b ProgressBar,
    watch: bool,
    last_line: String,
    last_message: String,
}

impl ProgressView<'_> {
    fn show(&mut self, update: Update<'_>) {
        let (status, polled): (&TrainingJobStatus, Option<&TrainingStatus>) = match update {
            Update::Note(note) => {
                self.bar.suspend(|| eprintln!("{note}"));
                return;
            }
            Update::Step(status) => {
                // What the run is doing (renting, booting, staging...), once per change.
                let message = status.message.clone().unwrap_or_default();
                if !message.is_empty() && message != self.last_message {
                    self.bar.suspend(|| eprintln!("{:?}: {message}", status.phase));
                    self.last_message = message;
                }
                (status, None)
            }
            Update::Polled(status, polled) => (status, Some(polled)),
        };
        let Some(progress) = &status.progress else { return };
        if let Some(total) = progress.total_steps {
            self.bar.set_length(total);
        }
        self.bar.set_position(progress.step);
        let cost = status.cost.as_ref().map(|c| c.accrued).unwrap_or_default();
        let mut msg = String::new();
        if let Some(loss) = progress.loss {
            msg.push_str(&format!("loss {loss:.4}  "));
        }
        if let Some(rate) = progress.steps_per_second {
            msg.push_str(&format!("{rate:.2} it/s  "));
        }
        if let Some(eta) = progress.eta_seconds {
            msg.push_str(&format!("ETA {}  ", fmt_duration(eta)));
        }
        msg.push_str(&format!("${cost:.2}"));
        if let Some(stall) = polled.map(|p| &p.stall).filter(|s| s.stalling) {
            msg.push_str(&format!("  stall: {}", stall.reason));
        }
        self.bar.set_message(msg.clone());
        if !self.watch && progress.total_steps.is_some() {
            let line = format!("step {}/{} {msg}", progress.step, progress.total_steps.unwrap_or(0));
            if line != self.last_line {
                eprintln!("{line}");
                self.last_line = line;
            }
        }
    }
}

/// Ctrl-C: the trainer keeps running; says how to continue or stop, and what still bills.
fn report_interrupted(args: &LaunchArgs, run: &LocalRun) {
    let again = match args.provider {
        Provider::Vastai => format!("gpu-trainer launch {} --provider vastai", args.file.display()),
        _ => format!("gpu-trainer launch {}", args.file.display()),
    };
    match (run.holds_machine(), run.rented_instance()) {
        (true, Some(id)) => {
            let price = run.state.status.instance.as_ref().and_then(|i| i.price_per_hour).unwrap_or(0.0);
            println!(
                "interrupted; the trainer keeps running and instance {id} stays rented (${price:.3}/h). \
                 `{again}` continues, `{again} --cancel` stops it and destroys the instance"
            );
        }
        (true, None) => println!(
            "interrupted while renting; `{again}` finds the instance by its label, `{again} --cancel` destroys it"
        ),
        _ => println!("interrupted; the trainer keeps running. `{again}` continues, `--cancel` stops it"),
    }
}

/// The provider settings, with the API key from `--api-key-file` or `VASTAI_API_KEY`.
fn provider_config(key_file: Option<&Path>) -> anyhow::Result<ProviderConfig> {
    let file_key = match key_file {
        Some(path) => {
            let key = std::fs::read_to_string(path)
                .with_context(|| format!("failed to read the Vast.ai API key file {}", path.display()))?;
            let key = key.trim().to_string();
            if key.is_empty() {
                bail!("--api-key-file {} is empty", path.display());
            }
            Some(key)
        }
        None => None,
    };
    ProviderConfig::from_lookup(|name| {
        if name == ENV_API_KEY && file_key.is_some() {
            return file_key.clone();
        }
        std::env::var(name).ok()
    })
    .map_err(|err| match err {
        crate::provider::config::ConfigError::MissingApiKey => anyhow::anyhow!(
            "--provider vastai needs a Vast.ai API key: set {ENV_API_KEY} or pass --api-key-file FILE"
        ),
        other => anyhow::Error::new(other),
    })
}

/// The job's SSH key (`<state dir>/<job>.ssh-key`, owner-only), made on first use. Its public
/// half is attached to every machine rented for the job; the private half never leaves the file.
fn job_key(state_dir: &Path, name: &str) -> anyhow::Result<SshKey> {
    let path = state_dir.join(format!("{name}.ssh-key"));
    if !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let (private, _public) = crate::machine::key::generate_key(&format!("gpu-trainer:{name}"))
            .context("failed to make the job's SSH key")?;
        let tmp = path.with_extension("ssh-key.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("failed to write {}", tmp.display()))?;
        file.write_all(private.as_bytes()).with_context(|| format!("failed to write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("failed to write {}", path.display()))?;
    }
    SshKey::from_file(&path).with_context(|| format!("the job's SSH key {}", path.display()))
}

fn report(name: &str, run: &LocalRun, model: &str) {
    let status = &run.state.status;
    if let (Some(id), false) = (run.rented_instance(), run.holds_machine()) {
        let cost = status.cost.as_ref().map(|c| c.accrued).unwrap_or_default();
        println!("instance {id} destroyed; the job cost ${cost:.2}");
    }
    let phase = status.phase;
    let reason = status.reason.map(|r| r.as_str()).unwrap_or("");
    let message = status.message.clone().unwrap_or_default();
    println!("{name}: {phase:?} ({reason}) {message}");
    if phase == TrainingJobPhase::Succeeded {
        if let Some(model) = status.artifacts.iter().find(|a| a.name == "model") {
            println!("model: {}", model.uri.trim_start_matches("file://"));
            println!("  {} bytes, sha256 {}", model.size_bytes, model.sha256.clone().unwrap_or_default());
        } else {
            println!("model: {model}");
        }
    }
}

fn exit_for(status: &TrainingJobStatus) -> anyhow::Result<()> {
    if status.phase == TrainingJobPhase::Failed {
        bail!("the job failed: {}", status.message.clone().unwrap_or_default());
    }
    Ok(())
}

fn fmt_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn max_download_gb_takes_positive_gb_only() {
        assert_eq!(gb_to_bytes(parse_gb("1.5").unwrap()), 1_500_000_000);
        assert_eq!(gb_to_bytes(parse_gb("1e30").unwrap()), u64::MAX);
        for bad in ["0", "-1", "NaN", "inf", "ten"] {
            assert!(parse_gb(bad).is_err(), "{bad}");
        }
        let parsed =
            crate::cli::Cli::try_parse_from(["gpu-trainer", "launch", "job.yaml", "--max-download-gb", "20"]);
        assert!(parsed.is_ok(), "{parsed:?}");
        let refused =
            crate::cli::Cli::try_parse_from(["gpu-trainer", "launch", "job.yaml", "--max-download-gb", "0"]);
        assert!(refused.is_err());
    }
}
