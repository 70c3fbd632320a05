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

import logging

from engine.builders import build_dataset, build_model, convert_weights_fp16, start_run, webvid_source
from engine.distributed import cleanup, init_distributed
from engine.flags import build_parser, validate
from engine.trainer import fit, run_evaluation
from video_text_retrieval.task import ContrastiveTask, evaluate_retrieval

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser("clip", description=__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    dist = init_distributed()
    try:
        validate(args, dist.world_size)
        start_run(args, dist.rank, dist.world_size)
        model = build_model(args, with_fusion=False)
        encoder = model.encoder
        frozen = encoder.freeze_layers(args.freeze_layer_num)
        logger.info("--freeze_layer_num %d: %d CLIP tensors frozen", args.freeze_layer_num, len(frozen))
        if args.precision == "fp16":
            convert_weights_fp16(model)
        task = ContrastiveTask(model)
        image_size = encoder.clip.config.image_resolution

        evaluate = None
        if args.val_csv:
            eval_set = build_dataset(args, args.datatype, "test", image_size)

            def evaluate(task: ContrastiveTask) -> dict:
                return evaluate_retrieval(
                    task.model,
                    eval_set,
                    dist,
                    args.batch_size_val,
                    args.num_thread_reader,
                    allow_missing=args.allow_missing_eval_videos,
                )

        if args.do_train:
            source = webvid_source(args) if args.train_datatype == "webvid" else None
            train_set = build_dataset(args, args.train_datatype, "train", image_size, source=source)
            metrics = fit(args, task, train_set, dist, evaluate if args.do_eval or args.val_csv else None)
        else:
            if evaluate is None:
                raise SystemExit("--do_eval needs --val_csv (the evaluation annotation file)")
            task.to(dist.device)
            metrics = run_evaluation(args, task, evaluate, dist)
        return metrics
    finally:
        cleanup()


if __name__ == "__main__":
    main()
