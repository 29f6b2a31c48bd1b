//! The machine port of `launch`: this machine, an SSH machine, or one rented on Vast.ai for the
//! job (rented with the job's own key and a label, followed until SSH answers, destroyed
//! whenever the job ends and confirmed gone).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::rent::{self, MachineState, RentSpec, RentedMachine};
use super::{LocalError, LocalRun, MachineSpec, provider_err};
use crate::api::{
    ConditionStatus, CostStatus, JobInstanceStatus, Reason, describe_gpu, job_condition, set_condition,
};
use crate::crash::crash_point;
use crate::engine::MachineObservation;
use crate::engine::driver::{LostWatch, record_machine_ready};
use crate::error::error_chain;
use crate::machine::adopt::{Adopted, adopt_by_label, pending_grace_left};
use crate::machine::decide::{Verdict, boot_deadline_passed, classify};
use crate::machine::destroy::destroy_pass;
use crate::machine::onstart::render_onstart;
use crate::machine::rent::{RentFailure, triage_rent_error};
use crate::provider::{GpuProvider, Instance, InstanceId, InstanceState, LaunchRequest};
use crate::remote::RemoteExec;
use crate::remote::local::LocalExec;
use crate::remote::ssh::{SshExec, SshOptions, SshTarget};

/// Passes of the delete protocol before `launch` gives up (and says the instance is still
/// rented), and the pause between them.
const RELEASE_PASSES: u32 = 15;
const RELEASE_POLL: Duration = Duration::from_secs(2);

/// Tells a step on a rented machine that the provider no longer lists it (or lists it released).
pub(super) struct RentedWatch {
    pub(super) provider: Arc<dyn GpuProvider>,
    pub(super) id: InstanceId,
}

#[async_trait]
impl LostWatch for RentedWatch {
    async fn is_lost(&self) -> bool {
        match self.provider.get_instance(self.id).await {
            Ok(instance) => instance.state == InstanceState::Released,
            Err(err) => err.is_not_found(),
        }
    }
}

impl LocalRun {
    /// The machine's `RemoteExec`, connected on first use (and the host key recorded).
    pub(super) async fn connection(&mut self) -> Result<Arc<dyn RemoteExec>, LocalError> {
        if let Some(exec) = &self.exec {
            return Ok(exec.clone());
        }
        let exec: Arc<dyn RemoteExec> = match &self.machine {
            MachineSpec::Local => Arc::new(LocalExec::new(self.state_dir.join("work"))?),
            MachineSpec::Ssh { target, key, .. } => {
                let ssh = SshExec::connect(
                    target.clone(),
                    key.clone(),
                    self.state.host_key.clone(),
                    SshOptions::default(),
                )
                .await?;
                self.state.host_key = ssh.host_key_fingerprint();
                Arc::new(ssh)
            }
            MachineSpec::Vastai(rent) => {
                let endpoint = self.state.rented.as_ref().and_then(RentedMachine::ssh).ok_or_else(|| {
                    crate::remote::RemoteError::InvalidRequest(
                        "the rented machine has no SSH address yet".into(),
                    )
                })?;
                let target = SshTarget { host: endpoint.host, port: endpoint.port, user: "root".into() };
                // A machine that booted answers quickly; the boot deadline covers the rest.
                let options =
                    SshOptions { connect_deadline: Duration::from_secs(60), ..SshOptions::default() };
                let ssh =
                    SshExec::connect(target, rent.key.clone(), self.state.host_key.clone(), options).await?;
                self.state.host_key = ssh.host_key_fingerprint();
                Arc::new(ssh)
            }
        };
        self.exec = Some(exec.clone());
        Ok(exec)
    }

    pub(super) fn machine_description(&self) -> String {
        match &self.machine {
            MachineSpec::Local => "this machine".into(),
            MachineSpec::Ssh { target, .. } => target.to_string(),
            MachineSpec::Vastai(_) => "a Vast.ai machine".into(),
        }
    }

    pub(super) fn rent_spec(&self) -> Option<RentSpec> {
        match &self.machine {
            MachineSpec::Vastai(rent) => Some((**rent).clone()),
            _ => None,
        }
    }

