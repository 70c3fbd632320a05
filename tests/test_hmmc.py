"""HMMC as a stage-1 objective (``--stage1_objective hmmc``; MCQ_HMMC.md §B, §C.4): feature queues and momentum
copies by hand, the MoCo InfoNCE and the FAM/VTM/FTM losses against plain loop references, MLM masking by hand, the
evaluation's top-k frame term on a hand-computed case, the task's step order, training-only weights on load, and
(slow) 2 gloo ranks == 1 process, exact resume after SIGKILL and learnability on the small synthetic set."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from dataloaders.errors import ConfigError, DataError
from dataloaders.tokenizer import EOT_ID, SOT_ID
from engine.checkpoint import load_weights
from modules.clip_model import CLIPConfig
from modules.hmmc import (
    IGNORE_INDEX,
    HMMCFeatures,
    HMMCWeights,
    frame_topk_similarity,
    hmmc_contrastive_losses,
    hmmc_mlm_loss,
    mlm_inputs,
)
from modules.losses import moco_infonce
from modules.model_config import ModelConfig, build_membridge
from modules.momentum import FeatureQueue, MomentumCopy
from tests.conftest import REPO
from video_text_retrieval.stage1 import STAGE1_OBJECTIVES, HMMCSettings, HMMCTask, check_hmmc, load_aux_from_init
from video_text_retrieval.task import EncodedEvalSet, dual_similarity

TINY = REPO / "CLIP-modules" / "tiny.json"


# ----------------------------------------------------------------------------------------------- queues, momentum


def test_queue_enqueue_and_wrap_around_by_hand():
    torch.manual_seed(0)
    queue = FeatureQueue(dim=2, size=5)
    initial = queue.queue.clone()
    torch.testing.assert_close(initial.norm(dim=-1), torch.ones(5))  # random unit rows
    queue.enqueue(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    assert int(queue.ptr) == 2
    torch.testing.assert_close(queue.queue[:2], torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(queue.queue[2:], initial[2:])
    queue.enqueue(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    assert int(queue.ptr) == 4
    queue.enqueue(torch.tensor([[-5.0, 0.0], [0.0, 7.0]]))  # rows 4 and 0: written across the end
    assert int(queue.ptr) == 1
    expected = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])
    torch.testing.assert_close(queue.queue, expected)


def test_frame_queue_is_sample_major_and_ptr_counts_items():
    queue = FeatureQueue(dim=1, size=3, slots_per_item=2)
    queue.enqueue(torch.tensor([[[1.0], [2.0]], [[-3.0], [4.0]]]))  # 2 items x 2 frames
    assert int(queue.ptr) == 2 and queue.queue[:4].flatten().tolist() == [1.0, 1.0, -1.0, 1.0]
    queue.enqueue(torch.tensor([[[-1.0], [-1.0]], [[5.0], [-5.0]]]))  # item slots 2 and 0: rows 4, 5 then 0, 1
    assert int(queue.ptr) == 1 and queue.queue.flatten().tolist() == [1.0, -1.0, -1.0, 1.0, -1.0, -1.0]


def test_queue_size_rules():
    with pytest.raises(ConfigError, match="smaller than the global batch 6"):
        FeatureQueue(2, 4).check_batch(6)
    FeatureQueue(2, 10).check_batch(4)  # wrap-around writing: no divisibility needed
    with pytest.raises(ConfigError, match="not a multiple of the global batch 4"):
        FeatureQueue(2, 10, strict_divisible=True).check_batch(4)
    FeatureQueue(2, 8, strict_divisible=True).check_batch(4)
    args = _flags(contrast_num_negative=10, batch_size=4, official_quirks=True)
    with pytest.raises(ConfigError, match="not a multiple"):
        check_hmmc(args)
    check_hmmc(_flags(contrast_num_negative=10, batch_size=4))


def test_momentum_update_after_n_steps_matches_hand_computation():
    torch.manual_seed(0)
    online = nn.Linear(3, 2)
    copy = MomentumCopy(online)
    assert all(not p.requires_grad for p in copy.parameters())
    k0 = [p.detach().clone() for p in copy.parameters()]
    m, history = 0.9, []
    for _ in range(4):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p))  # an "optimizer step"
        history.append([p.detach().clone() for p in online.parameters()])
        copy.update(online, m)
    for index, got in enumerate(copy.parameters()):
        # k_N = m^N k_0 + sum_i (1 - m) m^(N - i) p_i  (i = 1..N)
        want = m**4 * k0[index] + sum((1 - m) * m ** (4 - i) * history[i - 1][index] for i in range(1, 5))
        torch.testing.assert_close(got, want)
    half = MomentumCopy(online.half())  # fp16 weights: the update is computed in fp32
    target = [p.detach().float() for p in half.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    half.update(online, 0.5)
    for got, before, now in zip(half.parameters(), target, online.parameters(), strict=True):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), (0.5 * before + 0.5 * now.float()).half().float())


# ----------------------------------------------------------------------------------------------- losses


def _ref_c(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> float:
    """One MoCo InfoNCE term written out: -log(exp(q.k/T) / (exp(q.k/T) + sum_j exp(q.Q_j/T)))."""
    q, k = q / q.norm(), k / k.norm()
    pos = math.exp(float(q @ k) / tau)
    neg = sum(math.exp(float(q @ row) / tau) for row in queue)
    return -math.log(pos / (pos + neg))


def test_moco_infonce_matches_plain_reference():
    torch.manual_seed(0)
    q, k, queue = torch.randn(4, 6), torch.randn(4, 6), F.normalize(torch.randn(7, 6), dim=-1)
    want = [_ref_c(q[i], k[i], queue, 0.07) for i in range(4)]
    torch.testing.assert_close(moco_infonce(q, k, queue, 0.07, "none"), torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert float(moco_infonce(q, k, queue, 0.07)) == pytest.approx(sum(want) / 4, rel=1e-5)
    # no in-batch negatives: another query's key does not change a row's loss
    assert float(moco_infonce(q[:1], k[:1], queue, 0.07)) == pytest.approx(want[0], rel=1e-5)


def _features(b: int = 3, t: int = 3, d: int = 5, seed: int = 0, mask: torch.Tensor | None = None) -> HMMCFeatures:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    if mask is None:
        mask = torch.ones(b, t, dtype=torch.long)
    return HMMCFeatures(r(b, d), r(b, d), r(b, t, d), r(b, t, d), r(b, d), r(b, d), r(b, t, d), r(b, t, d), mask)


def _queues(d: int = 5, k: int = 4, t: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = {"video": k, "title": k, "frame_proj": k * t, "frame_cross": k * t}
    return {name: F.normalize(torch.randn(n, d, generator=g), dim=-1) for name, n in sizes.items()}


def test_hmmc_losses_match_official_formulas_when_every_frame_is_real():
    f, Q, tau = _features(), _queues(), 0.1
    got = hmmc_contrastive_losses(f, Q, tau)
    B, T = 3, 3
    # FAM = 1/(T-1) sum_i [mean_b C(pred_i, proj_k_{i+1}) + mean_b C(pred_{i+1}, proj_k_i)]
    fam = sum(
        sum(_ref_c(f.frame_pred[b, i], f.frame_proj_k[b, i + 1], Q["frame_proj"], tau) for b in range(B)) / B
        + sum(_ref_c(f.frame_pred[b, i + 1], f.frame_proj_k[b, i], Q["frame_proj"], tau) for b in range(B)) / B
        for i in range(T - 1)
    ) / (T - 1)
    vtm = (
        sum(_ref_c(f.video[b], f.title_k[b], Q["title"], tau) for b in range(B)) / B
        + sum(_ref_c(f.title[b], f.video_k[b], Q["video"], tau) for b in range(B)) / B
    )
    ftm = (
        sum(
            sum(_ref_c(f.title[b], f.frames_k[b, i], Q["frame_cross"], tau) for b in range(B)) / B
            + sum(_ref_c(f.frames[b, i], f.title_k[b], Q["title"], tau) for b in range(B)) / B
            for i in range(T)
        )
        / T
    )
    assert float(got["fam"]) == pytest.approx(fam, rel=1e-5)
    assert float(got["vtm"]) == pytest.approx(vtm, rel=1e-5)
    assert float(got["ftm"]) == pytest.approx(ftm, rel=1e-5)


def test_hmmc_losses_leave_padded_frames_out():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    f, Q, tau = _features(mask=mask), _queues(), 0.1
    got = hmmc_contrastive_losses(f, Q, tau)
    pairs = [(0, 0), (0, 1), (1, 0)]  # (video, i) with frames i and i+1 real
    fam = sum(
        _ref_c(f.frame_pred[b, i], f.frame_proj_k[b, i + 1], Q["frame_proj"], tau)
        + _ref_c(f.frame_pred[b, i + 1], f.frame_proj_k[b, i], Q["frame_proj"], tau)
        for b, i in pairs
    ) / len(pairs)
    real = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]
    ftm = sum(
        _ref_c(f.title[b], f.frames_k[b, i], Q["frame_cross"], tau)
        + _ref_c(f.frames[b, i], f.title_k[b], Q["title"], tau)
        for b, i in real
    ) / len(real)
    assert float(got["fam"]) == pytest.approx(fam, rel=1e-5)
    assert float(got["ftm"]) == pytest.approx(ftm, rel=1e-5)
    # one frame per video: FAM has no pair and is 0
    single = _features(t=1)
    assert float(hmmc_contrastive_losses(single, _queues(t=1), tau)["fam"]) == 0.0


def test_mlm_masking_by_hand():
    ids = torch.tensor([[SOT_ID, 10, 11, 12, EOT_ID, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    draws = torch.tensor(
        [[[0.01, 0.01, 0.01, 0.01, 0.01, 0.01],  # select: every position drawn
          [0.5, 0.5, 0.85, 0.95, 0.5, 0.5],  # kind: mask, random, keep
          [0.0, 0.0, 0.5, 0.0, 0.0, 0.0]]]  # random id: 0.5 * high
    )  # fmt: skip
    masked, labels = mlm_inputs(ids, mask, draws, mask_id=7, vocab_size=49408)
    assert masked.tolist() == [[SOT_ID, 7, SOT_ID // 2, 12, EOT_ID, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 10, 11, 12, IGNORE_INDEX, IGNORE_INDEX]]
    masked, labels = mlm_inputs(ids, mask, draws, mask_id=7, vocab_size=49408, quirks=True)
    assert masked.tolist() == [[SOT_ID, 7, 49408 // 2, 12, EOT_ID, 7]]  # padding is masked and scored
    assert labels.tolist() == [[IGNORE_INDEX, 10, 11, 12, IGNORE_INDEX, 0]]
    unselected = draws.clone()
    unselected[:, 0] = 0.5
    masked, labels = mlm_inputs(ids, mask, unselected, mask_id=7, vocab_size=49408)
    assert torch.equal(masked, ids) and (labels == IGNORE_INDEX).all()


def test_mlm_loss_is_the_mean_over_scored_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    labels = torch.tensor([[4, IGNORE_INDEX, 2], [IGNORE_INDEX, IGNORE_INDEX, 9]])
    want = -sum(float(F.log_softmax(logits[b, i], -1)[labels[b, i]]) for b, i in [(0, 0), (0, 2), (1, 2)]) / 3
    assert float(hmmc_mlm_loss(logits, labels)) == pytest.approx(want, rel=1e-5)


def test_frame_topk_similarity_by_hand():
    text = torch.tensor([[1.0, 0.0]])
    # video 0 frame cosines 1, 0, -1 (and a 2x longer frame: normalised); video 1 has one real frame (cos 0.6)
    frames = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], [[0.6, 0.8], [1.0, 0.0], [1.0, 0.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    got = frame_topk_similarity(text, frames, mask, k=2)
    torch.testing.assert_close(got, torch.tensor([[(1.0 + 0.0) / 2, 0.6]]))
    torch.testing.assert_close(frame_topk_similarity(text, frames, mask, k=5), torch.tensor([[0.0, 0.6]]))
    torch.testing.assert_close(frame_topk_similarity(text, frames, mask, k=1, chunk=1), torch.tensor([[1.0, 0.6]]))


def test_dual_similarity_adds_the_weighted_frame_term():
    torch.manual_seed(0)
    model = build_membridge(ModelConfig(clip=CLIPConfig.from_json(TINY), max_frames=3))
    frames, mask = torch.randn(4, 3, 64), torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    text = torch.randn(5, 64)
    enc = EncodedEvalSet(frames, mask, torch.zeros(5, 2, 64), text, torch.zeros(5, 2), torch.ones(5, 2), torch.ones(4))
    base = dual_similarity(model, enc)
    scale = float(model.encoder.logit_scale.detach().exp())
    video = F.normalize((F.normalize(frames, dim=-1) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(base, scale * F.normalize(text, dim=-1) @ video.t(), rtol=1e-5, atol=1e-5)
    cos = torch.einsum("td,vfd->tvf", F.normalize(text, dim=-1), F.normalize(frames, dim=-1))
    top2 = torch.stack(
        [torch.stack([cos[t, v, : int(mask[v].sum())].sort(descending=True).values[:2].mean() for v in range(4)])
         for t in range(5)]
    )  # fmt: skip
    torch.testing.assert_close(dual_similarity(model, enc, 2, 0.5), base + 0.5 * scale * top2, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------- task


def _flags(**overrides) -> argparse.Namespace:
    from engine.flags import build_parser

    args = build_parser("clip").parse_args(["--do_train", "--output_dir", "x", "--stage1_objective", "hmmc"])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def _task(seed: int = 0, queue: int = 8, mlm: float = 0.05, frames: int = 3):
    torch.manual_seed(seed)
    model = build_membridge(ModelConfig(clip=CLIPConfig.from_json(TINY), max_frames=frames, sim_header="seqTransf"))
    weights = HMMCWeights(fam=0.2, vtm=0.3, ftm=0.4, mlm=mlm)
    return model, HMMCTask(model, HMMCSettings(weights, momentum=0.9, queue_size=queue, proj_hidden=16))


def _batch(b: int = 4, frames: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(b, 8, dtype=torch.long)
    for row in range(b):
        n = 5 + row % 3
        ids[row, :n] = torch.tensor([SOT_ID, *torch.randint(1, 1000, (n - 2,), generator=g).tolist(), EOT_ID])
    return {
        "video": torch.randn(b, frames, 3, 32, 32, generator=g),
        "video_mask": torch.ones(b, frames, dtype=torch.long),
        "text_ids": ids,
        "text_mask": (ids != 0).long(),
        "hmmc_mlm_draws": torch.rand(b, 3, 8, generator=g),
    }


def test_task_step_order_losses_and_queues():
    model, task = _task()
    batch = _batch()
    queues = model.stage1_aux.hmmc_queues
    before = {name: q.queue.clone() for name, q in queues.items()}
    out = task(batch)
    w = task.settings.weights
    want = w.fam * out["fam"] + w.vtm * out["vtm"] + w.ftm * out["ftm"] + w.mlm * out["mlm"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6) and out["mlm"].item() > 0
    enc, heads = model.encoder, model.stage1_aux.hmmc_heads
    with torch.no_grad():
        frames = enc.encode_video(batch["video"], batch["video_mask"])
        video = enc.video_embedding(frames, batch["video_mask"])
        title = enc.text_features(batch["text_ids"])
        proj = heads["v_projector"](frames.flatten(0, 1)).reshape(frames.shape)
    # step 1: the momentum copies equal the online modules, so the keys are the queries; losses on the old queues
    f = HMMCFeatures(video, title, frames, torch.zeros_like(frames), video, title, frames, proj, batch["video_mask"])
    ref = hmmc_contrastive_losses(f, {n: q for n, q in before.items() if n != "tag"}, w.temperature)
    assert out["vtm"].item() == pytest.approx(float(ref["vtm"]), rel=1e-5)
    assert out["ftm"].item() == pytest.approx(float(ref["ftm"]), rel=1e-5)
    # then the keys were enqueued: rows 0..3 (frame queues 0..11), the pointer at 4
    assert all(int(q.ptr) == 4 for q in queues.values())
    torch.testing.assert_close(queues["video"].queue[:4], F.normalize(video, dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(queues["title"].queue[:4], F.normalize(title, dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(queues["tag"].queue[:4], F.normalize(title, dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(queues["frame_cross"].queue[:12], F.normalize(frames.flatten(0, 1), dim=-1),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(queues["frame_proj"].queue[12:], before["frame_proj"][12:])
    # gradients reach the online encoder and heads, never the momentum copies
    out["loss"].backward()
    momentum = [p for n, p in task.named_parameters() if ".hmmc_momentum." in n]
    assert momentum and all(p.grad is None and not p.requires_grad for p in momentum)
    assert all(p.grad is not None for n, p in heads.named_parameters())
    assert enc.clip.visual.proj.grad is not None and enc.transformerClip.resblocks[0].mlp.c_fc.weight.grad is not None


def test_momentum_follows_online_weights_across_steps():
    model, task = _task(mlm=0.0)
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.1)
    online = model.encoder.clip.visual.proj
    copy = model.stage1_aux.hmmc_momentum["encoder"].module.clip.visual.proj
    expected = copy.detach().clone()
    for step in range(3):
        task(_batch(seed=step))["loss"].backward()
        # the update at the start of this step used the weights before it
        expected = 0.9 * expected + 0.1 * online.detach()
        torch.testing.assert_close(copy, expected)
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.allclose(copy, online)


def test_training_only_parts_saved_apart_and_dropped_downstream(tmp_path, caplog):
    model, _ = _task()
    state = model.state_dict()
    for prefix in ("hmmc_heads.v_predictor", "hmmc_heads.mlm_head", "hmmc_momentum.encoder.module.clip",
                   "hmmc_momentum.v_projector", "hmmc_queues.frame_proj.queue", "hmmc_queues.video.ptr"):  # fmt: skip
        assert any(k.startswith(f"stage1_aux.{prefix}") for k in state), prefix
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    torch.manual_seed(5)
    plain = build_membridge(ModelConfig(clip=CLIPConfig.from_json(TINY), max_frames=3, sim_header="seqTransf"))
    with caplog.at_level(logging.INFO):
        report = load_weights(path, plain, strict=True)
    assert report.unexpected == [] and report.missing == []
    assert "(stage1_aux.hmmc_heads/hmmc_momentum/hmmc_queues) not loaded" in caplog.text
    chained, _ = _task(seed=3)
    assert load_aux_from_init(argparse.Namespace(init_model=str(path)), chained) > 0
    for name, tensor in chained.stage1_aux.state_dict().items():
        assert torch.equal(tensor, state[f"stage1_aux.{name}"]), name


def test_registry_and_flag_rules():
    args = _flags()
    assert "hmmc" in STAGE1_OBJECTIVES
    assert (args.contrast_num_negative, args.contrast_momentum, args.contrast_temperature) == (4096, 0.99, 0.07)
    assert (args.w_fam, args.w_vtm, args.w_ftm, args.w_mlm) == (0.05, 0.45, 0.45, 0.05)
    args = _flags(use_temp=True)
    check_hmmc(args)
    assert args.sim_header == "seqTransf"
    with pytest.raises(ConfigError, match="contradicts --sim_header seqLSTM"):
        check_hmmc(_flags(use_temp=True, sim_header="seqLSTM"))
    with pytest.raises(ConfigError, match="dual-encoder"):
        check_hmmc(_flags(sim_header="tightTransf"))
    with pytest.raises(ConfigError, match="all 0"):
        check_hmmc(_flags(w_fam=0.0, w_vtm=0.0, w_ftm=0.0, w_mlm=0.0))
    with pytest.raises(ConfigError, match="smaller than the global batch"):
        check_hmmc(_flags(contrast_num_negative=16, batch_size=32))


# ----------------------------------------------------------------------------------------------- end to end


def _hmmc_flags(data: Path, *extra: str) -> tuple[str, ...]:
    return ("--stage1_objective", "hmmc", "--use_temp", "--contrast_num_negative", "8", "--hmmc_proj_dims", "32",
            "--num_thread_reader", "0", "--torch_threads", "1", *extra)  # fmt: skip


@pytest.mark.slow
def test_hmmc_two_gloo_ranks_equal_one_process(synthetic_small, tmp_path):
    """Losses over the global batch, BatchNorm statistics over the global batch, keys gathered in rank order: 2 ranks
    x 2 samples train exactly as 1 process x 4 samples, momentum copies and queues included."""
    from tests.test_stage1 import latest_weights, losses, run_script, stage1_flags

    flags = ("--max_steps", "3", "--epochs", "1", *_hmmc_flags(synthetic_small))
    run_script(stage1_flags(synthetic_small, tmp_path / "one", *flags), nproc=1)
    run_script(stage1_flags(synthetic_small, tmp_path / "two", *flags), nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-5, abs=1e-6)
    w1, w2 = latest_weights(tmp_path / "one"), latest_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    assert int(w1["stage1_aux.hmmc_queues.video.ptr"]) == 12 % 8  # 3 steps x global batch 4, wrapped
    probe = torch.randn(w1["stage1_aux.hmmc_queues.video.queue"].shape[1], generator=torch.Generator().manual_seed(0))
    for name in w1:
        a, b = w1[name].float(), w2[name].float()
        if ".hmmc_queues." in name and name.endswith(".queue"):
            # DistributedSampler deals the global batch round-robin: 2 ranks enqueue the same keys in another order
            # within each written block. The losses only see the queue as a set of negatives: compare the row sets.
            a, b = a[(a @ probe).argsort()], b[(b @ probe).argsort()]
        if name.endswith(("v_projector.0.bias", "v_predictor.0.bias")):
            # A bias feeding a BatchNorm has an exactly zero gradient: Adam normalises the rounding noise into updates
            # of up to lr per step, different in 1 and 2 processes (as the MCQ key bias). Checked to 3 x lr.
            torch.testing.assert_close(a, b, rtol=0, atol=3e-3, msg=name)
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    moved = w1["stage1_aux.hmmc_momentum.encoder.module.clip.visual.proj"]
    assert not torch.equal(moved, w1["encoder.clip.visual.proj"])  # the copy lags the online weights


@pytest.mark.slow
def test_hmmc_resume_after_sigkill_continues_exactly(synthetic_small, tmp_path):
    """Queues, their pointers, the momentum copies, BatchNorm statistics and MLM draws resume exactly."""
    from tests.test_stage1 import kill_after_first_checkpoint, latest_weights, losses, run_script, stage1_flags

    flags = ("--epochs", "2", "--save_steps", "2", *_hmmc_flags(synthetic_small))
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
    assert w_full.keys() == w_resumed.keys() and "stage1_aux.hmmc_queues.frame_cross.queue" in w_full
    for name in w_full:
        torch.testing.assert_close(w_resumed[name], w_full[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_hmmc_stage1_learns_on_small_synthetic_set(synthetic_small, tmp_path):
    from tests.test_mcq import _common, _run

    data = synthetic_small
    out = tmp_path / "hmmc"
    _run([
        "--do_train", *_common(data), "--output_dir", str(out), *_hmmc_flags(data)[:-4],
        "--train_csv", str(data / "webvid" / "frozen_train_labels.json"),
        "--webvid_tfrecord", str(data / "webvid" / "tfrecord"), "--use_frame_fea", "--top_frames", "2",
        "--batch_size", "8", "--epochs", "30", "--lr", "2e-3", "--coef_lr", "1", "--warmup_proportion", "0.05",
        "--n_display", "6", "--contrast_momentum", "0.9", "--contrast_num_negative", "16",
    ])  # fmt: skip
    chance = json.loads((data / "manifest.json").read_text())["chance"]["retrieval_R1"]
    result = json.loads((out / "eval_results.json").read_text())
    assert result["t2v_R1"] >= 4 * chance and result["v2t_R1"] >= 4 * chance, result  # seeded: 50 / 41.7 vs 8.3
    rows = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    vtm = [row["train/vtm"] for row in rows if "train/vtm" in row]
    assert vtm[-1] < 0.7 * vtm[0], vtm


def test_published_recipe_launch_script(tmp_path):
    from engine.flags import build_parser
    from tests.test_launch_scripts import DEFAULT_NODE_FLAGS, launch, split_entry

    entry, flags = split_entry(launch(tmp_path, "start_clip_hmmc.sh")[len(DEFAULT_NODE_FLAGS) :])
    args = build_parser("clip").parse_args(flags)
    assert entry == "main_task_clip.py" and args.stage1_objective == "hmmc"
    assert (args.contrast_num_negative, args.contrast_momentum) == (1024, 0.99)
    assert (args.max_frames, args.batch_size) == (12, 128)
    assert args.use_temp and args.use_frame_fea and args.top_frames == 3 and (args.lr, args.coef_lr) == (1e-4, 1e-3)
    assert (args.epochs, args.warmup_proportion, args.weight_decay) == (11, 0.2, 0.05)
    assert (args.temporal_init, args.temporal_ln_eps, args.freeze_logit_scale) == ("random", 1e-12, True)
    check_hmmc(args)  # 1024 queued keys hold 8 global batches of 128
    assert args.sim_header == "seqTransf"


def _as_hmmc_checkpoint(model) -> dict[str, torch.Tensor]:
    """Our seqTransf model's encoder renamed to HMMC's layout (fp16 CLIP parts, no logit scale) plus training-only
    parts of HMMC's pre-training model."""
    renames = (("encoder.clip.visual.", "visual_encoder.visual."), ("encoder.transformerClip.",
               "visual_encoder.temporal_transformer."), ("encoder.frame_position_embeddings.",
               "visual_encoder.frame_position_embeddings."), ("encoder.clip.", "text_encoder."))  # fmt: skip
    state = {}
    for key, value in model.state_dict().items():
        if key == "encoder.clip.logit_scale" or key.startswith("stage1_aux."):
            continue
        ours, theirs = next((o, t) for o, t in renames if key.startswith(o))
        state[theirs + key[len(ours) :]] = value.half() if key.startswith("encoder.clip.") else value.clone()
    state["visual_encoder_k.visual.proj"] = torch.zeros(2)
    state["queue_v_cross_ng"] = torch.zeros(4, 8)
    state["cls.predictions.bias"] = torch.zeros(3)
    state["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return state


def test_hmmc_checkpoint_layout_loads_with_a_strict_report(tmp_path, caplog):
    from engine.builders import load_init_model
    from modules.published_keys import HMMC_LOGIT_SCALE, convert_hmmc_state_dict, is_hmmc_layout

    model, _ = _task(seed=4)
    state = _as_hmmc_checkpoint(model)
    assert is_hmmc_layout(state)
    conversion = convert_hmmc_state_dict(state, strict=True)
    assert conversion.unknown == [] and len(conversion.training_only) == 4
    assert all(t.dtype != torch.float16 for t in conversion.state_dict.values())
    path = tmp_path / "pytorch_model.bin.2"
    torch.save(state, path)
    torch.manual_seed(9)
    target = build_membridge(ModelConfig(clip=CLIPConfig.from_json(TINY), max_frames=3, sim_header="seqTransf"))
    with caplog.at_level(logging.INFO):
        report = load_init_model(argparse.Namespace(init_model=str(path)), target)
    assert report.missing == [] and report.unexpected == []
    assert "4 training-only tensors of HMMC's pre-training model left out, 0 unknown" in caplog.text
    assert float(target.encoder.clip.logit_scale) == pytest.approx(HMMC_LOGIT_SCALE)
    for name, tensor in target.state_dict().items():
        if name != "encoder.clip.logit_scale":
            want = model.state_dict()[name]
            want = want.half().float() if name.startswith("encoder.clip.") else want
            torch.testing.assert_close(tensor, want, rtol=0, atol=0, msg=name)
    state["mystery.weight"] = torch.zeros(1)
    with pytest.raises(DataError, match=r"neither HMMC's encoder nor its training-only parts: \['mystery.weight'\]"):
        convert_hmmc_state_dict(state, strict=True)
    assert convert_hmmc_state_dict(state).unknown == ["mystery.weight"]


# ----------------------------------------------------------------------------------------------- fine-tuning


def test_frame_contrastive_loss_against_a_plain_reference():
    from modules.losses import contrastive_loss
    from video_text_retrieval.task import frame_contrastive_loss

    torch.manual_seed(0)
    text, frames = 10 * torch.randn(4, 6), F.normalize(torch.randn(4, 3, 6), dim=-1)
    full = torch.ones(4, 3, dtype=torch.long)
    want = sum(contrastive_loss(text @ frames[:, i].t()) for i in range(3)) / 3
    assert float(frame_contrastive_loss(text, frames, full)) == pytest.approx(float(want), rel=1e-5)
    # video 3's last two frames and video 2's last frame are padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    terms = []
    for i in range(3):
        ok = [v for v in range(4) if mask[v, i]]
        s = text @ frames[:, i].t()
        t2v = [-(s[t, t] - torch.logsumexp(s[t, ok], 0)) for t in ok]
        v2t = [-(s[v, v] - torch.logsumexp(s[:, v], 0)) for v in ok]
        terms.append((sum(t2v) / len(ok) + sum(v2t) / len(ok)) / 2)
    got = frame_contrastive_loss(text, frames, mask)
    assert float(got) == pytest.approx(float(sum(terms) / 3), rel=1e-5)


def test_contrastive_task_with_hmmc_fine_tuning_weights():
    from modules.losses import contrastive_loss
    from video_text_retrieval.task import ContrastiveTask, frame_contrastive_loss

    model, _ = _task(mlm=0.0)
    batch = _batch()
    plain = ContrastiveTask(model)(batch)
    out = ContrastiveTask(model, frame_weight=0.15, video_weight=0.85)(batch)
    enc = model.encoder
    with torch.no_grad():
        frames = enc.encode_video(batch["video"], batch["video_mask"])
        text = F.normalize(enc.text_features(batch["text_ids"]), dim=-1)
        video = enc.video_embedding(frames, batch["video_mask"])
        scale = enc.logit_scale.exp()
        frame = frame_contrastive_loss(scale * text, F.normalize(frames, dim=-1), batch["video_mask"])
    assert float(out["contrastive"]) == pytest.approx(float(contrastive_loss(scale * text @ video.t())), rel=1e-5)
    assert float(out["frame_contrastive"]) == pytest.approx(float(frame), rel=1e-5)
    assert float(out["loss"]) == pytest.approx(float(0.85 * out["contrastive"] + 0.15 * frame), rel=1e-5)
    assert float(plain["loss"]) == pytest.approx(float(out["contrastive"]), rel=1e-6)
    assert "frame_contrastive" not in plain


@pytest.mark.slow
def test_hmmc_checkpoint_fine_tunes_with_hmmc_losses_and_frame_term(synthetic_small, tmp_path, caplog):
    """Stage 1 with HMMC, then retrieval fine-tuning with HMMC's 0.85 / 0.15 video / frame losses and evaluation
    with the top-k frame term: the training-only parts are skipped on load, the frame loss is trained and logged."""
    import main_task_clip
    from tests.test_retrieval import MODEL_FLAGS, latest_checkpoint, msrvtt_flags
    from video_text_retrieval import main_task_retrieval as retrieval

    data = synthetic_small
    model_flags = [*MODEL_FLAGS, "--sim_header", "seqTransf", "--torch_threads", "1"]
    main_task_clip.main([
        "--do_train", *model_flags, "--output_dir", str(tmp_path / "s1"), *_hmmc_flags(data)[:-4],
        "--train_csv", str(data / "webvid" / "frozen_train_labels.json"),
        "--webvid_tfrecord", str(data / "webvid" / "tfrecord"),
        "--batch_size", "4", "--epochs", "1", "--max_steps", "2", "--lr", "1e-3", "--coef_lr", "1",
    ])  # fmt: skip
    out = tmp_path / "ft"
    flags = [*model_flags, *msrvtt_flags(data), "--init_model", str(latest_checkpoint(tmp_path / "s1")),
             "--rerank_topk", "0", "--batch_size_val", "8", "--use_frame_fea", "--top_frames", "2"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        metrics = retrieval.main([
            *flags, "--do_train", "--output_dir", str(out), "--batch_size", "4", "--epochs", "1", "--max_steps", "2",
            "--lr", "1e-3", "--coef_lr", "1", "--video_loss_weight", "0.85", "--frame_loss_weight", "0.15",
        ])  # fmt: skip
    assert "(stage1_aux.hmmc_heads/hmmc_momentum/hmmc_queues) not loaded" in caplog.text
    rows = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "train/frame_contrastive" in row]
    assert logged and all(
        row["train/loss"] == pytest.approx(0.85 * row["train/contrastive"] + 0.15 * row["train/frame_contrastive"])
        for row in logged
    )
    assert 0 <= metrics["t2v_R1"] <= 100 and metrics["num_videos"] > 0


# ----------------------------------------------------------------------------------------------- HMMC's model details


def test_temporal_init_random_and_ln_eps_travel_with_the_model(tmp_path):
    from engine.builders import build_model
    from engine.flags import build_parser
    from modules.model_config import ModelConfig as Config

    base = ["--do_train", "--output_dir", "x", "--clip_config", str(TINY), "--sim_header", "seqTransf",
            "--max_frames", "4"]  # fmt: skip
    torch.manual_seed(0)
    text_init = build_model(build_parser("clip").parse_args(base), with_fusion=False)
    args = build_parser("clip").parse_args([*base, "--temporal_init", "random", "--temporal_ln_eps", "1e-12"])
    torch.manual_seed(0)
    hmmc = build_model(args, with_fusion=False)
    enc, ref = hmmc.encoder, text_init.encoder
    positions = enc.frame_position_embeddings.weight
    assert 0.9 < float(positions.std()) < 1.1 and abs(float(positions.mean())) < 0.05  # N(0, 1), not CLIP's table
    assert torch.equal(ref.frame_position_embeddings.weight, ref.clip.positional_embedding)
    block = enc.transformerClip.resblocks[0]
    bound = math.sqrt(6 / (block.attn.in_proj_weight.shape[0] + block.attn.in_proj_weight.shape[1]))  # xavier
    assert float(block.attn.in_proj_weight.abs().max()) <= bound and float(block.attn.in_proj_bias.abs().max()) == 0
    assert not torch.equal(block.mlp.c_fc.weight, ref.transformerClip.resblocks[0].mlp.c_fc.weight)
    assert torch.equal(enc.clip.visual.proj, ref.clip.visual.proj)  # CLIP itself untouched
    norms = [m for m in enc.transformerClip.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-12 for m in norms)
    assert all(m.eps == 1e-5 for m in enc.clip.modules() if isinstance(m, nn.LayerNorm))
    restored = Config.from_dict(json.loads(hmmc.model_config.to_json()))
    assert restored.temporal_ln_eps == 1e-12
    assert Config.from_dict({"max_frames": 4}).temporal_ln_eps == 1e-5  # configs written before the field


def test_freeze_logit_scale_and_hmmc_mask_id_defaults():
    from engine.run import prepare_model
    from video_text_retrieval.stage1 import build_hmmc_task

    model, _ = _task(mlm=0.0)
    args = _flags(freeze_logit_scale=True, precision="fp32", freeze_layer_num=-1)
    prepare_model(args, model)
    assert not model.encoder.clip.logit_scale.requires_grad
    assert all(p.requires_grad for n, p in model.encoder.named_parameters() if n != "clip.logit_scale")
    for quirks, given, want in ((False, None, 0), (True, None, 49394), (True, 5, 5)):
        torch.manual_seed(0)
        fresh = build_membridge(ModelConfig(clip=CLIPConfig.from_json(TINY), max_frames=3))
        args = _flags(official_quirks=quirks, hmmc_mask_id=given, contrast_num_negative=8, hmmc_proj_dims=8)
        assert build_hmmc_task(args, fresh).settings.mask_id == want


# ----------------------------------------------------------------------------------------------- LMDB frame store


def test_lmdb_frame_indices_by_hand():
    from dataloaders.lmdb_frames import lmdb_frame_indices, lmdb_sample_positions

    assert lmdb_frame_indices(30, 12, "uniform").tolist() == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]
    assert lmdb_frame_indices(3, 5, "uniform").tolist() == [0, 1, 2]  # fewer stored than wanted: all of them
    rng = np.random.default_rng(0)
    picks = lmdb_frame_indices(30, 12, "random", rng)
    assert len(set(picks.tolist())) == 12 and picks.tolist() == sorted(picks.tolist())
    ours = np.stack([lmdb_frame_indices(30, 12, "uniform_random", np.random.default_rng(s)) for s in range(200)])
    hmmc = np.stack([lmdb_frame_indices(30, 12, "uniform_random", np.random.default_rng(s), quirks=True)
                     for s in range(200)])  # fmt: skip
    assert ours.max() == 29 and hmmc.max() == 23  # HMMC's k = N // T never reaches frames 24..29
    bounds = np.floor(np.arange(13) * 30 / 12).astype(int)
    assert ((ours >= bounds[:-1]) & (ours < bounds[1:])).all()
    assert ((hmmc >= 2 * np.arange(12)) & (hmmc < 2 * np.arange(1, 13))).all()
    assert lmdb_sample_positions(100, 5).tolist() == [0, 24, 49, 74, 99]
    assert lmdb_sample_positions(100, 5, quirks=True).tolist() == [0, 22, 45, 67, 90]


