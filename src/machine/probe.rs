//! The SSH reachability check of a rented machine (the GpuInstance controller's), over the same russh transport the
//! job engine uses: connect with the instance's key, have the machine echo a random token, report
//! the host key.
//!
//! The machine is untrusted and may be broken, so the probe has one deadline over everything
//! (connecting, the command, closing) and checks the answer: exactly the token, within a small
//! output cap. A machine that hangs, floods or answers something else fails the probe with a
//! message that says which; the controller asks again on its next pass.

use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::remote::ssh::{SshExec, SshKey, SshOptions, SshTarget};
use crate::remote::{ExecOutput, OutputChunk, RemoteExec, RunOptions};

/// Most bytes of output the probe keeps: the token and a newline, with room to show garbage.
const OUTPUT_LIMIT: usize = 256;

/// Left for the command's own timeout to fire (naming the step the machine stopped at) before
/// the probe's deadline does.
const MARGIN: Duration = Duration::from_millis(500);

/// Checks that a machine answers SSH with a key; returns the host key's SHA-256 fingerprint.
#[async_trait]
pub trait SshProbe: Send + Sync {
    async fn probe(&self, target: &SshTarget, private_key_openssh: &str) -> Result<String, String>;
}

/// Probes within one deadline: the controller asks again on its next pass rather than waiting.
pub struct RusshProbe {
    /// Limit for the whole probe: connecting, the command and closing.
    pub deadline: Duration,
}

impl Default for RusshProbe {
    fn default() -> Self {
        Self { deadline: Duration::from_secs(10) }
    }
}

#[async_trait]
impl SshProbe for RusshProbe {
    async fn probe(&self, target: &SshTarget, private_key_openssh: &str) -> Result<String, String> {
        let key = SshKey::from_bytes(private_key_openssh.as_bytes()).map_err(|e| e.to_string())?;
        match tokio::time::timeout(self.deadline, self.probe_within(target, key)).await {
            Ok(result) => result,
            Err(_) => Err(format!("the SSH probe did not finish within {:?}", self.deadline)),
        }
    }
}

impl RusshProbe {
    async fn probe_within(&self, target: &SshTarget, key: SshKey) -> Result<String, String> {
        let started = Instant::now();
        let options = SshOptions {
            attempt_timeout: self.deadline,
            connect_deadline: self.deadline,
            request_timeout: self.deadline,
            // `echo` needs no killing, and the probe's time is better spent on its answer.
            kill_timeout: Duration::ZERO,
            ..SshOptions::default()
        };
        let exec = SshExec::connect(target.clone(), key, None, options)
            .await
            .map_err(|e| crate::error::error_chain(&e))?;
        let token = format!("gpu-trainer-probe-{}", hex::encode(rand::random::<[u8; 8]>()));
        let left = self.deadline.saturating_sub(started.elapsed()).saturating_sub(MARGIN).max(MARGIN);
        let opts = RunOptions { timeout: left, output_limit: OUTPUT_LIMIT, ..Default::default() };
        let output = echo(&exec, &format!("echo {token}"), opts).await;
        let fingerprint = exec.host_key_fingerprint();
        exec.close().await;
        check_answer(&output?, &token)?;
        fingerprint.ok_or_else(|| "the server presented no host key".to_string())
    }
}

/// Runs the probe command, giving up as soon as the machine has sent the whole output cap: a
/// machine that floods without end is told apart from one that hangs.
async fn echo(exec: &SshExec, command: &str, opts: RunOptions) -> Result<ExecOutput, String> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let run = exec.run_streaming(command, opts, tx);
    tokio::pin!(run);
    let mut seen = 0;
    loop {
        tokio::select! {
            out = &mut run => return out.map_err(|e| crate::error::error_chain(&e)),
            Some(chunk) = rx.recv() => {
                let (OutputChunk::Stdout(bytes) | OutputChunk::Stderr(bytes)) = chunk;
                seen += bytes.len();
                if seen >= OUTPUT_LIMIT {
                    return Err(format!(
                        "the machine's output exceeded {OUTPUT_LIMIT} bytes in reply to the probe (it should only echo a token)"
                    ));
                }
            }
        }
    }
}

