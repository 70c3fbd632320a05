"""Stage-2 pre-training task (VTM + MLM + PLM through the bridge fusion) and its held-out evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from engine.distributed import (
    DistInfo,
    all_gather_object,
    all_gather_tensor,
    all_gather_with_grad,
    get_rank,
    get_world_size,
    shard_indices,
)
from modules.fusion import eot_positions
from modules.membridge import (
    CACHED_VIDEO_TOKEN_MASK_KEY,
    CACHED_VIDEO_TOKENS_KEY,
    STAGE2_DRAWS_KEY,
    MemBridgeModel,
    Stage2Draws,
    Stage2Weights,
    stage2_draw_columns,
)

HELD_OUT_BATCH = 32  # pairs per held-out VTM/MLM/PLM batch (hard negatives are drawn within it)
HELD_OUT_SEED = 1234  # fixed draws (masks, suffixes, negatives) so held-out accuracies are comparable across runs
ACCURACY_KEYS = ("vtm_acc", "mlm_acc", "plm_acc")


def attach_stage2_draws(dataset: Any, max_words: int) -> None:
    """Make every training item carry its stage-2 random draws (``stage2_draws`` float64 ``[2 L + 4]``, columns in
    :func:`modules.membridge.stage2_draw_columns`): MLM masks, the PLM suffix start, the VTM negatives and the pair's
    order key. They come from a child of the item's own generator (seeded by run seed, epoch and sample index;
    ``Generator.spawn`` does not depend on what the frame sampling drew), so they are the same whatever the number of
    ranks or the feature cache, and a resumed run draws what an uninterrupted one would. Composes with a
    per-caption hook already set (e.g. ``--tag_file``)."""
    previous = dataset.extra_items
    width = stage2_draw_columns(max_words)["order"].stop

    def items(video_id: str, caption: str, rng: np.random.Generator) -> dict:
        item = dict(previous(video_id, caption, rng)) if previous is not None else {}
        item[STAGE2_DRAWS_KEY] = torch.from_numpy(rng.spawn(1)[0].random(width))
        return item

    dataset.extra_items = items


class FusionPretrainTask(nn.Module):
    """``loss = w_vtm * VTM + w_mlm * MLM + w_plm * PLM`` on frozen, detached CLIP features (DESIGN 2.6).

    Random draws (MLM masks, PLM suffix starts, hard negatives) come with the batch (:func:`attach_stage2_draws`,
    per sample: the same with any number of ranks); without them the global torch RNG draws them, which checkpoints
    save, so a resumed run draws what an uninterrupted one would. Means (losses, accuracies) are over the global
    batch (:func:`modules.membridge.global_mean`). Dropout masks of the heads are drawn per rank: a multi-rank run
    equals a one-process run exactly only with ``--head_dropout 0`` (and without ``--official_quirks``, whose Q2
    normalisation runs over each rank's rows), otherwise in distribution.
    """

    def __init__(self, model: MemBridgeModel, weights: Stage2Weights):
        super().__init__()
        if model.fusion is None:
            raise ValueError("stage 2 needs a model with a fusion encoder")
        self.model = model
        self.weights = weights
        model.freeze_encoder()

    def forward(
        self, batch: dict, draws: Stage2Draws | None = None, return_details: bool = False
    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Losses of one local batch (:meth:`MemBridgeModel.stage2_losses`): ``draws`` replaces the random draws it
        gives (e.g. those of a published run, to reproduce it step by step), ``return_details`` also returns the
        intermediate tensors (fusion inputs and masks, memory-read attention, VTM / MLM / PLM logits and targets,
        the draws used) as ``(losses, details)``."""
        world = get_world_size()
        local = batch["video_mask"].shape[0]
        return self.model.stage2_losses(
            batch,
            weights=self.weights,
            gather=all_gather_tensor if world > 1 else None,
            local_offset=get_rank() * local,
            draws=draws,
            return_details=return_details,
            gather_with_grad=all_gather_with_grad if world > 1 else None,
        )

    def train(self, mode: bool = True) -> FusionPretrainTask:
        super().train(mode)
        self.model.encoder.eval()  # frozen CLIP: no dropout, as a feature extractor
        return self


@torch.no_grad()
def held_out_accuracies(
    model: MemBridgeModel,
    frame_feats: torch.Tensor,
    video_mask: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    text_tokens: torch.Tensor,
    text_to_video: list[int],
    dist: DistInfo,
    video_tokens: torch.Tensor | None = None,
    video_token_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """VTM / MLM / PLM accuracy (%) on held-out (caption, video) pairs, batches sharded across ranks.

    ``text_tokens [Nt, L, D]`` are the captions' per-position CLIP features, already computed by the retrieval
    evaluation (``encode_eval_set``); they are reused, not recomputed, as are ``video_tokens [Nv, K, D]`` (T2VLP
    tubes, STOA objects, with the videos) and their key mask ``video_token_mask [Nv, K]``.

    ``heldout_vtm_acc``: the training task's accuracy (1 positive + 2 hard negatives per pair, so always answering
    "no match" scores 66.7%). ``heldout_vtm_pair_acc``: how often a caption's match score with its own video exceeds
    that with its hardest other video (the most similar one under the dual encoder, i.e. the kind of negative VTM
    trains on and re-ranking must separate); chance 50%. ``heldout_vtm_random_acc``: VTM as a classifier on balanced
    pairs, each caption with its own video and with one random other video (fixed draw); a constant answer scores
    50%.

    The pair and random accuracies score each (caption, video) pair alone, so their VTM head always normalises the
    text vector by itself (``intended_norm``): under ``--official_quirks`` the published Q2 normalisation over a
    group of one row would replace the text feature by its sign vector, a number about nothing. The Q1 positional
    layout of ``--official_quirks`` is kept: it is the layout the weights were trained and are re-ranked with, not a
    degenerate computation. ``heldout_vtm_acc`` is the training objective itself (Q2 over the batch's rows included).
    """
    n = len(text_to_video)
    starts = list(range(0, n, HELD_OUT_BATCH))
    mine = shard_indices(len(starts), dist.rank, dist.world_size)
    sums = {key: 0.0 for key in (*ACCURACY_KEYS, "vtm_pair_acc", "vtm_random_acc")}
    offsets = torch.randint(1, max(2, len(frame_feats)), (n,), generator=torch.Generator().manual_seed(HELD_OUT_SEED))
    random_video = (torch.as_tensor(text_to_video) + offsets) % len(frame_feats)  # never the caption's own video
    count = 0
    t_eot = text_tokens[torch.arange(len(text_tokens), device=text_tokens.device), eot_positions(text_mask)]
    sim = model.encoder.similarity_logits(t_eot, frame_feats, video_mask)  # [Nt, Nv], hardest negatives from it
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(HELD_OUT_SEED + dist.rank)
    try:
        for b in mine:
            idx = torch.arange(starts[b], min(starts[b] + HELD_OUT_BATCH, n), device=text_ids.device)
            vid = torch.as_tensor([text_to_video[i] for i in idx.tolist()], device=frame_feats.device)
            batch = {
                "frame_feats": frame_feats[vid],
                "video_mask": video_mask[vid],
                "text_ids": text_ids[idx],
                "text_mask": text_mask[idx],
            }
            if video_tokens is not None:
                batch[CACHED_VIDEO_TOKENS_KEY] = video_tokens[vid]
            if video_token_mask is not None:
                batch[CACHED_VIDEO_TOKEN_MASK_KEY] = video_token_mask[vid]
            out = model.stage2_losses(batch, weights=Stage2Weights())
            for key in ACCURACY_KEYS:
                sums[key] += float(out[key]) * len(idx)
            pair_wins, random_correct = _pair_decisions(
                model, frame_feats, video_mask, vid, random_video[idx.cpu()].to(vid.device),
                text_tokens[idx], text_mask[idx], t_eot[idx], sim[idx], video_tokens, video_token_mask,
            )  # fmt: skip
            sums["vtm_pair_acc"] += pair_wins
            sums["vtm_random_acc"] += random_correct
            count += len(idx)
    finally:
        torch.random.set_rng_state(generator_state)
    totals = all_gather_object({"sums": sums, "count": count})
    total = sum(t["count"] for t in totals)
    return {f"heldout_{key}": 100.0 * sum(t["sums"][key] for t in totals) / max(1, total) for key in sums}


def _pair_decisions(
    model: MemBridgeModel,
    frame_feats: torch.Tensor,
    video_mask: torch.Tensor,
    vid: torch.Tensor,
    random_vid: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    t_eot: torch.Tensor,
    sim: torch.Tensor,
    video_tokens: torch.Tensor | None = None,
    video_token_mask: torch.Tensor | None = None,
) -> tuple[int, float]:
    """For captions whose own videos are ``vid``: how many match their own video better than their hardest other
    video (the most similar under the dual-encoder similarity ``sim [b, Nv]``), and how many of the 2b balanced
    decisions (own video: match; ``random_vid``: no match) are right, counted as halves per caption. Each pair is
    scored alone, with the intended per-vector text normalisation (see :func:`held_out_accuracies`)."""
    hardest = sim.clone().index_put_((torch.arange(len(vid), device=vid.device), vid), torch.tensor(float("-inf")))
    hardest = hardest.argmax(dim=1)
    margins = []  # match - unmatch logit: finer than the probability, which saturates to exactly 0 or 1
    for videos in (vid, hardest, random_vid):
        extra = None if video_tokens is None else video_tokens[videos]
        extra_mask = None if video_token_mask is None else video_token_mask[videos]
        logits = model.fusion.match_logits(
            frame_feats[videos], video_mask[videos], text_tokens, text_mask, t_eot, intended_norm=True,
            extra_tokens=extra, extra_mask=extra_mask,
        ).float()  # fmt: skip
        margins.append(logits[:, 1] - logits[:, 0])
    own, hard, rand = margins
    return int((own > hard).sum()), 0.5 * float((own > 0).sum() + (rand < 0).sum())


def held_out_metrics(model: MemBridgeModel, enc, eval_set, dist: DistInfo) -> dict[str, float]:
    """:func:`held_out_accuracies` on the features a retrieval evaluation already computed (``enc``:
    ``EncodedEvalSet``), for the captions whose video could be read."""
    readable = [i for i, v in enumerate(eval_set.text_to_video) if bool(enc.video_ok[v])]
    return held_out_accuracies(
        model, enc.frame_feats, enc.video_mask, enc.text_ids[readable], enc.text_mask[readable],
        enc.text_tokens[readable], [eval_set.text_to_video[i] for i in readable], dist, enc.video_tokens,
        enc.video_token_mask,
    )  # fmt: skip
