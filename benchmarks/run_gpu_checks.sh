#!/usr/bin/env bash
# Issue 12's GPU checks in one go, sized to fit a lent GPU machine's 15 minutes of device time.
#
#   OUT=gpu-results bash benchmarks/run_gpu_checks.sh         # on the GPU machine, from the repository root
#
# Each step has its own time limit and writes its output to $OUT/<step>.txt, so a slow step costs only
# itself. SCALE (default 0.2: 1,000 images, top 200, test scale 160 x 267 ... 800 x 1333 at 1.0) sizes the
# paper-scale run; SCALE=1 is the paper's full analysis.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PY:-python}
SCALE=${SCALE:-0.2}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    tail -n 25 "$OUT/$name.txt"
}
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >"$OUT/torch.txt" 2>&1
step determinism 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_deterministic_kernels.py -k gpu
step paper_scale 330 "$PY" benchmarks/bench_paper_scale.py --scale "$SCALE" --batch-size 8 --workers 8 --json "$OUT/paper_scale.json"
step precision 150 "$PY" benchmarks/bench_precision.py --device cuda --arch retinanet_cednet_next_tiny \
    --arch-b retinanet_convnext_tiny --images 48 --top 16
step gradients 120 "$PY" benchmarks/bench_gradients.py --device cuda --arch retinanet_cednet_next_tiny --images 48 \
    --batch-size 4 --workers 8 --skip-precision
