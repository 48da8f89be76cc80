#!/usr/bin/env bash
# Everything this project measures on a GPU, in one call, inside 8 minutes on one H200.
#
#   bash benchmarks/gpu_suite.sh              # on the GPU machine: results under ${OUT:-benchmarks/results/gpu}
#   bash benchmarks/gpu_suite.sh --rehearse   # the very same steps on CPU with tiny sizes (no nvidia-smi;
#                                             # the current python / .venv; results under
#                                             # ${OUT:-out/gpu_suite_rehearsal}); `make test` runs it
#
# The device image has python3 (3.12) with torch 2.11 (cu130), Triton, matplotlib, pytest; no flash-attn,
# no Transformer Engine. megatron-core travels as wheels in .whl/ (git-ignored), fetched here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1
# (and any of its missing dependencies, one version each); call the device with carry [".whl"].
#
# Steps (each under its own timeout, clipped to what is left of SUITE_BUDGET_S, so one failure or hang
# never costs the rest; a step's status is ok, failed, timeout, refused (a config check said no, e.g. the
# te backend without Transformer Engine) or skipped):
#   data        the project's demo preference data, built with tools/build_dataset.py
#   gpu_tests   the GPU test tier, pytest -m gpu (rehearsal: collection only)
#   attention   python3 benchmarks/attention_sweep.py --out DIR [--rehearse] (skipped when absent)
#   train_*     benchmarks/train_step.py: a 1B-shaped DPO step, sharing on and off, per backend
#               (dense, flex, varlen, te): tokens/s, pairs/s, MFU, peak memory (rehearsal: cpu-tiny)
#   loss_curve  benchmarks/loss_curve.py: bf16 against fp32 (rehearsal: fp32 against fp32, CPU has no
#               bf16 training; stated in its JSON)
# Output (at most 8 files, so that the device tool returns them all): OUT/summary.json (every step's
# status and every result JSON embedded), OUT/suite.log (all logs), OUT/train_step.png,
# OUT/loss_curve.png, OUT/attention_*.png (up to 2), OUT/raw.tar.gz (everything the steps wrote).
# Nothing here hard-codes a result: every number comes from this run.
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
if [[ "${1:-}" == "--rehearse" ]]; then REHEARSE=1; elif [[ $# -gt 0 ]]; then
  echo "usage: bash benchmarks/gpu_suite.sh [--rehearse]" >&2; exit 2
fi
# a rehearsal's CPU numbers never land beside real results: its default folder is git-ignored
if [[ $REHEARSE == 1 ]]; then OUT_DIR=${OUT:-out/gpu_suite_rehearsal}; else OUT_DIR=${OUT:-benchmarks/results/gpu}; fi
RAW="$OUT_DIR/raw"
mkdir -p "$RAW"
STATUS="$RAW/status.tsv"
: > "$STATUS"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [[ $REHEARSE == 1 ]]; then
  PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
  export CUDA_VISIBLE_DEVICES="" PYTHONPATH=$PWD OMP_NUM_THREADS=1
  BUDGET=${SUITE_BUDGET_S:-420}  # ~40 s of CPU time; generous for a busy CI machine
  RECORDS=40; PACK=2048; MAXUNIT=1024
  TRAIN_ARGS=(--preset cpu-tiny --steps 1 --warmup 0 --global-batch-units 4 --pack-tokens "$PACK")
  LOSS_ARGS=(--preset cpu-tiny --steps 3 --dtypes float32,float32 --pack-tokens "$PACK" --global-batch-units 4)
  T_TESTS=120; T_ATTN=120; T_TRAIN=120; T_LOSS=180
else
  PY=${PYTHON:-python3}
  BUDGET=${SUITE_BUDGET_S:-465}
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "wheel install failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
  RECORDS=1200; PACK=4096; MAXUNIT=1024
  TRAIN_ARGS=(--preset gpu-1b --steps 3 --warmup 1)
  LOSS_ARGS=(--preset gpu-small --steps 25 --dtypes float32,bfloat16 --pack-tokens "$PACK" --global-batch-units 16)
  T_TESTS=75; T_ATTN=130; T_TRAIN=50; T_LOSS=80
fi
DEADLINE=$((SECONDS + BUDGET))
RESERVE=12  # seconds kept for the summary, the plots and packing

# step NAME TIMEOUT CMD...: run CMD with its log in RAW/NAME.log; record status and seconds.
# Exit 124/137: timeout; exit 2 from train_step.py: refused (a config check); any other non-zero: failed.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS - RESERVE))
  if (( left < 5 )); then
    printf '%s\tskipped\t0\tno time left in the suite budget\n' "$name" >> "$STATUS"; echo "== $name: skipped"; return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s)"
  local t0=$SECONDS rc status note=""
  timeout -k 5 "$limit" "$@" > "$RAW/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; note="killed after ${limit}s" ;;
    2) if [[ $name == train_* ]]; then status=refused; else status=failed; fi ;;
    *) status=failed ;;
  esac
  [[ $status != ok && -z $note ]] && note="exit $rc: $(grep -v '^\s*$' "$RAW/$name.log" | tail -1 | tr '\t' ' ' | cut -c1-300)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$note" >> "$STATUS"
  echo "   $status ($((SECONDS - t0))s) $note"
}

