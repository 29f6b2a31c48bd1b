//! One SSH connection per job, kept between reconciles (a poll every minute should not pay for
//! a handshake), with the host key pinned to the fingerprint the GpuInstance controller recorded
//! on first contact. The per-job runtime also keeps the job's [`TrainingMonitor`], whose log
//! offset and stall history make polls incremental. A failed pass drops the connection but keeps
//! the monitor. Everything here can be lost (a restart): the connection is reopened and the
//! monitor rebuilt from the machine's files, continuing the stall judgement kept in status.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;

use super::Error;
use crate::api::GpuInstance;
use crate::controller::gpuinstance::sshkey::PRIVATE_KEY;
use crate::engine::driver::JobMemory;
use crate::engine::outputs::store::ResultStore;
use crate::remote::ssh::{SshExec, SshKey, SshOptions, SshTarget};

/// What is kept for one job between reconciles.
#[derive(Default)]
pub struct JobRuntime {
    /// The connection and the GpuInstance it leads to.
    pub session: Option<(String, Arc<SshExec>)>,
    /// The driver's memory: the monitor (bound to the GpuInstance whose trainer it follows) and
    /// the last poll.
    pub memory: JobMemory,
    /// The job's result store (its destinations, resolved from Secrets, and what was synced).
    pub results: Option<ResultStore>,
    /// What the machine did wrong lately (kept across disconnects: that is what it counts).
    pub faults: super::verdict::MachineFaults,
}

impl JobRuntime {
    /// Forgets the connection only (after an error): the monitor is bound to its machine by
    /// name and keeps its log offset and stall readings for the next connection.
    pub fn disconnect(&mut self) {
        self.session = None;
        if let Some(results) = &mut self.results {
            results.forget_outputs();
        }
        self.memory.last_poll = None;
    }
}

/// Runtimes by job UID.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<JobRuntime>>>>,
}

impl Sessions {
    /// The job's runtime, created empty on first use.
    pub fn slot(&self, uid: &str) -> Arc<tokio::sync::Mutex<JobRuntime>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(uid.to_string()).or_default().clone()
    }

    /// Drops the job's runtime (and so its connection).
    pub fn remove(&self, uid: &str) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }

    /// Keeps only the runtimes of these jobs: deleted jobs are never reconciled again, so their
    /// connections are dropped here.
    pub fn retain(&self, live: &HashSet<String>) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).retain(|uid, _| live.contains(uid));
    }
}

/// The connection to `instance`'s machine, reused when the runtime already has one to it.
pub async fn ensure_session(
    runtime: &mut JobRuntime,
    secrets: &Api<Secret>,
    instance: &GpuInstance,
) -> Result<Arc<SshExec>, Error> {
    let name = instance.name_any();
    if let Some((for_instance, exec)) = &runtime.session
        && *for_instance == name
    {
        return Ok(exec.clone());
    }
    // A monitor for another machine is replaced when it is next used.
    runtime.disconnect();
    let ssh = instance.status.as_ref().and_then(|s| s.ssh.clone()).ok_or(Error::Missing("status.ssh"))?;
    let secret_name = instance
        .spec
        .ssh_key_secret_ref
        .as_ref()
        .map(|r| r.name.clone())
        .ok_or(Error::Missing("sshKeySecretRef"))?;
    let secret = secrets.get(&secret_name).await.map_err(super::kube_err("read the SSH key Secret"))?;
    let private = secret
        .data
        .as_ref()
        .and_then(|d| d.get(PRIVATE_KEY))
        .ok_or(Error::Missing("ssh-privatekey in the key Secret"))?;
    let key = SshKey::from_bytes(&private.0)?;
    // The GpuInstance controller records the host key at first contact; without it, connecting
    // would trust whatever key the machine shows now.
    let Some(fingerprint) = ssh.host_key_fingerprint.filter(|f| !f.is_empty()) else {
        return Err(Error::UnpinnedHostKey(format!(
            "GpuInstance {name} has no host key recorded at first contact (status.ssh.hostKeyFingerprint); \
             refusing to trust the key the machine shows now"
        )));
    };
    let target = SshTarget { host: ssh.host, port: ssh.port, user: "root".into() };
    // The machine answered the GpuInstance controller already; a short deadline keeps one
    // reconcile from blocking, the error policy retries.
    let options = SshOptions { connect_deadline: Duration::from_secs(30), ..SshOptions::default() };
    let exec = Arc::new(SshExec::connect(target, key, Some(fingerprint), options).await?);
    runtime.session = Some((name, exec.clone()));
    Ok(exec)
}
