//! Background training on the machine: the remote work dir of one job, starting the run command
//! under `nohup` in its own session (so its process group can be signalled as a whole and it
//! survives the SSH connection), and a graceful stop.
//!
//! Files in the work dir (design section 2): `train.log` (stdout and stderr), `train.pid` (pid of
//! the wrapper shell, which is also the process group id), `exit_code` (written by the wrapper
//! when the command ends), `launches` (one line per start: time, pid, and the machine named in
//! [`MACHINE_FILE`], `-` when none is: the audit trail that shows training was started once per
//! machine, even where several machines' attempts share one disk). Launch is idempotent: a live
//! pid means training is already running, and an `exit_code` means it already ran; neither starts
//! it again (resume rules, design section 4).

use std::time::Duration;

use super::{RemoteError, RemoteExec, RunOptions, shell_quote};

/// Default base of the remote work dirs.
pub const DEFAULT_REMOTE_BASE: &str = "/workspace/gputrainer";

/// File in the work dir naming the machine (the GpuInstance) that claimed it; every line of
/// `launches` repeats it.
pub const MACHINE_FILE: &str = "machine";

/// Paths of one job's work dir on the machine: `<base>/<TrainingJob UID>/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteLayout {
    work_dir: String,
}

impl RemoteLayout {
    /// `base` is configurable so tests keep everything inside a temporary folder. The UID must
    /// be a plain name (no `/`, not `.` or `..`).
    pub fn new(base: &str, job_uid: &str) -> Result<Self, RemoteError> {
        let valid = !job_uid.is_empty()
            && job_uid != "."
            && job_uid != ".."
            && job_uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !valid {
            return Err(RemoteError::InvalidRequest(format!("invalid job UID {job_uid:?} for a work dir")));
        }
        Ok(Self { work_dir: format!("{}/{job_uid}", base.trim_end_matches('/')) })
    }

    pub fn work_dir(&self) -> &str {
        &self.work_dir
    }
    pub fn dataset_dir(&self) -> String {
        format!("{}/dataset", self.work_dir)
    }
    pub fn output_dir(&self) -> String {
        format!("{}/output", self.work_dir)
    }
    pub fn log(&self) -> String {
        format!("{}/train.log", self.work_dir)
    }
    pub fn pid_file(&self) -> String {
        format!("{}/train.pid", self.work_dir)
    }
    pub fn exit_code_file(&self) -> String {
        format!("{}/exit_code", self.work_dir)
    }
    /// A path inside the work dir (`rel` must be relative).
    pub fn join(&self, rel: &str) -> String {
        format!("{}/{}", self.work_dir, rel.trim_start_matches('/'))
    }
}

/// What to start.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// The shell command (already rendered, values quoted); runs in the work dir.
    pub command: String,
    /// Environment of the training process only (secrets go here, never into `command`).
    pub env: Vec<(String, String)>,
}

/// Where training stands according to the work dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrainingState {
    /// Never started here.
    NotStarted,
    Running {
        pid: u32,
    },
    /// Ended with this exit code (from the `exit_code` file).
    Exited {
        exit_code: i32,
    },
    /// A pid was recorded but the process is gone without an exit code (killed with -9, machine
    /// restarted).
    Vanished {
        pid: u32,
    },
}

/// Result of [`launch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchOutcome {
    Started {
        pid: u32,
    },
    AlreadyRunning {
        pid: u32,
    },
    /// Not started again: it already ran to an end.
    AlreadyExited {
        exit_code: i32,
    },
}

/// Result of [`stop`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Nothing was running.
    NotRunning,
    /// Ended after TERM.
    Terminated,
    /// Still alive after the grace period; the group was killed.
    Killed,
}

fn quick() -> RunOptions {
    RunOptions::default()
}

fn check(out: &super::ExecOutput, what: &str) -> Result<(), RemoteError> {
    if out.success() {
        Ok(())
    } else {
        Err(RemoteError::io(
            what.to_string(),
            format!("exit code {:?}: {}", out.exit_code, out.stderr_lossy().trim()),
        ))
    }
}

