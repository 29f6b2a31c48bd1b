//! Staging, once for both front ends: the machine downloads and verifies the dataset itself
//! (nobody proxies dataset bytes; an `s3` dataset comes through a short-lived presigned GET made
//! here, which reaches the machine only in the download command's environment and is never
//! logged; a `local` folder, for `gpu-trainer launch`, is packed and sent), then the tool's
//! files are installed and its bootstrap and health check run. Every part is idempotent: a
//! dataset whose checksum marker matches is not fetched again, and files with the same content
//! are not sent again.

use std::path::Path;
use std::time::Duration;

use super::env::Secrets;
use super::outcome::{Failure, StepError};
use crate::api::{Reason, S3Dataset, TrainingJobSpec};
use crate::artifacts::S3Settings;
use crate::artifacts::dataset::{self, DatasetConnection};
use crate::artifacts::s3::S3Store;
use crate::error::error_chain;
use crate::remote::RemoteExec;
use crate::remote::dataset::{self as remote_dataset, DatasetError};
use crate::remote::launch::RemoteLayout;
use crate::remote::tool::{RenderedTool, ToolError};

/// Longest a tool's bootstrap and health check may take.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(1800);

/// Where a `spec.dataset.local` folder is (relative to the job file's folder) and where it is
/// packed before it is sent. Only `gpu-trainer launch` has one.
#[derive(Clone, Copy, Debug)]
pub struct LocalFolders<'a> {
    pub job_dir: &'a Path,
    pub archive: &'a Path,
}

/// What staging needs.
pub struct StageInput<'a> {
    pub exec: &'a dyn RemoteExec,
    pub layout: &'a RemoteLayout,
    pub spec: &'a TrainingJobSpec,
    pub tool: &'a RenderedTool,
    /// Read for the storage credentials of an `s3` dataset.
    pub secrets: &'a dyn Secrets,
    pub local: Option<LocalFolders<'a>>,
}

/// Stages dataset and recipe; returns the message for the `DataStaged` condition.
pub async fn stage(input: &StageInput<'_>) -> Result<String, StepError> {
    let dataset_message = stage_dataset(input).await?;
    let tool = input.tool;
    let installed = async {
        tool.install_files(input.exec, input.layout).await?;
        tool.bootstrap(input.exec, input.layout, &[], BOOTSTRAP_TIMEOUT).await
    };
    match installed.await {
        Ok(()) => Ok(format!("{dataset_message}; {} installed and checked", tool.tool)),
        Err(ToolError::StepFailed { what, exit_code, stderr, .. }) => Err(Failure::new(
            Reason::StagingFailed,
            format!("{what} of {} failed with exit code {exit_code:?}: {stderr}", tool.tool),
        )
        .into()),
        Err(err) => Err(err.into()),
    }
}

/// Has the machine download (or receive), verify and unpack the dataset.
async fn stage_dataset(input: &StageInput<'_>) -> Result<String, StepError> {
    let spec = input.spec;
    if let Some(local) = &spec.dataset.local {
        let Some(folders) = input.local else {
            return Err(Failure::new(
                Reason::InvalidSpec,
                "spec.dataset: set `url` or `s3` (`local` is for `gpu-trainer launch`)",
            )
            .into());
        };
        let folder = folders.job_dir.join(&local.path);
        if !folder.is_dir() {
            let message = format!("spec.dataset.local.path: {} is not a folder", folder.display());
            return Err(Failure::new(Reason::InvalidSpec, message).into());
        }
        let packed = remote_dataset::pack(&folder, folders.archive)?;
        let staged =
            remote_dataset::stage_archive(input.exec, input.layout, folders.archive, &packed.sha256).await?;
        return Ok(format!(
            "dataset {} ({} files, sha256 {})",
            folder.display(),
            packed.files,
            short(&staged.sha256)
        ));
    }
    let (url, sha256, field, shown) = if let Some(url) = &spec.dataset.url {
        (url.href.clone(), url.sha256.clone(), "spec.dataset.url.sha256", redact_query(&url.href).to_string())
    } else if let Some(s3) = &spec.dataset.s3 {
        let presigned = presign_s3_dataset(spec, s3, input.secrets).await?;
        (presigned, s3.sha256.clone(), "spec.dataset.s3.sha256", dataset::dataset_uri(s3))
    } else {
        return Err(Failure::new(Reason::InvalidSpec, "spec.dataset: set `url`, `s3` or `local`").into());
    };
    match remote_dataset::stage_url(input.exec, input.layout, &url, sha256.as_deref()).await {
        Ok(report) => Ok(format!(
            "dataset from {shown} (sha256 {}{})",
            short(&report.sha256),
            if report.already_staged { ", already on the machine" } else { "" }
        )),
        Err(DatasetError::ChecksumMismatch { expected, actual }) => Err(Failure::new(
            Reason::ChecksumMismatch,
            format!("{field} is {expected} but the archive's is {actual}"),
        )
        .into()),
        Err(DatasetError::Stage(message)) => Err(Failure::new(
            Reason::StagingFailed,
            format!("downloading the dataset {shown} failed: {message}"),
        )
        .into()),
        Err(err) => Err(err.into()),
    }
}