def test_lmdb_store_written_from_videos_reads_back(synthetic_small, tmp_path, caplog):
    from dataloaders.errors import DataError as Bad
    from dataloaders.lmdb_frames import LmdbVideoSource, lmdb_sample_positions, main, write_lmdb
    from dataloaders.video_io import decode_frames, probe_video

    videos = synthetic_small / "videos"
    ids = sorted(p.stem for p in videos.glob("*.mp4"))[:3]
    listing = tmp_path / "list.json"
    listing.write_text("".join(json.dumps({"video_id": v}) + "\n" for v in [*ids, "missing_video"]))
    source_text = listing.read_text()
    with caplog.at_level(logging.WARNING):
        main(["--video_dir", str(videos), "--video_list", str(listing), "--output", str(tmp_path / "db"),
              "--frames", "6", "--map_size_gb", "0.1"])  # fmt: skip
    assert "skipped missing_video" in caplog.text and listing.read_text() == source_text  # input never rewritten
    assert json.loads((tmp_path / "db" / "metadata.json").read_text()) == {"length": 3}
    with pytest.raises(ConfigError, match="not empty"):
        write_lmdb(videos, ids, tmp_path / "db")
    source = LmdbVideoSource(tmp_path / "db", max_frames=4, frames_per_video=6)
    frames, mask = source.load(ids[1])
    stored = decode_frames(videos / f"{ids[1]}.mp4", lmdb_sample_positions(probe_video(videos / f"{ids[1]}.mp4")
                                                                           .num_frames, 6))  # fmt: skip
    want = stored[[0, 1, 3, 4]]  # uniform: linspace(0, 6, 4, endpoint=False) = 0, 1, 3, 4
    assert frames.shape == want.shape and mask.tolist() == [1, 1, 1, 1]
    error = np.abs(frames.astype(float) - want.astype(float)).mean(axis=(1, 2, 3))
    other = np.abs(frames.astype(float) - stored[[1, 2, 4, 5]].astype(float)).mean(axis=(1, 2, 3))
    assert (error < 6.0).all() and (other > 2 * error).all(), (error, other)  # JPEG q95 of a noisy 32 px frame
    long, long_mask = LmdbVideoSource(tmp_path / "db", max_frames=8, frames_per_video=6).load(ids[0])
    assert long_mask.tolist() == [1] * 6 + [0] * 2 and not long[6:].any()
    with pytest.raises(Bad, match="no frame missing_video_0"):
        source.load("missing_video")
    with pytest.raises(Bad, match="--lmdb_frames 9"):
        LmdbVideoSource(tmp_path / "db", max_frames=9, frames_per_video=9).load(ids[0])


