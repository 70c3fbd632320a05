"""Video QA task (MSRVTT-QA, MSVD-QA): datasets from the published flags, the training task, sharded evaluation with
model selection on val, metrics and the predictions file.

Metrics (``eval_results.json``): ``accuracy`` (%) over **all** test questions, out-of-vocabulary answers counted
wrong; ``accuracy_<answer_type>`` per type; ``in_vocabulary`` (% of test answers in the answer vocabulary, the
classifier's ceiling); ``num_questions``. With a val set, every epoch is validated and the weights of the best val
accuracy (``best_val_accuracy``, ``best_val_run``) answer the test set once; predictions go to
``predictions_test.jsonl``.
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
from engine.builders import attach_object_inputs, build_clip, file_source, model_config
from engine.checkpoint import KeyMap, LoadReport, load_weights
from engine.data import EvalSettings, build_eval_loader
from engine.distributed import DistInfo, all_gather_with_grad, gather_eval_rows
from engine.flags import build_parser
from engine.trainer import move_to_device
from modules.fusion import MemBridgeFusion
from modules.losses import contrastive_loss
from modules.methods import refuse_unsupported
from modules.model_config import build_video_encoder
from modules.published_keys import convert_published_state_dict
from video_qa.model import QA_HEADS, MemBridgeQAModel

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
        ClipTransform(image_size, args.transform),
        tokenizer,
        args.max_words,
        num_answers=args.num_answers,
        rng_seed=args.seed,
    )
    if args.method == "stoa":  # every question carries its video's boxes (--objects_dir, --labelmap_path)
        attach_object_inputs(args, dataset, args.datatype, split)
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


def build_qa_model(args: argparse.Namespace, num_answers: int | None) -> MemBridgeQAModel:
    """The QA model of the flags: CLIP (sizes as ``engine.builders.build_clip``), a fusion sized by
    ``--cross_config_path`` and the fusion flags, the answer head; ``--init_model`` weights (see
    :func:`init_qa_weights`). It carries its ModelConfig (head settings included) for its checkpoints."""
    refuse_unsupported(args.method, "video QA", supported=("membridge", "t2vlp", "stoa"))
    clip = build_clip(args)
    config = dataclasses.replace(
        model_config(args, clip.config, with_fusion=True),
        head={"kind": "qa", "qa_head": args.qa_head, "num_answers": num_answers},
    )
    model = MemBridgeQAModel(
        build_video_encoder(config, clip), MemBridgeFusion(config.fusion), head=args.qa_head, num_answers=num_answers
    )
    model.model_config = config
    init_qa_weights(model, args.init_model)
    return model


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
    objects = model.encoder.objects
    if objects is not None and report is not None and any(k.startswith("encoder.objects.") for k in report.missing):
        logger.info("--init_model has no STOA object module: initialising its blocks from the loaded ViT")
        objects.init_from_visual(model.encoder.clip.visual)
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


class QAEvaluator:
    """``evaluate(task) -> metrics`` of one QA split for the engine, each rank scoring a shard; with
    ``predictions_file`` rank 0 also writes every scored question there (the test split)."""

    def __init__(
        self,
        dataset: QADataset,
        dist: DistInfo,
        settings: EvalSettings,
        tokenizer: ClipTokenizer,
        predictions_file: str | os.PathLike | None = None,
    ):
        self.dataset = dataset
        self.dist = dist
        self.settings = settings
        self.tokenizer = tokenizer
        self.predictions_file = predictions_file

    def __call__(self, task: nn.Module) -> dict:
        model = task.model
        predicted = predict_answers(model, self.dataset, self.dist, self.settings.batch_size, self.settings.num_workers)
        scored = score_predictions(self.dataset.rows, predicted, model.head, self.dataset.ans2label, self.tokenizer)
        if self.predictions_file is not None and self.dist.rank == 0:
            write_predictions(self.predictions_file, scored)
        return qa_metrics(scored, self.dataset.ans2label)


def build_qa_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The shared ``qa`` flags plus the QA-only ones; ``--datatype`` defaults to ``msrvtt_qa``."""
    parser = build_parser("qa", description=description)
    parser.set_defaults(datatype=QA_DATATYPES[0])
    g = parser.add_argument_group("video QA task")
    g.add_argument(
        "--qa_head",
        choices=QA_HEADS,
        default=QA_HEADS[0],
        help="classifier: MLP over the answer vocabulary; first_token: first BPE token through the vocabulary head",
    )
    g.add_argument(
        "--num_answers",
        type=int,
        default=None,
        help="answer vocabulary = the N most frequent training answers (instead of --msrvtt_qa_anslabel_json)",
    )
    g.add_argument(
        "--qa_contrastive_weight",
        type=float,
        default=0.0,
        help="weight of the auxiliary question-video InfoNCE on the dual-encoder embeddings (0: off)",
    )
    return parser


@dataclass
class QASplits:
    """The QA datasets the flags name (each None when its file is not given) and their answer vocabulary."""

    train: QADataset | None
    val: QADataset | None
    test: QADataset | None

    @property
    def ans2label(self) -> Mapping[str, int]:
        return next(d for d in (self.train, self.test, self.val) if d is not None).ans2label


def build_qa_splits(args: argparse.Namespace, image_size: int, tokenizer: ClipTokenizer) -> QASplits:
    """Train (with ``--do_train``), val and test sets from the published ``--msrvtt_qa_*_json`` flags."""
    paths = qa_data_paths(args)

    def split(name: str, wanted: bool) -> QADataset | None:
        return build_qa_dataset(args, name, image_size, paths, tokenizer) if wanted else None

    return QASplits(
        split("train", args.do_train), split("val", bool(args.msrvtt_qa_val_json)),
        split("test", bool(args.msrvtt_qa_test_json)),
    )  # fmt: skip
