"""Batched prefix LM: probe features, targets, equality with the per-prefix loop and the published PLM."""

from __future__ import annotations

import pytest
import torch

from modules.fusion import draw_plm_starts, encode_text_with_probes, plm_targets
from modules.reference import plm_loss_loop
from tests import published_reference as ref
from tests.fusion_fixtures import EOT, WORDS, stage2_batch, text_batch, tiny_model

ATOL = 1e-5
LENGTHS = [5, 12, 2, 8]


def test_plm_targets_cover_the_suffix_from_start_to_eot():
    ids, mask = text_batch([5, 3])
    rows, prefixes, targets = plm_targets(ids, mask, torch.tensor([2, 1]))
    assert rows.tolist() == [0, 0, 0, 1, 1]
    assert prefixes.tolist() == [1, 2, 3, 0, 1]
    assert targets.tolist() == [ids[0, 2], ids[0, 3], EOT, ids[1, 1], EOT]


def test_probe_features_equal_reencoding_each_prefix():
    model = tiny_model()
    clip = model.encoder.clip
    ids, _ = text_batch([12, 7, 3])
    prefixes = torch.tensor([0, 3, 4, 10])
    with torch.no_grad():
        tokens, probes = encode_text_with_probes(clip, ids, prefixes, EOT)
        assert torch.allclose(tokens, clip.encode_text_tokens(ids), atol=ATOL)
        for p, i in enumerate(prefixes.tolist()):
            short = torch.cat([ids[:, : i + 1], torch.full((3, 1), EOT)], dim=1)  # [SOT, w1..wi, EOT]
            assert torch.allclose(probes[:, p], clip.encode_text_tokens(short)[:, i + 1], atol=ATOL)


def _batched_plm(model, batch, starts):
    fusion, clip = model.fusion, model.encoder.clip
    ids, mask = batch["text_ids"], batch["text_mask"]
    prefixes = plm_targets(ids, mask, starts)[1].unique()
    with torch.no_grad():
        tokens, probes = encode_text_with_probes(clip, ids, prefixes, fusion.config.eot_token_id)
    frames = model.frame_features(batch)
    return fusion.plm_loss(
        frames, batch["video_mask"], ids, mask, starts, tokens, probes, prefixes, clip.token_embedding.weight
    )


def _grads(model):
    grads = {name: p.grad.clone() for name, p in model.fusion.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("quirks", [False, True])
def test_batched_plm_equals_the_loop_reference(quirks):
    model = tiny_model(seed=4, official_quirks=quirks)
    batch = stage2_batch(LENGTHS, seed=2)
    starts = draw_plm_starts(batch["text_mask"], torch.Generator().manual_seed(0))
    loss, acc = _batched_plm(model, batch, starts)
    loss.backward()
    batched = _grads(model)
    frames = model.frame_features(batch)
    loop_loss, loop_acc = plm_loss_loop(
        model.fusion, model.encoder.clip, frames, batch["video_mask"], batch["text_ids"], batch["text_mask"], starts
    )
    loop_loss.backward()
    loop = _grads(model)
    assert torch.allclose(loss, loop_loss, atol=ATOL) and torch.equal(acc, loop_acc)
    vtm_only = {"match_matrix", "unmatch_matrix"}
    assert batched.keys() == loop.keys() == {name for name, _ in model.fusion.named_parameters()} - vtm_only
    for name, grad in batched.items():
        assert torch.allclose(grad, loop[name], atol=ATOL), name


@pytest.mark.parametrize("quirks", [False, True])
def test_batched_plm_equals_the_published_plm(quirks):
    model = tiny_model(seed=5, official_quirks=quirks)
    batch = stage2_batch(LENGTHS, seed=7)
    starts = draw_plm_starts(batch["text_mask"], torch.Generator().manual_seed(1))
    loss, _ = _batched_plm(model, batch, starts)
    loss.backward()
    ours = _grads(model)
    frames = model.frame_features(batch)
    published = ref.plm(
        model.fusion,
        model.encoder.clip,
        frames,
        batch["video_mask"],
        batch["text_ids"],
        batch["text_mask"],
        starts,
        quirks,
    )
    published["loss"].backward()
    theirs = _grads(model)
    assert torch.allclose(loss, published["loss"], atol=ATOL)
    for name, grad in ours.items():
        assert torch.allclose(grad, theirs[name], atol=ATOL), name


def test_batched_plm_runs_a_constant_number_of_passes():
    model = tiny_model()
    batch = stage2_batch(LENGTHS)
    starts = draw_plm_starts(batch["text_mask"], torch.Generator().manual_seed(0))
    calls = {"text": 0, "fusion": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    clip, fusion = model.encoder.clip, model.fusion
    clip.encode_text_tokens = counting("text", clip.encode_text_tokens)
    fusion.transformer.forward = counting("fusion", fusion.transformer.forward)
    _batched_plm(model, batch, starts)
    assert calls == {"text": 1, "fusion": 1}
    calls.update(text=0, fusion=0)
    frames = model.frame_features(batch)
    plm_loss_loop(fusion, clip, frames, batch["video_mask"], batch["text_ids"], batch["text_mask"], starts)
    assert calls == {"text": WORDS - 1, "fusion": WORDS - 1}