    /// True while a rented machine may bill (nothing is rented for `local` and `ssh`).
    pub fn holds_machine(&self) -> bool {
        self.state.rented.as_ref().is_some_and(RentedMachine::holds_machine)
    }

    /// The rented instance, when there is one.
    pub fn rented_instance(&self) -> Option<InstanceId> {
        self.state.rented.as_ref().and_then(RentedMachine::instance_id)
    }

    /// What is known of the machine now. For `local` and `ssh` the machine is simply there once
    /// acquired; a rented one is asked about (not more often than its poll interval).
    pub(super) async fn observe_machine(
        &mut self,
        now: DateTime<Utc>,
    ) -> Result<MachineObservation, LocalError> {
        let Some(rent) = self.rent_spec() else {
            return Ok(if self.state.status.attempts > 0 && !self.state.status.phase.is_finished() {
                MachineObservation::Ready { price_per_hour: 0.0 }
            } else {
                MachineObservation::None
            });
        };
        if self.state.rented.as_ref().is_some_and(|r| matches!(r.machine, MachineState::RentPending { .. })) {
            self.resolve_pending(&rent).await?;
        }
        let Some(rented) = self.state.rented.clone() else { return Ok(MachineObservation::None) };
        let Some(id) = rented.live_instance() else {
            // Released: a failure recorded below, until the engine rents the next machine.
            return Ok(match &self.last_machine {
                Some((_, failed @ MachineObservation::Failed { .. })) => failed.clone(),
                _ => MachineObservation::None,
            });
        };
        if let Some((at, last)) = &self.last_machine {
            let every = if rented.is_ready() { rent.liveness_poll } else { rent.boot_poll };
            if at.elapsed() < every {
                return Ok(last.clone());
            }
        }
        let observed = match rent.provider.get_instance(id).await {
            Ok(instance) => Some(instance),
            Err(err) if err.is_not_found() => None,
            // A provider hiccup says nothing about the machine: keep the last word.
            Err(err) if err.is_retryable() => {
                return Ok(self
                    .last_machine
                    .as_ref()
                    .map(|(_, m)| m.clone())
                    .unwrap_or(MachineObservation::Starting));
            }
            Err(err) => return Err(provider_err("look at the instance")(err)),
        };
        let observation = match observed {
            None => {
                self.forget_machine(now);
                MachineObservation::Failed {
                    reason: Reason::InstanceLost,
                    message: format!("the provider no longer lists instance {id}"),
                }
            }
            Some(instance) => self.judge(&rent, id, &instance, now).await?,
        };
        self.last_machine = Some((tokio::time::Instant::now(), observation.clone()));
        Ok(observation)
    }

    /// What one observation of the instance means; a machine that will not work for us is
    /// destroyed here.
    async fn judge(
        &mut self,
        rent: &RentSpec,
        id: InstanceId,
        instance: &Instance,
        now: DateTime<Utc>,
    ) -> Result<MachineObservation, LocalError> {
        let Some(rented) = self.state.rented.clone() else { return Ok(MachineObservation::None) };
        let launched = rented.launched_at().unwrap_or(now);
        let booting = |what: String| {
            if boot_deadline_passed(launched, rent.boot_timeout, now) {
                Err((Reason::BootTimeout, format!("{what} after {} s", rent.boot_timeout.as_secs()), true))
            } else {
                Ok(what)
            }
        };
        let verdict = match classify(instance, rented.is_ready()) {
            Verdict::Booting => {
                let state = instance.actual_status.clone().unwrap_or_else(|| "created".into());
                let detail = instance.status_msg.clone().map(|m| format!(": {m}")).unwrap_or_default();
                booting(format!("instance {id} is booting ({state}{detail})"))
            }
            Verdict::Running => match instance.ssh.clone() {
                None => booting(format!("instance {id} runs; waiting for its SSH address")),
                Some(endpoint) => {
                    if let Some(r) = self.state.rented.as_mut() {
                        r.set_ssh(endpoint);
                    }
                    if rented.is_ready() {
                        return Ok(MachineObservation::Ready { price_per_hour: rented.price_per_hour() });
                    }
                    match self.connection().await {
                        Ok(_) => return Ok(self.machine_ready(id, now)),
                        Err(LocalError::Remote(err @ crate::remote::RemoteError::HostKeyChanged { .. })) => {
                            return Err(LocalError::Remote(err));
                        }
                        Err(err) => {
                            self.exec = None;
                            booting(format!(
                                "instance {id} runs but SSH does not answer yet: {}",
                                error_chain(&err)
                            ))
                        }
                    }
                }
            },
            Verdict::Release { reason, exclude_machine, message, .. } => {
                Err((reason, format!("instance {id}: {message}"), exclude_machine))
            }
        };
        match verdict {
            Ok(message) => {
                self.state.status.reason = Some(Reason::Booting);
                self.state.status.message = Some(message);
                Ok(MachineObservation::Starting)
            }
            Err((reason, message, exclude)) => {
                if exclude && let Some(r) = self.state.rented.as_mut() {
                    r.exclude_machine(instance.machine_id);
                }
                self.release().await?;
                Ok(MachineObservation::Failed { reason, message: format!("{message}; it was destroyed") })
            }
        }
    }

