#!/usr/bin/env bash
# MSR-VTT 1k-A text-video retrieval fine-tuning with bridge re-ranking (the published MemBridge recipe: lr 5e-5,
# batch 32, 5 epochs, 12 frames at 2 fps, 32 words), launched with torchrun. No validation split: the test split is
# evaluated at the end. Usage:
#   DATA_PATH=/data/msrvtt INIT_MODEL=ckpts/stage2_fusion/ckpt/step-N OUTPUT_PATH=ckpts/ret_msrvtt NPROC_PER_NODE=8 \
#   bash start_retrieval_msrvtt.sh [extra flags, e.g. --rerank_topk 0]
set -euo pipefail
DATA_PATH=${DATA_PATH:-data/msrvtt}
INIT_MODEL=${INIT_MODEL:?set INIT_MODEL to the stage-2 checkpoint (OUTPUT/ckpt/step-N or a published .bin)}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/retrieval_msrvtt}
TRAIN_CSV=${TRAIN_CSV:-${DATA_PATH}/MSRVTT_train.9k.csv}
VAL_CSV=${VAL_CSV:-${DATA_PATH}/MSRVTT_JSFUSION_test.csv}
FEATURES_PATH=${FEATURES_PATH:-${DATA_PATH}/MSRVTT_Videos}
EPOCHS=${EPOCHS:-5}
BATCH_SIZE=${BATCH_SIZE:-32}
LR=${LR:-5e-5}
RERANK_TOPK=${RERANK_TOPK:-32}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    -m video_text_retrieval.main_task_retrieval --do_train --num_thread_reader=4 \
    --epochs="${EPOCHS}" --batch_size="${BATCH_SIZE}" --n_display=50 \
    --cross_config_path ./CLIP-modules \
    --train_csv "${TRAIN_CSV}" \
    --val_csv "${VAL_CSV}" \
    --data_path "${DATA_PATH}/MSRVTT_data.json" \
    --features_path "${FEATURES_PATH}" \
    --warmup_proportion 0.1 \
    --output_dir "${OUTPUT_PATH}" \
    --lr "${LR}" --max_words 32 --max_frames 12 --batch_size_val 32 \
    --datatype msrvtt --expand_msrvtt_sentences \
    --feature_framerate 2 --coef_lr 1e-3 \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    --rerank_topk "${RERANK_TOPK}" \
    --init_model "${INIT_MODEL}" \
    "$@"
