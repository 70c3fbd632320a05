#!/usr/bin/env bash
# MSVD captioning of STOA-VLP (--method stoa): prefix LM over [frames, v_sep, trajectories, actions, text] scoring
# every reference token (no contrastive loss on MSVD, as published), greedy decoding; the published recipe
# (whongzhong/STOA-VLP README, spec T2VLP_STOA.md B.7/B.9: 10 epochs, batch 6 per GPU, lr 1e-4 / coef_lr 1e-3,
# fusion 1e-5, 32 words, 12 frames at 1 fps, O = 10), launched with torchrun.
# Usage: DATA_PATH=/data/msvd OBJECTS_DIR=/data/msvd/objects LABELMAP=/data/label_map.json \
#        INIT_MODEL=ckpts/stoa_stage2/ckpt/step-N OUTPUT_PATH=ckpts/stoa_caption_msvd NPROC_PER_NODE=8 \
#        bash start_caption_msvd_stoa.sh [extra flags, e.g. --beam_size 5]
# --batch_size is global: 48 = the published 6 per GPU on 8 GPUs (GPU count unpublished).
set -euo pipefail
DATA_PATH=${DATA_PATH:-data/msvd}
VIDEO_PATH=${VIDEO_PATH:-${DATA_PATH}/MSVD_Videos}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/stoa_caption_msvd}
INIT_MODEL=${INIT_MODEL:?set INIT_MODEL to the --method stoa stage-2 checkpoint (OUTPUT/ckpt/step-N)}
OBJECTS_DIR=${OBJECTS_DIR:-${DATA_PATH}/objects}
LABELMAP=${LABELMAP:-${DATA_PATH}/label_map.json}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    -m video_captioning.main_task_caption --do_train --num_thread_reader=4 \
    --method stoa --object_count 10 --objects_dir "${OBJECTS_DIR}" --labelmap_path "${LABELMAP}" \
    --cross_config_path ./CLIP-modules \
    --epochs=10 --batch_size=48 --n_display=50 \
    --data_path "${DATA_PATH}" \
    --features_path "${VIDEO_PATH}" \
    --warmup_proportion 0.1 \
    --output_dir "${OUTPUT_PATH}" \
    --lr 1e-4 --coef_lr 1e-3 --fusion_lr 1e-5 --max_words 32 --max_frames 12 --batch_size_val 48 \
    --datatype msvd \
    --feature_framerate 1 \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    --init_model "${INIT_MODEL}" \
    "$@"
