//! The `gputrainer.dev/v1alpha1` API: the `TrainingJob` and `GpuInstance` custom resources,
//! their shared building blocks, condition types and the one `Reason` enum used by conditions,
//! events and metric labels.
//!
//! Nothing in this module performs I/O. Doc comments on the fields become the CRD descriptions
//! that `kubectl explain` shows, so they are written for users.

mod common;
mod conditions;
pub mod docs;
mod gpuinstance;
mod reason;
mod schema;
mod time;
mod trainingjob;

pub use common::*;
pub use conditions::*;
pub use gpuinstance::*;
pub use reason::Reason;
pub use time::*;
pub use trainingjob::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of both custom resources.
pub const GROUP: &str = "gputrainer.dev";
/// API version of both custom resources.
pub const VERSION: &str = "v1alpha1";
/// Finalizer that keeps a `GpuInstance` until its rented machine is confirmed gone.
pub const GPUINSTANCE_FINALIZER: &str = "gputrainer.dev/terminate";
/// Annotation written (with an optimistic-lock update) just before the provider's create call.
pub const CREATE_PENDING_ANNOTATION: &str = "gputrainer.dev/create-pending";
/// Annotation written once the provider's create call has returned an instance id.
pub const CREATE_SUCCEEDED_ANNOTATION: &str = "gputrainer.dev/create-succeeded";
/// GpuInstance annotation: provider machine ids (comma-separated) never to rent for it. The
/// TrainingJob controller sets it on a replacement with the machines that failed the job before;
/// a person may set it on an interactive GpuInstance to avoid a known bad host.
pub const AVOID_MACHINES_ANNOTATION: &str = "gputrainer.dev/avoid-machines";
/// GpuInstance annotation `<Reason>: <message>`: the machine is to be released for what it did
/// (it stopped answering, sent more than allowed, changed its host key). Set by the TrainingJob
/// controller, which talks to the machine; the GpuInstance controller releases it and marks it
/// `Lost` with that reason. It can only ever release a machine, never rent one.
pub const RELEASE_REQUESTED_ANNOTATION: &str = "gputrainer.dev/release-requested";

/// Both CRDs, in the order they are printed by `gpu-trainer crd` and stored under `crds/`.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![TrainingJob::crd(), GpuInstance::crd()]
}

