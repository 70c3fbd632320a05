"""MoCo-style momentum encoders and feature queues (HMMC, MCQ_HMMC.md §B.5, §C.4).

- :class:`MomentumCopy` holds a frozen deep copy of a module; ``update(online, m)`` does ``θ_k ← m·θ_k + (1−m)·θ``
  over the parameters (computed in fp32, also for fp16 weights). Buffers (BatchNorm running statistics) are not
  copied by the update: the copy's own forward passes keep them, as in the official code.
- :class:`FeatureQueue` is a ring of L2-normalised keys held in *buffers* (``queue`` and ``ptr``), so checkpoints
  save them and a resume restores them exactly. ``enqueue(keys)`` gathers the keys of every rank (rank order, no
  gradient), normalises them and writes the global batch at the pointer; the pointer advances by the global batch and
  wraps modulo the queue size. Writing wraps around the end too (the official code writes ``[ptr, ptr+B)`` and needs
  the size to be a multiple of the global batch, B.14 item 6; ``strict_divisible=True`` keeps that rule as a
  ``ConfigError``). A queue with ``slots_per_item = T`` (per-frame keys) stores item ``i``'s keys at rows
  ``i·T .. i·T+T−1`` (sample-major, as HMMC's frame queues of ``K·T`` columns indexed by a pointer that counts items).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dataloaders.errors import ConfigError

logger = logging.getLogger(__name__)


class MomentumCopy(nn.Module):
    """A frozen copy (``self.module``) of ``online`` that follows it by exponential moving average."""

    def __init__(self, online: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(online)
        for param in self.module.parameters():
            param.requires_grad_(False)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        """``θ_k ← m·θ_k + (1−m)·θ`` for every parameter pair (same order as ``online.parameters()``)."""
        pairs = list(zip(self.module.parameters(), online.parameters(), strict=True))
        fp32 = [(k, q) for k, q in pairs if k.dtype == torch.float32 and q.dtype == torch.float32]
        if fp32:
            keys = [k for k, _ in fp32]
            torch._foreach_mul_(keys, momentum)
            torch._foreach_add_(keys, [q.detach() for _, q in fp32], alpha=1.0 - momentum)
        for k, q in pairs:
            if k.dtype == torch.float32 and q.dtype == torch.float32:
                continue
            k.copy_(k.float().mul_(momentum).add_(q.detach().float(), alpha=1.0 - momentum))


class FeatureQueue(nn.Module):
    """A ring of ``size`` items, each ``slots_per_item`` L2-normalised ``dim``-vectors (rows of ``queue``)."""

    def __init__(self, dim: int, size: int, slots_per_item: int = 1, strict_divisible: bool = False):
        super().__init__()
        if size < 1 or slots_per_item < 1:
            raise ConfigError(f"a feature queue needs size >= 1 and slots >= 1 (got {size}, {slots_per_item})")
        self.size = size
        self.slots = slots_per_item
        self.strict_divisible = strict_divisible
        self.register_buffer("queue", F.normalize(torch.randn(size * slots_per_item, dim), dim=-1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    def entries(self) -> torch.Tensor:
        """The queued keys ``[size·slots, dim]`` (a copy: the losses use it while the queue is overwritten)."""
        return self.queue.clone()

    def check_batch(self, global_batch: int) -> None:
        """``ConfigError`` unless a global batch of ``global_batch`` items fits the queue (and divides it when
        ``strict_divisible``)."""
        if global_batch > self.size:
            raise ConfigError(
                f"--contrast_num_negative {self.size} is smaller than the global batch {global_batch}: a batch "
                "would overwrite its own keys; raise --contrast_num_negative or lower --batch_size"
            )
        if self.strict_divisible and self.size % global_batch:
            raise ConfigError(
                f"--contrast_num_negative {self.size} is not a multiple of the global batch {global_batch} "
                "(--official_quirks writes whole batches without wrap-around, as HMMC): change either"
            )

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Gather ``keys [b, dim]`` (or ``[b, slots, dim]``) over ranks with ``gather`` (the caller's all-gather in
        rank order; None: one process), normalise, write at ``ptr``, advance it."""
        keys = keys.detach()
        if keys.dim() == 2:
            keys = keys[:, None]
        if keys.shape[1] != self.slots:
            raise ValueError(f"keys have {keys.shape[1]} slots per item, the queue {self.slots}")
        if gather is not None:
            keys = gather(keys.contiguous())
        n = keys.shape[0]
        self.check_batch(n)
        rows = F.normalize(keys.float(), dim=-1).reshape(n * self.slots, -1).to(self.queue.dtype)
        start = int(self.ptr) * self.slots
        index = (start + torch.arange(n * self.slots, device=self.queue.device)) % self.queue.shape[0]
        self.queue.index_copy_(0, index, rows)
        self.ptr.fill_((int(self.ptr) + n) % self.size)
