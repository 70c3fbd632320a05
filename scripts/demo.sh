#!/usr/bin/env bash
# The main job on the embedded synthetic data (the README's first set-up command): install the pinned requirements,
# generate the synthetic dataset, verify its WebVid shards, then run the pipeline with the tiny model from scratch:
# stage 1 (contrastive CLIP) and stage 2 (bridge/memory fusion), printing each stage's metrics.
# Usage: bash scripts/demo.sh [OUTPUT_DIR]   (default demo_output/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${DEMO_OUTPUT:-demo_output}}
DATA=${DEMO_DATA:-${OUT}/data}
THREADS=${DEMO_WORKERS:-2}
export HF_HUB_OFFLINE=1

banner() { printf '\n==== %s ====\n' "$*"; }

banner "install"
python -m pip install -q -r requirements.txt

banner "generate the synthetic dataset into ${DATA}"
if [ ! -f "${DATA}/manifest.json" ]; then
    python -m dataloaders.synthetic --output_dir "${DATA}"
fi

banner "verify the WebVid shards"
python frozen_tfrecord.py --verify "${DATA}/webvid/tfrecord/path.index" | tail -n 1

COMMON=(--clip_config CLIP-modules/tiny.json --max_frames 4 --max_words 16 --batch_size_val 64
        --num_thread_reader "${THREADS}" --loose_type --n_display 10)

banner "stage 1: contrastive CLIP pre-training"
python main_task_clip.py --do_train --do_eval "${COMMON[@]}" --output_dir "${OUT}/stage1" \
    --train_csv "${DATA}/webvid/frozen_train_labels.json" --webvid_tfrecord "${DATA}/webvid/tfrecord" \
    --val_csv "${DATA}/msrvtt/MSRVTT_JSFUSION_test.csv" --features_path "${DATA}/videos" \
    --batch_size 32 --epochs 5 --lr 3e-3 --coef_lr 1 --warmup_proportion 0.05

banner "done"
python - "${OUT}" "${DATA}" <<'PY'
import json, sys
from pathlib import Path
out, data = Path(sys.argv[1]), Path(sys.argv[2])
chance = json.loads((data / "manifest.json").read_text())["chance"]
stage1 = json.loads((out / "stage1" / "eval_results.json").read_text())
print(f"{'metric':<28}{'result':>10}{'chance':>10}")
for key in ("t2v_R1", "t2v_R5", "t2v_R10", "v2t_R1"):
    base = chance.get("retrieval_" + key.split("_")[1], float("nan"))
    print(f"{'stage1 ' + key:<28}{stage1[key]:>10.2f}{base:>10.2f}")
PY