@pytest.mark.slow
def test_retrieval_evaluation_reads_an_lmdb_store(synthetic_small, tmp_path):
    """``--lmdb_path`` replaces the --features_path videos: the same evaluation runs on the stored frames."""
    from dataloaders.lmdb_frames import write_lmdb
    from tests.test_mcq import _common, _run

    data = synthetic_small
    test_ids = sorted({line.split(",")[2] for line in (data / "msrvtt" / "MSRVTT_JSFUSION_test.csv").read_text()
                       .splitlines()[1:]})  # fmt: skip
    written, skipped = write_lmdb(data / "videos", test_ids, tmp_path / "db", frames_per_video=8, map_size_gb=0.1)
    assert written == len(test_ids) and skipped == []
    flags = [*_common(data), "--seed", "0"]
    _run(["--do_eval", *flags, "--output_dir", str(tmp_path / "files")])
    _run(["--do_eval", *flags, "--output_dir", str(tmp_path / "lmdb"), "--lmdb_path", str(tmp_path / "db"),
          "--lmdb_frames", "8"])  # fmt: skip
    files = json.loads((tmp_path / "files" / "eval_results.json").read_text())
    lmdb = json.loads((tmp_path / "lmdb" / "eval_results.json").read_text())
    assert files["num_videos"] == lmdb["num_videos"] == len(test_ids)
    assert "t2v_R1" in lmdb and 0 <= lmdb["t2v_R1"] <= 100


