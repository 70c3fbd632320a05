"""MCQ / BridgeFormer as a stage-1 objective (``--stage1_objective mcq``; MCQ_HMMC.md §A, §C.2-C.3): questions and
answers by hand, the phrase file, the bridge attention masks by hand, the BridgeFormer against a loop reference of
MCQ's divided attention, NormSoftmax against a plain reference, which parameters the losses reach, training-only
weights on load, and learnability on the small synthetic set."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dataloaders.errors import DataError
from dataloaders.mcq_questions import (
    MCQQuestions,
    Phrases,
    answer_tokens,
    pack,
    question_tokens,
    read_phrase_file,
    sample_phrase,
)
from dataloaders.tokenizer import EOT_ID, SOT_ID, ClipTokenizer
from engine.checkpoint import load_weights
from modules.bridgeformer import (
    BridgeFormer,
    BridgeFormerConfig,
    divided_attention_allowed,
    global_query_keys,
    query_positions,
    question_layer_states,
)
from modules.clip_model import CLIPConfig
from modules.losses import cosine_matrix, norm_softmax_loss
from modules.model_config import ModelConfig, build_membridge
from tests.conftest import REPO
from video_text_retrieval.stage1 import STAGE1_OBJECTIVES, MCQTask, MCQWeights, load_aux_from_init
from video_text_retrieval.task import ContrastiveTask

TINY = REPO / "CLIP-modules" / "tiny.json"
TOK = ClipTokenizer()


def bpe(text: str) -> list[int]:
    return TOK.tokenize_words(text)


# ----------------------------------------------------------------------------------------------- questions


def test_question_erases_the_phrase_and_answer_has_the_prompt():
    caption = "an old woman is dancing on the green grass"
    assert bpe("green") == [1901] and bpe("grass") == [5922]  # one BPE piece each: two masks
    assert question_tokens(caption, "green grass", TOK, mask_id=0) == bpe("an old woman is dancing on the") + [0, 0]
    assert answer_tokens("green grass", TOK, mask_id=0, prompt=3) == [0, 0, 0, 1901, 5922]
    assert answer_tokens(" green grass ", TOK, mask_id=7, prompt=1) == [7, 1901, 5922]


def test_question_default_vs_official_quirks():
    # default: the first contiguous occurrence; MCQ: every occurrence of every phrase word
    caption = "red circle and red square"
    assert question_tokens(caption, "red square", TOK) == bpe("red circle and") + [0, 0]
    assert question_tokens(caption, "red square", TOK, quirks=True) == [0] + bpe("circle and") + [0, 0]
    # punctuation: kept around the masks by default; MCQ drops an erased word's comma and a '.' blocks the match
    assert question_tokens("a dog, running", "dog", TOK) == bpe("a") + [0] + bpe(",") + bpe("running")
    assert question_tokens("a dog, running", "dog", TOK, quirks=True) == bpe("a") + [0] + bpe("running")
    assert question_tokens("a dog running.", "running", TOK) == bpe("a dog") + [0] + bpe(".")
    assert question_tokens("a dog running.", "running", TOK, quirks=True) == bpe("a dog running.")
    # MCQ removes apostrophes from the question and matches the capitalised form
    assert question_tokens("the man's hat", "hat", TOK, quirks=True) == bpe("the mans") + [0]
    assert question_tokens("Dogs run", "dogs", TOK, quirks=True) == [0] + bpe("run")
    # a quoted verb (MCQ's verb column keeps its quotes) erases nothing
    assert question_tokens("she is dancing", "'is dancing'", TOK, quirks=True) == bpe("she is dancing")


def test_pack_adds_sot_eot_pads_and_truncates():
    ids, mask = pack([5, 6, 7], 7)
    assert ids.tolist() == [SOT_ID, 5, 6, 7, EOT_ID, 0, 0] and mask.tolist() == [1, 1, 1, 1, 1, 0, 0]
    ids, mask = pack([5, 6, 7, 8], 4)
    assert ids.tolist() == [SOT_ID, 5, 6, EOT_ID] and mask.tolist() == [1, 1, 1, 1]


def test_sample_phrase_rules_and_determinism():
    p = Phrases(nouns=("red circles",), verbs=("move left",))
    rng = np.random.default_rng(0)
    assert sample_phrase(p, "x", "noun", rng) == "red circles"
    assert sample_phrase(p, "x", "verb", rng) == "move left"
    assert sample_phrase(Phrases(nouns=("a b",)), "x", "verb", rng) == "a b"  # verb falls back to a noun
    assert sample_phrase(Phrases(), "lonely word", "noun", rng) in ("lonely", "word")  # MCQ's intended fallback
    kinds = {sample_phrase(p, "x", "mixed", np.random.default_rng(s)) for s in range(20)}
    assert kinds == {"red circles", "move left"}
    questions = MCQQuestions({"v1": p}, TOK, 12, kind="mixed")
    first = questions("v1", "two red circles move left", np.random.default_rng([7, 0, 3]))
    again = questions("v1", "two red circles move left", np.random.default_rng([7, 0, 3]))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert sorted(first) == ["mcq_answer_ids", "mcq_answer_mask", "mcq_question_ids", "mcq_question_mask"]


def _write_tsv(path: Path, rows: list[str]) -> Path:
    path.write_text("caption\tpath\tnoun\tverb\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def test_phrase_file_parsing_and_errors(tmp_path):
    good = _write_tsv(tmp_path / "p.tsv", ["she is dancing\tdir/123\t['she']\t['is dancing']", "x\tv2\t[]\t[]"])
    table = read_phrase_file(good)
    assert table["dir/123"] == table["123"] == Phrases(("she",), ("is dancing",))
    assert table["v2"] == Phrases()
    literal = read_phrase_file(good, quirks=True)["123"]
    assert literal == Phrases(("she",), ("'is dancing'",))  # MCQ keeps the verb quotes
    bad = _write_tsv(tmp_path / "bad.tsv", ["a\tv1\t['a']\t[]", "b\tv2\t['unclosed\t[]"])
    with pytest.raises(DataError, match=r"bad\.tsv: row 3: the nouns column"):
        read_phrase_file(bad)
    short = _write_tsv(tmp_path / "short.tsv", ["a\tv1\t['a']"])
    with pytest.raises(DataError, match=r"short\.tsv: row 2 has 3 tab-separated columns"):
        read_phrase_file(short)
    with pytest.raises(DataError, match="does not exist"):
        read_phrase_file(tmp_path / "none.tsv")


def test_synthetic_phrase_file_matches_its_captions(synthetic_small):
    path = synthetic_small / "webvid" / "noun_verb.tsv"
    table = read_phrase_file(path)
    captions = json.loads((synthetic_small / "webvid" / "frozen_train_labels.json").read_text())
    assert len(captions) == len(table)
    for entry in captions:
        phrases = table[entry["video_id"]]
        assert phrases.nouns and len(phrases.verbs) == 1
        for phrase in (*phrases.nouns, *phrases.verbs):
            assert f" {phrase} " in f" {entry['caption']} "  # exact, contiguous
            question = question_tokens(entry["caption"], phrase, TOK)
            assert question.count(0) == len(bpe(phrase)) and question != bpe(entry["caption"])


# ----------------------------------------------------------------------------------------------- masks


def test_divided_attention_mask_by_hand():
    # [CLS | f0 a, f0 b | f1 a, f1 b]; key f1 b is padding
    allowed = divided_attention_allowed(2, 2, torch.tensor([[1, 1, 1, 1, 0]]))
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 0],  # CLS: all real tokens
            [1, 1, 1, 0, 0],  # frame 0 tokens: CLS + frame 0
            [1, 1, 1, 0, 0],
            [1, 0, 0, 1, 0],  # frame 1 tokens: CLS + frame 1 (its padded key hidden)
            [1, 0, 0, 1, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed[0], expected)


def test_global_query_keys_by_hand():
    # 2 frames (the second padded), 2 patches per frame: keys [f0p0, f0p1, f1p0, f1p1]; no real frame: every key
    keys = global_query_keys(torch.tensor([[1, 0], [0, 0], [1, 1]]), 2)
    assert keys.tolist() == [[True, True, False, False], [True] * 4, [True] * 4]


def test_query_positions_by_hand():
    ids = torch.tensor([[SOT_ID, 5, 6, EOT_ID, 0], [SOT_ID, 5, EOT_ID, 0, 0]])
    mask = (ids != 0).long()
    g, pos, m = query_positions(ids, mask, "eot")
    assert g.tolist() == [3, 2] and pos.tolist() == [[0, 1, 2, 4], [0, 1, 3, 4]]
    assert m.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    g, pos, m = query_positions(ids, mask, "first")
    assert g.tolist() == [0, 0] and pos.tolist() == [[1, 2, 3, 4]] * 2 and m.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]


# ----------------------------------------------------------------------------------------------- BridgeFormer


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head softmax attention of ``q [n, W]`` over ``k, v [m, W]``."""
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[:, s] @ k[:, s].t() / math.sqrt(d), dim=-1)
        out.append(weights @ v[:, s])
    return torch.cat(out, dim=-1)


