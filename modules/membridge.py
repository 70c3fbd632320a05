"""The MemBridge model: the CLIP video-text dual encoder plus the fusion encoder, and the stage-2 losses.

Stage 2 (DESIGN §2.6): CLIP is frozen and its outputs are used without gradient; only the fusion trains on
``w_vtm * VTM + w_mlm * MLM + w_plm * PLM``. Gathering across ranks is the caller's business: pass a ``gather``
function (concatenate a tensor over ranks along dim 0, no gradient) and this rank's ``local_offset``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from modules.fusion import (
    MemBridgeFusion,
    check_fusion_matches_clip,
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


@dataclass
class _PairPool:
    """Features of the (gathered) video-text pairs that VTM draws positives and negatives from."""

    frame_feats: torch.Tensor  # [Bg, T, D]
    video_mask: torch.Tensor  # [Bg, T]
    text_feats: torch.Tensor  # [Bg, L, D]
    text_mask: torch.Tensor  # [Bg, L]
    t_eot: torch.Tensor  # [Bg, D]


class MemBridgeModel(nn.Module):
    """``encoder`` (VideoCLIP dual encoder) + ``fusion`` (MemBridgeFusion, absent in stage 1)."""

    def __init__(self, encoder: VideoCLIP, fusion: MemBridgeFusion | None = None):
        super().__init__()
        if fusion is not None:
            check_fusion_matches_clip(fusion.config, encoder.clip)
        self.encoder = encoder
        self.fusion = fusion

    def freeze_encoder(self) -> None:
        """Stage 2: no CLIP parameter trains."""
        self.encoder.requires_grad_(False)

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
    ) -> dict[str, torch.Tensor]:
        """Stage-2 losses of one (local) batch: ``{loss, vtm, mlm, plm, vtm_acc, mlm_acc, plm_acc}``.

        ``generator`` drives every random draw (MLM masks, PLM suffix starts, hard negatives). With ``gather``
        (all-gather along dim 0 over ranks) the hard negatives come from the global batch, whose rows
        ``local_offset .. local_offset + B - 1`` are this rank's.
        """
        fusion = self._require_fusion()
        weights = weights or Stage2Weights()
        clip = self.encoder.clip
        token_embedding = clip.token_embedding.weight
        video_mask, text_ids, text_mask = batch["video_mask"], batch["text_ids"], batch["text_mask"]
        frame_feats = self.frame_features(batch)
        zero = frame_feats.new_zeros(())
        out = {name: zero for name in ("vtm", "mlm", "plm", "vtm_acc", "mlm_acc", "plm_acc")}

        if weights.mlm:
            masked_ids, labels = mlm_mask(text_ids, text_mask, generator, fusion.config.mlm_prob)
            masked_feats, masked_eot = self.text_features(masked_ids, text_mask)
            out["mlm"], out["mlm_acc"] = fusion.mlm_loss(
                frame_feats, video_mask, masked_feats, text_mask, masked_eot, labels, token_embedding
            )

        starts = draw_plm_starts(text_mask, generator)
        prefixes = plm_targets(text_ids, text_mask, starts)[1].unique() if weights.plm else starts.new_zeros(0)
        with torch.no_grad():
            text_feats, probe_feats = encode_text_with_probes(clip, text_ids, prefixes, fusion.config.eot_token_id)
        t_eot = text_feats[torch.arange(text_feats.shape[0], device=text_feats.device), eot_positions(text_mask)]
        if weights.plm:
            out["plm"], out["plm_acc"] = fusion.plm_loss(
                frame_feats, video_mask, text_ids, text_mask, starts, text_feats, probe_feats, prefixes, token_embedding
            )

        if weights.vtm:
            pool = _PairPool(frame_feats, video_mask, text_feats, text_mask, t_eot)
            if gather is not None:
                pool = _PairPool(*(gather(tensor) for tensor in vars(pool).values()))
            with torch.no_grad():
                sim = self.encoder.similarity_logits(pool.t_eot, pool.frame_feats, pool.video_mask)
            local_size = text_ids.shape[0]
            neg_video, neg_text = sample_hard_negatives(
                sim * weights.vtm_negative_scale, local_offset, local_size, generator
            )
            local_index = torch.arange(local_offset, local_offset + local_size, device=sim.device)
            out["vtm"], out["vtm_acc"] = fusion.vtm_loss(
                pool.frame_feats,
                pool.video_mask,
                pool.text_feats,
                pool.text_mask,
                pool.t_eot,
                local_index,
                neg_video,
                neg_text,
            )

        out["loss"] = weights.vtm * out["vtm"] + weights.mlm * out["mlm"] + weights.plm * out["plm"]
        return out
