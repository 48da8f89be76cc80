#!/usr/bin/env bash
# Everything this project measures on a GPU, in one call (for the device machine; see DEVELOPERS' notes).
#
#   bash benchmarks/gpu_suite.sh            # writes logs and JSON results under ${OUT:-benchmarks/results/gpu}
#
# The device image has python3 with torch; megatron-core (and its deps) travel as wheels in .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1
# Steps: install the wheels, the GPU test tier (pytest -m gpu), the shared-vs-unshared training benchmark
# for each attention backend. Nothing here hard-codes a result: every number comes from this run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/device.txt"
python3 -c "import torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)" \
  | tee -a "$OUT_DIR/device.txt"

echo "== GPU test tier"
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT_DIR/pytest_gpu.log"

echo "== shared vs unshared training, per backend"
for backend in dense flex varlen; do
  python3 benchmarks/bench_train.py --preset gpu-1b --steps 12 --backend "$backend" \
    --out "$OUT_DIR/train_${backend}.json" 2>&1 | tail -30 | tee "$OUT_DIR/train_${backend}.log"
done
echo "results in $OUT_DIR"
