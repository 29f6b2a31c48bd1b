//! The controller's part of staging: the work dir is claimed for the GpuInstance that stages it
//! (the staging itself is [`crate::engine::stage`], shared with `gpu-trainer launch`).

use super::Error;
use crate::remote::RemoteExec;
use crate::remote::RunOptions;
use crate::remote::launch::RemoteLayout;

/// Name of the file in the work dir naming the GpuInstance that staged it.
pub const MACHINE_MARKER: &str = crate::remote::launch::MACHINE_FILE;

/// Makes the work dir this GpuInstance's: a run recorded there by another machine's attempt
/// (the same disk reused, or a test whose machines share one) is forgotten, so the trainer
/// starts on this machine. A dir already claimed by this instance is left alone, so a trainer
/// started here is never started twice.
pub async fn claim_work_dir(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    instance: &str,
) -> Result<(), Error> {
    let marker = crate::remote::shell_quote(&layout.join(MACHINE_MARKER))?;
    let out = exec.run(&format!("cat {marker} 2>/dev/null || true"), RunOptions::default()).await?;
    out.require_complete("reading the machine marker")?;
    if out.stdout_lossy().trim() == instance {
        return Ok(());
    }
    crate::remote::launch::reset(exec, layout).await?;
    let wd = crate::remote::shell_quote(layout.work_dir())?;
    let name = crate::remote::shell_quote(instance)?;
    let out = exec.run(&format!("mkdir -p {wd} && echo {name} > {marker}"), RunOptions::default()).await?;
    if !out.success() {
        let detail = out.stderr_lossy().trim().to_string();
        return Err(Error::Remote(crate::remote::RemoteError::io("write the machine marker", detail)));
    }
    Ok(())
}
