"""Data loaders for training (distributed, resumable mid-epoch) and sharded evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from engine.distributed import shard_indices

# Offset mixing the epoch into the loader's generator seed (its draws never touch the global RNG, so a resumed
# run consumes the global RNG exactly as an uninterrupted one).
_LOADER_SEED_STRIDE = 1_000_003


class ResumableDistributedSampler(Sampler[int]):
    """``DistributedSampler`` semantics (seeded shuffle per epoch, ``drop_last``) that can start mid-epoch.

    Every rank sees ``num_samples = len(dataset) // world_size`` indices per epoch, rank r taking positions
    ``r, r + world, ...`` of the epoch's permutation. ``set_start(k)`` skips the first k of this rank's indices,
    which is how a resumed run continues exactly where it stopped.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.num_samples = len(dataset) // num_replicas  # type: ignore[arg-type]
        if self.num_samples == 0:
            raise ValueError(f"dataset of {len(dataset)} samples is smaller than the world size {num_replicas}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def epoch_indices(self) -> list[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        order = order[: self.num_samples * self.num_replicas]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_train_loader(
    dataset: Dataset,
    micro_batch: int,
    num_workers: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int = 0,
    start_sample: int = 0,
    pin_memory: bool = False,
    collate_fn=None,
) -> DataLoader:
    """A loader over this rank's share of one epoch, starting at ``start_sample`` of that share."""
    sampler = ResumableDistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    sampler.set_start(start_sample)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    generator = torch.Generator()
    generator.manual_seed(seed * _LOADER_SEED_STRIDE + epoch)
    return DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        generator=generator,
        persistent_workers=False,
    )


def batches_per_epoch(dataset_len: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches one rank runs per epoch (``drop_last`` on both the sampler and the loader)."""
    return (dataset_len // world_size) // micro_batch


def build_eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int, rank: int, world_size: int, collate_fn=None
) -> tuple[DataLoader, range]:
    """This rank's contiguous shard of an evaluation set, and the indices it covers."""
    indices = shard_indices(len(dataset), rank, world_size)  # type: ignore[arg-type]
    loader = DataLoader(
        Subset(dataset, list(indices)),
        batch_size=max(1, batch_size),
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(0),  # worker seeds never consume the global (checkpointed) RNG
    )
    return loader, indices
