#!/usr/bin/env bash
# Stops what tests/env/up.sh started. Safe to run when nothing is running.
set -uo pipefail
ENV_DIR="${GPU_TRAINER_ENV_DIR:-/tmp/gpu-trainer-env}"
[ -d "$ENV_DIR/pids" ] || exit 0
for pidfile in "$ENV_DIR"/pids/*.pid; do
  [ -e "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  # Each component was started with setsid, so its pid is also its process group.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
done
sleep 1
for pidfile in "$ENV_DIR"/pids/*.pid; do
  [ -e "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
  rm -f "$pidfile"
done
exit 0