/// Both CRDs as one multi-document YAML stream, exactly as checked in under `crds/`.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// One `(file name, YAML)` pair per CRD, named `<plural>.<group>.yaml`, as stored under `crds/`.
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    crds()
        .into_iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
            Ok((name, format!("---\n{}", serde_yaml::to_string(&crd)?)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in `crds/` must match what the code generates; regenerate with
    /// `cargo run -- crd --output-dir crds`.
    #[test]
    fn checked_in_crds_are_up_to_date() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
        for (file_name, yaml) in crd_files().unwrap() {
            let path = dir.join(&file_name);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!("{} is missing ({e}); run `cargo run -- crd --output-dir crds`", path.display())
            });
            assert!(
                on_disk == yaml,
                "{} is out of date; run `cargo run -- crd --output-dir crds`",
                path.display()
            );
        }
    }

    #[test]
    fn crds_use_the_fixed_names() {
        let names: Vec<_> = crds().iter().map(|c| c.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["trainingjobs.gputrainer.dev", "gpuinstances.gputrainer.dev"]);
        for crd in crds() {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.versions[0].name, VERSION);
            assert!(crd.spec.versions[0].subresources.as_ref().unwrap().status.is_some());
        }
    }

    #[test]
    fn examples_parse_into_the_types() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let job: TrainingJob =
            serde_yaml::from_str(&std::fs::read_to_string(root.join("trainingjob-full.yaml")).unwrap())
                .unwrap();
        assert_eq!(job.spec.tool, "flux-lora@1");
        assert_eq!(job.spec.monitoring.stall_detection.min_samples, 4);
        let box_: GpuInstance = serde_yaml::from_str(
            &std::fs::read_to_string(root.join("gpuinstance-interactive.yaml")).unwrap(),
        )
        .unwrap();
        assert_eq!(box_.spec.max_lifetime_seconds, 28800);
    }

    /// Leaving `resources` out means the same as `resources: {}`, in serde and in the CRD default
    /// the API server fills in: `verifiedOnly` is documented to default to true.
    #[test]
    fn omitted_resources_take_the_documented_defaults() {
        let spec = |resources: &str| -> TrainingJobSpec {
            serde_yaml::from_str(&format!(
                "tool: demo@1\ndataset: {{url: {{href: http://h/d.tar}}}}\n{resources}"
            ))
            .unwrap()
        };
        let omitted = spec("");
        assert_eq!(omitted.resources, spec("resources: {}").resources);
        assert!(omitted.resources.verified_only);
        assert_eq!(omitted.resources.gpu.count, 1);
        let crd = serde_json::to_value(TrainingJob::crd()).unwrap();
        let default = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["resources"]["default"];
        assert_eq!(default["verifiedOnly"], true, "{default}");
    }

    /// The schema node at `path` (property names from the root of `spec`) of a CRD.
    fn spec_node(crd: &CustomResourceDefinition, path: &[&str]) -> serde_json::Value {
        let crd = serde_json::to_value(crd).unwrap();
        let mut node = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone();
        for name in path {
            node = node["properties"][name].clone();
        }
        node
    }

    /// `(rule, message, fieldPath, reason)` of each CEL rule on a schema node.
    fn cel_rules(node: &serde_json::Value) -> Vec<(String, String, String, String)> {
        node["x-kubernetes-validations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let text = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                (text("rule"), text("message"), text("fieldPath"), text("reason"))
            })
            .collect()
    }

    /// Every CEL rule's message names the field it refuses by its full path, and `fieldPath`
    /// points at that field, so `kubectl apply` says which field to fix.
    fn assert_rules_name_their_field(crd: &CustomResourceDefinition, path: &[&str]) {
        let node = spec_node(crd, path);
        let prefix: String =
            std::iter::once("spec").chain(path.iter().copied()).collect::<Vec<_>>().join(".");
        for (rule, message, field_path, reason) in cel_rules(&node) {
            let field =
                field_path.strip_prefix('.').unwrap_or_else(|| panic!("{rule}: fieldPath {field_path}"));
            assert!(
                node["properties"].get(field).is_some(),
                "{rule}: fieldPath {field_path} is not a property"
            );
            assert!(message.starts_with(&format!("{prefix}.{field} ")), "{rule}: message {message:?}");
            assert!(!message.contains('\n'), "{rule}: a message must be one line");
            assert!(
                ["FieldValueInvalid", "FieldValueForbidden"].contains(&reason.as_str()),
                "{rule}: {reason}"
            );
        }
    }

    /// Fields guarded by a transition rule (`oldSelf`) on `node`.
    fn immutable_fields(node: &serde_json::Value) -> Vec<String> {
        cel_rules(node)
            .into_iter()
            .filter(|(rule, ..)| rule.contains("oldSelf"))
            .map(|(_, _, path, _)| path.trim_start_matches('.').to_string())
            .collect()
    }

    #[test]
    fn trainingjob_cel_rules_are_in_the_crd() {
        let crd = TrainingJob::crd();
        let spec = spec_node(&crd, &[]);
        let rules = cel_rules(&spec);
        let soft = rules.iter().find(|r| r.2 == ".softDeadlineSeconds").expect("soft deadline rule");
        assert!(soft.0.contains("self.softDeadlineSeconds < self.activeDeadlineSeconds"), "{}", soft.0);
        assert!(soft.1.contains("spec.softDeadlineSeconds must be below spec.activeDeadlineSeconds"));
        assert_eq!(immutable_fields(&spec), ["tool", "params", "dataset", "resources", "provider"]);
        for editable in
            ["suspend", "activeDeadlineSeconds", "budget", "ttlSecondsAfterFinished", "monitoring"]
        {
            assert!(
                !rules.iter().any(|r| r.0.contains(&format!("oldSelf.{editable}"))),
                "{editable} stays editable"
            );
        }
        let monitoring = spec_node(&crd, &["monitoring"]);
        let poll = cel_rules(&monitoring);
        assert_eq!(poll.len(), 1);
        assert!(poll[0].0.contains("self.pollIntervalSeconds < self.noProgressTimeoutSeconds"));
        assert_eq!(poll[0].2, ".pollIntervalSeconds");
        assert_rules_name_their_field(&crd, &[]);
        assert_rules_name_their_field(&crd, &["monitoring"]);
        // An omitted `params` is stored as `{}`, so omitting it later is no change.
        assert_eq!(spec_node(&crd, &["params"])["default"], serde_json::json!({}));
    }

    #[test]
    fn gpuinstance_cel_rules_are_in_the_crd() {
        let crd = GpuInstance::crd();
        let spec = spec_node(&crd, &[]);
        assert_eq!(
            immutable_fields(&spec),
            [
                "provider",
                "requirements",
                "image",
                "env",
                "onstart",
                "sshPublicKey",
                "sshKeySecretRef",
                "maxLifetimeSeconds"
            ]
        );
        let boot = cel_rules(&spec).into_iter().find(|r| r.2 == ".bootTimeoutSeconds").expect("boot rule");
        assert!(boot.0.contains("self.bootTimeoutSeconds < self.maxLifetimeSeconds"), "{}", boot.0);
        assert_rules_name_their_field(&crd, &[]);
    }

    /// A transition rule on an optional field must also refuse adding and removing it, which a
    /// rule on the field itself would not see (it runs only when old and new both have it).
    #[test]
    fn immutability_rules_cover_adding_and_removing_optional_fields() {
        let spec = spec_node(&GpuInstance::crd(), &[]);
        let onstart = cel_rules(&spec).into_iter().find(|r| r.2 == ".onstart").unwrap();
        assert!(onstart.0.starts_with("has(self.onstart) == has(oldSelf.onstart)"), "{}", onstart.0);
        assert_eq!(onstart.3, "FieldValueForbidden");
    }

    /// The API server estimates each rule's cost from the largest value the schema allows and
    /// refuses a CRD whose rules could cost too much: without bounds, a list is as long as a
    /// request can be. Every list a rule compares has `maxItems`, the strings in it `maxLength`,
    /// and a free-form object `maxProperties`.
    #[test]
    fn fields_compared_by_rules_are_bounded() {
        fn check(path: &str, node: &serde_json::Value, in_list: bool, unbounded: &mut Vec<String>) {
            let missing = |key: &str| node.get(key).is_none();
            let bounded = match node["type"].as_str() {
                Some("array") => !missing("maxItems"),
                Some("string") => !in_list || !missing("maxLength"),
                Some("object") if node["x-kubernetes-preserve-unknown-fields"] == true => {
                    !missing("maxProperties")
                }
                _ => true,
            };
            if !bounded {
                unbounded.push(path.to_string());
            }
            if node["type"] == "array" {
                check(&format!("{path}[]"), &node["items"], true, unbounded);
            }
            for (name, child) in node["properties"].as_object().into_iter().flatten() {
                check(&format!("{path}.{name}"), child, in_list, unbounded);
            }
        }
        let mut unbounded = Vec::new();
        for crd in crds() {
            let spec = spec_node(&crd, &[]);
            for field in immutable_fields(&spec) {
                let path = format!("{}.spec.{field}", crd.spec.names.kind);
                check(&path, &spec["properties"][&field], false, &mut unbounded);
            }
        }
        assert!(unbounded.is_empty(), "compared by a CEL rule but unbounded: {unbounded:?}");
    }

    #[test]
    fn progress_percent_comes_from_counts() {
        let mut p = ProgressStatus::default();
        p.set_step(1234, Some(4000));
        assert_eq!(p.percent, Some(30.8));
        assert_eq!(p.percent_text.as_deref(), Some("30%"));
        p.set_step(5, None);
        assert_eq!(p.percent, None);
    }
}

