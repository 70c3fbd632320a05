"""Captioning: the cached text encoder, decoding through the fusion (cached == naive, beam 1 == greedy, decoding ==
the training objective), the task's gradients, best-weight selection, and the published command line end to end on
the synthetic MSVD files (CIDEr after fine-tuning far above the untrained model's)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.builders import build_model
from modules.fusion import FusionInputs, encode_text_with_probes, plm_targets, readout_plan, transformer_rows
from modules.incremental_text import TextKVCache, extend_text_cache
from modules.membridge import MemBridgeModel
from tests.fusion_fixtures import EOT, FRAMES, SOT, WORDS, stage2_batch, text_batch, tiny_model
from video_captioning.captioner import FusionCaptioner, generate_captions, reorder_state
from video_captioning.decoding import beam_search, greedy_decode
from video_captioning.task import CaptionTask, build_caption_parser

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5
NUM_VIDEOS = 3
MAX_LEN = WORDS - 1


@pytest.fixture(scope="module")
def model() -> MemBridgeModel:
    return tiny_model(seed=3).eval()


@pytest.fixture(scope="module")
def videos() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    frames = torch.randn(NUM_VIDEOS, FRAMES, 64, generator=gen)
    mask = torch.ones(NUM_VIDEOS, FRAMES, dtype=torch.long)
    mask[1, -1] = 0  # one video with a padded frame
    return frames, mask


# ------------------------------------------------------------------------------------------- incremental text encoder


@torch.no_grad()
def test_incremental_text_encoder_equals_full_encoding(model):
    clip = model.encoder.clip
    ids, _ = text_batch([WORDS] * 3, seed=1)
    full = clip.encode_text_tokens(ids)
    cache = TextKVCache.empty(clip, 3)
    for i in range(WORDS - 1):
        token, probe, cache = extend_text_cache(clip, cache, ids[:, i], EOT)
        assert cache.length == i + 1
        assert torch.allclose(token, full[:, i], atol=ATOL)
        with_eot = torch.cat([ids[:, : i + 1], torch.full((3, 1), EOT)], dim=1)  # [SOT, w1..wi, EOT]
        assert torch.allclose(probe, clip.encode_text_tokens(with_eot)[:, -1], atol=ATOL)
    token, probe, _ = extend_text_cache(clip, cache, ids[:, -1])  # no probe: only the new token
    assert probe is None and torch.allclose(token, full[:, -1], atol=ATOL)
    # Reordered rows continue as the rows they were taken from.
    index = torch.tensor([2, 2, 0])
    moved, _, _ = extend_text_cache(clip, cache.index_select(index), ids[index, -1])
    assert torch.allclose(moved, full[index, -1], atol=ATOL)


# ------------------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_cached_decoding_equals_naive_reencoding(model, videos, beam_size):
    frames, mask = videos
    cached = generate_captions(model, frames, mask, MAX_LEN, beam_size=beam_size, bos=SOT)
    naive = generate_captions(model, frames, mask, MAX_LEN, beam_size=beam_size, bos=SOT, use_cache=False)
    assert cached.shape[1] > 3  # long enough that the cache is really used
    assert torch.equal(cached, naive)


def _plm_inputs(frames: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor, seed: int) -> FusionInputs:
    """A prefix-LM pass over random text features with per-row prefixes (slots ``0 .. max(prefix)+1``)."""
    gen = torch.Generator().manual_seed(seed)
    slots = int(prefix.max()) + 2
    feats = torch.randn(frames.shape[0], slots, frames.shape[-1], generator=gen)
    probe = torch.randn(frames.shape[0], frames.shape[-1], generator=gen)
    text_mask = torch.ones(frames.shape[0], slots, dtype=torch.long)
    return FusionInputs.prefix_lm(frames, mask, feats, text_mask, prefix, probe)


@torch.no_grad()
def test_readout_plan_skips_what_the_scored_slot_does_not_read(model, videos):
    """Prefix LM with bridges: the last layer computes the scored slot only, over bridge + text keys; the layer
    before skips the video rows' outputs (only bridges + text read them next); earlier layers compute everything."""
    frames, mask = videos
    fusion = model.fusion
    i, t, k = 4, FRAMES, fusion.num_bridges
    _, attn_mask, _ = fusion._sequence(_plm_inputs(frames, mask, torch.full((NUM_VIDEOS,), i), seed=0))
    n = attn_mask.shape[-1]
    slot = t + 1 + k + i + 1
    plan = readout_plan(attn_mask, torch.tensor([slot]), fusion.config.layers)
    (last_out, last_cols), (prev_out, prev_cols) = plan[-1], plan[-2]
    assert last_out.nonzero().squeeze(1).tolist() == [slot]
    assert last_cols.nonzero().squeeze(1).tolist() == list(range(t + 1, n))  # bridges + text 0 .. i+1
    assert prev_out.nonzero().squeeze(1).tolist() == list(range(t + 1, n))  # no video row
    assert bool(prev_cols.all())  # bridges read every column
    assert all(bool(out.all()) and bool(cols.all()) for out, cols in plan[:-2])