/// Reads the state files and checks the pid.
pub async fn state(exec: &dyn RemoteExec, layout: &RemoteLayout) -> Result<TrainingState, RemoteError> {
    let wd = shell_quote(layout.work_dir())?;
    let out = exec
        .run(
            &format!(
                "cd {wd} 2>/dev/null || {{ echo none; exit 0; }}; \
                 if [ -f exit_code ]; then echo \"exit $(cat exit_code)\"; \
                 elif [ -f train.pid ]; then echo \"pid $(cat train.pid)\"; else echo none; fi"
            ),
            quick(),
        )
        .await?;
    check(&out, "read the training state")?;
    out.require_complete("reading the training state")?;
    let text = out.stdout_lossy();
    let mut words = text.split_whitespace();
    match (words.next(), words.next().map(str::parse::<i64>)) {
        (Some("exit"), Some(Ok(code))) => Ok(TrainingState::Exited { exit_code: code as i32 }),
        (Some("pid"), Some(Ok(pid))) if pid > 0 => {
            let pid = pid as u32;
            if exec.pid_alive(pid).await? {
                Ok(TrainingState::Running { pid })
            } else {
                // The wrapper writes exit_code just before it exits; look once more.
                match Box::pin(state_files_only(exec, layout)).await? {
                    Some(code) => Ok(TrainingState::Exited { exit_code: code }),
                    None => Ok(TrainingState::Vanished { pid }),
                }
            }
        }
        _ => Ok(TrainingState::NotStarted),
    }
}

async fn state_files_only(exec: &dyn RemoteExec, layout: &RemoteLayout) -> Result<Option<i32>, RemoteError> {
    let f = shell_quote(&layout.exit_code_file())?;
    let out = exec.run(&format!("cat {f} 2>/dev/null || true"), quick()).await?;
    out.require_complete("reading the exit code file")?;
    Ok(out.stdout_lossy().trim().parse().ok())
}

/// The script that starts training. The wrapper shell records its pid (= process group and
/// session id, thanks to `setsid`), runs the command in the background and waits for it even
/// when signalled, then writes the exit code. Its TERM trap is a handler, not "ignore", so the
/// training process still gets the default TERM behaviour.
fn launch_script(layout: &RemoteLayout, command: &str) -> Result<String, RemoteError> {
    let wd = shell_quote(layout.work_dir())?;
    let wrapper = "trap ':' TERM INT HUP\n\
                   echo $$ > train.pid.tmp && mv -f train.pid.tmp train.pid\n\
                   sh -c \"$1\" < /dev/null &\n\
                   child=$!\n\
                   while :; do wait $child; rc=$?; kill -0 $child 2>/dev/null || break; done\n\
                   echo $rc > exit_code.tmp && mv -f exit_code.tmp exit_code\n";
    Ok(format!(
        "set -e\nmkdir -p {wd}\ncd {wd}\nmkdir -p dataset output\n\
         command -v setsid >/dev/null || {{ echo 'setsid is missing on the machine (util-linux)' >&2; exit 3; }}\n\
         rm -f exit_code train.pid\n\
         PYTHONUNBUFFERED=1 nohup setsid sh -c {wrapper} gpu-trainer-run {cmd} > train.log 2>&1 < /dev/null &\n\
         i=0; while [ ! -s train.pid ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n\
         printf '%s %s %s\\n' \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\" \"$(cat train.pid)\" \"$(cat {machine} 2>/dev/null || echo -)\" >> launches\n\
         cat train.pid\n",
        wrapper = shell_quote(wrapper)?,
        cmd = shell_quote(command)?,
        machine = MACHINE_FILE,
    ))
}

/// Starts `spec.command` in the background unless it is already running or already ran.
pub async fn launch(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    spec: &LaunchSpec,
) -> Result<LaunchOutcome, RemoteError> {
    match state(exec, layout).await? {
        TrainingState::Running { pid } => return Ok(LaunchOutcome::AlreadyRunning { pid }),
        TrainingState::Exited { exit_code } => return Ok(LaunchOutcome::AlreadyExited { exit_code }),
        TrainingState::NotStarted | TrainingState::Vanished { .. } => {}
    }
    let out = exec
        .run(
            &launch_script(layout, &spec.command)?,
            RunOptions { timeout: Duration::from_secs(120), env: spec.env.clone(), ..Default::default() },
        )
        .await?;
    check(&out, "start training")?;
    out.require_complete("starting training")?;
    let pid = out.stdout_lossy().trim().parse().map_err(|_| {
        RemoteError::io("start training", format!("no pid recorded: {}", out.stdout_lossy().trim()))
    })?;
    tracing::info!(machine = %exec.describe(), pid, "Started training");
    Ok(LaunchOutcome::Started { pid })
}

/// Forgets a finished run (removes `exit_code` and `train.pid`) so [`launch`] starts again,
/// e.g. for a resume command after a failure. Refuses while it runs.
pub async fn reset(exec: &dyn RemoteExec, layout: &RemoteLayout) -> Result<(), RemoteError> {
    if let TrainingState::Running { pid } = state(exec, layout).await? {
        return Err(RemoteError::InvalidRequest(format!("training is still running (pid {pid})")));
    }
    let wd = shell_quote(layout.work_dir())?;
    let out = exec.run(&format!("cd {wd} 2>/dev/null || exit 0; rm -f exit_code train.pid"), quick()).await?;
    check(&out, "reset the training state")
}

