"""HMMC's training-only parts and losses (MCQ_HMMC.md §B.2-B.7, §C.4).

- :class:`ProjectorMLP`: ``Linear(D, H) → BatchNorm → ReLU → Linear(H, D)`` (``v_projector`` / ``v_predictor``). The
  BatchNorm is :class:`GlobalBatchNorm1d`: statistics over the global batch (what HMMC's ``SyncBatchNorm`` computes),
  also on CPU / gloo where ``nn.SyncBatchNorm`` does not run, so 2 ranks train exactly as 1 process.
- :class:`HMMCLMHead`: BERT's LM head (dense, erf-GELU, LayerNorm eps 1e-12, untied decoder + zero bias).
- :func:`hmmc_contrastive_losses`: FAM, VTM and FTM (MoCo InfoNCE against the momentum keys and the queues).
- :func:`mlm_inputs`: BERT-style masking from per-sample uniform draws (drawn by the dataset, so the masks do not
  depend on the rank layout); :func:`hmmc_mlm_loss` the MLM cross-entropy over the global batch.
- :func:`frame_topk_similarity`: the evaluation's frame term ``mean(top-k_t cos(text, frame_t))``.

Frames that are padding (``video_mask == 0``) are left out of FAM pairs, FTM terms and the evaluation top-k; with every
frame real (HMMC's fixed-length sampling) the sums equal the official ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modules.losses import DEFAULT_MOCO_TEMPERATURE, moco_infonce

MLM_PROBABILITY = 0.15
IGNORE_INDEX = -100
CLIP_SOT_ID, CLIP_EOT_ID = 49406, 49407  # dataloaders.tokenizer.SOT_ID / EOT_ID

RowGather = Callable[[torch.Tensor], tuple[torch.Tensor, slice]]
"""``x [n, ...] -> (rows of every rank [W*n, ...] keeping this rank's gradient, this rank's slice)``."""


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the rows of every rank: with ``gather`` (a :data:`RowGather`,
    the caller's distributed helper) the batch of all ranks is normalised and this rank's rows returned, which is what
    ``SyncBatchNorm`` computes, also on CPU / gloo. ``gather=None``: plain BatchNorm1d."""

    def __init__(self, num_features: int, gather: RowGather | None = None):
        super().__init__(num_features)
        self.gather = gather

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.gather is None:
            return super().forward(x)
        rows, mine = self.gather(x)
        return super().forward(rows)[mine]


class ProjectorMLP(nn.Sequential):
    """HMMC's projector / predictor (``proj_num_layers`` 2): ``Linear → BN → ReLU → Linear`` on rows ``[N, D]``."""

    def __init__(self, dim: int, hidden: int, gather: RowGather | None = None):
        super().__init__(
            nn.Linear(dim, hidden), GlobalBatchNorm1d(hidden, gather), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
        )