    /// Records that SSH answers: the machine is ready for work.
    fn machine_ready(&mut self, id: InstanceId, now: DateTime<Utc>) -> MachineObservation {
        let Some(rented) = self.state.rented.as_mut() else { return MachineObservation::None };
        rented.mark_ready();
        let price = rented.price_per_hour();
        let gpu = rented.offer.as_ref().map(|o| describe_gpu(o.num_gpus, &o.gpu_name)).unwrap_or_default();
        let at = rented.ssh().map(|e| format!("{}:{}", e.host, e.port)).unwrap_or_default();
        let message = format!("instance {id} ({gpu}, ${price:.3}/h) is ready at {at}");
        record_machine_ready(&mut self.state.status, &message, now);
        self.state.status.reason = Some(Reason::Ready);
        self.state.status.message = Some(message);
        MachineObservation::Ready { price_per_hour: price }
    }

    /// Forgets the connection and what was read from the machine (it is gone or replaced).
    pub(super) fn forget_machine(&mut self, now: DateTime<Utc>) {
        self.exec = None;
        self.memory.forget();
        if let Some(rented) = self.state.rented.as_mut() {
            rented.release(now);
        }
    }

    /// A rent call whose answer was lost (the launcher died, or the call failed in a way after
    /// which the provider may have rented anyway): the instance carrying the label is adopted
    /// (of several the oldest, the rest destroyed); when none shows up within the grace period
    /// the rent never happened.
    async fn resolve_pending(&mut self, rent: &RentSpec) -> Result<(), LocalError> {
        loop {
            let Some(rented) = self.state.rented.clone() else { return Ok(()) };
            let MachineState::RentPending { since } = rented.machine else { return Ok(()) };
            let adopted = adopt_by_label(&*rent.provider, &rented.label, &rent.key.public_key_openssh())
                .await
                .map_err(|e| provider_err(e.operation)(e.source))?;
            if let Some(Adopted { survivor, .. }) = adopted {
                let message = format!("adopted instance {} found by its label {}", survivor.id, rented.label);
                if let Some(r) = self.state.rented.as_mut() {
                    let at = survivor.started_at.unwrap_or(since);
                    r.machine = MachineState::Booting { id: survivor.id, at, ssh: None };
                }
                if let Some(i) = self.state.status.instance.as_mut() {
                    i.provider_id = Some(survivor.id.to_string());
                }
                self.state.status.message = Some(message.clone());
                self.notes.push(message);
                return self.save();
            }
            if pending_grace_left(since, rent.create_pending_grace, Utc::now()).is_none() {
                // Never rented: this attempt does not count.
                if let Some(r) = self.state.rented.as_mut() {
                    r.machine = MachineState::None;
                }
                self.state.status.attempts = (self.state.status.attempts - 1).max(0);
                return self.save();
            }
            tokio::time::sleep(rent.boot_poll).await;
        }
    }

