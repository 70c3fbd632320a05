"""Worker for tests/test_distributed.py: one gloo rank of a CPU process group, started by torch.multiprocessing.

Each rank joins through ``init_distributed`` (torchrun-style environment), runs the collectives and the gathered
InfoNCE on its slice of a fixed global batch under DDP, and saves what it saw to ``{out_dir}/rank{r}.pt``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dataloaders.errors import DataError
from engine import checkpoint, data, distributed

GLOBAL_BATCH = 8
EVAL_ROWS = 7
LOGIT_SCALE = 10.0


class DualEncoder(nn.Module):
    """Two linear towers standing in for the CLIP text and video encoders."""

    def __init__(self) -> None:
        super().__init__()
        self.text = nn.Linear(6, 4)
        self.video = nn.Linear(5, 4)

    def forward(self, text: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.text(text), dim=-1), F.normalize(self.video(video), dim=-1)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randn(GLOBAL_BATCH, 5, generator=gen)


def make_model() -> DualEncoder:
    torch.manual_seed(3)
    return DualEncoder()


def symmetric_infonce(text_emb: torch.Tensor, video_emb: torch.Tensor) -> torch.Tensor:
    """Mean of the text->video and video->text cross-entropies over the (global) batch."""
    logits = LOGIT_SCALE * text_emb @ video_emb.T
    target = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def gathered_step(model: nn.Module, text: torch.Tensor, video: torch.Tensor, reduce_grad: bool):
    """Loss and parameter gradients of one backward with the local slice of the global batch."""
    t, v = model(text, video)
    t_all = distributed.all_gather_with_grad(t, reduce_grad=reduce_grad)
    v_all = distributed.all_gather_with_grad(v, reduce_grad=reduce_grad)
    loss = symmetric_infonce(t_all, v_all)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


TOY_VIDEOS, BAD_VIDEO = 5, 4  # video 4 is on rank 1's shard


class ToyVideos(Dataset):
    """Video i is filled with the value i; ``BAD_VIDEO`` cannot be read."""

    def __len__(self) -> int:
        return TOY_VIDEOS

    def __getitem__(self, i: int) -> dict:
        if i == BAD_VIDEO:
            raise DataError(f"video {i} is unreadable")
        return {"video": torch.full((2, 3, 2, 2), float(i)), "video_mask": torch.ones(2, dtype=torch.long)}


class ToyEncoder(nn.Module):
    clip = SimpleNamespace(config=SimpleNamespace(embed_dim=3))

    def encode_video(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return video.mean(dim=(3, 4))  # [b, T, 3]


def encode_toy_videos(info: distributed.DistInfo) -> dict:
    """encode_video_set over 2 ranks: an unreadable video stops both; tolerated, it is flagged."""
    out: dict = {}
    try:
        data.encode_video_set(ToyEncoder(), ToyVideos(), 2, 0, info, "toy videos", hint=" (a hint)")
    except DataError as exc:
        out["encode_error"] = str(exc)
    tolerant = data.TolerantVideos(ToyVideos(), data.first_readable(ToyVideos(), "toy videos"), "toy videos")
    out["encode_feats"], out["encode_masks"], out["encode_ok"] = data.encode_video_set(
        ToyEncoder(), tolerant, 2, 0, info, "toy videos"
    )
    return out


def run(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    info = distributed.init_distributed()
    try:
        result: dict = {"info": [info.rank, info.local_rank, info.world_size, str(info.device)]}
        text, video = global_batch()
        local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        for reduce_grad in (True, False):
            ddp = nn.parallel.DistributedDataParallel(make_model())
            loss, grads = gathered_step(ddp, text[local], video[local], reduce_grad)
            result[f"loss_{reduce_grad}"] = loss
            result[f"grads_{reduce_grad}"] = {name.removeprefix("module."): g for name, g in grads.items()}

        result["objects"] = distributed.all_gather_object({"rank": rank, "text": "x" * (rank + 2)})
        result["broadcast"] = distributed.broadcast_object({"from": rank} if rank == 1 else None, src=1)
        result["mean"] = distributed.all_reduce_mean(torch.tensor([rank + 1.0]))

        for n in (EVAL_ROWS, 1):
            indices = distributed.shard_indices(n)
            rows = torch.stack([torch.arange(3.0) + 10 * i for i in indices]) if indices else torch.empty(0, 3)
            result[f"shard_{n}"] = list(indices)
            result[f"rows_{n}"] = distributed.gather_eval_rows(rows, indices, n)

        result.update(encode_toy_videos(info))

        model = make_model()
        torch.manual_seed(100 + rank)
        saved = checkpoint.save_checkpoint(os.path.join(out_dir, "run"), 1, model, extra={"rank": rank})
        result["draw_after_save"] = torch.rand(3)
        result["extra"] = checkpoint.load_checkpoint(saved, model)
        result["draw_after_load"] = torch.rand(3)
        distributed.barrier()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()
