//! From errors on a machine to a verdict on it. A pass that fails because of what the machine
//! did (it stopped answering, sent more than any honest machine would, presented another host
//! key) is not simply retried against the same machine until the job's deadline: the machine
//! is released through its GpuInstance ([`request_release`]) and the job replaces it within
//! `backoffLimit`, like any lost machine. One slow answer may be the network; a deterministic
//! fault (too much output, refused reports, another host key) is never retried.

use kube::api::Api;
use kube::runtime::events::EventType;
use tracing::warn;

use super::Error;
use crate::api::{GpuInstance, Reason};
use crate::controller::gpuinstance::verdict::request_release;
use crate::error::error_chain;
use crate::remote::MachineFault;

/// Passes in a row that end with the machine not answering before it is given up.
pub const UNRESPONSIVE_PASSES: u32 = 2;

/// What the job's machine did wrong lately, kept in the job's runtime.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachineFaults {
    /// The GpuInstance the count is about.
    instance: String,
    unresponsive_in_a_row: u32,
}

impl MachineFaults {
    /// A pass went through: the machine answers.
    pub fn clear(&mut self) {
        self.unresponsive_in_a_row = 0;
    }

    /// Counts a fault of `instance`'s machine and returns the reason to release it for, if any.
    pub fn record(&mut self, instance: &str, fault: MachineFault) -> Option<Reason> {
        if self.instance != instance {
            *self = Self { instance: instance.to_string(), unresponsive_in_a_row: 0 };
        }
        match fault {
            MachineFault::HostKeyChanged => Some(Reason::HostKeyChanged),
            MachineFault::Misbehaved => Some(Reason::MachineMisbehaved),
            MachineFault::Unresponsive => {
                self.unresponsive_in_a_row += 1;
                (self.unresponsive_in_a_row >= UNRESPONSIVE_PASSES).then_some(Reason::MachineUnresponsive)
            }
        }
    }
}

/// The machine's part in a failed pass, with what it did in words. Pure.
pub fn fault_of(error: &Error) -> Option<(MachineFault, String)> {
    match error {
        Error::Abandoned(abandoned) if crate::engine::driver::is_machine_step(abandoned.step) => Some((
            MachineFault::Unresponsive,
            format!(
                "the {} step on the machine did not finish within the pass limit of {} s",
                abandoned.step,
                abandoned.after.as_secs()
            ),
        )),
        Error::UnpinnedHostKey(message) => Some((MachineFault::HostKeyChanged, message.clone())),
        _ => {
            let remote = crate::remote::remote_error_in(error)?;
            Some((remote.machine_fault()?, error_chain(remote)))
        }
    }
}

/// Judges a failed pass: when the machine is to blame often or badly enough, asks for its
/// release and tells the job's owner why. Returns true when a release was requested.
pub(super) async fn judge(
    ctrl: &super::JobController,
    job: &crate::api::TrainingJob,
    instances: &Api<GpuInstance>,
    faults: &mut MachineFaults,
    instance: &str,
    error: &Error,
) -> Result<bool, Error> {
    let Some((fault, what)) = fault_of(error) else { return Ok(false) };
    let Some(reason) = faults.record(instance, fault) else {
        warn!(job = %kube::ResourceExt::name_any(job), gpuinstance = instance, fault = ?fault, what = %what, "The machine did not answer; trying again once");
        return Ok(false);
    };
    let message = format!("the machine of GpuInstance {instance} {}: {what}", fault_words(fault));
    request_release(instances, instance, reason, &message)
        .await
        .map_err(super::kube_err("request the release of a misbehaving machine"))?;
    warn!(job = %kube::ResourceExt::name_any(job), gpuinstance = instance, %reason, what = %what, "Releasing the machine for what it did");
    ctrl.ctx.event(job, EventType::Warning, reason, "Release", format!("{message}; releasing it")).await;
    Ok(true)
}

fn fault_words(fault: MachineFault) -> &'static str {
    match fault {
        MachineFault::Unresponsive => "did not answer in time",
        MachineFault::Misbehaved => "sent what no honest machine would",
        MachineFault::HostKeyChanged => {
            "cannot be trusted: its host key is not the one recorded at first contact"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::pass_limit::Abandoned;
    use crate::remote::RemoteError;
    use std::time::Duration;

    #[test]
    fn deterministic_faults_are_judged_at_once_and_silence_on_the_second_pass() {
        let mut faults = MachineFaults::default();
        assert_eq!(faults.record("job-1", MachineFault::Misbehaved), Some(Reason::MachineMisbehaved));
        assert_eq!(faults.record("job-1", MachineFault::HostKeyChanged), Some(Reason::HostKeyChanged));
        assert_eq!(
            faults.record("job-1", MachineFault::Unresponsive),
            None,
            "one silence may be the network"
        );
        assert_eq!(faults.record("job-1", MachineFault::Unresponsive), Some(Reason::MachineUnresponsive));
    }

    #[test]
    fn an_answer_or_another_machine_starts_the_count_again() {
        let mut faults = MachineFaults::default();
        assert_eq!(faults.record("job-1", MachineFault::Unresponsive), None);
        faults.clear();
        assert_eq!(faults.record("job-1", MachineFault::Unresponsive), None);
        assert_eq!(faults.record("job-2", MachineFault::Unresponsive), None, "a new machine starts at zero");
        assert_eq!(faults.record("job-2", MachineFault::Unresponsive), Some(Reason::MachineUnresponsive));
    }

    #[test]
    fn the_fault_is_found_through_the_error_chain() {
        let timeout = Error::Remote(RemoteError::timeout(
            crate::remote::bounds::Phase::Output,
            Duration::from_secs(30),
        ));
        assert_eq!(fault_of(&timeout).map(|f| f.0), Some(MachineFault::Unresponsive));
        let flood = Error::Monitor(Box::new(crate::monitor::poller::MonitorError::Read {
            path: "train.log".into(),
            target: "root@h:22".into(),
            source: RemoteError::TooLarge { what: "the trainer's log".into(), limit: 1 << 20 },
        }));
        let (fault, what) = fault_of(&flood).unwrap();
        assert_eq!(fault, MachineFault::Misbehaved);
        assert!(what.contains("the trainer's log exceeded"), "{what}");
        let refused = Error::Remote(RemoteError::Refused("5000 checkpoint folders".into()));
        assert_eq!(fault_of(&refused).map(|f| f.0), Some(MachineFault::Misbehaved));
        assert_eq!(fault_of(&Error::Missing("uid")), None, "our own errors are not the machine's");
        let refused = Error::Remote(RemoteError::AuthRefused { target: "root@h:22".into() });
        assert_eq!(fault_of(&refused).map(|f| f.0), Some(MachineFault::Unresponsive));
        let invalid = Error::Remote(RemoteError::InvalidRequest("NUL in a value".into()));
        assert_eq!(fault_of(&invalid), None, "a request we got wrong is ours");
    }

    #[test]
    fn a_pass_abandoned_on_the_machine_counts_as_silence_elsewhere_not() {
        let on_machine = Error::Abandoned(Abandoned { step: "poll", after: Duration::from_secs(60) });
        let (fault, what) = fault_of(&on_machine).unwrap();
        assert_eq!(fault, MachineFault::Unresponsive);
        assert!(what.contains("poll step"), "{what}");
        let reading = Error::Abandoned(Abandoned { step: "observe", after: Duration::from_secs(60) });
        assert_eq!(fault_of(&reading), None);
    }
}
