//! What the API server's schema cannot check about a TrainingJob, decided before anything is
//! rented, by the controller and by `gpu-trainer launch` alike: the tool exists, its parameters
//! resolve, the tool's required secrets are in `env`, exactly one dataset source is set (a job
//! file never met an API server's schema), and the dataset and provider are ones this front end
//! can serve. Pure: the tool registry is passed in.

use crate::api::TrainingJobSpec;
use crate::remote::tool::{Tool, ToolRegistry};

/// A rule the spec breaks; `field` is the path a user edits (`spec.params`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid { field, message: message.into() }
}

/// Who runs the job: what each can serve differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontEnd {
    /// The TrainingJob controller: no local folders, Vast.ai machines only.
    Cluster,
    /// `gpu-trainer launch`: local folders and existing SSH machines too.
    Launch,
}

/// Checks the spec; returns the tool it names.
pub fn validate<'r>(
    spec: &TrainingJobSpec,
    registry: &'r ToolRegistry,
    front_end: FrontEnd,
) -> Result<&'r Tool, Invalid> {
    let tool = registry.get(&spec.tool).map_err(|e| invalid("spec.tool", e.to_string()))?;
    tool.resolve_params(&spec.params).map_err(|e| invalid("spec.params", e.to_string()))?;
    tool.check_secrets(spec.env.iter().map(|e| e.name.as_str()))
        .map_err(|e| invalid("spec.env", e.to_string()))?;
    let dataset = &spec.dataset;
    let sources = [dataset.s3.is_some(), dataset.url.is_some(), dataset.local.is_some()];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err(invalid("spec.dataset", "set exactly one of `s3`, `url` and `local`"));
    }
    if front_end == FrontEnd::Launch {
        return Ok(tool);
    }
    if dataset.local.is_some() {
        return Err(invalid(
            "spec.dataset.local",
            "a local folder works only with `gpu-trainer launch`; in a cluster use `url` or `s3` \
             (pack it with `gpu-trainer dataset pack`)",
        ));
    }
    if spec.provider.ssh.is_some() {
        return Err(invalid(
            "spec.provider.ssh",
            "existing SSH machines are not supported by the controller yet; use `vastai`",
        ));
    }
    Ok(tool)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn registry() -> ToolRegistry {
        ToolRegistry::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tools")).unwrap()
    }

    fn spec(extra: serde_json::Value) -> TrainingJobSpec {
        let mut base = serde_json::json!({
            "tool": "demo@1",
            "dataset": {"url": {"href": "http://127.0.0.1:1/d.tar"}}
        });
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn a_demo_job_with_a_url_dataset_is_valid() {
        let registry = registry();
        let tool = validate(&spec(serde_json::json!({"params": {"steps": 5}})), &registry, FrontEnd::Cluster)
            .unwrap();
        assert_eq!(tool.reference(), "demo@1");
    }

    #[test]
    fn an_unknown_parameter_names_spec_params_and_the_key() {
        let err =
            validate(&spec(serde_json::json!({"params": {"stepz": 5}})), &registry(), FrontEnd::Cluster)
                .unwrap_err();
        assert_eq!(err.field, "spec.params");
        assert!(err.message.contains("stepz"), "{err}");
    }

    #[test]
    fn an_unknown_tool_names_spec_tool() {
        let err = validate(&spec(serde_json::json!({"tool": "nope@1"})), &registry(), FrontEnd::Cluster)
            .unwrap_err();
        assert_eq!(err.field, "spec.tool");
    }

    #[test]
    fn a_local_dataset_is_refused_in_a_cluster() {
        let s = spec(serde_json::json!({"dataset": {"local": {"path": "data"}}}));
        assert_eq!(validate(&s, &registry(), FrontEnd::Cluster).unwrap_err().field, "spec.dataset.local");
        assert!(validate(&s, &registry(), FrontEnd::Launch).is_ok(), "launch stages local folders");
    }

    #[test]
    fn two_dataset_sources_are_refused_everywhere() {
        let s = spec(
            serde_json::json!({"dataset": {"local": {"path": "data"}, "url": {"href": "http://x/d.tar"}}}),
        );
        for front_end in [FrontEnd::Cluster, FrontEnd::Launch] {
            assert_eq!(
                validate(&s, &registry(), front_end).unwrap_err().field,
                "spec.dataset",
                "{front_end:?}"
            );
        }
    }

    #[test]
    fn a_wrongly_typed_parameter_is_invalid() {
        let err =
            validate(&spec(serde_json::json!({"params": {"steps": "many"}})), &registry(), FrontEnd::Cluster)
                .unwrap_err();
        assert_eq!(err.field, "spec.params");
    }
}
