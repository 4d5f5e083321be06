#!/usr/bin/env bash
# Prepares, on a machine with internet, what bench/gpu.sh needs on a GPU machine without it:
#
#   deno.xz           this checkout's Deno, xz-compressed
#   deno_dir.tar.xz   a DENO_DIR holding the npm packages test/cuda_test.ts and bench/gpu_bench.ts
#                     import (sharp's native libraries make it large unpacked)
#   wheels/           the diffusers wheel (pure Python, the version test/reference/requirements.txt pins),
#              without its dependencies: the GPU image has them, and torch, transformers and peft
#
# into .cache/gpu-carry/ (or the folder given), and checks that it, with the repository's tracked
# files, stays under the 64 MiB a device call carries.
#
#   bench/gpu_prepare.sh [FOLDER]
set -euo pipefail

cd "$(dirname "$0")/.."
carry="${1:-.cache/gpu-carry}"
limit=$((64 * 1024 * 1024))

command -v deno >/dev/null || {
  echo "bench/gpu_prepare.sh: deno is not on PATH (npm install --prefix .tools deno, or see .ci/run)" >&2
  exit 1
}
python="${DIPSY_REFERENCE_PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
version="$(sed -n 's/^diffusers==\(.*\)$/\1/p' test/reference/requirements.txt)"
[ -n "$version" ] || {
  echo "bench/gpu_prepare.sh: test/reference/requirements.txt pins no diffusers version" >&2
  exit 1
}

rm -rf "$carry.tmp"
mkdir -p "$carry.tmp/wheels"

# The real binary, not npm's wrapper script around it.
deno_bin="$(deno eval --quiet 'console.log(Deno.execPath())')"
echo "deno: $deno_bin ($(deno --version | head -n 1))"
xz -T0 -9 -c "$deno_bin" >"$carry.tmp/deno.xz"

echo "npm packages of test/cuda_test.ts and bench/gpu_bench.ts"
deno_dir="$(mktemp -d)"
trap 'rm -rf "$deno_dir"' EXIT
DENO_DIR="$deno_dir" deno cache --quiet test/cuda_test.ts bench/gpu_bench.ts
# Only the packages travel; caches of compiled code are rebuilt there when needed.
tar -C "$deno_dir" -cf - npm | xz -T0 -9 >"$carry.tmp/deno_dir.tar.xz"

echo "diffusers==$version"
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  -d "$carry.tmp/wheels" "diffusers==$version"

rm -rf "$carry"
mv "$carry.tmp" "$carry"

carried=$(du -sb "$carry" | cut -f1)
tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((carried + tracked))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
size() { mib "$(du -sb "$1" | cut -f1)"; }
echo "$carry: $(mib "$carried") (deno $(size "$carry/deno.xz"), npm packages" \
  "$(size "$carry/deno_dir.tar.xz"), wheels $(size "$carry/wheels")); tracked files $(mib "$tracked")"
if [ "$total" -gt "$limit" ]; then
  echo "bench/gpu_prepare.sh: $(mib "$total") in all, over the 64 MiB a device call carries" >&2
  exit 1
fi
echo "ready: run bench/gpu.sh on the GPU machine, carrying $carry ($(mib "$total") with the repository)"
