#!/usr/bin/env bash
# One GPU session in one command: the GPU tests, then latency tables and measured 2:4 speedups.
#
# Run from the repository root on the GPU machine, with the pack made on the CPU machine in .gpu24/
# (benchmarks/GPU.md says how) and OUT set to a folder for the results:
#   OUT=/tmp/gpu_out bash benchmarks/gpu_device_run.sh
# DEVICE=cpu PACK=DIR runs the same steps as a dry run on a machine without a GPU (times are not GPU times).
# Writes OUT/log.txt, OUT/gemm_sweep.json, OUT/gpu24_results.json and OUT/tables.tar.gz (one
# gpu_<model>-b<batch>_<gpu>.json latency table per model).
#
# The package is put on the path without pip (the GPU image has its own torch, numpy and onnx, and no
# network), and everything runs from /tmp so the repository's spdy_onnx/ (without passes/ and runtimes/
# inside it) is not imported instead. Each step has its own time limit, so a hang in one still leaves
# the others' results.
set -o pipefail
: "${OUT:?set OUT to the results folder}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NM_DISABLE_ANALYTICS=1
R=$(pwd)
S=/tmp/shim/spdy_onnx
rm -rf /tmp/shim && mkdir -p "$S" && cp -r spdy_onnx/. "$S/" && cp -r passes "$S/passes" && cp -r runtimes "$S/runtimes"
export PYTHONPATH=/tmp/shim
cd /tmp || exit 1
LOG="$OUT/log.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu,memory.used \
    --format=csv 2>&1 | tee "$LOG"
python3 -c "import torch, numpy, onnx, onnxruntime; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cusparselt', torch.backends.cusparselt.version(), 'numpy', numpy.__version__, 'onnx', onnx.__version__,
'onnxruntime', onnxruntime.__version__)" 2>&1 | tee -a "$LOG"
TIMEOUT_OPT=""
python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout ${TEST_EACH_S:-90}"
echo "== GEMM sweep" | tee -a "$LOG"
timeout "${SWEEP_S:-120}" python3 "$R/benchmarks/gpu_gemm_sweep.py" --out "$OUT/gemm_sweep.json" \
    --device "${DEVICE:-cuda}" 2>&1 | tee -a "$LOG"
echo "== GPU tests" | tee -a "$LOG"
timeout "${TEST_S:-150}" python3 -m pytest -v -p no:cacheprovider $TIMEOUT_OPT -rfE \
    "$R/tests/test_cuda_runtime.py" 2>&1 | tee -a "$LOG"
echo "== gpu_24 run" | tee -a "$LOG"
mkdir -p "$OUT/tables"
timeout "${RUN_S:-330}" python3 "$R/benchmarks/gpu_24.py" run --pack "${PACK:-$R/.gpu24}" --out "$OUT/tables" \
    --device "${DEVICE:-cuda}" --budget-s "${BUDGET_S:-240}" ${MODELS:+--models "$MODELS"} 2>&1 | tee -a "$LOG"
echo "== exit $?" | tee -a "$LOG"
# one archive for the tables: the device tool brings back at most 8 files
mv "$OUT/tables/gpu24_results.json" "$OUT/" 2>/dev/null
tar -czf "$OUT/tables.tar.gz" -C "$OUT/tables" . && rm -rf "$OUT/tables"
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,utilization.gpu,memory.used --format=csv 2>&1 | tee -a "$LOG"
