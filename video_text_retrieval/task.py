"""Text-video retrieval: the contrastive task (stage 1 and downstream fine-tuning) and the sharded evaluation.

Evaluation encodes each video once and each caption once, every rank taking a contiguous shard, gathers the
features on every rank, builds the dual-encoder similarity in chunks (never an Nt x Nv x T tensor) and, when a
fusion is present and ``rerank_topk > 0``, re-ranks the top-k candidates of every query in both directions with
the VTM match probability (DESIGN 2.7), the candidate pairs sharded across ranks.

Video->text with several captions per video follows ``v2t_protocol`` (engine/metrics.py): ``group`` (default, the
published CLIP4Clip / MemBridge protocol) ranks caption groups, ``caption`` ranks single captions. Re-ranking follows
the same protocol: under ``group`` a video's candidates are its top-k caption *groups* by group score (a group's
best dual-encoder caption score), and a candidate group is re-scored with the best VTM match probability over all
of its captions (the VTM analogue of the group score), so a query re-ranks k groups, not k captions that may all
belong to one or two groups. That costs ``k x captions-per-video`` VTM pairs per video, i.e. about the same as the
text->video direction (``k`` per caption). Under ``--official_quirks`` the VTM's Q2 normalisation group is then all
captions of a video's k candidate groups (short groups padded by repeating their first caption).
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
from engine.metrics import (
    DEFAULT_TIE_RULE,
    DEFAULT_V2T_PROTOCOL,
    V2T_PROTOCOLS,
    caption_groups,
    group_scores,
    retrieval_metrics,
    v2t_group_metrics,
)
from modules.aux_losses import local_alignment
from modules.fusion import DEFAULT_RERANK_QUERY_CHUNK, check_rerank_range, rerank_queries
from modules.hmmc import frame_topk_similarity
from modules.losses import contrastive_loss
from modules.membridge import CACHED_VIDEO_TOKEN_MASK_KEY, CACHED_VIDEO_TOKENS_KEY, MemBridgeModel, Stage2Weights

logger = logging.getLogger(__name__)

TEXT_CHUNK = 256  # caption rows per similarity chunk (tightTransf runs a cross encoder per pair)
VTM_ONLY = Stage2Weights(vtm=1.0, mlm=0.0, plm=0.0, align=0.0)


class ContrastiveTask(nn.Module):
    """Symmetric InfoNCE on the global batch; ``vtm_weight > 0`` adds the fusion's matching loss (fine-tuning with
    re-ranking). ``model`` holds the weights that checkpoints save.

    HMMC's fine-tuning loss (MCQ_HMMC.md §B.7; ``--video_loss_weight 0.85 --frame_loss_weight 0.15``):
    ``video_weight * contrastive + frame_weight * frame``, with ``frame`` the mean over frame positions ``i`` of the
    symmetric InfoNCE of ``logit_scale * cos(text, frame_i)`` (pre-temporal frames), padded frames left out
    (:func:`frame_contrastive_loss`). The defaults (1, 0) are the plain contrastive loss.

    With T2VLP tube tokens (``--method t2vlp``) the loss adds ``align_weight`` x the local alignment (spec A.3/A.4)
    between the tubes and the text token features; the tubes' ViT input keeps its gradient in stage 1 (no fusion)
    and is detached when fine-tuning a model with a fusion, as published."""

    def __init__(
        self,
        model: MemBridgeModel,
        vtm_weight: float = 0.0,
        frame_weight: float = 0.0,
        video_weight: float = 1.0,
        align_weight: float = 1.0,
    ):
        super().__init__()
        if vtm_weight > 0 and model.fusion is None:
            raise ValueError("vtm_weight > 0 needs a model with a fusion encoder")
        if frame_weight > 0 and not model.encoder.loose_type:
            raise ValueError("frame_weight > 0 (HMMC's frame loss) needs a dual-encoder sim_header")
        self.model = model
        self.vtm_weight = vtm_weight
        self.frame_weight = frame_weight
        self.video_weight = video_weight
        self.align_weight = align_weight

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        encoder = self.model.encoder
        frames, tubes, tube_mask = encoder.encode_video_tokens(
            batch["video"], batch["video_mask"], detach_tap=self.model.fusion is not None, batch=batch,
            return_mask=True,
        )  # [b, T, D], tubes [b, K, D] or None, their key mask [b, K] or None  # fmt: skip
        if tubes is None or encoder.tubes is None:
            text = encoder.text_features(batch["text_ids"])  # [b, D]
        else:
            text_ids = batch["text_ids"]
            tokens = encoder.clip.encode_text_tokens(text_ids)  # [b, L, D]
            text = tokens[torch.arange(len(tokens), device=tokens.device), text_ids.argmax(dim=-1)]
        if encoder.loose_type:
            video_emb = all_gather_with_grad(encoder.video_embedding(frames, batch["video_mask"]))
            text_emb = all_gather_with_grad(F.normalize(text, dim=-1))
            sim = encoder.similarity(text_emb, video_emb)
            if self.frame_weight > 0:
                frame_emb = all_gather_with_grad(F.normalize(frames, dim=-1))
                mask = all_gather_tensor(batch["video_mask"])
                frame_loss = frame_contrastive_loss(encoder.logit_scale.exp() * text_emb, frame_emb, mask)
        else:
            sim = encoder.tight_similarity(
                all_gather_with_grad(text), all_gather_with_grad(frames), all_gather_with_grad(batch["video_mask"])
            )
        out = {"contrastive": contrastive_loss(sim)}
        loss = out["contrastive"]
        if self.frame_weight > 0:
            out["frame_contrastive"] = frame_loss
            loss = self.video_weight * loss + self.frame_weight * frame_loss
        elif self.video_weight != 1.0:
            loss = self.video_weight * loss
        if tubes is not None and encoder.tubes is not None:
            out["align"] = local_alignment(encoder.tubes.text_queries(), tokens, batch["text_mask"], tubes)
            loss = loss + self.align_weight * out["align"]
        if self.vtm_weight > 0:
            # The fusion learns matching on detached CLIP features (as in stage 2); hard negatives come from the
            # global batch.
            vtm_batch = {**batch, "frame_feats": frames.detach()}
            if tubes is not None:  # the tubes travel with their video into the VTM pairs (and learn from them)
                vtm_batch[CACHED_VIDEO_TOKENS_KEY] = tubes
                if tube_mask is not None:  # STOA: the empty trajectory slots stay hidden
                    vtm_batch[CACHED_VIDEO_TOKEN_MASK_KEY] = tube_mask
            vtm = self.model.stage2_losses(
                vtm_batch,
                weights=VTM_ONLY,
                gather=all_gather_tensor if get_world_size() > 1 else None,
                local_offset=get_rank() * frames.shape[0],
                gather_with_grad=all_gather_with_grad if get_world_size() > 1 else None,
            )
            out.update({"vtm": vtm["vtm"], "vtm_acc": vtm["vtm_acc"]})
            loss = loss + self.vtm_weight * vtm["vtm"]
        out["loss"] = loss
        return out

    def after_optimizer_step(self) -> None:
        self.model.encoder.clamp_logit_scale_()


def frame_contrastive_loss(text: torch.Tensor, frames: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    """HMMC's fine-tuning frame loss: the mean over frame positions ``i`` of the symmetric InfoNCE of the logits
    ``text [B, D] @ frames[:, i] [B, D]ᵀ`` (scaled text and unit frames, so the logits are ``scale * cos``). A video
    whose frame ``i`` is padding is no candidate in that position's text->video rows and has no video->text row there;
    each direction averages its valid rows. With every frame real this is ``(1/T) Σ_i contrastive_loss(S_i)``."""
    b, t, _ = frames.shape
    valid = video_mask.bool()
    target = torch.arange(b, device=text.device)
    terms = []
    for i in range(t):
        cols = valid[:, i]
        if not bool(cols.any()):
            continue
        logits = (text.float() @ frames[:, i].float().t()).masked_fill(~cols[None], float("-inf"))
        t2v = F.cross_entropy(logits[cols], target[cols])
        v2t = F.cross_entropy(logits.t()[cols], target[cols])
        terms.append((t2v + v2t) / 2)
    return torch.stack(terms).mean() if terms else text.sum() * 0.0


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
    video_tokens: torch.Tensor | None = None  # [Nv, K, D] T2VLP tube / STOA object tokens (None without)
    video_token_mask: torch.Tensor | None = None  # [Nv, K] their key mask (STOA's empty trajectory slots hidden)


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
    with_tubes = encoder.tubes is not None or encoder.objects is not None
    frame_feats, video_mask, video_ok, *video_tokens = encode_video_set(
        encoder, videos, batch_size, num_workers, dist, "encoding the evaluation videos",
        hint=" (or pass --allow_missing_eval_videos to evaluate without the unreadable videos)",
        video_tokens=with_tubes,
    )  # fmt: skip

    texts = eval_set.text_dataset()
    loader, indices = build_eval_loader(texts, per_rank, num_workers, dist.rank, dist.world_size)
    tokens, feats, ids, tmask = [], [], [], []
    for batch in tqdm(loader, desc="encode texts", disable=dist.rank != 0, leave=False):
        text_ids = batch["text_ids"].to(device)
        token_part, feat_part = encoder.text_tokens_and_features(text_ids)
        tokens.append(token_part.float())
        feats.append(feat_part.float())
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
    feat_rows = torch.cat(feats) if feats else torch.zeros(0, d, device=device)
    text_feats = gather_eval_rows(feat_rows, indices, n_t)  # CLIP: the EOT position's token feature
    return EncodedEvalSet(
        frame_feats, video_mask, text_tokens, text_feats, text_ids, text_mask, video_ok,
        *(video_tokens if video_tokens else (None, None)),
    )  # fmt: skip


def eval_set_text_len(eval_set: RetrievalEvalSet) -> int:
    return eval_set.text_dataset()[0]["text_ids"].shape[0]


@torch.no_grad()
def dual_similarity(
    model: MemBridgeModel, enc: EncodedEvalSet, frame_topk: int = 0, frame_weight: float = 1.0
) -> torch.Tensor:
    """Dual-encoder logits ``[Nt, Nv]`` computed in caption chunks.

    ``frame_topk > 0`` (HMMC's ``--use_frame_fea --top_frames k``, MCQ_HMMC.md §B.7): plus ``frame_weight`` times
    the logit scale times the mean of the ``k`` best text-frame cosines over each video's (pre-temporal) frames;
    HMMC adds it unweighted (``frame_weight`` 1)."""
    encoder = model.encoder
    if encoder.loose_type:
        video_emb = encoder.video_embedding(enc.frame_feats, enc.video_mask)
        text_emb = F.normalize(enc.text_feats, dim=-1)
        sim = torch.cat([encoder.similarity(chunk, video_emb) for chunk in text_emb.split(TEXT_CHUNK)])
        if frame_topk > 0:
            frames = frame_topk_similarity(text_emb, enc.frame_feats, enc.video_mask, frame_topk, TEXT_CHUNK)
            sim = sim + frame_weight * encoder.logit_scale.exp().to(sim.dtype) * frames.to(sim.dtype)
        return sim
    if frame_topk > 0:
        raise ValueError("the frame term (--use_frame_fea) needs a dual-encoder --sim_header, not tightTransf")
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
    v2t_protocol: str = DEFAULT_V2T_PROTOCOL,
    frame_topk: int = 0,
    frame_weight: float = 1.0,
) -> dict:
    """R@1/5/10, MdR, MnR in both directions (and re-ranked, ``rerank_*`` keys, with a fusion and ``rerank_topk``).

    ``encoded``: features already computed by :func:`encode_eval_set` (they are not recomputed). ``v2t_protocol``:
    ``group`` or ``caption`` (module docstring). The result also names the protocol (``v2t_protocol``) and the tie
    rule (``tie_rule``: ``optimistic``, a truth tied with other candidates ranks above them) of its numbers.
    ``frame_topk`` / ``frame_weight``: HMMC's frame term (:func:`dual_similarity`)."""
    if v2t_protocol not in V2T_PROTOCOLS:
        raise ValueError(f"v2t_protocol must be one of {V2T_PROTOCOLS}, got {v2t_protocol!r}")
    enc = encoded or encode_eval_set(model, eval_set, batch_size, num_workers, dist, allow_missing)
    sim = dual_similarity(model, enc, frame_topk, frame_weight).cpu()
    sim, t2v, dropped, keep_t, keep_v = _drop_missing(enc, eval_set, sim)
    metrics: dict = dict(retrieval_metrics(sim, t2v, DEFAULT_TIE_RULE, v2t_protocol))
    metrics["num_texts"], metrics["num_videos"] = int(sim.shape[0]), int(sim.shape[1])
    metrics["v2t_protocol"], metrics["tie_rule"] = v2t_protocol, DEFAULT_TIE_RULE
    if dropped:
        metrics["dropped_videos"] = dropped
        logger.warning("%d evaluation videos could not be read and were left out: %s", len(dropped), dropped)
    if rerank_topk > 0 and model.fusion is not None:
        groups = t2v if v2t_protocol == "group" else None
        t2v_scores, v2t_scores = rerank_similarity(model, enc, sim, keep_t, keep_v, rerank_topk, dist, groups)
        metrics.update(rerank_metrics(t2v_scores, v2t_scores, t2v, v2t_protocol))
        metrics["rerank_topk"] = rerank_topk
    return metrics


def rerank_metrics(
    t2v_scores: torch.Tensor, v2t_scores: torch.Tensor, text_to_video: list[int], v2t_protocol: str
) -> dict[str, float]:
    """``rerank_*`` statistics of :func:`rerank_similarity`'s two matrices: ``t2v_scores [Nt, Nv]`` and
    ``v2t_scores`` (``[Nv, Nv groups]`` under ``group``, ``[Nv, Nt]`` under ``caption``)."""
    out = {k: v for k, v in retrieval_metrics(t2v_scores, text_to_video).items() if k.startswith("t2v_")}
    if v2t_protocol == "group":
        out.update(v2t_group_metrics(v2t_scores, DEFAULT_TIE_RULE))
    else:
        caption = retrieval_metrics(v2t_scores.t(), text_to_video, DEFAULT_TIE_RULE, "caption")
        out.update({k: v for k, v in caption.items() if k.startswith("v2t_")})
    return {f"rerank_{k}": v for k, v in out.items()}


def rerank_similarity(
    model: MemBridgeModel,
    enc: EncodedEvalSet,
    sim: torch.Tensor,
    keep_t: torch.Tensor,
    keep_v: torch.Tensor,
    topk: int,
    dist: DistInfo,
    v2t_groups: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank the top-k of every query in both directions with the fusion's VTM match probability; the queries are
    sharded across ranks and the rows gathered. Returns ``(t2v [Nt, Nv], v2t)`` on the CPU: ``v2t [Nv, Nt]`` over
    captions, or with ``v2t_groups`` (each kept caption's kept-video index) ``[Nv, Nv groups]`` over caption groups
    (module docstring)."""
    check_rerank_range(sim)
    device = dist.device
    kt, kv = keep_t.to(device), keep_v.to(device)
    extra = None if enc.video_tokens is None else enc.video_tokens[kv]
    extra_mask = None if enc.video_token_mask is None else enc.video_token_mask[kv]
    match_prob = model.fusion.pair_match_fn(
        enc.frame_feats[kv], enc.video_mask[kv], enc.text_tokens[kt], enc.text_mask[kt], enc.text_feats[kt], extra,
        extra_mask,
    )  # fmt: skip
    scores = sim.to(device)
    mine = shard_indices(scores.shape[0], dist.rank, dist.world_size)
    queries = torch.arange(mine.start, mine.stop, device=device)
    t2v = gather_eval_rows(rerank_queries(scores, match_prob, topk, queries, False), mine, scores.shape[0]).cpu()
    n_video = scores.shape[1]
    mine = shard_indices(n_video, dist.rank, dist.world_size)
    queries = torch.arange(mine.start, mine.stop, device=device)
    if v2t_groups is None:
        part = rerank_queries(scores.t(), match_prob, topk, queries, True)
    else:
        part = rerank_group_queries(scores, v2t_groups, match_prob, topk, queries)
    return t2v, gather_eval_rows(part, mine, n_video).cpu()


def rerank_group_queries(
    sim: torch.Tensor,
    text_to_video: list[int] | torch.Tensor,
    match_prob,
    topk: int,
    queries: torch.Tensor,
    query_chunk: int = DEFAULT_RERANK_QUERY_CHUNK,
) -> torch.Tensor:
    """Group-protocol video->text re-ranking: rows ``[len(queries), Nv groups]`` for the given video queries.

    ``sim [Nt, Nv]``; ``match_prob(text_idx [Q, n], video_idx [Q, n]) -> [Q, n]`` as for ``rerank_queries``. Each
    video's top-k caption groups (by :func:`engine.metrics.group_scores`) get ``softmax(G_top) * RERANK_SCALE *
    p_group + RERANK_OFFSET`` with ``p_group`` the best match probability over the group's captions; other groups keep
    their group score. A row depends only on its own query, so queries can be split across ranks and chunks.
    """
    owner = torch.as_tensor(text_to_video, dtype=torch.long, device=sim.device)
    scores = group_scores(sim, owner)  # [Nv, Nv groups]
    table = caption_groups(owner.cpu(), sim.shape[1]).to(sim.device)  # [Nv groups, max_caps]
    width = table.shape[1]

    def group_match_prob(group_idx: torch.Tensor, video_idx: torch.Tensor) -> torch.Tensor:
        q, k = group_idx.shape
        texts = table[group_idx].reshape(q, k * width)  # every caption of the query's k candidate groups
        videos = video_idx[:, :, None].expand(q, k, width).reshape(q, k * width)
        return match_prob(texts, videos).reshape(q, k, width).amax(-1)

    # the same number of VTM pairs per pass as the caption direction's default chunk
    return rerank_queries(scores, group_match_prob, topk, queries, True, max(1, query_chunk // width))


MetricsHook = Callable[[MemBridgeModel, EncodedEvalSet, RetrievalEvalSet, DistInfo], dict]


class RetrievalEvaluator:
    """``evaluate(task) -> metrics`` of one retrieval split for the engine: encode it once, the dual-encoder metrics,
    the re-ranked ones (with a fusion and ``rerank_topk > 0``) and ``extra(model, encoded, eval_set, dist)`` (stage 2:
    the held-out fusion accuracies, on the same features). ``frame_topk`` / ``frame_weight``: HMMC's frame term
    (:func:`dual_similarity`)."""

    def __init__(
        self,
        eval_set: RetrievalEvalSet,
        dist: DistInfo,
        settings: EvalSettings,
        rerank_topk: int = 0,
        extra: MetricsHook | None = None,
        frame_topk: int = 0,
        frame_weight: float = 1.0,
    ) -> None:
        self.eval_set = eval_set
        self.dist = dist
        self.settings = settings
        self.rerank_topk = rerank_topk
        self.extra = extra
        self.frame_topk = frame_topk
        self.frame_weight = frame_weight

    def __call__(self, task: nn.Module) -> dict:
        model = getattr(task, "model", task)
        s = self.settings
        enc = encode_eval_set(model, self.eval_set, s.batch_size, s.num_workers, self.dist, s.allow_missing)
        metrics = evaluate_retrieval(
            model, self.eval_set, self.dist, s.batch_size, rerank_topk=self.rerank_topk, encoded=enc,
            v2t_protocol=s.v2t_protocol, frame_topk=self.frame_topk, frame_weight=self.frame_weight,
        )  # fmt: skip
        if self.extra is not None:
            metrics.update(self.extra(model, enc, self.eval_set, self.dist))
        return metrics