def test_hmmc_task_runs_on_fp16_weights():
    from engine.builders import convert_weights_fp16

    torch.manual_seed(0)
    model = build_membridge(ModelConfig(clip=CLIPConfig.from_json(TINY), max_frames=3, sim_header="seqTransf"))
    convert_weights_fp16(model)
    task = HMMCTask(model, HMMCSettings(HMMCWeights(), momentum=0.9, queue_size=8, proj_hidden=16))
    out = task(_batch())
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values()) and float(out["mlm"]) > 0
    assert model.stage1_aux.hmmc_momentum["encoder"].module.clip.visual.proj.dtype == torch.float16
    assert model.stage1_aux.hmmc_queues["video"].queue.dtype == torch.float32


# ----------------------------------------------------------------------------------------------- Chinese text


CHARS = "你好世界红圆方动左右上下"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised tiny BertModel saved as a local Hugging Face folder with a generated character vocab
    (special tokens first, then Chinese characters and lower-case letters with their ``##`` continuations)."""
    import string

    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    letters = list(string.ascii_lowercase)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARS, *letters, *(f"##{c}" for c in letters)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(config).save_pretrained(str(folder))
    return folder


def test_bert_tokenizer_encodes_cls_pieces_sep(tiny_bert, tmp_path):
    from dataloaders.bert_tokenizer import BertTextTokenizer

    tok = BertTextTokenizer(tiny_bert)
    assert (tok.sot_id, tok.eot_id, tok.pad_id, tok.mask_id, tok.vocab_size) == (2, 3, 0, 4, 5 + len(CHARS) + 52)
    ids, mask = tok.encode("你好 red", 8)
    chars = {c: 5 + i for i, c in enumerate(CHARS)}
    r, e, d = 5 + len(CHARS) + 17, 5 + len(CHARS) + 26 + 4, 5 + len(CHARS) + 26 + 3  # r, ##e, ##d
    assert ids.tolist() == [2, chars["你"], chars["好"], r, e, d, 3, 0] and mask.tolist() == [1] * 7 + [0]
    ids, mask = tok.encode("你好世界红", 4)
    assert ids.tolist() == [2, chars["你"], chars["好"], 3] and mask.tolist() == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="no vocab.txt"):
        BertTextTokenizer(tmp_path)


