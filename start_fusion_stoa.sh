#!/usr/bin/env bash
# Stage 2 of STOA-VLP (--method stoa): VTM + MLM + prefix PLM + object/action matching over
# [frames, v_sep, trajectories, actions, text] with joint attention; the published pre-training recipe
# (whongzhong/STOA-VLP README: 10 epochs, batch 8 per GPU, lr 1e-5, warm-up 0.1, 12 frames, 32 words, O = 10),
# launched with torchrun. STOA has no stage 1: INIT_MODEL is a --method membridge stage-1 checkpoint.
# Usage: DATA_PATH=/data OBJECTS_DIR=/data/objects LABELMAP=/data/label_map.json TAG_FILE=/data/noun_verb_tags.json \
#        INIT_MODEL=ckpts/stage1/ckpt/step-N OUTPUT_PATH=ckpts/stoa_stage2 NPROC_PER_NODE=8 bash start_fusion_stoa.sh
# --batch_size is global: 64 = the published 8 per GPU on 8 GPUs (the GPU count is not published).
# Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 MASTER_PORT=29500 bash start_fusion_stoa.sh
set -euo pipefail
DATA_PATH=${DATA_PATH:-data}
INIT_MODEL=${INIT_MODEL:?set INIT_MODEL to a stage-1 checkpoint (OUTPUT/ckpt/step-N)}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/stoa_stage2}
WEBVID_TFRECORD=${WEBVID_TFRECORD:-WebVid_TFRecord}
OBJECTS_DIR=${OBJECTS_DIR:-${DATA_PATH}/objects}
LABELMAP=${LABELMAP:-${DATA_PATH}/label_map.json}
TAG_FILE=${TAG_FILE:-${DATA_PATH}/noun_verb_tags.json}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    main_task_fusion.py --do_train --num_thread_reader=4 \
    --method stoa --object_count 10 \
    --objects_dir "${OBJECTS_DIR}" --labelmap_path "${LABELMAP}" --tag_file "${TAG_FILE}" \
    --cross_config_path ./CLIP-modules \
    --epochs=10 --batch_size=64 --n_display=50 \
    --train_csv "${DATA_PATH}/frozen_train_labels.json" \
    --val_csv "${DATA_PATH}/MSRVTT_JSFUSION_test.csv" \
    --features_path "${DATA_PATH}/MSRVTT_Videos" \
    --webvid_tfrecord "${WEBVID_TFRECORD}" \
    --warmup_proportion 0.1 \
    --output_dir "${OUTPUT_PATH}" \
    --lr 1e-5 --max_words 32 --max_frames 12 --batch_size_val 32 \
    --datatype msrvtt \
    --feature_framerate 1 \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    --init_model "${INIT_MODEL}" \
    "$@"
