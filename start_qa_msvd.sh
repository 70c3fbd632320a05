#!/usr/bin/env bash
# MSVD-QA fine-tuning through the bridge fusion (the MSRVTT-QA recipe; MSVD-QA reuses the msrvtt_qa_* flags),
# launched with torchrun.
# Usage: DATA_PATH=/data/msvd_qa OUTPUT_PATH=ckpts/qa_msvd INIT_MODEL=ckpts/stage2/ckpt/step-N \
#        NPROC_PER_NODE=8 bash start_qa_msvd.sh [extra flags, e.g. --qa_head first_token]
# Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 MASTER_PORT=29500 bash start_qa_msvd.sh
set -euo pipefail
DATA_PATH=${DATA_PATH:-data/msvd_qa}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/qa_msvd}
INIT_MODEL=${INIT_MODEL:?set INIT_MODEL to the pre-trained weights (a ckpt/step-N directory or a weights file)}
FEATURES_PATH=${FEATURES_PATH:-${DATA_PATH}/MSVD_Videos}
CROSS_CONFIG_PATH=${CROSS_CONFIG_PATH:-./CLIP-modules}
EPOCHS=${EPOCHS:-5}
BATCH_SIZE=${BATCH_SIZE:-32}
LR=${LR:-2e-4}
COEF_LR=${COEF_LR:-1e-3}
FUSION_LR=${FUSION_LR:-1e-5}
WARMUP=${WARMUP:-0.1}
MAX_WORDS=${MAX_WORDS:-32}
MAX_FRAMES=${MAX_FRAMES:-12}
NUM_THREAD_READER=${NUM_THREAD_READER:-4}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    -m video_qa.main_task_qa --do_train --datatype msvd_qa --num_thread_reader="${NUM_THREAD_READER}" \
    --epochs="${EPOCHS}" --batch_size="${BATCH_SIZE}" --n_display=50 \
    --cross_config_path "${CROSS_CONFIG_PATH}" \
    --msrvtt_qa_train_json "${DATA_PATH}/train.jsonl" \
    --msrvtt_qa_val_json "${DATA_PATH}/val.jsonl" \
    --msrvtt_qa_test_json "${DATA_PATH}/test.jsonl" \
    --msrvtt_qa_anslabel_json "${DATA_PATH}/train_ans2label.json" \
    --msrvtt_features_path "${FEATURES_PATH}" \
    --warmup_proportion "${WARMUP}" \
    --output_dir "${OUTPUT_PATH}" \
    --lr "${LR}" --fusion_lr "${FUSION_LR}" --max_words "${MAX_WORDS}" --max_frames "${MAX_FRAMES}" \
    --batch_size_val 32 \
    --feature_framerate 1 --coef_lr "${COEF_LR}" \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    --init_model "${INIT_MODEL}" --eval_every_epoch \
    "$@"
