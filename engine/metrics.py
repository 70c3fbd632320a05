"""Retrieval metrics and the chunked similarity matrix (DESIGN 3.3).

Ranks are 0-based: the rank of a query's ground truth is the number of candidates scored **strictly higher**
(``ties="optimistic"``). R@K is the percentage of queries with rank < K, MdR the median rank + 1, MnR the mean
rank + 1.

Ties in CLIP4Clip's ``compute_metrics`` (``np.sort(-sim)`` then ``np.where(sorted - gt == 0)``): a query whose
ground-truth score equals that of ``m`` other candidates yields ``m + 1`` entries, with ranks ``r, r+1, ..., r+m``
(r = the optimistic rank), and every statistic is taken over the enlarged list of entries. ``ties="clip4clip"``
reproduces that exactly; without ties both rules agree.

Several captions per video (``text_to_video``, e.g. MSVD): text->video ranks each caption's video among all videos
(both protocols). Video->text has two protocols (``v2t_protocol``):

* ``"group"`` (default; CLIP4Clip's ``multi_sentence`` evaluation, which the published CLIP4Clip / MemBridge MSVD
  numbers use): the captions are grouped per video, a group's score with a video is its best caption's score
  (CLIP4Clip pads the groups with -inf to ``[Nv, max_caps, Nv]`` and takes the max over the captions), and each
  video ranks all ``Nv`` caption groups; the metric is the rank of the video's own group.
* ``"caption"``: each video's best-scored caption is ranked among all ``Nt`` captions (the other videos' captions
  each count as a candidate).

With one caption per video both protocols are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
DIRECTIONS = ("t2v", "v2t")
TIE_RULES = ("optimistic", "clip4clip")
V2T_PROTOCOLS = ("group", "caption")
DEFAULT_V2T_PROTOCOL = "group"
DEFAULT_TIE_RULE = "optimistic"
DEFAULT_CHUNK = 1024


def _summarise(ranks: torch.Tensor, ties: torch.Tensor, tie_rule: str, prefix: str) -> dict[str, float]:
    """R@K / MdR / MnR from optimistic 0-based ranks and the number of other candidates tied with the truth."""
    if tie_rule == "clip4clip":
        counts = ties + 1
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        ranks = torch.repeat_interleave(ranks, counts) + offsets
    values = ranks.double().numpy()
    out = {f"{prefix}_R{k}": float(np.mean(values < k) * 100.0) for k in RECALL_KS}
    out[f"{prefix}_MdR"] = float(np.median(values) + 1.0)
    out[f"{prefix}_MnR"] = float(np.mean(values) + 1.0)
    return out


def _ranks_against(
    scores: torch.Tensor, truth: torch.Tensor, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: candidates scored strictly higher than ``truth`` and (other) candidates scored equal to it.

    ``exclude`` marks candidates left out of the tie count (the ground-truth entries themselves).
    """
    higher = (scores > truth[:, None]).sum(1)
    equal = scores == truth[:, None]
    if exclude is not None:
        equal &= ~exclude
    return higher, equal.sum(1)


def check_owner(text_to_video: Sequence[int] | torch.Tensor | None, n_text: int, n_video: int) -> torch.Tensor:
    """``text_to_video`` as a LongTensor ``[Nt]`` (identity when None: a square matrix, caption i of video i), after
    checking that every index is a video and every video has at least one caption."""
    if text_to_video is None:
        if n_text != n_video:
            raise ValueError(f"a {n_text}x{n_video} matrix needs text_to_video (one video index per caption)")
        owner = torch.arange(n_text)
    else:
        owner = torch.as_tensor(list(text_to_video), dtype=torch.long)
        if owner.shape != (n_text,):
            raise ValueError(f"text_to_video has {owner.numel()} entries for {n_text} captions")
        if n_text and (int(owner.min()) < 0 or int(owner.max()) >= n_video):
            raise ValueError(f"text_to_video holds video indices outside [0, {n_video})")
    per_video = torch.bincount(owner, minlength=n_video)
    if bool((per_video == 0).any()):
        raise ValueError(f"videos {(per_video == 0).nonzero().flatten()[:10].tolist()} have no caption")
    return owner


