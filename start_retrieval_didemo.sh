#!/usr/bin/env bash
# DiDeMo paragraph-to-video retrieval fine-tuning, launched with torchrun. Recipe from CLIP4Clip's README
# (ArrowLuo/CLIP4Clip, "DiDeMo": 8 GPUs, --epochs 5 --batch_size 128 --lr 1e-4 --max_words 64 --max_frames 64
# --batch_size_val 16 --feature_framerate 1 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2 --loose_type
# --linear_patch 2d --sim_header meanP); MemBridge adds --init_model (stage 2). DATA_PATH holds
# {train,val,test}_data.json (+ optional {split}_list.txt); videos are clipped to their first 30 s.
# Re-ranking is off by default here: the fusion sequence T+1+K+L = 64+1+8+64 = 137 exceeds the 77 positions of the
# published fusion table. For re-ranking use e.g. MAX_FRAMES=12 MAX_WORDS=56 RERANK_TOPK=32 (12+1+8+56 = 77). Usage:
#   DATA_PATH=/data/didemo INIT_MODEL=ckpts/stage2_fusion/ckpt/step-N NPROC_PER_NODE=8 bash start_retrieval_didemo.sh
set -euo pipefail
DATA_PATH=${DATA_PATH:-data/didemo}
INIT_MODEL=${INIT_MODEL:?set INIT_MODEL to the stage-2 checkpoint (OUTPUT/ckpt/step-N or a published .bin)}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/retrieval_didemo}
FEATURES_PATH=${FEATURES_PATH:-${DATA_PATH}/DiDeMo_Videos}
EPOCHS=${EPOCHS:-5}
BATCH_SIZE=${BATCH_SIZE:-128}
LR=${LR:-1e-4}
MAX_WORDS=${MAX_WORDS:-64}
MAX_FRAMES=${MAX_FRAMES:-64}
RERANK_TOPK=${RERANK_TOPK:-0}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    -m video_text_retrieval.main_task_retrieval --do_train --num_thread_reader=2 \
    --epochs="${EPOCHS}" --batch_size="${BATCH_SIZE}" --n_display=50 \
    --cross_config_path ./CLIP-modules \
    --data_path "${DATA_PATH}" \
    --features_path "${FEATURES_PATH}" \
    --output_dir "${OUTPUT_PATH}" \
    --lr "${LR}" --max_words "${MAX_WORDS}" --max_frames "${MAX_FRAMES}" --batch_size_val 16 \
    --datatype didemo \
    --feature_framerate 1 --coef_lr 1e-3 \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    --rerank_topk "${RERANK_TOPK}" \
    --init_model "${INIT_MODEL}" \
    "$@"
