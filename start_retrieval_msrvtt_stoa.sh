#!/usr/bin/env bash
# MSR-VTT 1k-A retrieval fine-tuning of STOA-VLP (--method stoa): contrastive + VTM over [frames, v_sep, trajectories,
# actions, text], top-32 re-ranking; the published recipe (whongzhong/STOA-VLP README, spec T2VLP_STOA.md B.7/B.9:
# 5 epochs, batch 8 per GPU, lr 1e-4 / coef_lr 1e-3, fusion 1e-5, 32 words, 12 frames at 1 fps, O = 10, val batch 24
# per GPU), launched with torchrun. INIT_MODEL: a --method stoa stage-2 checkpoint (start_fusion_stoa.sh).
# Usage: DATA_PATH=/data/msrvtt OBJECTS_DIR=/data/msrvtt/objects LABELMAP=/data/label_map.json \
#        INIT_MODEL=ckpts/stoa_stage2/ckpt/step-N OUTPUT_PATH=ckpts/stoa_ret_msrvtt NPROC_PER_NODE=8 \
#        bash start_retrieval_msrvtt_stoa.sh [extra flags]
# --batch_size / --batch_size_val are global: 64 / 192 = the published 8 / 24 per GPU on 8 GPUs (GPU count unpublished).
# Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 MASTER_PORT=29500 bash start_retrieval_msrvtt_stoa.sh
set -euo pipefail
DATA_PATH=${DATA_PATH:-data/msrvtt}
INIT_MODEL=${INIT_MODEL:?set INIT_MODEL to the --method stoa stage-2 checkpoint (OUTPUT/ckpt/step-N)}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/stoa_retrieval_msrvtt}
FEATURES_PATH=${FEATURES_PATH:-${DATA_PATH}/MSRVTT_Videos}
OBJECTS_DIR=${OBJECTS_DIR:-${DATA_PATH}/objects}
LABELMAP=${LABELMAP:-${DATA_PATH}/label_map.json}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    -m video_text_retrieval.main_task_retrieval --do_train --num_thread_reader=4 \
    --method stoa --object_count 10 --objects_dir "${OBJECTS_DIR}" --labelmap_path "${LABELMAP}" \
    --epochs=5 --batch_size=64 --n_display=50 \
    --cross_config_path ./CLIP-modules \
    --train_csv "${DATA_PATH}/MSRVTT_train.9k.csv" \
    --val_csv "${DATA_PATH}/MSRVTT_JSFUSION_test.csv" \
    --data_path "${DATA_PATH}/MSRVTT_data.json" \
    --features_path "${FEATURES_PATH}" \
    --warmup_proportion 0.1 \
    --output_dir "${OUTPUT_PATH}" \
    --lr 1e-4 --coef_lr 1e-3 --fusion_lr 1e-5 --max_words 32 --max_frames 12 --batch_size_val 192 \
    --datatype msrvtt \
    --feature_framerate 1 \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    --rerank_topk 32 \
    --init_model "${INIT_MODEL}" \
    "$@"