    /// Destroys whatever this job has rented (the recorded instance, and whatever carries the
    /// label of a rent whose answer was lost) and waits until the provider no longer lists it,
    /// looking twice. Returns the destroyed instance. Nothing happens for `local` and `ssh`, or
    /// when nothing is rented; repeating it is harmless.
    pub async fn release(&mut self) -> Result<Option<InstanceId>, LocalError> {
        let Some(rent) = self.rent_spec() else { return Ok(None) };
        let Some(rented) = self.state.rented.clone() else { return Ok(None) };
        let recorded: Vec<InstanceId> = rented.live_instance().into_iter().collect();
        let pending = matches!(rented.machine, MachineState::RentPending { .. });
        let label = pending.then(|| rented.label.clone());
        if recorded.is_empty() && label.is_none() {
            return Ok(None);
        }
        let instances = self.destroy_until_gone(&rent, &recorded, label.as_deref()).await?;
        let now = Utc::now();
        self.forget_machine(now);
        let destroyed = recorded.first().or(instances.first()).copied();
        if let Some(r) = self.state.rented.as_mut() {
            r.machine = MachineState::Released { id: destroyed };
        }
        if let Some(rented) = &self.state.rented {
            self.state.status.cost = Some(rent::cost(rented, None, self.state.status.cost.as_ref(), now));
        }
        self.save()?;
        if let Some(id) = destroyed {
            self.notes.push(format!("destroyed instance {id}"));
        }
        Ok(destroyed)
    }

    /// Passes of the delete protocol until two in a row find everything gone (a provider hiccup
    /// starts the count again); the instances it looked at.
    async fn destroy_until_gone(
        &self,
        rent: &RentSpec,
        recorded: &[InstanceId],
        label: Option<&str>,
    ) -> Result<Vec<InstanceId>, LocalError> {
        let mut seen = Vec::new();
        let mut gone_in_a_row = 0;
        for _ in 0..RELEASE_PASSES {
            match destroy_pass(&*rent.provider, recorded, label).await {
                Ok(pass) => {
                    seen.extend(pass.instances);
                    gone_in_a_row = if pass.all_gone { gone_in_a_row + 1 } else { 0 };
                    if gone_in_a_row == 2 {
                        seen.dedup();
                        return Ok(seen);
                    }
                    if pass.all_gone {
                        continue;
                    }
                }
                Err(err) if err.source.is_retryable() => gone_in_a_row = 0,
                Err(err) => return Err(provider_err(err.operation)(err.source)),
            }
            tokio::time::sleep(RELEASE_POLL).await;
        }
        let id = recorded.first().or(seen.first()).copied().unwrap_or_default();
        Err(LocalError::StillRented { id })
    }

    /// The machine of `attempt`: rented on Vast.ai, or this one / the SSH machine, which are
    /// simply there.
    pub(super) async fn acquire(&mut self, attempt: i32, now: DateTime<Utc>) -> Result<(), LocalError> {
        if let Some(rent) = self.rent_spec() {
            return self.rent(&rent, attempt, now).await;
        }
        let machine = self.machine_description();
        let status = &mut self.state.status;
        status.instance = Some(JobInstanceStatus {
            name: "launch".into(),
            provider_id: None,
            gpu: Some(machine.clone()),
            price_per_hour: Some(0.0),
        });
        status.cost =
            Some(CostStatus { price_per_hour: Some(0.0), accrued: 0.0, estimated_total: Some(0.0) });
        set_condition(
            &mut status.conditions,
            job_condition::INSTANCE_READY,
            ConditionStatus::True,
            Reason::Ready,
            format!("running on {machine}"),
            None,
            now,
        );
        status.reason = Some(Reason::Ready);
        status.message = Some(format!("running on {machine}"));
        Ok(())
    }