def group_scores(sim: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """``[Nv video queries, Nv caption groups]``: entry ``(v, g)`` is the best score with video ``v`` of a caption of
    video ``g`` (``sim [Nt, Nv]``, ``owner [Nt]``: each caption's video). CLIP4Clip's
    ``max(sim_tensor [Nv, max_caps, Nv], dim=1).T`` without the -inf padding."""
    n_video = sim.shape[1]
    out = torch.full((n_video, n_video), -torch.inf, dtype=sim.dtype, device=sim.device)
    return out.scatter_reduce_(1, owner.to(sim.device)[None, :].expand(n_video, -1), sim.T, "amax")


def caption_groups(owner: Sequence[int] | torch.Tensor, n_video: int) -> torch.Tensor:
    """``[Nv, max_caps]`` caption indices of each video in caption order; a shorter group is padded by repeating its
    first caption (a repeat never changes a max over the group). Every video needs a caption."""
    owner = torch.as_tensor(list(owner) if not isinstance(owner, torch.Tensor) else owner, dtype=torch.long)
    counts = torch.bincount(owner, minlength=n_video)
    if bool((counts == 0).any()):
        raise ValueError(f"videos {(counts == 0).nonzero().flatten()[:10].tolist()} have no caption")
    order = torch.argsort(owner, stable=True)  # captions sorted by video, caption order kept within a video
    starts = counts.cumsum(0) - counts
    slot = torch.arange(int(counts.max()))
    within = torch.where(slot[None, :] < counts[:, None], slot[None, :], 0)  # past a group's end: its first caption
    return order[starts[:, None] + within]


def v2t_group_metrics(scores: torch.Tensor, ties: str = DEFAULT_TIE_RULE) -> dict[str, float]:
    """``v2t_*`` statistics of a ``[Nv video queries, Nv caption groups]`` score matrix whose truth is the diagonal
    (video v's own group is group v), e.g. :func:`group_scores` or its re-ranked version."""
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    scores = torch.as_tensor(scores).detach().cpu().double()
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"group scores must be square [videos, groups], got shape {tuple(scores.shape)}")
    n = scores.shape[0]
    return _summarise(*_ranks_against(scores, scores.diagonal(), exclude=torch.eye(n, dtype=torch.bool)), ties, "v2t")


def retrieval_metrics(
    sim: torch.Tensor | np.ndarray,
    text_to_video: Sequence[int] | None = None,
    ties: str = DEFAULT_TIE_RULE,
    v2t_protocol: str = DEFAULT_V2T_PROTOCOL,
) -> dict[str, float]:
    """Text->video and video->text R@1/5/10, MdR, MnR of a similarity matrix ``sim [Nt, Nv]``.

    Without ``text_to_video`` the matrix is square and caption i belongs to video i. Otherwise caption i belongs
    to video ``text_to_video[i]`` and every video needs at least one caption. See the module docstring for the
    rank, tie (``ties``) and multi-caption (``v2t_protocol``: ``group`` or ``caption``) rules.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    if v2t_protocol not in V2T_PROTOCOLS:
        raise ValueError(f"v2t_protocol must be one of {V2T_PROTOCOLS}, got {v2t_protocol!r}")
    sim = torch.as_tensor(sim).detach().cpu().double()
    if sim.dim() != 2:
        raise ValueError(f"the similarity matrix must be 2-D [texts, videos], got shape {tuple(sim.shape)}")
    if not bool(torch.isfinite(sim).all()):
        raise ValueError("the similarity matrix holds NaN or infinite values: check the model outputs")
    n_text, n_video = sim.shape
    owner = check_owner(text_to_video, n_text, n_video)

    rows = torch.arange(n_text)
    t2v = _ranks_against(sim, sim[rows, owner], exclude=F.one_hot(owner, n_video).bool())
    metrics = _summarise(*t2v, ties, "t2v")

    if v2t_protocol == "group":
        metrics.update(v2t_group_metrics(group_scores(sim, owner), ties))
        return metrics
    columns = torch.arange(n_video)
    # Best caption score of each video [Nv]: its ground truth for video->text.
    best = torch.full((n_video,), -torch.inf, dtype=sim.dtype).scatter_reduce(0, owner, sim[rows, owner], "amax")
    own_caption = owner[:, None] == columns[None, :]  # [Nt, Nv]
    metrics.update(_summarise(*_ranks_against(sim.T, best, exclude=own_caption.T), ties, "v2t"))
    return metrics


def chunked_similarity(
    text_emb: torch.Tensor,
    video_emb: torch.Tensor,
    scale: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
    normalize: bool = True,
    out_device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``scale * cos(text_emb [Nt, D], video_emb [Nv, D])`` as a float32 ``[Nt, Nv]`` matrix on ``out_device``.

    Rows are computed ``chunk`` texts at a time on the embeddings' device, so that device never holds more than
    ``chunk x Nv`` scores. With ``normalize=False`` the embeddings are used as given (plain dot products).
    """
    if text_emb.dim() != 2 or video_emb.dim() != 2 or text_emb.shape[1] != video_emb.shape[1]:
        raise ValueError(f"expected [Nt, D] and [Nv, D], got {tuple(text_emb.shape)} and {tuple(video_emb.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    videos = video_emb.float()
    if normalize:
        videos = F.normalize(videos, dim=-1)
    out = torch.empty(text_emb.shape[0], video_emb.shape[0], dtype=torch.float32, device=out_device)
    for start in range(0, text_emb.shape[0], chunk):
        texts = text_emb[start : start + chunk].float()
        if normalize:
            texts = F.normalize(texts, dim=-1)
        out[start : start + chunk] = (scale * texts @ videos.T).to(out_device)
    return out


def format_metrics_table(metrics: Mapping[str, float]) -> str:
    """The two retrieval directions as an aligned text table for logs (missing entries shown as '-')."""
    columns = [f"R{k}" for k in RECALL_KS] + ["MdR", "MnR"]
    header = f"{'':6}" + "".join(f"{name:>8}" for name in columns)
    lines = [header]
    for direction in DIRECTIONS:
        cells = []
        for name in columns:
            value = metrics.get(f"{direction}_{name}")
            cells.append(f"{value:8.2f}" if value is not None else f"{'-':>8}")
        lines.append(f"{direction:6}" + "".join(cells))
    return "\n".join(lines)
