//! Bringing the final model back from the machine for `gpu-trainer launch --provider ssh|vastai`.
//!
//! The machine is untrusted: the size it reports is a hint, not a promise. The download is
//! refused beyond a limit (by default a few times the reported size, with a floor; the
//! `--max-download-gb` flag raises it), enforced while the bytes arrive, so a model that turns out
//! bigger than reported (a file that keeps growing) is cut off instead of filling the disk. A
//! model that is not on the machine is a failure, never a path looked up on this side.

use std::path::{Path, PathBuf};

use crate::remote::{RemoteError, RemoteExec};

/// The default limit is this many times the size the machine reported...
pub const REPORTED_SIZE_FACTOR: u64 = 4;
/// ...and never less than this (a model reported as tiny may still be a real one).
pub const MIN_DOWNLOAD_LIMIT: u64 = 1 << 30;

/// The most bytes a download of a model the machine reported as `reported` bytes may bring:
/// `explicit` (the flag) when given, else [`REPORTED_SIZE_FACTOR`] times the report, at least
/// [`MIN_DOWNLOAD_LIMIT`].
pub fn download_limit(reported: u64, explicit: Option<u64>) -> u64 {
    explicit.unwrap_or_else(|| reported.saturating_mul(REPORTED_SIZE_FACTOR).max(MIN_DOWNLOAD_LIMIT))
}

/// Why the model could not be brought back, worded for the job's status.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("the trainer finished but left no model at {path} on {machine}")]
    Missing { path: String, machine: String },
    #[error(
        "the model {path} on {machine} is larger than the download limit of {limit} bytes (the machine reported {reported} bytes); \
         raise the limit with --max-download-gb"
    )]
    TooLarge { path: String, machine: String, limit: u64, reported: u64, source: RemoteError },
    #[error(transparent)]
    Remote(RemoteError),
}

/// Downloads `remote_model` from `exec` to `local`, within [`download_limit`].
pub async fn fetch_model(
    exec: &dyn RemoteExec,
    remote_model: &str,
    local: &Path,
    explicit_limit: Option<u64>,
) -> Result<PathBuf, ModelError> {
    let missing = || ModelError::Missing { path: remote_model.to_string(), machine: exec.describe() };
    // Reading nothing reports the size (and whether the file exists at all).
    let reported = match exec.read_from(remote_model, 0, 0).await {
        Ok(chunk) => chunk.file_size,
        Err(RemoteError::NotFound { .. }) => return Err(missing()),
        Err(e) => return Err(ModelError::Remote(e)),
    };
    let limit = download_limit(reported, explicit_limit);
    match exec.download(remote_model, local, limit).await {
        Ok(_) => Ok(local.to_path_buf()),
        Err(RemoteError::NotFound { .. }) => Err(missing()),
        Err(source @ RemoteError::TooLarge { .. }) => Err(ModelError::TooLarge {
            path: remote_model.to_string(),
            machine: exec.describe(),
            limit,
            reported,
            source,
        }),
        Err(e) => Err(ModelError::Remote(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::local::LocalExec;

    #[test]
    fn the_default_limit_is_a_few_times_the_reported_size_with_a_floor_and_the_flag_overrides_it() {
        assert_eq!(download_limit(10 << 30, None), 40 << 30);
        assert_eq!(download_limit(0, None), MIN_DOWNLOAD_LIMIT);
        assert_eq!(download_limit(100, None), MIN_DOWNLOAD_LIMIT);
        assert_eq!(download_limit(u64::MAX / 2, None), u64::MAX);
        // The flag decides, also below the default.
        assert_eq!(download_limit(10 << 30, Some(100 << 30)), 100 << 30);
        assert_eq!(download_limit(10 << 30, Some(5)), 5);
    }

    #[tokio::test]
    async fn a_model_within_the_limit_is_brought_back() {
        let machine = tempfile::tempdir().unwrap();
        let here = tempfile::tempdir().unwrap();
        std::fs::write(machine.path().join("model.bin"), b"weights").unwrap();
        let exec = LocalExec::new(machine.path()).unwrap();
        let local = here.path().join("model.bin");
        let got = fetch_model(&exec, "model.bin", &local, None).await.unwrap();
        assert_eq!(got, local);
        assert_eq!(std::fs::read(&local).unwrap(), b"weights");
    }

    #[tokio::test]
    async fn a_model_over_the_limit_is_refused_and_nothing_is_left_behind() {
        let machine = tempfile::tempdir().unwrap();
        let here = tempfile::tempdir().unwrap();
        std::fs::write(machine.path().join("model.bin"), vec![7u8; 1000]).unwrap();
        let exec = LocalExec::new(machine.path()).unwrap();
        let local = here.path().join("model.bin");
        let err = fetch_model(&exec, "model.bin", &local, Some(999)).await.unwrap_err();
        assert!(matches!(err, ModelError::TooLarge { limit: 999, reported: 1000, .. }), "{err:?}");
        assert!(err.to_string().contains("--max-download-gb"), "{err}");
        assert!(std::fs::read_dir(here.path()).unwrap().next().is_none(), "a partial download was left");
        // Exactly the limit is fine.
        fetch_model(&exec, "model.bin", &local, Some(1000)).await.unwrap();
    }

    #[tokio::test]
    async fn a_model_bigger_than_reported_is_cut_off_at_the_limit() {
        // `/proc` files report a size of 0 and then deliver more: the limit holds while reading.
        let here = tempfile::tempdir().unwrap();
        let exec = LocalExec::new(here.path()).unwrap();
        let local = here.path().join("status");
        let err = fetch_model(&exec, "/proc/self/status", &local, Some(64)).await.unwrap_err();
        assert!(matches!(err, ModelError::TooLarge { limit: 64, reported: 0, .. }), "{err:?}");
        assert!(!local.exists());
    }

    /// A machine where every file is missing.
    struct Empty;

    #[async_trait::async_trait]
    impl RemoteExec for Empty {
        async fn run(
            &self,
            _: &str,
            _: crate::remote::RunOptions,
        ) -> Result<crate::remote::ExecOutput, RemoteError> {
            unreachable!("fetching a model runs no command")
        }
        async fn upload(&self, _: &Path, _: &str) -> Result<crate::remote::TransferReport, RemoteError> {
            unreachable!("fetching a model uploads nothing")
        }
        async fn download(
            &self,
            path: &str,
            _: &Path,
            _: u64,
        ) -> Result<crate::remote::TransferReport, RemoteError> {
            Err(RemoteError::NotFound { path: path.to_string() })
        }
        async fn read_from(
            &self,
            path: &str,
            _: u64,
            _: u64,
        ) -> Result<crate::remote::FileChunk, RemoteError> {
            Err(RemoteError::NotFound { path: path.to_string() })
        }
        async fn pid_alive(&self, _: u32) -> Result<bool, RemoteError> {
            Ok(false)
        }
        fn describe(&self) -> String {
            "empty-machine".into()
        }
    }

    #[tokio::test]
    async fn a_missing_model_fails_even_when_the_same_path_exists_here() {
        let here = tempfile::tempdir().unwrap();
        let same_path = here.path().join("model.bin");
        std::fs::write(&same_path, b"a file of this machine").unwrap();
        let remote = same_path.display().to_string();
        let err = fetch_model(&Empty, &remote, &here.path().join("out.bin"), None).await.unwrap_err();
        assert!(matches!(err, ModelError::Missing { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("the trainer finished but left no model at {remote} on empty-machine")
        );
    }
}
