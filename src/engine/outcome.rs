//! One typed outcome for a step of a job that failed for good, shared by both front ends: the
//! job ends `Failed` with this reason and message (printed once, where the front end reports
//! it). Everything else a step returns as an error is worth another try.

use crate::api::Reason;
use crate::engine::env::SecretReadError;
use crate::remote::RemoteError;
use crate::remote::dataset::DatasetError;
use crate::remote::tool::ToolError;

/// Why a step cannot succeed on any retry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub reason: Reason,
    pub message: String,
}

impl Failure {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

/// What a shared step returns when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The job fails with this reason and message.
    #[error(transparent)]
    Failed(#[from] Failure),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Tool(ToolError),
    #[error(transparent)]
    Dataset(DatasetError),
    #[error(transparent)]
    Secret(#[from] SecretReadError),
    // Boxed: the monitor's error is large and every `Result` here would carry its size.
    #[error(transparent)]
    Monitor(#[from] Box<crate::monitor::poller::MonitorError>),
}

impl From<ToolError> for StepError {
    fn from(err: ToolError) -> Self {
        match err {
            ToolError::Remote(remote) => StepError::Remote(remote),
            other => StepError::Tool(other),
        }
    }
}

impl From<DatasetError> for StepError {
    fn from(err: DatasetError) -> Self {
        match err {
            DatasetError::Remote(remote) => StepError::Remote(remote),
            other => StepError::Dataset(other),
        }
    }
}
