//! Staging: the machine downloads and verifies the dataset itself (the operator never proxies
//! dataset bytes; an `s3` dataset comes through a short-lived presigned GET made here, which
//! reaches the machine only in the download command's environment and is never logged), then
//! the tool's files are installed and its bootstrap and health check run.
//! Every part is idempotent: a dataset whose checksum marker matches is not fetched again, and
//! files with the same content are not sent again.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use super::{Error, kube_err};
use crate::api::{Reason, S3Dataset, TrainingJobSpec};
use crate::artifacts::S3Settings;
use crate::artifacts::dataset::{self, DatasetConnection};
use crate::artifacts::s3::S3Store;
use crate::artifacts::settings::secret_bytes;
use crate::controller::gpuinstance::error_chain;
use crate::remote::dataset::{self as remote_dataset, DatasetError};
use crate::remote::launch::RemoteLayout;
use crate::remote::tool::{RenderedTool, ToolError};
use crate::remote::{RemoteExec, RunOptions};

/// Why staging cannot succeed on any retry: the job fails with this reason and message.
pub type Permanent = (Reason, String);

/// Stages dataset and recipe. `Ok(Ok(message))` when done; `Ok(Err(..))` when the job must
/// fail; `Err` for trouble worth retrying (the connection dropped). `secrets` is read for the
/// storage credentials of an `s3` dataset.
pub async fn stage(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    spec: &TrainingJobSpec,
    tool: &RenderedTool,
    secrets: &Api<Secret>,
) -> Result<Result<String, Permanent>, Error> {
    let dataset_message = match stage_dataset(exec, layout, spec, secrets).await? {
        Ok(message) => message,
        Err(permanent) => return Ok(Err(permanent)),
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

/// Has the machine download, verify and unpack the dataset (`url`, or `s3` through a presigned
/// GET made here). Returns the message for the `DataStaged` condition.
async fn stage_dataset(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    spec: &TrainingJobSpec,
    secrets: &Api<Secret>,
) -> Result<Result<String, Permanent>, Error> {
    let (url, sha256, field, shown) = if let Some(url) = &spec.dataset.url {
        (url.href.clone(), url.sha256.clone(), "spec.dataset.url.sha256", redact_query(&url.href).to_string())
    } else if let Some(s3) = &spec.dataset.s3 {
        let presigned = match presign_s3_dataset(spec, s3, secrets).await? {
            Ok(presigned) => presigned,
            Err(permanent) => return Ok(Err(permanent)),
        };
        (presigned, s3.sha256.clone(), "spec.dataset.s3.sha256", dataset::dataset_uri(s3))
    } else {
        return Ok(Err((
            Reason::InvalidSpec,
            "spec.dataset: set `url` or `s3` (`local` is for `gpu-trainer launch`)".into(),
        )));
    };
    match remote_dataset::stage_url(exec, layout, &url, sha256.as_deref()).await {
        Ok(report) => Ok(Ok(format!(
            "dataset from {shown} (sha256 {}{})",
            report.sha256.get(..12).unwrap_or(&report.sha256),
            if report.already_staged { ", already on the machine" } else { "" }
        ))),
        Err(DatasetError::ChecksumMismatch { expected, actual }) => Ok(Err((
            Reason::ChecksumMismatch,
            format!("{field} is {expected} but the archive's is {actual}"),
        ))),
        Err(DatasetError::Stage(message)) => {
            Ok(Err((Reason::StagingFailed, format!("downloading the dataset {shown} failed: {message}"))))
        }
        Err(err) => Err(err.into()),
    }
}

/// A presigned GET of `spec.dataset.s3` with the connection [`dataset::choose_connection`]
/// picks, or why there is none. The URL is a credential for its lifetime: it goes only into the
/// download command's environment, never into a message.
async fn presign_s3_dataset(
    spec: &TrainingJobSpec,
    s3: &S3Dataset,
    secrets: &Api<Secret>,
) -> Result<Result<String, Permanent>, Error> {
    let operator = S3Settings::from_env().ok();
    let output = spec.output.as_ref().and_then(|o| o.s3.as_ref());
    let connection = dataset::choose_connection(s3, output, operator.is_some());
    let secret_data = match (connection, output.and_then(|o| o.credentials_secret_ref.as_ref())) {
        (Some(DatasetConnection::Output), Some(secret_ref)) => {
            match secrets
                .get_opt(&secret_ref.name)
                .await
                .map_err(kube_err("read the S3 credentials Secret"))?
            {
                Some(secret) => Some(secret_bytes(&secret)),
                None => {
                    return Ok(Err((
                        Reason::SecretNotFound,
                        format!(
                            "spec.dataset.s3 is read with spec.output.s3.credentialsSecretRef, and Secret {} does not exist",
                            secret_ref.name
                        ),
                    )));
                }
            }
        }
        _ => None,
    };
    let settings = match dataset::dataset_settings(s3, output, secret_data.as_ref(), operator.as_ref()) {
        Ok(settings) => settings,
        Err(err) => {
            return Ok(Err((Reason::StagingFailed, format!("spec.dataset.s3: {}", error_chain(&err)))));
        }
    };
    // Presigning makes no request: the machine, on its own network, is what connects to the
    // endpoint. So the operator's address policy (for its own connections) does not apply here.
    match dataset::presign(&S3Store::new(&settings), s3).await {
        Ok(presigned) => Ok(Ok(presigned.url)),
        Err(err) => Ok(Err((
            Reason::StagingFailed,
            format!(
                "spec.dataset.s3: cannot presign a download of {}: {}",
                dataset::dataset_uri(s3),
                error_chain(&err)
            ),
        ))),
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
