"""Pluggable stage-1 objectives (``--stage1_objective``; MCQ_HMMC.md §C.2): a plain registry of how to build the
stage-1 task from the dual encoder, and MCQ's task.

An objective (:class:`Stage1Objective`) names three things: ``check(args)`` (its flag rules, before anything is built),
``build_task(args, model) -> task`` (an ``nn.Module`` with the engine's contract: ``forward(batch)`` returns ``loss``
plus named parts, ``after_optimizer_step()``) and ``prepare_train_set(args, dataset)`` (per-sample extras). Tasks wire
features to the loss functions of ``modules/losses.py``; a new objective is a new entry, not a flag matrix.

Training-only parts (MCQ's BridgeFormer; later HMMC's momentum encoders, heads and queues, as buffers so a resume
restores them) hang off the model in ``model.stage1_aux`` (an ``nn.ModuleDict``, see :func:`attach_aux`), so
checkpoints save them as ``stage1_aux.<part>.*`` and resume restores them with no engine change, while a model without
them (stage 2, retrieval, search) drops them on load with one info line (``engine.checkpoint.TRAINING_ONLY_PREFIX``).
``--init_model`` of a stage-1 run restores the parts it has (the MCQ curriculum chains three runs).

- ``clip``: today's :class:`ContrastiveTask` (symmetric InfoNCE, learnable logit scale), unchanged.
- ``mcq``: :class:`MCQTask`: ``L = VT + mcq_weight * NormSoftmax_T(cos(answer, bridge))`` over the global batch,
  with ``VT`` the clip loss (``--vt_loss clip``) or MCQ's ``NormSoftmax_T(cos(text, video))`` (``normsoftmax``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dataloaders.errors import ConfigError
from dataloaders.mcq_questions import MCQQuestions, read_phrase_file
from dataloaders.tokenizer import ClipTokenizer
from engine import checkpoint as ckpt
from engine.builders import convert_weights_fp16
from engine.distributed import all_gather_with_grad
from modules.bridgeformer import BridgeFormer, BridgeFormerConfig, question_layer_states
from modules.losses import contrastive_loss, cosine_matrix, norm_softmax_loss
from modules.membridge import MemBridgeModel
from video_text_retrieval.task import ContrastiveTask

logger = logging.getLogger(__name__)

AUX_ATTR = "stage1_aux"  # engine.checkpoint.TRAINING_ONLY_PREFIX without the dot
MCQ_BATCH_KEYS = ("mcq_question_ids", "mcq_question_mask", "mcq_answer_ids")  # the dataset adds mcq_answer_mask too


def attach_aux(model: nn.Module, name: str, part: nn.Module) -> nn.Module:
    """Register a training-only ``part`` as ``model.stage1_aux[name]`` (checkpoint keys ``stage1_aux.<name>.*``)."""
    if not isinstance(getattr(model, AUX_ATTR, None), nn.ModuleDict):
        setattr(model, AUX_ATTR, nn.ModuleDict())
    getattr(model, AUX_ATTR)[name] = part
    return part


def load_aux_from_init(args: argparse.Namespace, model: nn.Module) -> int:
    """With ``--init_model``: load the ``stage1_aux.*`` tensors it holds into ``model.stage1_aux`` (a chained stage
    of a curriculum); parts it lacks keep their init. Returns the number of tensors loaded."""
    aux = getattr(model, AUX_ATTR, None)
    if not args.init_model or aux is None:
        return 0
    prefix = ckpt.TRAINING_ONLY_PREFIX
    if not any(name.startswith(prefix) for name in ckpt.read_weight_shapes(args.init_model)):
        logger.info("--init_model %s holds no %s* tensors: %s start from their init", args.init_model, prefix,
                    "/".join(aux.keys()))  # fmt: skip
        return 0

    def select(state: dict) -> dict:
        return {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}

    report = ckpt.load_weights(args.init_model, aux, key_map=select)
    logger.info("--init_model %s: %d %s* tensors loaded, %d missing", args.init_model, report.loaded, prefix,
                len(report.missing))  # fmt: skip
    return report.loaded


@dataclass(frozen=True)
class MCQWeights:
    """``--mcq_weight``, ``--mcq_temperature``, ``--vt_loss``."""

    mcq: float = 1.0
    temperature: float = 0.05
    vt_loss: str = "clip"


class MCQTask(nn.Module):
    """MCQ / BridgeFormer stage 1 on the CLIP dual encoder (MCQ_HMMC.md §A.6-A.7, §C.3).

    Per step: the video (keeping every ViT block's input tokens), the caption, the question (every text layer's
    states) and the answer are encoded; the BridgeFormer turns question + video tokens into the bridge embedding.
    All embeddings are gathered over ranks keeping the local gradient (``all_gather_with_grad``), so both losses are
    over the global batch. Batch extras: ``mcq_question_ids/mask``, ``mcq_answer_ids/mask`` (``[B, L]``).
    """

    def __init__(self, model: MemBridgeModel, bridge: BridgeFormer, weights: MCQWeights = MCQWeights()):
        super().__init__()
        if not model.encoder.loose_type:
            raise ConfigError("--stage1_objective mcq needs a dual-encoder --sim_header (meanP/seqLSTM/seqTransf)")
        self.model = model
        attach_aux(model, "bridge", bridge)
        self.weights = weights

    @property
    def bridge(self) -> BridgeFormer:
        return getattr(self.model, AUX_ATTR)["bridge"]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        missing = [k for k in MCQ_BATCH_KEYS if k not in batch]
        if missing:
            raise ConfigError(
                f"--stage1_objective mcq: the batch lacks {missing}; the training set needs --phrase_file"
            )
        encoder = self.model.encoder
        w = self.weights
        video_mask = batch["video_mask"]
        frames, layers = encoder.encode_video(batch["video"], video_mask, return_layer_tokens=True)
        video_emb = encoder.video_embedding(frames, video_mask)
        text = encoder.text_features(batch["text_ids"])
        if w.vt_loss == "clip":
            sim = encoder.similarity(all_gather_with_grad(F.normalize(text, dim=-1)), all_gather_with_grad(video_emb))
            vt = contrastive_loss(sim)
        else:
            vt = norm_softmax_loss(cosine_matrix(all_gather_with_grad(text), all_gather_with_grad(video_emb)),
                                   w.temperature)  # fmt: skip
        question_ids = batch["mcq_question_ids"]
        states = question_layer_states(encoder.clip, question_ids)
        bridge = self.bridge(layers, video_mask, states, question_ids, batch["mcq_question_mask"])
        answer = encoder.text_features(batch["mcq_answer_ids"])
        mcq = norm_softmax_loss(cosine_matrix(all_gather_with_grad(answer), all_gather_with_grad(bridge)),
                                w.temperature)  # fmt: skip
        return {"loss": vt + w.mcq * mcq, "contrastive": vt, "mcq": mcq}

    def after_optimizer_step(self) -> None:
        self.model.encoder.clamp_logit_scale_()


# ----------------------------------------------------------------------------------------------- registry


def _no_check(args: argparse.Namespace) -> None:
    return None


def _same_set(args: argparse.Namespace, dataset):
    return dataset


@dataclass(frozen=True)
class Stage1Objective:
    """How one ``--stage1_objective`` builds its task (see the module docstring)."""

    build_task: Callable[[argparse.Namespace, MemBridgeModel], nn.Module]
    prepare_train_set: Callable[[argparse.Namespace, object], object] = _same_set
    check: Callable[[argparse.Namespace], None] = _no_check


def check_mcq(args: argparse.Namespace) -> None:
    if args.do_train and not args.phrase_file:
        raise ConfigError(
            "--stage1_objective mcq trains on noun/verb phrases: pass --phrase_file (an MCQ TSV; the synthetic set "
            "writes webvid/noun_verb.tsv)"
        )
    if args.sim_header == "tightTransf":
        raise ConfigError("--stage1_objective mcq needs a dual-encoder --sim_header (meanP/seqLSTM/seqTransf)")


def build_mcq_task(args: argparse.Namespace, model: MemBridgeModel) -> MCQTask:
    config = BridgeFormerConfig.for_clip(
        model.encoder.clip, args.bridge_text_layer_map, args.bridge_global_query, frame_mask=not args.official_quirks
    )
    bridge = BridgeFormer(config).to(model.encoder.logit_scale.device)
    if args.precision == "fp16":
        convert_weights_fp16(bridge)
    task = MCQTask(model, bridge, MCQWeights(args.mcq_weight, args.mcq_temperature, args.vt_loss))
    load_aux_from_init(args, model)
    return task


def prepare_mcq_set(args: argparse.Namespace, dataset):
    """Attach MCQ's questions/answers to a ``RetrievalTrainDataset`` (``extra_items``)."""
    if not hasattr(dataset, "extra_items"):
        raise ConfigError(f"--stage1_objective mcq cannot add questions to a {type(dataset).__name__} training set")
    questions = MCQQuestions(
        read_phrase_file(args.phrase_file, quirks=args.official_quirks),
        ClipTokenizer(),
        args.max_words,
        kind=args.mcq_question,
        mask_id=args.mcq_mask_id,
        prompt=args.mcq_answer_prompt,
        quirks=args.official_quirks,
    )
    covered = questions.coverage(dataset.video_ids)
    if covered == 0:
        raise ConfigError(
            f"--phrase_file {args.phrase_file} has no row for any of the {len(dataset.video_ids)} training videos: "
            "its path column must hold the video ids (WebVid: the path without .mp4)"
        )
    if covered < len(dataset.video_ids):
        logger.warning("--phrase_file covers %d of %d training videos; the others erase a random caption word",
                       covered, len(dataset.video_ids))  # fmt: skip
    dataset.extra_items = questions
    return dataset


STAGE1_OBJECTIVES: dict[str, Stage1Objective] = {
    "clip": Stage1Objective(build_task=lambda args, model: ContrastiveTask(model, align_weight=args.w_align)),
    "mcq": Stage1Objective(build_task=build_mcq_task, prepare_train_set=prepare_mcq_set, check=check_mcq),
}


def stage1_objective(args: argparse.Namespace) -> Stage1Objective:
    name = getattr(args, "stage1_objective", "clip")
    if name not in STAGE1_OBJECTIVES:
        raise ConfigError(f"--stage1_objective {name!r} is unknown; choose one of {sorted(STAGE1_OBJECTIVES)}")
    return STAGE1_OBJECTIVES[name]


def check_stage1_flags(args: argparse.Namespace) -> None:
    """The chosen objective's flag rules (``run_main``'s ``check``). Only the ``clip`` objective has a T2VLP form
    (tube tokens + alignment); the others run on the MemBridge dual encoder."""
    if args.stage1_objective != "clip" and args.method != "membridge":
        raise ConfigError(
            f"--stage1_objective {args.stage1_objective} runs with --method membridge (the plain dual encoder); "
            f"--method {args.method} has its own stage-1 objective: use --stage1_objective clip"
        )
    stage1_objective(args).check(args)
