"""The MemBridge model: the CLIP video-text dual encoder plus the fusion encoder, and the stage-2 losses.

Stage 2 (DESIGN §2.6): CLIP is frozen and its outputs are used without gradient; only the fusion trains on
``w_vtm * VTM + w_mlm * MLM + w_plm * PLM``. Gathering across ranks is the caller's business: pass a ``gather``
function (concatenate a tensor over ranks along dim 0, no gradient) and this rank's ``local_offset``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn

from modules.aux_losses import local_alignment, object_action_matching
from modules.fusion import (
    MemBridgeFusion,
    ObjectiveOutput,
    check_fusion_matches_clip,
    cross_entropy_sum_and_correct,
    draw_plm_starts,
    encode_text_with_probes,
    eot_positions,
    mlm_mask,
    plm_targets,
    sample_hard_negatives,
)
from modules.video_clip import VideoCLIP

logger = logging.getLogger(__name__)

GatherFn = Callable[[torch.Tensor], torch.Tensor]
CACHED_FRAME_FEATURES_KEY = "frame_feats"  # optional batch key [B, T, D] (--cache_visual_features)
# optional batch key [B, n, T, 1+P, W]: the cached ViT taps of T2VLP / STOA (VideoCLIP.visual_taps), with frame_feats
CACHED_VISUAL_TAPS_KEY = "visual_taps"
CACHED_VIDEO_TOKENS_KEY = "video_tokens"  # optional batch key [B, K, D]: precomputed tubes / STOA objects
CACHED_VIDEO_TOKEN_MASK_KEY = "video_token_mask"  # optional batch key [B, K]: their key mask (STOA's empty slots)
# optional batch key [B, 2L + 4] float64: per-sample uniform draws of stage 2 (see stage2_draw_columns)
STAGE2_DRAWS_KEY = "stage2_draws"


def stage2_draw_columns(max_words: int) -> dict[str, slice]:
    """Columns of the per-sample :data:`STAGE2_DRAWS_KEY` row of a text of ``max_words`` slots: ``mlm`` and
    ``mlm_fallback`` (``[L]`` each, :func:`modules.fusion.mlm_mask`), ``plm_start`` (:func:`draw_plm_starts`),
    ``neg_video`` / ``neg_text`` (the VTM negatives of the pair, inverse-CDF draws) and ``order`` (the pair's key
    that fixes the candidates' order for those draws)."""
    length = max_words
    names = ("plm_start", "neg_video", "neg_text", "order")
    columns = {"mlm": slice(0, length), "mlm_fallback": slice(length, 2 * length)}
    columns.update({name: slice(2 * length + i, 2 * length + i + 1) for i, name in enumerate(names)})
    return columns


def global_mean(total: torch.Tensor, count: torch.Tensor, gather: GatherFn | None) -> torch.Tensor:
    """``total / count`` over all ranks: the value is the global mean (the same on every rank, and the same as one
    process holding the whole batch); the gradient is this rank's share ``W / count_global * d total``, so that
    the data-parallel average of the ranks' gradients is the global mean's gradient."""
    if gather is None:
        return total / count.clamp(min=1.0)
    parts = gather(torch.stack([total.detach().float(), count.float()]).unsqueeze(0))  # [W, 2]
    total_all, count_all = parts.sum(0).unbind()
    share = total * (parts.shape[0] / count_all.clamp(min=1.0))
    return share - share.detach() + total_all / count_all.clamp(min=1.0)


@dataclass(frozen=True)
class Stage2Weights:
    """Weights of the stage-2 objectives (flags ``--w_vtm --w_mlm --w_plm``); a zero weight skips the objective.

    ``vtm_negative_scale`` (``--vtm_negative_scale``) multiplies the similarity logits that VTM negatives are drawn
    from, ``softmax(scale * sim)``: 1 is the published sampling, 0 draws uniformly from the other pairs of the
    global batch, larger values draw harder negatives."""

    vtm: float = 1.0
    mlm: float = 1.0
    plm: float = 1.0
    vtm_negative_scale: float = 1.0
    align: float = 1.0  # T2VLP's local alignment (only a model with tube tokens computes it)
    match: float = 1.0  # STOA's object/action matching (a model with object tokens and a batch with noun/verb masks)


@dataclass(frozen=True)
class Stage2Draws:
    """Explicit random draws of one stage-2 step (each part optional; a missing part is drawn from the generator).

    ``neg_video`` / ``neg_text [b]``: the VTM hard negatives of this rank's pairs (text->video and video->text, as
    indices into the (gathered) batch); ``mlm_masked_ids`` / ``mlm_labels [B, L]``: the ids fed to the text encoder
    and the targets (``IGNORE_INDEX`` where unmasked), see :func:`modules.fusion.mlm_mask`; ``plm_starts [B]``: the
    first scored position of each text's PLM suffix. The two halves of a pair are given together.
    """

    neg_video: torch.Tensor | None = None
    neg_text: torch.Tensor | None = None
    mlm_masked_ids: torch.Tensor | None = None
    mlm_labels: torch.Tensor | None = None
    plm_starts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for first, second in (("neg_video", "neg_text"), ("mlm_masked_ids", "mlm_labels")):
            if (getattr(self, first) is None) != (getattr(self, second) is None):
                raise ValueError(f"Stage2Draws: give {first} and {second} together (or neither)")

    def check(self, text_shape: torch.Size) -> None:
        """Raise ValueError unless every given part fits a batch of texts ``[B, L]``."""
        b = text_shape[0]
        expected = {
            "neg_video": (b,),
            "neg_text": (b,),
            "mlm_masked_ids": tuple(text_shape),
            "mlm_labels": tuple(text_shape),
            "plm_starts": (b,),
        }
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"Stage2Draws.{name} has shape {tuple(value.shape)}; this batch needs {shape}")

    @classmethod
    def from_details(cls, details: Mapping[str, torch.Tensor]) -> Stage2Draws:
        """The draws recorded in the details of :meth:`MemBridgeModel.stage2_losses` (``return_details=True``)."""
        return cls(**{f.name: details.get(f.name) for f in fields(cls)})


