"""Downstream text-video retrieval (MSR-VTT 1k-A, MSVD, LSMDC, DiDeMo paragraphs) with bridge re-ranking.

Contrastive loss on the global batch (+ the fusion's VTM with ``--rerank_topk > 0``, default 32; 0 = dual encoder,
built without the fusion). Sets with a validation split (MSVD, LSMDC, DiDeMo) select the best weights on it
(``--selection_metric``) and test them once; MSR-VTT 1k-A tests the last weights. ``start_retrieval_*.sh`` hold the
recipes. The published command line runs with only the launcher changed (run as a module)::

    torchrun --nproc_per_node 8 -m video_text_retrieval.main_task_retrieval --do_train --num_thread_reader=4 \\
        --epochs=5 --batch_size=32 --n_display=50 --cross_config_path ./CLIP-modules \\
        --train_csv ${DATA_PATH}/MSRVTT_train.9k.csv --val_csv ${DATA_PATH}/MSRVTT_JSFUSION_test.csv \\
        --data_path ${DATA_PATH}/MSRVTT_data.json --features_path ${DATA_PATH}/MSRVTT_Videos \\
        --warmup_proportion 0.1 --output_dir ${OUT_PATH} --lr 5e-5 --max_words 32 --max_frames 12 \\
        --batch_size_val 32 --datatype msrvtt --expand_msrvtt_sentences --feature_framerate 2 --coef_lr 1e-3 \\
        --freeze_layer_num 0 --slice_framepos 2 --loose_type --linear_patch 2d --sim_header meanP \\
        --init_model ${Pretrained_PATH}

Evaluate only: ``--do_eval --init_model CKPT`` (or ``--resume [DIR]``).
"""

from __future__ import annotations

from engine.builders import build_dataset, build_model
from engine.run import Job, cli, prepare_model, run_main
from video_text_retrieval import settings
from video_text_retrieval.task import ContrastiveTask


def build(args, dist) -> Job:
    """Dual encoder (+ fusion for re-ranking); validation-based selection where the dataset has a val split."""
    rerank = args.rerank_topk > 0
    model = prepare_model(args, build_model(args, with_fusion=rerank))
    task = ContrastiveTask(
        model, args.vtm_weight if rerank else 0.0, args.frame_loss_weight, args.video_loss_weight, args.w_align
    )
    size = model.encoder.clip.config.image_resolution
    metric = settings.selection_metric(args) if args.do_train else None
    val = settings.build_retrieval_evaluator(args, args.datatype, "val", size, dist) if metric else None
    test = settings.build_retrieval_evaluator(args, args.datatype, "test", size, dist)
    train_set = lambda: build_dataset(args, args.datatype, "train", size)  # noqa: E731
    return Job(task, train_set=train_set, test=test, val=val, selection_metric=metric)


def main(argv: list[str] | None = None) -> dict:
    parser = settings.build_retrieval_parser(__doc__.split("\n\n")[0])
    return run_main(parser, build, argv, check=settings.validate_retrieval)


if __name__ == "__main__":
    cli(main)
