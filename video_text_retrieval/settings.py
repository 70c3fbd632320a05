"""Retrieval fine-tuning: its flags (on top of the shared ones), their checks, and the model-selection rule."""

from __future__ import annotations

import argparse

from dataloaders.errors import ConfigError
from engine.builders import build_dataset
from engine.data import EvalSettings
from engine.flags import add_language_flags, build_parser, effective_rerank_topk
from video_text_retrieval.task import RetrievalEvaluator

# Retrieval benchmarks -> whether they have a validation split for model selection (MSR-VTT 1k-A has none).
HAS_VAL_SPLIT = {"msrvtt": False, "msvd": True, "lsmdc": True, "didemo": True, "vatex": True, "vatex_zh": True}
DEFAULT_VTM_WEIGHT = 1.0
SELECTION_MODES = ("val", "last")
RECALL_METRICS = tuple(
    f"{prefix}{direction}_R{k}" for prefix in ("", "rerank_") for direction in ("t2v", "v2t") for k in (1, 5, 10)
)


def default_selection_metric(rerank_topk: int) -> str:
    """Text->video R@1, re-ranked when re-ranking is on (CLIP4Clip selects on text->video R@1)."""
    return "rerank_t2v_R1" if rerank_topk > 0 else "t2v_R1"


def check_selection_metric(metric: str, rerank_topk: int) -> None:
    """``metric`` must be a recall (higher is better) that the evaluation produces."""
    if metric not in RECALL_METRICS:
        raise ConfigError(f"--selection_metric {metric!r} is not one of {list(RECALL_METRICS)}")
    if metric.startswith("rerank_") and rerank_topk <= 0:
        raise ConfigError(f"--selection_metric {metric} needs re-ranking: pass --rerank_topk > 0 or a dual metric")


def selection_metric(args: argparse.Namespace) -> str | None:
    """The validation metric that selects the weights, or None when the test split is evaluated with the last
    weights (``--model_selection last``, or a dataset without a validation split)."""
    if args.model_selection == "last" or not HAS_VAL_SPLIT[args.datatype]:
        return None
    return args.selection_metric or default_selection_metric(args.rerank_topk)


def build_retrieval_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The shared flags (common + fusion) plus the retrieval-only ones."""
    parser = build_parser("retrieval", description=description)
    g = parser.add_argument_group("retrieval fine-tuning")
    add_language_flags(g)
    g.add_argument(
        "--vtm_weight",
        type=float,
        default=DEFAULT_VTM_WEIGHT,
        help="weight of the fusion's VTM loss added to the contrastive loss when --rerank_topk > 0",
    )
    g.add_argument(
        "--video_loss_weight", type=float, default=1.0, help="weight of the contrastive loss (HMMC fine-tuning: 0.85)"
    )
    g.add_argument(
        "--frame_loss_weight",
        type=float,
        default=0.0,
        help="weight of HMMC's text-frame contrastive loss, averaged over frame positions (HMMC fine-tuning: 0.15)",
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
    for name in ("video_loss_weight", "frame_loss_weight"):
        if not getattr(args, name) >= 0:
            raise ConfigError(f"--{name} must be >= 0 (got {getattr(args, name)})")
    if args.frame_loss_weight > 0 and args.sim_header == "tightTransf":
        raise ConfigError("--frame_loss_weight (HMMC's frame loss) needs a dual-encoder --sim_header, not tightTransf")
    if args.language == "chinese":
        if not args.text_pretrain_path:
            raise ConfigError("--language chinese needs --text_pretrain_path (a local Hugging Face BERT folder)")
        if args.rerank_topk > 0:
            raise ConfigError(
                "--language chinese is a dual encoder (HMMC): the fusion re-ranking reads CLIP's text tokens; "
                "pass --rerank_topk 0"
            )
    check_selection_metric(args.selection_metric or default_selection_metric(args.rerank_topk), args.rerank_topk)


def build_retrieval_evaluator(
    args: argparse.Namespace, datatype: str, split: str, image_size: int, dist, extra=None
) -> RetrievalEvaluator:
    """The evaluator of one split of ``datatype``, with ``--rerank_topk`` clamped to the split's size."""
    eval_set = build_dataset(args, datatype, split, image_size)
    topk = getattr(args, "rerank_topk", 0)
    topk = effective_rerank_topk(topk, len(eval_set.texts), len(eval_set.video_ids), args.val_csv or args.data_path)
    frame_topk = args.top_frames if getattr(args, "use_frame_fea", False) else 0
    if frame_topk and args.sim_header == "tightTransf":
        raise ConfigError("--use_frame_fea (HMMC's frame term) needs a dual-encoder --sim_header, not tightTransf")
    return RetrievalEvaluator(
        eval_set, dist, EvalSettings.from_flags(args), rerank_topk=topk, extra=extra, frame_topk=frame_topk,
        frame_weight=getattr(args, "frame_sim_weight", 1.0),
    )  # fmt: skip
