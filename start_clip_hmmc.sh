#!/usr/bin/env bash
# Stage 1 with HMMC (--stage1_objective hmmc): HMMC's published pre-training recipe (MCQ_HMMC.md B.12): 11 epochs,
# global batch 128, 1024 queued negatives, momentum 0.99, 12 frames, temporal transformer, frame term at evaluation
# (top 3 frames), lr 1e-4 with CLIP at lr x coef_lr (1e-3). Differences from the published command: English captions
# on WebVid (HMMC pre-trained on its unreleased Chinese CHVTT); one CLIP learning rate (HMMC trains the text tower at
# --text_lr 1e-4, not here yet); frames sampled by our 1-fps sampler (no --frame_sample). HMMC used CLIP ViT-B/32.
# Usage: DATA_PATH=/data CLIP_PATH=./CLIP-modules/ViT-B-32.pt OUTPUT_PATH=ckpts/hmmc NPROC_PER_NODE=8 \
#        bash start_clip_hmmc.sh [extra flags]
set -euo pipefail
DATA_PATH=${DATA_PATH:-data}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/stage1_hmmc}
CLIP_PATH=${CLIP_PATH:-./CLIP-modules/ViT-B-32.pt}
WEBVID_TFRECORD=${WEBVID_TFRECORD:-WebVid_TFRecord}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    main_task_clip.py --do_train --num_thread_reader=8 \
    --visual_pretrain_path "${CLIP_PATH}" \
    --stage1_objective hmmc --contrast_num_negative 1024 --contrast_momentum 0.99 \
    --use_temp --use_frame_fea --top_frames 3 --temporal_init random --temporal_ln_eps 1e-12 --freeze_logit_scale \
    --epochs=11 --batch_size=128 --n_display=596 \
    --train_csv "${DATA_PATH}/frozen_train_labels.json" \
    --val_csv "${DATA_PATH}/MSRVTT_JSFUSION_test.csv" \
    --features_path "${DATA_PATH}/MSRVTT_Videos" \
    --webvid_tfrecord "${WEBVID_TFRECORD}" \
    --warmup_proportion 0.2 --weight_decay 0.05 \
    --output_dir "${OUTPUT_PATH}" \
    --lr 1e-4 --max_words 32 --max_frames 12 --batch_size_val 128 \
    --datatype msrvtt \
    --feature_framerate 1 --coef_lr 1e-3 \
    --linear_patch 2d --sim_header seqTransf \
    "$@"
