"""Downstream retrieval end to end (video_text_retrieval/main_task_retrieval.py) on tiny configs: fine-tuning after
stage 1 + stage 2 raises R@1 and re-ranking keeps it, 2 gloo ranks evaluate exactly like 1 process, each benchmark
(MSR-VTT 1k-A, MSVD, LSMDC, DiDeMo) runs train + eval from files in its real format, model selection, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import main_task_clip
import main_task_fusion
from dataloaders.errors import ConfigError, DataError
from engine.selection import BEST_METRICS_FILE, BEST_MODEL_FILE, BestValidation
from tests.conftest import REPO
from video_text_retrieval import main_task_retrieval as retrieval
from video_text_retrieval import settings as retrieval_settings
from video_text_retrieval.settings import check_selection_metric

TINY = str(REPO / "CLIP-modules" / "tiny.json")
FUSION_TINY = str(REPO / "CLIP-modules" / "fusion-tiny.json")
MODULE = "video_text_retrieval.main_task_retrieval"
METRIC_KEYS = [f"{d}_{m}" for d in ("t2v", "v2t") for m in ("R1", "R5", "R10", "MdR", "MnR")]
RERANK_TOPK = "4"
MODEL_FLAGS = [
    "--clip_config", TINY, "--cross_config_path", FUSION_TINY, "--max_frames", "4", "--max_words", "12",
    "--loose_type", "--no-log_tensorboard", "--seed", "0", "--n_display", "1", "--num_thread_reader", "0",
]  # fmt: skip
PRETRAIN_STEPS = "10"
FINETUNE_STEPS = "20"  # one epoch of the 320 expanded MSR-VTT captions at batch 16


def latest_checkpoint(out: Path) -> Path:
    return out / "ckpt" / (out / "ckpt" / "latest").read_text().strip()


def msrvtt_flags(data: Path, features: Path | None = None, val_csv: Path | None = None) -> list[str]:
    return [
        "--datatype", "msrvtt", "--data_path", str(data / "msrvtt" / "MSRVTT_data.json"),
        "--train_csv", str(data / "msrvtt" / "MSRVTT_train.9k.csv"),
        "--val_csv", str(val_csv or data / "msrvtt" / "MSRVTT_JSFUSION_test.csv"),
        "--features_path", str(features or data / "videos"),
    ]  # fmt: skip


def train_flags(out: Path, steps: str = "2", batch: str = "4") -> list[str]:
    return [
        "--do_train", "--output_dir", str(out), "--batch_size", batch, "--batch_size_val", "5", "--epochs", "1",
        "--max_steps", steps, "--lr", "1e-3", "--coef_lr", "1", "--fusion_lr", "1e-3", "--warmup_proportion", "0",
        "--rerank_topk", RERANK_TOPK,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- pre-trained model


@pytest.fixture(scope="module")
def stage2_checkpoint(synthetic_small, tmp_path_factory) -> Path:
    """A few steps of stage 1 (CLIP) then stage 2 (fusion) on the synthetic WebVid shards."""
    root = tmp_path_factory.mktemp("pretrain")
    webvid = [
        "--train_csv", str(synthetic_small / "webvid" / "frozen_train_labels.json"),
        "--webvid_tfrecord", str(synthetic_small / "webvid" / "tfrecord"),
        "--batch_size", "8", "--epochs", "100", "--max_steps", PRETRAIN_STEPS, "--warmup_proportion", "0",
    ]  # fmt: skip
    main_task_clip.main(
        ["--do_train", *MODEL_FLAGS, *webvid, "--output_dir", str(root / "s1"), "--lr", "1e-3", "--coef_lr", "1"]
    )
    main_task_fusion.main(
        ["--do_train", *MODEL_FLAGS, *webvid, "--output_dir", str(root / "s2"), "--fusion_lr", "1e-3",
         "--init_model", str(latest_checkpoint(root / "s1")), "--cache_visual_features"]
    )  # fmt: skip
    return latest_checkpoint(root / "s2")


@pytest.fixture(scope="module")
def finetuned(synthetic_small, stage2_checkpoint, tmp_path_factory) -> dict:
    """MSR-VTT metrics before and after retrieval fine-tuning of the stage-2 model, and the fine-tuning run's dir."""
    root = tmp_path_factory.mktemp("finetune")
    common = [*MODEL_FLAGS, *msrvtt_flags(synthetic_small), "--init_model", str(stage2_checkpoint)]
    before = retrieval.main([*common, "--do_eval", "--output_dir", str(root / "before"), "--rerank_topk", RERANK_TOPK])
    out = root / "after"
    after = retrieval.main([*common, *train_flags(out, steps=FINETUNE_STEPS, batch="16"), "--expand_msrvtt_sentences"])
    return {"before": before, "after": after, "out": out}