def test_hf_text_encoder_features_and_missing_folder(tiny_bert, tmp_path):
    from transformers import BertModel

    from modules.hf_text import load_hf_text_encoder

    encoder = load_hf_text_encoder(tiny_bert, embed_dim=16)
    ids = torch.tensor([[2, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0]])
    features, states = encoder(ids)
    reference = BertModel.from_pretrained(str(tiny_bert))
    with torch.no_grad():
        out = reference(input_ids=ids, attention_mask=(ids != 0).long())
    torch.testing.assert_close(features, encoder.text_proj(out.pooler_output))
    torch.testing.assert_close(states, encoder.text_proj(out.last_hidden_state))
    with pytest.raises(ConfigError, match="no config.json there"):
        load_hf_text_encoder(tmp_path / "absent", embed_dim=16)
    with pytest.raises(ConfigError, match="needs --text_pretrain_path"):
        from video_text_retrieval.stage1 import check_stage1_flags

        check_stage1_flags(_flags(language="chinese"))


@pytest.mark.slow
def test_hmmc_stage1_with_a_chinese_text_encoder(synthetic_small, tiny_bert, tmp_path):
    """``--language chinese``: the captions go through the BERT's WordPiece vocabulary and the HF encoder (trained,
    saved as ``encoder.text_hf.*``, momentum-copied), MLM predicts its vocabulary, and the evaluation runs on it."""
    from tests.test_stage1 import latest_weights, losses, run_script, stage1_flags

    out = tmp_path / "zh"
    flags = ("--max_steps", "3", "--epochs", "1", *_hmmc_flags(synthetic_small), "--language", "chinese",
             "--text_pretrain_path", str(tiny_bert), "--w_mlm", "0.5",
             "--val_csv", str(synthetic_small / "msrvtt" / "MSRVTT_JSFUSION_test.csv"),
             "--features_path", str(synthetic_small / "videos"), "--batch_size_val", "16")  # fmt: skip
    run_script(stage1_flags(synthetic_small, out, *flags))
    assert sorted(losses(out)) == [1, 2, 3]
    rows = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    assert all(row["train/mlm"] > 0 for row in rows if "train/mlm" in row)
    weights = latest_weights(out)
    bert = "encoder.text_hf.backbone.embeddings.word_embeddings.weight"
    assert weights[bert].shape[0] == 5 + len(CHARS) + 52
    assert weights["stage1_aux.hmmc_heads.mlm_head.bias"].shape == (5 + len(CHARS) + 52,)
    assert "stage1_aux.hmmc_momentum.encoder.module.text_hf.backbone.embeddings.word_embeddings.weight" in weights
    initial = _saved_word_embeddings(tiny_bert)
    assert not torch.equal(weights[bert], initial)  # the text encoder trained
    result = json.loads((out / "eval_results.json").read_text())
    assert result["num_texts"] > 0 and 0 <= result["t2v_R1"] <= 100