def reference_bridge(bridge: BridgeFormer, layers, video_mask, states, ids, qmask) -> torch.Tensor:
    """MCQ's bridge written as loops (one sample, one frame at a time, only the real keys), no masks."""
    c = bridge.config
    outs = []
    for b in range(ids.shape[0]):
        valid = [i for i in range(ids.shape[1]) if qmask[b, i]]
        g = int(ids[b].argmax()) if c.global_query == "eot" else 0
        others = [i for i in range(ids.shape[1]) if i != g]
        frames = [t for t in range(video_mask.shape[1]) if video_mask[b, t]]
        x = None
        for index, block in enumerate(bridge.blocks):
            q_states = block.norm5(states[c.text_state_index(index)][b])
            q = block.crossattn.q_question(q_states)
            patches = block.norm4(layers[index][b, :, 1:])  # [T, P, W]
            k, v = block.crossattn.kv_video(patches).chunk(2, dim=-1)
            cls = block.crossattn.proj(_attend(q[g : g + 1], k[frames].flatten(0, 1), v[frames].flatten(0, 1), c.heads))
            per = [block.crossattn.proj(_attend(q[others], k[t], v[t], c.heads)) for t in range(layers[index].shape[1])]
            t_in = torch.cat([cls, *per])
            t_in = t_in if x is None else t_in + x
            n_other = len(others)
            key_ok = [0] + [1 + t * n_other + j for t in frames for j, i in enumerate(others) if i in valid]
            h = block.norm7(t_in)
            qq, kk, vv = block.bridgeattn.qkv(h).chunk(3, dim=-1)
            rows = [block.bridgeattn.proj(_attend(qq[:1], kk[key_ok], vv[key_ok], c.heads))]
            for t in range(layers[index].shape[1]):
                own = [0] + [1 + t * n_other + j for j, i in enumerate(others) if i in valid and t in frames]
                span = slice(1 + t * n_other, 1 + (t + 1) * n_other)
                rows.append(block.bridgeattn.proj(_attend(qq[span], kk[own], vv[own], c.heads)))
            r = t_in + torch.cat(rows)
            x = r + block.bridge_mlp(block.norm6(r))
        outs.append(bridge.bridge_proj(bridge.norm2(x)[0]))
    return torch.stack(outs)