/// The CRDs' CEL rules evaluated without an API server, by kube-cel (the evaluator behind
/// kube-core's `validate_cel`), which applies the schema's defaults first as the API server does.
/// Only the CEL rules run here, not the OpenAPI checks (patterns, ranges, `oneOf`); the real API
/// server runs both in `tests/apiserver.rs`.
#[cfg(test)]
mod cel_tests {
    use super::*;
    use serde_json::{Value, json};

    fn schema(crd: &CustomResourceDefinition) -> Value {
        serde_json::to_value(
            crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap(),
        )
        .unwrap()
    }

    fn crd_for(object: &Value) -> CustomResourceDefinition {
        match object["kind"].as_str() {
            Some("TrainingJob") => TrainingJob::crd(),
            Some("GpuInstance") => GpuInstance::crd(),
            other => panic!("unknown kind {other:?}"),
        }
    }

    /// The failures of `object` (an update of `old` when given), as `field: message` lines.
    fn failures(object: &Value, old: Option<&Value>) -> Vec<String> {
        match kube_cel::Validator::new().validate(&schema(&crd_for(object)), object, old) {
            Ok(()) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    fn example(path: &std::path::Path) -> (String, Value) {
        let text = std::fs::read_to_string(path).unwrap();
        (text.clone(), serde_yaml::from_str(&text).unwrap())
    }

    fn examples_in(dir: &str) -> Vec<std::path::PathBuf> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn valid_examples_pass_the_rules() {
        for path in examples_in("examples") {
            let (_, object) = example(&path);
            assert_eq!(failures(&object, None), Vec::<String>::new(), "{}", path.display());
        }
    }

    /// The invalid examples marked `(CEL rule)` are refused by a rule naming their field.
    #[test]
    fn cross_field_examples_are_refused_naming_the_field() {
        let mut checked = 0;
        for path in examples_in("examples/invalid") {
            let (text, object) = example(&path);
            let expect = text.lines().next().and_then(|l| l.strip_prefix("# expect: ")).unwrap();
            if !expect.ends_with("(CEL rule)") {
                continue;
            }
            let field = expect.split(": ").next().unwrap();
            let failures = failures(&object, None);
            assert!(
                failures.iter().any(|f| f.starts_with(&format!("{field}: {field} "))),
                "{}: expected a failure naming {field}, got {failures:?}",
                path.display()
            );
            checked += 1;
        }
        assert!(checked >= 4, "only {checked} CEL examples");
    }

    /// `edit` merged into a copy of `object` (objects merge, everything else replaces; null
    /// removes), as a JSON merge patch does.
    fn merged(object: &Value, edit: &Value) -> Value {
        match (object, edit) {
            (Value::Object(o), Value::Object(e)) => {
                let mut out = o.clone();
                for (k, v) in e {
                    if v.is_null() {
                        out.remove(k);
                    } else {
                        out.insert(k.clone(), merged(o.get(k).unwrap_or(&Value::Null), v));
                    }
                }
                Value::Object(out)
            }
            _ => edit.clone(),
        }
    }

    fn check_edits(example_file: &str, editable: &[Value], immutable: &[(&str, Value)]) {
        let (_, old) =
            example(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(example_file));
        for edit in editable {
            let new = merged(&old, &json!({ "spec": edit }));
            assert_eq!(failures(&new, Some(&old)), Vec::<String>::new(), "editing {edit} must pass");
        }
        for (field, edit) in immutable {
            let new = merged(&old, &json!({ "spec": edit }));
            let failures = failures(&new, Some(&old));
            let expected = format!("{field}: {field} is immutable");
            assert!(failures.iter().any(|f| f.starts_with(&expected)), "editing {edit}: got {failures:?}");
        }
    }

    #[test]
    fn a_jobs_steering_is_editable_and_what_it_is_built_from_is_not() {
        check_edits(
            "trainingjob-full.yaml",
            &[
                json!({"suspend": true}),
                json!({"activeDeadlineSeconds": 20000, "softDeadlineSeconds": 18000}),
                json!({"budget": {"maxTotalCost": 9.5}}),
                json!({"ttlSecondsAfterFinished": null}),
                json!({"monitoring": {"pollIntervalSeconds": 30}}),
                json!({"output": {"huggingFace": null}}),
            ],
            &[
                ("spec.tool", json!({"tool": "demo@1"})),
                ("spec.params", json!({"params": {"steps": 10}})),
                ("spec.params", json!({"params": {"alpha": null}})),
                ("spec.params", json!({"params": null})),
                ("spec.dataset", json!({"dataset": {"s3": {"key": "portraits/v4.tar"}}})),
                ("spec.resources", json!({"resources": {"gpu": {"count": 2}}})),
                ("spec.resources", json!({"resources": {"regions": ["US"]}})),
                ("spec.provider", json!({"provider": {"vastai": null, "ssh": {"host": "gpu.example.com"}}})),
            ],
        );
    }

    #[test]
    fn a_gpuinstance_keeps_what_it_was_rented_with() {
        check_edits(
            "gpuinstance-interactive.yaml",
            &[json!({"bootTimeoutSeconds": 1200}), json!({"imageSizeGb": 12})],
            &[
                ("spec.image", json!({"image": "ubuntu:24.04"})),
                ("spec.requirements", json!({"requirements": {"maxPricePerHour": 2.0}})),
                ("spec.env", json!({"env": [{"name": "A", "value": "b"}]})),
                ("spec.onstart", json!({"onstart": "echo hi"})),
                ("spec.sshPublicKey", json!({"sshPublicKey": null})),
                ("spec.sshKeySecretRef", json!({"sshKeySecretRef": {"name": "mine"}})),
                ("spec.maxLifetimeSeconds", json!({"maxLifetimeSeconds": 36000})),
            ],
        );
    }
}
