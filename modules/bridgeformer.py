"""MCQ's BridgeFormer on the CLIP dual encoder (the training-only third module of ``--stage1_objective mcq``).

MCQ (Ge et al., CVPR 2022, ``TencentARC/MCQ``) erases a noun or verb phrase from a caption (the *question*) and trains
a BridgeFormer, which lets the question's text states attend to the video's patch tokens layer by layer, to produce a
"bridge" embedding that matches the text embedding of the erased phrase (the *answer*). At test time it is dropped.

The official code was released only for the DistilBERT + ViT variant; **how MCQ-CLIP attached the BridgeFormer to CLIP
was never released** (TencentARC/MCQ issues #5 and #14). This module follows the official bridge block by block
(spec MCQ_HMMC.md §A.6) with these CLIP-specific design choices (§C.3), which are ours, not the authors':

- **one bridge block per ViT block** (``layers = vision_layers``); block ``l`` reads the *input* tokens of ViT block
  ``l`` (patches only: every frame's CLS token is dropped, as MCQ drops its video CLS) through its own ``norm4``;
- **widths**: the bridge runs at the vision width ``W``; questions (CLIP text width ``Wt``) enter through
  ``crossattn.q_question = Linear(Wt -> W)``, keys/values through ``crossattn.kv_video = Linear(W -> 2W)``; the output
  is ``bridge_proj(norm2(bridge)[:, 0])`` in the joint embedding space (``embed_dim``), matched against the CLIP text
  feature (EOT @ ``text_projection``) of the answer, so no extra answer projection exists;
- **question states per block** (``layer_map``): ``half`` (default, MCQ's rule for 12 ViT blocks over 6 DistilBERT
  layers) gives block ``l`` the text state ``l // 2`` (index 0 = the embedding output; the last text layers may never
  reach the bridge, as in MCQ); ``same`` gives ``min(l, text_layers)``;
- **global query** (``global_query``): CLIP's text tower is causal, so its first token (SOT) has the same state for
  every text. ``eot`` (default) takes the EOT state as the bridge "CLS" query and the other ``L - 1`` positions as the
  per-frame queries; ``first`` is MCQ's literal index 0 (then positions ``1..L-1``);
- **masks** (the "divided space" pattern of MCQ, one helper for both attentions): in cross-attention the global query
  attends to the patches of every *real* frame and each frame's copy of the other queries attends to that frame's
  patches (question padding is not applied there, as in MCQ: outputs at valid positions do not depend on it); in the
  bridge self-attention the bridge CLS attends to all bridge tokens and a frame-``t`` token to ``[bridge CLS; frame t
  tokens]``, with padded question positions **and padded frames** hidden as keys by ``-inf``-style masking (MCQ adds
  ``-10000`` and has no frame mask: ``frame_mask=False``, selected by ``--official_quirks``, attends padded frames);
- **init**: MCQ's 1-frame init for the whole bridge (the README says MCQ-CLIP used a random BridgeFormer):
  trunc-normal(0.02) Linear weights, zero biases, LayerNorm 1/0; LayerNorm eps 1e-6 and erf-GELU as in MCQ.

Parameter names follow MCQ (``crossattn.{q_question, kv_video, proj}``, ``bridgeattn.{qkv, proj}``,
``bridge_mlp.{fc1, fc2}``, ``norm4..norm7`` without ``norm3``, final ``norm2`` and ``bridge_proj``) under
``blocks.{l}``.
Shapes: ``B`` batch, ``T`` frames, ``P`` patches per frame, ``L`` question length, ``M = L - 1`` per-frame queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dataloaders.errors import ConfigError
from modules.clip_blocks import LayerNorm, causal_mask
from modules.clip_model import CLIP

LAYER_MAPS = ("half", "same")
GLOBAL_QUERIES = ("eot", "first")
INIT_STD = 0.02
LN_EPS = 1e-6


@dataclass
class BridgeFormerConfig:
    """Sizes and choices of a BridgeFormer (see the module docstring)."""

    width: int  # vision width W (the bridge stream)
    text_width: int  # question state width Wt
    heads: int
    layers: int  # bridge blocks = ViT blocks
    text_layers: int  # CLIP text blocks (question states: text_layers + 1)
    embed_dim: int
    layer_map: str = "half"
    global_query: str = "eot"
    mlp_ratio: float = 4.0
    frame_mask: bool = True  # False (--official_quirks): padded frames are attended as real ones, as in MCQ

    def __post_init__(self) -> None:
        if self.layer_map not in LAYER_MAPS:
            raise ConfigError(f"--bridge_text_layer_map {self.layer_map!r} must be one of {LAYER_MAPS}")
        if self.global_query not in GLOBAL_QUERIES:
            raise ConfigError(f"--bridge_global_query {self.global_query!r} must be one of {GLOBAL_QUERIES}")
        if self.width % self.heads:
            raise ConfigError(f"bridge width {self.width} is not divisible by {self.heads} heads")

    @classmethod
    def for_clip(
        cls, clip: CLIP, layer_map: str = "half", global_query: str = "eot", frame_mask: bool = True
    ) -> BridgeFormerConfig:
        c = clip.config
        return cls(
            width=c.vision_width, text_width=c.transformer_width, heads=c.vision_heads, layers=c.vision_layers,
            text_layers=c.transformer_layers, embed_dim=c.embed_dim, layer_map=layer_map, global_query=global_query,
            frame_mask=frame_mask,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)

    def text_state_index(self, block: int) -> int:
        """Which question state (0 = embedding output, ``i`` = after text block ``i``) feeds bridge block ``block``."""
        return min(block // 2 if self.layer_map == "half" else block, self.text_layers)


# ----------------------------------------------------------------------------------------------- masks


def divided_attention_allowed(frames: int, per_frame: int, key_valid: torch.Tensor) -> torch.Tensor:
    """MCQ's "divided space" self-attention pattern as a boolean ``[B, N, N]`` (True = query row may attend).

    The sequence is ``[CLS | frame 1's per_frame tokens | frame 2's | ...]`` (``N = 1 + frames * per_frame``). The
    CLS attends to every token; a frame-``t`` token attends to ``[CLS; frame t's tokens]``. ``key_valid [B, N]``
    (1 = real) hides keys in every row (the CLS key must be real).
    """
    n = 1 + frames * per_frame
    if key_valid.shape[-1] != n:
        raise ValueError(f"key_valid has {key_valid.shape[-1]} positions, expected 1 + {frames} x {per_frame}")
    frame_of = torch.cat(
        [
            torch.full((1,), -1, device=key_valid.device),
            torch.arange(frames, device=key_valid.device).repeat_interleave(per_frame),
        ]
    )
    same_frame = frame_of[:, None] == frame_of[None, :]
    allowed = same_frame | (frame_of[:, None] == -1) | (frame_of[None, :] == -1)
    return allowed[None] & (key_valid[:, None, :] > 0)


def global_query_keys(frame_valid: torch.Tensor, patches: int) -> torch.Tensor:
    """Boolean ``[B, frames * patches]``: the patches the global query attends to, those of every real frame
    (``frame_valid [B, frames]``; every frame when none is real). The per-frame queries of frame ``t`` attend to all
    of frame ``t``'s patches (computed frame by frame, no mask)."""
    real = frame_valid > 0
    real = torch.where(real.any(dim=1, keepdim=True), real, torch.ones_like(real))
    return real.repeat_interleave(patches, dim=1)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``[B, Nq, Nk]`` -> additive ``[B, 1, Nq, Nk]`` (0 visible, the dtype's minimum hidden)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


# ----------------------------------------------------------------------------------------------- questions


def question_layer_states(clip: CLIP, text_ids: torch.Tensor) -> list[torch.Tensor]:
    """The causal CLIP text tower's states ``[B, L, Wt]``: the embedding output, then after each text block
    (``text_layers + 1`` tensors; the same maths as ``CLIP.encode_text_tokens`` before ``ln_final``)."""
    n = text_ids.shape[1]
    if n > clip.config.context_length:
        raise ConfigError(f"question of {n} tokens exceeds the CLIP context length {clip.config.context_length}")
    x = clip.token_embedding(text_ids).to(clip.dtype) + clip.positional_embedding[:n].to(clip.dtype)
    mask = causal_mask(n, device=text_ids.device)
    states = [x]
    for block in clip.transformer.resblocks:
        x = block(x, mask)
        states.append(x)
    return states


def query_positions(text_ids: torch.Tensor, text_mask: torch.Tensor, global_query: str):
    """``(global_pos [B], frame_pos [B, L-1], frame_mask [B, L-1])``: which question position is the global query
    (``eot``: the EOT, i.e. the largest id; ``first``: 0) and which ``L - 1`` positions are the per-frame queries
    (all others, in order) with their padding mask."""
    b, n = text_ids.shape
    steps = torch.arange(n - 1, device=text_ids.device)[None].expand(b, -1)
    if global_query == "eot":
        global_pos = text_ids.argmax(dim=-1)
    else:
        global_pos = torch.zeros(b, dtype=torch.long, device=text_ids.device)
    frame_pos = steps + (steps >= global_pos[:, None]).long()
    return global_pos, frame_pos, torch.gather(text_mask, 1, frame_pos)


# ----------------------------------------------------------------------------------------------- blocks


class CrossAttention(nn.Module):
    """Queries from the question, keys/values from the video patches (MCQ's ``crossattn``)."""

    def __init__(self, width: int, text_width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_question = nn.Linear(text_width, width)
        self.kv_video = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        return x.reshape(n, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, global_query: torch.Tensor, frame_queries: torch.Tensor, video: torch.Tensor,
                global_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """``global_query [B, 1, Wt]``, ``frame_queries [B, M, Wt]``, ``video [B, T, P, W]``, additive
        ``global_mask [B, 1, 1, T*P]`` -> ``[B, 1 + T*M, W]``: the global query over every real frame's patches,
        then frame by frame (frame-major) the ``M`` queries over that frame's patches."""
        b, frames, patches, width = video.shape
        m = frame_queries.shape[1]
        k, v = self.kv_video(video).chunk(2, dim=-1)  # [B, T, P, W]
        q_global = self._heads(self.q_question(global_query))
        k_all, v_all = (self._heads(t.reshape(b, frames * patches, width)) for t in (k, v))
        out_global = F.scaled_dot_product_attention(q_global, k_all, v_all, attn_mask=global_mask.to(q_global.dtype))
        q_frames = self.q_question(frame_queries)[:, None].expand(b, frames, m, width).reshape(b * frames, m, width)
        k_frames, v_frames = (self._heads(t.reshape(b * frames, patches, width)) for t in (k, v))
        out_frames = F.scaled_dot_product_attention(self._heads(q_frames), k_frames, v_frames)
        out_global = out_global.transpose(1, 2).reshape(b, 1, width)
        out_frames = out_frames.transpose(1, 2).reshape(b, frames * m, width)
        return self.proj(torch.cat([out_global, out_frames], dim=1))


class SelfAttention(nn.Module):
    """Masked self-attention of the bridge stream (MCQ's ``bridgeattn``: ``qkv``, ``proj``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, width))


class BridgeMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class BridgeBlock(nn.Module):
    """One bridge block (MCQ ``Video_Bridge_Block``'s bridge branch)."""

    def __init__(self, config: BridgeFormerConfig):
        super().__init__()
        w = config.width
        self.norm4 = LayerNorm(w, eps=LN_EPS)
        self.norm5 = LayerNorm(config.text_width, eps=LN_EPS)
        self.crossattn = CrossAttention(w, config.text_width, config.heads)
        self.norm7 = LayerNorm(w, eps=LN_EPS)
        self.bridgeattn = SelfAttention(w, config.heads)
        self.norm6 = LayerNorm(w, eps=LN_EPS)
        self.bridge_mlp = BridgeMLP(w, int(w * config.mlp_ratio))

    def forward(
        self,
        bridge: torch.Tensor | None,
        global_query: torch.Tensor,
        frame_queries: torch.Tensor,
        video: torch.Tensor,
        global_mask: torch.Tensor,
        self_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``bridge [B, N, W]`` (None in the first block; ``N = 1 + T*M``), question states ``global_query
        [B, 1, Wt]`` and ``frame_queries [B, M, Wt]``, ``video [B, T, P, W]`` (this ViT block's input patches) -> the
        new bridge stream ``[B, N, W]``."""
        t = self.crossattn(self.norm5(global_query), self.norm5(frame_queries), self.norm4(video), global_mask)
        if bridge is not None:
            t = t + bridge
        r = t + self.bridgeattn(self.norm7(t), self_mask)
        return r + self.bridge_mlp(self.norm6(r))


class BridgeFormer(nn.Module):
    """Bridge blocks over the ViT layers, final ``norm2`` and ``bridge_proj`` (see the module docstring)."""

    def __init__(self, config: BridgeFormerConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList([BridgeBlock(config) for _ in range(config.layers)])
        self.norm2 = LayerNorm(config.width, eps=LN_EPS)
        self.bridge_proj = nn.Linear(config.width, config.embed_dim)
        self.apply(_init_weights)

    def forward(
        self,
        video_layers: Sequence[torch.Tensor],
        video_mask: torch.Tensor,
        question_states: Sequence[torch.Tensor],
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Bridge embedding ``[B, embed_dim]`` (unnormalised).

        ``video_layers``: per ViT block its input tokens ``[B, T, 1+P, W]`` (frame CLS first, dropped here);
        ``video_mask [B, T]``; ``question_states``: :func:`question_layer_states` of ``question_ids [B, L]``;
        ``question_mask [B, L]`` (1 = real token).
        """
        c = self.config
        if len(video_layers) != c.layers:
            raise ValueError(f"BridgeFormer has {c.layers} blocks but got {len(video_layers)} video layers")
        if len(question_states) != c.text_layers + 1:
            raise ValueError(f"expected {c.text_layers + 1} question states, got {len(question_states)}")
        b, frames, tokens, _ = video_layers[0].shape
        patches = tokens - 1
        global_pos, frame_pos, frame_query_mask = query_positions(question_ids, question_mask, c.global_query)
        per_frame = frame_pos.shape[1]
        dtype = video_layers[0].dtype
        if not c.frame_mask:
            video_mask = torch.ones_like(video_mask)
        global_mask = additive(global_query_keys(video_mask, patches)[:, None, :], dtype)  # [B, 1, 1, T*P]
        key_valid = (frame_query_mask[:, None, :] * (video_mask[:, :, None] > 0)).reshape(b, frames * per_frame)
        key_valid = torch.cat([torch.ones_like(key_valid[:, :1]), key_valid], dim=1)
        self_mask = additive(divided_attention_allowed(frames, per_frame, key_valid), dtype)
        rows = torch.arange(b, device=question_ids.device)
        bridge = None
        for index, block in enumerate(self.blocks):
            states = question_states[c.text_state_index(index)]
            global_query = states[rows, global_pos][:, None]  # [B, 1, Wt]
            frame_queries = torch.gather(states, 1, frame_pos[..., None].expand(-1, -1, states.shape[-1]))
            video = video_layers[index][:, :, 1:]
            bridge = block(bridge, global_query, frame_queries, video, global_mask, self_mask)
        return self.bridge_proj(self.norm2(bridge)[:, 0])


def _init_weights(module: nn.Module) -> None:
    """MCQ's ``_init_weights``: trunc-normal(0.02) Linear weights, zero biases, LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