@pytest.mark.parametrize("bridge_source", ["memory", "none"])
@torch.no_grad()
def test_pruned_fusion_equals_the_full_pass(videos, bridge_source):
    """transformer_rows / next_token_logits_pruned against the full pass, with a padded frame, per-row prefixes and
    (``none``) the ablation where video and text see each other directly."""
    frames, mask = videos
    model = tiny_model(seed=4, bridge_source=bridge_source).eval()
    fusion, embedding = model.fusion, model.encoder.clip.token_embedding.weight
    prefix = torch.tensor([0, 5, 2])
    inputs = _plm_inputs(frames, mask, prefix, seed=1)
    x, attn_mask, _ = fusion._sequence(inputs)
    full = fusion.transformer(x, attn_mask)
    rows = torch.tensor([fusion.text_offset(FRAMES) + 1, x.shape[1] - 1, FRAMES])
    assert torch.allclose(transformer_rows(fusion.transformer, x, attn_mask, rows), full[:, rows], atol=ATOL)
    hidden_frame = attn_mask.clone()
    hidden_frame[..., FRAMES - 1] = float("-inf")  # a column no row sees is left out from layer 0 on
    plan = readout_plan(hidden_frame, rows, fusion.config.layers)
    assert not bool(plan[0][0][FRAMES - 1] | plan[0][1][FRAMES - 1])
    expected_rows = fusion.transformer(x, hidden_frame)[:, rows]
    assert torch.allclose(transformer_rows(fusion.transformer, x, hidden_frame, rows), expected_rows, atol=ATOL)
    expected, _ = fusion.next_token_logits(inputs, fusion.vocab_weight(embedding))
    pruned = fusion.next_token_logits_pruned(inputs, embedding)
    assert pruned.shape == expected.shape == (NUM_VIDEOS, embedding.shape[0])
    assert torch.allclose(pruned, expected, atol=ATOL)
    hidden = torch.randn(4, fusion.config.width)
    factored = fusion.vocab_logits_factored(hidden, embedding)
    assert torch.allclose(factored, fusion.vocab_logits(hidden, token_embedding=embedding), atol=ATOL)


@torch.no_grad()
def test_cached_step_logits_equal_naive_step_logits(model, videos):
    """Step by step along one teacher-forced prefix, the cached step's log-probabilities equal the plain step's."""
    frames, mask = videos
    ids, _ = text_batch([WORDS] * NUM_VIDEOS, seed=7)
    cached, naive = FusionCaptioner(model, frames, mask), FusionCaptioner(model, frames, mask, use_cache=False)
    cached_state, naive_state = cached.initial_state(), naive.initial_state()
    assert cached.vocab_weight is None  # the fast path never forms P @ E_tok^T
    for i in range(WORDS - 1):
        fast, cached_state = cached.step(ids[:, : i + 1], cached_state)
        plain, naive_state = naive.step(ids[:, : i + 1], naive_state)
        assert torch.allclose(fast, plain, atol=ATOL), f"step {i}"


def test_beam_size_one_equals_greedy(model, videos):
    frames, mask = videos
    captioner = FusionCaptioner(model, frames, mask)
    settings = {"batch_size": NUM_VIDEOS, "bos": SOT, "eos": EOT, "max_len": MAX_LEN}
    with torch.no_grad():
        greedy = greedy_decode(captioner.step, reorder_state, captioner.initial_state(), **settings)
        beam, _ = beam_search(captioner.step, reorder_state, captioner.initial_state(), beam_size=1, **settings)
    assert torch.equal(greedy, beam)