@dataclass
class _PairPool:
    """Features of the (gathered) video-text pairs that VTM draws positives and negatives from."""

    frame_feats: torch.Tensor  # [Bg, T, D]
    video_mask: torch.Tensor  # [Bg, T]
    text_feats: torch.Tensor  # [Bg, L, D]
    text_mask: torch.Tensor  # [Bg, L]
    t_eot: torch.Tensor  # [Bg, D]
    extra_tokens: torch.Tensor | None = None  # [Bg, K, D] video-only tokens (T2VLP tubes, STOA objects)
    extra_mask: torch.Tensor | None = None  # [Bg, K] their key mask (None: all real)


class MemBridgeModel(nn.Module):
    """``encoder`` (VideoCLIP dual encoder) + ``fusion`` (MemBridgeFusion, absent in stage 1)."""

    def __init__(self, encoder: VideoCLIP, fusion: MemBridgeFusion | None = None):
        super().__init__()
        if fusion is not None:
            check_fusion_matches_clip(fusion.config, encoder.clip)
        self.encoder = encoder
        self.fusion = fusion

    def freeze_encoder(self) -> None:
        """Stage 2: no CLIP parameter trains (T2VLP's tube module and STOA's object module keep training: they are
        not part of CLIP)."""
        self.encoder.requires_grad_(False)
        for module in (self.encoder.tubes, self.encoder.objects):
            if module is not None:
                module.requires_grad_(True)

    def object_tokens(self, batch: Mapping[str, torch.Tensor]):
        """STOA: frame features ``[B, T, D]`` (no gradient) and the :class:`ObjectActionOutput` of the batch's boxes
        (the object module trains; the ViT gives it its inputs without gradient when frozen). Without the video the
        batch must carry the cached ViT taps (``visual_taps``, ``--cache_visual_features``) and ``frame_feats``."""
        if "video" not in batch:
            if CACHED_VISUAL_TAPS_KEY not in batch:
                raise ValueError("object tokens need the video or the cached ViT taps ('visual_taps')")
            out = self.encoder.tokens_from_taps(batch[CACHED_VISUAL_TAPS_KEY], batch["video_mask"], batch)
            return self.frame_features(batch), out
        frames, out = self.encoder.encode_video_objects(batch["video"], batch["video_mask"], batch)
        return frames.detach(), out

    def video_tokens(
        self, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Frame features ``[B, T, D]`` (no gradient), the video-only extra tokens (T2VLP tubes ``[B, K, D]``, trained
        on a detached ViT input; STOA trajectory + action tokens; None without such a module) and their key mask
        ``[B, K]`` (None: all real; STOA: ``[id_list != 0, 1 .. 1]``). Precomputed tokens come with the batch
        (``video_tokens`` and, when some are empty, ``video_token_mask``; evaluation, VTM in retrieval)."""
        tubes = self.encoder.tubes
        if CACHED_VIDEO_TOKENS_KEY in batch:
            return self.frame_features(batch), batch[CACHED_VIDEO_TOKENS_KEY], batch.get(CACHED_VIDEO_TOKEN_MASK_KEY)
        if self.encoder.objects is not None:
            frames, out = self.object_tokens(batch)
            return frames, out.tokens, out.token_mask
        if tubes is None:
            return self.frame_features(batch), None, None
        if "video" not in batch:
            if CACHED_VISUAL_TAPS_KEY not in batch:
                raise ValueError("tube tokens need the video, the cached ViT taps ('visual_taps') or 'video_tokens'")
            taps = batch[CACHED_VISUAL_TAPS_KEY]
            return self.frame_features(batch), self.encoder.tokens_from_taps(taps, batch["video_mask"]), None
        with torch.no_grad():
            frames, tap = self.encoder.encode_video(batch["video"], batch["video_mask"], return_tap=True)
        return frames, tubes(tap, batch["video_mask"]), None

    def _require_fusion(self) -> MemBridgeFusion:
        if self.fusion is None:
            raise RuntimeError("this MemBridgeModel has no fusion encoder (stage 1 model)")
        return self.fusion

    @torch.no_grad()
    def frame_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-frame CLIP features ``[B, T, D]`` without gradient (cached ones when the batch carries them)."""
        if CACHED_FRAME_FEATURES_KEY in batch:
            return batch[CACHED_FRAME_FEATURES_KEY]
        return self.encoder.encode_video(batch["video"], batch["video_mask"])

    @torch.no_grad()
    def text_features(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position CLIP text features ``[B, L, D]`` and the EOT feature ``[B, D]``, without gradient."""
        feats = self.encoder.clip.encode_text_tokens(text_ids)
        return feats, feats[torch.arange(feats.shape[0], device=feats.device), eot_positions(text_mask)]

    def stage2_losses(
        self,
        batch: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        weights: Stage2Weights | None = None,
        gather: GatherFn | None = None,
        local_offset: int = 0,
        draws: Stage2Draws | None = None,
        return_details: bool = False,
        gather_with_grad: GatherFn | None = None,
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Stage-2 losses of one (local) batch: ``{loss, vtm, mlm, plm, vtm_acc, mlm_acc, plm_acc}``.

        ``generator`` drives every random draw that ``draws`` does not give, in this order: MLM masks (when MLM
        is on), PLM suffix starts, hard negatives (when VTM is on); with ``draws=None`` this is the published
        sequence, and a given part is simply not drawn. With ``gather`` (all-gather along dim 0 over ranks) the
        hard negatives come from the global batch, whose rows ``local_offset .. local_offset + B - 1`` are this
        rank's (given ``neg_video`` / ``neg_text`` are indices into that global batch). Video-only tokens that train
        (T2VLP tubes) are gathered with ``gather_with_grad`` when given (e.g. ``all_gather_with_grad``: a tube used
        as another rank's negative sends its gradient back), else only this rank's rows keep their gradient.

        With ``return_details`` it returns ``(losses, details)``; ``details`` holds the draws used (the
        :class:`Stage2Draws` field names: pass ``Stage2Draws.from_details(details)`` back to repeat the step) and,
        per objective ``o`` in ``vtm / mlm / plm`` that is on:

        - ``o_fusion_inputs [R, N, D]`` and ``o_attention_mask [R, 1, N, N]``: the sequence entering the fusion
          transformer and its additive mask; ``o_memory_attention [R, K, S]``: the memory-read attention (memory
          bridges only);
        - ``o_logits`` and ``o_targets``: what the loss is the mean cross-entropy of (``vtm``: ``[3b, 2]``
          ``[unmatch, match]`` over positives, text->video then video->text negatives, with ``vtm_video_index`` /
          ``vtm_text_index [3b]`` pool rows; ``mlm``: ``[M, V]`` at the masked positions; ``plm``: ``[R, V]`` of
          the (sample, prefix) rows, with ``plm_rows`` / ``plm_prefix [R]``).
        """
        fusion = self._require_fusion()
        weights = weights or Stage2Weights()
        draws = draws or Stage2Draws()
        clip = self.encoder.clip
        token_embedding = clip.token_embedding.weight
        video_mask, text_ids, text_mask = batch["video_mask"], batch["text_ids"], batch["text_mask"]
        draws.check(text_ids.shape)
        objects = None
        if self.encoder.objects is not None and CACHED_VIDEO_TOKENS_KEY not in batch:
            frame_feats, objects = self.object_tokens(batch)
            extra, extra_mask = objects.tokens, objects.token_mask
        else:
            frame_feats, extra, extra_mask = self.video_tokens(batch)
        zero = frame_feats.new_zeros(())
        out = {name: zero for name in ("vtm", "mlm", "plm", "vtm_acc", "mlm_acc", "plm_acc")}
        single_pass = fusion.config.plm_mode == "single_pass"
        details: dict[str, torch.Tensor] = {}

        def record(name: str, objective: ObjectiveOutput) -> None:
            if gather is None:
                out[name], out[f"{name}_acc"] = objective.loss_and_accuracy()
            else:  # means over the global batch (the MLM / PLM row counts differ between ranks)
                total, correct, count = cross_entropy_sum_and_correct(objective.logits, objective.targets)
                out[name], out[f"{name}_acc"] = global_mean(total, count, gather), global_mean(correct, count, gather)
                out[f"{name}_acc"] = out[f"{name}_acc"].detach()
            if return_details:
                details.update({f"{name}_{key}": value for key, value in objective.details.items()})
                details.update({f"{name}_logits": objective.logits, f"{name}_targets": objective.targets})

        uniform = batch.get(STAGE2_DRAWS_KEY)
        columns = stage2_draw_columns(text_ids.shape[1])
        if uniform is not None and tuple(uniform.shape) != (text_ids.shape[0], columns["order"].stop):
            raise ValueError(f"batch[{STAGE2_DRAWS_KEY!r}] has shape {tuple(uniform.shape)}; expected "
                             f"{(text_ids.shape[0], columns['order'].stop)}")  # fmt: skip
        part = (lambda name: None) if uniform is None else (lambda name: uniform[:, columns[name]])  # noqa: E731
        if weights.mlm:
            if draws.mlm_labels is None:
                given = None if uniform is None else (part("mlm"), part("mlm_fallback"))
                masked_ids, labels = mlm_mask(text_ids, text_mask, generator, fusion.config.mlm_prob, given)
            else:
                masked_ids, labels = draws.mlm_masked_ids, draws.mlm_labels
            details.update(mlm_masked_ids=masked_ids, mlm_labels=labels)
            masked_feats, masked_eot = self.text_features(masked_ids, text_mask)
            record(
                "mlm",
                fusion.mlm_objective(
                    frame_feats, video_mask, masked_feats, text_mask, masked_eot, labels, token_embedding, extra,
                    extra_mask,
                ),
            )  # fmt: skip

        if draws.plm_starts is None:
            start_draws = None if uniform is None else part("plm_start").squeeze(1)
            starts = draw_plm_starts(text_mask, generator, start_draws)
        else:
            starts = draws.plm_starts
        with_probes = weights.plm and not single_pass
        prefixes = plm_targets(text_ids, text_mask, starts)[1].unique() if with_probes else starts.new_zeros(0)
        with torch.no_grad():
            text_feats, probe_feats = encode_text_with_probes(clip, text_ids, prefixes, fusion.config.eot_token_id)
        t_eot = text_feats[torch.arange(text_feats.shape[0], device=text_feats.device), eot_positions(text_mask)]
        details["plm_starts"] = starts
        if weights.plm and single_pass:
            record(
                "plm",
                fusion.single_pass_lm_objective(
                    frame_feats, video_mask, text_ids, text_mask, starts, text_feats, t_eot, token_embedding, extra,
                    extra_mask,
                ),
            )  # fmt: skip
        elif weights.plm:
            record(
                "plm",
                fusion.plm_objective(
                    frame_feats, video_mask, text_ids, text_mask, starts, text_feats, probe_feats, prefixes,
                    token_embedding, extra, extra_mask,
                ),
            )  # fmt: skip

        if weights.vtm:
            mask_rows = None if extra_mask is None else extra_mask.long()  # long: every backend gathers it
            pool = _PairPool(frame_feats, video_mask, text_feats, text_mask, t_eot, extra, mask_rows)
            if gather is not None:
                pool = _PairPool(*(None if v is None else gather(v) for v in vars(pool).values()))
                if extra is not None and gather_with_grad is not None:
                    pool.extra_tokens = gather_with_grad(extra)
                elif extra is not None:  # this rank's tubes keep their gradient
                    pool.extra_tokens = torch.cat(
                        [pool.extra_tokens[:local_offset], extra, pool.extra_tokens[local_offset + len(extra) :]]
                    )
            local_size = text_ids.shape[0]
            if draws.neg_video is None:
                with torch.no_grad():
                    sim = self.encoder.similarity_logits(pool.t_eot, pool.frame_feats, pool.video_mask)
                    order = None
                    if uniform is not None:
                        order = part("order").squeeze(1)
                        order = order if gather is None else gather(order)
                neg_video, neg_text = sample_hard_negatives(
                    sim * weights.vtm_negative_scale, local_offset, local_size, generator,
                    None if uniform is None else torch.cat([part("neg_video"), part("neg_text")], dim=1), order,
                )  # fmt: skip
            else:
                neg_video, neg_text = draws.neg_video, draws.neg_text
            details.update(neg_video=neg_video, neg_text=neg_text)
            local_index = torch.arange(local_offset, local_offset + local_size, device=pool.t_eot.device)
            record(
                "vtm",
                fusion.vtm_objective(
                    pool.frame_feats, pool.video_mask, pool.text_feats, pool.text_mask, pool.t_eot, local_index,
                    neg_video, neg_text, pool.extra_tokens, pool.extra_mask,
                ),
            )  # fmt: skip

        out["loss"] = weights.vtm * out["vtm"] + weights.mlm * out["mlm"] + weights.plm * out["plm"]
        if extra is not None and self.encoder.tubes is not None:  # T2VLP: alignment on the detached text features
            align = local_alignment(self.encoder.tubes.text_queries(), text_feats, text_mask, extra)
            count = align.new_tensor(float(extra.numel()))
            out["align"] = align if gather is None else global_mean(align * count, count, gather)
            out["loss"] = out["loss"] + weights.align * out["align"]
        if objects is not None and "noun_mask" in batch and weights.match:  # STOA: OTA + action set prediction
            quirks = fusion.config.official_quirks
            total, count = object_action_matching(
                objects.trajectories, objects.trajectory_valid, objects.actions, text_feats, text_mask,
                batch["noun_mask"], batch["verb_mask"], eot_in_sets=quirks, skip_actions_without_objects=quirks,
                reduction="sum",
            )  # fmt: skip
            out["match"] = global_mean(total, count, gather)
            out["loss"] = out["loss"] + weights.match * out["match"]
        return (out, details) if return_details else out