/// How long a job's trainer gets after TERM to save and exit before it is killed (a stall,
/// deadline, budget stop, suspend or Ctrl-C).
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// Stops training: TERM to the process group, up to `grace` for it to end, then KILL. Records
/// exit code 137 when the wrapper could not (it was killed too).
pub async fn stop(
    exec: &dyn RemoteExec,
    layout: &RemoteLayout,
    grace: Duration,
) -> Result<StopOutcome, RemoteError> {
    let TrainingState::Running { pid } = state(exec, layout).await? else {
        return Ok(StopOutcome::NotRunning);
    };
    signal_group(exec, pid, "TERM").await?;
    if wait_dead(exec, pid, grace).await? {
        return Ok(StopOutcome::Terminated);
    }
    tracing::warn!(machine = %exec.describe(), pid, "Training ignored TERM, killing");
    signal_group(exec, pid, "KILL").await?;
    if !wait_dead(exec, pid, Duration::from_secs(30)).await? {
        return Err(RemoteError::io("stop training", format!("process group {pid} survived KILL")));
    }
    let ec = shell_quote(&layout.exit_code_file())?;
    let out = exec.run(&format!("[ -f {ec} ] || echo 137 > {ec}"), quick()).await?;
    check(&out, "record the exit code")?;
    Ok(StopOutcome::Killed)
}

async fn signal_group(exec: &dyn RemoteExec, pgid: u32, signal: &str) -> Result<(), RemoteError> {
    // A group that is already gone is fine.
    exec.run(&format!("kill -{signal} -{pgid} 2>/dev/null || true"), quick()).await?;
    Ok(())
}

