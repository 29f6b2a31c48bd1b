//! The SSH reachability check of the GpuInstance controller, over the same russh transport the
//! job engine uses: connect with the instance's key, run `true`, report the host key.

use std::time::Duration;

use async_trait::async_trait;

use super::SshProbe;
use crate::remote::ssh::{SshExec, SshKey, SshOptions, SshTarget};
use crate::remote::{RemoteExec, RunOptions};

/// Probes with short timeouts: the controller asks again on its next pass rather than waiting.
pub struct RusshProbe {
    pub attempt_timeout: Duration,
}

impl Default for RusshProbe {
    fn default() -> Self {
        Self { attempt_timeout: Duration::from_secs(10) }
    }
}

#[async_trait]
impl SshProbe for RusshProbe {
    async fn probe(&self, target: &SshTarget, private_key_openssh: &str) -> Result<String, String> {
        let key = SshKey::from_bytes(private_key_openssh.as_bytes()).map_err(|e| e.to_string())?;
        let options = SshOptions {
            attempt_timeout: self.attempt_timeout,
            connect_deadline: self.attempt_timeout,
            ..SshOptions::default()
        };
        let exec = SshExec::connect(target.clone(), key, None, options)
            .await
            .map_err(|e| crate::controller::gpuinstance::error_chain(&e))?;
        let output = exec
            .run("true", RunOptions { timeout: self.attempt_timeout, env: Vec::new() })
            .await
            .map_err(|e| crate::controller::gpuinstance::error_chain(&e))?;
        let fingerprint = exec.host_key_fingerprint();
        exec.close().await;
        if !output.success() {
            return Err(format!("`true` exited with {:?}", output.exit_code));
        }
        fingerprint.ok_or_else(|| "the server presented no host key".to_string())
    }
}
