//! Giving a machine back, once for both front ends: one pass of the delete protocol destroys
//! the recorded instance and every instance carrying the rent's label (which also finds a rent
//! whose answer was lost), after looking at each; "no such instance" and `Released` count as
//! gone. A front end repeats passes until one finds everything gone, and looks once more: the
//! GpuInstance controller across reconciles (never giving up, `TerminationStuck` after a while),
//! `launch` in the foreground.

use crate::machine::decide::is_gone;
use crate::provider::{GpuProvider, InstanceId, InstanceState};

/// A provider call of the delete protocol that failed.
#[derive(Debug, thiserror::Error)]
#[error("failed to {operation} at the provider")]
pub struct DestroyError {
    pub operation: &'static str,
    #[source]
    pub source: crate::provider::Error,
}

fn failed(operation: &'static str) -> impl FnOnce(crate::provider::Error) -> DestroyError {
    move |source| DestroyError { operation, source }
}

/// What one pass found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestroyPass {
    /// Every instance the pass looked at (the recorded ones and those found by label).
    pub instances: Vec<InstanceId>,
    /// True when all of them were gone already (nothing was destroyed in this pass).
    pub all_gone: bool,
}

/// Destroys `recorded` and every instance carrying `label` that is not released yet, and says
/// whether all of them were gone already.
pub async fn destroy_pass(
    provider: &dyn GpuProvider,
    recorded: &[InstanceId],
    label: Option<&str>,
) -> Result<DestroyPass, DestroyError> {
    let mut ids = recorded.to_vec();
    if let Some(label) = label {
        let labelled =
            provider.list_instances_by_label(label).await.map_err(failed("list instances by label"))?;
        ids.extend(labelled.iter().filter(|i| i.state != InstanceState::Released).map(|i| i.id));
    }
    ids.sort();
    ids.dedup();
    let mut all_gone = true;
    for &id in &ids {
        let observed = match provider.get_instance(id).await {
            Ok(observed) => Some(observed),
            Err(err) if err.is_not_found() => None,
            Err(err) => return Err(failed("get the instance")(err)),
        };
        if is_gone(observed.as_ref()) {
            continue;
        }
        all_gone = false;
        provider.destroy_instance(id).await.map_err(failed("destroy the instance"))?;
    }
    Ok(DestroyPass { instances: ids, all_gone })
}