/// The probe's verdict on what the machine answered to `echo <token>`.
fn check_answer(output: &ExecOutput, token: &str) -> Result<(), String> {
    if output.stdout_dropped > 0 {
        let total = output.stdout.len() as u64 + output.stdout_dropped;
        return Err(format!("the machine answered the probe with {total} bytes instead of echoing a token"));
    }
    if !output.success() {
        return Err(format!(
            "the probe command `echo` exited with {:?}: {}",
            output.exit_code,
            shown(&output.stderr)
        ));
    }
    if output.stdout != format!("{token}\n").as_bytes() {
        return Err(format!(
            "the machine answered the probe with {} instead of the token it was sent",
            shown(&output.stdout)
        ));
    }
    Ok(())
}

/// Bytes of the machine shown in a message: escaped, and cut to a short prefix.
fn shown(bytes: &[u8]) -> String {
    const SHOWN: usize = 64;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(SHOWN)]).into_owned();
    let more = if bytes.len() > SHOWN { "..." } else { "" };
    format!("{:?}{more}", text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "gpu-trainer-probe-0011223344556677";

    fn answer(exit: i32, stdout: &[u8]) -> ExecOutput {
        ExecOutput::new(Some(exit), stdout.to_vec(), Vec::new())
    }

    #[test]
    fn only_the_echoed_token_passes() {
        assert_eq!(check_answer(&answer(0, format!("{TOKEN}\n").as_bytes()), TOKEN), Ok(()));
        // Another token, garbage, nothing, a motd before the token: all refused, naming what came.
        for bad in [
            b"gpu-trainer-probe-ffff\n".as_slice(),
            b"\x1b[2Jhello",
            b"",
            b"Welcome!\ngpu-trainer-probe-0011223344556677\n",
        ] {
            let err = check_answer(&answer(0, bad), TOKEN).unwrap_err();
            assert!(err.starts_with("the machine answered the probe with \""), "{err}");
        }
        let err = check_answer(&answer(127, b""), TOKEN).unwrap_err();
        assert!(err.contains("exited with Some(127)"), "{err}");
    }

    #[test]
    fn a_flood_is_refused_by_its_size_and_garbage_is_shown_short_and_escaped() {
        let flooded =
            ExecOutput { stdout: vec![b'x'; OUTPUT_LIMIT], stdout_dropped: 10_000, ..answer(0, b"") };
        let err = check_answer(&flooded, TOKEN).unwrap_err();
        assert!(err.contains(&format!("{} bytes", OUTPUT_LIMIT + 10_000)), "{err}");
        let long = vec![b'\x07'; 200];
        let err = check_answer(&answer(0, &long), TOKEN).unwrap_err();
        let shown = format!("{:?}...", "\u{7}".repeat(64));
        assert_eq!(
            err,
            format!("the machine answered the probe with {shown} instead of the token it was sent")
        );
    }

    #[tokio::test]
    async fn a_machine_that_accepts_tcp_and_says_nothing_fails_within_the_deadline() {
        // A listener that never speaks SSH: the probe must end, with a message, by its deadline.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let _held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let probe = RusshProbe { deadline: Duration::from_secs(2) };
        let target = SshTarget { host: "127.0.0.1".into(), port, user: "root".into() };
        let (key, _) = crate::machine::key::generate_key("probe-test").unwrap();
        let result = tokio::time::timeout(Duration::from_secs(30), probe.probe(&target, &key)).await;
        let err = result.expect("the probe outlived its deadline").unwrap_err();
        assert!(err.contains("handshake") || err.contains("did not finish"), "{err}");
    }
}