def _tiny_inputs(seed: int = 0, frames: int = 3):
    torch.manual_seed(seed)
    config = CLIPConfig.from_json(TINY)
    model = build_membridge(ModelConfig(clip=config, max_frames=frames))
    ids = torch.zeros(3, 7, dtype=torch.long)
    for row, n in enumerate((7, 5, 4)):
        ids[row, :n] = torch.tensor([SOT_ID, *torch.randint(1, 1000, (n - 2,)).tolist(), EOT_ID])
    video = torch.randn(3, frames, 3, config.image_resolution, config.image_resolution)
    video_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])[:, :frames]
    return model, ids, (ids != 0).long(), video, video_mask


@pytest.mark.parametrize(("layer_map", "global_query"), [("half", "eot"), ("same", "first")])
def test_bridgeformer_matches_loop_reference(layer_map, global_query):
    model, ids, qmask, video, video_mask = _tiny_inputs()
    bridge = BridgeFormer(BridgeFormerConfig.for_clip(model.encoder.clip, layer_map, global_query))
    with torch.no_grad():
        _, layers = model.encoder.encode_video(video, video_mask, return_layer_tokens=True)
        states = question_layer_states(model.encoder.clip, ids)
        got = bridge(layers, video_mask, states, ids, qmask)
        want = reference_bridge(bridge, layers, video_mask, states, ids, qmask)
    assert len(layers) == model.encoder.clip.config.vision_layers
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bridge_ignores_padded_frames_and_question_padding():
    model, ids, qmask, video, video_mask = _tiny_inputs()
    bridge = BridgeFormer(BridgeFormerConfig.for_clip(model.encoder.clip))
    with torch.no_grad():
        _, layers = model.encoder.encode_video(video, video_mask, return_layer_tokens=True)
        states = question_layer_states(model.encoder.clip, ids)
        base = bridge(layers, video_mask, states, ids, qmask)
        noisy_layers = [x.clone() for x in layers]
        for x in noisy_layers:
            x[2, 1:] += 5 * torch.randn_like(x[2, 1:])  # sample 2 has one real frame
        noisy_states = [s.clone() for s in states]
        for s in noisy_states:
            s[2, 4:] += 5 * torch.randn_like(s[2, 4:])  # sample 2's question has 4 real tokens
        noisy = bridge(noisy_layers, video_mask, noisy_states, ids, qmask)
    torch.testing.assert_close(noisy, base)
    assert not torch.allclose(bridge(layers, torch.ones_like(video_mask), states, ids, qmask)[2], base[2])


