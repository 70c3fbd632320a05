"""Video QA task (MSRVTT-QA, MSVD-QA): datasets from the published flags, the training task, sharded evaluation with
model selection on val, metrics and the predictions file.

Metrics (``eval_results.json``): ``accuracy`` (%) over **all** test questions, out-of-vocabulary answers counted
wrong; ``accuracy_<answer_type>`` per type; ``in_vocabulary`` (% of test answers in the answer vocabulary, the
classifier's ceiling); ``num_questions``. With a val set, the test numbers reported are those of the evaluation
with the best val accuracy (``val_*`` keys, ``selected_evaluation``); predictions go to ``predictions_test.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dataloaders.annotations import QARow
from dataloaders.datasets import DATASETS, DataPaths, QADataset
from dataloaders.errors import ConfigError
from dataloaders.tokenizer import ClipTokenizer
from dataloaders.transforms import ClipTransform
from engine.builders import build_fusion_config, file_source
from engine.checkpoint import KeyMap, LoadReport, load_weights
from engine.data import build_eval_loader
from engine.distributed import DistInfo, all_gather_with_grad, gather_eval_rows
from engine.trainer import move_to_device
from modules.fusion import MemBridgeFusion
from modules.losses import contrastive_loss
from modules.published_keys import convert_published_state_dict
from modules.video_clip import VideoCLIP
from video_qa.model import MemBridgeQAModel

logger = logging.getLogger(__name__)

QA_DATATYPES = ("msrvtt_qa", "msvd_qa")
PREDICTIONS_FILE = "predictions_test.jsonl"
PUBLISHED_PREFIX = "clip."  # top-level prefix of the published key layout (ours starts with encoder./fusion.)
FUSION_BLOCKS_PREFIX = "fusion.transformer."
PERCENT = 100.0


# ---------------------------------------------------------------------------------------------------------- flags


def validate_qa_flags(args: argparse.Namespace) -> None:
    """Check the QA-only flags once (after ``engine.flags.validate``)."""
    errors = []
    if args.datatype not in QA_DATATYPES:
        errors.append(f"--datatype {args.datatype!r} is not a QA dataset; choose one of {QA_DATATYPES}")
    if args.num_answers is not None and args.num_answers < 1:
        errors.append(f"--num_answers must be >= 1 (got {args.num_answers})")
    if args.num_answers is not None and args.msrvtt_qa_anslabel_json:
        errors.append(
            "--num_answers builds the answer vocabulary from the training questions, --msrvtt_qa_anslabel_json reads "
            "it from a file: pass only one of them"
        )
    if args.qa_contrastive_weight < 0:
        errors.append(f"--qa_contrastive_weight must be >= 0 (got {args.qa_contrastive_weight})")
    if args.do_train and not args.msrvtt_qa_train_json:
        errors.append("--do_train needs --msrvtt_qa_train_json (train.jsonl)")
    if args.do_eval and not args.msrvtt_qa_test_json:
        errors.append("--do_eval needs --msrvtt_qa_test_json (test.jsonl)")
    if errors:
        raise ConfigError("; ".join(errors))


# ----------------------------------------------------------------------------------------------------------- data


def qa_data_paths(args: argparse.Namespace) -> DataPaths:
    """The path flags; the videos come from ``--features_path`` or the published ``--msrvtt_features_path``."""
    paths = DataPaths.from_namespace(args)
    return dataclasses.replace(paths, features_path=args.features_path or args.msrvtt_features_path)


def build_qa_dataset(
    args: argparse.Namespace, split: str, image_size: int, paths: DataPaths, tokenizer: ClipTokenizer
) -> QADataset:
    """One split of ``--datatype`` (``msrvtt_qa`` / ``msvd_qa``), its answer vocabulary from the flags."""
    source = file_source(args, paths.features_path, train=split == "train")
    dataset = DATASETS[args.datatype](
        split,
        paths,
        source,
        ClipTransform(image_size),
        tokenizer,
        args.max_words,
        num_answers=args.num_answers,
        rng_seed=args.seed,
    )
    oov = dataset.num_out_of_vocabulary
    logger.info(
        "%s %s: %d questions on %d videos, %d answers in the vocabulary, %d questions (%.2f%%) out of it",
        args.datatype, split, len(dataset.rows), len(dataset.video_ids), len(dataset.ans2label), oov,
        PERCENT * oov / len(dataset.rows),
    )  # fmt: skip
    return dataset


def num_answer_classes(ans2label: Mapping[str, int]) -> int:
    """Classifier outputs: the largest answer index + 1 (indices need not be contiguous)."""
    return max(ans2label.values()) + 1


# ---------------------------------------------------------------------------------------------------------- model


def build_qa_model(args: argparse.Namespace, encoder: VideoCLIP, num_answers: int | None) -> MemBridgeQAModel:
    """The QA model on ``encoder`` with a fusion sized by ``--cross_config_path`` and the fusion flags."""
    return MemBridgeQAModel(
        encoder, MemBridgeFusion(build_fusion_config(args)), head=args.qa_head, num_answers=num_answers
    )


def _published_aware_key_map(fusion_layers: int) -> KeyMap:
    """Rename a state dict in the published layout (top-level ``clip.``) to ours; leave ours unchanged."""

    def key_map(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not any(key.startswith(PUBLISHED_PREFIX) for key in state_dict):
            return state_dict
        converted, unmapped = convert_published_state_dict(state_dict, fusion_layers)
        logger.info(
            "--init_model is in the published layout: %d keys renamed, %d unused", len(converted), len(unmapped)
        )
        return converted

    return key_map


def init_qa_weights(model: MemBridgeQAModel, init_model: str | None) -> LoadReport | None:
    """Load ``--init_model`` (ours or the published layout). Without fusion blocks in it (a stage-1 checkpoint, or
    no file), the fusion is initialised from the CLIP text blocks as published. The answer head keeps its init."""
    report = None
    if init_model:
        report = load_weights(init_model, model, key_map=_published_aware_key_map(model.fusion.config.layers))
    fusion_blocks = [name for name in model.state_dict() if name.startswith(FUSION_BLOCKS_PREFIX)]
    missing = set(report.missing) if report is not None else set(fusion_blocks)
    if all(name in missing for name in fusion_blocks):
        logger.info("no fusion weights in --init_model: fusion initialised from the CLIP text encoder")
        model.fusion.init_from_clip(model.encoder.clip)
    return report


# ----------------------------------------------------------------------------------------------------------- task


def qa_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy over the questions with a target (``>= 0``; -1 = answer outside the vocabulary).
    A batch without any target gives a zero loss that keeps the graph."""
    valid = targets >= 0
    if not bool(valid.any()):
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    logits, targets = logits[valid], targets[valid]
    loss = F.cross_entropy(logits.float(), targets)
    return loss, (logits.argmax(-1) == targets).float().mean().detach()


