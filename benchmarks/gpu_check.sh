#!/usr/bin/env bash
# GPU check in one call: CUDA tests, a short AMP training run on BraTS cases (slices/s), the
# training-throughput benchmark and the inference benchmark on the GPU.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [BRATS_DIR] [CHECKPOINT]
#
# OUT_DIR receives the logs and JSON results. BRATS_DIR holds BraTS case folders (default
# ../shared/data/brats18); the first is the benchmark/validation case. With CHECKPOINT (a trained
# medseg checkpoint, e.g. from `medseg export --format inference`) the two training steps are
# skipped and the inference benchmark uses it; without one, they need at least two cases and
# the benchmark uses the checkpoint the short training run wrote. With fewer than 4 case folders
# the batch measurement runs on copies of the first case under other ids. medseg runs from this
# checkout (PYTHONPATH), so the machine needs torch + medseg's dependencies installed. Each step
# has its own time limit and the script goes on when one fails; the exit status is the number of
# failed steps.
set -uo pipefail
OUT=$(realpath -m "${1:?usage: gpu_check.sh OUT_DIR [BRATS_DIR] [CHECKPOINT]}")
BRATS=$(realpath "${2:-../shared/data/brats18}")
CHECKPOINT=${3:+$(realpath "$3")}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/medseg-gpu.XXXXXX)
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "--- $name: rc $rc in $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, monai, SimpleITK; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| monai', monai.__version__)"

step cuda_tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py

if [ -z "$CHECKPOINT" ]; then
    # a manifest over the BraTS cases: the first case validates, the others train
    $PY -m medseg import brats "$BRATS" --val-fraction 0.5 --out "$WORK/brats.csv" >"$OUT/import.log" 2>&1 || failed=$((failed + 1))
    COMMON=(--set "data.manifest=$WORK/brats.csv" --set "train.cache_dir=$WORK/cache" --set train.device=cuda
            --set train.num_workers=8 --set train.threads=null)

    step train_amp 150 $PY -m medseg train configs/brats_unet_inception.yaml "${COMMON[@]}" \
        --set train.epochs=3 --set train.samples_per_epoch=1600 --set train.batch_size=32 --set train.max_minutes=2 \
        --out "$WORK/train" --no-progress
    cp "$WORK/train/history.csv" "$OUT/train_history.csv" 2>/dev/null

    step bench_training 120 $PY benchmarks/bench_training.py --device cuda "${COMMON[@]}" --set train.batch_size=32 \
        --steps 20 --rounds 3
    CHECKPOINT="$WORK/train/best.pt"
fi

CASES=("$BRATS"/*/)
if [ "${#CASES[@]}" -lt 4 ]; then  # copies of the first case under other ids for the batch measurement
    first=$(basename "${CASES[0]}")
    mkdir -p "$WORK/brats"
    cp -r "$BRATS"/*/ "$WORK/brats/"
    for i in 2 3 4; do
        mkdir -p "$WORK/brats/${first}_copy$i"
        for f in "$BRATS/$first"/*; do
            cp "$f" "$WORK/brats/${first}_copy$i/$(basename "$f" | sed "s/^$first/${first}_copy$i/")"
        done
    done
    BRATS="$WORK/brats"
fi

step bench_inference 300 $PY benchmarks/bench_inference.py --device cuda --brats-dir "$BRATS" \
    --checkpoint "$CHECKPOINT" --batch-cases 4 --ct-slices 200 --repeats 3 \
    --json "$OUT/bench_inference.json"

echo "=== done: $failed failed step(s); logs in $OUT"
rm -rf "$WORK"
exit "$failed"
