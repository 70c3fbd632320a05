"""MemBridge fusion: config, masks, memory read, heads, hard negatives, MLM masking, re-ranking, stage-2 losses
and the ``official_quirks`` switch against a plain transcription of the published forward."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dataloaders.errors import ConfigError
from modules.fusion import (
    IGNORE_INDEX,
    RERANK_OFFSET,
    FusionConfig,
    FusionInputs,
    MemBridgeFusion,
    draw_plm_starts,
    fusion_attention_mask,
    mlm_mask,
    rerank,
    sample_hard_negatives,
)
from modules.membridge import Stage2Weights
from tests import published_reference as ref
from tests.fusion_fixtures import FRAMES, REPO, WORDS, stage2_batch, text_batch, tiny_config, tiny_model

ATOL = 1e-5
BLOCK, BLOCKS = 6, 1000
D = 64


def _features(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    _, text_mask = text_batch([WORDS] * b, seed=seed)
    text_mask[0, 5:] = 0
    video_mask = torch.ones(b, FRAMES, dtype=torch.long)
    video_mask[-1, -1] = 0
    return {
        "frame_feats": torch.randn(b, FRAMES, D, generator=gen),
        "video_mask": video_mask,
        "text_feats": torch.randn(b, WORDS, D, generator=gen),
        "text_mask": text_mask,
        "t_eot": torch.randn(b, D, generator=gen),
    }


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------


def test_config_from_folder_file_and_overrides(tmp_path):
    published = FusionConfig.from_json(REPO / "CLIP-modules")
    assert (published.width, published.layers, published.num_heads, published.seq_len) == (512, 6, 8, 53)
    tiny = FusionConfig.from_json(REPO / "CLIP-modules" / "fusion-tiny.json", bridge_source="none", layers=None)
    assert tiny.layers == 2 and tiny.num_bridges == 0 and tiny.seq_len == FRAMES + 1 + WORDS
    (tmp_path / "fusion.json").write_text(json.dumps({"width": 64, "colour": 1}))
    with pytest.raises(ConfigError, match="colour"):
        FusionConfig.from_json(tmp_path)
    with pytest.raises(ConfigError, match="context_length"):
        FusionConfig(max_words=70)
    with pytest.raises(ConfigError, match="not found"):
        FusionConfig.from_json(tmp_path / "missing.json")


def test_width_mismatch_with_clip_is_a_config_error():
    model = tiny_model()
    with pytest.raises(ConfigError, match="width"):
        MemBridgeFusion(tiny_config(width=128, heads=2)).init_from_clip(model.encoder.clip)


# ---------------------------------------------------------------------------------------------------------------
# attention mask
# ---------------------------------------------------------------------------------------------------------------


def _mask_reference(video_mask, text_mask, k, causal, prefix):
    """Entry by entry: which column each row sees (1) under the rules of DESIGN §2.3 / §2.6."""
    b, t = video_mask.shape
    length = text_mask.shape[1]
    n = t + 1 + k + length
    out = torch.zeros(b, n, n)
    for s in range(b):
        for r in range(n):
            for c in range(n):
                kind = lambda i: "v" if i <= t else ("b" if i < t + 1 + k else "t")  # noqa: E731
                col_valid = (c >= t or video_mask[s, c]) and (c < t + 1 + k or text_mask[s, c - t - 1 - k])
                rk, ck = kind(r), kind(c)
                if k and {rk, ck} == {"v", "t"}:
                    seen = False
                elif causal and rk == ck == "t":
                    seen = c <= r
                else:
                    seen = bool(col_valid)
                readers = "b" if k else "v"
                if prefix is not None and rk == readers and ck == "t":
                    p = prefix if isinstance(prefix, int) else int(prefix[s])
                    seen = c - t - 1 - k <= p + 1
                out[s, r, c] = float(seen)
    return out


@pytest.mark.parametrize(
    "k,causal,prefix", [(2, False, None), (2, True, 3), (2, True, torch.tensor([0, 5])), (0, False, None), (0, True, 2)]
)
def test_attention_mask_matches_rules(k, causal, prefix):
    video_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
    mask = fusion_attention_mask(video_mask, text_mask, k, causal, prefix)
    assert mask.shape == (2, 1, 3 + 1 + k + 7, 3 + 1 + k + 7)
    visible = (mask[:, 0] == 0).float()
    assert torch.equal(visible, _mask_reference(video_mask, text_mask, k, causal, prefix))
    assert set(mask.unique().tolist()) <= {0.0, float("-inf")}


def test_fusion_information_flows_only_through_bridges():
    f = _features(2)
    n_video, text0 = FRAMES + 1, FRAMES + 1 + 2
    gen = torch.Generator().manual_seed(1)
    # same t_eot and v_sep: the bridge inputs are held fixed
    other_text = dict(f, text_feats=f["text_feats"] + torch.randn(f["text_feats"].shape, generator=gen))
    other_video = dict(f, frame_feats=f["frame_feats"] + torch.randn(f["frame_feats"].shape, generator=gen))
    for source in ("memory", "learned"):
        fusion = MemBridgeFusion(tiny_config(layers=1, bridge_source=source)).eval()
        base = fusion.fuse(FusionInputs(**f, mode="vtm"))
        out = fusion.fuse(FusionInputs(**other_text, mode="vtm"))
        assert torch.allclose(out[:, :n_video], base[:, :n_video], atol=ATOL)
        assert not torch.allclose(out[:, n_video:text0], base[:, n_video:text0], atol=1e-3)
    out = fusion.fuse(FusionInputs(**other_video, mode="vtm"))  # learned bridges do not depend on v_sep
    for s in range(2):
        valid_text = text0 + torch.nonzero(f["text_mask"][s]).squeeze(1)
        assert torch.allclose(out[s, valid_text], base[s, valid_text], atol=ATOL)
    assert not torch.allclose(out[:, n_video:text0], base[:, n_video:text0], atol=1e-3)
    deep = MemBridgeFusion(tiny_config(layers=2)).eval()  # a second layer reads what the bridges gathered
    deep_other, deep_base = deep.fuse(FusionInputs(**other_text, mode="vtm")), deep.fuse(FusionInputs(**f, mode="vtm"))
    assert not torch.allclose(deep_other[:, :n_video], deep_base[:, :n_video])


@pytest.mark.parametrize("mode", ["vtm", "mlm", "plm"])
def test_padded_columns_never_matter(mode):
    fusion = MemBridgeFusion(tiny_config()).eval()
    f = _features(2)
    prefix = 2 if mode == "plm" else None
    base = fusion.fuse(FusionInputs(**f, mode=mode, plm_prefix=prefix))
    noisy = dict(f)
    pad_text = (f["text_mask"] == 0).unsqueeze(-1)
    pad_video = (f["video_mask"] == 0).unsqueeze(-1)
    noisy["text_feats"] = f["text_feats"] + 5.0 * pad_text
    noisy["frame_feats"] = f["frame_feats"] + 5.0 * pad_video
    out = fusion.fuse(FusionInputs(**noisy, mode=mode, plm_prefix=prefix))
    text0 = fusion.text_offset(FRAMES)
    for s in range(2):
        rows = torch.cat([torch.nonzero(f["video_mask"][s]).squeeze(1), torch.arange(FRAMES, text0)])
        if mode != "plm":  # PLM text rows are causal and see padding by design
            rows = torch.cat([rows, text0 + torch.nonzero(f["text_mask"][s]).squeeze(1)])
        assert torch.allclose(out[s, rows], base[s, rows], atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# memory bank and heads
# ---------------------------------------------------------------------------------------------------------------


def test_memory_read_equals_plain_reference_and_is_detached():
    fusion = MemBridgeFusion(tiny_config())
    v_sep = torch.randn(3, D, requires_grad=True)
    t_eot = torch.randn(3, D, requires_grad=True)
    bridges = fusion.bridge_tokens(v_sep, t_eot)
    assert bridges.shape == (3, fusion.config.num_bridge_tokens, D)
    assert torch.allclose(bridges, ref.memory_read(fusion, v_sep, t_eot), atol=ATOL)
    bridges.sum().backward()
    assert v_sep.grad is None and t_eot.grad is None
    assert fusion.memory.grad.abs().sum() > 0 and fusion.query.grad.abs().sum() > 0


def test_vocab_head_equals_formula_and_uses_token_embedding_in_place():
    fusion = MemBridgeFusion(tiny_config())
    emb = torch.randn(fusion.config.vocab_size, D, requires_grad=True)
    h = torch.randn(5, D)
    logits = fusion.vocab_logits(h, emb)
    expected = h @ (fusion.vocab_proj @ emb.t()) + fusion.vocab_bias
    assert torch.allclose(logits, expected, atol=1e-4)
    logits.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert not any(p is emb for p in fusion.parameters())


@pytest.mark.parametrize("quirks", [False, True])
def test_vtm_head_normalisation(quirks):
    fusion = MemBridgeFusion(tiny_config(official_quirks=quirks)).eval()
    v, t = torch.randn(6, D), torch.randn(6, D)
    logits = fusion.vtm_logits(v, t)
    assert torch.allclose(logits, ref.vtm_scores(fusion, v, t, quirks), atol=ATOL)
    alone = fusion.vtm_logits(v[:3], t[:3])
    assert torch.allclose(alone, logits[:3], atol=ATOL) != quirks  # Q2: a row depends on its group
    grouped = fusion.vtm_logits(v, t, group_size=3)
    assert torch.allclose(grouped[:3], alone, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# random draws
# ---------------------------------------------------------------------------------------------------------------


def test_mlm_mask_inner_tokens_only_and_at_least_one():
    ids, mask = text_batch([12, 3, 2, 8] * 50)
    gen = torch.Generator().manual_seed(0)
    masked_ids, labels = mlm_mask(ids, mask, gen, prob=0.15)
    chosen = labels != IGNORE_INDEX
    eot = mask.sum(1) - 1
    positions = torch.arange(WORDS).unsqueeze(0)
    assert not (chosen & ((positions < 1) | (positions >= eot.unsqueeze(1)))).any()
    has_inner = eot >= 2
    assert chosen[has_inner].any(1).all() and not chosen[~has_inner].any()
    assert torch.equal(masked_ids[chosen], torch.zeros(int(chosen.sum()), dtype=torch.long))
    assert torch.equal(masked_ids[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    rate = chosen[0::4].float().sum() / (50 * 10)
    assert 0.1 < rate < 0.25  # 15% of 10 inner tokens, plus the rare forced one


def test_plm_starts_are_uniform_in_range():
    _, mask = text_batch([6] * 4000)
    starts = draw_plm_starts(mask, torch.Generator().manual_seed(0))
    counts = torch.bincount(starts, minlength=6)
    assert counts[0] == 0 and counts[1:6].min() > 700


def test_hard_negatives_never_the_positive_and_follow_softmax():
    # block-circulant similarities: every row has the same logits per offset (j - i) mod BLOCK, so one call
    # gives BLOCKS samples of one distribution; offset 0 (the positive) would win every draw if kept
    base = torch.randn(BLOCK, generator=torch.Generator().manual_seed(1)) * 2
    base[0] = 50.0
    idx = torch.arange(BLOCK * BLOCKS)
    same_block = (idx.unsqueeze(1) // BLOCK) == (idx.unsqueeze(0) // BLOCK)
    sim = torch.where(same_block, base[(idx.unsqueeze(0) - idx.unsqueeze(1)) % BLOCK], float("-inf"))
    neg_v, neg_t = sample_hard_negatives(sim, 0, idx.shape[0], torch.Generator().manual_seed(0))
    assert not (neg_v == idx).any() and not (neg_t == idx).any()
    expected = torch.cat([torch.zeros(1), base[1:].softmax(0)])
    for offsets in ((neg_v - idx) % BLOCK, (idx - neg_t) % BLOCK):
        freq = torch.bincount(offsets, minlength=BLOCK).float() / idx.shape[0]
        assert freq[0] == 0 and torch.allclose(freq, expected, atol=0.05)  # > 3 sigma over BLOCKS draws


def test_hard_negatives_with_one_local_pair_on_a_global_sim():
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(4, 4)
    for offset in range(4):
        for _ in range(50):
            neg_v, neg_t = sample_hard_negatives(sim, offset, 1, gen)
            assert neg_v.shape == (1,) and neg_v.item() != offset and neg_t.item() != offset
    with pytest.raises(ConfigError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), 0, 1, gen)


# ---------------------------------------------------------------------------------------------------------------
# re-ranking
# ---------------------------------------------------------------------------------------------------------------


def _rerank_reference(sim, p_table, topk):
    t2v, v2t = sim.clone(), sim.t().clone()
    for q in range(sim.shape[0]):
        cands = torch.topk(sim[q], topk).indices
        t2v[q, cands] = torch.softmax(sim[q, cands], -1) * 1000.0 * p_table[q, cands] + 1000.0
    for q in range(sim.shape[1]):
        cands = torch.topk(sim[:, q], topk).indices
        v2t[q, cands] = torch.softmax(sim[cands, q], -1) * 1000.0 * p_table[cands, q] + 1000.0
    return t2v, v2t


def test_rerank_equals_per_query_reference_and_ranks_candidates_first():
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(7, 5, generator=gen) * 20
    p_table = torch.rand(7, 5, generator=gen)
    t2v, v2t = rerank(sim, lambda ti, vi: p_table[ti, vi], topk=3, query_chunk=2)
    exp_t2v, exp_v2t = _rerank_reference(sim, p_table, 3)
    assert torch.allclose(t2v, exp_t2v) and torch.allclose(v2t, exp_v2t)
    for scores, base in ((t2v, sim), (v2t, sim.t())):
        top = base.topk(3, dim=1).indices
        is_cand = torch.zeros_like(base, dtype=torch.bool).scatter_(1, top, True)
        assert (scores.masked_fill(~is_cand, float("inf")).min(1).values >= RERANK_OFFSET).all()
        assert torch.equal(scores[~is_cand], base[~is_cand])
    full_t2v, _ = rerank(sim, lambda ti, vi: p_table[ti, vi], topk=50)
    assert (full_t2v >= RERANK_OFFSET).all()
    same, same_t = rerank(sim, lambda ti, vi: p_table[ti, vi], topk=0)
    assert torch.equal(same, sim) and torch.equal(same_t, sim.t())


# ---------------------------------------------------------------------------------------------------------------
# stage 2: gradients and the official quirks
# ---------------------------------------------------------------------------------------------------------------

LENGTHS = [6, 12, 3]


def test_vtm_negative_scale_multiplies_the_sampling_logits(monkeypatch):
    """``Stage2Weights.vtm_negative_scale`` (``--vtm_negative_scale``) scales the similarity the negatives are drawn
    from: 1 is the published sampling, 0 uniform over the other pairs."""
    import modules.membridge as membridge

    seen = []
    real = membridge.sample_hard_negatives
    monkeypatch.setattr(membridge, "sample_hard_negatives", lambda sim, *a: seen.append(sim.clone()) or real(sim, *a))
    model = tiny_model()
    for scale in (1.0, 0.25, 0.0):
        weights = Stage2Weights(vtm=1.0, mlm=0.0, plm=0.0, vtm_negative_scale=scale)
        model.stage2_losses(stage2_batch(LENGTHS), torch.Generator().manual_seed(0), weights=weights)
    published = seen[0]
    assert published.abs().max() > 0
    assert torch.allclose(seen[1], 0.25 * published) and torch.equal(seen[2], torch.zeros_like(published))
    assert Stage2Weights().vtm_negative_scale == 1.0
    neg_v, neg_t = sample_hard_negatives(torch.zeros(6, 6), 0, 6, torch.Generator().manual_seed(0))
    assert not (neg_v == torch.arange(6)).any() and not (neg_t == torch.arange(6)).any()


@pytest.mark.parametrize("bridge_source", ["memory", "learned", "none"])
def test_stage2_gradients_reach_every_fusion_parameter_and_no_clip_parameter(bridge_source):
    model = tiny_model(bridge_source=bridge_source)
    out = model.stage2_losses(stage2_batch(LENGTHS), torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "vtm", "mlm", "plm", "vtm_acc", "mlm_acc", "plm_acc"}
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    for name, param in model.fusion.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # positional rows: the sequence rows get gradient except v_sep (never given a positional embedding by
    # default); the table rows beyond the sequence are unused
    k = model.fusion.num_bridges
    n = FRAMES + 1 + k + WORDS
    row_grad = model.fusion.positional_embedding.grad.abs().sum(1)
    used = torch.ones(row_grad.shape[0], dtype=torch.bool)
    used[FRAMES] = False
    used[n:] = False
    assert (row_grad[used] > 0).all() and (row_grad[~used] == 0).all()
    names = {name for name, _ in model.fusion.named_parameters()}
    assert ("memory" in names) == (bridge_source == "memory")
    assert ("learned_bridges" in names) == (bridge_source == "learned")


def _published_stage2(model, batch, seed, quirks):
    """Stage 2 as the published forward computes it (same random draws as ours)."""
    clip, fusion = model.encoder.clip, model.fusion
    gen = torch.Generator().manual_seed(seed)
    ids, mask, vmask = batch["text_ids"], batch["text_mask"], batch["video_mask"]
    with torch.no_grad():
        frames = model.encoder.encode_video(batch["video"], vmask)
    _, labels = mlm_mask(ids, mask, gen, fusion.config.mlm_prob)
    mlm = ref.mlm(fusion, clip, frames, vmask, ids, mask, labels)
    starts = draw_plm_starts(mask, gen)
    plm = ref.plm(fusion, clip, frames, vmask, ids, mask, starts, quirks)
    with torch.no_grad():
        text_tokens = clip.encode_text_tokens(ids)
    t_sep = text_tokens[torch.arange(ids.shape[0]), mask.sum(1) - 1]
    sim = ref.loose_similarity(clip, t_sep, frames, vmask)
    neg_v, neg_t = sample_hard_negatives(sim, 0, ids.shape[0], gen)
    vid, tid = [], []
    for b in range(ids.shape[0]):  # published row order: positive, text->video negative, video->text negative
        vid += [b, int(neg_v[b]), b]
        tid += [b, b, int(neg_t[b])]
    vtm = ref.vtm_rows(fusion, frames[vid], vmask[vid], text_tokens[tid], mask[tid], t_sep[tid], quirks)
    targets = torch.tensor([1, 0, 0] * ids.shape[0])
    vtm_loss = F.cross_entropy(vtm["logits"], targets)
    return {"mlm": mlm, "plm": plm, "vtm": vtm, "vtm_loss": vtm_loss, "loss": vtm_loss + mlm["loss"] + plm["loss"]}


def _fusion_grads(model):
    return {name: p.grad.clone() for name, p in model.fusion.named_parameters()}


@pytest.mark.parametrize("quirks", [True, False])
def test_official_quirks_reproduce_the_published_forward(quirks):
    batch = stage2_batch(LENGTHS, seed=3)
    model = tiny_model(seed=1, official_quirks=True)
    published = _published_stage2(model, batch, seed=5, quirks=quirks)
    published["loss"].backward()
    published_grads = _fusion_grads(model)
    model.zero_grad()
    model.fusion.config.official_quirks = quirks
    ours = model.stage2_losses(batch, torch.Generator().manual_seed(5))
    ours["loss"].backward()
    for key in ("mlm", "plm"):
        assert torch.allclose(ours[key], published[key]["loss"], atol=ATOL), key
    assert torch.allclose(ours["vtm"], published["vtm_loss"], atol=ATOL)
    for name, grad in _fusion_grads(model).items():
        assert torch.allclose(grad, published_grads[name], atol=ATOL), name


def test_official_quirks_flag_changes_vtm_and_plm_gradients():
    batch = stage2_batch(LENGTHS, seed=3)
    model = tiny_model(seed=1, official_quirks=True)
    published = _published_stage2(model, batch, seed=5, quirks=True)
    published["loss"].backward()
    published_grads = _fusion_grads(model)
    model.zero_grad()
    model.fusion.config.official_quirks = False
    ours = model.stage2_losses(batch, torch.Generator().manual_seed(5))
    ours["loss"].backward()
    assert torch.allclose(ours["mlm"], published["mlm"]["loss"], atol=ATOL)  # MLM has no quirk
    assert torch.allclose(ours["plm"], published["plm"]["loss"], atol=ATOL)  # Q3 changes gradients only
    assert not torch.allclose(ours["vtm"], published["vtm_loss"], atol=1e-4)
    grads = _fusion_grads(model)
    pos_rows = slice(0, FRAMES)  # Q3: PLM leaves the video positional rows without gradient
    assert not torch.allclose(
        grads["positional_embedding"][pos_rows], published_grads["positional_embedding"][pos_rows]
    )


@pytest.mark.parametrize("quirks", [True, False])
def test_vtm_and_mlm_intermediates_match_the_reference(quirks):
    model = tiny_model(seed=2, official_quirks=quirks)
    fusion, clip = model.fusion, model.encoder.clip
    batch = stage2_batch(LENGTHS, seed=4)
    ids, mask, vmask = batch["text_ids"], batch["text_mask"], batch["video_mask"]
    frames = model.frame_features(batch)
    text_tokens, t_eot = model.text_features(ids, mask)
    assert torch.allclose(t_eot, clip.encode_text(ids), atol=ATOL)  # EOT by mask == EOT by argmax
    rows = [0, 1, 2, 0]
    expected = ref.vtm_rows(
        fusion, frames[rows], vmask[rows], text_tokens[[1, 1, 0, 2]], mask[[1, 1, 0, 2]], t_eot[[1, 1, 0, 2]], quirks
    )
    v_sep = ref.masked_mean(frames[rows], vmask[rows])
    assert torch.allclose(fusion.bridge_tokens(v_sep, t_eot[[1, 1, 0, 2]]), expected["bridges"], atol=ATOL)
    hidden = fusion.fuse(
        FusionInputs(
            frames[rows], vmask[rows], text_tokens[[1, 1, 0, 2]], mask[[1, 1, 0, 2]], t_eot[[1, 1, 0, 2]], mode="eval"
        )
    )
    assert torch.allclose(hidden, expected["hidden"], atol=ATOL)
    logits = fusion.match_logits(
        frames[rows], vmask[rows], text_tokens[[1, 1, 0, 2]], mask[[1, 1, 0, 2]], t_eot[[1, 1, 0, 2]]
    )
    assert torch.allclose(logits, expected["logits"], atol=ATOL)
    _, labels = mlm_mask(ids, mask, torch.Generator().manual_seed(0))
    masked_ids = ids.masked_fill(labels != IGNORE_INDEX, 0)
    masked_tokens, masked_eot = model.text_features(masked_ids, mask)
    expected = ref.mlm(fusion, clip, frames, vmask, ids, mask, labels)
    hidden = fusion.fuse(
        FusionInputs(
            frames,
            vmask,
            masked_tokens.masked_fill((labels != IGNORE_INDEX).unsqueeze(-1), 0.0),
            mask,
            masked_eot,
            mode="mlm",
        )
    )
    assert torch.allclose(hidden, expected["hidden"], atol=ATOL)
    loss, _ = fusion.mlm_loss(frames, vmask, masked_tokens, mask, masked_eot, labels, clip.token_embedding.weight)
    assert torch.allclose(loss, expected["loss"], atol=ATOL)


@pytest.mark.parametrize("quirks", [True, False])
def test_rerank_matches_published_evaluation(quirks):
    model = tiny_model(seed=3, official_quirks=True)
    fusion = model.fusion.eval()
    batch = stage2_batch([5, 12, 3, 7, 9], seed=6)
    ids, mask, vmask = batch["text_ids"], batch["text_mask"], batch["video_mask"]
    frames = model.frame_features(batch)
    text_tokens, t_eot = model.text_features(ids, mask)
    sim = model.encoder.similarity_logits(t_eot, frames, vmask)
    assert torch.allclose(sim, ref.loose_similarity(model.encoder.clip, t_eot, frames, vmask), atol=1e-4)
    with torch.no_grad():
        published = ref.rerank(fusion, sim, frames, vmask, text_tokens, mask, t_eot, 3, quirks)
        fusion.config.official_quirks = quirks
        ours = rerank(sim, fusion.pair_match_fn(frames, vmask, text_tokens, mask, t_eot), topk=3, query_chunk=2)
        fusion.config.official_quirks = not quirks
        other = rerank(sim, fusion.pair_match_fn(frames, vmask, text_tokens, mask, t_eot), topk=3)
    for mine, theirs, flipped in zip(ours, published, other, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-3)  # scores near 1000: fp32 resolution ~1e-4
        assert not torch.allclose(flipped, theirs, atol=1e-3)
