//! Writes to the API server shared by the controllers: status by server-side apply, metadata by
//! merge patches that carry the `resourceVersion` that was read, so a concurrent change makes the
//! write fail (409) instead of silently overwriting it.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Field manager of the GpuInstance controller.
pub const GPUINSTANCE_MANAGER: &str = "gpu-trainer-gpuinstance";
/// Field manager of the TrainingJob controller.
pub const TRAININGJOB_MANAGER: &str = "gpu-trainer-trainingjob";

/// Replaces the status we own with `status` (server-side apply, forced: the controller is the
/// only writer of status).
pub async fn apply_status<K, S>(api: &Api<K>, name: &str, manager: &str, status: &S) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(manager).force(), &Patch::Apply(&patch)).await
}

/// Sets (Some) or removes (None) annotations, failing with 409 if the object changed since `obj`
/// was read.
pub async fn set_annotations_locked<K>(
    api: &Api<K>,
    obj: &K,
    changes: &[(&str, Option<String>)],
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut annotations = serde_json::Map::new();
    for (key, value) in changes {
        annotations.insert(
            (*key).to_string(),
            value.clone().map_or(serde_json::Value::Null, serde_json::Value::String),
        );
    }
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": obj.resource_version(), "annotations": annotations }
    });
    api.patch(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await
}

/// Replaces the finalizer list, failing with 409 if the object changed since `obj` was read.
pub async fn set_finalizers_locked<K>(
    api: &Api<K>,
    obj: &K,
    finalizers: Vec<String>,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": obj.resource_version(), "finalizers": finalizers }
    });
    api.patch(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await
}

/// True for a 409 Conflict (someone else changed the object; re-read and try again).
pub fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 409)
}

/// True for a 404 Not Found.
pub fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 404)
}