def test_encode_video_layer_tokens_do_not_change_features():
    model, _, _, video, video_mask = _tiny_inputs()
    with torch.no_grad():
        plain = model.encoder.encode_video(video, video_mask)
        feats, layers = model.encoder.encode_video(video, video_mask, return_layer_tokens=True)
        first = model.encoder.clip.visual.embed_video(video).reshape(layers[0].shape)
    assert torch.equal(plain, feats) and torch.equal(layers[0], first)


def test_bridge_init_is_mcq_init():
    model, *_ = _tiny_inputs()
    bridge = BridgeFormer(BridgeFormerConfig.for_clip(model.encoder.clip))
    for name, p in bridge.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert p.abs().max() <= 2.0 and 0.015 < p.std() < 0.025, name  # trunc-normal(0.02)


# ----------------------------------------------------------------------------------------------- loss


def test_norm_softmax_matches_plain_reference():
    torch.manual_seed(0)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    sim = cosine_matrix(a, b)
    ref_sim = [[float(a[i] @ b[j]) / (float(a[i].norm()) * float(b[j].norm())) for j in range(5)] for i in range(5)]
    torch.testing.assert_close(sim, torch.tensor(ref_sim), rtol=1e-5, atol=1e-6)
    T = 0.05
    rows = -sum(ref_sim[i][i] / T - math.log(sum(math.exp(ref_sim[i][j] / T) for j in range(5))) for i in range(5)) / 5
    cols = -sum(ref_sim[j][j] / T - math.log(sum(math.exp(ref_sim[i][j] / T) for i in range(5))) for j in range(5)) / 5
    assert float(norm_softmax_loss(sim, T)) == pytest.approx(rows + cols, rel=1e-5)
    assert float(norm_softmax_loss(torch.zeros(4, 4), 0.05)) == pytest.approx(2 * math.log(4), rel=1e-6)


def _batch(seed: int = 0):
    model, ids, qmask, video, video_mask = _tiny_inputs(seed)
    text = ids.clone()
    text[:, 1] = 77
    batch = {
        "video": video, "video_mask": video_mask, "text_ids": text, "mcq_question_ids": ids,
        "mcq_question_mask": qmask, "mcq_answer_ids": torch.roll(ids, 1, dims=1).clamp(max=EOT_ID),
    }  # fmt: skip
    batch["mcq_answer_ids"][:, 0] = SOT_ID
    return model, batch


def test_mcq_task_loss_is_vt_plus_weighted_bridge_loss():
    model, batch = _batch()
    bridge = BridgeFormer(BridgeFormerConfig.for_clip(model.encoder.clip))
    task = MCQTask(model, bridge, MCQWeights(mcq=0.3, temperature=0.1, vt_loss="normsoftmax"))
    out = task(batch)
    enc = model.encoder
    with torch.no_grad():
        frames, layers = enc.encode_video(batch["video"], batch["video_mask"], return_layer_tokens=True)
        video = enc.video_embedding(frames, batch["video_mask"])
        vt = norm_softmax_loss(cosine_matrix(enc.text_features(batch["text_ids"]), video), 0.1)
        states = question_layer_states(enc.clip, batch["mcq_question_ids"])
        b = reference_bridge(bridge, layers, batch["video_mask"], states, batch["mcq_question_ids"],
                             batch["mcq_question_mask"])  # fmt: skip
        mcq = norm_softmax_loss(cosine_matrix(enc.text_features(batch["mcq_answer_ids"]), b), 0.1)
    assert float(out["contrastive"]) == pytest.approx(float(vt), rel=1e-5)
    assert float(out["mcq"]) == pytest.approx(float(mcq), rel=1e-4)
    assert float(out["loss"]) == pytest.approx(float(vt + 0.3 * mcq), rel=1e-4)


