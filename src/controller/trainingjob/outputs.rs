//! Where a job's results go (`spec.output`), resolved once per connection: the S3 store with its
//! credentials (from `credentialsSecretRef` or the operator's environment) and the Hugging Face
//! token. Plus the pure pieces of the upload steps: merging checkpoint lists, and the model card.
//! Credentials stay in the operator; messages name Secrets and fields, never values.

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use super::{Error, kube_err};
use crate::api::{CheckpointStatus, HuggingFaceOutput, TrainingJobSpec, TrainingJobStatus};
use crate::artifacts::address::EndpointPolicy;
use crate::artifacts::huggingface::HfToken;
use crate::artifacts::model_card::ModelCard;
use crate::artifacts::plan::Destination;
use crate::artifacts::s3::S3Store;
use crate::artifacts::settings::{output_endpoint_field, secret_bytes};
use crate::artifacts::{S3Settings, UploadSettings};
use crate::controller::gpuinstance::error_chain;

/// The S3 destination of one job.
pub struct S3Target {
    pub store: S3Store,
    pub dest: Destination,
    pub sync_checkpoints: bool,
}

/// The Hugging Face destination of one job.
pub struct HfTarget {
    pub token: HfToken,
    pub output: HuggingFaceOutput,
}

/// Every destination the spec names. Both `None` means results stay on the machine.
#[derive(Default)]
pub struct Outputs {
    pub s3: Option<S3Target>,
    pub hf: Option<HfTarget>,
}

impl Outputs {
    pub fn is_empty(&self) -> bool {
        self.s3.is_none() && self.hf.is_none()
    }
}

/// Resolves `spec.output`. The inner `Err` is a message for a job that cannot upload (a missing
/// Secret or key, bad settings, an endpoint `policy` refuses); the outer one a transient API error.
pub async fn resolve(
    secrets: &Api<Secret>,
    spec: &TrainingJobSpec,
    job_name: &str,
    job_uid: &str,
    policy: EndpointPolicy,
) -> Result<Result<Outputs, String>, Error> {
    let Some(output) = &spec.output else { return Ok(Ok(Outputs::default())) };
    let mut outputs = Outputs::default();
    if let Some(s3) = &output.s3 {
        let secret_data = match &s3.credentials_secret_ref {
            Some(secret_ref) => {
                match secrets
                    .get_opt(&secret_ref.name)
                    .await
                    .map_err(kube_err("read the S3 credentials Secret"))?
                {
                    Some(secret) => Some(secret_bytes(&secret)),
                    None => {
                        return Ok(Err(format!(
                            "spec.output.s3.credentialsSecretRef: Secret {} not found",
                            secret_ref.name
                        )));
                    }
                }
            }
            None => None,
        };
        let defaults = S3Settings::from_env().ok();
        let store = match S3Settings::for_output(s3, secret_data.as_ref(), defaults.as_ref()) {
            Ok(settings) => S3Store::connect(&settings, policy, output_endpoint_field(s3)).await,
            Err(e) => Err(e),
        };
        match store {
            Ok(store) => {
                outputs.s3 = Some(S3Target {
                    store,
                    dest: Destination::for_job(s3, job_name, job_uid),
                    sync_checkpoints: s3.sync_checkpoints,
                })
            }
            Err(e) => return Ok(Err(format!("spec.output.s3: {}", error_chain(&e)))),
        }
    }
    if let Some(hf) = &output.hugging_face {
        let r = &hf.token_secret_ref;
        let secret =
            secrets.get_opt(&r.name).await.map_err(kube_err("read the Hugging Face token Secret"))?;
        let value = secret.and_then(|s| s.data).and_then(|d| d.get(&r.key).map(|v| v.0.clone()));
        let Some(value) = value else {
            return Ok(Err(format!(
                "spec.output.huggingFace.tokenSecretRef: Secret {} has no key {}",
                r.name, r.key
            )));
        };
        match std::str::from_utf8(&value)
            .map_err(|_| "is not UTF-8".to_string())
            .and_then(|v| HfToken::new(v).map_err(|e| e.to_string()))
        {
            Ok(token) => outputs.hf = Some(HfTarget { token, output: hf.clone() }),
            Err(why) => {
                return Ok(Err(format!(
                    "spec.output.huggingFace.tokenSecretRef: key {} of Secret {} {why}",
                    r.key, r.name
                )));
            }
        }
    }
    Ok(Ok(outputs))
}

