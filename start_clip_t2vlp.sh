#!/usr/bin/env bash
# Stage 1 of T2VLP (Focus-and-Align, --method t2vlp): CLIP + tube tokens + local alignment on WebVid, the published
# recipe (Unified-Robots/T2VLP start_clip.sh), launched with torchrun.
# Usage: DATA_PATH=/data OUTPUT_PATH=ckpts/t2vlp_stage1 NPROC_PER_NODE=8 bash start_clip_t2vlp.sh [extra flags]
# Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 MASTER_PORT=29500 bash start_clip_t2vlp.sh
set -euo pipefail
DATA_PATH=${DATA_PATH:-data}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/t2vlp_stage1}
CLIP_PATH=${CLIP_PATH:-./CLIP-modules/ViT-B-16.pt}
WEBVID_TFRECORD=${WEBVID_TFRECORD:-WebVid_TFRecord}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    main_task_clip.py --do_train --num_thread_reader=2 \
    --method t2vlp \
    --visual_pretrain_path "${CLIP_PATH}" \
    --cross_config_path ./CLIP-modules \
    --epochs=5 --batch_size=32 --n_display=50 \
    --train_csv "${DATA_PATH}/frozen_train_labels.json" \
    --val_csv "${DATA_PATH}/MSRVTT_JSFUSION_test.csv" \
    --features_path "${DATA_PATH}/MSRVTT_Videos" \
    --webvid_tfrecord "${WEBVID_TFRECORD}" \
    --warmup_proportion 0.1 \
    --output_dir "${OUTPUT_PATH}" \
    --lr 1e-4 --max_words 32 --max_frames 12 --batch_size_val 32 \
    --datatype msrvtt \
    --feature_framerate 1 --coef_lr 1e-3 \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    "$@"
