"""Video captioning on MSR-VTT / MSVD through the MemBridge fusion (DESIGN 2.5-2.7, 3.3).

Training is the stage-2 prefix LM (``MemBridgeFusion.plm_loss``): video + bridge tokens + causal text, by default
scoring every token of each reference (``--caption_targets suffix``: the stage-2 random suffix). Unlike stage 2,
the CLIP video encoder is fine-tuned through the fusion (at ``--lr * --coef_lr``, below ``--freeze_layer_num``
frozen); the text features of the prefix come from the CLIP text encoder without gradient, as decoding sees them.
With ``--method t2vlp`` training is one teacher-forced pass plus the local alignment; with ``--method stoa`` the
prefix LM runs over ``[frames | v_sep | trajectories + actions | text]`` (joint attention, the per-video boxes from
``--objects_dir``), the object module trains, and on MSR-VTT the dual-encoder contrastive loss is added
(``--caption_contrastive_weight``, spec B.7's ``post_sim``).

Evaluation decodes every test video (batched over videos, each rank a contiguous shard, captions gathered as JSON),
then scores one caption per video against **all** its references with pycocoevalcap on PTB-tokenised text.
Metric scale: pycocoevalcap's own (BLEU, METEOR, ROUGE-L in [0, 1]; CIDEr is CIDEr-D in [0, 10]); the same values
x100, as papers print them, are added under ``{name}_x100``. With a validation split, every validation run keeps
the weights of the best CIDEr so far; the test set is decoded with the best weights.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dataloaders.datasets import CaptionDataset
from dataloaders.errors import ConfigError, DataError
from dataloaders.tokenizer import ClipTokenizer
from engine.builders import build_dataset
from engine.data import build_eval_loader
from engine.distributed import DistInfo, all_gather_object, all_gather_with_grad, broadcast_object
from engine.flags import build_parser
from engine.run_logging import write_json_atomic
from modules.aux_losses import local_alignment
from modules.fusion import draw_plm_starts, encode_text_with_probes, eot_positions, plm_targets
from modules.losses import contrastive_loss
from modules.membridge import MemBridgeModel
from modules.methods import refuse_unsupported
from video_captioning.captioner import generate_captions
from video_captioning.decoding import DEFAULT_LENGTH_PENALTY, SOT_ID
from video_captioning.metrics import METRIC_KEYS, CaptionScorer

logger = logging.getLogger(__name__)

CAPTION_TARGETS = ("all", "suffix")
DEFAULT_CAPTION_TARGETS = "all"
CAPTION_DATASETS = {"msrvtt": "msrvtt_caption", "msvd": "msvd_caption"}
SELECTION_METRIC = "CIDEr"
PERCENT = 100.0
PERCENT_SUFFIX = "_x100"
CAPTIONS_FILE = "captions_{split}.json"


def caption_dataset_key(datatype: str) -> str:
    """Registry key of ``--datatype msrvtt|msvd``."""
    if datatype not in CAPTION_DATASETS:
        raise ConfigError(f"--datatype {datatype!r}: captioning supports {sorted(CAPTION_DATASETS)}")
    return CAPTION_DATASETS[datatype]


def max_caption_tokens(max_words: int) -> int:
    """Generated tokens (EOT included) that fit ``--max_words`` text slots together with SOT, as in training."""
    return max_words - 1


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class CaptionTask(nn.Module):
    """The prefix-LM loss of a captioning batch (``video, video_mask, text_ids, text_mask``; with ``--method stoa``
    also the boxes ``object_boxes, object_classes, trajectory_ids``): ``{loss, plm_acc}``.

    ``targets``: ``all`` scores every token of the reference (teacher forcing, what decoding needs), ``suffix`` a
    random suffix per reference (the stage-2 PLM draw). Frame features keep their gradient when some video-encoder
    parameter trains (``--freeze_layer_num``); the text features of the prefix never do. The method's video-only
    tokens (T2VLP tubes on a detached ViT input, STOA trajectory + action tokens, whose ViT inputs keep their
    gradient as published, B.3) enter the fusion after ``v_sep`` and their module trains.

    ``contrastive_weight > 0`` adds the symmetric InfoNCE of the dual encoder over the (global) batch (STOA's
    ``post_sim`` on MSR-VTT captioning, spec B.7; reported as ``contrastive``): the caption's EOT feature is then
    encoded a second time, with gradient, so the text encoder trains too. References of one video that share a
    batch count as negatives of each other, as in the published code.
    """

    def __init__(self, model: MemBridgeModel, targets: str = DEFAULT_CAPTION_TARGETS, contrastive_weight: float = 0.0):
        super().__init__()
        if model.fusion is None:
            raise ValueError("captioning needs a MemBridgeModel with a fusion encoder")
        if targets not in CAPTION_TARGETS:
            raise ConfigError(f"--caption_targets {targets!r}: choose one of {CAPTION_TARGETS}")
        if contrastive_weight < 0:
            raise ConfigError(f"--caption_contrastive_weight must be >= 0 (got {contrastive_weight})")
        self.model = model
        self.targets = targets
        self.contrastive_weight = contrastive_weight

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self._lm_loss(batch)
        if self.contrastive_weight > 0:
            encoder = self.model.encoder
            sim = encoder.similarity_logits(
                all_gather_with_grad(encoder.text_features(batch["text_ids"])),
                all_gather_with_grad(out.pop("frame_feats")),
                all_gather_with_grad(batch["video_mask"]),
            )
            out["contrastive"] = contrastive_loss(sim)
            out["loss"] = out["loss"] + self.contrastive_weight * out["contrastive"]
        out.pop("frame_feats", None)
        return out

    def after_optimizer_step(self) -> None:
        if self.contrastive_weight > 0:  # only the contrastive term trains the temperature
            self.model.encoder.clamp_logit_scale_()

    def _lm_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{loss, plm_acc[, align], frame_feats}`` of the fusion's language-model pass."""
        encoder, fusion = self.model.encoder, self.model.fusion
        clip = encoder.clip
        text_ids, text_mask, video_mask = batch["text_ids"], batch["text_mask"], batch["video_mask"]
        if encoder.objects is not None:  # STOA: the object module trains; the ViT where it trains (B.3, B.7)
            frames, tubes, token_mask = encoder.encode_video_tokens(
                batch["video"], video_mask, batch=batch, return_mask=True
            )
        else:
            token_mask = None
            train_video = self.training and any(p.requires_grad for p in clip.visual.parameters())
            with torch.set_grad_enabled(train_video and torch.is_grad_enabled()):
                frames, tap = encoder.encode_video(batch["video"], video_mask, return_tap=True)
            tubes = None if encoder.tubes is None else encoder.tubes(tap.detach(), video_mask)  # T2VLP, trains
        if self.targets == "all":
            starts = torch.ones(text_ids.shape[0], dtype=torch.long, device=text_ids.device)
        else:
            starts = draw_plm_starts(text_mask)
        if fusion.config.plm_mode == "single_pass":  # T2VLP: one teacher-forced pass, + the local alignment
            with torch.no_grad():
                token_feats = clip.encode_text_tokens(text_ids)
            t_eot = token_feats[torch.arange(len(text_ids), device=text_ids.device), eot_positions(text_mask)]
            loss, accuracy = fusion.single_pass_lm_objective(
                frames, video_mask, text_ids, text_mask, starts, token_feats, t_eot, clip.token_embedding.weight,
                tubes, token_mask,
            ).loss_and_accuracy()  # fmt: skip
            out = {"plm_acc": accuracy, "frame_feats": frames}
            if tubes is not None:
                out["align"] = local_alignment(encoder.tubes.text_queries(), token_feats, text_mask, tubes)
                loss = loss + out["align"]
            return {"loss": loss, **out}
        prefixes = plm_targets(text_ids, text_mask, starts)[1].unique()
        with torch.no_grad():
            token_feats, probe_feats = encode_text_with_probes(clip, text_ids, prefixes, fusion.config.eot_token_id)
        loss, accuracy = fusion.plm_loss(
            frames, video_mask, text_ids, text_mask, starts, token_feats, probe_feats, prefixes,
            clip.token_embedding.weight, tubes, token_mask,
        )  # fmt: skip
        return {"loss": loss, "plm_acc": accuracy, "frame_feats": frames}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeSettings:
    """How captions are generated: ``--beam_size`` (1 = greedy), ``--length_penalty``, at most ``max_len`` tokens."""

    max_len: int
    beam_size: int = 1
    length_penalty: float = DEFAULT_LENGTH_PENALTY
    bos: int = SOT_ID
    use_cache: bool = True


