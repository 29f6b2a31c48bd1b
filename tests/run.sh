#!/usr/bin/env bash
# The whole test suite: installs what the tests need (idempotent, slow builds cached outside the
# repository), starts the real components on loopback, checks formatting and lints, runs every
# test including the ones that need this environment, and tears the environment down.
#
#   bash tests/run.sh            # everything
#   bash tests/run.sh -- NAME    # only tests whose name contains NAME (still with the environment)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export GPU_TRAINER_CACHE="${GPU_TRAINER_CACHE:-$HOME/.cache/gpu-trainer}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$GPU_TRAINER_CACHE/target}"
export GPU_TRAINER_ENV_DIR="${GPU_TRAINER_ENV_DIR:-$(mktemp -d /tmp/gpu-trainer-env.XXXXXX)}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

filter=()
if [ "${1:-}" = "--" ]; then shift; filter=("$@"); fi

step() { printf '\n== %s\n' "$*" >&2; }

step "install (cached in $GPU_TRAINER_CACHE)"
bash tests/env/install.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

step "build"
cargo build --all-targets --locked

step "start etcd, kube-apiserver, kube-controller-manager (newest Kubernetes), sshd, garage"
trap 'bash tests/env/down.sh; rm -rf "$GPU_TRAINER_ENV_DIR"' EXIT
bash tests/env/up.sh
# shellcheck disable=SC1091
source "$GPU_TRAINER_ENV_DIR/env"

step "tests"
# --show-output: the tables the end-to-end tests record (crash, fault, controller-kill, chaos
# trials, RBAC mutants) appear in the log of a green run too, not only when a test fails.
# --no-fail-fast: a red run names every failing test binary, not only the first.
cargo test --all-targets --locked --no-fail-fast -- --include-ignored --show-output "${filter[@]}"

# The CRDs and the operator's RBAC are proven on the whole supported range: the API-server and
# RBAC tests run again on the oldest Kubernetes minor still in upstream support.
if [ ${#filter[@]} -eq 0 ]; then
  # shellcheck source=env/versions.env
  source tests/env/versions.env
  step "API-server and RBAC tests on Kubernetes $KUBE_OLDEST_VERSION (oldest supported minor)"
  GPU_TRAINER_KUBE_VERSION=$KUBE_OLDEST_VERSION bash tests/env/up.sh
  # shellcheck disable=SC1091
  source "$GPU_TRAINER_ENV_DIR/env"
  cargo test --locked --test apiserver --test rbac_e2e -- --include-ignored --show-output
fi
