"""Stage 1: contrastive fine-tuning of the CLIP video/text dual encoder on WebVid, evaluated on MSR-VTT 1k-A.

The published command line runs unchanged with ``light.pytorch.launch`` replaced by ``torchrun``::

    torchrun --nproc_per_node 8 main_task_clip.py --do_train --num_thread_reader=2 \\
        --visual_pretrain_path ./CLIP-modules/ViT-B-16.pt --cross_config_path ./CLIP-modules \\
        --epochs=5 --batch_size=32 --n_display=50 \\
        --train_csv ${DATA_PATH}/frozen_train_labels.json --val_csv ${DATA_PATH}/MSRVTT_JSFUSION_test.csv \\
        --data_path ${DATA_PATH}/frozen_train_labels.json --features_path ${DATA_PATH}/MSRVTT_Videos \\
        --warmup_proportion 0.1 --output_dir ${OUTPUT_PATH} \\
        --lr 1e-4 --max_words 32 --max_frames 12 --batch_size_val 32 \\
        --datatype msrvtt --expand_msrvtt_sentences --feature_framerate 1 --coef_lr 1e-3 \\
        --freeze_layer_num 0 --slice_framepos 2 --loose_type --linear_patch 2d --sim_header meanP

The WebVid shards are read from ``--webvid_tfrecord`` (default ``WebVid_TFRecord/``, as the published README asks),
or videos from ``--webvid_video_dir``; ``--train_datatype msrvtt|msvd|...`` trains on a retrieval dataset instead.
On the embedded synthetic data with the tiny model (``python -m dataloaders.synthetic --output_dir data/synth``)::

    python main_task_clip.py --do_train --clip_config CLIP-modules/tiny.json --output_dir runs/stage1 \\
        --train_csv data/synth/webvid/frozen_train_labels.json --webvid_tfrecord data/synth/webvid/tfrecord \\
        --val_csv data/synth/msrvtt/MSRVTT_JSFUSION_test.csv --features_path data/synth/videos \\
        --max_frames 6 --max_words 16 --batch_size 32 --epochs 10 --lr 1e-3 --coef_lr 1 --loose_type
"""

from __future__ import annotations

from engine.builders import build_model, build_pretrain_set
from engine.flags import build_parser
from engine.run import Job, cli, prepare_model, run_main
from video_text_retrieval.settings import build_retrieval_evaluator
from video_text_retrieval.task import ContrastiveTask


def build(args, dist) -> Job:
    """CLIP dual encoder (``--freeze_layer_num``, ``--precision``), InfoNCE on the global batch, retrieval test."""
    model = prepare_model(args, build_model(args, with_fusion=False))
    size = model.encoder.clip.config.image_resolution
    test = build_retrieval_evaluator(args, args.datatype, "test", size, dist) if args.val_csv else None
    task = ContrastiveTask(model, align_weight=args.w_align)
    return Job(task, train_set=lambda: build_pretrain_set(args, size), test=test)


def main(argv: list[str] | None = None) -> dict:
    return run_main(build_parser("clip", description=__doc__.split("\n\n")[0]), build, argv)


if __name__ == "__main__":
    cli(main)
