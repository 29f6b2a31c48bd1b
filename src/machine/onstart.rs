//! The script a rented machine runs when its container starts. It arms a dead-man timer before
//! anything else: when `maxLifetimeSeconds` have passed since the first start, every process in
//! the container is stopped and then the container's init, so GPU billing ends even when the
//! operator is gone. No account credential is on the machine; the sweeper later destroys the
//! stopped instance (which still bills for disk).
//!
//! The deadline is written to a file on the first start, so a container restart does not extend
//! the lifetime.
//!
//! What a script inside the container cannot do: kill an init that neither handles SIGTERM nor
//! waits for its children (the kernel shields a PID namespace's init from signals it has no
//! handler for, SIGKILL included). Every other process is gone, so an init that waits for its
//! workload (a shell entrypoint, tini, dumb-init, supervisord) ends and the container stops.

/// The folder on the machine that keeps the deadline (`.deadline`, Unix seconds) and the
/// timer's log.
const TIMER_DIR: &str = "/workspace/gputrainer";

/// The shortest lifetime the timer accepts: a machine needs longer than this to boot anyway.
const MIN_LIFETIME_SECONDS: i64 = 60;

/// Seconds a job's machine may outlive the job's `activeDeadlineSeconds`: time to stop the
/// trainer, collect and release. The dead-man timer fires after this even when nobody is left
/// to release the machine (operator or launcher gone).
pub const LIFETIME_MARGIN_SECONDS: i64 = 1800;

/// The shortest `maxLifetimeSeconds` a GpuInstance accepts (its schema's minimum).
const MIN_GPUINSTANCE_LIFETIME_SECONDS: i64 = 300;

/// The dead-man lifetime of a machine rented for a job with this `activeDeadlineSeconds`.
pub fn job_machine_lifetime_seconds(active_deadline_seconds: i64) -> i64 {
    (active_deadline_seconds + LIFETIME_MARGIN_SECONDS).max(MIN_GPUINSTANCE_LIFETIME_SECONDS)
}

/// Renders the onstart script: dead-man timer first, then the user's own commands.
pub fn render_onstart(max_lifetime_seconds: i64, user_onstart: Option<&str>) -> String {
    render(&DeadMan::PRODUCTION, TIMER_DIR, max_lifetime_seconds.max(MIN_LIFETIME_SECONDS), user_onstart)
}

/// How the timer paces itself.
struct DeadMan {
    /// Seconds between looks at the clock.
    tick: u32,
    /// Seconds the workload gets between SIGTERM and SIGKILL.
    term_grace: u32,
    /// Seconds init gets between SIGTERM and SIGKILL.
    init_grace: u32,
}

impl DeadMan {
    const PRODUCTION: DeadMan = DeadMan { tick: 20, term_grace: 20, init_grace: 5 };
}

