#!/usr/bin/env bash
# MSRVTT-QA fine-tuning of STOA-VLP (--method stoa): [frames, v_sep, trajectories, actions, question, answer slot]
# through the fusion, the answer's first BPE token predicted by the tied vocabulary head (--qa_head first_token); the
# published recipe (whongzhong/STOA-VLP README, spec T2VLP_STOA.md B.7/B.9: 5 epochs, batch 6 per GPU, lr 1e-4,
# fusion 1e-5, 12 frames at 1 fps, O = 10), launched with torchrun. The published command gives no --coef_lr and no
# --max_words: the STOA argparse defaults (1.0 and 20, spec B.8 / A.7) are passed. MSVD-QA reuses the msrvtt_qa_* flags.
# Usage: DATA_PATH=/data/msrvtt_qa OBJECTS_DIR=/data/objects LABELMAP=/data/label_map.json \
#        INIT_MODEL=ckpts/stoa_stage2/ckpt/step-N OUTPUT_PATH=ckpts/stoa_qa_msrvtt NPROC_PER_NODE=8 \
#        bash start_qa_msrvtt_stoa.sh [extra flags]
# --batch_size is global: 48 = the published 6 per GPU on 8 GPUs (GPU count unpublished).
# Several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 MASTER_PORT=29500 bash start_qa_msrvtt_stoa.sh
set -euo pipefail
DATA_PATH=${DATA_PATH:-data/msrvtt_qa}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/stoa_qa_msrvtt}
INIT_MODEL=${INIT_MODEL:?set INIT_MODEL to the --method stoa stage-2 checkpoint (OUTPUT/ckpt/step-N)}
FEATURES_PATH=${FEATURES_PATH:-${DATA_PATH}/MSRVTT_Videos}
OBJECTS_DIR=${OBJECTS_DIR:-${DATA_PATH}/objects}
LABELMAP=${LABELMAP:-${DATA_PATH}/label_map.json}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    -m video_qa.main_task_qa --do_train --datatype msrvtt_qa --num_thread_reader=4 \
    --method stoa --object_count 10 --objects_dir "${OBJECTS_DIR}" --labelmap_path "${LABELMAP}" \
    --qa_head first_token \
    --epochs=5 --batch_size=48 --n_display=50 \
    --cross_config_path ./CLIP-modules \
    --msrvtt_qa_train_json "${DATA_PATH}/train.jsonl" \
    --msrvtt_qa_val_json "${DATA_PATH}/val.jsonl" \
    --msrvtt_qa_test_json "${DATA_PATH}/test.jsonl" \
    --msrvtt_qa_anslabel_json "${DATA_PATH}/train_ans2label.json" \
    --msrvtt_features_path "${FEATURES_PATH}" \
    --warmup_proportion 0.1 \
    --output_dir "${OUTPUT_PATH}" \
    --lr 1e-4 --coef_lr 1.0 --fusion_lr 1e-5 --max_words 20 --max_frames 12 \
    --batch_size_val 48 \
    --feature_framerate 1 \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    --init_model "${INIT_MODEL}" --eval_every_epoch \
    "$@"