class HMMCLMHead(nn.Module):
    """``BertLMPredictionHead``: dense D→D, erf-GELU, LayerNorm(eps 1e-12), decoder D→V without bias + zero bias."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-12)
        self.decoder = nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(F.gelu(self.dense(hidden)))
        return self.decoder(x) + self.bias


@dataclass(frozen=True)
class HMMCWeights:
    """``--w_fam --w_vtm --w_ftm --w_mlm`` and ``--contrast_temperature`` (HMMC's cross_config.json defaults)."""

    fam: float = 0.05
    vtm: float = 0.45
    ftm: float = 0.45
    mlm: float = 0.05
    temperature: float = DEFAULT_MOCO_TEMPERATURE


@dataclass
class HMMCFeatures:
    """Online queries and momentum keys of the (global) batch. ``frames*``: pre-temporal per-frame features."""

    video: torch.Tensor  # [B, D] (after the temporal module)
    title: torch.Tensor  # [B, D]
    frames: torch.Tensor  # [B, T, D]
    frame_pred: torch.Tensor  # [B, T, D] v_predictor(v_projector(frames))
    video_k: torch.Tensor  # [B, D]
    title_k: torch.Tensor  # [B, D]
    frames_k: torch.Tensor  # [B, T, D]
    frame_proj_k: torch.Tensor  # [B, T, D] momentum v_projector(frames_k)
    video_mask: torch.Tensor  # [B, T]


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``valid`` (0 with a gradient path when nothing is valid)."""
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1.0)


def hmmc_contrastive_losses(
    f: HMMCFeatures, queues: dict[str, torch.Tensor], temperature: float = DEFAULT_MOCO_TEMPERATURE
) -> dict[str, torch.Tensor]:
    """FAM, VTM, FTM of MCQ_HMMC.md §B.6 with ``C = moco_infonce`` and the queue snapshots ``queues`` (keys ``video``,
    ``title``, ``frame_proj``, ``frame_cross``; rows unit length):

    - FAM ``= Σ_{b,i} [C(pred_{b,i}, proj_k_{b,i+1}) + C(pred_{b,i+1}, proj_k_{b,i})] / #pairs`` (Q_frame_proj), i.e.
      ``(1/(T−1)) Σ_i`` of the batch means when every frame is real;
    - VTM ``= C(v, title_k, Q_title) + C(title, v_k, Q_v)``;
    - FTM ``= Σ_{b,i} [C(title_b, frame_k_{b,i}, Q_frame_cross) + C(frame_{b,i}, title_k_b, Q_title)] / #frames``.
    """
    mask = f.video_mask.bool()
    b, t, d = f.frames.shape
    out: dict[str, torch.Tensor] = {}
    if t > 1:
        pair = mask[:, :-1] & mask[:, 1:]
        fwd = moco_infonce(f.frame_pred[:, :-1].reshape(-1, d), f.frame_proj_k[:, 1:].reshape(-1, d),
                           queues["frame_proj"], temperature, "none")  # fmt: skip
        bwd = moco_infonce(f.frame_pred[:, 1:].reshape(-1, d), f.frame_proj_k[:, :-1].reshape(-1, d),
                           queues["frame_proj"], temperature, "none")  # fmt: skip
        out["fam"] = _masked_mean(fwd + bwd, pair.reshape(-1))
    else:
        out["fam"] = f.frame_pred.sum() * 0.0
    out["vtm"] = moco_infonce(f.video, f.title_k, queues["title"], temperature) + moco_infonce(
        f.title, f.video_k, queues["video"], temperature
    )
    title_q = f.title[:, None].expand(b, t, d).reshape(-1, d)
    title_k = f.title_k[:, None].expand(b, t, d).reshape(-1, d)
    t2f = moco_infonce(title_q, f.frames_k.reshape(-1, d), queues["frame_cross"], temperature, "none")
    f2t = moco_infonce(f.frames.reshape(-1, d), title_k, queues["title"], temperature, "none")
    out["ftm"] = _masked_mean(t2f + f2t, mask.reshape(-1))
    return out


def mlm_inputs(
    ids: torch.Tensor, text_mask: torch.Tensor, draws: torch.Tensor, mask_id: int, vocab_size: int,
    probability: float = MLM_PROBABILITY, quirks: bool = False, sot_id: int = CLIP_SOT_ID, eot_id: int = CLIP_EOT_ID,
    random_range: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """BERT masking of ``ids [B, L]`` from uniform ``draws [B, 3, L]`` (select, kind, random id): a position is chosen
    when ``draws[:, 0] < probability``; of the chosen, ``kind < 0.8`` becomes ``mask_id``, ``0.8 <= kind < 0.9`` a
    random id, the rest is kept. Returns ``(masked_ids, labels)`` with ``labels = -100`` where not chosen.

    Default: only real inner tokens are chosen (not padding, SOT or EOT) and random ids are ordinary BPE ids
    (``< SOT``; another vocabulary passes its ordinary ids as ``random_range [low, high)``, and ``sot_id`` / ``eot_id``
    its ``[CLS]`` / ``[SEP]``). ``quirks`` (HMMC, B.14 items 2-3): every position but SOT/EOT, padding included, and
    random ids over the whole vocabulary."""
    special = (ids == sot_id) | (ids == eot_id)
    maskable = ~special if quirks else text_mask.bool() & ~special
    chosen = maskable & (draws[:, 0] < probability)
    kind = draws[:, 1]
    to_mask = chosen & (kind < 0.8)
    to_random = chosen & (kind >= 0.8) & (kind < 0.9)
    low, high = (0, vocab_size) if quirks else (random_range or (0, min(vocab_size, sot_id)))
    random_ids = low + (draws[:, 2] * (high - low)).long().clamp(max=high - low - 1)
    masked = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return masked, labels


def hmmc_mlm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reduce: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over the scored positions (``logits [b, L, V]``, ``labels [b, L]``, -100 = not scored).
    ``reduce(sum, count) -> (global sum, global count)`` (the caller's distributed helper; the sum keeping this rank's
    gradient) makes it the mean over the global batch, the same on every rank."""
    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().to(total.dtype)
    if reduce is not None:
        total, count = reduce(total, count)
    return total / count.clamp(min=1.0)


def frame_topk_similarity(
    text_emb: torch.Tensor, frame_feats: torch.Tensor, video_mask: torch.Tensor, k: int, chunk: int = 256
) -> torch.Tensor:
    """``[Nt, Nv]``: the mean of the ``k`` largest ``cos(text, frame_t)`` over each video's real frames (all of them
    when it has fewer than ``k``). ``text_emb [Nt, D]`` unit length, ``frame_feats [Nv, T, D]``; computed in caption
    chunks of ``chunk`` rows (never ``Nt x Nv x T`` at once)."""
    if k < 1:
        raise ValueError(f"frame_topk_similarity needs k >= 1, got {k}")
    frames = F.normalize(frame_feats.float(), dim=-1)
    valid = video_mask.bool()
    kk = min(k, frames.shape[1])
    count = valid.sum(dim=-1).clamp(min=1, max=kk).to(frames.dtype)  # [Nv]
    rows = []
    for part in text_emb.float().split(chunk):
        s = torch.einsum("td,vfd->tvf", part, frames).masked_fill(~valid[None], float("-inf"))
        top = s.topk(kk, dim=-1).values
        rows.append(torch.where(torch.isfinite(top), top, torch.zeros_like(top)).sum(-1) / count[None])
    return torch.cat(rows) if rows else frames.new_zeros(0, frames.shape[0])
