//! Artifacts: getting results off the rented machine without ever putting a storage credential
//! on it, and proving they arrived before the GPU is released.
//!
//! - `settings`: S3/R2 connection settings and credentials (from a Secret or the environment).
//! - `store`: the narrow [`ObjectStore`] trait (presign, multipart create/list/complete, HEAD);
//!   `s3` implements it with aws-sdk-s3, `fake` in memory for tests.
//! - `plan` (pure): object keys, single PUT or multipart, expected multipart ETags.
//! - `script` (pure): the POSIX sh upload step run on the machine (curl to presigned URLs,
//!   size, SHA-256 and MD5 computed there) and the parser of its report.
//! - `upload`: inspect → plan → presign → run → complete → verify, returning `ArtifactStatus`.
//! - `verify` (pure): a HEAD response against what the machine reported.
//! - `dataset`: which storage connection reads `spec.dataset.s3`, and its presigned GET.
//! - `checkpoints`: which checkpoints are ready to sync while training, and syncing them.
//! - `download`: presigned GETs back onto a machine (a synced checkpoint for a new machine).
//! - `huggingface`: `hf upload` with the token only in that command's environment.
//! - `model_card`: README.md for the model, marking a run stopped early as incomplete.
//! - `notify`: webhook notifications, best effort.
//! - `address` (pure): which addresses a job's URLs (webhook, S3 endpoint) may reach;
//!   `endpoint` applies it to URLs and to the S3 client's DNS answers.
//! - `pages`: S3 listings followed page by page, with a limit.
//!
//! Order matters (reference/anchors.md, "verify upload before destroy"): the job engine reports
//! an artifact and releases the GPU only after [`Uploader::upload`] returned it verified.
//!
//! Presigned URLs reach the machine only through the environment of the upload command (never
//! its text or a command line), and every type holding one redacts the signature in `Debug`.

pub mod address;
pub mod checkpoints;
pub mod dataset;
pub mod download;
pub mod endpoint;
pub mod huggingface;
pub mod model_card;
pub mod notify;
pub mod pages;
pub mod plan;
pub mod s3;
pub mod script;
pub mod settings;
pub mod store;
pub mod upload;
pub mod verify;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod garage_tests;
#[cfg(test)]
mod recording;

pub use settings::{S3Credentials, S3Settings};
pub use store::{ObjectHead, ObjectRef, ObjectStore, PartInfo, PresignedRequest};
pub use upload::{UploadItem, UploadSettings, Uploader};

use crate::remote::RemoteError;

/// Errors of the artifact module.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("invalid S3 settings: {0}")]
    Settings(String),
    #[error("failed to presign {operation} for {uri}")]
    Presign {
        operation: &'static str,
        uri: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to {operation} {uri}")]
    Storage {
        operation: &'static str,
        uri: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to run the {step} step on the machine")]
    Remote {
        step: &'static str,
        #[source]
        source: RemoteError,
    },
    #[error("the {step} step failed on the machine (exit {exit_code:?}): {message}")]
    StepFailed { step: &'static str, exit_code: Option<i32>, message: String },
    #[error("{path} does not exist on the machine")]
    Missing { path: String },
    #[error("unexpected output from the {step} step: {message}")]
    Report { step: &'static str, message: String },
    #[error("verification of {uri} failed: {message}")]
    Verification { uri: String, message: String },
    #[error("invalid artifact request: {0}")]
    Invalid(String),
    /// The storage endpoint is refused by the operator's address policy.
    #[error(transparent)]
    Endpoint(#[from] endpoint::EndpointError),
}

impl ArtifactError {
    pub(crate) fn remote(step: &'static str, source: RemoteError) -> Self {
        ArtifactError::Remote { step, source }
    }

    /// Short category for metric labels and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            ArtifactError::Settings(_) | ArtifactError::Invalid(_) | ArtifactError::Endpoint(_) => "invalid",
            ArtifactError::Presign { .. } => "presign",
            ArtifactError::Storage { .. } => "storage",
            ArtifactError::Remote { .. } | ArtifactError::StepFailed { .. } => "remote",
            ArtifactError::Missing { .. } => "missing",
            ArtifactError::Report { .. } => "report",
            ArtifactError::Verification { .. } => "verification",
        }
    }
}

/// Removes the query (which carries the signature) from a URL for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?<redacted>"),
        None => url.to_string(),
    }
}
