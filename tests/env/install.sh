#!/usr/bin/env bash
# Installs everything the real-component tests need. Idempotent: every step checks first.
# Slow builds (kube-apiserver, garage) are cached outside the repository in $GPU_TRAINER_CACHE.
set -euo pipefail

CACHE="${GPU_TRAINER_CACHE:-$HOME/.cache/gpu-trainer}"
KUBE_BIN="$CACHE/kube-v1.20.2/bin"
mkdir -p "$CACHE"

log() { printf '[install] %s\n' "$*" >&2; }

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

ensure_deb_src() {
  if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
    log "adding deb-src entries for bookworm"
    as_root tee /etc/apt/sources.list.d/gpu-trainer-src.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt_updated=0
  fi
}

build_kube() {
  if [ -x "$KUBE_BIN/kube-apiserver" ] && [ -x "$KUBE_BIN/kube-controller-manager" ]; then
    log "kube-apiserver v1.20.2 cached in $KUBE_BIN"
    return 0
  fi
  ensure_deb_src
  apt_install golang-go rsync jq dpkg-dev golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
  local work="$CACHE/kube-src"
  rm -rf "$work"; mkdir -p "$work"
  if [ $apt_updated = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  log "fetching Debian's kubernetes source package"
  (cd "$work" && apt-get source -qq --download-only kubernetes >/dev/null && dpkg-source -x --skip-patches ./*.dsc src >/dev/null 2>&1 || dpkg-source -x ./*.dsc src >/dev/null)
  local tree="$work/src"
  # reflect2 1.0.1 segfaults under Go >= 1.18: the API server dies on its first custom-resource write.
  log "replacing vendored reflect2 and json-iterator with Debian's fixed sources"
  for pkg in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    rm -rf "$tree/vendor/$pkg"; mkdir -p "$tree/vendor/$pkg"
    cp -r /usr/share/gocode/src/$pkg/. "$tree/vendor/$pkg/"
    find "$tree/vendor/$pkg" -name '*_test.go' -delete
  done
  mkdir -p "$work/.go/src/k8s.io"
  ln -sfn "$tree" "$work/.go/src/k8s.io/kubernetes"
  log "building kube-apiserver and kube-controller-manager (about 6-10 minutes on 2 cores)"
  # Kubernetes 1.20's vendored code builds with Debian's Go 1.19, not with the newer Go on PATH.
  (cd "$work/.go/src/k8s.io/kubernetes" && PATH="/usr/lib/go-1.19/bin:$PATH" GOROOT=/usr/lib/go-1.19 \
     GOPATH="$work/.go" GO111MODULE=off GOFLAGS=-mod=vendor CGO_ENABLED=0 GOTOOLCHAIN=local \
     make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >"$work/build.log" 2>&1) || {
       tail -40 "$work/build.log" >&2; exit 1; }
  mkdir -p "$KUBE_BIN"
  local out
  out=$(find "$tree/_output" -type f -name kube-apiserver -path '*bin*' | head -1)
  cp "$out" "$(dirname "$out")/kube-controller-manager" "$KUBE_BIN/"
  rm -rf "$work"
  log "kube binaries cached in $KUBE_BIN"
}

# The official Vast.ai CLI, pinned: the conformance test runs it against `gpu-trainer fake-vastai`.
# The tests find it at $GPU_TRAINER_CACHE/vastai-venv/bin/vastai.
VASTAI_VERSION=1.9.1
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
# expired presigned URLs are refused). Pinned, built once (12+ minutes on 2 cores) and cached; only
# the sqlite engine is compiled in, which is all the single test node needs.
GARAGE_VERSION=2.5.0
install_garage() {
  local root="$CACHE/garage-$GARAGE_VERSION"
  if [ -x "$root/bin/garage" ]; then
    log "garage $GARAGE_VERSION cached in $root"
    return 0
  fi
  apt_install pkg-config
  log "building garage $GARAGE_VERSION (about 12-20 minutes on 2 cores)"
  local target="$CACHE/garage-build"
  CARGO_TARGET_DIR="$target" cargo install garage --version "=$GARAGE_VERSION" --locked \
    --no-default-features --features bundled-libs,sqlite --root "$root" >&2
  rm -rf "$target"
  log "garage cached in $root"
}

# lua5.1: tests/argocd_health.rs runs the Argo CD health checks with it (Argo CD's gopher-lua is Lua 5.1).
apt_install etcd-server openssh-server openssl curl jq rsync ca-certificates lua5.1
build_kube
install_vastai_cli
install_garage
"$@"
