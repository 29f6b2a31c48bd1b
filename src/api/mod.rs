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