fn render(timer: &DeadMan, dir: &str, lifetime: i64, user_onstart: Option<&str>) -> String {
    let DeadMan { tick, term_grace, init_grace } = timer;
    let deadline_file = format!("{dir}/.deadline");
    let mut script = format!(
        r#"#!/bin/sh
# gpu-trainer dead-man timer: stop everything after {lifetime} s, even without the operator.
mkdir -p {dir}
[ -s {deadline_file} ] || echo $(( $(date +%s) + {lifetime} )) > {deadline_file}
nohup sh -c '
  deadline=$(cat {deadline_file})
  while [ "$(date +%s)" -lt "$deadline" ]; do sleep {tick}; done
  echo "gpu-trainer: maxLifetimeSeconds reached, stopping the container" >&2
  kill -TERM -1; sleep {term_grace}; kill -KILL -1
  kill -TERM 1; sleep {init_grace}; kill -KILL 1
' > {dir}/deadman.log 2>&1 &
"#
    );
    if let Some(user) = user_onstart.filter(|s| !s.trim().is_empty()) {
        script.push_str("# user onstart\n");
        script.push_str(user);
        if !user.ends_with('\n') {
            script.push('\n');
        }
    }
    script
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn timer_comes_first_and_user_commands_follow() {
        let script = render_onstart(3600, Some("echo hello"));
        let timer = script.find("kill -TERM -1").unwrap();
        let user = script.find("echo hello").unwrap();
        assert!(timer < user);
        assert!(script.contains("+ 3600"));
        assert!(script.contains("[ -s /workspace/gputrainer/.deadline ]"), "deadline survives restarts");
    }

    #[test]
    fn a_lifetime_below_a_minute_is_raised_to_one() {
        assert!(render_onstart(5, None).contains("+ 60"));
    }

    #[test]
    fn script_is_valid_shell() {
        let script = render_onstart(600, Some("echo 'quoted' && true"));
        let status = Command::new("sh").arg("-n").arg("-c").arg(&script).status().unwrap();
        assert!(status.success());
    }

    /// Fast timings for running the script for real: the logic is the production script's.
    const QUICK: DeadMan = DeadMan { tick: 1, term_grace: 1, init_grace: 1 };

    /// Runs `init` as PID 1 of a fresh PID namespace (a container's view of the world), with
    /// the rendered onstart script at `$ONSTART`; returns how it ended and how long it ran.
    /// `timeout` bounds a container the timer failed to stop.
    fn run_container(dir: &Path, lifetime: i64, init: &str, timeout: Duration) -> (Option<i32>, Duration) {
        let script = render(&QUICK, dir.to_str().unwrap(), lifetime, Some("echo user-onstart-ran"));
        let onstart = dir.join("onstart.sh");
        std::fs::write(&onstart, script).unwrap();
        let started = Instant::now();
        let mut child = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c", init])
            .env("ONSTART", &onstart)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) runs");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status.code(), started.elapsed());
            }
            if started.elapsed() > timeout {
                child.kill().unwrap();
                child.wait().unwrap();
                return (None, started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A typical entrypoint: run onstart, start the workload (sshd, the trainer...), wait for it.
    const WAITING_INIT: &str = r#"sh "$ONSTART"; sleep 1000 & sleep 1000 & wait"#;

    #[test]
    #[ignore = "needs tests/ environment"]
    fn the_timer_stops_the_workload_and_the_container_when_the_lifetime_is_over() {
        let dir = tempfile::tempdir().unwrap();
        let (code, took) = run_container(dir.path(), 3, WAITING_INIT, Duration::from_secs(60));
        assert!(code.is_some(), "the container was still running after {took:?}: the timer did not stop it");
        // The deadline is kept in whole seconds, so a 3 s lifetime ends after 2 to 3 s.
        assert!(took >= Duration::from_secs(2), "stopped after {took:?}, before its 3 s lifetime");
        let log = std::fs::read_to_string(dir.path().join("deadman.log")).unwrap();
        assert!(log.contains("maxLifetimeSeconds reached"), "timer log: {log:?}");
    }

    #[test]
    #[ignore = "needs tests/ environment"]
    fn an_init_that_handles_sigterm_is_stopped_too() {
        let dir = tempfile::tempdir().unwrap();
        // Like tini or supervisord: init itself handles SIGTERM and would otherwise run forever.
        let init = r#"trap 'exit 143' TERM; sh "$ONSTART"; while :; do sleep 1; done"#;
        let (code, took) = run_container(dir.path(), 2, init, Duration::from_secs(60));
        assert!(code.is_some(), "the container was still running after {took:?}");
    }

    #[test]
    #[ignore = "needs tests/ environment"]
    fn a_restarted_container_keeps_its_first_deadline() {
        let dir = tempfile::tempdir().unwrap();
        // The first start arms a 3 s lifetime; the container is stopped before it fires.
        let (code, _) = run_container(dir.path(), 3, r#"sh "$ONSTART"; sleep 1"#, Duration::from_secs(30));
        assert_eq!(code, Some(0));
        let deadline = std::fs::read_to_string(dir.path().join(".deadline")).unwrap();
        // Restarted with a long lifetime (as if the operator rendered it again): the first
        // deadline still holds, so the container stops within seconds, not an hour.
        let (code, took) = run_container(dir.path(), 3600, WAITING_INIT, Duration::from_secs(60));
        assert_eq!(std::fs::read_to_string(dir.path().join(".deadline")).unwrap(), deadline);
        assert!(code.is_some(), "the restart extended the lifetime: still running after {took:?}");
    }
}
