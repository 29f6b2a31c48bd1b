#!/usr/bin/env bash
# Builds tests/env/argocd-lua, the harness that runs the Argo CD health scripts in gopher-lua as
# Argo CD does (tests/argocd_health.rs), into
#   $GPU_TRAINER_CACHE/argocd-lua-<gopher-lua version>-<source hash>/bin/argocd-lua
# The hash covers go.mod, go.sum and main.go, so a changed harness is rebuilt; an existing binary
# for the same source is kept. Prints the binary's path on stdout. Needs Go and the module proxy.
set -euo pipefail

CACHE="${GPU_TRAINER_CACHE:-$HOME/.cache/gpu-trainer}"
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/argocd-lua" && pwd)"

log() { printf '[install] %s\n' "$*" >&2; }

start=$SECONDS
version="$(awk '$1 == "github.com/yuin/gopher-lua" { print $2 }' "$SRC/go.mod")"
[ -n "$version" ] || { log "no github.com/yuin/gopher-lua requirement in $SRC/go.mod"; exit 1; }
hash="$(cd "$SRC" && cat go.mod go.sum main.go | sha256sum | cut -c1-12)"
dir="$CACHE/argocd-lua-$version-$hash"
bin="$dir/bin/argocd-lua"

if [ -x "$bin" ]; then
  log "argocd-lua (gopher-lua $version) cached in $dir ($((SECONDS - start)) s)"
else
  log "building argocd-lua with gopher-lua $version"
  mkdir -p "$dir/bin"
  (cd "$SRC" && GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-buildvcs=false GOTOOLCHAIN=local \
    go build -trimpath -o "$bin.tmp" .)
  mv "$bin.tmp" "$bin"
  log "argocd-lua built in $((SECONDS - start)) s: $bin"
fi
echo "$bin"