# --- the device
{
  if [[ $REHEARSE == 0 ]]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  $PY -c "import sys, torch, megatron.core as m; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.cuda.is_available() and torch.cuda.get_device_name(), '| megatron-core', m.__version__)"
} > "$RAW/device.txt" 2>&1
DEVICE=$(tr '\n' ' ' < "$RAW/device.txt" | cut -c1-300)
echo "device: $DEVICE"

# --- data: the demo preference set (long shared prompts, K = 2 and 4), byte tokenizer
step data 60 bash -c "$PY tools/make_demo_data.py --output '$RAW/demo.jsonl' --records $RECORDS && \
  $PY tools/build_dataset.py --input '$RAW/demo.jsonl' --tokenizer byte --output '$RAW/data' \
  --max-unit-tokens $MAXUNIT --pack-tokens $PACK"

# --- the GPU test tier: the files that hold gpu-marked tests (rehearsal: collection only)
GPU_TEST_FILES=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
if [[ $REHEARSE == 1 ]]; then
  step gpu_tests "$T_TESTS" $PY -m pytest -q -m gpu --collect-only -p no:cacheprovider $GPU_TEST_FILES
else
  step gpu_tests "$T_TESTS" $PY -m pytest -q -m gpu -p no:cacheprovider -rs --continue-on-collection-errors \
    $GPU_TEST_FILES
fi

# --- attention sweep (benchmarks/attention_sweep.py)
if [[ -f benchmarks/attention_sweep.py ]]; then
  ATTN_ARGS=(--out "$RAW/attention"); [[ $REHEARSE == 1 ]] && ATTN_ARGS+=(--rehearse)
  step attention "$T_ATTN" $PY benchmarks/attention_sweep.py "${ATTN_ARGS[@]}"
else
  echo "skipped: benchmarks/attention_sweep.py absent" | tee "$RAW/attention.log"
  printf 'attention\tskipped\t0\tskipped: benchmarks/attention_sweep.py absent\n' >> "$STATUS"
fi

# --- end-to-end DPO step, sharing on and off, per backend
for backend in dense flex varlen te; do
  step "train_$backend" "$T_TRAIN" $PY benchmarks/train_step.py --data "$RAW/data" --backend "$backend" \
    "${TRAIN_ARGS[@]}" --json "$RAW/train_$backend.json"
done

# --- bf16 loss curve against fp32
step loss_curve "$T_LOSS" $PY benchmarks/loss_curve.py --data "$RAW/data" --out "$RAW" "${LOSS_ARGS[@]}"
if [[ $REHEARSE == 1 && -f "$RAW/loss_curve.json" ]]; then
  $PY - "$RAW/loss_curve.json" <<'EOF'
import json, sys
p = sys.argv[1]; d = json.load(open(p))
d["note"] = "rehearsal on CPU: fp32 against fp32 (CPU training runs in float32 only); bf16 runs on the GPU"
json.dump(d, open(p, "w"), indent=2)
EOF
fi

# --- summary, plots, one log, one archive (the device returns at most 8 files)
REH=(); [[ $REHEARSE == 1 ]] && REH=(--rehearse)
$PY benchmarks/suite_summary.py --status "$STATUS" --raw "$RAW" --out "$OUT_DIR" --device "$DEVICE" "${REH[@]}" \
  2>&1 | tee "$RAW/summary.log"
[[ -f "$RAW/loss_curve.png" ]] && cp "$RAW/loss_curve.png" "$OUT_DIR/"
if [[ -d "$RAW/attention" ]]; then
  find "$RAW/attention" -name '*.png' | sort | head -2 | while read -r f; do cp "$f" "$OUT_DIR/attention_$(basename "$f")"; done
fi
for f in "$RAW"/device.txt "$RAW"/*.log; do echo "===== $(basename "$f")"; cat "$f"; done > "$OUT_DIR/suite.log" 2>&1
FAILED=$(awk -F'\t' '$2 == "failed" || $2 == "timeout" {print $1}' "$STATUS" | tr '\n' ' ')
tar -C "$OUT_DIR" -czf "$OUT_DIR/raw.tar.gz" --exclude='raw/data' --exclude='raw/demo.jsonl' \
  --exclude='raw/loss_curve_runs/*/reference' raw && rm -rf "$RAW"
echo "results in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
if [[ -n $FAILED ]]; then echo "steps failed: $FAILED(see suite.log)"; exit 1; fi
