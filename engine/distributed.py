"""Distributed helpers: the only module of the project that calls collectives.

Settings come only from the ``torchrun`` environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``). Every function also works in a plain single process, with or without an initialised process
group, so the same code path runs on a CPU laptop and on N GPUs x M nodes.

Gathered contrastive loss (DESIGN 2.6, stage 1). ``all_gather_with_grad`` returns the global batch; the local slice
keeps its autograd graph and the other ranks' slices are constants. In backward the incoming gradient of the
gathered tensor is **summed over ranks** (``all_reduce``) before the local slice is returned. Contract: every rank
computes the same global loss, averaged over the global batch, from the gathered tensors, and DDP averages parameter
gradients over ranks. Then rank ``r`` receives ``W * dL/dx_r`` (W = world size), DDP divides by W, and the
parameter gradient equals the single-process gradient of the same global batch exactly. The published
``AllGather`` returns the slice without the sum (``reduce_grad=False``); under DDP's averaging its gradients are
the single-process gradients divided by W (equivalent to a W times smaller learning rate, and clipping sees the
smaller norm).

Object collectives exchange JSON (never pickle): objects must be JSON-serialisable (dicts, lists, strings,
numbers, booleans, None).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dataloaders.errors import ConfigError

logger = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RESTART_COUNT_VARIABLE = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun: 0 on the first attempt, k on restart k


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its node, number of processes, its compute device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def elastic_restart_count() -> int:
    """How many times ``torchrun --max-restarts`` has restarted this run's workers (0 outside torchrun)."""
    return int(os.environ.get(RESTART_COUNT_VARIABLE, "0") or 0)


def is_initialized() -> bool:
    """True when a process group is up (world size may still be 1)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the process that logs and writes files (global rank 0)."""
    return get_rank() == 0