def test_gradients_reach_exactly_the_trained_parameters():
    model, batch = _batch()
    task = MCQTask(
        model, BridgeFormer(BridgeFormerConfig.for_clip(model.encoder.clip)), MCQWeights(vt_loss="normsoftmax")
    )
    task(batch)["loss"].backward()
    no_grad = {n for n, p in task.named_parameters() if p.grad is None or not torch.any(p.grad != 0)}
    assert no_grad == {"model.encoder.clip.logit_scale"}  # NormSoftmax has a fixed temperature
    # without the MCQ loss, the bridge gets no gradient and the encoder still does
    model, batch = _batch()
    task = MCQTask(model, BridgeFormer(BridgeFormerConfig.for_clip(model.encoder.clip)), MCQWeights(mcq=0.0))
    task(batch)["loss"].backward()
    bridge_grads = [p.grad for n, p in task.named_parameters() if ".stage1_aux." in n]
    assert bridge_grads and all(g is None or not torch.any(g != 0) for g in bridge_grads)
    assert model.encoder.clip.logit_scale.grad is not None and torch.any(model.encoder.clip.logit_scale.grad != 0)


# ----------------------------------------------------------------------------------------------- checkpoints


def test_training_only_weights_saved_apart_and_dropped_downstream(tmp_path, caplog):
    model, _ = _batch()
    MCQTask(model, BridgeFormer(BridgeFormerConfig.for_clip(model.encoder.clip)))
    state = model.state_dict()
    assert any(k.startswith("stage1_aux.bridge.blocks.0.crossattn.q_question") for k in state)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    plain, _ = _batch(seed=1)  # a downstream model without the bridge
    with caplog.at_level(logging.INFO):
        report = load_weights(path, plain, strict=True)
    assert report.unexpected == [] and report.missing == []
    assert "training-only tensors of a stage-1 objective (stage1_aux.bridge) not loaded" in caplog.text
    assert torch.equal(plain.encoder.clip.visual.proj, model.encoder.clip.visual.proj)
    # a chained MCQ stage (--init_model) restores the bridge too
    chained, _ = _batch(seed=2)
    MCQTask(chained, BridgeFormer(BridgeFormerConfig.for_clip(chained.encoder.clip)))
    assert load_aux_from_init(argparse.Namespace(init_model=str(path)), chained) > 0
    for name, tensor in chained.stage1_aux.state_dict().items():
        assert torch.equal(tensor, state[f"stage1_aux.{name}"]), name


def test_registry_default_is_the_contrastive_task():
    from engine.flags import build_parser

    args = build_parser("clip").parse_args(["--do_train", "--output_dir", "x"])
    assert args.stage1_objective == "clip" and set(STAGE1_OBJECTIVES) == {"clip", "mcq", "hmmc"}
    model, _ = _batch()
    task = STAGE1_OBJECTIVES["clip"].build_task(args, model)
    assert type(task) is ContrastiveTask and not hasattr(model, "stage1_aux")
    assert STAGE1_OBJECTIVES["clip"].prepare_train_set(args, "dataset") == "dataset"


# ----------------------------------------------------------------------------------------------- end to end