/// The storage settings that read `spec.dataset.s3`, with the connection
/// [`dataset::choose_connection`] picks: the output's (its credentials Secret read through
/// `secrets`) or the operator's own (this process's environment). Checked by `launch` before
/// anything is rented.
pub async fn s3_dataset_settings(
    spec: &TrainingJobSpec,
    s3: &S3Dataset,
    secrets: &dyn Secrets,
) -> Result<S3Settings, StepError> {
    let operator = S3Settings::from_env().ok();
    let output = spec.output.as_ref().and_then(|o| o.s3.as_ref());
    let connection = dataset::choose_connection(s3, output, operator.is_some());
    let secret_data = match (connection, output.and_then(|o| o.credentials_secret_ref.as_ref())) {
        (Some(DatasetConnection::Output), Some(secret_ref)) => {
            match secrets.secret(&secret_ref.name).await? {
                Some(data) => Some(data),
                None => {
                    return Err(Failure::new(
                        Reason::SecretNotFound,
                        format!(
                            "spec.dataset.s3 is read with spec.output.s3.credentialsSecretRef: {}",
                            secrets.missing_secret(&secret_ref.name)
                        ),
                    )
                    .into());
                }
            }
        }
        _ => None,
    };
    dataset::dataset_settings(s3, output, secret_data.as_ref(), operator.as_ref()).map_err(|err| {
        Failure::new(Reason::StagingFailed, format!("spec.dataset.s3: {}", error_chain(&err))).into()
    })
}

/// A presigned GET of `spec.dataset.s3`. The URL is a credential for its lifetime: it goes only
/// into the download command's environment, never into a message.
async fn presign_s3_dataset(
    spec: &TrainingJobSpec,
    s3: &S3Dataset,
    secrets: &dyn Secrets,
) -> Result<String, StepError> {
    let settings = s3_dataset_settings(spec, s3, secrets).await?;
    // Presigning makes no request: the machine, on its own network, is what connects to the
    // endpoint. So the operator's address policy (for its own connections) does not apply here.
    match dataset::presign(&S3Store::new(&settings), s3).await {
        Ok(presigned) => Ok(presigned.url),
        Err(err) => Err(Failure::new(
            Reason::StagingFailed,
            format!(
                "spec.dataset.s3: cannot presign a download of {}: {}",
                dataset::dataset_uri(s3),
                error_chain(&err)
            ),
        )
        .into()),
    }
}

/// The first 12 characters of a checksum, for messages.
fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// The URL without its query, which may be a presigned credential.
fn redact_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// Makes the work dir this machine's: a run recorded there by another machine's attempt (the
/// same disk reused, or a test whose machines share one) is forgotten, so the trainer starts on
/// this machine. A dir already claimed by this machine is left alone, so a trainer started here
/// is never started twice.
pub async fn claim_work_dir(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    machine: &str,
) -> Result<(), StepError> {
    use crate::remote::{RemoteError, RunOptions, shell_quote};
    let marker = shell_quote(&layout.join(crate::remote::launch::MACHINE_FILE))?;
    let out = exec.run(&format!("cat {marker} 2>/dev/null || true"), RunOptions::default()).await?;
    out.require_complete("reading the machine marker")?;
    if out.stdout_lossy().trim() == machine {
        return Ok(());
    }
    crate::remote::launch::reset(exec, layout).await?;
    let wd = shell_quote(layout.work_dir())?;
    let name = shell_quote(machine)?;
    let out = exec.run(&format!("mkdir -p {wd} && echo {name} > {marker}"), RunOptions::default()).await?;
    if !out.success() {
        let detail = out.stderr_lossy().trim().to_string();
        return Err(RemoteError::io("write the machine marker", detail).into());
    }
    Ok(())
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
