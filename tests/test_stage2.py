"""Stage 2 end to end on the small synthetic set: the visual-feature cache (equal outputs, reuse, invalidation),
hard negatives with one sample per rank under 2 gloo ranks, and the published command line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.builders import build_dataset, build_model, webvid_source
from engine.distributed import init_distributed
from engine.feature_cache import UNREADABLE_ROW, attach_visual_cache
from engine.flags import build_parser
from tests.conftest import REPO

TINY = str(REPO / "CLIP-modules" / "tiny.json")
FUSION_TINY = str(REPO / "CLIP-modules" / "fusion-tiny.json")


def fusion_flags(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--do_train",
        "--clip_config", TINY, "--cross_config_path", FUSION_TINY,
        "--output_dir", str(out),
        "--train_csv", str(data / "webvid" / "frozen_train_labels.json"),
        "--webvid_tfrecord", str(data / "webvid" / "tfrecord"),
        "--max_frames", "4", "--max_words", "12",
        "--batch_size", "4", "--fusion_lr", "1e-3", "--n_display", "1",
        "--loose_type", "--no-log_tensorboard", "--seed", "3",
        *extra,
    ]  # fmt: skip


def run(script: str, args: list[str], nproc: int = 1) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(REPO / script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += [str(REPO / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]


def losses(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "train/loss" in row}


def test_cached_visual_features_give_the_same_training(synthetic_small, tmp_path):
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    run("main_task_fusion.py", fusion_flags(synthetic_small, plain, "--max_steps", "3", "--epochs", "1"))
    run(
        "main_task_fusion.py",
        fusion_flags(synthetic_small, cached, "--max_steps", "3", "--epochs", "1", "--cache_visual_features"),
    )
    a, b = losses(plain), losses(cached)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key in ("train/vtm", "train/mlm", "train/plm", "train/loss"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-5), (step, key)
    assert any((cached / "visual_cache").iterdir())


def _cache_inputs(data: Path, out: Path):
    args = build_parser("fusion").parse_args(fusion_flags(data, out))
    model = build_model(args, with_fusion=True)
    dataset = build_dataset(args, "webvid", "train", model.encoder.clip.config.image_resolution, webvid_source(args))
    return model, dataset


def test_visual_cache_is_reused_and_invalidated(synthetic_small, tmp_path):
    dist = init_distributed()
    settings = {"max_frames": 4}
    root = tmp_path / "cache"
    model, dataset = _cache_inputs(synthetic_small, tmp_path)
    n_videos = len(dataset.video_ids)
    first = attach_visual_cache(dataset, model.encoder, root, settings, dist, 8, 0)
    assert (first.reused, first.computed) == (0, n_videos)
    item = dataset[0]
    assert "video" not in item and item["frame_feats"].shape == (4, model.encoder.clip.config.embed_dim)
    # the cached features are the encoder's features of the decoded video
    _, fresh = _cache_inputs(synthetic_small, tmp_path)
    raw = fresh[0]
    with torch.no_grad():
        expected = model.encoder.encode_video(raw["video"][None], raw["video_mask"][None])[0]
    torch.testing.assert_close(item["frame_feats"], expected, rtol=1e-5, atol=1e-5)

    _, again = _cache_inputs(synthetic_small, tmp_path)
    second = attach_visual_cache(again, model.encoder, root, settings, dist, 8, 0)
    assert (second.directory, second.reused, second.computed) == (first.directory, n_videos, 0)

    # other encoder weights -> another cache
    with torch.no_grad():
        model.encoder.clip.visual.proj.add_(0.01)
    _, changed = _cache_inputs(synthetic_small, tmp_path)
    third = attach_visual_cache(changed, model.encoder, root, settings, dist, 8, 0)
    assert third.directory != first.directory and third.computed == n_videos

    # a changed shard file -> its videos are recomputed
    shard = next((synthetic_small / "webvid" / "tfrecord").glob("*.tfrecord"))
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        _, touched = _cache_inputs(synthetic_small, tmp_path)
        fourth = attach_visual_cache(touched, model.encoder, root, settings, dist, 8, 0)
        assert (fourth.directory, fourth.computed) == (third.directory, n_videos)
    finally:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_visual_cache_leaves_out_unreadable_videos_and_training_skips_them(synthetic_small, tmp_path, caplog):
    """A deleted and a corrupted training video: the cache stores the others, marks these two as unreadable (not
    decoded again while the files stay the same) and the cached dataset skips them, as the uncached one does."""
    folder = tmp_path / "videos"
    folder.mkdir()
    labels = json.loads((synthetic_small / "webvid" / "frozen_train_labels.json").read_text())
    video_ids = list(dict.fromkeys(row["video_id"] if isinstance(row, dict) else row[0] for row in labels))
    deleted, corrupted = video_ids[1], video_ids[4]
    for vid in video_ids:
        if vid not in (deleted, corrupted):
            (folder / f"{vid}.mp4").symlink_to(synthetic_small / "videos" / f"{vid}.mp4")
    (folder / f"{corrupted}.mp4").write_bytes(os.urandom(4096))

    def inputs():
        args = build_parser("fusion").parse_args(
            [*fusion_flags(synthetic_small, tmp_path), "--webvid_video_dir", str(folder)]
        )
        model = build_model(args, with_fusion=True)
        source = webvid_source(args)
        return model, build_dataset(args, "webvid", "train", model.encoder.clip.config.image_resolution, source)

    dist = init_distributed()
    model, dataset = inputs()
    with caplog.at_level(logging.WARNING):
        report = attach_visual_cache(dataset, model.encoder, tmp_path / "cache", {"max_frames": 4}, dist, 8, 0)
    assert report.computed == len(video_ids)
    assert f"2 of {len(video_ids)} videos could not be read and are not cached" in caplog.text
    index = json.loads((report.directory / "index.json").read_text())["videos"]
    assert index[deleted][0] == index[corrupted][0] == UNREADABLE_ROW
    assert sorted(row for row, _ in index.values() if row != UNREADABLE_ROW) == list(range(len(video_ids) - 2))

    position = {vid: i for i, vid in enumerate(dataset.video_ids)}
    bad = {position[deleted], position[corrupted]}
    items = [dataset[i] for i in range(len(dataset))]
    assert all("frame_feats" in item for item in items)
    assert not bad & {int(item["video_index"]) for item in items}  # replaced by the next readable samples
    assert dataset.samples_skipped >= 2

    _, again = inputs()
    second = attach_visual_cache(again, model.encoder, tmp_path / "cache", {"max_frames": 4}, dist, 8, 0)
    assert (second.directory, second.computed) == (report.directory, 0)  # the unreadable ones are not retried
    (folder / f"{corrupted}.mp4").unlink()
    (folder / f"{corrupted}.mp4").symlink_to(synthetic_small / "videos" / f"{corrupted}.mp4")  # repaired
    _, repaired = inputs()
    third = attach_visual_cache(repaired, model.encoder, tmp_path / "cache", {"max_frames": 4}, dist, 8, 0)
    assert third.computed == 1 and json.loads((third.directory / "index.json").read_text())["videos"][corrupted][0] >= 0


@pytest.mark.slow
def test_hard_negatives_with_one_sample_per_rank(synthetic_small, tmp_path):
    out = tmp_path / "two"
    run("main_task_fusion.py", fusion_flags(synthetic_small, out, "--batch_size", "2", "--max_steps", "2"), nproc=2)
    rows = losses(out)
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("train/vtm", "train/mlm", "train/plm"))
        assert row["train/vtm"] > 0
