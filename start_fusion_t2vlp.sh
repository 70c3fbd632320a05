#!/usr/bin/env bash
# Stage 2 of T2VLP (--method t2vlp): VTM + MLM + single-pass PLM + local alignment over [v_sep, frames, tubes, text]
# with joint attention, the published recipe (Unified-Robots/T2VLP start_fusion.sh), launched with torchrun.
# Usage: DATA_PATH=/data INIT_MODEL=ckpts/t2vlp_stage1/ckpt/step-N OUTPUT_PATH=ckpts/t2vlp_stage2 NPROC_PER_NODE=8 \
#        bash start_fusion_t2vlp.sh [extra flags]
# Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 MASTER_PORT=29500 bash start_fusion_t2vlp.sh
set -euo pipefail
DATA_PATH=${DATA_PATH:-data}
INIT_MODEL=${INIT_MODEL:?set INIT_MODEL to the T2VLP stage-1 checkpoint (OUTPUT/ckpt/step-N)}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/t2vlp_stage2}
WEBVID_TFRECORD=${WEBVID_TFRECORD:-WebVid_TFRecord}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    main_task_fusion.py --do_train --num_thread_reader=4 \
    --method t2vlp \
    --cross_config_path ./CLIP-modules \
    --epochs=10 --batch_size=32 --n_display=50 \
    --train_csv "${DATA_PATH}/frozen_train_labels.json" \
    --val_csv "${DATA_PATH}/MSRVTT_JSFUSION_test.csv" \
    --features_path "${DATA_PATH}/MSRVTT_Videos" \
    --webvid_tfrecord "${WEBVID_TFRECORD}" \
    --warmup_proportion 0.2 \
    --output_dir "${OUTPUT_PATH}" \
    --lr 1e-5 --max_words 32 --max_frames 12 --batch_size_val 32 \
    --datatype msrvtt \
    --feature_framerate 2 \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    --init_model "${INIT_MODEL}" \
    "$@"
