"""Stage 2: MemBridge fusion pre-training (bridge tokens read from the memory bank; VTM + MLM + PLM) on WebVid,
with the stage-1 CLIP frozen; evaluated on MSR-VTT 1k-A retrieval with top-k re-ranking and on held-out pairs.

The published command line runs unchanged with ``light.pytorch.launch`` replaced by ``torchrun``::

    torchrun --nproc_per_node 8 main_task_fusion.py --do_train --num_thread_reader=4 \\
        --cross_config_path ./CLIP-modules \\
        --epochs=10 --batch_size=32 --n_display=50 \\
        --train_csv ${DATA_PATH}/frozen_train_labels.json --val_csv ${DATA_PATH}/MSRVTT_JSFUSION_test.csv \\
        --data_path ${DATA_PATH}/frozen_train_labels.json --features_path ${DATA_PATH}/MSRVTT_Videos \\
        --warmup_proportion 0.2 --output_dir ${OUTPUT_PATH} \\
        --lr 1e-5 --max_words 32 --max_frames 12 --batch_size_val 32 \\
        --datatype msrvtt --expand_msrvtt_sentences --feature_framerate 2 --coef_lr 1e-3 \\
        --freeze_layer_num 0 --slice_framepos 2 --loose_type --linear_patch 2d --sim_header meanP \\
        --init_model ${INIT_MODEL}

``--init_model`` is the stage-1 checkpoint (``OUTPUT/ckpt/step-N``, or a state dict in the published layout).
The CLIP sizes come from that checkpoint when it holds CLIP weights of another size than --clip_config; pass the
same --clip_config as stage 1. Fusion sizes: ``fusion.json`` in --cross_config_path. Fusion parameters train at
--fusion_lr (published: 1e-5). On the synthetic data with the tiny model::

    python main_task_fusion.py --do_train --do_eval --clip_config CLIP-modules/tiny.json \\
        --cross_config_path CLIP-modules/fusion-tiny.json --init_model runs/stage1/ckpt/step-N \\
        --output_dir runs/stage2 --train_csv data/synth/webvid/frozen_train_labels.json \\
        --webvid_tfrecord data/synth/webvid/tfrecord --val_csv data/synth/msrvtt/MSRVTT_JSFUSION_test.csv \\
        --features_path data/synth/videos --max_frames 4 --max_words 16 --batch_size 32 --epochs 5 \\
        --fusion_lr 1e-3 --loose_type --cache_visual_features
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.builders import build_dataset, build_model, start_run, webvid_source
from engine.distributed import cleanup, init_distributed
from engine.feature_cache import attach_visual_cache
from engine.flags import build_parser, effective_rerank_topk, validate
from engine.trainer import fit, run_evaluation
from modules.membridge import Stage2Weights
from pretraining.fusion_task import FusionPretrainTask, held_out_accuracies
from video_text_retrieval.task import encode_eval_set, evaluate_retrieval

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser("fusion", description=__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    dist = init_distributed()
    try:
        validate(args, dist.world_size)
        start_run(args, dist.rank, dist.world_size)
        model = build_model(args, with_fusion=True)
        task = FusionPretrainTask(model, Stage2Weights(args.w_vtm, args.w_mlm, args.w_plm, args.vtm_negative_scale))
        task.to(dist.device)
        image_size = model.encoder.clip.config.image_resolution

        evaluate = None
        if args.val_csv:
            eval_set = build_dataset(args, args.datatype, "test", image_size)
            rerank_topk = effective_rerank_topk(
                args.rerank_topk, len(eval_set.texts), len(eval_set.video_ids), args.val_csv
            )

            def evaluate(task: FusionPretrainTask) -> dict:
                enc = encode_eval_set(
                    task.model, eval_set, args.batch_size_val, args.num_thread_reader, dist,
                    allow_missing=args.allow_missing_eval_videos,
                )  # fmt: skip
                metrics = evaluate_retrieval(
                    task.model, eval_set, dist, args.batch_size_val, rerank_topk=rerank_topk, encoded=enc
                )
                readable = [i for i, v in enumerate(eval_set.text_to_video) if bool(enc.video_ok[v])]
                metrics.update(
                    held_out_accuracies(
                        task.model, enc.frame_feats, enc.video_mask, enc.text_ids[readable], enc.text_mask[readable],
                        enc.text_tokens[readable], [eval_set.text_to_video[i] for i in readable], dist,
                    )
                )  # fmt: skip
                return metrics

        if args.do_train:
            source = webvid_source(args) if args.train_datatype == "webvid" else None
            train_set = build_dataset(args, args.train_datatype, "train", image_size, source=source)
            if args.cache_visual_features:
                settings = {
                    "max_frames": args.max_frames,
                    "slice_framepos": args.slice_framepos,
                    "pad_frames": args.pad_frames,
                    "feature_framerate": args.feature_framerate,
                    "image_size": image_size,
                    "train_datatype": args.train_datatype,
                }
                cache_root = Path(args.visual_cache_dir or Path(args.output_dir) / "visual_cache")
                attach_visual_cache(
                    train_set, model.encoder, cache_root, settings, dist, args.batch_size_val, args.num_thread_reader
                )
            metrics = fit(args, task, train_set, dist, evaluate)
        else:
            if evaluate is None:
                raise SystemExit("--do_eval needs --val_csv (the evaluation annotation file)")
            metrics = run_evaluation(args, task, evaluate, dist)
        return metrics
    finally:
        cleanup()


if __name__ == "__main__":
    main()
