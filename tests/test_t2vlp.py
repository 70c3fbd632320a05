"""``--method t2vlp`` (Focus-and-Align): tube tokens, local alignment, the joint fusion layout, the single-pass PLM,
gradient flow, the method presets, the published key layout, and tiny end-to-end runs."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dataloaders.errors import ConfigError
from engine.builders import build_fusion_config, build_model
from engine.flags import parse_flags, validate
from modules.aux_losses import local_alignment, text_centres
from modules.clip_model import CLIPConfig, load_clip
from modules.fusion import FusionConfig, MemBridgeFusion, fusion_attention_mask
from modules.membridge import MemBridgeModel, Stage2Weights
from modules.methods import fusion_overrides
from modules.model_config import ModelConfig, read_model_config
from modules.published_keys import convert_published_state_dict, is_published_layout
from modules.t2vlp import TubeTokens
from modules.video_clip import VideoCLIP
from tests.conftest import REPO
from tests.fusion_fixtures import FRAMES, TEST_VOCAB, TINY_CLIP, TINY_FUSION, stage2_batch, tiny_config
from video_text_retrieval.task import ContrastiveTask

TUBES = 3


def t2vlp_model(seed: int = 0, with_fusion: bool = True, freeze: bool = True, **overrides: object) -> MemBridgeModel:
    """The tiny CLIP with tube tokens (+ a T2VLP-layout fusion), initialised as published."""
    torch.manual_seed(seed)
    clip = load_clip(config=replace(CLIPConfig.from_json(TINY_CLIP), vocab_size=TEST_VOCAB))
    encoder = VideoCLIP(clip, joint_layers=2, max_frames=FRAMES, num_tubes=TUBES)
    fusion = None
    if with_fusion:
        layout = {k: v for k, v in fusion_overrides("t2vlp").items() if k != "dropout"}  # exact comparisons
        fusion = MemBridgeFusion(tiny_config(num_bridge_tokens=TUBES, **{**layout, **overrides}))
        fusion.init_from_clip(clip)
    model = MemBridgeModel(encoder, fusion)
    if freeze and with_fusion:
        model.freeze_encoder()
    return model


# ---------------------------------------------------------------------------------------------------------------
# tube tokens
# ---------------------------------------------------------------------------------------------------------------


def test_centre_softmax_and_tube_sequence_hand_computed():
    tubes = TubeTokens(width=4, embed_dim=4, num_tubes=2, heads=1)
    with torch.no_grad():
        tubes.centres.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    cls = [[1.0, 1, 1, 1], [3.0, 3, 3, 3]]
    p1, p2 = [2.0, 0, 0, 0], [0, 1.0, 0, 0]
    tap = torch.tensor([[[cls[0], p1, p2], [cls[1], p2, p1]]])  # [B=1, T=2, 1+P=3, W=4]
    a = math.exp(2) / (math.exp(2) + 1)  # centre 0 on frame 1: logits (2, 0)
    c = math.e / (1 + math.e)  # centre 1 on frame 1: logits (0, 1)
    expected = torch.tensor([[[[a, 1 - a], [1 - c, c]], [[1 - a, a], [c, 1 - c]]]])  # [B, T, K, P]
    assert torch.allclose(tubes.assignments(tap), expected, atol=1e-6)
    seq = tubes.sequences(tap)  # [B, K, 1+T, W]
    head = torch.tensor([2.0, 2, 2, 2])
    g0_f1 = torch.tensor([2 * a, 1 - a, 0, 0])  # a * p1 + (1 - a) * p2
    g1_f1 = torch.tensor([2 * (1 - c), c, 0, 0])
    g0_f2 = torch.tensor([2 * a, 1 - a, 0, 0])  # frame 2 lists p2 first: weights swap with the patches
    assert seq.shape == (1, 2, 3, 4)
    assert torch.allclose(seq[0, 0], torch.stack([head, g0_f1, g0_f2]), atol=1e-6)
    assert torch.allclose(seq[0, 1, :2], torch.stack([head, g1_f1]), atol=1e-6)


def _reference_tubes(tubes: TubeTokens, tap: torch.Tensor) -> torch.Tensor:
    """Per (video, centre) loops with an explicit exp / sum softmax, as spec A.2 writes it."""
    b, t, _, w = tap.shape
    out = torch.zeros(b, tubes.num_tubes, tubes.proj.shape[1])
    for i in range(b):
        head = sum(tap[i, f, 0] for f in range(t)) / t
        for k in range(tubes.num_tubes):
            rows = [head]
            for f in range(t):
                scores = torch.stack([tubes.centres[k] @ tap[i, f, 1 + p] for p in range(tap.shape[2] - 1)])
                weights = scores.exp() / scores.exp().sum()
                rows.append(sum(weights[p] * tap[i, f, 1 + p] for p in range(len(weights))))
            hidden = tubes.blocks(torch.stack(rows).unsqueeze(0))[0, 0]
            out[i, k] = tubes.ln_post(hidden) @ tubes.proj
    return out


def test_tube_tokens_match_a_loop_reference_and_hide_padded_frames():
    torch.manual_seed(0)
    tubes = TubeTokens(width=8, embed_dim=6, num_tubes=3, heads=2)
    tap = torch.randn(2, 3, 5, 8)
    with torch.no_grad():
        assert torch.allclose(tubes(tap), _reference_tubes(tubes, tap), atol=1e-5)
        # a padded last frame is the same as a video without it
        mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
        padded = tubes(tap, mask)
        assert torch.allclose(padded[0], tubes(tap[:1, :2])[0], atol=1e-5)
        assert torch.allclose(padded[1], tubes(tap[1:])[0], atol=1e-5)


def test_local_alignment_matches_a_loop_reference():
    torch.manual_seed(1)
    q, z, u = torch.randn(3, 5), torch.randn(2, 4, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    total = 0.0
    for b in range(2):
        valid = int(mask[b].sum())
        for k in range(3):
            s = [math.exp(float(q[k] @ z[b, j])) for j in range(valid)]
            centre = sum(s[j] / sum(s) * z[b, j] for j in range(valid))
            assert torch.allclose(text_centres(q, z, mask)[b, k], centre, atol=1e-5)
            total += float(((centre - u[b, k]) ** 2).sum())
    assert float(local_alignment(q, z, mask, u)) == pytest.approx(total / u.numel(), rel=1e-5)


def test_encode_video_tap_is_the_input_of_the_tube_source_block():
    model = t2vlp_model(with_fusion=False)
    encoder = model.encoder
    batch = stage2_batch([5, 7])
    blocks = list(encoder.clip.visual.blocks)
    seen = {}
    handle = blocks[len(blocks) - 2].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    with torch.no_grad():
        frames, tap = encoder.encode_video(batch["video"], batch["video_mask"], return_tap=True)
        plain = encoder.encode_video(batch["video"], batch["video_mask"])
    handle.remove()
    assert torch.equal(frames, plain)
    b, t = batch["video_mask"].shape
    assert torch.equal(tap, seen["x"].reshape(b, t, *tap.shape[2:]))
    # the local blocks start as the last two ViT blocks, ln_post / proj as the ViT's
    tubes = encoder.tubes
    for target, source in zip(tubes.blocks.resblocks, blocks[-2:], strict=True):
        assert all(torch.equal(p, q) for p, q in zip(target.parameters(), source.parameters(), strict=True))
    assert torch.equal(tubes.proj, encoder.clip.visual.proj)


# ---------------------------------------------------------------------------------------------------------------
# fusion layout and stage 2
# ---------------------------------------------------------------------------------------------------------------


def test_joint_attention_mask_hand_computed():
    video_mask, text_mask = torch.tensor([[1, 0]]), torch.tensor([[1, 1, 0]])
    cols = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)  # [v_sep, f1, f2(pad), tube, w0, w1, w2(pad)]
    full = fusion_attention_mask(video_mask, text_mask, 1, False, attention="joint", vsep_first=True)[0, 0]
    assert torch.equal(full == 0, cols.expand(7, 7))
    causal = fusion_attention_mask(video_mask, text_mask, 1, True, attention="joint", vsep_first=True)[0, 0] == 0
    for row in range(4):  # video and tube rows: video/tube columns only
        assert causal[row].tolist() == [True, True, False, True, False, False, False]
    for j in range(3):  # text rows: the (unpadded) video/tubes and text 0..j, padding included (causal overrides)
        assert causal[4 + j].tolist() == [True, True, False, True] + [i <= j for i in range(3)]


def test_t2vlp_stage2_sequences_carry_each_videos_tubes():
    model = t2vlp_model()
    batch = stage2_batch([5, 7, 4])
    out, details = model.stage2_losses(batch, torch.Generator().manual_seed(0), return_details=True)
    assert set(out) >= {"vtm", "mlm", "plm", "align", "loss"}
    with torch.no_grad():
        frames, tap = model.encoder.encode_video(batch["video"], batch["video_mask"], return_tap=True)
        tubes = model.encoder.tubes(tap, batch["video_mask"])
        text = model.encoder.clip.encode_text_tokens(batch["text_ids"])
    pos = model.fusion.positional_embedding
    x, b, t = details["vtm_fusion_inputs"], 3, FRAMES
    video_index = details["vtm_video_index"]
    text_index = details["vtm_text_index"]
    for row in range(3 * b):
        v, w = int(video_index[row]), int(text_index[row])
        assert torch.allclose(x[row, 0], frames[v].mean(0) + pos[0], atol=1e-5)  # v_sep first, with its position
        assert torch.allclose(x[row, 1 : 1 + t], frames[v] + pos[1 : 1 + t], atol=1e-5)
        assert torch.allclose(x[row, 1 + t : 1 + t + TUBES], tubes[v] + pos[1 + t : 1 + t + TUBES], atol=1e-5)
        assert torch.allclose(x[row, 1 + t + TUBES :], text[w] + pos[1 + t + TUBES : x.shape[1]], atol=1e-5)
    assert bool((video_index[b : 2 * b] != torch.arange(b)).all())  # the negatives' tubes are theirs
    padding_only = details["vtm_attention_mask"][:, 0] == 0
    assert bool((padding_only == padding_only[:, :1]).all())  # every row sees the same columns


def test_single_pass_plm_matches_a_per_target_reference():
    model = t2vlp_model()
    fusion = model.fusion
    batch = stage2_batch([5, 7])
    weights = Stage2Weights(vtm=0.0, mlm=0.0, plm=1.0)
    out, details = model.stage2_losses(batch, torch.Generator().manual_seed(3), weights, return_details=True)
    with torch.no_grad():
        frames, tap = model.encoder.encode_video(batch["video"], batch["video_mask"], return_tap=True)
        tubes = model.encoder.tubes(tap)
        text = model.encoder.clip.encode_text_tokens(batch["text_ids"])
        head = fusion.vocab_proj @ model.encoder.clip.token_embedding.weight.t()
        t = FRAMES
        for r, (row, slot) in enumerate(zip(details["plm_rows"].tolist(), details["plm_prefix"].tolist(), strict=True)):
            # the sequence cut after text slot `slot`: [v_sep, frames, tubes, text 0..slot]
            seq = torch.cat([frames[row].mean(0, keepdim=True), frames[row], tubes[row], text[row, : slot + 1]])
            n = seq.shape[0]
            seq = seq + fusion.positional_embedding[:n]
            mask = torch.zeros(n, n)
            mask[: 1 + t + TUBES, 1 + t + TUBES :] = float("-inf")  # video/tube rows do not see text
            for i in range(slot + 1):
                mask[1 + t + TUBES + i, 1 + t + TUBES + i + 1 :] = float("-inf")
            hidden = fusion.transformer(seq.unsqueeze(0), mask)[0, -1]
            expected = hidden @ head + fusion.vocab_bias
            assert torch.allclose(details["plm_logits"][r], expected, atol=1e-4)
            assert int(details["plm_targets"][r]) == int(batch["text_ids"][row, slot + 1])
    expected_loss = F.cross_entropy(details["plm_logits"], details["plm_targets"])
    assert float(out["plm"].detach()) == pytest.approx(float(expected_loss.detach()))


def _grads(model: torch.nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


def test_alignment_gradient_reaches_exactly_tubes_text_and_vit_below_the_tap():
    model = t2vlp_model(with_fusion=False)
    task = ContrastiveTask(model)
    out = task(stage2_batch([5, 7, 4]))
    out["align"].backward()
    grads = _grads(model)
    assert all(grads[n] for n in grads if n.startswith("encoder.tubes."))
    assert grads["encoder.clip.visual.transformer.resblocks.0.attn.in_proj_weight"]  # below the tap (T2)
    assert grads["encoder.clip.transformer.resblocks.0.attn.in_proj_weight"]  # the text encoder
    above_tap = ("resblocks.1.", "resblocks.2.", "ln_post", "proj")
    above = [n for n in grads if n.startswith(tuple(f"encoder.clip.visual.{p}" for p in above_tap))]
    assert above and not any(grads[n] for n in above)


def test_stage2_trains_only_the_fusion_and_the_tube_module():
    model = t2vlp_model()
    out = model.stage2_losses(stage2_batch([5, 7, 4]), torch.Generator().manual_seed(0))
    out["loss"].backward()
    grads = _grads(model)
    trained = {n for n, g in grads.items() if g}
    assert trained and all(n.startswith(("fusion.", "encoder.tubes.")) for n in trained)
    assert all(grads[n] for n in grads if n.startswith("encoder.tubes."))
    assert not any(p.requires_grad for p in model.encoder.clip.parameters())


# ---------------------------------------------------------------------------------------------------------------
# presets, flags, checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _fusion_args(*extra: str) -> argparse.Namespace:
    return parse_flags(
        "fusion", ["--do_train", "--output_dir", "/tmp/unused", "--cross_config_path", str(TINY_FUSION), *extra]
    )


def test_method_presets_set_the_fusion_layout_and_reject_contradictions():
    default = build_fusion_config(_fusion_args())
    assert default == FusionConfig.from_json(TINY_FUSION, max_frames=12, max_words=32)  # MemBridge unchanged
    t2vlp = build_fusion_config(_fusion_args("--method", "t2vlp", "--num_tubes", "5"))
    assert (t2vlp.bridge_source, t2vlp.attention, t2vlp.positional) == ("tube", "joint", "all")
    assert t2vlp.vsep_first and t2vlp.plm_mode == "single_pass" and t2vlp.num_bridge_tokens == 5
    assert t2vlp.dropout == 0.2 and default.dropout == FusionConfig.from_json(TINY_FUSION).dropout
    with pytest.raises(ConfigError, match="contradicts --method t2vlp"):
        build_fusion_config(_fusion_args("--method", "t2vlp", "--bridge_source", "memory"))
    with pytest.raises(ConfigError, match="contradicts --method membridge"):
        build_fusion_config(_fusion_args("--bridge_source", "tube"))
    with pytest.raises(ConfigError, match="single_pass needs attention joint"):
        build_fusion_config(_fusion_args("--method", "t2vlp", "--fusion_attention", "bridge"))
    with pytest.raises(ConfigError, match="--num_tubes"):
        validate(_fusion_args("--method", "t2vlp", "--num_bridge_tokens", "4"))
    with pytest.raises(ConfigError, match="tube tokens belong to --method t2vlp"):
        ModelConfig(method="membridge", num_tubes=3)
    stored = ModelConfig(method="t2vlp", num_tubes=5, fusion=t2vlp)
    assert ModelConfig.from_dict(stored.to_dict()) == stored


def test_t2vlp_captioning_decodes_with_one_causal_pass_per_step_and_trains_tubes():
    from video_captioning.captioner import generate_captions
    from video_captioning.task import CaptionTask

    model = t2vlp_model(freeze=False).eval()
    fusion, clip = model.fusion, model.encoder.clip
    batch = stage2_batch([5, 7])
    sot = TEST_VOCAB - 2
    with torch.no_grad():
        frames, tubes = model.encoder.encode_video_tokens(batch["video"], batch["video_mask"])
        cached = generate_captions(model, frames, batch["video_mask"], 4, bos=sot, video_tokens=tubes)
        plain = generate_captions(model, frames, batch["video_mask"], 4, bos=sot, video_tokens=tubes, use_cache=False)
        assert torch.equal(cached, plain)
        head = fusion.vocab_proj @ clip.token_embedding.weight.t()
        for b in range(2):  # greedy by hand: re-encode the prefix, fuse [v_sep | frames | tubes | prefix], last slot
            prefix = [sot]
            for _ in range(4):
                text = clip.encode_text_tokens(torch.tensor([prefix]))[0]
                x = torch.cat([frames[b].mean(0, keepdim=True), frames[b], tubes[b], text])
                x = x + fusion.positional_embedding[: x.shape[0]]
                n_video = 1 + FRAMES + TUBES
                mask = torch.zeros(x.shape[0], x.shape[0])
                mask[:n_video, n_video:] = float("-inf")
                mask[n_video:, n_video:] = torch.full((len(prefix), len(prefix)), float("-inf")).triu(1)
                logits = fusion.transformer(x.unsqueeze(0), mask)[0, -1] @ head + fusion.vocab_bias
                prefix.append(int(logits.argmax()))
                if prefix[-1] == TEST_VOCAB - 1:
                    break
            produced = cached[b][: len(prefix) - 1].tolist()
            assert produced == prefix[1:], (produced, prefix)
    task = CaptionTask(model).train()
    out = task(batch)
    assert {"loss", "plm_acc", "align"} <= set(out)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.encoder.tubes.parameters())


def test_refused_tasks_name_the_method():
    from modules.methods import refuse_unsupported

    refuse_unsupported("stoa", "video QA", supported=("membridge", "t2vlp", "stoa"))  # QA supports every method
    with pytest.raises(ConfigError, match="video QA is not implemented for --method stoa"):  # a task without it
        refuse_unsupported("stoa", "video QA", supported=("membridge", "t2vlp"))


def test_t2vlp_qa_answer_state_matches_an_unpadded_reference():
    from tests.test_qa import qa_batch
    from video_qa.model import MemBridgeQAModel

    base = t2vlp_model(freeze=False)
    model = MemBridgeQAModel(base.encoder, base.fusion, head="first_token").eval()
    batch = qa_batch([5, 8])
    fusion = model.fusion
    with torch.no_grad():
        logits, _ = model.answer_logits(batch)
        frames, tubes = model.encoder.encode_video_tokens(batch["video"], batch["video_mask"])
        q_feats, q_eot = model.encode_question(batch["question_ids"], batch["question_mask"])
        state = model.answer_state(frames, batch["video_mask"], q_feats, batch["question_mask"], q_eot, tubes)
        for b in range(2):
            n_q = int(batch["question_mask"][b].sum())
            x = torch.cat([frames[b].mean(0, keepdim=True), frames[b], tubes[b], q_feats[b, :n_q], torch.zeros(1, 64)])
            x = x + fusion.positional_embedding[: x.shape[0]]  # everywhere, no exemption
            expected = fusion.transformer(x.unsqueeze(0))[0, -1]  # joint attention, nothing padded
            assert torch.allclose(state[b], expected, atol=1e-5)
        head = fusion.vocab_logits(state, model.encoder.clip.token_embedding.weight)
    assert torch.allclose(logits, head, atol=1e-5)


def test_published_t2vlp_state_dict_converts_and_loads_strictly():
    model = t2vlp_model()
    gen = torch.Generator().manual_seed(0)
    rand = lambda t: torch.randn(t.shape, generator=gen)  # noqa: E731
    sd = {f"clip.{k}": rand(v) for k, v in model.encoder.clip.state_dict().items()}
    tubes, fusion = model.encoder.tubes, model.fusion
    width = tubes.centres.shape[1]
    sd["clip.fusion_center"] = torch.randn(1, 1, TUBES, width, generator=gen)
    sd.update({f"clip.fusion_proj_center.{k}": rand(v) for k, v in tubes.proj_center.state_dict().items()})
    sd.update({f"clip.local_visual.transformer.{k}": rand(v) for k, v in tubes.blocks.state_dict().items()})
    sd.update({f"clip.local_visual.ln_post.{k}": rand(v) for k, v in tubes.ln_post.state_dict().items()})
    sd["clip.local_visual.proj"] = rand(tubes.proj)
    unused = {"clip.local_visual.conv1.weight", "clip.local_visual.class_embedding", "clip.visual_linear.weight"}
    sd.update({k: torch.randn(2, generator=gen) for k in unused})
    text_blocks = len(model.encoder.clip.transformer.resblocks)
    block = fusion.transformer.resblocks[0].state_dict()
    for i in range(text_blocks):
        sd.update({f"clip.fusion_transformer.resblocks.{i}.{k}": rand(v) for k, v in block.items()})
    for name, ours in (
        ("fusion_positional_embedding", fusion.positional_embedding), ("fusion_proj_embedding", fusion.vocab_proj),
        ("fusion_logit_bias", fusion.vocab_bias), ("fusion_match_matrix", fusion.match_matrix),
        ("fusion_unmatch_matrix", fusion.unmatch_matrix),
    ):  # fmt: skip
        sd[f"clip.{name}"] = rand(ours)
    assert is_published_layout(sd)
    converted, unmapped = convert_published_state_dict(sd, fusion_layers=fusion.config.layers)
    dropped_blocks = {
        k for k in sd if k.startswith("clip.fusion_transformer.") and int(k.split(".")[3]) >= fusion.config.layers
    }
    assert set(unmapped) == unused | dropped_blocks
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(tubes.centres, sd["clip.fusion_center"][0, 0])
    assert torch.equal(fusion.vocab_proj, sd["clip.fusion_proj_embedding"])
    assert torch.equal(
        tubes.blocks.resblocks[1].mlp.c_fc.weight, sd["clip.local_visual.transformer.resblocks.1.mlp.c_fc.weight"]
    )  # noqa: E501


def test_official_quirks_keep_t2vlp_positions_and_normalise_text_over_the_batch():
    model = t2vlp_model(official_quirks=True)
    plain = t2vlp_model(official_quirks=False)
    batch = stage2_batch([5, 7, 4])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    weights = Stage2Weights(mlm=0.0, plm=0.0)
    _, quirky = model.stage2_losses(batch, gen(), weights, return_details=True)
    _, intended = plain.stage2_losses(batch, gen(), weights, return_details=True)
    assert torch.equal(quirky["vtm_fusion_inputs"], intended["vtm_fusion_inputs"])  # no Q1 in the T2VLP layout
    assert not torch.allclose(quirky["vtm_logits"], intended["vtm_logits"])  # Q2 (T5) changes the head only


# ---------------------------------------------------------------------------------------------------------------
# tiny end-to-end runs on the --small synthetic set
# ---------------------------------------------------------------------------------------------------------------


def _run(script: str, args: list[str], timeout: int = 240) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *([str(REPO / script)] if script.endswith(".py") else ["-m", script]), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _data_flags(data: Path, out: Path) -> list[str]:
    return [
        "--method", "t2vlp", "--num_tubes", "4", "--clip_config", str(TINY_CLIP), "--output_dir", str(out),
        "--val_csv", str(data / "msrvtt" / "MSRVTT_JSFUSION_test.csv"), "--features_path", str(data / "videos"),
        "--max_frames", "4", "--max_words", "12", "--batch_size", "8", "--n_display", "3", "--seed", "42",
        "--no-log_tensorboard", "--torch_threads", "1",
    ]  # fmt: skip


def _scalars(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage1_run(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("t2vlp") / "stage1"
    webvid = synthetic_small / "webvid"
    _run("main_task_clip.py", [
        "--do_train", "--do_eval", *_data_flags(synthetic_small, out), "--epochs", "25", "--lr", "2e-3",
        "--coef_lr", "1", "--loose_type", "--n_display", "6",
        "--train_csv", str(webvid / "frozen_train_labels.json"), "--webvid_tfrecord", str(webvid / "tfrecord"),
    ])  # fmt: skip
    return out


@pytest.mark.slow
def test_stage1_t2vlp_learns_retrieval_and_alignment(stage1_run: Path, synthetic_small: Path):
    rows = _scalars(stage1_run)
    chance = json.loads((synthetic_small / "manifest.json").read_text())["chance"]["retrieval_R1"]
    final = next(row for row in reversed(rows) if "eval/t2v_R1" in row)
    assert final["eval/t2v_R1"] >= 2.5 * chance, (final, chance)  # 12 test videos: chance 8.3 %
    align = [row["train/align"] for row in rows if "train/align" in row]
    assert len(align) >= 4 and align[-1] < 0.3 * align[0], align
    assert read_model_config(stage1_run / "ckpt" / (stage1_run / "ckpt" / "latest").read_text().strip()).method == (
        "t2vlp"
    )


@pytest.mark.slow
def test_stage2_and_retrieval_rerank_with_tubes(stage1_run: Path, synthetic_small: Path, tmp_path: Path):
    stage1 = stage1_run / "ckpt" / (stage1_run / "ckpt" / "latest").read_text().strip()
    with pytest.raises(ConfigError, match="is a --method t2vlp model"):
        build_model(_fusion_args("--init_model", str(stage1)), with_fusion=True)
    webvid = synthetic_small / "webvid"
    stage2 = tmp_path / "stage2"
    _run("main_task_fusion.py", [
        "--do_train", "--do_eval", *_data_flags(synthetic_small, stage2), "--epochs", "2", "--lr", "1e-3",
        "--init_model", str(stage1), "--cross_config_path", str(TINY_FUSION), "--rerank_topk", "4",
        "--train_csv", str(webvid / "frozen_train_labels.json"), "--webvid_tfrecord", str(webvid / "tfrecord"),
    ])  # fmt: skip
    rows = _scalars(stage2)
    assert all(math.isfinite(row["train/align"]) for row in rows if "train/loss" in row)
    final = rows[-1]
    assert {"eval/rerank_t2v_R1", "eval/heldout_vtm_acc", "eval/heldout_plm_acc"} <= set(final)
    retrieval = tmp_path / "retrieval"
    ckpt2 = stage2 / "ckpt" / (stage2 / "ckpt" / "latest").read_text().strip()
    _run("video_text_retrieval.main_task_retrieval", [
        "--do_train", *_data_flags(synthetic_small, retrieval), "--epochs", "1", "--lr", "1e-4",
        "--init_model", str(ckpt2), "--cross_config_path", str(TINY_FUSION), "--rerank_topk", "4",
        "--datatype", "msrvtt", "--train_csv", str(synthetic_small / "msrvtt" / "MSRVTT_train.9k.csv"),
        "--data_path", str(synthetic_small / "msrvtt" / "MSRVTT_data.json"),
    ])  # fmt: skip
    rows = _scalars(retrieval)
    assert any("train/align" in row and "train/vtm" in row for row in rows)
    assert "eval/rerank_t2v_R1" in rows[-1]


@pytest.mark.slow
def test_stage1_two_gloo_ranks_equal_one_process(synthetic_small: Path, tmp_path: Path):
    from tests.test_stage1 import latest_weights, losses, run_script, stage1_flags

    flags = ("--max_steps", "3", "--epochs", "1", "--method", "t2vlp", "--num_tubes", "3")
    run_script(stage1_flags(synthetic_small, tmp_path / "one", *flags), nproc=1)
    run_script(stage1_flags(synthetic_small, tmp_path / "two", *flags), nproc=2)
    assert sorted(losses(tmp_path / "one")) == sorted(losses(tmp_path / "two")) == [1, 2, 3]
    # the contrastive loss is global on every rank; the logged alignment is rank 0's local mean (DDP averages the
    # per-rank gradients, which equals the global mean's gradient: the weights below)
    one, two = (
        {row["step"]: row["train/contrastive"] for row in _scalars(tmp_path / run) if "train/contrastive" in row}
        for run in ("one", "two")
    )
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-5, abs=1e-6)
    w1, w2 = latest_weights(tmp_path / "one"), latest_weights(tmp_path / "two")
    assert w1.keys() == w2.keys() and any(k.startswith("encoder.tubes.") for k in w1)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_stage2_two_gloo_ranks_one_sample_each_equal_one_process(synthetic_small: Path, tmp_path: Path):
    """Global batch 2 as 1 process x 2 and 2 ranks x 1 (hard negatives come from the other rank): the same losses
    and weights (per-sample draws, global-batch means, tubes gathered with their gradient; head dropout off)."""
    from tests.test_stage1 import latest_weights
    from tests.test_stage2 import fusion_flags, losses, run

    flags = ("--method", "t2vlp", "--num_tubes", "3", "--batch_size", "2", "--max_steps", "2", "--epochs", "1",
             "--head_dropout", "0", "--torch_threads", "1")  # fmt: skip
    run("main_task_fusion.py", fusion_flags(synthetic_small, tmp_path / "one", *flags))
    run("main_task_fusion.py", fusion_flags(synthetic_small, tmp_path / "two", *flags), nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2]
    for step, row in two.items():
        assert row["train/vtm"] > 0
        for key in ("train/vtm", "train/mlm", "train/plm", "train/align", "train/loss"):
            assert math.isfinite(row[key])
            assert one[step][key] == pytest.approx(row[key], rel=1e-5, abs=1e-6), (step, key)
    trained, single = latest_weights(tmp_path / "two"), latest_weights(tmp_path / "one")
    for name in trained:
        torch.testing.assert_close(trained[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
    run("main_task_fusion.py", fusion_flags(synthetic_small, tmp_path / "init", *flags[:4], "--max_steps", "1",
                                            "--epochs", "1", "--fusion_lr", "1e-12", "--lr", "1e-12"))  # fmt: skip
    initial = latest_weights(tmp_path / "init")
    tubes = [n for n in trained if n.startswith("encoder.tubes.")]
    assert tubes and any(not torch.equal(trained[n], initial[n]) for n in tubes)
    clip = [n for n in trained if n.startswith("encoder.clip.")]
    assert all(torch.equal(trained[n], initial[n]) for n in clip)


@pytest.mark.slow
def test_stage1_resume_after_sigkill_continues_exactly(synthetic_small: Path, tmp_path: Path):
    from tests.test_stage1 import kill_after_first_checkpoint, latest_weights, losses, run_script, stage1_flags

    flags = ("--epochs", "2", "--save_steps", "2", "--method", "t2vlp", "--num_tubes", "3")
    full = tmp_path / "full"
    run_script(stage1_flags(synthetic_small, full, *flags))
    reference = losses(full)
    assert len(reference) == 12  # 24 videos / batch 4 = 6 steps per epoch
    killed = tmp_path / "killed"
    interrupted_at = kill_after_first_checkpoint(stage1_flags(synthetic_small, killed, *flags), killed)
    assert interrupted_at < 12
    run_script(stage1_flags(synthetic_small, killed, *flags, "--resume"))
    resumed = losses(killed)
    assert sorted(resumed) == sorted(reference)
    for step in range(interrupted_at + 1, 13):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    final, expected = latest_weights(killed), latest_weights(full)
    for name in (n for n in expected if n.startswith("encoder.tubes.")):
        torch.testing.assert_close(final[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_qa_runs_with_t2vlp(synthetic_small: Path, tmp_path: Path):
    from tests.test_qa import qa_flags, run_entry

    out = tmp_path / "qa"
    run_entry(qa_flags(synthetic_small, out, "--do_train", "--do_eval", "--method", "t2vlp", "--num_tubes", "3",
                       "--epochs", "1", "--batch_size", "8", "--lr", "1e-3"))  # fmt: skip
    results = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= results["accuracy"] <= 100.0
    assert read_model_config(out / "ckpt" / (out / "ckpt" / "latest").read_text().strip()).method == "t2vlp"


@pytest.mark.slow
def test_captioning_runs_with_t2vlp(synthetic_small: Path, tmp_path: Path):
    out = tmp_path / "caption"
    _run("video_captioning.main_task_caption", [
        "--do_train", "--do_eval", "--method", "t2vlp", "--num_tubes", "3", "--clip_config", str(TINY_CLIP),
        "--cross_config_path", str(TINY_FUSION), "--output_dir", str(out), "--datatype", "msvd",
        "--data_path", str(synthetic_small / "msvd"), "--features_path", str(synthetic_small / "videos"),
        "--max_frames", "4", "--max_words", "12", "--batch_size", "8", "--batch_size_val", "12", "--epochs", "1",
        "--lr", "1e-3", "--num_thread_reader", "0", "--torch_threads", "1", "--no-log_tensorboard",
    ])  # fmt: skip
    results = json.loads((out / "eval_results.json").read_text())
    assert all(math.isfinite(results[key]) for key in ("Bleu_4", "CIDEr"))
    assert any("train/align" in row for row in _scalars(out))
