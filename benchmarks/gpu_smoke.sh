#!/usr/bin/env bash
# GPU smoke test of distplan's lowering on this machine's GPUs (CUDA/NCCL), a few minutes:
# plan over all GPUs -> lower and train a few steps -> losses against one GPU -> per-rank
# torch.cuda.max_memory_allocated against the plan's prediction (benchmarks/results/gpu_smoke.json).
#
#   benchmarks/gpu_smoke.sh                 # all GPUs (gpt2, seq 512, 3 Adam steps)
#   benchmarks/gpu_smoke.sh --gpus 4 --model gpt2-xl --seq 1024
#   benchmarks/gpu_smoke.sh --dry-run       # the same path on 2 CPU ranks over gloo (no GPU)
#
# Options are benchmarks/gpu_smoke.py's (--help). Exit code 0 when the losses agree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if [ "${1:-}" = "--dry-run" ]; then
  shift
  exec "$PY" benchmarks/gpu_smoke.py --cpu-ranks 2 "$@"
fi
exec "$PY" benchmarks/gpu_smoke.py "$@"