def _saved_word_embeddings(folder: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))["embeddings.word_embeddings.weight"]


# ----------------------------------------------------------------------------------------------- VATEX


def test_vatex_english_and_chinese_captions(tmp_path):
    from dataloaders.datasets import DATASETS, DataPaths
    from dataloaders.tokenizer import ClipTokenizer
    from tests.test_datasets import FakeSource, fake_transform

    data = tmp_path / "vatex"
    data.mkdir()
    (data / "vatex_data.json").write_text(json.dumps({
        "v1": {"enCap": ["a man runs", "someone jogs"], "chCap": ["一个人在跑", "有人慢跑"]},
        "v2": {"enCap": ["a dog barks"], "chCap": ["狗在叫"]},
        "v3": {"enCap": ["unused"], "chCap": ["没用"]},
    }, ensure_ascii=False), encoding="utf-8")  # fmt: skip
    (data / "train_list.txt").write_text("v2\nv1\n")
    (data / "test_list.txt").write_text("v1\nv2\n")
    paths = DataPaths(data_path=str(data), features_path=str(tmp_path / "videos"))
    tok = ClipTokenizer()
    test = DATASETS["vatex"]("test", paths, FakeSource(), fake_transform, tok, 12)
    assert test.texts == ["a man runs", "someone jogs", "a dog barks"] and test.text_to_video == [0, 0, 1]
    train = DATASETS["vatex"]("train", paths, FakeSource(), fake_transform, tok, 12)
    assert [(p.video_id, p.captions) for p in train.pairs] == [
        ("v2", ("a dog barks",)), ("v1", ("a man runs",)), ("v1", ("someone jogs",))
    ]  # fmt: skip
    zh = DATASETS["vatex_zh"]("test", paths, FakeSource(), fake_transform, tok, 12)
    assert zh.texts == ["一个人在跑", "有人慢跑", "狗在叫"]
    (data / "vatex_data.json").write_text(json.dumps({"v1": {"enCap": []}, "v2": {"enCap": ["x"]}}))
    with pytest.raises(DataError, match=r"vatex_data\.json: video 'v1': expected a non-empty list of enCap"):
        DATASETS["vatex"]("test", paths, FakeSource(), fake_transform, tok, 12)
    with pytest.raises(DataError, match="missing key 'chCap'"):
        DATASETS["vatex_zh"]("test", paths, FakeSource(), fake_transform, tok, 12)


