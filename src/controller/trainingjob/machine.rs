//! The job's machine: renting one GpuInstance per attempt, and reading its state, price and
//! readiness into the job's status.

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;
use tracing::info;

use super::pass::Pass;
use super::{Error, provision};
use crate::api::{GpuInstance, Reason, TrainingJobPhase, from_k8s_time, is_condition_true, job_condition};
use crate::engine::MachineObservation;
use crate::engine::driver::{LostWatch, record_machine_ready};

impl Pass<'_> {
    /// Instance details, cost and the InstanceReady condition from the GpuInstance.
    pub(super) async fn record_machine(
        &mut self,
        instance: Option<&GpuInstance>,
        machine: &MachineObservation,
        now: DateTime<Utc>,
    ) {
        let Some(instance) = instance else { return };
        let name = instance.name_any();
        self.status.instance = Some(provision::instance_status(&name, Some(instance)));
        let gi_status = instance.status.clone().unwrap_or_default();
        if self.status.phase == TrainingJobPhase::Provisioning
            && let Some(message) = provision::provisioning_message(&name, self.status.attempts, &gi_status)
        {
            // Why renting takes long (no offers, booting, a bad host) is visible on the job.
            self.status.message = Some(message);
        }
        let eta = self.status.progress.as_ref().and_then(|p| p.eta_seconds);
        if let Some(offer) = &gi_status.offer {
            self.status.cost = Some(crate::engine::cost::job_cost(
                offer.price_per_hour,
                gi_status.launched_at.as_ref().map(from_k8s_time),
                eta,
                provision::prior_cost(instance),
                self.status.cost.as_ref(),
                now,
            ));
        }
        if let MachineObservation::Ready { .. } = machine
            && !is_condition_true(&self.status.conditions, job_condition::INSTANCE_READY)
        {
            let gpu = self.status.instance.as_ref().and_then(|i| i.gpu.clone()).unwrap_or_default();
            let message = format!("GpuInstance {name} is ready ({gpu})");
            record_machine_ready(&mut self.status, &message, now);
            self.event(EventType::Normal, Reason::InstanceReady, "Provision", &message).await;
        }
    }

    /// Creates the key Secret and the GpuInstance of `attempt`, releasing the previous machine.
    pub(super) async fn acquire(&mut self, attempt: i32) -> Result<(), Error> {
        let job_name = self.job.name_any();
        let name = provision::instance_name(&job_name, attempt);
        let mut avoid = Vec::new();
        if let Some(previous) = self.status.instance.clone().filter(|i| i.name != name) {
            // What failed this job before is not rented again.
            if let Some(gone) = self
                .instances
                .get_opt(&previous.name)
                .await
                .map_err(super::kube_err("read the GpuInstance"))?
            {
                avoid = provision::machines_to_avoid(&gone);
            }
            provision::ensure_instance_deleted(&self.instances, &previous.name).await?;
        }
        provision::ensure_key_secret(&self.secrets, self.job).await?;
        let tool_image = self.tool.image.clone();
        let spent = self.status.cost.as_ref().map(|c| c.accrued).unwrap_or(0.0);
        let desired = provision::desired_instance(self.job, attempt, &tool_image, spent, &avoid)?;
        let created = provision::ensure_instance(&self.instances, &desired).await?;
        self.status.instance = Some(provision::instance_status(&name, None));
        let message = format!("renting a machine: GpuInstance {name} (attempt {attempt})");
        self.status.message = Some(message.clone());
        if created {
            info!(job = %job_name, gpuinstance = %name, attempt, "Created GpuInstance");
            self.event(EventType::Normal, Reason::Provisioning, "Provision", &message).await;
        }
        Ok(())
    }
}

/// Tells a step on the machine that its GpuInstance was found failed, lost or gone. SSH to a
/// machine that died keeps reconnecting and resuming for minutes before it gives up; meanwhile
/// the job would neither notice the loss nor rent a replacement.
pub(super) struct GpuInstanceWatch {
    pub(super) api: Api<GpuInstance>,
    pub(super) name: String,
}

#[async_trait::async_trait]
impl LostWatch for GpuInstanceWatch {
    async fn is_lost(&self) -> bool {
        // An API error says nothing about the machine: look again later.
        match self.api.get_opt(&self.name).await {
            Ok(found) => lost(&provision::observe(found.as_ref())),
            Err(_) => false,
        }
    }
}

/// True when the machine is no use any more: failed, lost, going away or gone.
fn lost(machine: &MachineObservation) -> bool {
    matches!(machine, MachineObservation::Failed { .. } | MachineObservation::None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_lost_deleted_and_missing_machines_are_lost() {
        assert!(lost(&MachineObservation::None));
        assert!(lost(&MachineObservation::Failed {
            reason: crate::api::Reason::InstanceLost,
            message: "x".into()
        }));
        assert!(!lost(&MachineObservation::Starting));
        assert!(!lost(&MachineObservation::Ready { price_per_hour: 0.1 }));
    }
}