@torch.no_grad()
def test_decoding_scores_equal_the_training_objective(model, videos):
    """Teacher-forced decoding steps give the log-probabilities that ``plm_loss`` (every token scored) trains."""
    frames, mask = videos
    lengths = [WORDS, 5, 9]
    ids, text_mask = text_batch(lengths, seed=2)
    starts = torch.ones(NUM_VIDEOS, dtype=torch.long)
    clip, fusion = model.encoder.clip, model.fusion
    rows, prefixes, targets = plm_targets(ids, text_mask, starts)
    unique = prefixes.unique()
    token_feats, probe_feats = encode_text_with_probes(clip, ids, unique, EOT)
    expected, _ = fusion.plm_loss(
        frames, mask, ids, text_mask, starts, token_feats, probe_feats, unique, clip.token_embedding.weight
    )
    captioner = FusionCaptioner(model, frames, mask)
    state = captioner.initial_state()
    scores = []
    for i in range(WORDS - 1):
        logprobs, state = captioner.step(ids[:, : i + 1], state)
        scores.append(logprobs)
    scores = torch.stack(scores, dim=1)  # [B, L-1, V]: position i predicts token i+1
    decoded = -scores[rows, prefixes, targets].mean()
    assert torch.allclose(decoded, expected, atol=ATOL)