@pytest.mark.slow
def test_chinese_hmmc_checkpoint_evaluates_through_retrieval(synthetic_small, tiny_bert, tmp_path, caplog):
    """A released-layout HMMC checkpoint with the Chinese text encoder (``text_encoder.chinese_encoder.*`` +
    ``text_encoder.text_proj``) loads with ``--init_model`` into a ``--language chinese`` retrieval model and gives
    the same evaluation as the same weights in our layout (the CLIP text tower, unused in Chinese, is not in it)."""
    from engine.builders import build_model
    from tests.test_retrieval import MODEL_FLAGS, msrvtt_flags
    from video_text_retrieval import main_task_retrieval as retrieval
    from video_text_retrieval.settings import build_retrieval_parser

    flags = [*MODEL_FLAGS, *msrvtt_flags(synthetic_small), "--language", "chinese", "--text_pretrain_path",
             str(tiny_bert), "--rerank_topk", "0", "--batch_size_val", "16", "--torch_threads", "1",
             "--do_eval"]  # fmt: skip
    parse = build_retrieval_parser().parse_args
    torch.manual_seed(5)
    model = build_model(parse([*flags, "--output_dir", str(tmp_path / "x")]), False)
    with torch.no_grad():  # weights unlike the BERT folder's and the run's own initialisation
        for p in model.encoder.text_hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    renames = (("encoder.clip.visual.", "visual_encoder.visual."),
               ("encoder.text_hf.backbone.", "text_encoder.chinese_encoder."),
               ("encoder.text_hf.text_proj.", "text_encoder.text_proj."))  # fmt: skip
    state = {"queue_v_cross_ng": torch.zeros(4, 8)}  # a training-only HMMC tensor
    for key, value in model.state_dict().items():
        rule = next(((o, t) for o, t in renames if key.startswith(o)), None)
        if rule is not None:
            state[rule[1] + key[len(rule[0]) :]] = value.clone()
    assert any(k.startswith("text_encoder.chinese_encoder.") for k in state)
    torch.save(state, tmp_path / "hmmc_zh.bin")
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    ours["encoder.clip.logit_scale"] = torch.tensor(math.log(100.0))  # HMMC's constant scale, as the converter sets
    save_file(ours, str(tmp_path / "ours.safetensors"))

    loaded = build_model(parse([*flags, "--output_dir", str(tmp_path / "y"), "--init_model", str(tmp_path /
                                "hmmc_zh.bin")]), False)  # fmt: skip
    for key, value in model.state_dict().items():
        if key.startswith(("encoder.text_hf.", "encoder.clip.visual.")):
            assert torch.equal(loaded.state_dict()[key], value), key
    with caplog.at_level(logging.INFO):
        converted = retrieval.main([*flags, "--init_model", str(tmp_path / "hmmc_zh.bin"), "--output_dir",
                                    str(tmp_path / "zh")])  # fmt: skip
    assert "1 training-only tensors of HMMC's pre-training model left out, 0 unknown" in caplog.text
    reference = retrieval.main([*flags, "--init_model", str(tmp_path / "ours.safetensors"), "--output_dir",
                                str(tmp_path / "ref")])  # fmt: skip
    assert converted["num_texts"] > 0
    for key in ("t2v_R1", "t2v_R5", "t2v_MnR", "v2t_R1", "v2t_MnR"):
        assert converted[key] == pytest.approx(reference[key]), key
    with pytest.raises(ConfigError, match="--rerank_topk 0"):
        at = flags.index("--rerank_topk")  # without it: the default re-ranking, which needs CLIP's text tokens
        retrieval.main([*flags[:at], *flags[at + 2 :], "--output_dir", str(tmp_path / "bad")])
