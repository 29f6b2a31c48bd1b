//! Where `launch` keeps results when the job names no `spec.output` (with one, the shared
//! [`crate::engine::outputs::store`] uploads them as in a cluster): the final model is found
//! here (`--provider local`) or downloaded within a size limit and verified (`ssh`, `vastai`),
//! and recorded with size and checksum as a `file://` artifact; a run stopped early keeps its
//! latest checkpoint the same way, next to a model card marked incomplete.

use std::path::{Path, PathBuf};

use super::model::{ModelError, fetch_model};
use super::{LocalError, LocalRun, MachineSpec};
use crate::api::{ArtifactStatus, ConditionStatus, Reason, job_condition, set_condition};
use crate::engine::outcome::Failure;
use crate::engine::results::model_card;
use crate::remote::{RemoteExec, sha256_file};

impl LocalRun {
    /// Before a suspend: what becomes of the latest checkpoint.
    pub(super) fn keep_latest_checkpoint(&self) -> String {
        let Some(latest) = self.state.status.checkpoints.iter().max_by_key(|c| c.step) else {
            return "there is no checkpoint: training will start over".into();
        };
        let place = match &self.machine {
            MachineSpec::Vastai(_) => "is lost with the rented machine".to_string(),
            _ => format!("stays on {}", self.machine_description()),
        };
        format!("latest checkpoint {} (step {}) {place}", latest.name, latest.step)
    }

    /// A run stopped early: its latest checkpoint is brought here (or found here) with a model
    /// card marked incomplete; a sentence for the final message.
    pub(super) async fn salvage(
        &mut self,
        exec: &dyn RemoteExec,
        stop_reason: &str,
    ) -> Result<String, LocalError> {
        let Some(latest) = self.state.status.checkpoints.iter().max_by_key(|c| c.step).cloned() else {
            return Ok("there was no checkpoint to save".into());
        };
        let remote = format!("{}/{}", self.layout.output_dir(), latest.name);
        let local = match self.bring_here(exec, &remote).await? {
            Here::At(local) => local,
            Here::Not(why) => {
                return Ok(format!(
                    "latest checkpoint {} (step {}) was not saved: {why}",
                    latest.name, latest.step
                ));
            }
        };
        let card = model_card(
            &self.name(),
            &self.job.spec,
            &self.state.status,
            Some(stop_reason),
            vec![latest.name.clone()],
        );
        let card_path = local.with_file_name("README.md");
        std::fs::write(&card_path, card.render())
            .map_err(|e| crate::remote::RemoteError::io(format!("write {}", card_path.display()), e))?;
        let (sha256, size_bytes) = sha256_file(&local).await?;
        self.state.status.artifacts.push(ArtifactStatus {
            name: format!("checkpoint-{}", latest.step),
            uri: format!("file://{}", local.display()),
            size_bytes,
            sha256: Some(sha256),
        });
        Ok(format!(
            "latest checkpoint {} (step {}) saved to {} with a model card marked incomplete",
            latest.name,
            latest.step,
            local.display()
        ))
    }

    /// A file of the machine on this machine: the path itself for `local`, else downloaded into
    /// `results/<uid>/` within the download limit. [`Here::Not`] says why it is not here.
    async fn bring_here(&self, exec: &dyn RemoteExec, remote: &str) -> Result<Here, LocalError> {
        if let MachineSpec::Local = self.machine {
            let path = PathBuf::from(remote);
            return Ok(if path.is_file() {
                Here::At(path)
            } else {
                Here::Not(format!("{remote} is not a file"))
            });
        }
        let file_name = Path::new(remote).file_name().map(|n| n.to_os_string()).unwrap_or_default();
        let local = self.state_dir.join("results").join(&self.state.uid).join(file_name);
        if let Some(dir) = local.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| crate::remote::RemoteError::io(format!("create {}", dir.display()), e))?;
        }
        match fetch_model(exec, remote, &local, self.max_download_bytes).await {
            Ok(model) => Ok(Here::At(model)),
            Err(ModelError::Remote(err)) => Err(err.into()),
            // Not on the machine, or larger than allowed.
            Err(err) => Ok(Here::Not(err.to_string())),
        }
    }

    /// Without a cluster "upload" means bringing the final model to this machine (or finding
    /// it here) and recording it, with size and checksum, as a `file://` artifact.
    pub(super) async fn collect(&mut self, exec: &dyn RemoteExec) -> Result<(), LocalError> {
        let remote_model = self.final_model_path();
        let model = match self.bring_here(exec, &remote_model).await? {
            Here::At(model) => model,
            Here::Not(_) if matches!(self.machine, MachineSpec::Local) => {
                let message = format!("the trainer finished but left no model at {remote_model}");
                return Err(Failure::new(Reason::UploadFailed, message).into());
            }
            Here::Not(why) => return Err(Failure::new(Reason::UploadFailed, why).into()),
        };
        let (sha256, size) = sha256_file(&model).await?;
        self.state.status.artifacts = vec![ArtifactStatus {
            name: "model".into(),
            uri: format!("file://{}", model.display()),
            size_bytes: size,
            sha256: Some(sha256),
        }];
        let now = chrono::Utc::now();
        set_condition(
            &mut self.state.status.conditions,
            job_condition::UPLOADED,
            ConditionStatus::True,
            Reason::Uploaded,
            format!("model at {}", model.display()),
            None,
            now,
        );
        Ok(())
    }
}

/// Where a file of the machine is on this machine, or why it is not here.
enum Here {
    At(PathBuf),
    Not(String),
}
