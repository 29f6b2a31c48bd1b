//! The script a rented machine runs when its container starts. It arms a dead-man timer before
//! anything else: when `maxLifetimeSeconds` have passed since the first start, every process in
//! the container is stopped and then the container's init, so GPU billing ends even when the
//! operator is gone. No account credential is on the machine; the sweeper later destroys the
//! stopped instance (which still bills for disk).
//!
//! The deadline is written to a file on the first start, so a container restart does not extend
//! the lifetime.

/// Where the deadline (Unix seconds) is kept on the machine.
pub const DEADLINE_FILE: &str = "/workspace/gputrainer/.deadline";

/// Renders the onstart script: dead-man timer first, then the user's own commands.
pub fn render_onstart(max_lifetime_seconds: i64, user_onstart: Option<&str>) -> String {
    let lifetime = max_lifetime_seconds.max(60);
    let mut script = format!(
        r#"#!/bin/sh
# gpu-trainer dead-man timer: stop everything after {lifetime} s, even without the operator.
mkdir -p /workspace/gputrainer
[ -s {DEADLINE_FILE} ] || echo $(( $(date +%s) + {lifetime} )) > {DEADLINE_FILE}
nohup sh -c '
  deadline=$(cat {DEADLINE_FILE})
  while [ "$(date +%s)" -lt "$deadline" ]; do sleep 20; done
  echo "gpu-trainer: maxLifetimeSeconds reached, stopping the container" >&2
  kill -TERM -1; sleep 20; kill -KILL -1
  kill -TERM 1; sleep 5; kill -KILL 1
' > /workspace/gputrainer/deadman.log 2>&1 &
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
    fn script_is_valid_shell() {
        let script = render_onstart(600, Some("echo 'quoted' && true"));
        let status = std::process::Command::new("sh").arg("-n").arg("-c").arg(&script).status().unwrap();
        assert!(status.success());
    }
}
