"""Data loaders for training (distributed, resumable mid-epoch) and sharded evaluation, and the sharded encoding of
a set of videos that retrieval evaluation and the visual-feature cache share."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from dataloaders.errors import DataError
from engine.distributed import DistInfo, all_gather_object, gather_eval_rows, shard_indices
from engine.metrics import DEFAULT_V2T_PROTOCOL

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------ encoding a video set


def first_readable(videos: Dataset, what: str) -> dict:
    """The first item of ``videos`` that can be read (its shapes stand in for unreadable ones); ``what`` names the
    set and the flag to check in the error when none can be read."""
    for i in range(len(videos)):  # type: ignore[arg-type]
        try:
            return videos[i]
        except DataError:
            continue
    raise DataError(f"no video could be read ({what})")


class TolerantVideos(Dataset):
    """Wraps a video dataset (items ``video``, ``video_mask``, ...): an unreadable video yields zeros shaped like
    ``template`` and ``ok = 0`` instead of raising; readable ones carry ``ok = 1``."""

    def __init__(self, dataset: Dataset, template: dict, what: str):
        self.dataset = dataset
        self.template = template
        self.what = what

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        try:
            item = dict(self.dataset[index])
            item["ok"] = torch.tensor(1)
        except DataError as exc:
            logger.warning("%s: video %d left out: %s", self.what, index, exc)
            item = {k: torch.zeros_like(v) for k, v in self.template.items()}
            if "video_index" in item:
                item["video_index"] = torch.tensor(index)
            item["ok"] = torch.tensor(0)
        return item


@torch.no_grad()
def encode_video_set(
    encoder: nn.Module,
    videos: Dataset,
    batch_size: int,
    num_workers: int,
    dist: DistInfo,
    desc: str,
    hint: str = "",
    video_tokens: bool = False,
    visual_taps: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Frame features ``[N, T, D]`` (float32), video masks ``[N, T]`` and readable flags ``ok [N]`` of every item of
    ``videos``, in dataset order, on every rank. Each rank encodes its contiguous shard (``batch_size`` is global).

    A ``DataError`` on any rank (an unreadable video in a set that is not wrapped in :class:`TolerantVideos`) stops
    every rank with the same error, ``hint`` appended, instead of leaving the other ranks blocked in the gather.

    ``video_tokens`` (an encoder with T2VLP tubes or STOA objects): a fourth and a fifth result, those tokens
    ``[N, K, D]`` (STOA: from the items' ``object_*`` / ``trajectory_ids`` keys) and their key mask ``[N, K]`` (long,
    1 = real token; all ones for tubes, STOA's empty trajectory slots 0).

    ``visual_taps`` (instead of ``video_tokens``): a fourth result, the ViT taps the encoder's tube / object module
    reads, float32 ``[N, n, T, 1+P, W]`` (``VideoCLIP.visual_taps``; the ``--cache_visual_features`` of T2VLP/STOA).
    """
    device = dist.device
    loader, indices = build_eval_loader(
        videos, max(1, batch_size // dist.world_size), num_workers, dist.rank, dist.world_size
    )
    was_training = encoder.training
    encoder.eval()
    frames, masks, oks, extras, extra_masks = [], [], [], [], []
    failure = None
    try:
        for batch in tqdm(loader, desc=desc, disable=dist.rank != 0, leave=False):
            video, mask = batch["video"].to(device), batch["video_mask"].to(device)
            if visual_taps:
                feats, taps = encoder.visual_taps(video, mask)
                frames.append(feats.float())
                extras.append(taps.float())
            elif video_tokens:
                objects = {k: v.to(device) for k, v in batch.items() if k.startswith(("object_", "trajectory_"))}
                feats, extra, extra_mask = encoder.encode_video_tokens(
                    video, mask, detach_tap=True, batch=objects, return_mask=True
                )
                frames.append(feats.float())
                extras.append(extra.float())
                ones = torch.ones(extra.shape[:2], dtype=torch.long, device=device)
                extra_masks.append(ones if extra_mask is None else extra_mask.long())
            else:
                frames.append(encoder.encode_video(video, mask).float())
            masks.append(mask)
            ok = batch["ok"].to(device) if "ok" in batch else torch.ones(len(mask), dtype=torch.long, device=device)
            oks.append(ok)
    except DataError as exc:
        failure = str(exc)
    finally:
        encoder.train(was_training)
    failures = all_gather_object(failure) if dist.world_size > 1 else [failure]
    for rank, message in enumerate(failures):
        if message is not None:
            raise DataError(f"{desc} stopped on rank {rank}: {message}{hint}")
    n = len(videos)  # type: ignore[arg-type]
    d = encoder.clip.config.embed_dim
    if frames:
        frame_rows, mask_rows, ok_rows = torch.cat(frames), torch.cat(masks), torch.cat(oks)
        extra_rows = torch.cat(extras) if video_tokens or visual_taps else None
        extra_mask_rows = torch.cat(extra_masks) if video_tokens else None
    else:  # an empty shard: shapes from the first readable video
        t = first_readable(videos, desc)["video_mask"].shape[0]
        frame_rows = torch.zeros(0, t, d, device=device)
        mask_rows = torch.zeros(0, t, dtype=torch.long, device=device)
        ok_rows = torch.zeros(0, dtype=torch.long, device=device)
        k = encoder.tubes.num_tubes if encoder.tubes is not None else getattr(encoder.objects, "num_tokens", 0)
        extra_rows = torch.zeros(0, k, d, device=device) if video_tokens else None
        extra_mask_rows = torch.zeros(0, k, dtype=torch.long, device=device) if video_tokens else None
        if visual_taps:
            sample = first_readable(videos, desc)
            shape = encoder.visual_taps(sample["video"][None].to(device), sample["video_mask"][None].to(device))[1]
            extra_rows = torch.zeros(0, *shape.shape[1:], device=device)
    out = (
        gather_eval_rows(frame_rows, indices, n),
        gather_eval_rows(mask_rows, indices, n),
        gather_eval_rows(ok_rows, indices, n),
    )
    if visual_taps:
        return (*out, gather_eval_rows(extra_rows, indices, n))
    if not video_tokens:
        return out
    return (*out, gather_eval_rows(extra_rows, indices, n), gather_eval_rows(extra_mask_rows, indices, n))


@dataclass(frozen=True)
class EvalSettings:
    """How an evaluation reads its data: the GLOBAL batch (``--batch_size_val``), DataLoader workers per rank
    (``--num_thread_reader``), whether unreadable test videos may be left out (``--allow_missing_eval_videos``) and the
    multi-caption video->text protocol of retrieval (``--v2t_protocol``, see engine/metrics.py)."""

    batch_size: int
    num_workers: int = 0
    allow_missing: bool = False
    v2t_protocol: str = DEFAULT_V2T_PROTOCOL

    @classmethod
    def from_flags(cls, args) -> EvalSettings:
        protocol = getattr(args, "v2t_protocol", cls.v2t_protocol)
        return cls(args.batch_size_val, args.num_thread_reader, args.allow_missing_eval_videos, protocol)