async fn wait_dead(exec: &dyn RemoteExec, pid: u32, limit: Duration) -> Result<bool, RemoteError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if !exec.pid_alive(pid).await? {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::remote::conformance::{Fixture, eventually};

    async fn wait_state(
        f: &Fixture,
        layout: &RemoteLayout,
        want: fn(&TrainingState) -> bool,
    ) -> TrainingState {
        let mut last = TrainingState::NotStarted;
        for _ in 0..600 {
            last = state(f.exec.as_ref(), layout).await.unwrap();
            if want(&last) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("training never reached the expected state; last {last:?}");
    }

    pub async fn runs_in_the_background_and_is_idempotent(f: Fixture) {
        let layout = RemoteLayout::new(&f.base, "job-1").unwrap();
        assert_eq!(state(f.exec.as_ref(), &layout).await.unwrap(), TrainingState::NotStarted);
        let go = layout.join("go");
        let spec = LaunchSpec {
            command: format!(
                "echo started; echo \"token=$GT_TOKEN\" > token.txt; while [ ! -f {go} ]; do sleep 0.05; done; echo done >&2; exit 7"
            ),
            env: vec![("GT_TOKEN".into(), "tok-secret".into())],
        };
        let LaunchOutcome::Started { pid } = launch(f.exec.as_ref(), &layout, &spec).await.unwrap() else {
            panic!("not started")
        };
        assert!(f.exec.pid_alive(pid).await.unwrap());
        // A second launch sees the live pid and starts nothing.
        assert_eq!(
            launch(f.exec.as_ref(), &layout, &spec).await.unwrap(),
            LaunchOutcome::AlreadyRunning { pid }
        );
        assert_eq!(state(f.exec.as_ref(), &layout).await.unwrap(), TrainingState::Running { pid });
        let exec = f.exec.clone();
        let token = layout.join("token.txt");
        eventually("the command to write its token file", || {
            let (exec, token) = (exec.clone(), token.clone());
            async move { exec.read_from(&token, 0, 100).await.is_ok_and(|c| !c.data.is_empty()) }
        })
        .await;
        let chunk = f.exec.read_from(&token, 0, 100).await.unwrap();
        assert_eq!(chunk.data, b"token=tok-secret\n");
        f.exec.run(&format!("touch {go}"), quick()).await.unwrap();
        let end = wait_state(&f, &layout, |s| matches!(s, TrainingState::Exited { .. })).await;
        assert_eq!(end, TrainingState::Exited { exit_code: 7 });
        let log = f.exec.read_from(&layout.log(), 0, 10_000).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&log.data), "started\ndone\n");
        // Finished work is not re-run; after a reset it is.
        assert_eq!(
            launch(f.exec.as_ref(), &layout, &spec).await.unwrap(),
            LaunchOutcome::AlreadyExited { exit_code: 7 }
        );
        reset(f.exec.as_ref(), &layout).await.unwrap();
        f.exec.run(&format!("echo gi-2 > {}", layout.join(MACHINE_FILE)), quick()).await.unwrap();
        assert!(matches!(
            launch(f.exec.as_ref(), &layout, &spec).await.unwrap(),
            LaunchOutcome::Started { .. }
        ));
        // Every start, and only a start, leaves a line in the audit trail, naming the machine.
        let launches = f.exec.read_from(&layout.join("launches"), 0, 10_000).await.unwrap();
        let launches = String::from_utf8_lossy(&launches.data).into_owned();
        let lines: Vec<Vec<&str>> = launches.lines().map(|l| l.split(' ').collect()).collect();
        assert_eq!(lines.len(), 2, "{launches}");
        assert_eq!((lines[0][1], lines[0][2]), (pid.to_string().as_str(), "-"), "{launches}");
        assert_eq!(lines[1][2], "gi-2", "{launches}");
        wait_state(&f, &layout, |s| matches!(s, TrainingState::Exited { .. })).await;
        for dir in [layout.dataset_dir(), layout.output_dir()] {
            assert!(f.exec.run(&format!("test -d {dir}"), quick()).await.unwrap().success());
        }
    }

    pub async fn stop_terms_then_kills_the_group(f: Fixture) {
        // A trainer that exits on TERM, with a child that also gets the signal.
        let layout = RemoteLayout::new(&f.base, "job-term").unwrap();
        let spec = LaunchSpec { command: "sleep 300 & echo $! > child.pid; wait".into(), env: Vec::new() };
        let LaunchOutcome::Started { .. } = launch(f.exec.as_ref(), &layout, &spec).await.unwrap() else {
            panic!("not started")
        };
        let child_file = layout.join("child.pid");
        let exec = f.exec.clone();
        eventually("the child pid file", || {
            let (exec, p) = (exec.clone(), child_file.clone());
            async move { exec.read_from(&p, 0, 100).await.is_ok_and(|c| c.data.ends_with(b"\n")) }
        })
        .await;
        let child: u32 = String::from_utf8_lossy(&f.exec.read_from(&child_file, 0, 100).await.unwrap().data)
            .trim()
            .parse()
            .unwrap();
        assert_eq!(
            stop(f.exec.as_ref(), &layout, Duration::from_secs(60)).await.unwrap(),
            StopOutcome::Terminated
        );
        assert!(!f.exec.pid_alive(child).await.unwrap());
        assert_eq!(state(f.exec.as_ref(), &layout).await.unwrap(), TrainingState::Exited { exit_code: 143 });
        assert_eq!(
            stop(f.exec.as_ref(), &layout, Duration::from_secs(1)).await.unwrap(),
            StopOutcome::NotRunning
        );

        // A trainer that ignores TERM is killed after the grace period.
        let layout = RemoteLayout::new(&f.base, "job-kill").unwrap();
        let spec = LaunchSpec {
            command: "trap '' TERM; echo ready > ready; while :; do sleep 0.1; done".into(),
            env: Vec::new(),
        };
        launch(f.exec.as_ref(), &layout, &spec).await.unwrap();
        let ready = layout.join("ready");
        let exec = f.exec.clone();
        eventually("the trainer to install its trap", || {
            let (exec, p) = (exec.clone(), ready.clone());
            async move { exec.read_from(&p, 0, 100).await.is_ok() }
        })
        .await;
        assert_eq!(
            stop(f.exec.as_ref(), &layout, Duration::from_secs(1)).await.unwrap(),
            StopOutcome::Killed
        );
        assert_eq!(state(f.exec.as_ref(), &layout).await.unwrap(), TrainingState::Exited { exit_code: 137 });
    }

    #[test]
    fn layout_refuses_path_tricks() {
        assert!(RemoteLayout::new("/w", "../etc").is_err());
        assert!(RemoteLayout::new("/w", "a/b").is_err());
        assert!(RemoteLayout::new("/w", "").is_err());
        let l = RemoteLayout::new("/workspace/gputrainer/", "0b5c-uid").unwrap();
        assert_eq!(l.work_dir(), "/workspace/gputrainer/0b5c-uid");
        assert_eq!(l.log(), "/workspace/gputrainer/0b5c-uid/train.log");
        assert_eq!(l.exit_code_file(), "/workspace/gputrainer/0b5c-uid/exit_code");
    }
}