@pytest.mark.slow
def test_finetuning_raises_recall_and_reranking_keeps_it(finetuned):
    before, after = finetuned["before"], finetuned["after"]
    assert after["t2v_R1"] > before["t2v_R1"]
    assert after["v2t_R1"] > before["v2t_R1"]
    assert after["rerank_t2v_R1"] >= after["t2v_R1"]
    assert after["rerank_v2t_R1"] >= after["v2t_R1"]
    written = json.loads((finetuned["out"] / "eval_results.json").read_text())
    assert written["tag"] == "final"  # MSR-VTT 1k-A has no validation split: the test split is evaluated at the end
    for key in METRIC_KEYS:
        assert written[key] == pytest.approx(after[key])
        assert written[f"rerank_{key}"] == pytest.approx(after[f"rerank_{key}"])


@pytest.mark.slow
def test_eval_only_with_resume_reproduces_the_final_test_metrics(synthetic_small, finetuned, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(finetuned["out"] / "ckpt", out / "ckpt")
    again = retrieval.main(
        [*MODEL_FLAGS, *msrvtt_flags(synthetic_small), "--do_eval", "--resume", "--output_dir", str(out),
         "--rerank_topk", RERANK_TOPK]
    )  # fmt: skip
    for key in METRIC_KEYS:
        assert again[key] == pytest.approx(finetuned["after"][key])
        assert again[f"rerank_{key}"] == pytest.approx(finetuned["after"][f"rerank_{key}"])


@pytest.mark.slow
def test_two_gloo_ranks_evaluate_exactly_like_one_process(synthetic_small, finetuned, tmp_path):
    """MSVD (8 captions per video) with re-ranking; 12 videos and 96 captions shard unevenly with batch 5."""
    weights = latest_checkpoint(finetuned["out"])
    flags = [
        *MODEL_FLAGS, "--do_eval", "--datatype", "msvd", "--data_path", str(synthetic_small / "msvd"),
        "--features_path", str(synthetic_small / "videos"), "--init_model", str(weights),
        "--rerank_topk", RERANK_TOPK, "--batch_size_val", "6",
    ]  # fmt: skip
    one = retrieval.main([*flags, "--output_dir", str(tmp_path / "one")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", MODULE]
    proc = subprocess.run(
        [*cmd, *flags, "--output_dir", str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert one["num_texts"] == two["num_texts"] == 96
    for key in METRIC_KEYS:
        assert two[key] == one[key], key
        assert two[f"rerank_{key}"] == one[f"rerank_{key}"], key


# ---------------------------------------------------------------------------------- each benchmark, real formats


def _copy_videos(sources: list[Path], names: list[Path]) -> None:
    """Synthetic mp4 bytes under each benchmark's file name (the decoder probes the content, not the extension)."""
    for i, name in enumerate(names):
        name.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sources[i % len(sources)], name)


def _synthetic_captions(data: Path) -> dict[str, list[str]]:
    sentences = json.loads((data / "msrvtt" / "MSRVTT_data.json").read_text())["sentences"]
    captions: dict[str, list[str]] = {}
    for row in sentences:
        captions.setdefault(row["video_id"], []).append(row["caption"])
    return captions


def msrvtt_real_rows(data: Path, realdata: Path, root: Path, rows: int = 6) -> list[str]:
    """The first rows of the real 1k-A test csv; their videos are synthetic, the training data is the synthetic set."""
    with (realdata / "msrvtt-jsfusion-aic" / "MSRVTT_JSFUSION_test.csv").open(newline="") as handle:
        reader = csv.reader(handle)
        header, body = next(reader), [row for _, row in zip(range(rows), reader, strict=False)]
    test_csv = root / "MSRVTT_JSFUSION_test.csv"
    with test_csv.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *body])
    features = root / "MSRVTT_Videos"
    shutil.copytree(data / "videos", features)
    _copy_videos(sorted((data / "videos").glob("*.mp4")), [features / f"{row[2]}.mp4" for row in body])
    return [*MODEL_FLAGS, *msrvtt_flags(data, features, test_csv)]


def msvd_synthetic(data: Path, realdata: Path, root: Path) -> list[str]:
    """The synthetic MSVD folder: split lists + raw-captions.pkl (a pickle, read by the restricted unpickler)."""
    return [
        *MODEL_FLAGS,
        "--datatype",
        "msvd",
        "--data_path",
        str(data / "msvd"),
        "--features_path",
        str(data / "videos"),
    ]


LSMDC_SPLITS = {"train": 8, "val": 4, "test": 4}


def lsmdc_files(data: Path, realdata: Path, root: Path) -> list[str]:
    """LSMDC16 tab-separated files (clip id, four times, sentence); clips nested in per-movie folders."""
    from dataloaders.annotations import LSMDC_FILES

    captions = _synthetic_captions(data)
    videos = sorted((data / "videos").glob("*.mp4"))
    features = root / "LSMDC_Videos"
    start = 0
    for split, count in LSMDC_SPLITS.items():
        lines, clips = [], []
        for i in range(start, start + count):
            movie = f"{1001 + i % 3}_Movie_{i % 3}"
            clip_id = f"{movie}_00.00.{i:02d}.000-00.00.{i + 2:02d}.500"
            clips.append(features / movie / f"{clip_id}.avi")
            for sentence in captions[videos[i].stem][:2]:
                lines.append("\t".join([clip_id, f"00.00.{i:02d}.000", f"00.00.{i + 2:02d}.500", "0", "2.5", sentence]))
        (root / LSMDC_FILES[split]).write_text("\n".join(lines) + "\n")
        _copy_videos(videos[start : start + count], clips)
        start += count
    return [*MODEL_FLAGS, "--datatype", "lsmdc", "--data_path", str(root), "--features_path", str(features)]


DIDEMO_SPLITS = {"train": 8, "val": 4, "test": 4}


def didemo_real_json(data: Path, realdata: Path, root: Path) -> list[str]:
    """Subsets of the real DiDeMo val_data.json (all annotations of each chosen video) as the three splits."""
    entries = json.loads((realdata / "didemo-localizingmoments" / "val_data.json").read_text())
    names = list(dict.fromkeys(e["video"] for e in entries if Path(e["video"]).suffix))
    features = root / "DiDeMo_Videos"
    start = 0
    for split, count in DIDEMO_SPLITS.items():
        chosen = names[start : start + count]
        (root / f"{split}_data.json").write_text(json.dumps([e for e in entries if e["video"] in chosen]))
        _copy_videos(sorted((data / "videos").glob("*.mp4"))[start:], [features / name for name in chosen])
        start += count
    return [*MODEL_FLAGS, "--datatype", "didemo", "--data_path", str(root), "--features_path", str(features)]


BENCHMARKS = {
    # datatype: (flags builder, test videos, test texts, has a validation split)
    "msrvtt": (msrvtt_real_rows, 6, 6, False),
    "msvd": (msvd_synthetic, 12, 96, True),
    "lsmdc": (lsmdc_files, 4, 8, True),
    "didemo": (didemo_real_json, 4, 4, True),
}


@pytest.mark.parametrize("datatype", list(BENCHMARKS))
def test_each_benchmark_trains_and_evaluates(datatype, synthetic_small, realdata, tmp_path):
    build, num_videos, num_texts, has_val = BENCHMARKS[datatype]
    flags = build(synthetic_small, realdata, tmp_path)
    out = tmp_path / "run"
    metrics = retrieval.main([*flags, *train_flags(out)])
    written = json.loads((out / "eval_results.json").read_text())
    assert written["tag"] == ("test" if has_val else "final")
    assert (written["num_videos"], written["num_texts"]) == (num_videos, num_texts)
    for key in METRIC_KEYS:
        assert written[key] == pytest.approx(metrics[key])
        assert f"rerank_{key}" in written
    steps = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    assert [row["step"] for row in steps if "train/loss" in row] == [1, 2]
    assert all(row["train/vtm"] > 0 for row in steps if "train/loss" in row)  # re-ranking on: VTM trains too
    if has_val:
        best = json.loads((out / BEST_METRICS_FILE).read_text())
        assert best["metric"] == "rerank_t2v_R1"
        assert written["best_val_rerank_t2v_R1"] == pytest.approx(best["value"])
        assert (out / BEST_MODEL_FILE).is_file()
    else:
        assert not (out / BEST_METRICS_FILE).exists()


def test_missing_test_video_is_named_or_dropped_when_allowed(synthetic_small, realdata, tmp_path):
    flags = msrvtt_real_rows(synthetic_small, realdata, tmp_path)
    missing = tmp_path / "MSRVTT_Videos" / "video9770.mp4"
    missing.unlink()
    eval_flags = [*flags, "--do_eval", "--rerank_topk", "2", "--batch_size_val", "4"]
    with pytest.raises(DataError, match="video9770"):
        retrieval.main([*eval_flags, "--output_dir", str(tmp_path / "strict")])
    metrics = retrieval.main([*eval_flags, "--allow_missing_eval_videos", "--output_dir", str(tmp_path / "allowed")])
    assert metrics["dropped_videos"] == ["video9770"]
    assert (metrics["num_videos"], metrics["num_texts"]) == (5, 5)


# ------------------------------------------------------------------------------------------------ model selection


def test_best_validation_keeps_restores_and_resumes_the_best_weights(tmp_path):
    model = nn.Linear(3, 2)
    selection = BestValidation(tmp_path, "t2v_R1", is_main=True)
    assert selection.update(model, {"t2v_R1": 10.0, "v2t_R1": 1.0})
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not selection.update(model, {"t2v_R1": 10.0})  # a tie keeps the earlier run
    assert not selection.update(model, {"t2v_R1": 5.0})
    assert selection.summary() == {"best_val_t2v_R1": 10.0, "best_val_run": 1}
    selection.restore(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, best[k])

    with torch.no_grad():
        model.weight.add_(2.0)
    resumed = BestValidation(tmp_path, "t2v_R1", is_main=True)
    resumed.resume(model)
    assert resumed.summary() == {"best_val_t2v_R1": 10.0, "best_val_run": 1}
    assert not resumed.update(model, {"t2v_R1": 9.0})
    resumed.restore(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, best[k])
    with pytest.raises(Exception, match="selected on"):
        BestValidation(tmp_path, "v2t_R1", is_main=True).resume(model)


def test_selection_and_flag_checks():
    check_selection_metric("t2v_R1", 0)
    check_selection_metric("rerank_v2t_R5", 32)
    with pytest.raises(ConfigError, match="needs re-ranking"):
        check_selection_metric("rerank_t2v_R1", 0)
    with pytest.raises(ConfigError, match="not one of"):
        check_selection_metric("t2v_MdR", 32)
    argv = ["--output_dir", "x", "--datatype", "webvid", "--do_eval"]
    args = retrieval_settings.build_retrieval_parser().parse_args(argv)
    with pytest.raises(ConfigError, match="retrieval runs on"):
        retrieval_settings.validate_retrieval(args)


# ---------------------------------------------------------------------------------- video->text group protocol


def group_rerank_loop(sim: torch.Tensor, owner: list[int], prob: torch.Tensor, k: int) -> torch.Tensor:
    """Plain reference: per video, its top-k caption groups re-scored with the best match probability of a caption."""
    from modules.fusion import RERANK_OFFSET, RERANK_SCALE

    n_video = sim.shape[1]
    groups = [[c for c in range(len(owner)) if owner[c] == g] for g in range(n_video)]
    out = torch.zeros(n_video, n_video, dtype=sim.dtype)
    for v in range(n_video):
        scores = torch.stack([sim[groups[g], v].max() for g in range(n_video)])
        out[v] = scores
        top = sorted(range(n_video), key=lambda g: -float(scores[g]))[:k]
        weights = torch.softmax(scores[top], 0)
        for w, g in zip(weights, top, strict=True):
            out[v, g] = w * RERANK_SCALE * max(float(prob[c, v]) for c in groups[g]) + RERANK_OFFSET
    return out


def test_group_reranking_equals_the_loop_in_any_chunking_and_sharding():
    from video_text_retrieval.task import rerank_group_queries

    gen = torch.Generator().manual_seed(0)
    owner = [0, 1, 1, 2, 2, 2, 3, 4, 4, 1, 3]
    sim = torch.randn(len(owner), 5, generator=gen, dtype=torch.float64)
    prob = torch.rand(len(owner), 5, generator=gen, dtype=torch.float64)

    def match_prob(text_idx, video_idx):
        return prob[text_idx, video_idx]

    want = group_rerank_loop(sim, owner, prob, k=3)
    every = torch.arange(5)
    torch.testing.assert_close(rerank_group_queries(sim, owner, match_prob, 3, every), want)
    for chunk in (1, 2, 7):  # chunks of queries, and two "ranks" holding 0-2 and 3-4
        torch.testing.assert_close(rerank_group_queries(sim, owner, match_prob, 3, every, query_chunk=chunk), want)
        shards = [rerank_group_queries(sim, owner, match_prob, 3, q, chunk) for q in (every[:3], every[3:])]
        torch.testing.assert_close(torch.cat(shards), want)


def test_single_caption_reranking_is_the_same_under_both_protocols():
    from modules.fusion import rerank_queries
    from video_text_retrieval.task import rerank_group_queries, rerank_metrics

    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(6, generator=gen).tolist()  # caption i belongs to video perm[i]
    sim = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    prob = torch.rand(6, 6, generator=gen, dtype=torch.float64)

    def match_prob(text_idx, video_idx):
        return prob[text_idx, video_idx]

    every = torch.arange(6)
    t2v = rerank_queries(sim, match_prob, 3, every, False)
    caption = rerank_queries(sim.t(), match_prob, 3, every, True)  # [Nv, Nt]
    group = rerank_group_queries(sim, perm, match_prob, 3, every)  # [Nv, Nv groups]
    torch.testing.assert_close(group[:, perm], caption)  # group perm[i] is caption i
    assert rerank_metrics(t2v, group, perm, "group") == rerank_metrics(t2v, caption, perm, "caption")