/// Upload settings for saving what a stopped run left: it must not hold the machine for long.
pub fn salvage_settings() -> UploadSettings {
    UploadSettings {
        step_timeout: std::time::Duration::from_secs(10 * 60),
        attempts: 2,
        ..UploadSettings::default()
    }
}

/// The job's checkpoint list after looking at the machine: what is there now (`found`), with
/// storage locations from `synced` and from the earlier list (kept even when the machine no
/// longer has them: they are still in storage). Sorted by step. Pure.
pub fn merge_checkpoints(
    earlier: &[CheckpointStatus],
    found: &[CheckpointStatus],
    synced: &[CheckpointStatus],
) -> Vec<CheckpointStatus> {
    let mut merged: Vec<CheckpointStatus> = earlier.iter().filter(|c| c.uri.is_some()).cloned().collect();
    for cp in found.iter().chain(synced) {
        match merged.iter_mut().find(|m| m.name == cp.name) {
            Some(existing) => {
                let uri = cp.uri.clone().or_else(|| existing.uri.clone());
                *existing = CheckpointStatus { uri, ..cp.clone() };
            }
            None => merged.push(cp.clone()),
        }
    }
    merged.sort_by(|a, b| a.step.cmp(&b.step).then_with(|| a.name.cmp(&b.name)));
    merged
}

/// The latest checkpoint that is in storage. Pure.
pub fn latest_synced(checkpoints: &[CheckpointStatus]) -> Option<&CheckpointStatus> {
    checkpoints.iter().filter(|c| c.uri.is_some()).max_by_key(|c| c.step)
}

/// The model card of a job. `stop_reason` marks a run that stopped early as incomplete.
pub fn model_card(
    job_name: &str,
    spec: &TrainingJobSpec,
    status: &TrainingJobStatus,
    stop_reason: Option<&str>,
    files: Vec<String>,
) -> ModelCard {
    let progress = status.progress.clone().unwrap_or_default();
    let base_model = ["baseModel", "base_model", "model"]
        .iter()
        .find_map(|k| spec.params.get(*k).and_then(|v| v.as_str()).map(str::to_string));
    let params = spec
        .params
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
        .collect();
    ModelCard {
        title: spec
            .output
            .as_ref()
            .and_then(|o| o.hugging_face.as_ref())
            .map_or(job_name.to_string(), |h| h.repo.rsplit('/').next().unwrap_or(&h.repo).to_string()),
        tool: spec.tool.clone(),
        base_model,
        extra_tags: vec![],
        target_steps: progress.total_steps,
        completed_steps: progress.step,
        stop_reason: stop_reason.map(str::to_string),
        params,
        files,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ProgressStatus;

    fn cp(name: &str, step: u64, uri: Option<&str>) -> CheckpointStatus {
        CheckpointStatus { name: name.into(), step, size_bytes: Some(1), uri: uri.map(str::to_string) }
    }

    #[test]
    fn synced_checkpoints_stay_listed_after_the_machine_is_gone() {
        let earlier = vec![cp("a_10", 10, Some("s3://b/a_10")), cp("a_20", 20, None)];
        // A new machine has only what was restored plus a newer one.
        let found = vec![cp("a_10", 10, None), cp("a_30", 30, None)];
        let synced = vec![cp("a_30", 30, Some("s3://b/a_30"))];
        let merged = merge_checkpoints(&earlier, &found, &synced);
        assert_eq!(
            merged.iter().map(|c| (c.name.as_str(), c.uri.is_some())).collect::<Vec<_>>(),
            [("a_10", true), ("a_30", true)]
        );
        assert_eq!(latest_synced(&merged).map(|c| c.step), Some(30));
        assert_eq!(latest_synced(&[cp("x", 5, None)]), None);
    }

    #[test]
    fn the_card_of_a_stopped_run_is_incomplete() {
        let spec: TrainingJobSpec = serde_json::from_value(serde_json::json!({
            "tool": "demo@1", "dataset": {"url": {"href": "http://x/d.tar"}}, "params": {"steps": 40}
        }))
        .unwrap();
        let status = TrainingJobStatus {
            progress: Some(ProgressStatus { step: 12, total_steps: Some(40), ..Default::default() }),
            ..Default::default()
        };
        let card = model_card("j", &spec, &status, Some("Stalled: no progress"), vec![]);
        assert!(card.incomplete());
        assert!(card.render().contains("incomplete"));
        assert!(!model_card("j", &spec, &TrainingJobStatus::default(), None, vec![]).incomplete());
        assert_eq!(card.params, [("steps".to_string(), "40".to_string())]);
    }
}
