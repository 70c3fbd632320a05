"""The fusion API: the FusionInputs bundle, explicit stage-2 draws, ``return_details`` and the held-out VTM metrics
under ``official_quirks``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.distributed import DistInfo
from modules.fusion import (
    FusionInputs,
    draw_plm_starts,
    encode_text_with_probes,
    eot_positions,
    fusion_attention_mask,
    mlm_mask,
    plm_targets,
    sample_hard_negatives,
)
from modules.membridge import Stage2Draws, Stage2Weights
from pretraining.fusion_task import FusionPretrainTask, _pair_decisions, held_out_accuracies
from tests.fusion_fixtures import FRAMES, REPO, WORDS, stage2_batch, tiny_model

ATOL = 1e-5
LENGTHS = [6, 12, 3, 9]
LOSS_KEYS = ("loss", "vtm", "mlm", "plm", "vtm_acc", "mlm_acc", "plm_acc")


def _assert_same_losses(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in LOSS_KEYS:
        assert torch.allclose(a[key], b[key], atol=ATOL), key


# ---------------------------------------------------------------------------------------------------------------
# the input bundle
# ---------------------------------------------------------------------------------------------------------------


def _inputs(b: int = 2, **overrides: object) -> dict[str, object]:
    mask = torch.ones(b, WORDS, dtype=torch.long)
    mask[0, 5:] = 0
    values = {
        "frame_feats": torch.randn(b, FRAMES, 64),
        "video_mask": torch.ones(b, FRAMES, dtype=torch.long),
        "text_feats": torch.randn(b, WORDS, 64),
        "text_mask": mask,
        "t_eot": torch.randn(b, 64),
    }
    return {**values, **overrides}


def test_fusion_inputs_reject_bad_modes_prefixes_and_shapes():
    with pytest.raises(ValueError, match="unknown fusion mode"):
        FusionInputs(**_inputs(), mode="xyz")
    with pytest.raises(ValueError, match="plm_prefix"):
        FusionInputs(**_inputs(), mode="plm")
    with pytest.raises(ValueError, match="plm_prefix"):
        FusionInputs(**_inputs(), mode="vtm", plm_prefix=2)
    with pytest.raises(ValueError, match="t_eot"):
        FusionInputs(**_inputs(t_eot=torch.randn(3, 64)))
    with pytest.raises(ValueError, match="text_feats"):
        FusionInputs(**_inputs(text_feats=torch.randn(2, WORDS - 1, 64)))


@pytest.mark.parametrize("mode", ["vtm", "mlm", "plm", "qa"])
def test_fuse_details_are_the_sequence_and_mask_the_transformer_ran_on(mode):
    model = tiny_model(seed=2)
    fusion = model.fusion.eval()
    prefix = torch.tensor([1, 4]) if mode == "plm" else None
    inputs = FusionInputs(**_inputs(), mode=mode, plm_prefix=prefix)
    hidden, details = fusion.fuse(inputs, return_details=True)
    k, s = fusion.config.num_bridge_tokens, fusion.config.memory_size
    n = FRAMES + 1 + k + WORDS
    assert details["fusion_inputs"].shape == (2, n, 64) and details["attention_mask"].shape == (2, 1, n, n)
    assert torch.equal(
        details["attention_mask"],
        fusion_attention_mask(inputs.video_mask, inputs.text_mask, k, mode == "plm", prefix),
    )
    assert torch.allclose(fusion.transformer(details["fusion_inputs"], details["attention_mask"]), hidden, atol=ATOL)
    assert torch.allclose(hidden, fusion.fuse(inputs), atol=ATOL)
    attention = details["memory_attention"]
    assert attention.shape == (2, k, s) and (attention >= 0).all()
    assert torch.allclose(attention.sum(-1), torch.ones(2, k), atol=ATOL)
    v_sep = (inputs.frame_feats * inputs.video_mask.unsqueeze(-1)).sum(1) / inputs.video_mask.sum(1, keepdim=True)
    bridges = details["fusion_inputs"][:, FRAMES + 1 : FRAMES + 1 + k] - fusion.positional_embedding[FRAMES + 1 :][:k]
    assert torch.allclose(bridges, attention @ fusion.memory, atol=ATOL)
    assert torch.allclose(details["fusion_inputs"][:, FRAMES], v_sep, atol=ATOL)  # v_sep: no positional embedding


def test_qa_inputs_exempt_the_question_eot_not_the_answer_slot():
    fusion = tiny_model().fusion.eval()
    values = _inputs()
    inputs = FusionInputs.for_question(
        values["frame_feats"], values["video_mask"], values["text_feats"], values["text_mask"], values["t_eot"]
    )
    _, details = fusion.fuse(inputs, return_details=True)
    text0 = fusion.text_offset(FRAMES)
    eot = eot_positions(values["text_mask"])  # the question's EOT; the answer slot follows it
    pos = fusion.positional_embedding
    for row in range(2):
        q_eot, slot = text0 + int(eot[row]), text0 + int(eot[row]) + 1
        assert torch.allclose(details["fusion_inputs"][row, q_eot], values["text_feats"][row, eot[row]], atol=ATOL)
        assert torch.allclose(details["fusion_inputs"][row, slot], pos[slot], atol=ATOL)  # zero features + position


# ---------------------------------------------------------------------------------------------------------------
# explicit draws
# ---------------------------------------------------------------------------------------------------------------


def _generator_draws(model, batch, seed: int) -> Stage2Draws:
    """The draws ``stage2_losses`` makes from ``Generator().manual_seed(seed)``, made here by hand in its order."""
    gen = torch.Generator().manual_seed(seed)
    ids, mask = batch["text_ids"], batch["text_mask"]
    masked_ids, labels = mlm_mask(ids, mask, gen, model.fusion.config.mlm_prob)
    starts = draw_plm_starts(mask, gen)
    frames = model.frame_features(batch)
    _, t_eot = model.text_features(ids, mask)
    sim = model.encoder.similarity_logits(t_eot, frames, batch["video_mask"])
    neg_video, neg_text = sample_hard_negatives(sim, 0, ids.shape[0], gen)
    return Stage2Draws(neg_video, neg_text, masked_ids, labels, starts)


def test_given_draws_reproduce_the_generator_run():
    model = tiny_model(seed=1)
    batch = stage2_batch(LENGTHS, seed=3)
    drawn, details = model.stage2_losses(batch, torch.Generator().manual_seed(5), return_details=True)
    draws = _generator_draws(model, batch, seed=5)
    for name in ("neg_video", "neg_text", "mlm_masked_ids", "mlm_labels", "plm_starts"):
        assert torch.equal(details[name], getattr(draws, name)), name
    given = model.stage2_losses(batch, torch.Generator().manual_seed(99), draws=draws)
    _assert_same_losses(given, drawn)
    replayed = model.stage2_losses(batch, draws=Stage2Draws.from_details(details))
    _assert_same_losses(replayed, drawn)
    other = model.stage2_losses(batch, torch.Generator().manual_seed(99))
    assert not torch.allclose(other["loss"], drawn["loss"], atol=1e-4)  # the draws matter


def test_partial_draws_keep_the_generator_order_for_the_rest():
    model = tiny_model(seed=1)
    batch = stage2_batch(LENGTHS, seed=3)
    draws = _generator_draws(model, batch, seed=5)
    starts = torch.tensor([1, 11, 2, 8])  # hand-chosen PLM suffixes; MLM and negatives still come from the seed
    gen = torch.Generator().manual_seed(5)
    ours = model.stage2_losses(batch, gen, draws=Stage2Draws(plm_starts=starts))
    mlm_only = model.stage2_losses(
        batch,
        weights=Stage2Weights(vtm=0.0, plm=0.0),
        draws=Stage2Draws(None, None, draws.mlm_masked_ids, draws.mlm_labels),
    )
    assert torch.allclose(ours["mlm"], mlm_only["mlm"], atol=ATOL)
    fusion, clip = model.fusion, model.encoder.clip
    ids, mask = batch["text_ids"], batch["text_mask"]
    prefixes = plm_targets(ids, mask, starts)[1].unique()
    with torch.no_grad():
        tokens, probes = encode_text_with_probes(clip, ids, prefixes, fusion.config.eot_token_id)
    plm, _ = fusion.plm_loss(
        model.frame_features(batch), batch["video_mask"], ids, mask, starts, tokens, probes, prefixes,
        clip.token_embedding.weight,
    )  # fmt: skip
    assert torch.allclose(ours["plm"], plm, atol=ATOL)


def test_hand_chosen_negatives_change_vtm_as_expected():
    model = tiny_model(seed=1)
    batch = stage2_batch(LENGTHS, seed=3)
    b = len(LENGTHS)
    weights = Stage2Weights(mlm=0.0, plm=0.0)
    rolled = torch.arange(b).roll(1)
    out, details = model.stage2_losses(
        batch, weights=weights, draws=Stage2Draws(neg_video=rolled, neg_text=rolled.roll(1)), return_details=True
    )
    assert torch.equal(details["vtm_video_index"], torch.cat([torch.arange(b), rolled, torch.arange(b)]))
    assert torch.equal(details["vtm_text_index"], torch.cat([torch.arange(b), torch.arange(b), rolled.roll(1)]))
    frames = model.frame_features(batch)
    feats, t_eot = model.text_features(batch["text_ids"], batch["text_mask"])
    vid, tid = details["vtm_video_index"], details["vtm_text_index"]
    expected, match_details = model.fusion.match_logits(
        frames[vid], batch["video_mask"][vid], feats[tid], batch["text_mask"][tid], t_eot[tid], return_details=True
    )
    for key in ("fusion_inputs", "attention_mask", "memory_attention"):
        assert torch.allclose(match_details[key], details[f"vtm_{key}"], atol=ATOL), key
    assert torch.allclose(details["vtm_logits"], expected, atol=ATOL)
    # the positives offered as their own negatives: the three blocks of logits coincide, and the loss is that of
    # answering the same logits once "match" and twice "no match"
    same = torch.arange(b)
    out, details = model.stage2_losses(
        batch, weights=weights, draws=Stage2Draws(neg_video=same, neg_text=same), return_details=True
    )
    blocks = details["vtm_logits"].reshape(3, b, 2)
    assert torch.allclose(blocks[1], blocks[0], atol=ATOL) and torch.allclose(blocks[2], blocks[0], atol=ATOL)
    logp = blocks[0].log_softmax(-1)
    assert torch.allclose(out["vtm"], -(logp[:, 1] + 2 * logp[:, 0]).mean() / 3, atol=ATOL)


def test_bad_draws_are_refused():
    model = tiny_model()
    batch = stage2_batch(LENGTHS)
    with pytest.raises(ValueError, match="neg_video and neg_text together"):
        Stage2Draws(neg_video=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="plm_starts has shape"):
        model.stage2_losses(batch, draws=Stage2Draws(plm_starts=torch.ones(3, dtype=torch.long)))


# ---------------------------------------------------------------------------------------------------------------
# details
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quirks", [False, True])
def test_stage2_details_shapes_and_losses_from_the_returned_logits(quirks):
    model = tiny_model(seed=2, official_quirks=quirks)
    fusion = model.fusion
    batch = stage2_batch(LENGTHS, seed=4)
    b = len(LENGTHS)
    out, details = model.stage2_losses(batch, torch.Generator().manual_seed(0), return_details=True)
    k, s, d = fusion.config.num_bridge_tokens, fusion.config.memory_size, fusion.config.width
    n = FRAMES + 1 + k + WORDS
    rows = {"vtm": 3 * b, "mlm": b, "plm": len(details["plm_rows"])}
    labels = details["mlm_labels"]
    assert details["mlm_logits"].shape == (int((labels != -100).sum()), fusion.config.vocab_size)
    assert details["plm_logits"].shape == (rows["plm"], fusion.config.vocab_size)
    assert details["vtm_logits"].shape == (3 * b, 2)
    for name, r in rows.items():
        assert details[f"{name}_fusion_inputs"].shape == (r, n, d)
        assert details[f"{name}_attention_mask"].shape == (r, 1, n, n)
        attention = details[f"{name}_memory_attention"]
        assert attention.shape == (r, k, s) and torch.allclose(attention.sum(-1), torch.ones(r, k), atol=ATOL)
        loss = F.cross_entropy(details[f"{name}_logits"], details[f"{name}_targets"])
        assert torch.allclose(loss, out[name], atol=ATOL), name
    assert torch.equal(details["mlm_targets"], batch["text_ids"][labels != -100])
    # VTM logits from the returned fusion inputs: transformer, then the head on v_sep and the EOT rows
    hidden = fusion.transformer(details["vtm_fusion_inputs"], details["vtm_attention_mask"])
    tid = details["vtm_text_index"]
    h_eot = hidden[torch.arange(3 * b), fusion.text_offset(FRAMES) + eot_positions(batch["text_mask"][tid])]
    assert torch.allclose(fusion.vtm_logits(hidden[:, FRAMES], h_eot), details["vtm_logits"], atol=ATOL)


def test_task_forward_takes_draws_and_returns_details():
    model = tiny_model(seed=1)
    batch = stage2_batch(LENGTHS, seed=3)
    task = FusionPretrainTask(model, Stage2Weights())
    torch.manual_seed(7)
    first, details = task(batch, return_details=True)
    torch.manual_seed(8)
    again = task(batch, draws=Stage2Draws.from_details(details))
    _assert_same_losses(again, first)
    assert set(first) == set(LOSS_KEYS)


# ---------------------------------------------------------------------------------------------------------------
# held-out VTM metrics under official_quirks
# ---------------------------------------------------------------------------------------------------------------


def _held_out_inputs(model, lengths):
    batch = stage2_batch(lengths, seed=11)
    frames = model.frame_features(batch)
    tokens, t_eot = model.text_features(batch["text_ids"], batch["text_mask"])
    return frames, batch, tokens, t_eot


def test_group_of_one_under_q2_is_the_sign_vector():
    """Why the held-out pair metrics bypass Q2: normalising a text over a group of one row gives its sign vector."""
    fusion = tiny_model(official_quirks=True).fusion.eval()
    v, t = torch.randn(5, 64), torch.randn(5, 64)
    assert torch.allclose(fusion.vtm_logits(v, t, group_size=1), fusion.vtm_logits(v, t.sign(), group_size=1))
    intended = fusion.vtm_logits(v, t, intended_norm=True)
    fusion.config.official_quirks = False
    assert torch.allclose(intended, fusion.vtm_logits(v, t), atol=ATOL)


def test_held_out_pair_decisions_do_not_depend_on_q2():
    """Under official_quirks the held-out pair decisions equal those of the same weights without quirks, once the Q1
    positional layout is neutralised (rows T and T+1 of the positional table zero, so moving the exemption from
    v_sep to bridge 0 changes nothing); with the published group-of-one Q2 they would not."""
    lengths = [5, 12, 3, 7, 9, 4, 10, 6]
    model = tiny_model(seed=6, official_quirks=True).eval()
    with torch.no_grad():
        model.fusion.positional_embedding[FRAMES : FRAMES + 2] = 0.0
    frames, batch, tokens, t_eot = _held_out_inputs(model, lengths)
    n = len(lengths)
    vid = torch.arange(n)
    random_vid = vid.roll(3)
    sim = model.encoder.similarity_logits(t_eot, frames, batch["video_mask"])
    args = (frames, batch["video_mask"], vid, random_vid, tokens, batch["text_mask"], t_eot, sim)
    with torch.no_grad():
        quirky = _pair_decisions(model, *args)
        model.fusion.config.official_quirks = False
        plain = _pair_decisions(model, *args)
        model.fusion.config.official_quirks = True
        margins = {}
        for intended in (True, False):
            logits = model.fusion.match_logits(
                frames, batch["video_mask"], tokens, batch["text_mask"], t_eot, group_size=1, intended_norm=intended
            )
            margins[intended] = logits[:, 1] - logits[:, 0]
        model.fusion.config.official_quirks = False
        logits = model.fusion.match_logits(frames, batch["video_mask"], tokens, batch["text_mask"], t_eot)
        model.fusion.config.official_quirks = True
    assert quirky == plain
    assert torch.allclose(margins[True], logits[:, 1] - logits[:, 0], atol=ATOL)  # the margins themselves agree
    assert not torch.allclose(margins[True], margins[False], atol=1e-4)  # the sign vector scores differently
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    text_to_video = list(range(n))
    with torch.no_grad():
        ours = held_out_accuracies(
            model, frames, batch["video_mask"], batch["text_ids"], batch["text_mask"], tokens, text_to_video, dist
        )
        model.fusion.config.official_quirks = False
        theirs = held_out_accuracies(
            model, frames, batch["video_mask"], batch["text_ids"], batch["text_mask"], tokens, text_to_video, dist
        )
    for key in ("heldout_vtm_pair_acc", "heldout_vtm_random_acc", "heldout_mlm_acc"):
        assert ours[key] == pytest.approx(theirs[key]), key


def test_reference_code_is_used_by_tests_and_benches_only():
    importers = [
        path.relative_to(REPO).as_posix()
        for path in REPO.rglob("*.py")
        if path.parts[len(REPO.parts)] not in ("tests", "bench")
        and any(
            line.lstrip().startswith(("from modules.reference ", "import modules.reference", "from modules import ref"))
            for line in path.read_text().splitlines()
        )
    ]
    assert importers == []
