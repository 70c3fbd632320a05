#!/usr/bin/env bash
# MSR-VTT captioning through the MemBridge fusion, launched with torchrun. The published MSVD recipe (lr 5e-5,
# warm-up 0.2, 32 words, 12 frames, coef_lr 1e-3) with 5 epochs: MSR-VTT's training split holds 6,513 videos x 20
# references (about 130k pairs per epoch). Test = video7010..video9999 with all 20 references.
# Usage: DATA_PATH=/data/MSRVTT INIT_MODEL=ckpts/stage2/ckpt/step-N OUTPUT_PATH=ckpts/caption_msrvtt \
#        NPROC_PER_NODE=8 bash start_caption_msrvtt.sh [extra flags, e.g. --beam_size 5]
set -euo pipefail
DATA_PATH=${DATA_PATH:-data/MSRVTT}
VIDEO_PATH=${VIDEO_PATH:-${DATA_PATH}/videos}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/caption_msrvtt}
# INIT_MODEL: the stage-2 checkpoint (OUTPUT/ckpt/step-N or a weights file); PRETRAINED_MODEL is accepted as its older name
INIT_MODEL=${INIT_MODEL:-${PRETRAINED_MODEL:?set INIT_MODEL to the stage-2 checkpoint (OUTPUT/ckpt/step-N or a weights file)}}
CROSS_CONFIG_PATH=${CROSS_CONFIG_PATH:-./CLIP-modules}
EPOCHS=${EPOCHS:-5}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    -m video_captioning.main_task_caption --do_train --num_thread_reader=4 \
    --cross_config_path "${CROSS_CONFIG_PATH}" \
    --epochs="${EPOCHS}" --batch_size=32 --n_display=50 \
    --data_path "${DATA_PATH}/MSRVTT_data.json" \
    --features_path "${VIDEO_PATH}" \
    --warmup_proportion 0.2 \
    --output_dir "${OUTPUT_PATH}" \
    --lr 5e-5 --max_words 32 --max_frames 12 --batch_size_val 32 \
    --datatype msrvtt \
    --feature_framerate 1 --coef_lr 1e-3 \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    --init_model "${INIT_MODEL}" \
    "$@"
