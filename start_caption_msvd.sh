#!/usr/bin/env bash
# MSVD captioning through the MemBridge fusion (the published recipe), launched with torchrun.
# Usage: DATA_PATH=/data/MSVD INIT_MODEL=ckpts/stage2/ckpt/step-N OUTPUT_PATH=ckpts/caption_msvd \
#        NPROC_PER_NODE=8 bash start_caption_msvd.sh [extra flags, e.g. --beam_size 5]
# DATA_PATH holds {train,val,test}_list.txt + raw-captions.pkl; the videos are in ${VIDEO_PATH}.
set -euo pipefail
DATA_PATH=${DATA_PATH:-data/MSVD}
VIDEO_PATH=${VIDEO_PATH:-${DATA_PATH}/MSVD_Videos}
OUTPUT_PATH=${OUTPUT_PATH:-ckpts/caption_msvd}
# INIT_MODEL: the stage-2 checkpoint (OUTPUT/ckpt/step-N or a weights file); PRETRAINED_MODEL is accepted as its older name
INIT_MODEL=${INIT_MODEL:-${PRETRAINED_MODEL:?set INIT_MODEL to the stage-2 checkpoint (OUTPUT/ckpt/step-N or a weights file)}}
CROSS_CONFIG_PATH=${CROSS_CONFIG_PATH:-./CLIP-modules}
source "$(dirname "${BASH_SOURCE[0]}")/scripts/torchrun.sh"  # launch = torchrun with NPROC_PER_NODE, NNODES, ...

launch \
    -m video_captioning.main_task_caption --do_train --num_thread_reader=4 \
    --cross_config_path "${CROSS_CONFIG_PATH}" \
    --epochs=10 --batch_size=32 --n_display=50 \
    --data_path "${DATA_PATH}" \
    --features_path "${VIDEO_PATH}" \
    --warmup_proportion 0.2 \
    --output_dir "${OUTPUT_PATH}" \
    --lr 5e-5 --max_words 32 --max_frames 12 --batch_size_val 32 \
    --datatype msvd \
    --feature_framerate 1 --coef_lr 1e-3 \
    --freeze_layer_num 0 --slice_framepos 2 \
    --linear_patch 2d --sim_header meanP \
    --init_model "${INIT_MODEL}" \
    "$@"
