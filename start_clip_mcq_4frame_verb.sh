#!/usr/bin/env bash
# Stage 1 with MCQ / BridgeFormer (--stage1_objective mcq), stage 3 of 3: 4 frames, verb questions;
# starts from stage 2's weights, bridge included (INIT_MODEL).
# MCQ's learning rates fall 1e-4 -> 3e-5 -> 1e-5 over its three stages (MCQ_HMMC.md A.9); CLIP trains at lr x coef_lr,
# the BridgeFormer at lr. PHRASE_FILE: MCQ's noun/verb TSV for the WebVid captions (caption, path, nouns, verbs).
# Usage: DATA_PATH=/data PHRASE_FILE=/data/webvid_training_success_full_noun_verb.tsv \
#        INIT_MODEL=ckpts/PREVIOUS/ckpt/step-N OUTPUT_PATH=ckpts/mcq_4frame_verb \
#        NPROC_PER_NODE=8 bash start_clip_mcq_4frame_verb.sh [extra flags]
set -euo pipefail
DATA_PATH=${DATA_PATH:-data}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/stage1_mcq_4frame_verb}
CLIP_PATH=${CLIP_PATH:-./CLIP-modules/ViT-B-16.pt}
INIT_MODEL=${INIT_MODEL:-ckpts/stage1_mcq_previous/best_model.safetensors}
WEBVID_TFRECORD=${WEBVID_TFRECORD:-WebVid_TFRecord}
PHRASE_FILE=${PHRASE_FILE:-${DATA_PATH}/webvid_training_success_full_noun_verb.tsv}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    main_task_clip.py --do_train --num_thread_reader=2 \
    --init_model "${INIT_MODEL}" \
    --stage1_objective mcq --phrase_file "${PHRASE_FILE}" --mcq_question verb \
    --epochs=5 --batch_size=32 --n_display=50 \
    --train_csv "${DATA_PATH}/frozen_train_labels.json" \
    --val_csv "${DATA_PATH}/MSRVTT_JSFUSION_test.csv" \
    --features_path "${DATA_PATH}/MSRVTT_Videos" \
    --webvid_tfrecord "${WEBVID_TFRECORD}" \
    --warmup_proportion 0.1 \
    --output_dir "${OUTPUT_PATH}" \
    --lr 1e-5 --max_words 32 --max_frames 4 --batch_size_val 32 \
    --datatype msrvtt \
    --feature_framerate 1 --coef_lr 1e-3 \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    "$@"