    /// Rents a machine for `attempt`: the previous one (lost, failed to boot) is destroyed
    /// first; the label and a pending mark are saved before the rent call and the instance id
    /// right after it.
    async fn rent(&mut self, rent: &RentSpec, attempt: i32, now: DateTime<Utc>) -> Result<(), LocalError> {
        self.release().await?;
        self.forget_machine(now);
        self.last_machine = None;
        // A new machine has a new host key, pinned on first contact again.
        self.state.host_key = None;
        let previous = self.state.rented.clone().unwrap_or_default();
        let selection = rent::choose_offer(
            &*rent.provider,
            &self.job.spec.resources,
            &rent.config,
            &previous.excluded_machine_ids,
        )
        .await?;
        let offer = selection.offer.clone();
        let installation_id = if previous.installation_id.is_empty() {
            crate::machine::label::random_installation_id()
        } else {
            previous.installation_id.clone()
        };
        let label = crate::machine::label::launch_label(&installation_id, &self.state.uid, attempt);
        self.state.rented = Some(RentedMachine {
            installation_id,
            label: label.clone(),
            machine: MachineState::RentPending { since: now },
            offer: Some(crate::machine::offer::offer_status(&offer)),
            excluded_machine_ids: previous.excluded_machine_ids.clone(),
            prior_cost: previous.prior_cost,
            ..RentedMachine::default()
        });
        let status = &mut self.state.status;
        status.instance = Some(JobInstanceStatus {
            name: label.clone(),
            provider_id: None,
            gpu: Some(describe_gpu(offer.num_gpus, &offer.gpu_name)),
            price_per_hour: Some(offer.price_per_hour),
        });
        status.reason = Some(Reason::Launching);
        status.message = Some(format!("renting {}", crate::machine::offer::describe_offer(&offer)));
        self.save()?;
        crash_point("launch-before-rent");

        let lifetime =
            crate::machine::onstart::job_machine_lifetime_seconds(self.job.spec.active_deadline_seconds);
        let request = LaunchRequest {
            offer_id: offer.id,
            image: self.image(),
            disk_gb: self.job.spec.resources.disk_gb.unwrap_or(rent.config.default_disk_gb),
            env: Default::default(),
            onstart: Some(render_onstart(lifetime, None)),
            label: Some(label),
            ssh: true,
            ssh_public_key: Some(rent.key.public_key_openssh()),
            bid_price_per_hour: None,
        };
        match rent.provider.create_instance(&request).await {
            Ok(id) => {
                crash_point("launch-after-rent");
                if let Some(r) = self.state.rented.as_mut() {
                    r.machine = MachineState::Booting { id, at: now, ssh: None };
                }
                if let Some(i) = self.state.status.instance.as_mut() {
                    i.provider_id = Some(id.to_string());
                }
                self.state.status.message =
                    Some(format!("rented instance {id}: {}", crate::machine::offer::describe_offer(&offer)));
                self.save()
            }
            Err(err) => self.rent_failed(rent, attempt, offer.machine_id, err).await,
        }
    }

    /// A rent call that failed: a contract it left behind is destroyed and the machine avoided;
    /// an offer taken meanwhile is tried elsewhere (the attempt does not count); a rent that may
    /// have happened is resolved by its label.
    async fn rent_failed(
        &mut self,
        rent: &RentSpec,
        attempt: i32,
        machine_id: i64,
        err: crate::provider::Error,
    ) -> Result<(), LocalError> {
        let triage = triage_rent_error(&err);
        if let RentFailure::LeftContract(contract) = triage {
            // The rent failed but left a billing contract: destroy it first.
            rent.provider
                .destroy_instance(contract)
                .await
                .map_err(provider_err("destroy a contract left by a failed rent"))?;
            if let Some(r) = self.state.rented.as_mut() {
                r.exclude_machine(Some(machine_id));
            }
        }
        let retry_elsewhere = matches!(triage, RentFailure::LeftContract(_) | RentFailure::OfferTaken);
        if retry_elsewhere {
            self.create_failures += 1;
            if let Some(r) = self.state.rented.as_mut() {
                r.machine = MachineState::None;
            }
            self.state.status.attempts = attempt - 1;
            self.save()?;
            if self.create_failures >= rent::MAX_CREATE_FAILURES {
                return Err(provider_err("rent an instance")(err));
            }
            return Ok(());
        }
        if triage == RentFailure::MaybeRented {
            // The rent may have happened: the pending mark stays, and the label decides.
            return self.resolve_pending(rent).await;
        }
        if let Some(r) = self.state.rented.as_mut() {
            r.machine = MachineState::None;
        }
        self.state.status.attempts = attempt - 1;
        self.save()?;
        Err(provider_err("rent an instance")(err))
    }
}