class QATask(nn.Module):
    """QA fine-tuning: the answer cross-entropy plus ``contrastive_weight`` x InfoNCE between the question and video
    dual-encoder embeddings of the (global) batch. ``model`` holds the weights that checkpoints save."""

    def __init__(self, model: MemBridgeQAModel, contrastive_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.contrastive_weight = contrastive_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, feats = self.model.answer_logits(batch)
        qa, qa_acc = qa_loss(logits, self.model.answer_targets(batch))
        out = {"qa": qa, "qa_acc": qa_acc}
        loss = qa
        if self.contrastive_weight > 0:
            sim = self.model.encoder.similarity_logits(
                all_gather_with_grad(feats["question_eot"]),
                all_gather_with_grad(feats["frame_feats"]),
                all_gather_with_grad(batch["video_mask"]),
            )
            out["contrastive"] = contrastive_loss(sim)
            loss = loss + self.contrastive_weight * out["contrastive"]
        out["loss"] = loss
        return out

    def after_optimizer_step(self) -> None:
        self.model.encoder.clamp_logit_scale_()


# ----------------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class QAPrediction:
    """One scored test question (a line of ``predictions_test.jsonl``)."""

    video_id: str
    question: str
    answer: str
    answer_type: str
    prediction: str
    correct: bool


@torch.no_grad()
def predict_answers(
    model: MemBridgeQAModel, dataset: QADataset, dist: DistInfo, batch_size: int, num_workers: int = 0
) -> list[int]:
    """Predicted class (classifier) or token id (first_token) of every question; each rank runs a contiguous shard
    of ``batch_size // world_size`` batches and every rank gets all predictions in dataset order."""
    per_rank = max(1, batch_size // dist.world_size)
    loader, indices = build_eval_loader(dataset, per_rank, num_workers, dist.rank, dist.world_size)
    parts = []
    for batch in tqdm(loader, desc="QA evaluation", disable=dist.rank != 0, leave=False):
        logits, _ = model.answer_logits(move_to_device(batch, dist.device))
        parts.append(logits.argmax(-1))
    rows = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=dist.device)
    return gather_eval_rows(rows, indices, len(dataset)).tolist()


def score_predictions(
    rows: Sequence[QARow], predicted: Sequence[int], head: str, ans2label: Mapping[str, int], tokenizer: ClipTokenizer
) -> list[QAPrediction]:
    """Judge each prediction. ``classifier``: the predicted class is the answer's index (an answer outside the
    vocabulary is always wrong). ``first_token``: the predicted id is the answer's first BPE token."""
    label_to_answer = {label: answer for answer, label in ans2label.items()}
    scored = []
    for row, pred in zip(rows, predicted, strict=True):
        if head == "classifier":
            text = label_to_answer.get(pred, "")
            correct = ans2label.get(row.answer, -1) == pred
        else:
            text = tokenizer.decode([pred])
            correct = tokenizer.tokenize_words(row.answer)[:1] == [pred]
        scored.append(QAPrediction(row.video_id, row.question, row.answer, row.answer_type, text, correct))
    return scored


def qa_metrics(predictions: Sequence[QAPrediction], ans2label: Mapping[str, int]) -> dict[str, float | int]:
    """``accuracy`` over all questions, ``accuracy_<answer_type>``, ``in_vocabulary`` (%), ``num_questions``."""
    n = len(predictions)
    if n == 0:
        raise ValueError("no QA predictions to score")
    metrics: dict[str, float | int] = {
        "accuracy": PERCENT * sum(p.correct for p in predictions) / n,
        "in_vocabulary": PERCENT * sum(p.answer in ans2label for p in predictions) / n,
        "num_questions": n,
    }
    for answer_type in sorted({p.answer_type for p in predictions if p.answer_type}):
        group = [p.correct for p in predictions if p.answer_type == answer_type]
        metrics[f"accuracy_{answer_type}"] = PERCENT * sum(group) / len(group)
    return metrics


def write_predictions(path: str | os.PathLike, predictions: Sequence[QAPrediction]) -> None:
    """``predictions_test.jsonl``, one JSON object a question, written through a temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in predictions), encoding="utf-8")
    os.replace(tmp, path)


class QAEvaluation:
    """The ``evaluate`` callback of the QA entry script, run on every rank (each takes a shard).

    Each call scores val (when given); when val accuracy improves on every earlier call (or without val), it scores
    test, keeps those metrics as the selected ones and rank 0 rewrites ``predictions_test.jsonl``. Returns the
    selected test metrics plus ``val_*`` of the same evaluation, ``selected_evaluation`` (1-based), ``evaluations``
    and ``last_val_accuracy``.
    """

    def __init__(
        self,
        test_set: QADataset,
        val_set: QADataset | None,
        dist: DistInfo,
        batch_size: int,
        num_workers: int,
        output_dir: str | os.PathLike,
        tokenizer: ClipTokenizer,
    ):
        self.test_set = test_set
        self.val_set = val_set
        self.dist = dist
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.output_dir = Path(output_dir)
        self.tokenizer = tokenizer
        self.evaluations = 0
        self.best_val: float | None = None
        self.selected: dict[str, float | int] = {}

    def score(self, model: MemBridgeQAModel, dataset: QADataset) -> list[QAPrediction]:
        predicted = predict_answers(model, dataset, self.dist, self.batch_size, self.num_workers)
        return score_predictions(dataset.rows, predicted, model.head, dataset.ans2label, self.tokenizer)

    def __call__(self, task: nn.Module) -> dict:
        model = task.model
        self.evaluations += 1
        val_metrics: dict[str, float | int] = {}
        if self.val_set is not None:
            val_metrics = qa_metrics(self.score(model, self.val_set), self.val_set.ans2label)
            logger.info("QA val accuracy %.2f%% (evaluation %d)", val_metrics["accuracy"], self.evaluations)
        if self.val_set is None or self.best_val is None or val_metrics["accuracy"] > self.best_val:
            self.best_val = val_metrics.get("accuracy")
            test = self.score(model, self.test_set)
            self.selected = {
                **qa_metrics(test, self.test_set.ans2label),
                **{f"val_{name}": value for name, value in val_metrics.items()},
                "selected_evaluation": self.evaluations,
            }
            if self.dist.rank == 0:
                write_predictions(self.output_dir / PREDICTIONS_FILE, test)
        result = {**self.selected, "evaluations": self.evaluations}
        if val_metrics:
            result["last_val_accuracy"] = val_metrics["accuracy"]
        return result
