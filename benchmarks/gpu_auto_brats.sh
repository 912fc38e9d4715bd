#!/usr/bin/env bash
# The cross-validated BraTS accuracy on a GPU in one call: `pipelines/auto.yaml` on a BraTS folder
# (import -> plan, its epochs timed on this GPU -> k-fold CV -> post-processing chosen on the
# out-of-fold predictions -> report), with the results that docs/benchmarks.md records copied out.
#
#   bash benchmarks/gpu_auto_brats.sh OUT_DIR [BRATS_DIR] [MINUTES_PER_FOLD] [DEVICE]
#
# BRATS_DIR defaults to ../shared/data/brats18, MINUTES_PER_FOLD to 1 (the plan sizes the epochs
# from it and the measured speed; an H200 trains ~1000 slices/s, so 1 min is ~37 epochs of 1600
# slices), DEVICE to cuda (cpu runs the same script on a machine without a GPU, slowly). The run
# folder is RUN_DIR (environment, default /tmp/medseg_auto_brats: outside OUT_DIR, whose
# checkpoints and predictions need not come back). The run stops after LIMIT_S seconds
# (environment, default 540) and is resumable: call the script again on the same machine and it
# goes on from the last finished fold. SET (environment): more space-separated config overrides,
# e.g. SET="cv.folds=3 train.samples_per_epoch=800". medseg runs from this checkout
# (PYTHONPATH); torch and medseg's dependencies must be installed. OUT_DIR receives auto.log,
# plan.yaml, cv_table.csv, cv_summary.json (the plan's post-processing), cv_chosen_summary.json
# (the rule chosen on CV), postprocess.json, the fold histories and the run's state.json.
# PEER=1 (environment): once the run is complete, nnU-Net v2 on the same folds and minutes per
# fold (benchmarks/peer_nnunet.py, 2d and 3d_fullres where the budget holds >= 300 iterations;
# NNUNET_PYTHON: a python with nnunetv2 installed, default PYTHON), its table into
# OUT_DIR/peer_nnunet.md (+ .csv): docs/benchmarks.md, "Peers at the same budget".
set -uo pipefail
OUT=$(realpath -m "${1:?usage: gpu_auto_brats.sh OUT_DIR [BRATS_DIR] [MINUTES_PER_FOLD] [DEVICE]}")
BRATS=$(realpath "${2:-../shared/data/brats18}")
MINUTES=${3:-1}
DEVICE=${4:-cuda}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
RUN=${RUN_DIR:-/tmp/medseg_auto_brats}

[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| monai', monai.__version__)"
overrides=()
for kv in ${SET:-}; do overrides+=(--set "$kv"); done
start=$SECONDS
timeout "${LIMIT_S:-540}" $PY -m medseg run pipelines/auto.yaml --set "pipeline.source=$BRATS" \
    --set "stage.plan.minutes_per_fold=$MINUTES" --set "stage.plan.device=$DEVICE" --out "$RUN" --no-progress "${overrides[@]}" \
    >>"$OUT/auto.log" 2>&1
rc=$?
echo "auto pipeline: rc $rc in $((SECONDS - start)) s (124 = stopped at LIMIT_S; call again to resume)"

copy() {  # copy SRC DEST_NAME when SRC exists
    [ -f "$1" ] && cp "$1" "$OUT/$2"
}
copy "$RUN/plan/plan.yaml" plan.yaml
copy "$RUN/state.json" state.json
copy "$RUN/cv/cv_table.csv" cv_table.csv
copy "$RUN/cv/cv_summary.json" cv_summary.json
copy "$RUN/model/cv_chosen/cv_summary.json" cv_chosen_summary.json
copy "$RUN/model/postprocess.json" postprocess.json
for history in "$RUN"/cv/fold_*/history.csv; do
    [ -f "$history" ] && cp "$history" "$OUT/$(basename "$(dirname "$history")")_history.csv"
done
grep -a "plan: train\.\|stopped (\|time budget\|cv:" "$OUT/auto.log" | tail -n 30
for summary in cv_summary.json cv_chosen_summary.json; do
    [ -f "$OUT/$summary" ] && echo "$summary:" && head -c 600 "$OUT/$summary" && echo
done
if [ "${PEER:-0}" = 1 ] && [ "$rc" -eq 0 ]; then
    NNPY=${NNUNET_PYTHON:-$PY}
    if "$NNPY" -c "import nnunetv2" 2>/dev/null; then
        $PY benchmarks/peer_nnunet.py --run "$RUN" --work "$RUN/peer" --nnunet-python "$NNPY" --device "$DEVICE" \
            --configurations 2d 3d_fullres --out "$OUT/peer_nnunet.md" >>"$OUT/peer.log" 2>&1
        echo "peer (nnU-Net): rc $?"; [ -f "$OUT/peer_nnunet.md" ] && head -n 40 "$OUT/peer_nnunet.md"
    else
        echo "peer (nnU-Net): skipped, nnunetv2 is not importable by $NNPY"
    fi
fi
exit "$rc"