@torch.no_grad()
def caption_videos(
    model: MemBridgeModel,
    dataset: CaptionDataset,
    dist: DistInfo,
    batch_size: int,
    settings: DecodeSettings,
    tokenizer: ClipTokenizer,
    num_workers: int = 0,
) -> dict[str, str]:
    """``{video_id: caption}`` of every video of an evaluation ``dataset``, on every rank.

    Each rank decodes a contiguous shard in batches of ``batch_size // world_size`` videos; the captions are
    gathered as JSON.
    """
    device = dist.device
    loader, _ = build_eval_loader(
        dataset, max(1, batch_size // dist.world_size), num_workers, dist.rank, dist.world_size
    )
    local: list[tuple[int, str]] = []
    for batch in tqdm(loader, desc="caption videos", disable=dist.rank != 0, leave=False):
        batch = {key: value.to(device) for key, value in batch.items()}  # STOA's boxes too
        video, video_mask = batch["video"], batch["video_mask"]
        # the method's video-only tokens (T2VLP tubes, STOA objects): once per video, reused by every step and beam
        frames, tubes, token_mask = model.encoder.encode_video_tokens(
            video, video_mask, detach_tap=True, batch=batch, return_mask=True
        )
        tokens = generate_captions(
            model,
            frames,
            video_mask,
            settings.max_len,
            beam_size=settings.beam_size,
            length_penalty=settings.length_penalty,
            bos=settings.bos,
            use_cache=settings.use_cache,
            video_tokens=tubes,
            video_token_mask=token_mask,
        )
        local.extend(
            (index, tokenizer.decode(row))
            for index, row in zip(batch["video_index"].tolist(), tokens.tolist(), strict=True)
        )
    captions = {dataset.video_ids[index]: text for part in all_gather_object(local) for index, text in part}
    return {video_id: captions[video_id] for video_id in dataset.video_ids}


class CaptionEvaluator:
    """``evaluate(task) -> metrics`` for the engine: decode a split, score it on rank 0, share the scores.

    Writes ``captions_{split}.json`` (``{video_id: caption}``) to ``output_dir`` on rank 0.
    """

    def __init__(
        self,
        dataset: CaptionDataset,
        split: str,
        dist: DistInfo,
        batch_size: int,
        settings: DecodeSettings,
        scorer: CaptionScorer,
        output_dir: str | Path,
        tokenizer: ClipTokenizer,
        num_workers: int = 0,
    ) -> None:
        self.dataset = dataset
        self.split = split
        self.dist = dist
        self.batch_size = batch_size
        self.settings = settings
        self.scorer = scorer
        self.output_dir = Path(output_dir)
        self.tokenizer = tokenizer
        self.num_workers = num_workers

    def __call__(self, task: nn.Module) -> dict:
        model = getattr(task, "model", task)
        captions = caption_videos(
            model, self.dataset, self.dist, self.batch_size, self.settings, self.tokenizer, self.num_workers
        )
        metrics = None
        if self.dist.rank == 0:
            references = {video_id: self.dataset.references[video_id] for video_id in captions}
            scores = self.scorer(captions, references)
            metrics = {**scores, **{key + PERCENT_SUFFIX: PERCENT * scores[key] for key in METRIC_KEYS}}
            metrics.update(num_videos=len(captions), beam_size=self.settings.beam_size, split=self.split)
            write_json_atomic(self.output_dir / CAPTIONS_FILE.format(split=self.split), captions)
        return broadcast_object(metrics)


# ----------------------------------------------------------------------------------------------------------------
# Flags and recipe pieces
# ----------------------------------------------------------------------------------------------------------------


def build_caption_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The shared flags plus the decoding flags of captioning."""
    parser = build_parser("caption", description=description)
    g = parser.add_argument_group("caption decoding")
    g.add_argument("--beam_size", type=int, default=1, help="beam width; 1 = greedy search (the family default)")
    g.add_argument(
        "--length_penalty",
        type=float,
        default=DEFAULT_LENGTH_PENALTY,
        help="beam search ranks finished captions by sum(logprob) / length**length_penalty",
    )
    g.add_argument(
        "--caption_targets",
        choices=CAPTION_TARGETS,
        default=DEFAULT_CAPTION_TARGETS,
        help="training scores every reference token (all) or a random suffix per reference as in stage-2 PLM",
    )
    g.add_argument(
        "--caption_contrastive_weight",
        type=float,
        default=None,
        help="weight of the dual-encoder InfoNCE added to the caption loss (default: 1 for --method stoa on "
        "--datatype msrvtt, STOA's post_sim; 0 otherwise)",
    )
    # Downstream fine-tuning trains the fusion at --lr (the published rule) unless --fusion_lr is given.
    parser.set_defaults(fusion_lr=None)
    return parser


def validate_caption_flags(args: argparse.Namespace) -> None:
    """Captioning-only checks (after ``engine.flags.validate``)."""
    caption_dataset_key(args.datatype)
    refuse_unsupported(args.method, "video captioning", supported=("membridge", "t2vlp", "stoa"))
    if args.beam_size < 1:
        raise ConfigError(f"--beam_size must be >= 1 (got {args.beam_size})")
    if caption_contrastive_weight(args) < 0:
        raise ConfigError(f"--caption_contrastive_weight must be >= 0 (got {args.caption_contrastive_weight})")


def caption_contrastive_weight(args: argparse.Namespace) -> float:
    """``--caption_contrastive_weight``, by default STOA's recipe (spec B.7): the contrastive loss joins the caption
    loss on MSR-VTT only (``post_sim`` when ``datatype == msrvtt_caption``)."""
    weight = getattr(args, "caption_contrastive_weight", None)
    if weight is not None:
        return weight
    return 1.0 if args.method == "stoa" and args.datatype == "msrvtt" else 0.0


def caption_evaluators(
    args: argparse.Namespace, dist: DistInfo, image_size: int, tokenizer: ClipTokenizer, scorer: CaptionScorer
) -> tuple[CaptionEvaluator, CaptionEvaluator | None]:
    """``(test, val)`` evaluators of ``--datatype``; ``val`` is None when the dataset has no validation split (the
    last weights then decode the test set)."""
    settings = DecodeSettings(
        max_len=max_caption_tokens(args.max_words),
        beam_size=args.beam_size,
        length_penalty=args.length_penalty,
        bos=tokenizer.sot_id,
    )

    def evaluator(split: str) -> CaptionEvaluator:
        dataset = build_dataset(args, caption_dataset_key(args.datatype), split, image_size, tokenizer=tokenizer)
        return CaptionEvaluator(
            dataset, split, dist, args.batch_size_val, settings, scorer, args.output_dir, tokenizer,
            args.num_thread_reader,
        )  # fmt: skip

    test = evaluator("test")
    if not args.do_train:
        return test, None
    try:
        return test, evaluator("val")
    except DataError as exc:
        logger.warning("no validation split (%s): the last weights decode the test set", exc)
        return test, None
