//! Staging: the machine downloads and verifies the dataset itself (the operator never proxies
//! dataset bytes), then the tool's files are installed and its bootstrap and health check run.
//! Every part is idempotent: a dataset whose checksum marker matches is not fetched again, and
//! files with the same content are not sent again.

use std::time::Duration;

use super::Error;
use crate::api::{Reason, TrainingJobSpec};
use crate::remote::dataset::{self, DatasetError};
use crate::remote::launch::RemoteLayout;
use crate::remote::tool::{RenderedTool, ToolError};
use crate::remote::{RemoteExec, RunOptions};

/// Why staging cannot succeed on any retry: the job fails with this reason and message.
pub type Permanent = (Reason, String);

/// Stages dataset and recipe. `Ok(Ok(message))` when done; `Ok(Err(..))` when the job must
/// fail; `Err` for trouble worth retrying (the connection dropped).
pub async fn stage(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    spec: &TrainingJobSpec,
    tool: &RenderedTool,
) -> Result<Result<String, Permanent>, Error> {
    let dataset_message = if let Some(url) = &spec.dataset.url {
        match dataset::stage_url(exec, layout, &url.href, url.sha256.as_deref()).await {
            Ok(report) => format!(
                "dataset from {} (sha256 {}{})",
                redact_query(&url.href),
                report.sha256.get(..12).unwrap_or(&report.sha256),
                if report.already_staged { ", already on the machine" } else { "" }
            ),
            Err(DatasetError::ChecksumMismatch { expected, actual }) => {
                return Ok(Err((
                    Reason::ChecksumMismatch,
                    format!("spec.dataset.url.sha256 is {expected} but the archive's is {actual}"),
                )));
            }
            Err(DatasetError::Stage(message)) => {
                return Ok(Err((
                    Reason::StagingFailed,
                    format!("downloading the dataset failed: {message}"),
                )));
            }
            Err(err) => return Err(err.into()),
        }
    } else {
        // S3 datasets need presigned URLs from the artifacts module, which is not wired in yet.
        return Ok(Err((
            Reason::StagingFailed,
            "spec.dataset.s3 is not supported by this build yet; use spec.dataset.url".into(),
        )));
    };
    let installed = async {
        tool.install_files(exec, layout).await?;
        tool.bootstrap(exec, layout, &[], Duration::from_secs(1800)).await
    };
    match installed.await {
        Ok(()) => Ok(Ok(format!("{dataset_message}; {} installed and checked", tool.tool))),
        Err(ToolError::StepFailed { what, exit_code, stderr, .. }) => Ok(Err((
            Reason::StagingFailed,
            format!("{what} of {} failed with exit code {exit_code:?}: {stderr}", tool.tool),
        ))),
        Err(ToolError::Remote(err)) => Err(Error::Remote(err)),
        Err(err) => Err(err.into()),
    }
}

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

/// The URL without its query, which may be a presigned credential.
fn redact_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

impl From<DatasetError> for Error {
    fn from(err: DatasetError) -> Self {
        match err {
            DatasetError::Remote(remote) => Error::Remote(remote),
            other => Error::Dataset(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presigned_queries_stay_out_of_messages() {
        assert_eq!(redact_query("https://s3/b/k.tar?X-Amz-Signature=abc"), "https://s3/b/k.tar");
        assert_eq!(redact_query("http://h/d.tar"), "http://h/d.tar");
    }
}
