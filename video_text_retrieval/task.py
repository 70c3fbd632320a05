"""Text-video retrieval: the contrastive task (stage 1 and downstream fine-tuning) and the sharded evaluation.

Evaluation encodes each video once and each caption once, every rank taking a contiguous shard, gathers the
features on every rank, builds the dual-encoder similarity in chunks (never an Nt x Nv x T tensor) and, when a
fusion is present and ``rerank_topk > 0``, re-ranks the top-k candidates of every query in both directions with
the VTM match probability (DESIGN 2.7), the candidate pairs sharded across ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dataloaders.datasets import RetrievalEvalSet
from engine.data import EvalSettings, TolerantVideos, build_eval_loader, encode_video_set, first_readable
from engine.distributed import (
    DistInfo,
    all_gather_tensor,
    all_gather_with_grad,
    gather_eval_rows,
    get_rank,
    get_world_size,
    shard_indices,
)
from engine.metrics import retrieval_metrics
from modules.fusion import check_rerank_range, rerank_queries
from modules.losses import contrastive_loss
from modules.membridge import MemBridgeModel, Stage2Weights

logger = logging.getLogger(__name__)

TEXT_CHUNK = 256  # caption rows per similarity chunk (tightTransf runs a cross encoder per pair)
VTM_ONLY = Stage2Weights(vtm=1.0, mlm=0.0, plm=0.0)


class ContrastiveTask(nn.Module):
    """Symmetric InfoNCE on the global batch; ``vtm_weight > 0`` adds the fusion's matching loss (fine-tuning with
    re-ranking). ``model`` holds the weights that checkpoints save."""

    def __init__(self, model: MemBridgeModel, vtm_weight: float = 0.0):
        super().__init__()
        if vtm_weight > 0 and model.fusion is None:
            raise ValueError("vtm_weight > 0 needs a model with a fusion encoder")
        self.model = model
        self.vtm_weight = vtm_weight

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        encoder = self.model.encoder
        frames = encoder.encode_video(batch["video"], batch["video_mask"])  # [b, T, D]
        text = encoder.text_features(batch["text_ids"])  # [b, D]
        if encoder.loose_type:
            video_emb = all_gather_with_grad(encoder.video_embedding(frames, batch["video_mask"]))
            text_emb = all_gather_with_grad(F.normalize(text, dim=-1))
            sim = encoder.similarity(text_emb, video_emb)
        else:
            sim = encoder.tight_similarity(
                all_gather_with_grad(text), all_gather_with_grad(frames), all_gather_with_grad(batch["video_mask"])
            )
        out = {"contrastive": contrastive_loss(sim)}
        loss = out["contrastive"]
        if self.vtm_weight > 0:
            # The fusion learns matching on detached CLIP features (as in stage 2); hard negatives come from the
            # global batch.
            vtm_batch = {**batch, "frame_feats": frames.detach()}
            vtm = self.model.stage2_losses(
                vtm_batch,
                weights=VTM_ONLY,
                gather=all_gather_tensor if get_world_size() > 1 else None,
                local_offset=get_rank() * frames.shape[0],
            )
            out.update({"vtm": vtm["vtm"], "vtm_acc": vtm["vtm_acc"]})
            loss = loss + self.vtm_weight * vtm["vtm"]
        out["loss"] = loss
        return out

    def after_optimizer_step(self) -> None:
        self.model.encoder.clamp_logit_scale_()


@dataclass
class EncodedEvalSet:
    """Features of a retrieval eval set, on every rank."""

    frame_feats: torch.Tensor  # [Nv, T, D]
    video_mask: torch.Tensor  # [Nv, T]
    text_tokens: torch.Tensor  # [Nt, L, D] per-position text features
    text_feats: torch.Tensor  # [Nt, D] EOT-pooled text features
    text_ids: torch.Tensor  # [Nt, L]
    text_mask: torch.Tensor  # [Nt, L]
    video_ok: torch.Tensor  # [Nv] 1 = decoded


@torch.no_grad()
def encode_eval_set(
    model: MemBridgeModel, eval_set: RetrievalEvalSet, batch_size: int, num_workers: int, dist: DistInfo,
    allow_missing: bool = False,
) -> EncodedEvalSet:  # fmt: skip
    """Encode this rank's shard of videos and captions and gather everything on every rank."""
    encoder = model.encoder
    device = dist.device
    per_rank = max(1, batch_size // dist.world_size)
    videos = eval_set.video_dataset()
    what = "the evaluation videos: check --features_path"
    if allow_missing:
        videos = TolerantVideos(videos, first_readable(videos, what), "evaluation")
    frame_feats, video_mask, video_ok = encode_video_set(
        encoder, videos, batch_size, num_workers, dist, "encoding the evaluation videos",
        hint=" (or pass --allow_missing_eval_videos to evaluate without the unreadable videos)",
    )  # fmt: skip

    texts = eval_set.text_dataset()
    loader, indices = build_eval_loader(texts, per_rank, num_workers, dist.rank, dist.world_size)
    tokens, ids, tmask = [], [], []
    for batch in tqdm(loader, desc="encode texts", disable=dist.rank != 0, leave=False):
        text_ids = batch["text_ids"].to(device)
        tokens.append(encoder.clip.encode_text_tokens(text_ids).float())
        ids.append(text_ids)
        tmask.append(batch["text_mask"].to(device))
    n_t = len(texts)
    L = eval_set_text_len(eval_set)
    d = model.encoder.clip.config.embed_dim
    token_rows = torch.cat(tokens) if tokens else torch.zeros(0, L, d, device=device)
    id_rows = torch.cat(ids) if ids else torch.zeros(0, L, dtype=torch.long, device=device)
    mask_rows = torch.cat(tmask) if tmask else torch.zeros(0, L, dtype=torch.long, device=device)
    text_tokens = gather_eval_rows(token_rows, indices, n_t)
    text_ids = gather_eval_rows(id_rows, indices, n_t)
    text_mask = gather_eval_rows(mask_rows, indices, n_t)
    text_feats = text_tokens[torch.arange(n_t, device=device), text_ids.argmax(dim=-1)]
    return EncodedEvalSet(frame_feats, video_mask, text_tokens, text_feats, text_ids, text_mask, video_ok)


def eval_set_text_len(eval_set: RetrievalEvalSet) -> int:
    return eval_set.text_dataset()[0]["text_ids"].shape[0]


@torch.no_grad()
def dual_similarity(model: MemBridgeModel, enc: EncodedEvalSet) -> torch.Tensor:
    """Dual-encoder logits ``[Nt, Nv]`` computed in caption chunks."""
    encoder = model.encoder
    if encoder.loose_type:
        video_emb = encoder.video_embedding(enc.frame_feats, enc.video_mask)
        text_emb = F.normalize(enc.text_feats, dim=-1)
        return torch.cat([encoder.similarity(chunk, video_emb) for chunk in text_emb.split(TEXT_CHUNK)])
    return torch.cat(
        [
            encoder.tight_similarity(chunk, enc.frame_feats, enc.video_mask)
            for chunk in enc.text_feats.split(max(1, TEXT_CHUNK // max(1, enc.frame_feats.shape[0])))
        ]
    )


def _drop_missing(
    enc: EncodedEvalSet, eval_set: RetrievalEvalSet, sim: torch.Tensor
) -> tuple[torch.Tensor, list[int], list[str], torch.Tensor, torch.Tensor]:
    """Remove undecodable videos (and their captions) from the similarity; returns what is kept."""
    keep_v = enc.video_ok.bool().cpu()
    dropped = [eval_set.video_ids[i] for i in torch.nonzero(~keep_v).flatten().tolist()]
    text_to_video = torch.as_tensor(eval_set.text_to_video)
    keep_t = keep_v[text_to_video]
    new_index = torch.cumsum(keep_v.long(), 0) - 1
    t2v = new_index[text_to_video[keep_t]].tolist()
    return sim[keep_t][:, keep_v], t2v, dropped, keep_t, keep_v


def evaluate_retrieval(
    model: MemBridgeModel,
    eval_set: RetrievalEvalSet,
    dist: DistInfo,
    batch_size: int,
    num_workers: int = 0,
    rerank_topk: int = 0,
    allow_missing: bool = False,
    encoded: EncodedEvalSet | None = None,
) -> dict:
    """R@1/5/10, MdR, MnR in both directions (and re-ranked, ``rerank_*`` keys, with a fusion and ``rerank_topk``).

    ``encoded``: features already computed by :func:`encode_eval_set` (they are not recomputed)."""
    enc = encoded or encode_eval_set(model, eval_set, batch_size, num_workers, dist, allow_missing)
    sim = dual_similarity(model, enc).cpu()
    sim, t2v, dropped, keep_t, keep_v = _drop_missing(enc, eval_set, sim)
    metrics: dict = dict(retrieval_metrics(sim, t2v))
    metrics["num_texts"], metrics["num_videos"] = int(sim.shape[0]), int(sim.shape[1])
    if dropped:
        metrics["dropped_videos"] = dropped
        logger.warning("%d evaluation videos could not be read and were left out: %s", len(dropped), dropped)
    if rerank_topk > 0 and model.fusion is not None:
        t2v_scores, v2t_scores = rerank_similarity(model, enc, sim, keep_t, keep_v, rerank_topk, dist)
        reranked = {k: v for k, v in retrieval_metrics(t2v_scores, t2v).items() if k.startswith("t2v_")}
        reranked.update({k: v for k, v in retrieval_metrics(v2t_scores.t(), t2v).items() if k.startswith("v2t_")})
        metrics.update({f"rerank_{k}": v for k, v in reranked.items()})
        metrics["rerank_topk"] = rerank_topk
    return metrics


def rerank_similarity(
    model: MemBridgeModel,
    enc: EncodedEvalSet,
    sim: torch.Tensor,
    keep_t: torch.Tensor,
    keep_v: torch.Tensor,
    topk: int,
    dist: DistInfo,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank the top-k of every query in both directions with the fusion's VTM match probability; the queries are
    sharded across ranks and the rows gathered. Returns ``(t2v [Nt, Nv], v2t [Nv, Nt])`` on the CPU."""
    check_rerank_range(sim)
    device = dist.device
    kt, kv = keep_t.to(device), keep_v.to(device)
    match_prob = model.fusion.pair_match_fn(
        enc.frame_feats[kv], enc.video_mask[kv], enc.text_tokens[kt], enc.text_mask[kt], enc.text_feats[kt]
    )
    scores = sim.to(device)
    out = []
    for transposed, rows in ((False, scores), (True, scores.t())):
        mine = shard_indices(rows.shape[0], dist.rank, dist.world_size)
        queries = torch.arange(mine.start, mine.stop, device=device)
        part = rerank_queries(rows, match_prob, topk, queries, transposed)
        out.append(gather_eval_rows(part, mine, rows.shape[0]).cpu())
    return out[0], out[1]


MetricsHook = Callable[[MemBridgeModel, EncodedEvalSet, RetrievalEvalSet, DistInfo], dict]


class RetrievalEvaluator:
    """``evaluate(task) -> metrics`` of one retrieval split for the engine: encode it once, the dual-encoder metrics,
    the re-ranked ones (with a fusion and ``rerank_topk > 0``) and ``extra(model, encoded, eval_set, dist)`` (stage 2:
    the held-out fusion accuracies, on the same features)."""

    def __init__(
        self,
        eval_set: RetrievalEvalSet,
        dist: DistInfo,
        settings: EvalSettings,
        rerank_topk: int = 0,
        extra: MetricsHook | None = None,
    ) -> None:
        self.eval_set = eval_set
        self.dist = dist
        self.settings = settings
        self.rerank_topk = rerank_topk
        self.extra = extra

    def __call__(self, task: nn.Module) -> dict:
        model = getattr(task, "model", task)
        s = self.settings
        enc = encode_eval_set(model, self.eval_set, s.batch_size, s.num_workers, self.dist, s.allow_missing)
        metrics = evaluate_retrieval(
            model, self.eval_set, self.dist, s.batch_size, rerank_topk=self.rerank_topk, encoded=enc
        )
        if self.extra is not None:
            metrics.update(self.extra(model, enc, self.eval_set, self.dist))
        return metrics
