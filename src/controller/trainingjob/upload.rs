//! Uploading: collect what the trainer left and send it to `spec.output`, verified before the
//! machine is released.

use chrono::Utc;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::warn;

use super::pass::Pass;
use super::{Error, finish, kube_err, train};
use crate::api::{ConditionStatus, Reason, TrainingJobPhase, job_condition, set_condition};
use crate::controller::gpuinstance::error_chain;

impl Pass<'_> {
    /// Records the results. Without `output` they stay listed in status (and are lost with the
    /// machine). With `output.s3` the final model is uploaded through presigned URLs and verified
    /// with HEAD before the job succeeds; a failed upload fails the job. Either way the finish
    /// path releases the machine afterwards. Hugging Face output is not wired in yet.
    pub(super) async fn upload(&mut self, exec: &dyn crate::remote::RemoteExec) -> Result<(), Error> {
        self.set_phase(TrainingJobPhase::Uploading, Reason::Uploading, "collecting results");
        let kind = train::parser_kind(self.tool.parser);
        let (model, checkpoints) = finish::collect(exec, &self.layout, &self.tool, kind).await?;
        self.status.checkpoints = checkpoints;
        let Some(model) = model else {
            let message =
                format!("the trainer finished but left no model at {}", self.tool.outputs.final_model);
            self.status.phase = TrainingJobPhase::Failed;
            return self.record_finish(TrainingJobPhase::Failed, Reason::UploadFailed, &message).await;
        };
        let listed = format!(
            "model {} ({} bytes, sha256 {})",
            model.uri,
            model.size_bytes,
            model.sha256.clone().unwrap_or_default()
        );
        self.status.artifacts = vec![model];
        let output = self.job.spec.output.clone();
        let message = match output.as_ref().map(|o| (o.s3.as_ref(), o.hugging_face.is_some())) {
            None => format!("no spec.output: results listed, not uploaded: {listed}"),
            Some((Some(s3), also_hf)) => match self.upload_to_s3(exec, s3).await? {
                Ok(artifacts) => {
                    let uploaded = artifacts
                        .iter()
                        .map(|a| format!("{} {} ({} bytes)", a.name, a.uri, a.size_bytes))
                        .collect::<Vec<_>>()
                        .join(", ");
                    self.status.artifacts = artifacts;
                    if also_hf {
                        // The model is safe in S3, but a destination the spec asked for was not
                        // served: say so rather than succeed silently.
                        let message = format!(
                            "uploaded and verified: {uploaded}; uploading to spec.output.huggingFace is not supported by this build yet"
                        );
                        return self
                            .record_finish(TrainingJobPhase::Failed, Reason::UploadFailed, &message)
                            .await;
                    }
                    format!("uploaded and verified: {uploaded}")
                }
                Err(reason) => {
                    let message = format!("upload to S3 failed: {reason}; {listed} was not uploaded");
                    return self
                        .record_finish(TrainingJobPhase::Failed, Reason::UploadFailed, &message)
                        .await;
                }
            },
            Some((None, _)) => {
                let message = format!(
                    "uploading to spec.output.huggingFace is not supported by this build yet; {listed} was not uploaded"
                );
                return self.record_finish(TrainingJobPhase::Failed, Reason::UploadFailed, &message).await;
            }
        };
        set_condition(
            &mut self.status.conditions,
            job_condition::UPLOADED,
            ConditionStatus::True,
            Reason::Uploaded,
            &message,
            None,
            Utc::now(),
        );
        self.event(EventType::Normal, "Uploaded", "Upload", &message).await;
        Ok(())
    }

    /// Uploads the final model to `s3` and returns the verified artifacts, or (inner `Err`) why
    /// the upload failed. The outer `Err` is a transient API error (the pass is retried).
    /// Messages never contain credentials or presigned URLs.
    pub(super) async fn upload_to_s3(
        &mut self,
        exec: &dyn crate::remote::RemoteExec,
        s3: &crate::api::S3Output,
    ) -> Result<Result<Vec<crate::api::ArtifactStatus>, String>, Error> {
        use crate::artifacts::plan::Destination;
        use crate::artifacts::s3::S3Store;
        use crate::artifacts::settings::secret_bytes;
        use crate::artifacts::{S3Settings, UploadItem, UploadSettings, Uploader};

        let secret_data = match &s3.credentials_secret_ref {
            Some(secret_ref) => {
                let secret = self
                    .secrets
                    .get_opt(&secret_ref.name)
                    .await
                    .map_err(kube_err("read the S3 credentials Secret"))?;
                match secret {
                    Some(secret) => Some(secret_bytes(&secret)),
                    None => return Ok(Err(format!("credentials Secret {} not found", secret_ref.name))),
                }
            }
            None => None,
        };
        let defaults = S3Settings::from_env().ok();
        let settings = match S3Settings::for_output(s3, secret_data.as_ref(), defaults.as_ref()) {
            Ok(settings) => settings,
            Err(e) => return Ok(Err(error_chain(&e))),
        };
        let store = S3Store::new(&settings);
        let uid = self.job.uid().ok_or(Error::Missing("uid"))?;
        let final_model = &self.tool.outputs.final_model;
        let file_name = final_model.rsplit('/').find(|s| !s.is_empty()).unwrap_or("model");
        let item = UploadItem {
            name: "model".into(),
            path: self.layout.join(final_model),
            object: Destination::for_job(s3, &self.job.name_any(), &uid).object(file_name),
        };
        self.set_phase(
            TrainingJobPhase::Uploading,
            Reason::Uploading,
            &format!("uploading to {}", item.object.uri()),
        );
        let uploader = Uploader::new(&store, UploadSettings::default());
        match uploader.upload(exec, std::slice::from_ref(&item)).await {
            Ok(artifacts) => Ok(Ok(artifacts)),
            Err(e) => {
                warn!(job = %self.job.name_any(), error = %error_chain(&e), "Upload failed");
                Ok(Err(error_chain(&e)))
            }
        }
    }
}