def _run(args: list[str], module: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "main_task_clip.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _common(data: Path) -> list[str]:
    return [
        "--clip_config", str(TINY),
        "--val_csv", str(data / "msrvtt" / "MSRVTT_JSFUSION_test.csv"), "--features_path", str(data / "videos"),
        "--max_frames", "4", "--max_words", "16", "--batch_size_val", "16", "--num_thread_reader", "0",
        "--torch_threads", "1", "--no-log_tensorboard",
    ]  # fmt: skip


@pytest.mark.slow
def test_mcq_stage1_learns_on_small_synthetic_set(synthetic_small, tmp_path):
    data = synthetic_small
    out = tmp_path / "mcq"
    _run([
        "--do_train", *_common(data), "--output_dir", str(out), "--stage1_objective", "mcq",
        "--phrase_file", str(data / "webvid" / "noun_verb.tsv"),
        "--train_csv", str(data / "webvid" / "frozen_train_labels.json"),
        "--webvid_tfrecord", str(data / "webvid" / "tfrecord"),
        "--batch_size", "8", "--epochs", "30", "--lr", "2e-3", "--coef_lr", "1", "--warmup_proportion", "0.05",
        "--n_display", "6",
    ])  # fmt: skip
    chance = json.loads((data / "manifest.json").read_text())["chance"]["retrieval_R1"]
    result = json.loads((out / "eval_results.json").read_text())
    assert result["t2v_R1"] >= 3 * chance and result["v2t_R1"] >= 3 * chance, result
    rows = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    mcq = [row["train/mcq"] for row in rows if "train/mcq" in row]
    assert mcq[0] > 0.9 * 2 * math.log(8)  # starts at chance (NormSoftmax of a batch of 8)
    assert mcq[-1] < 0.5 * 2 * math.log(8), mcq  # the bridge learns to answer
    # the checkpoint feeds the default objective (and downstream tasks) without its bridge
    ckpt = out / "ckpt" / (out / "ckpt" / "latest").read_text().strip()
    _run(["--do_eval", *_common(data), "--output_dir", str(tmp_path / "eval"), "--init_model", str(ckpt)])
    log = (tmp_path / "eval" / "log.txt").read_text()
    assert "(stage1_aux.bridge) not loaded" in log and ", 0 missing, 0 unexpected" in log
    again = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert again["t2v_R1"] == pytest.approx(result["t2v_R1"])


@pytest.mark.parametrize(
    ("script", "frames", "question", "lr", "init"),
    [
        ("start_clip_mcq_1frame.sh", 1, "noun", 1e-4, None),
        ("start_clip_mcq_4frame_noun.sh", 4, "noun", 3e-5, "/ckpt"),
        ("start_clip_mcq_4frame_verb.sh", 4, "verb", 1e-5, "/ckpt"),
    ],
)
def test_curriculum_launch_scripts(tmp_path, script, frames, question, lr, init):
    from engine.flags import build_parser
    from tests.test_launch_scripts import DEFAULT_NODE_FLAGS, launch, split_entry

    entry, flags = split_entry(launch(tmp_path, script)[len(DEFAULT_NODE_FLAGS) :])
    args = build_parser("clip").parse_args(flags)
    assert entry == "main_task_clip.py" and args.stage1_objective == "mcq" and args.phrase_file
    assert (args.max_frames, args.mcq_question, args.lr, args.init_model) == (frames, question, lr, init)
    assert (args.visual_pretrain_path is None) == (init is not None)


@pytest.mark.slow
def test_mcq_two_gloo_ranks_equal_one_process(synthetic_small, tmp_path):
    """The MCQ losses are over the global batch (gathers keep the local gradient): 2 ranks x 2 samples train exactly
    as 1 process x 4 samples, bridge included."""
    from tests.test_stage1 import latest_weights, losses, run_script, stage1_flags

    flags = ("--max_steps", "3", "--epochs", "1", "--stage1_objective", "mcq", "--mcq_question", "mixed",
             "--phrase_file", str(synthetic_small / "webvid" / "noun_verb.tsv"))  # fmt: skip
    run_script(stage1_flags(synthetic_small, tmp_path / "one", *flags), nproc=1)
    run_script(stage1_flags(synthetic_small, tmp_path / "two", *flags), nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-5, abs=1e-6)
    w1, w2 = latest_weights(tmp_path / "one"), latest_weights(tmp_path / "two")
    assert w1.keys() == w2.keys() and any(name.startswith("stage1_aux.bridge.") for name in w1)
    for name in w1:
        a, b = w1[name], w2[name]
        if name.endswith("attn.in_proj_bias"):
            # The key bias has an exactly zero gradient (softmax ignores a per-query constant): Adam normalises the
            # rounding noise into updates of up to lr per step, different in 1 and 2 processes. Checked to 3 x lr.
            width = a.shape[0] // 3
            torch.testing.assert_close(a[width : 2 * width], b[width : 2 * width], rtol=0, atol=3e-3, msg=name)
            a, b = torch.cat([a[:width], a[2 * width :]]), torch.cat([b[:width], b[2 * width :]])
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    rows = [json.loads(line) for line in (tmp_path / "two" / "scalars.jsonl").read_text().splitlines()]
    assert all(row["train/mcq"] > 0 for row in rows if "train/mcq" in row)


def test_official_quirks_bridge_attends_padded_frames():
    model, ids, qmask, video, video_mask = _tiny_inputs()
    torch.manual_seed(3)
    quirky = BridgeFormer(BridgeFormerConfig.for_clip(model.encoder.clip, frame_mask=False))
    masked = BridgeFormer(BridgeFormerConfig.for_clip(model.encoder.clip))
    masked.load_state_dict(quirky.state_dict())
    with torch.no_grad():
        _, layers = model.encoder.encode_video(video, video_mask, return_layer_tokens=True)
        states = question_layer_states(model.encoder.clip, ids)
        got = quirky(layers, video_mask, states, ids, qmask)
        all_real = masked(layers, torch.ones_like(video_mask), states, ids, qmask)
        intended = masked(layers, video_mask, states, ids, qmask)
    torch.testing.assert_close(got, all_real)
    assert torch.equal(got[0], intended[0]) and not torch.allclose(got[2], intended[2])  # sample 0 has no padding


def test_mcq_flag_rules_and_phrase_coverage(tmp_path):
    from dataloaders.errors import ConfigError
    from video_text_retrieval.stage1 import check_mcq, prepare_mcq_set

    args = argparse.Namespace(do_train=True, phrase_file=None, sim_header="meanP")
    with pytest.raises(ConfigError, match="pass --phrase_file"):
        check_mcq(args)
    with pytest.raises(ConfigError, match="dual-encoder"):
        check_mcq(argparse.Namespace(do_train=True, phrase_file="p.tsv", sim_header="tightTransf"))
    tsv = _write_tsv(tmp_path / "p.tsv", ["a red circle\tother\t['red circle']\t[]"])
    flags = argparse.Namespace(phrase_file=str(tsv), official_quirks=False, max_words=12, mcq_question="noun",
                               mcq_mask_id=0, mcq_answer_prompt=3)  # fmt: skip
    dataset = argparse.Namespace(video_ids=["video0", "video1"], extra_items=None)
    with pytest.raises(ConfigError, match="no row for any of the 2 training videos"):
        prepare_mcq_set(flags, dataset)


def test_mcq_clip_checkpoint_layout_loads_as_clip_weights(tmp_path):
    """MCQ_CLIP.pth (§A.12): an OpenAI-layout CLIP under ``state_dict`` with DDP ``module.`` prefixes, next to
    trainer entries. Without its pickled ConfigParser (which no weights-only reader accepts) it loads as CLIP."""
    from modules.clip_model import CLIP, load_clip

    torch.manual_seed(0)
    clip = CLIP(CLIPConfig.from_json(TINY))
    wrapped = {"arch": "MCQ", "epoch": 3, "monitor_best": 0.5,
               "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}  # fmt: skip
    path = tmp_path / "MCQ_CLIP.pth"
    torch.save(wrapped, path)
    loaded = load_clip(path=path, config=CLIPConfig.from_json(TINY))
    for name, tensor in clip.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].float(), tensor.float()), name


