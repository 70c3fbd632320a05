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
