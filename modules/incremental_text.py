"""Incremental (key/value-cached) forward of CLIP's causal text encoder, for token-by-token caption decoding.

Autoregressive decoding appends one token per step. Re-encoding the whole prefix each step costs O(t) block passes
per token; with a cache of every layer's keys and values, a step runs the blocks on the new positions only and
attends to the cached prefix. The result is :meth:`CLIP.encode_text_tokens`'s output (to float tolerance): the
encoder is causal, so the features of the cached positions never change when tokens are appended.

Each step can also run a *probe*: a token (EOT) placed after the new one, which sees the cached prefix, the new
token and itself, but whose keys and values are not cached. It gives the feature of ``[SOT, w1 .. wi, EOT]`` at
the EOT position without a second pass, which is the memory query of the fusion's prefix LM (DESIGN 2.6).

Shapes: ``N`` rows (videos x beams), ``t`` cached positions, ``H`` heads, ``Dh`` head width, ``D`` embed dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dataloaders.errors import ConfigError
from modules.clip_blocks import ResidualAttentionBlock
from modules.clip_model import CLIP


@dataclass(frozen=True)
class TextKVCache:
    """Per-layer keys and values ``[N, H, t, Dh]`` of the ``t`` positions encoded so far."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        """Cached positions ``t`` (the position id of the next token)."""
        return self.keys[0].shape[2]

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @classmethod
    def empty(cls, clip: CLIP, rows: int, device: torch.device | str | None = None) -> TextKVCache:
        """A cache of ``rows`` rows holding no position yet."""
        heads = clip.config.transformer_heads
        width = clip.transformer.width
        shape = (rows, heads, 0, width // heads)
        device = clip.positional_embedding.device if device is None else device
        tensors = tuple(torch.zeros(shape, dtype=clip.dtype, device=device) for _ in clip.transformer.resblocks)
        return cls(tensors, tensors)

    def index_select(self, index: torch.Tensor) -> TextKVCache:
        """Rows ``index`` (long ``[N']``, repeats allowed), like ``tensor[index]``: follows beams, drops rows."""
        return TextKVCache(tuple(k[index] for k in self.keys), tuple(v[index] for v in self.values))


def _block_step(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    attn_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pre-LN block on the new positions ``x [N, n, W]`` attending to the cache plus themselves.

    Returns ``(x_out [N, n, W], keys [N, H, t+n, Dh], values [N, H, t+n, Dh])`` (the cache plus the new positions).
    """
    attn = block.attn
    rows, n, width = x.shape
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(rows, n, attn.heads, width // attn.heads).transpose(1, 2) for t in (q, k, v))
    keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask)
    x = x + attn.out_proj(out.transpose(1, 2).reshape(rows, n, width))
    return x + block.mlp(block.ln_2(x)), keys, values


def extend_text_cache(
    clip: CLIP, cache: TextKVCache, token_ids: torch.Tensor, probe_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, TextKVCache]:
    """Encode one new token per row at position ``cache.length``, and optionally a probe after it.

    ``token_ids`` long ``[N]``. Returns ``(token_feats [N, D], probe_feats [N, D] or None, new_cache)``:
    ``token_feats`` equals ``encode_text_tokens(prefix + [token])[:, -1]``; ``probe_feats`` equals
    ``encode_text_tokens(prefix + [token, probe_id])[:, -1]``. Only the new token enters the returned cache.
    """
    start = cache.length
    n_new = 1 if probe_id is None else 2
    if start + n_new > clip.config.context_length:
        raise ConfigError(
            f"incremental text encoding past the CLIP context length {clip.config.context_length}: lower --max_words"
        )
    ids = token_ids.reshape(-1, 1)
    if probe_id is not None:
        ids = torch.cat([ids, torch.full_like(ids, probe_id)], dim=1)
    positions = torch.arange(start, start + n_new, device=ids.device)
    x = clip.token_embedding(ids).to(clip.dtype) + clip.positional_embedding[positions].to(clip.dtype)
    mask = None
    if probe_id is not None:  # the new token must not see the probe after it; the probe sees everything
        mask = torch.zeros(n_new, start + n_new, dtype=x.dtype, device=x.device)
        mask[0, start + 1] = float("-inf")
    keys, values = [], []
    for block, past_k, past_v in zip(clip.transformer.resblocks, cache.keys, cache.values, strict=True):
        x, layer_keys, layer_values = _block_step(block, x, past_k, past_v, mask)
        keys.append(layer_keys[:, :, : start + 1])  # a view without the probe: no second copy of the cache
        values.append(layer_values[:, :, : start + 1])
    feats = clip.ln_final(x) @ clip.text_projection
    probe = feats[:, 1] if probe_id is not None else None
    return feats[:, 0], probe, TextKVCache(tuple(keys), tuple(values))
