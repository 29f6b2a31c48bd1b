//! `gpu-trainer sweep`: one sweeper pass from the command line, with a table of what it found
//! and did. A dry run unless `--force`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use super::operator::{OperatorArgs, start};
use crate::controller::sweeper::plan::{SweepAction, SweepRules};
use crate::controller::sweeper::{SweeperConfig, sweep_once};
use crate::metrics::Metrics;

/// Find instances of this installation that no GpuInstance accounts for.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  gpu-trainer sweep                 # report only\n  \
    gpu-trainer sweep --force         # destroy orphans older than the grace period\n  \
    gpu-trainer sweep --all --force   # destroy every instance of this installation")]
pub struct SweepArgs {
    #[command(flatten)]
    operator: OperatorArgs,
    /// Act: destroy orphans and delete expired GpuInstances. Without it nothing is changed.
    #[arg(long)]
    force: bool,
    /// Consider every instance of this installation an orphan (e.g. before uninstalling).
    #[arg(long)]
    all: bool,
    /// Instances younger than this many seconds are left alone.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    grace_seconds: u64,
}

pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("failed to start the async runtime")?;
    runtime.block_on(async move {
        let operator = start(&args.operator, std::sync::Arc::new(Metrics::new())).await?;
        let ctx = operator.ctx;
        let rules = SweepRules {
            installation_id: ctx.config.installation_id.clone(),
            grace: Duration::from_secs(args.grace_seconds),
            everything: args.all,
            // A person asked for this pass, so one sighting is enough.
            single_pass: true,
        };
        let config = SweeperConfig { dry_run: !args.force, ..SweeperConfig::default() };
        let report = sweep_once(&ctx, &rules, &config, &BTreeMap::new()).await.context("the sweep failed")?;
        println!(
            "installation {}: {} instance(s) of this installation at the provider{}",
            ctx.config.installation_id,
            report.plan.considered,
            if args.force { "" } else { " (dry run: nothing changed; --force to act)" }
        );
        if report.outcomes.is_empty() {
            println!("nothing to do");
            return Ok(());
        }
        println!("{:<22} {:<40} {:<26} WHY", "ACTION", "TARGET", "OUTCOME");
        for (action, outcome) in &report.outcomes {
            let (kind, target, why) = match action {
                SweepAction::Suspect { id, label, why } => ("orphan (young)", format!("{id} {label}"), why),
                SweepAction::Destroy { id, label, why } => ("destroy instance", format!("{id} {label}"), why),
                SweepAction::DeleteGpuInstance { namespace, name, why } => {
                    ("delete gpuinstance", format!("{namespace}/{name}"), why)
                }
            };
            println!("{kind:<22} {target:<40} {outcome:<26} {why}");
        }
        Ok(())
    })
}
