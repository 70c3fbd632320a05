"""T2VLP (Focus-and-Align) tube tokens: K video-only tokens from semantic centres over the ViT's patch tokens.

Per video (spec ``T2VLP_STOA.md`` A.2), from ``X [B, T, 1+P, W]``, the per-frame tokens entering the first of the
last ``TUBE_BLOCKS`` ViT blocks (block 10 of ViT-B/16):

1. per frame, a soft assignment of the P patch tokens (CLS excluded) to each centre ``C [K, W]``, no scaling:
   ``A_t = softmax_P(C X_t[1:]^T)``, pooled ``g_{k,t} = A_t[k] X_t[1:]``;
2. head token ``h = mean_t X_t[0]`` over the valid frames;
3. per centre the sequence ``[h, g_{k,1} .. g_{k,T}]`` (no positional embedding) through a 2-block transformer
   (initialised from the last two ViT blocks; padded frames hidden as keys), ``u_k = ln_post(out_k[0]) @ proj``.

``text_queries()`` projects the same centres to the text space for the local alignment loss
(:func:`modules.aux_losses.local_alignment`). The tokens depend on the video only, so they travel with the video in
hard negatives and re-ranking. Parameter names: ``centres``, ``blocks.resblocks.i.*``, ``ln_post``, ``proj``,
``proj_center`` (published: ``clip.fusion_center``, ``clip.local_visual.*``, ``clip.fusion_proj_center``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from modules.clip_blocks import LayerNorm, Transformer, default_heads

logger = logging.getLogger(__name__)

DEFAULT_NUM_TUBES = 8
TUBE_BLOCKS = 2  # local transformer depth = the ViT blocks it is copied from (the last two)
PROJ_CENTER_STD = 0.02  # CLIP4Clip's init_weights for the Linear fusion_proj_center


class TubeTokens(nn.Module):
    """Semantic centres, the local (temporal) transformer and the tube / query projections."""

    def __init__(self, width: int, embed_dim: int, num_tubes: int = DEFAULT_NUM_TUBES, heads: int | None = None):
        super().__init__()
        self.num_tubes = num_tubes
        self.centres = nn.Parameter(torch.randn(num_tubes, width) * width**-0.5)  # C [K, W]
        self.blocks = Transformer(width, TUBE_BLOCKS, heads or default_heads(width))
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)
        self.proj_center = nn.Linear(width, embed_dim)
        nn.init.normal_(self.proj_center.weight, std=PROJ_CENTER_STD)
        nn.init.zeros_(self.proj_center.bias)

    @torch.no_grad()
    def init_from_visual(self, visual: nn.Module) -> None:
        """Local blocks <- the last ``TUBE_BLOCKS`` ViT blocks; ``ln_post`` / ``proj`` <- the ViT's (the published
        init of ``local_visual``)."""
        source = list(visual.blocks)[-TUBE_BLOCKS:]
        if len(source) < TUBE_BLOCKS:
            logger.warning("the ViT has %d blocks; tube blocks %d.. keep their random init", len(source), len(source))
        for target, block in zip(self.blocks.resblocks, source, strict=False):
            target.load_state_dict(block.state_dict())
        self.ln_post.load_state_dict(visual.ln_post.state_dict())
        self.proj.copy_(visual.proj)

    def assignments(self, tap: torch.Tensor) -> torch.Tensor:
        """Centre softmax over each frame's patches ``A [B, T, K, P]`` from ``tap [B, T, 1+P, W]``."""
        logits = torch.einsum("kw,btpw->btkp", self.centres.to(tap.dtype), tap[:, :, 1:])
        return logits.softmax(-1)

    def sequences(self, tap: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The local-transformer inputs ``[B, K, 1+T, W]``: ``[h, g_{k,1} .. g_{k,T}]`` per centre."""
        b, t = tap.shape[:2]
        pooled = torch.einsum("btkp,btpw->bktw", self.assignments(tap), tap[:, :, 1:])  # [B, K, T, W]
        cls = tap[:, :, 0]  # [B, T, W]
        if video_mask is None:
            head = cls.mean(1)
        else:
            weights = (video_mask > 0).to(tap.dtype).unsqueeze(-1)
            head = (cls * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        head = head[:, None, None, :].expand(b, self.num_tubes, 1, tap.shape[-1])
        return torch.cat([head, pooled], dim=2)

    def forward(self, tap: torch.Tensor, video_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tube tokens ``U [B, K, E]`` of ``tap [B, T, 1+P, W]`` (padded frames, ``video_mask == 0``, are hidden)."""
        b, t = tap.shape[:2]
        seq = self.sequences(tap, video_mask).reshape(b * self.num_tubes, 1 + t, tap.shape[-1])
        mask = None
        if video_mask is not None and bool((video_mask == 0).any()):
            visible = torch.cat([torch.ones_like(video_mask[:, :1]), video_mask], dim=1) > 0  # [B, 1+T]
            hidden = torch.zeros(visible.shape, dtype=seq.dtype, device=seq.device).masked_fill(~visible, float("-inf"))
            mask = hidden.repeat_interleave(self.num_tubes, dim=0)[:, None, None, :]
        out = self.blocks(seq, mask)[:, 0]
        return (self.ln_post(out) @ self.proj.to(out.dtype)).reshape(b, self.num_tubes, -1)

    def text_queries(self) -> torch.Tensor:
        """Centres projected to the text space ``Q [K, E]`` (the alignment loss's queries)."""
        return self.proj_center(self.centres.to(self.proj_center.weight.dtype))
