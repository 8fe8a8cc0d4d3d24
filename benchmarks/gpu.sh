#!/usr/bin/env bash
# GPU checks in one call: the GPU tests and every benchmark suite with --device cuda.
#
#   benchmarks/gpu.sh OUT_DIR
#
# Meant for a machine with one H100/H200 and no internet, in under 9 minutes (LLMSPEED_GPU_BUDGET
# seconds, default 520, shared by all steps). Every step runs under `timeout`; a failing step is
# logged and the next one still runs. Python packages that are missing can travel as wheels in
# .whl/ (installed with --no-index into /tmp/site). OUT_DIR receives three files, few enough for
# tools that bring back only a handful:
#   summary.md            status of each step and every suite's Markdown tables
#   gpu.log               the whole log
#   gpu-results.tar.gz    everything: per-suite results.json, tables and PNG plots, pytest output
# LLMSPEED_GPU_ONLY (step names) and LLMSPEED_GPU_TESTS (test paths) narrow a rerun.
set -u -o pipefail

OUT_DIR=${1:?usage: benchmarks/gpu.sh OUT_DIR}
BUDGET=${LLMSPEED_GPU_BUDGET:-520}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llmspeed-gpu-XXXX")
LOG="$WORK/gpu.log"
SUMMARY="$WORK/summary.md"
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false

log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME MAX_SECONDS CMD...: run CMD under timeout min(MAX_SECONDS, budget left); never fatal.
# LLMSPEED_GPU_ONLY="pytest-gpu bench-quant ..." runs only the named steps (install and environment always run).
step() {
  local name=$1 max=$2 rest
  shift 2
  if [ -n "${LLMSPEED_GPU_ONLY:-}" ] && [[ " install-wheels environment $LLMSPEED_GPU_ONLY " != *" $name "* ]]; then
    return 0
  fi
  rest=$(left)
  if ((rest < 15)); then
    log "SKIP $name: budget of ${BUDGET}s spent"
    echo "| $name | skipped (budget spent) | 0 |" >>"$WORK/steps.md"
    return 0
  fi
  local limit=$((max < rest ? max : rest)) t0=$(date +%s) rc=0
  log "START $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.out" 2>&1 || rc=$?
  local took=$(($(date +%s) - t0)) status=ok
  if ((rc == 124 || rc == 137)); then status="timed out after ${limit}s"; elif ((rc != 0)); then status="failed (exit $rc)"; fi
  log "END $name: $status in ${took}s"
  tail -n 25 "$WORK/$name.out" | sed 's/^/    /' >>"$LOG"
  echo "| $name | $status | $took |" >>"$WORK/steps.md"
  return 0
}

echo "| step | status | seconds |" >"$WORK/steps.md"
echo "|---|---|---|" >>"$WORK/steps.md"

# 1. packages: carried wheels first, then check what the suites import
if compgen -G ".whl/*.whl" >/dev/null; then
  step install-wheels 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step environment 60 "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
missing = []
try:  # the batching suite's GPU peer: measured beside llmspeed when importable (issue #22), else its row says why
    print("vllm", importlib.import_module("vllm").__version__)
except Exception as err:
    print("vllm not importable:", err)
for name in ("transformers", "safetensors", "numpy", "tqdm", "matplotlib", "pytest", "hypothesis", "peft", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:
        missing.append(name)
        print(name, "MISSING:", err)
raise SystemExit(1 if missing or not torch.cuda.is_available() else 0)
EOF

# The embedded SmolLM2 needs its GGUF package or a converted cache; without it, use the random 1B Llama.
if "$PY" -c "import llmspeed; llmspeed.models.smollm2()" >/dev/null 2>&1; then
  HAVE_SMOLLM2=1
else
  HAVE_SMOLLM2=0
fi
log "SmolLM2 available: $HAVE_SMOLLM2"
REAL_MODEL=$([ "$HAVE_SMOLLM2" = 1 ] && echo smollm2 || echo llama-1b-random)

# 2. GPU tests (tests that need SmolLM2 are deselected when it is not there)
MARK="gpu"
[ "$HAVE_SMOLLM2" = 1 ] || MARK="gpu and not slow"
# LLMSPEED_GPU_TESTS: the test paths to run (default: all of tests/)
# shellcheck disable=SC2086  # the paths are meant to split
step pytest-gpu 120 "$PY" -m pytest -q -m "$MARK" -p no:cacheprovider --junitxml="$WORK/pytest-gpu.xml" \
  ${LLMSPEED_GPU_TESTS:-tests}

# 3. suites, each in its own process so a crash or hang costs only that suite
bench() {
  local suite=$1 max=$2
  shift 2
  step "bench-$suite" "$max" "$PY" -m llmspeed bench "$suite" --device cuda --no-progress --out "$WORK/$suite" "$@"
}
# the open GPU goals first (quant: int4 GEMV; batching: throughput), the suites already measured last
bench quant 120 --model llama-1b-random --quick
bench batching 300 --model llama-1b-random  # with vLLM in a child when importable (its start-up: about a minute)
# where the batching run's time goes: step paths and the top CUDA kernels (torch.profiler)
step profile-batching 75 "$PY" benchmarks/profile_batching.py --device cuda --model llama-1b-random \
  --requests 128 --no-trace --out "$WORK/profile"
bench precision 45 --model llama-1b-random
bench lora 100 --model "$REAL_MODEL" --quick
# calibration reports perplexity, which means nothing on random weights: only with the real model
if [ "$HAVE_SMOLLM2" = 1 ]; then bench calibration 60 --model smollm2 --quick; fi

# 4. collect: summary with every suite's tables, the log, and a tarball of everything
{
  echo "# llmspeed GPU run"
  echo
  echo "\`benchmarks/gpu.sh\` on $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, took $(($(date +%s) - START))s"
  echo
  cat "$WORK/steps.md"
  echo
  echo '```'
  cat "$WORK/environment.out" 2>/dev/null
  grep -E "passed|failed|error" "$WORK/pytest-gpu.out" 2>/dev/null | tail -n 3
  echo '```'
  for suite in precision quant batching lora calibration; do
    if [ -f "$WORK/$suite/results.md" ]; then
      echo
      sed '1,/^$/d' "$WORK/$suite/results.md"
    fi
  done
  if [ -f "$WORK/profile/profile.md" ]; then
    echo
    sed 's/^# /### /; s/^## /#### /' "$WORK/profile/profile.md"
  fi
} >"$SUMMARY"
cp "$SUMMARY" "$LOG" "$OUT_DIR/"
tar -czf "$OUT_DIR/gpu-results.tar.gz" -C "$WORK" .
log "wrote $OUT_DIR/summary.md, gpu.log, gpu-results.tar.gz in $(($(date +%s) - START))s"
cp "$LOG" "$OUT_DIR/gpu.log"
exit 0
