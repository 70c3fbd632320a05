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
- ``hmmc``: :class:`HMMCTask`: ``L = w_fam FAM + w_vtm VTM + w_ftm FTM + w_mlm MLM`` (MCQ_HMMC.md §B.5-B.6) with a
  momentum copy of the encoder and of ``v_projector`` and five feature queues (``stage1_aux.hmmc_*``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataloaders.bert_tokenizer import BertTextTokenizer
from dataloaders.errors import ConfigError
from dataloaders.mcq_questions import MCQQuestions, read_phrase_file
from dataloaders.tokenizer import ClipTokenizer
from engine import checkpoint as ckpt
from engine.builders import convert_weights_fp16
from engine.distributed import all_gather_tensor, all_gather_with_grad, get_rank, get_world_size
from modules.bridgeformer import BridgeFormer, BridgeFormerConfig, question_layer_states
from modules.hmmc import (
    CLIP_EOT_ID,
    CLIP_SOT_ID,
    HMMCFeatures,
    HMMCLMHead,
    HMMCWeights,
    ProjectorMLP,
    hmmc_contrastive_losses,
    hmmc_mlm_loss,
    mlm_inputs,
)
from modules.losses import contrastive_loss, cosine_matrix, norm_softmax_loss
from modules.membridge import MemBridgeModel
from modules.momentum import FeatureQueue, MomentumCopy
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


@dataclass(frozen=True)
class HMMCSettings:
    """``--contrast_*``, ``--w_*``, ``--hmmc_proj_dims``, ``--hmmc_mask_id`` and ``--official_quirks``."""

    weights: HMMCWeights = HMMCWeights()
    momentum: float = 0.99
    queue_size: int = 4096
    proj_hidden: int = 4096
    mask_id: int = 0
    quirks: bool = False
    special_ids: tuple[int, int] = (CLIP_SOT_ID, CLIP_EOT_ID)  # never masked: SOT/EOT ([CLS]/[SEP] for BERT)
    random_range: tuple[int, int] | None = None  # MLM random ids (None: CLIP's BPE ids below SOT)


HMMC_QUEUES = ("video", "title", "tag", "frame_proj", "frame_cross")
HMMC_MLM_KEY = "hmmc_mlm_draws"
HMMC_MASK_ID = 49394  # HMMC overwrites this BPE entry with [MASK] (B.14 item 2); ours default to 0 (mcq's convention)


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """:data:`modules.hmmc.RowGather` over the process group (one process: ``x`` and all of it)."""
    n = x.shape[0]
    if get_world_size() == 1:
        return x, slice(0, n)
    return all_gather_with_grad(x), slice(get_rank() * n, (get_rank() + 1) * n)


def global_sum_count(total: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums over ranks of a loss sum (keeping this rank's gradient) and of a count."""
    if get_world_size() == 1:
        return total, count
    return all_gather_with_grad(total.reshape(1)).sum(), all_gather_tensor(count.reshape(1)).sum()


class HMMCTask(nn.Module):
    """HMMC pre-training on the CLIP dual encoder (MCQ_HMMC.md §B.2-B.6, §C.4).

    Training-only parts (``model.stage1_aux``): ``hmmc_heads`` (``v_projector``, ``v_predictor``, ``mlm_head``),
    ``hmmc_momentum`` (momentum copies of the whole video/text encoder, temporal module included, and of
    ``v_projector``) and ``hmmc_queues`` (five :class:`FeatureQueue` buffers: ``video``, ``title``, ``tag`` (HMMC
    enqueues the tag keys, here the title's, and never reads them, B.14 item 5), and the per-frame ``frame_proj`` /
    ``frame_cross`` with ``max_frames`` slots per video). HMMC's unused ``t_projector`` is not built (B.14 item 4).

    One step, in the official order (§B.5): online features; under ``no_grad`` the momentum update (so
    ``after_optimizer_step`` only clamps the logit scale) and the momentum keys; the losses against the queues as they
    were before this step; the global batch's keys enqueued; MLM. Queries are gathered over ranks with their local
    gradient and keys without, so every rank computes the loss of the global batch.
    """

    def __init__(self, model: MemBridgeModel, settings: HMMCSettings = HMMCSettings()):
        super().__init__()
        encoder = model.encoder
        if not encoder.loose_type:
            raise ConfigError("--stage1_objective hmmc needs a dual-encoder --sim_header (meanP/seqLSTM/seqTransf)")
        self.model = model
        self.settings = settings
        config = encoder.clip.config
        dim = config.embed_dim
        heads = nn.ModuleDict(
            {name: ProjectorMLP(dim, settings.proj_hidden, gather_rows) for name in ("v_projector", "v_predictor")}
        )
        self.vocab_size = encoder.text_hf.vocab_size if encoder.text_hf is not None else config.vocab_size
        if settings.weights.mlm > 0:
            heads["mlm_head"] = HMMCLMHead(dim, self.vocab_size)
        attach_aux(model, "hmmc_heads", heads)
        momentum = nn.ModuleDict({"encoder": MomentumCopy(encoder), "v_projector": MomentumCopy(heads["v_projector"])})
        attach_aux(model, "hmmc_momentum", momentum)
        slots = {"frame_proj": encoder.max_frames, "frame_cross": encoder.max_frames}
        queues = nn.ModuleDict(
            {name: FeatureQueue(dim, settings.queue_size, slots.get(name, 1), settings.quirks) for name in HMMC_QUEUES}
        )
        attach_aux(model, "hmmc_queues", queues)

    def _aux(self, name: str) -> nn.ModuleDict:
        return getattr(self.model, AUX_ATTR)[f"hmmc_{name}"]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        encoder = self.model.encoder
        s, w = self.settings, self.settings.weights
        heads, momentum, queues = self._aux("heads"), self._aux("momentum"), self._aux("queues")
        video, video_mask, ids = batch["video"], batch["video_mask"], batch["text_ids"]
        frames = encoder.encode_video(video, video_mask)  # [b, T, D] pre-temporal
        b, t, d = frames.shape
        if t != queues["frame_cross"].slots:
            raise ConfigError(
                f"--stage1_objective hmmc: the batch has {t} frames, the frame queues {queues['frame_cross'].slots}"
            )
        video_emb = encoder.video_embedding(frames, video_mask)
        title = encoder.text_features(ids)
        # the heads stay fp32 (also under --precision fp16, as HMMC's are)
        frame_pred = heads["v_predictor"](heads["v_projector"](frames.float().reshape(b * t, d))).reshape(b, t, d)
        with torch.no_grad():
            momentum["encoder"].update(encoder, s.momentum)
            momentum["v_projector"].update(heads["v_projector"], s.momentum)
            key_encoder = momentum["encoder"].module
            frames_k = key_encoder.encode_video(video, video_mask)
            video_k = key_encoder.video_embedding(frames_k, video_mask)
            title_k = key_encoder.text_features(ids)
            frame_proj_k = momentum["v_projector"](frames_k.float().reshape(b * t, d)).reshape(b, t, d)
        grad, keys = all_gather_with_grad, all_gather_tensor
        feats = HMMCFeatures(
            grad(video_emb), grad(title), grad(frames), grad(frame_pred),
            keys(video_k), keys(title_k), keys(frames_k), keys(frame_proj_k), keys(video_mask),
        )  # fmt: skip
        out = hmmc_contrastive_losses(feats, {n: q.entries() for n, q in queues.items() if n != "tag"}, w.temperature)
        for name, value in (("video", video_k), ("title", title_k), ("tag", title_k), ("frame_proj", frame_proj_k),
                            ("frame_cross", frames_k)):  # fmt: skip
            queues[name].enqueue(value, all_gather_tensor if get_world_size() > 1 else None)
        loss = w.fam * out["fam"] + w.vtm * out["vtm"] + w.ftm * out["ftm"]
        if w.mlm > 0:
            if HMMC_MLM_KEY not in batch:
                raise ConfigError("--stage1_objective hmmc with --w_mlm > 0: the batch lacks its MLM draws")
            sot, eot = s.special_ids
            masked, labels = mlm_inputs(
                ids, batch["text_mask"], batch[HMMC_MLM_KEY], s.mask_id, self.vocab_size,
                quirks=s.quirks, sot_id=sot, eot_id=eot, random_range=s.random_range,
            )  # fmt: skip
            logits = heads["mlm_head"](encoder.text_tokens_and_features(masked)[0].float())
            out["mlm"] = hmmc_mlm_loss(logits, labels, global_sum_count)
            loss = loss + w.mlm * out["mlm"]
        out["loss"] = loss
        return out

    def after_optimizer_step(self) -> None:
        self.model.encoder.clamp_logit_scale_()


class MLMDraws:
    """Per-sample uniform draws ``[3, max_words]`` for :func:`modules.hmmc.mlm_inputs` (a ``RetrievalTrainDataset``
    extra): drawn from the sample's generator, so masks are the same whatever the rank layout and on resume."""

    def __init__(self, max_words: int):
        self.max_words = max_words

    def __call__(self, video_id: str, caption: str, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return {HMMC_MLM_KEY: torch.from_numpy(rng.random((3, self.max_words), dtype=np.float32))}


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


def check_hmmc(args: argparse.Namespace) -> None:
    if args.use_temp:
        if args.sim_header not in ("meanP", "seqTransf"):
            raise ConfigError(
                f"--use_temp is HMMC's seqTransf temporal module: it contradicts --sim_header {args.sim_header}"
            )
        args.sim_header = "seqTransf"
    if args.sim_header == "tightTransf":
        raise ConfigError("--stage1_objective hmmc needs a dual-encoder --sim_header (meanP/seqLSTM/seqTransf)")
    FeatureQueue(1, args.contrast_num_negative, strict_divisible=args.official_quirks).check_batch(args.batch_size)
    if not any(getattr(args, f"w_{n}") > 0 for n in ("fam", "vtm", "ftm", "mlm")):
        raise ConfigError("--w_fam, --w_vtm, --w_ftm and --w_mlm are all 0: HMMC would train on no loss")


def build_hmmc_task(args: argparse.Namespace, model: MemBridgeModel) -> HMMCTask:
    weights = HMMCWeights(args.w_fam, args.w_vtm, args.w_ftm, args.w_mlm, args.contrast_temperature)
    mask_id = args.hmmc_mask_id if args.hmmc_mask_id is not None else (HMMC_MASK_ID if args.official_quirks else 0)
    special, random_range = (CLIP_SOT_ID, CLIP_EOT_ID), None
    if getattr(args, "language", "english") == "chinese":
        tok = BertTextTokenizer(args.text_pretrain_path)
        mask_id = args.hmmc_mask_id if args.hmmc_mask_id is not None else tok.mask_id
        special = (tok.sot_id, tok.eot_id)
        random_range = (max(tok.sot_id, tok.eot_id, tok.pad_id, tok.mask_id) + 1, tok.vocab_size)
    settings = HMMCSettings(weights, args.contrast_momentum, args.contrast_num_negative, args.hmmc_proj_dims,
                            mask_id, args.official_quirks, special, random_range)  # fmt: skip
    task = HMMCTask(model, settings).to(model.encoder.logit_scale.device)
    load_aux_from_init(args, model)
    return task


def prepare_hmmc_set(args: argparse.Namespace, dataset):
    """With ``--w_mlm > 0``: attach the per-sample MLM draws to a ``RetrievalTrainDataset`` (``extra_items``)."""
    if args.w_mlm <= 0:
        return dataset
    if not hasattr(dataset, "extra_items"):
        raise ConfigError(f"--stage1_objective hmmc cannot add MLM draws to a {type(dataset).__name__} training set")
    dataset.extra_items = MLMDraws(args.max_words)
    return dataset


STAGE1_OBJECTIVES: dict[str, Stage1Objective] = {
    "clip": Stage1Objective(build_task=lambda args, model: ContrastiveTask(model, align_weight=args.w_align)),
    "mcq": Stage1Objective(build_task=build_mcq_task, prepare_train_set=prepare_mcq_set, check=check_mcq),
    "hmmc": Stage1Objective(build_task=build_hmmc_task, prepare_train_set=prepare_hmmc_set, check=check_hmmc),
}


def stage1_objective(args: argparse.Namespace) -> Stage1Objective:
    name = getattr(args, "stage1_objective", "clip")
    if name not in STAGE1_OBJECTIVES:
        raise ConfigError(f"--stage1_objective {name!r} is unknown; choose one of {sorted(STAGE1_OBJECTIVES)}")
    return STAGE1_OBJECTIVES[name]


def check_stage1_flags(args: argparse.Namespace) -> None:
    """The chosen objective's flag rules (``run_main``'s ``check``), and ``--language``'s. Only the ``clip`` objective
    has a T2VLP form (tube tokens + alignment); the others run on the MemBridge dual encoder."""
    if args.stage1_objective != "clip" and args.method != "membridge":
        raise ConfigError(
            f"--stage1_objective {args.stage1_objective} runs with --method membridge (the plain dual encoder); "
            f"--method {args.method} has its own stage-1 objective: use --stage1_objective clip"
        )
    if getattr(args, "language", "english") == "chinese":
        if not args.text_pretrain_path:
            raise ConfigError("--language chinese needs --text_pretrain_path (a local Hugging Face BERT folder)")
        if args.stage1_objective == "mcq":
            raise ConfigError("--stage1_objective mcq reads CLIP's text layers: it runs with --language english only")
    stage1_objective(args).check(args)
