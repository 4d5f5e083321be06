#!/usr/bin/env bash
# The one command for a GPU machine: one NVIDIA GPU, a python3 with a CUDA torch (2.11 to 2.14),
# no internet and no Deno. It builds the native shim against that torch, runs
# test/cuda_test.ts, then bench/gpu_bench.ts, which prints one JSON line per figure. What it needs
# beside the repository comes from bench/gpu_prepare.sh (run where there is internet) in
# .cache/gpu-carry/: carry that folder along.
#
#   bench/gpu.sh [all|build|test|bench]      (default: all, in that order)
#
# DIPSY_PYTHON (default python3) is the Python whose torch the shim is built against and that runs
# the diffusers reference; DIPSY_GPU_CARRY overrides the carried folder. With OUT set, the whole
# output is also written to $OUT/gpu.log. Each stage has a time limit, so the three together end
# within a 10-minute command; a stage that fails does not stop the later ones, and the exit status
# says whether all passed.
set -uo pipefail

# Only builtins until a GPU is known to be there: on a machine without one this stops at once.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "bench/gpu.sh needs an NVIDIA GPU: nvidia-smi is not on PATH" >&2
  exit 2
fi
if ! gpus="$(nvidia-smi -L 2>&1)" || [[ "$gpus" != *"GPU "* ]]; then
  echo "bench/gpu.sh needs an NVIDIA GPU: nvidia-smi lists none (${gpus%%$'\n'*})" >&2
  exit 2
fi

stages="${1:-all}"
case "$stages" in
  all) stages="build test bench" ;;
  build | test | bench) ;;
  *)
    echo "usage: bench/gpu.sh [all|build|test|bench]" >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/.." || exit 2
root="$(pwd)"
carry="${DIPSY_GPU_CARRY:-$root/.cache/gpu-carry}"
python="${DIPSY_PYTHON:-python3}"
work="${TMPDIR:-/tmp}/dipsy-gpu"

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  exec > >(tee -a "$OUT/gpu.log") 2>&1
fi

for f in deno.xz deno_dir.tar.xz wheels; do
  if [ ! -e "$carry/$f" ]; then
    echo "bench/gpu.sh: $carry/$f is missing: run bench/gpu_prepare.sh where there is internet," >&2
    echo "  then carry $carry along" >&2
    exit 2
  fi
done

echo "$gpus"
mkdir -p "$work/bin"
if [ ! -x "$work/bin/deno" ]; then
  xz -dc "$carry/deno.xz" >"$work/bin/deno.tmp" && chmod +x "$work/bin/deno.tmp" &&
    mv "$work/bin/deno.tmp" "$work/bin/deno" || exit 2
fi
if [ ! -d "$work/deno_dir/npm" ]; then
  mkdir -p "$work/deno_dir" && xz -dc "$carry/deno_dir.tar.xz" | tar -C "$work/deno_dir" -xf - ||
    exit 2
fi
export PATH="$work/bin:$PATH"
export DENO_DIR="$work/deno_dir" DENO_NO_UPDATE_CHECK=1 NO_COLOR=1
export DIPSY_PYTHON="$python" DIPSY_GPU_PYTHON="$python"
export DIPSY_BUILD_JOBS="${DIPSY_BUILD_JOBS:-$(nproc)}"
# diffusers, for the reference only; the GPU image has its dependencies
if ! "$python" -c "import diffusers" 2>/dev/null; then
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --target "$work/site" "$carry"/wheels/*.whl || exit 2
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -c 'import torch; print(f"python torch {torch.__version__}, CUDA {torch.version.cuda}")'

# together under 10 minutes with the unpacking around them
declare -A limit=([build]=240 [test]=120 [bench]=210)
declare -A status=()
run_stage() {
  local name="$1"
  shift
  echo
  echo "==> $name: $* (limit ${limit[$name]} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "${limit[$name]}" "$@"
  local rc=$?
  if [ $rc -eq 0 ]; then status[$name]=ok; else status[$name]="FAILED ($rc)"; fi
  [ $rc -eq 124 ] && status[$name]="TIMED OUT"
  echo "==> $name: ${status[$name]} in $((SECONDS - t0)) s"
}

for stage in $stages; do
  case "$stage" in
    build) run_stage build deno run -A --cached-only native/bootstrap.ts ;;
    test) run_stage test deno test -A --cached-only --no-check test/cuda_test.ts ;;
    bench) run_stage bench deno run -A --cached-only --no-check bench/gpu_bench.ts ;;
  esac
done

echo
summary=""
failed=0
for stage in $stages; do
  summary+="$stage ${status[$stage]:-not run}, "
  [ "${status[$stage]:-}" = ok ] || failed=1
done
echo "gpu.sh: ${summary%, }"
exit $failed
