"""Downstream text-video retrieval (MSR-VTT 1k-A, MSVD, LSMDC, DiDeMo paragraphs) with bridge re-ranking.

Fine-tuning trains the contrastive loss on the global batch, plus the fusion's VTM loss when re-ranking is on
(``--rerank_topk > 0``, default 32; 0 = dual encoder only, built without the fusion). CLIP trains at
``lr * coef_lr``, the fusion at ``--fusion_lr``. Evaluation: chunked dual-encoder similarity, then the published
re-ranking of every query's top-k candidates in both directions with the VTM match probability, sharded over ranks.
Datasets with a validation split (MSVD, LSMDC, DiDeMo) are evaluated on it after every epoch and the best weights
(``--selection_metric``) are evaluated once on the test split; MSR-VTT 1k-A has none, so its test split is
evaluated at the end only. ``eval_results.json`` holds the test metrics (``t2v_R1 ... v2t_MnR`` and
``rerank_t2v_R1 ...``); ``best_val.json`` / ``best_model.safetensors`` the chosen validation run.

The published command line runs with only the launcher and the script name changed::

    torchrun --nproc_per_node 8 video_text_retrieval/main_task_retrieval.py --do_train --num_thread_reader=4 \\
        --epochs=5 --batch_size=32 --n_display=50 --cross_config_path ./CLIP-modules \\
        --train_csv ${DATA_PATH}/MSRVTT_train.9k.csv --val_csv ${DATA_PATH}/MSRVTT_JSFUSION_test.csv \\
        --data_path ${DATA_PATH}/MSRVTT_data.json --features_path ${DATA_PATH}/MSRVTT_Videos \\
        --warmup_proportion 0.1 --output_dir ${OUT_PATH} --lr 5e-5 --max_words 32 --max_frames 12 \\
        --batch_size_val 32 --datatype msrvtt --expand_msrvtt_sentences --feature_framerate 2 --coef_lr 1e-3 \\
        --freeze_layer_num 0 --slice_framepos 2 --loose_type --linear_patch 2d --sim_header meanP \\
        --init_model ${Pretrained_PATH}

``start_retrieval_{msrvtt,msvd,lsmdc,didemo}.sh`` hold the recipe of each dataset. Evaluate a model only (test
split): ``--do_eval --init_model CKPT`` (or ``--resume [DIR]``). Also runnable as
``python -m video_text_retrieval.main_task_retrieval``. On the embedded synthetic data with the tiny model
(``python -m dataloaders.synthetic --output_dir data/synth``)::

    python video_text_retrieval/main_task_retrieval.py --do_train --datatype msvd --data_path data/synth/msvd \\
        --features_path data/synth/videos --clip_config CLIP-modules/tiny.json \\
        --cross_config_path CLIP-modules/fusion-tiny.json --max_frames 4 --max_words 16 --batch_size 32 \\
        --epochs 5 --lr 1e-3 --coef_lr 1 --fusion_lr 1e-3 --rerank_topk 8 --loose_type --output_dir runs/ret_msvd
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python video_text_retrieval/main_task_retrieval.py): find the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataloaders.errors import ConfigError  # noqa: E402
from engine import checkpoint as ckpt  # noqa: E402
from engine.builders import build_dataset, build_model, convert_weights_fp16, start_run  # noqa: E402
from engine.distributed import DistInfo, cleanup, init_distributed  # noqa: E402
from engine.flags import build_parser, effective_rerank_topk, validate  # noqa: E402
from engine.trainer import fit, run_evaluation  # noqa: E402
from video_text_retrieval.selection import (  # noqa: E402
    BestValidation,
    check_selection_metric,
    default_selection_metric,
)
from video_text_retrieval.task import ContrastiveTask, evaluate_retrieval  # noqa: E402

logger = logging.getLogger(__name__)

# Retrieval benchmarks -> whether they have a validation split for model selection (MSR-VTT 1k-A has none).
HAS_VAL_SPLIT = {"msrvtt": False, "msvd": True, "lsmdc": True, "didemo": True}
DEFAULT_VTM_WEIGHT = 1.0
SELECTION_MODES = ("val", "last")


def build_retrieval_parser() -> argparse.ArgumentParser:
    """The shared flags (common + fusion) plus the retrieval-only ones."""
    parser = build_parser("retrieval", description=__doc__.split("\n\n")[0])
    g = parser.add_argument_group("retrieval fine-tuning")
    g.add_argument(
        "--vtm_weight",
        type=float,
        default=DEFAULT_VTM_WEIGHT,
        help="weight of the fusion's VTM loss added to the contrastive loss when --rerank_topk > 0",
    )
    g.add_argument(
        "--model_selection",
        choices=SELECTION_MODES,
        default="val",
        help="val: evaluate the validation split after every epoch and test the best weights (datasets with one); "
        "last: test the last weights",
    )
    g.add_argument(
        "--selection_metric",
        default=None,
        help="validation metric to maximise (default: rerank_t2v_R1 with re-ranking, else t2v_R1)",
    )
    return parser


def validate_retrieval(args: argparse.Namespace) -> None:
    """Retrieval-only checks (the shared ones are engine.flags.validate)."""
    if args.datatype not in HAS_VAL_SPLIT:
        raise ConfigError(f"--datatype {args.datatype!r}: retrieval runs on one of {sorted(HAS_VAL_SPLIT)}")
    if args.vtm_weight < 0:
        raise ConfigError(f"--vtm_weight must be >= 0 (got {args.vtm_weight})")
    check_selection_metric(args.selection_metric or default_selection_metric(args.rerank_topk), args.rerank_topk)


def load_resume_weights(args: argparse.Namespace, task: ContrastiveTask) -> None:
    """``--do_eval --resume [DIR]`` without training: the weights of that (or the newest) checkpoint."""
    path = ckpt.find_latest(args.output_dir, clean=False) if args.resume == "auto" else Path(args.resume)
    if path is None:
        raise ConfigError(f"--resume: no checkpoint under {args.output_dir}; pass a ckpt/step-N directory")
    ckpt.load_weights(path, task.model, strict=True)


def make_evaluator(args: argparse.Namespace, eval_set, dist: DistInfo, selection: BestValidation | None = None):
    """``evaluate(task) -> metrics`` for the engine; with ``selection`` every run also updates the best weights."""

    topk = effective_rerank_topk(args.rerank_topk, len(eval_set.texts), len(eval_set.video_ids), args.val_csv)

    def evaluate(task: ContrastiveTask) -> dict:
        metrics = evaluate_retrieval(
            task.model,
            eval_set,
            dist,
            args.batch_size_val,
            args.num_thread_reader,
            rerank_topk=topk,
            allow_missing=args.allow_missing_eval_videos,
        )
        if selection is not None:
            selection.update(task.model, metrics)
        return metrics

    return evaluate


def main(argv: list[str] | None = None) -> dict:
    args = build_retrieval_parser().parse_args(argv)
    dist = init_distributed()
    try:
        validate(args, dist.world_size)
        validate_retrieval(args)
        start_run(args, dist.rank, dist.world_size)
        rerank = args.rerank_topk > 0
        model = build_model(args, with_fusion=rerank)
        frozen = model.encoder.freeze_layers(args.freeze_layer_num)
        logger.info("--freeze_layer_num %d: %d CLIP tensors frozen", args.freeze_layer_num, len(frozen))
        if args.precision == "fp16":
            convert_weights_fp16(model)
        task = ContrastiveTask(model, vtm_weight=args.vtm_weight if rerank else 0.0)
        image_size = model.encoder.clip.config.image_resolution
        test_eval = make_evaluator(args, build_dataset(args, args.datatype, "test", image_size), dist)

        if not args.do_train:
            if args.resume:
                load_resume_weights(args, task)
            task.to(dist.device)
            return run_evaluation(args, task, test_eval, dist, tag="test")

        train_set = build_dataset(args, args.datatype, "train", image_size)
        if args.model_selection == "last" or not HAS_VAL_SPLIT[args.datatype]:
            logger.info("no model selection for %s: the test split is evaluated with the last weights", args.datatype)
            return fit(args, task, train_set, dist, test_eval)

        metric = args.selection_metric or default_selection_metric(args.rerank_topk)
        selection = BestValidation(args.output_dir, metric, is_main=dist.rank == 0)
        if args.resume:
            selection.resume(model)
        val_eval = make_evaluator(args, build_dataset(args, args.datatype, "val", image_size), dist, selection)
        # Selection needs a validation run after every epoch (the engine's flag, on for this fit only).
        fit(argparse.Namespace(**{**vars(args), "eval_every_epoch": True}), task, train_set, dist, val_eval)
        selection.restore(model)
        task.to(dist.device)
        summary = selection.summary()

        def test_with_selection(task: ContrastiveTask) -> dict:
            return {**test_eval(task), **summary}

        return run_evaluation(args, task, test_with_selection, dist, tag="test")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
