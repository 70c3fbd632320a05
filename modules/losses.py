"""Contrastive objective of stage 1 and retrieval fine-tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(sim: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of a square text-video logit matrix ``[B, B]`` whose diagonal holds the positive pairs.

    The mean of the cross-entropy over rows (text -> video) and over columns (video -> text), as CLIP4Clip's
    ``(CrossEn(sim) + CrossEn(sim.T)) / 2``. For a global batch, pass the full gathered ``[B_global, B_global]`` matrix.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"contrastive_loss needs a square [B, B] similarity matrix, got {tuple(sim.shape)}")
    target = torch.arange(sim.shape[0], device=sim.device)
    sim = sim.float()
    return (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2


DEFAULT_NORM_SOFTMAX_TEMPERATURE = 0.05
"""MCQ's ``NormSoftmaxLoss`` temperature (scale 20), fixed, not learned."""


def cosine_matrix(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """MCQ's ``sim_matrix``: cosine similarities ``[Na, Nb]``, each row divided by ``max(||row||, eps)``."""
    a = a.float() / a.float().norm(dim=-1, keepdim=True).clamp(min=eps)
    b = b.float() / b.float().norm(dim=-1, keepdim=True).clamp(min=eps)
    return a @ b.t()


def norm_softmax_loss(sim: torch.Tensor, temperature: float = DEFAULT_NORM_SOFTMAX_TEMPERATURE) -> torch.Tensor:
    """MCQ's ``NormSoftmaxLoss`` of a square cosine matrix ``[N, N]`` (rows: text / answer; diagonal = positives).

    ``-mean_i log_softmax(sim / T)[i, i] - mean_j log_softmax(sim.T / T)[j, j]``: the **sum** of the two directions
    (not their mean, unlike :func:`contrastive_loss`) at a fixed temperature ``T``. For the global batch pass the
    gathered matrix.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"norm_softmax_loss needs a square [N, N] similarity matrix, got {tuple(sim.shape)}")
    if not temperature > 0:
        raise ValueError(f"norm_softmax_loss needs a temperature > 0, got {temperature}")
    logits = sim.float() / temperature
    rows = torch.diagonal(F.log_softmax(logits, dim=1))
    cols = torch.diagonal(F.log_softmax(logits.t(), dim=1))
    return -rows.mean() - cols.mean()


DEFAULT_MOCO_TEMPERATURE = 0.07
"""HMMC's ``--contrast_temperature``."""


def moco_infonce(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float = DEFAULT_MOCO_TEMPERATURE,
    reduction: str = "mean",
) -> torch.Tensor:  # fmt: skip
    """HMMC's MoCo InfoNCE ``C(q, k, Q)`` (MCQ_HMMC.md §B.6): ``q [N, D]`` against its paired key ``k [N, D]`` and the
    queued negatives ``Q [K, D]`` (rows, already unit length): logits ``[q·k | q·Q] / T`` with q, k normalised,
    cross-entropy with target 0. There are no in-batch negatives. ``reduction``: ``mean`` or ``none`` (``[N]``)."""
    if not temperature > 0:
        raise ValueError(f"moco_infonce needs a temperature > 0, got {temperature}")
    q = F.normalize(query.float(), dim=-1)
    k = F.normalize(key.float(), dim=-1)
    positive = (q * k).sum(dim=-1, keepdim=True)
    logits = torch.cat([positive, q @ queue.float().t()], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target, reduction=reduction)
