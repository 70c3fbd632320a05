#!/usr/bin/env bash
# MSVD text-video retrieval fine-tuning with bridge re-ranking, launched with torchrun. Recipe from CLIP4Clip's README
# (ArrowLuo/CLIP4Clip, "MSVD": --epochs 5 --batch_size 128 --lr 1e-4 --max_words 32 --max_frames 12
# --batch_size_val 16 --feature_framerate 1 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2 --loose_type
# --linear_patch 2d --sim_header meanP); MemBridge adds --init_model (stage 2) and the top-32 re-ranking. Every epoch
# is evaluated on val_list.txt and the best weights on test_list.txt. DATA_PATH holds train/val/test_list.txt and
# raw-captions.pkl. Usage:
#   DATA_PATH=/data/msvd INIT_MODEL=ckpts/stage2_fusion/ckpt/step-N NPROC_PER_NODE=8 bash start_retrieval_msvd.sh
set -euo pipefail
DATA_PATH=${DATA_PATH:-data/msvd}
INIT_MODEL=${INIT_MODEL:?set INIT_MODEL to the stage-2 checkpoint (OUTPUT/ckpt/step-N or a published .bin)}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/retrieval_msvd}
FEATURES_PATH=${FEATURES_PATH:-${DATA_PATH}/MSVD_Videos}
EPOCHS=${EPOCHS:-5}
BATCH_SIZE=${BATCH_SIZE:-128}
LR=${LR:-1e-4}
RERANK_TOPK=${RERANK_TOPK:-32}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    -m video_text_retrieval.main_task_retrieval --do_train --num_thread_reader=2 \
    --epochs="${EPOCHS}" --batch_size="${BATCH_SIZE}" --n_display=50 \
    --cross_config_path ./CLIP-modules \
    --data_path "${DATA_PATH}" \
    --features_path "${FEATURES_PATH}" \
    --output_dir "${OUTPUT_PATH}" \
    --lr "${LR}" --max_words 32 --max_frames 12 --batch_size_val 16 \
    --datatype msvd \
    --feature_framerate 1 --coef_lr 1e-3 \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    --rerank_topk "${RERANK_TOPK}" \
    --init_model "${INIT_MODEL}" \
    "$@"