def test_caption_task_trains_fusion_and_video_encoder_only():
    model = tiny_model(seed=4)
    model.encoder.requires_grad_(True)
    model.encoder.clip.token_embedding.requires_grad_(False)
    task = CaptionTask(model).train()
    batch = stage2_batch([WORDS, 4, 7])
    out = task(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and 0.0 <= float(out["plm_acc"]) <= 1.0
    clip = model.encoder.clip
    assert all(p.grad is not None for p in model.fusion.transformer.parameters())
    assert model.fusion.vocab_proj.grad is not None and clip.visual.conv1.weight.grad is not None
    assert all(p.grad is None for p in clip.transformer.parameters())  # text features carry no gradient


def _tiny_args(init_model: Path) -> argparse.Namespace:
    flags = f"--do_train --output_dir unused --max_frames 4 --max_words 16 --init_model {init_model} " + TINY_MODEL
    return build_caption_parser().parse_args(flags.split())


def test_init_model_loads_stage2_fusion_or_initialises_it_from_clip(stage1_checkpoint, tmp_path):
    from_stage1 = build_model(_tiny_args(stage1_checkpoint), with_fusion=True)
    clip_block = from_stage1.encoder.clip.transformer.resblocks[0].state_dict()
    for key, value in from_stage1.fusion.transformer.resblocks[0].state_dict().items():
        assert torch.equal(value, clip_block[key])
    with torch.no_grad():
        for param in from_stage1.fusion.parameters():
            param.add_(0.5)
    stage2 = tmp_path / "stage2.safetensors"
    save_file({k: v.contiguous() for k, v in from_stage1.state_dict().items()}, str(stage2))
    from_stage2 = build_model(_tiny_args(stage2), with_fusion=True)
    for key, value in from_stage1.fusion.state_dict().items():
        assert torch.equal(from_stage2.fusion.state_dict()[key], value)


# ------------------------------------------------------------------------------------------------ end to end (CLI)

PUBLISHED_COMMAND = (
    "--do_train --num_thread_reader=4 --cross_config_path ../CLIP-modules --epochs=10 --batch_size=32 --n_display=50 "
    "--data_path {data} --features_path {data}/MSVD_Videos --warmup_proportion 0.2 --output_dir {out} --lr 5e-5 "
    "--max_words 32 --max_frames 12 --batch_size_val 32 --datatype msvd --expand_msrvtt_sentences "
    "--feature_framerate 1 --coef_lr 1e-3 --freeze_layer_num 0 --slice_framepos 2 --loose_type --linear_patch 2d "
    "--sim_header meanP --init_model {init}"
)
TINY_MODEL = "--clip_config CLIP-modules/tiny.json --cross_config_path CLIP-modules/fusion-tiny.json"
TINY_OVERRIDES = (
    TINY_MODEL + " --max_frames 4 "
    "--max_words 16 --num_thread_reader 0 --batch_size 16 --batch_size_val 12 --epochs 6 --lr 1e-2 --coef_lr 1 "
    "--freeze_layer_num -1 --warmup_proportion 0.1 --torch_threads 1 --features_path {videos}"
)
TRAINED_MIN_CIDER = 0.1  # pycocoevalcap scale (CIDEr-D, 0..10); the tiny run reaches about 0.18
UNTRAINED_MAX_CIDER = 0.02  # random tokens
RUN_TIMEOUT_S = 600


def _run(args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "video_captioning.main_task_caption", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory) -> Path:
    """A stage-1 style ``--init_model``: CLIP weights only, so the fusion starts from the CLIP text blocks."""
    from modules.clip_model import load_clip
    from modules.video_clip import VideoCLIP

    torch.manual_seed(0)
    encoder = VideoCLIP(load_clip(config=REPO / "CLIP-modules" / "tiny.json"), joint_layers=2, max_frames=4)
    path = tmp_path_factory.mktemp("init") / "stage1.safetensors"
    save_file({k: v.contiguous() for k, v in MemBridgeModel(encoder, None).state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def trained(synthetic_small, stage1_checkpoint, tmp_path_factory) -> Path:
    """The published MSVD command (tiny overrides appended)."""
    out = tmp_path_factory.mktemp("caption_msvd")
    data = synthetic_small / "msvd"
    command = PUBLISHED_COMMAND.format(data=data, out=out, init=stage1_checkpoint)
    command += " " + TINY_OVERRIDES.format(videos=synthetic_small / "videos")
    _run(command.split())
    return out


@pytest.fixture(scope="module")
def untrained(synthetic_small, stage1_checkpoint, tmp_path_factory) -> Path:
    """``--do_eval`` of the same start weights (fusion never trained)."""
    out = tmp_path_factory.mktemp("caption_untrained")
    command = PUBLISHED_COMMAND.format(data=synthetic_small / "msvd", out=out, init=stage1_checkpoint)
    command = (
        command.replace("--do_train", "--do_eval") + " " + TINY_OVERRIDES.format(videos=synthetic_small / "videos")
    )
    _run(command.split())
    return out


@pytest.mark.slow
def test_published_command_trains_and_writes_results(trained, synthetic_small):
    results = json.loads((trained / "eval_results.json").read_text())
    for key in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert 0.0 <= results[key] and results[key + "_x100"] == pytest.approx(100 * results[key])
    assert results["split"] == "test" and "best_val_CIDEr" in results
    captions = json.loads((trained / "captions_test.json").read_text())
    test_ids = (synthetic_small / "msvd" / "test_list.txt").read_text().split()
    assert sorted(captions) == sorted(test_ids) and results["num_videos"] == len(test_ids)
    assert all(isinstance(text, str) for text in captions.values())
    assert (trained / "best_model.safetensors").is_file() and (trained / "captions_val.json").is_file()


@pytest.mark.slow
def test_fine_tuning_beats_the_untrained_model_by_far(trained, untrained):
    after = json.loads((trained / "eval_results.json").read_text())["CIDEr"]
    before = json.loads((untrained / "eval_results.json").read_text())["CIDEr"]
    assert before <= UNTRAINED_MAX_CIDER
    assert after >= TRAINED_MIN_CIDER, f"CIDEr after fine-tuning {after:.3f} (untrained {before:.3f})"


@pytest.mark.parametrize(("script", "datatype", "epochs"), [("start_caption_msrvtt.sh", "msrvtt", 5),
                                                             ("start_caption_msvd.sh", "msvd", 10)])  # fmt: skip
def test_launch_scripts_pass_the_published_recipe_and_the_checkpoint(tmp_path, script, datatype, epochs):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$ARGS_FILE"\n')
    (bin_dir / "torchrun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("INIT_MODEL", "PRETRAINED_MODEL")}
    env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGS_FILE": str(tmp_path / "args"), "DATA_PATH": "/data"})

    def launch(**variables: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(REPO / script), "--beam_size", "5"], cwd=REPO, env={**env, **variables},
            capture_output=True, text=True,
        )  # fmt: skip

    for name in ("INIT_MODEL", "PRETRAINED_MODEL"):  # PRETRAINED_MODEL: the older name, still accepted
        proc = launch(**{name: "/ckpt/step-7"})
        assert proc.returncode == 0, proc.stderr
        argv = (tmp_path / "args").read_text().splitlines()
        args = build_caption_parser().parse_args(argv[argv.index("video_captioning.main_task_caption") + 1 :])
        recipe = {"lr": 5e-5, "epochs": epochs, "batch_size": 32, "max_words": 32, "max_frames": 12, "coef_lr": 1e-3}
        recipe["warmup_proportion"] = 0.2
        assert {key: getattr(args, key) for key in recipe} == recipe
        assert (args.datatype, args.init_model, args.beam_size, args.do_train) == (datatype, "/ckpt/step-7", 5, True)
    missing = launch()
    assert missing.returncode != 0 and "set INIT_MODEL to the stage-2 checkpoint" in missing.stderr
