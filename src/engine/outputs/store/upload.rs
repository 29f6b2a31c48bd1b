//! The end of a run: a finished one uploads and verifies its model, card and checkpoints; one
//! stopped early saves its latest checkpoint with a card marked incomplete; a suspended one
//! keeps its latest checkpoint where the next machine finds it.

use super::*;

impl ResultStore {
    /// The end of a successful run: upload and verify the model, its card and the checkpoints
    /// to every destination, then mark the job `Uploaded` (or failed, naming what was lost).
    pub async fn upload(&mut self, job: &mut JobView<'_>, exec: &dyn RemoteExec) -> Result<(), StepError> {
        // Its time is when uploading began: the engine gives up after `UPLOAD_GRACE`.
        set_condition(
            &mut job.status.conditions,
            job_condition::UPLOADED,
            ConditionStatus::False,
            Reason::Uploading,
            "uploading the results",
            None,
            job.now,
        );
        self.collect_checkpoints(job, exec).await?;
        let model = final_model(exec, job.layout, job.tool).await?;
        let Some(model) = model else {
            let message =
                format!("the trainer finished but left no model at {}", job.tool.outputs.final_model);
            return Err(StepError::Failed(Failure::new(Reason::UploadFailed, message)));
        };
        let listed = format!(
            "model {} ({} bytes, sha256 {})",
            model.uri,
            model.size_bytes,
            model.sha256.clone().unwrap_or_default()
        );
        job.status.artifacts = vec![model];
        let outputs = match self.destinations(job).await? {
            Destinations::Ready(outputs) => outputs,
            Destinations::Unusable(why) => {
                let message = format!("{why}; {listed} was not uploaded");
                return Err(StepError::Failed(Failure::new(Reason::UploadFailed, message)));
            }
        };
        if outputs.is_empty() {
            let message = format!("no spec.output: results listed, not uploaded: {listed}");
            return mark_uploaded(job, &message).await;
        }
        let model_file = model_file_name(job.tool);
        let card = results::model_card(job.name, job.spec, job.status, None, vec![model_file.clone()]);
        write_card(job.layout, exec, &card.render()).await?;
        let unsynced: Vec<CheckpointStatus> =
            job.status.checkpoints.iter().filter(|c| c.uri.is_none()).cloned().collect();
        let files = vec![
            ("model".to_string(), job.layout.join(&job.tool.outputs.final_model), model_file),
            ("model-card".to_string(), job.layout.join(CARD), CARD.to_string()),
        ];
        let sent = self.send(job, &outputs, exec, &files, &unsynced, UploadSettings::default()).await;
        self.record_sent(job, &sent).await;
        if let Some(e) = sent.refusal {
            Self::report_refusal(job, &e).await;
            return Err(refusal_error(e));
        }
        let uploaded = describe(&sent.artifacts);
        if sent.artifacts.iter().any(|a| a.name == "model") {
            job.status.artifacts = sent.artifacts;
        }
        if !sent.failures.is_empty() {
            let saved = if uploaded.is_empty() {
                String::new()
            } else {
                format!("uploaded and verified: {uploaded}; ")
            };
            let message = format!("{saved}{}; {listed} was not uploaded there", sent.failures.join("; "));
            return Err(StepError::Failed(Failure::new(Reason::UploadFailed, message)));
        }
        mark_uploaded(job, &format!("uploaded and verified: {uploaded}")).await
    }

    /// A run stopped early: saves the latest checkpoint and a model card marked incomplete to
    /// every destination, within a bounded time. Returns a sentence for the final message.
    pub async fn salvage(
        &mut self,
        job: &mut JobView<'_>,
        exec: &dyn RemoteExec,
        stop_reason: &str,
    ) -> Result<String, StepError> {
        let outputs = match self.destinations(job).await? {
            Destinations::Ready(outputs) if !outputs.is_empty() => outputs,
            Destinations::Ready(_) => {
                return Ok(checkpoint_sentence(job.status, "stays on the machine and is lost with it"));
            }
            Destinations::Unusable(why) => return Ok(format!("nothing was saved: {why}")),
        };
        let Some(latest) = job.status.checkpoints.iter().max_by_key(|c| c.step).cloned() else {
            return Ok("there was no checkpoint to save".into());
        };
        job.status.phase = TrainingJobPhase::Uploading;
        job.status.reason = Some(Reason::Uploading);
        job.status.message = Some("saving the latest checkpoint".into());
        let path_in_repo = format!("checkpoints/{}", latest.name);
        let card = results::model_card(
            job.name,
            job.spec,
            job.status,
            Some(stop_reason),
            vec![path_in_repo.clone()],
        );
        write_card(job.layout, exec, &card.render()).await?;
        let mut files = vec![("model-card".to_string(), job.layout.join(CARD), CARD.to_string())];
        // Hugging Face takes files: a folder checkpoint (no extension, e.g. `checkpoint-500`)
        // goes to S3 only.
        if outputs.hf.is_some() && latest.name.contains('.') {
            let path = format!("{}/{}", job.layout.output_dir(), latest.name);
            files.push((format!("checkpoint-{}", latest.step), path, path_in_repo));
        }
        let pending: Vec<CheckpointStatus> =
            std::iter::once(latest.clone()).filter(|c| c.uri.is_none()).collect();
        let sent = self.send(job, &outputs, exec, &files, &pending, results::salvage_settings()).await;
        // The run failed already: a refusal is reported and said in the message, no more.
        self.record_sent(job, &sent).await;
        if let Some(e) = &sent.refusal {
            Self::report_refusal(job, e).await;
        }
        job.status.artifacts.extend(sent.artifacts.iter().cloned());
        let saved = describe(&sent.artifacts);
        let mut sentence =
            match job.status.checkpoints.iter().find(|c| c.name == latest.name).and_then(|c| c.uri.clone()) {
                Some(uri) => {
                    format!("latest checkpoint {} (step {}) saved to {uri}", latest.name, latest.step)
                }
                None => {
                    format!("latest checkpoint {} (step {}) was not saved to S3", latest.name, latest.step)
                }
            };
        if !saved.is_empty() {
            sentence.push_str(&format!("; saved with a model card marked incomplete: {saved}"));
        }
        if !sent.failures.is_empty() {
            sentence.push_str(&format!("; {}", sent.failures.join("; ")));
        }
        Ok(sentence)
    }