def _attempt_store(rank: int, world_size: int) -> dist.Store:
    """The ``env://`` rendezvous store, with its keys namespaced by torchrun's restart count.

    After an elastic restart (``torchrun --max-restarts``) the workers of the new attempt talk through the same
    TCPStore as the failed attempt (the agent keeps it), and the process-group keys of the dead workers are still in
    it. Without a per-attempt namespace, gloo reads the dead workers' addresses and either fails with "Connection
    refused" or waits for them until its timeout (30 min). Older torch versions added exactly this prefix themselves.
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size))
    return dist.PrefixStore(f"membridge/attempt_{elastic_restart_count()}", store)


def init_distributed() -> DistInfo:
    """Join the process group described by the torchrun environment, or run as one process when it is absent.

    NCCL is used when CUDA is available, gloo otherwise; the CUDA device is set from ``LOCAL_RANK``. Calling it again
    after the group is up returns the same information without re-initialising.
    """
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: launch distributed runs with torchrun "
            "(it sets all of RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or unset WORLD_SIZE"
        )
    rank, local_rank, world_size = (int(os.environ[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible: "
                "set torchrun's --nproc_per_node to at most the number of GPUs per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not is_initialized():
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(
            backend=backend, store=_attempt_store(rank, world_size), rank=rank, world_size=world_size
        )
        logger.info("joined process group: backend %s, rank %d/%d, device %s", backend, rank, world_size, device)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup() -> None:
    """Leave the process group if one is up."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if get_world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """The device tensors must live on for the current backend (CUDA for NCCL, CPU for gloo)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_tensor(x: torch.Tensor) -> list[torch.Tensor]:
    """All-gather one tensor of identical shape from every rank (no autograd)."""
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor; backward returns this rank's slice of the (optionally summed) gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, reduce_grad: bool) -> torch.Tensor:
        ctx.rank = get_rank()
        ctx.batch = x.shape[0]
        ctx.reduce_grad = reduce_grad
        return torch.cat(_gather_tensor(x), dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.reduce_grad:
            grad_output = grad_output.contiguous()
            dist.all_reduce(grad_output, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.batch
        return grad_output[start : start + ctx.batch], None


def all_gather_with_grad(x: torch.Tensor, reduce_grad: bool = True) -> torch.Tensor:
    """Gather ``x [b, ...]`` from every rank into ``[W*b, ...]`` in rank order, keeping the local slice's graph.

    Every rank must pass the same ``b`` (use ``drop_last`` in training). See the module docstring for the gradient
    contract; ``reduce_grad=False`` reproduces the published ``AllGather`` (no sum over ranks). With one process the
    input is returned unchanged.
    """
    if get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x, reduce_grad)


def all_gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x [b, ...]`` of every rank in rank order, without autograd (same ``b`` on every rank)."""
    if get_world_size() == 1:
        return x
    return torch.cat(_gather_tensor(x.detach()), dim=0)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks, as a new detached tensor on ``t``'s device (a copy with one process)."""
    out = t.detach().clone()
    if get_world_size() == 1:
        return out
    buf = out.to(_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return (buf / get_world_size()).to(t.device)


def _encode(obj: Any) -> torch.Tensor:
    """JSON-encode ``obj`` into a uint8 tensor on the communication device."""
    data = json.dumps(obj).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(_comm_device())


def _decode(buf: torch.Tensor) -> Any:
    """Inverse of :func:`_encode`."""
    return json.loads(bytes(buf.cpu().tolist()).decode("utf-8"))


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``obj``, in rank order, on every rank."""
    if get_world_size() == 1:
        return [json.loads(json.dumps(obj))]
    payload = _encode(obj)
    sizes = _gather_tensor(torch.tensor([payload.numel()], device=payload.device))
    longest = int(max(int(s.item()) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=payload.device)
    padded[: payload.numel()] = payload
    parts = _gather_tensor(padded)
    return [_decode(part[: int(size.item())]) for part, size in zip(parts, sizes, strict=True)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The JSON-serialisable ``obj`` of rank ``src``, returned on every rank (other ranks' ``obj`` is ignored)."""
    if get_world_size() == 1:
        return json.loads(json.dumps(obj))
    payload = _encode(obj) if get_rank() == src else torch.empty(0, dtype=torch.uint8, device=_comm_device())
    size = torch.tensor([payload.numel()], device=payload.device)
    dist.broadcast(size, src=src)
    if get_rank() != src:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=payload.device)
    dist.broadcast(payload, src=src)
    return _decode(payload)


def shard_indices(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` evaluates.

    Blocks cover every index exactly once, in order, and differ in length by at most one (the first ``n % W``
    ranks take one more). No index is padded or repeated, so nothing is counted twice; a rank may get an empty
    block when ``n < W``.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def gather_eval_rows(rows: torch.Tensor, indices: Sequence[int], n: int) -> torch.Tensor:
    """Reassemble per-rank evaluation rows into one ``[n, ...]`` tensor in the original order, on every rank.

    ``rows[i]`` is the result for dataset item ``indices[i]`` on this rank (e.g. from :func:`shard_indices`).
    Ranks may hold different numbers of rows (zero included) but the same trailing shape and dtype. Every index in
    ``range(n)`` must be supplied exactly once over all ranks. The result lives on ``rows``' device.
    """
    if rows.shape[0] != len(indices):
        raise ValueError(f"{rows.shape[0]} rows but {len(indices)} indices")
    index = torch.as_tensor(list(indices), dtype=torch.long)
    if get_world_size() == 1:
        all_rows, all_index = rows, index.to(rows.device)
    else:
        device = _comm_device()
        counts = [int(c.item()) for c in _gather_tensor(torch.tensor([rows.shape[0]], device=device))]
        longest = max(counts)
        padded_rows = rows.new_zeros((longest, *rows.shape[1:]), device=device)
        padded_rows[: rows.shape[0]] = rows.to(device)
        padded_index = torch.full((longest,), -1, dtype=torch.long, device=device)
        padded_index[: rows.shape[0]] = index.to(device)
        row_parts, index_parts = _gather_tensor(padded_rows), _gather_tensor(padded_index)
        all_rows = torch.cat([part[:count] for part, count in zip(row_parts, counts, strict=True)]).to(rows.device)
        all_index = torch.cat([part[:count] for part, count in zip(index_parts, counts, strict=True)]).to(rows.device)
    if all_index.numel() and (int(all_index.min()) < 0 or int(all_index.max()) >= n):
        raise ValueError(f"evaluation indices must lie in [0, {n}), got {all_index.min()}..{all_index.max()}")
    seen = torch.bincount(all_index.cpu(), minlength=n)
    if not bool((seen == 1).all()):
        missing = (seen == 0).nonzero().flatten()[:10].tolist()
        repeated = (seen > 1).nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"each of the {n} evaluation rows must come exactly once: missing {missing}, repeated {repeated}"
        )
    out = rows.new_empty((n, *rows.shape[1:]))
    out[all_index] = all_rows
    return out