@pytest.mark.slow
def test_mcq_resume_after_sigkill_continues_exactly(synthetic_small, tmp_path):
    """The bridge (``stage1_aux.bridge.*``), its optimizer state and the question draws resume exactly."""

    from tests.test_stage1 import kill_after_first_checkpoint, latest_weights, losses, run_script, stage1_flags

    # no DataLoader workers: a killed run's workers keep its output-folder lock until they notice (up to 5 s)
    phrases = str(synthetic_small / "webvid" / "noun_verb.tsv")
    flags = ("--epochs", "2", "--save_steps", "2", "--stage1_objective", "mcq", "--mcq_question", "mixed",
             "--num_thread_reader", "0", "--phrase_file", phrases)  # fmt: skip
    full = tmp_path / "full"
    run_script(stage1_flags(synthetic_small, full, *flags))
    reference = losses(full)
    assert len(reference) == 12
    killed = tmp_path / "killed"
    interrupted_at = kill_after_first_checkpoint(stage1_flags(synthetic_small, killed, *flags), killed)
    assert interrupted_at < 12
    run_script(stage1_flags(synthetic_small, killed, *flags, "--resume"))
    resumed = losses(killed)
    for step in range(interrupted_at + 1, 13):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    w_full, w_resumed = latest_weights(full), latest_weights(killed)
    assert any(name.startswith("stage1_aux.bridge.") for name in w_full) and w_full.keys() == w_resumed.keys()
    for name in w_full:
        torch.testing.assert_close(w_resumed[name], w_full[name], rtol=1e-5, atol=1e-6, msg=name)