    /// Before a suspended job's machine is released: the latest checkpoint goes to S3 (when the
    /// job has `spec.output.s3`) so the next machine can resume from it. Returns a sentence for
    /// the Suspended message.
    pub async fn keep_latest_checkpoint(
        &mut self,
        job: &mut JobView<'_>,
        exec: &dyn RemoteExec,
    ) -> Result<String, StepError> {
        let Some(latest) = job.status.checkpoints.iter().max_by_key(|c| c.step).cloned() else {
            return Ok("there is no checkpoint: training will start over".into());
        };
        let outputs = match self.destinations(job).await? {
            Destinations::Ready(outputs) if outputs.s3.is_some() => outputs,
            Destinations::Ready(_) => {
                return Ok(checkpoint_sentence(job.status, "stays on this machine only"));
            }
            Destinations::Unusable(why) => return Ok(format!("the latest checkpoint was not saved: {why}")),
        };
        if latest.uri.is_none() {
            let sent = self
                .send(job, &outputs, exec, &[], std::slice::from_ref(&latest), results::salvage_settings())
                .await;
            self.record_sent(job, &sent).await;
            if let Some(e) = &sent.refusal {
                Self::report_refusal(job, e).await;
            }
            if let Some(failure) = sent.failures.first() {
                return Ok(format!(
                    "latest checkpoint {} (step {}) was not saved: {failure}",
                    latest.name, latest.step
                ));
            }
        }
        Ok(checkpoint_sentence(job.status, "stays on this machine only"))
    }
}

async fn write_card(layout: &RemoteLayout, exec: &dyn RemoteExec, text: &str) -> Result<(), StepError> {
    write_to_machine(exec, text, &layout.join(CARD)).await.map_err(|e| {
        StepError::Remote(crate::remote::RemoteError::io("write the model card", error_chain(&e)))
    })
}

/// The final model's file name (the last part of the tool's `finalModel`).
fn model_file_name(tool: &RenderedTool) -> String {
    let final_model = &tool.outputs.final_model;
    final_model.rsplit('/').find(|s| !s.is_empty()).unwrap_or("model").to_string()
}

fn checkpoint_sentence(status: &TrainingJobStatus, fate: &str) -> String {
    match status.checkpoints.iter().max_by_key(|c| c.step) {
        Some(cp) if cp.uri.is_some() => format!(
            "latest checkpoint {} (step {}) is in {}",
            cp.name,
            cp.step,
            cp.uri.clone().unwrap_or_default()
        ),
        Some(cp) => format!("no spec.output: latest checkpoint {} (step {}) {fate}", cp.name, cp.step),
        None => "there was no checkpoint".into(),
    }
}

async fn mark_uploaded(job: &mut JobView<'_>, message: &str) -> Result<(), StepError> {
    set_condition(
        &mut job.status.conditions,
        job_condition::UPLOADED,
        ConditionStatus::True,
        Reason::Uploaded,
        message,
        None,
        job.now,
    );
    job.events.normal(Reason::Uploaded, "Upload", message).await;
    Ok(())
}

/// The final model the trainer left on the machine, with size and SHA-256 (computed on the
/// machine). `None` when there is none. (The checkpoints: [`ResultStore::collect_checkpoints`].)
pub async fn final_model(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    tool: &RenderedTool,
) -> Result<Option<ArtifactStatus>, StepError> {
    let model = layout.join(&tool.outputs.final_model);
    let out = exec
        .run(
            &format!(
                "f={}; [ -f \"$f\" ] && sha256sum \"$f\" && stat -c %s \"$f\" || true",
                shell_quote(&model)?
            ),
            RunOptions::default(),
        )
        .await?;
    out.require_complete("hashing the final model")?;
    let text = out.stdout_lossy();
    let mut lines = text.lines();
    let sha = lines.next().and_then(|l| l.split_whitespace().next()).map(str::to_string);
    let size = lines.next().and_then(|l| l.trim().parse::<u64>().ok());
    let artifact = match (sha, size) {
        (Some(sha256), Some(size_bytes)) => Some(ArtifactStatus {
            name: "model".into(),
            uri: format!("file://{model}"),
            size_bytes,
            sha256: Some(sha256),
        }),
        _ => None,
    };
    Ok(artifact)
}

/// `name uri (size bytes)` of each artifact, comma-separated.
fn describe(artifacts: &[ArtifactStatus]) -> String {
    artifacts
        .iter()
        .map(|a| format!("{} {} ({} bytes)", a.name, a.uri, a.size_bytes))
        .collect::<Vec<_>>()
        .join(", ")
}
