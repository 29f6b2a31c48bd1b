#!/usr/bin/env bash
# Stops one component that tests/env/up.sh started and starts it again with the same command line
# (same port, flags, data and keys), for tests of what survives such a restart.
#
#   tests/env/restart.sh apiserver [--down SECONDS] [--signal TERM|KILL] [--grace SECONDS]
#   tests/env/restart.sh sshd      [--down SECONDS] [--signal TERM|KILL] [--grace SECONDS]
#
# apiserver: kube-apiserver only. etcd keeps running with its data, so every object, its UID and
#   its resourceVersion survive; clients see their connections and watches end.
# sshd: the daemon and every connection it serves, as when the machine's sshd crashes.
#   Processes that run in their own session (the trainers, started with setsid) keep running.
# --down: seconds to stay stopped before starting again (default 0; fractions are fine).
# --signal: how it is stopped: TERM (default, a clean stop) or KILL (a crash).
# --grace: seconds a TERM may take before KILL follows (default 5; kube-apiserver stops listening
#   at once but can take a minute to drain its watches).
# Returns once the component answers again; exits non-zero if it does not within the limit.
# Only the pids recorded in $GPU_TRAINER_ENV_DIR are signalled.
set -euo pipefail

ENV_DIR="${GPU_TRAINER_ENV_DIR:?GPU_TRAINER_ENV_DIR is not set: source the env file tests/env/up.sh wrote}"
log() { printf '[restart] %s\n' "$*" >&2; }
usage() { sed -n '5,6p' "$0" | sed 's/^# *//' >&2; exit 2; }

[ $# -ge 1 ] || usage
case $1 in
  apiserver | kube-apiserver) component=kube-apiserver ;;
  sshd) component=sshd ;;
  *) usage ;;
esac
shift
down=0
signal=TERM
grace=5
while [ $# -gt 0 ]; do
  case $1 in
    --down) down=${2:?}; shift 2 ;;
    --signal) signal=${2:?}; shift 2 ;;
    --grace) grace=${2:?}; shift 2 ;;
    *) usage ;;
  esac
done
case $signal in TERM | KILL) ;; *) usage ;; esac

cd "$ENV_DIR"
command_file="cmd/$component"
pid_file="pids/$component.pid"
[ -x "$command_file" ] || { log "no $ENV_DIR/$command_file: start the environment with tests/env/up.sh"; exit 1; }
# shellcheck disable=SC1091
source components.env

# A zombie still answers `kill -0`; only a running process counts.
alive() { [ -e "/proc/$1" ] && ! grep -qE '^[0-9]+ \(.*\) Z' "/proc/$1/stat" 2>/dev/null; }

if [ -s "$pid_file" ]; then
  pid=$(cat "$pid_file")
  connections=()
  if [ "$component" = sshd ]; then
    # sshd serves each connection from a child that runs in its own session: signal those too.
    mapfile -t connections < <(ps -o pid= --ppid "$pid" 2>/dev/null | tr -d ' ')
  fi
  # Started with setsid, so its pid is also its process group.
  kill -s "$signal" -- "-$pid" 2>/dev/null || kill -s "$signal" "$pid" 2>/dev/null || true
  for child in "${connections[@]}"; do
    [ -n "$child" ] && kill -s "$signal" "$child" 2>/dev/null || true
  done
  waited=0
  while alive "$pid"; do
    if [ "$waited" -ge $((grace * 10)) ]; then
      log "$component (pid $pid) still running ${grace} s after SIG$signal: SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      signal=KILL
      waited=0
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  log "$component stopped (SIG$signal, pid $pid)"
fi

sleep "$down"
# The component must not inherit our open files: a caller run under `flock` would otherwise
# leave its lock held by the restarted server for as long as that runs.
for fd in $(ls /proc/$$/fd); do
  if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done
setsid "$command_file" >>"logs/$component.log" 2>&1 </dev/null &
echo $! >"$pid_file"

ready() {
  case $component in
    kube-apiserver)
      curl -sf --max-time 2 --cacert pki/ca.crt -H "Authorization: Bearer $ADMIN_TOKEN" \
        "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1 ;;
    sshd) bash -c "exec 3<>/dev/tcp/127.0.0.1/$SSH_PORT" >/dev/null 2>&1 ;;
  esac
}
deadline=$((SECONDS + 120))
until ready; do
  if ! alive "$(cat "$pid_file")"; then
    log "$component exited while starting again; see $ENV_DIR/logs/$component.log"
    exit 1
  fi
  if [ $SECONDS -ge $deadline ]; then
    log "$component did not answer within 120 s of starting again"
    exit 1
  fi
  sleep 0.2
done
log "$component answers again (pid $(cat "$pid_file"))"
