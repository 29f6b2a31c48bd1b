//! The one reason enum shared by `status.reason`, condition reasons, event reasons and metric
//! labels. A closed set keeps metric label cardinality bounded and lets users alert on exact
//! values.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

macro_rules! reasons {
    ($( $(#[$doc:meta])* $name:ident ),+ $(,)?) => {
        /// Why a resource is in its current state. Serialised in PascalCase.
        #[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
        pub enum Reason {
            $( $(#[$doc])* $name, )+
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name),+];

            /// The PascalCase string used in conditions, events and metric labels.
            pub fn as_str(self) -> &'static str {
                match self { $(Reason::$name => stringify!($name),)+ }
            }
        }
    };
}

reasons! {
    /// Accepted, waiting for the controller to act.
    Pending,
    /// The spec breaks a rule the API server cannot check; the message names the field.
    InvalidSpec,
    /// A referenced Secret or key does not exist.
    SecretNotFound,
    /// A marketplace offer was chosen.
    OfferSelected,
    /// No marketplace offer matches the requirements; the message lists why offers were rejected.
    NoOffers,
    /// The chosen offer was taken by someone else before the rent call.
    OfferUnavailable,
    /// The provider refused the API key.
    Unauthorized,
    /// The provider keeps failing; the operator is retrying.
    ProviderError,
    /// The rent call is in progress or its result is being confirmed.
    Launching,
    /// The machine was rented.
    Launched,
    /// The machine is starting its container.
    Booting,
    /// The machine did not become reachable within the boot deadline.
    BootTimeout,
    /// The machine failed to start (exited, offline, unknown, or the container failed to create).
    BootFailed,
    /// SSH answers on the machine.
    Reachable,
    /// SSH does not answer.
    SshUnreachable,
    /// The machine's SSH host key changed since first contact.
    HostKeyChanged,
    /// The machine stopped answering: a connection or command on it passed its deadline.
    MachineUnresponsive,
    /// The machine answered outside the limits: too much output, a line without end, invalid
    /// or too many file names, more data than allowed.
    MachineMisbehaved,
    /// The machine is ready for work.
    Ready,
    /// The machine was outbid or interrupted by its host.
    Outbid,
    /// The provider no longer lists a machine that should be running.
    InstanceLost,
    /// Dataset and training recipe are being copied to the machine.
    Staging,
    /// Dataset and training recipe are on the machine and verified.
    Staged,
    /// Staging failed.
    StagingFailed,
    /// The dataset's SHA-256 does not match the one in the spec.
    ChecksumMismatch,
    /// Training is running.
    Training,
    /// Training made no progress or stopped converging towards its end.
    Stalled,
    /// A stall cleared up during the grace period.
    Recovered,
    /// The trainer ran out of GPU memory.
    OutOfMemory,
    /// The trainer exited with an error.
    TrainingFailed,
    /// The trainer needs a model it may not download (gated model, missing or wrong token).
    ModelAccessDenied,
    /// The machine's disk is full.
    DiskFull,
    /// Artifacts are being uploaded.
    Uploading,
    /// Artifacts are uploaded and verified.
    Uploaded,
    /// An upload failed or could not be verified.
    UploadFailed,
    /// The soft deadline passed; the job keeps running.
    SoftDeadlineExceeded,
    /// `activeDeadlineSeconds` passed.
    DeadlineExceeded,
    /// Continuing would cross `budget.maxTotalCost`.
    BudgetExceeded,
    /// More machines failed than `backoffLimit` allows.
    BackoffLimitExceeded,
    /// The job is suspended; no GPU is rented.
    Suspended,
    /// A suspended job was resumed.
    Resumed,
    /// The job finished and its artifacts are verified.
    Succeeded,
    /// The rented machine is being released.
    Terminating,
    /// The rented machine is confirmed gone.
    Terminated,
    /// The machine has not disappeared 10 minutes after the first destroy call; still retrying.
    TerminationStuck,
    /// `maxLifetimeSeconds` passed.
    LifetimeExceeded,
    /// The sweeper found a rented machine no GpuInstance accounts for.
    OrphanFound,
    /// The sweeper destroyed such a machine.
    OrphanDestroyed,
    /// The resource was deleted while work was in progress.
    Deleted,
    /// Event: a job rents a machine (a GpuInstance is created for it).
    Provisioning,
    /// Event: the job's machine is ready (SSH answers).
    InstanceReady,
    /// Event: the trainer was started on the machine.
    TrainingStarted,
    /// Event: the job failed; its reason is in `status.reason`.
    Failed,
    /// Event: the sweeper deleted a GpuInstance whose job is gone or finished, or whose
    /// lifetime passed.
    Swept,
    /// Event: an extra machine rented for the same GpuInstance (a create retried after a lost
    /// answer) was destroyed.
    DuplicateInstanceDestroyed,
    /// Event: a checkpoint could not be copied to S3 during training (retried at the next poll).
    CheckpointSyncFailed,
    /// Event: a replacement machine got the latest checkpoint and resumes from it.
    Restored,
    /// Event: a replacement machine has no checkpoint to resume from; training starts over.
    NoCheckpoint,
    /// Event: a synced checkpoint could not be brought back onto the replacement machine.
    RestoreFailed,
    /// Event: the job's webhook Secret is missing or holds no http(s) URL.
    NotifyFailed,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_as_its_pascal_case_name() {
        for reason in Reason::ALL {
            let json = serde_json::to_string(reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
            let back: Reason = serde_json::from_str(&json).unwrap();
            assert_eq!(back, *reason);
        }
    }
}
