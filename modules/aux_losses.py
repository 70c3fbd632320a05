"""Auxiliary losses of the sibling methods (``--method``): T2VLP's local alignment.

``local_alignment`` (spec A.3): text queries ``Q [K, E]`` attend over every valid text position ``Z [B, L, E]``
(SOT and EOT included, padding hidden), ``text_center_k = softmax_L(Q_k Z^T) Z``, and the loss is the plain mean
squared error between the text centres and the tube tokens ``U [B, K, E]`` (no normalisation, no temperature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_centres(queries: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """``[B, K, E]``: each query's softmax-weighted mean of the valid text positions."""
    scores = torch.einsum("ke,ble->bkl", queries.to(text_tokens.dtype), text_tokens)
    scores = scores.masked_fill((text_mask == 0).unsqueeze(1), float("-inf"))
    return scores.softmax(-1) @ text_tokens


def local_alignment(
    queries: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor, tubes: torch.Tensor
) -> torch.Tensor:
    """MSE between :func:`text_centres` and the tube tokens ``tubes [B, K, E]`` (mean over all elements)."""
    return F.mse_loss(text_centres(queries, text_tokens, text_mask).float(), tubes.float())
