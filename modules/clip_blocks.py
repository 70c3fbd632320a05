"""Transformer building blocks with OpenAI CLIP's parameter names and numerics.

Every block keeps OpenAI's state-dict key layout (``attn.in_proj_weight``, ``ln_1``, ``mlp.c_fc``, ...), so a
released ``ViT-B-16.pt`` state dict loads without renaming, and the fusion encoder can be initialised by copying
CLIP text blocks. Tensors are batch-first throughout: ``x [B, N, C]``.

Attention masks are *additive* float masks broadcastable to ``[B, H, N, N]`` (0 = visible, ``-inf`` or a large
negative number = hidden). A per-sample mask has shape ``[B, 1, N, N]`` and is broadcast over heads, which is the
same as expanding it batch-major over heads as ``nn.MultiheadAttention`` requires.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (as OpenAI CLIP does for fp16 weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        ret = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return ret.to(orig_type)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter names, batch-first, additive masks."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        if q.dtype in LOW_PRECISION and q.device.type == "cpu" and torch.is_grad_enabled():
            out = explicit_attention(q, k, v, attn_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` as two batched matmuls around an fp32 softmax.

    Used for bf16/fp16 training on CPU only: there torch's fused SDPA kernel has a slow backward (ViT-B/16, 24
    images x 12 heads x 197 tokens, forward + backward on the 2-core dev CPU: 118 ms fused, 147 ms SDPA's math
    backend (it upcasts everything to fp32), 45 ms this), while the two matmuls run on the CPU's bf16 units. The
    softmax is taken in fp32 (as the fused kernel accumulates), so only the two matmuls round to the low precision.
    fp32 and inference keep ``F.scaled_dot_product_attention`` (faster there: 84 vs 118 ms fp32).
    """
    scores = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    if attn_mask is not None:
        scores = scores + attn_mask
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, hidden)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(hidden, width))]
            )
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of blocks (``resblocks.{i}``), each optionally with its own mask."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


def causal_mask(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive ``[N, N]`` mask: position i sees positions <= i."""
    return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu_(1)


def default_heads(width: int) -> int:
    """OpenAI's rule: one head per 64 channels."""
    return max(1, width // 64)
