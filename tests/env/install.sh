#!/usr/bin/env bash
# Installs everything the real-component tests need. Idempotent: every step checks first.
# Slow builds (Kubernetes, Helm, garage) are cached outside the repository in $GPU_TRAINER_CACHE.
# Versions are pinned in tests/env/versions.env. Prints how long each step took.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${GPU_TRAINER_CACHE:-$HOME/.cache/gpu-trainer}"
mkdir -p "$CACHE"
# shellcheck source=versions.env
source "$HERE/versions.env"

log() { printf '[install] %s\n' "$*" >&2; }

# timed NAME COMMAND...: runs one install step and says how long it took.
timed() {
  local name=$1 started=$SECONDS; shift
  "$@"
  log "step '$name' took $((SECONDS - started)) s"
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ $apt_updated = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  log "apt-get install ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# shellcheck source=go-tools.sh
source "$HERE/go-tools.sh"

# The official Vast.ai CLI, pinned: the conformance test runs it against `gpu-trainer fake-vastai`.
# The tests find it at $GPU_TRAINER_CACHE/vastai-venv/bin/vastai.
install_vastai_cli() {
  local venv="$CACHE/vastai-venv"
  local installed=""
  # Read the version into a variable first: `pip show | grep -q` trips pipefail when grep exits early.
  [ -x "$venv/bin/vastai" ] && installed=$("$venv/bin/python" -m pip show vastai 2>/dev/null || true)
  if printf '%s\n' "$installed" | grep -qx "Version: $VASTAI_VERSION"; then
    log "vastai $VASTAI_VERSION cached in $venv"
    return 0
  fi
  log "installing vastai==$VASTAI_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "vastai==$VASTAI_VERSION" >&2
}

# Garage, the S3 server the artifact tests talk to (it checks SigV4 signatures, so tampered and
# expired presigned URLs are refused). Built once and cached; only the sqlite engine is compiled
# in, which is all the single test node needs, and at opt-level 1: the tests move a few megabytes,
# and a release build at opt-level 3 would take twice the CPU time of the whole suite's installs.
install_garage() {
  local root="$CACHE/garage-$GARAGE_VERSION"
  if [ -x "$root/bin/garage" ]; then
    log "garage $GARAGE_VERSION cached in $root"
    return 0
  fi
  apt_install pkg-config
  log "building garage $GARAGE_VERSION (about 10 minutes on 2 cores)"
  local target="$CACHE/garage-build"
  CARGO_TARGET_DIR="$target" CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install garage --version "=$GARAGE_VERSION" --locked \
    --no-default-features --features bundled-libs,sqlite --root "$root" >&2
  rm -rf "$target"
  log "garage cached in $root"
}

timed "Debian packages" apt_install openssh-server openssl curl jq rsync ca-certificates pkg-config
# Garage (cargo) builds beside the Go builds: the end of a Rust build compiles one large crate at a
# time and leaves a core idle, which the Go builds fill. Its output goes to a log, shown on failure.
garage_log="$CACHE/garage-install.log"
timed "garage $GARAGE_VERSION (beside the Go builds)" install_garage >"$garage_log" 2>&1 &
garage_pid=$!
trap 'kill "$garage_pid" 2>/dev/null || true' EXIT
timed "Kubernetes $KUBE_VERSION, etcd, Helm $HELM3_VERSION and $HELM4_VERSION" build_kube_release "$KUBE_VERSION" full with-helm
timed "kube-apiserver $KUBE_OLDEST_VERSION (oldest supported minor)" build_kube_release "$KUBE_OLDEST_VERSION" apiserver-only
timed "Argo CD's Lua harness (gopher-lua)" bash "$HERE/build-argocd-lua.sh" >/dev/null
timed "vastai CLI $VASTAI_VERSION" install_vastai_cli
if ! wait "$garage_pid"; then
  tail -40 "$garage_log" >&2
  log "building garage failed; the whole log is $garage_log"
  exit 1
fi
grep '^\[install\]' "$garage_log" >&2 || true
"$@"
