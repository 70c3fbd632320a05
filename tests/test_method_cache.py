"""``--cache_visual_features`` for ``--method t2vlp`` and ``stoa``: the frozen ViT's frame features and the ViT taps the
trainable tube / object module reads are cached per video; a stage-2 step on the cache equals the step on the video,
the cache is built once (the ViT is not called again, even after the tube / object weights train) and a cache of
other settings is never read."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from dataloaders import synthetic
from engine.builders import build_model, build_pretrain_set
from engine.distributed import init_distributed
from engine.feature_cache import TAPS_FILE, CachedFrameReader, attach_visual_cache
from engine.flags import build_parser
from modules.membridge import Stage2Weights
from pretraining.fusion_task import FusionPretrainTask, attach_stage2_draws
from tests.test_stage2 import fusion_flags

BATCH = 4
# the tolerance of a cached step against the uncached one: the cache ran the ViT on other batches (8 videos, not 4),
# the features themselves are stored in float32
RTOL, ATOL = 1e-5, 1e-6


def _method_flags(data: Path, method: str) -> list[str]:
    if method == "t2vlp":
        return ["--method", "t2vlp", "--num_tubes", "3"]
    return ["--method", "stoa", "--object_count", "3", "--objects_dir", str(data / "objects"),
            "--labelmap_path", str(data / synthetic.LABEL_MAP_FILE_NAME),
            "--tag_file", str(data / "webvid" / synthetic.TAG_FILE_NAME)]  # fmt: skip


def _train_set(data: Path, out: Path, method: str, encoder, *extra: str):
    args = build_parser("fusion").parse_args(fusion_flags(data, out, *_method_flags(data, method), *extra))
    dataset = build_pretrain_set(args, encoder.clip.config.image_resolution, init_distributed(), encoder)
    attach_stage2_draws(dataset, args.max_words)
    return dataset


def _model(data: Path, out: Path, method: str):
    args = build_parser("fusion").parse_args(fusion_flags(data, out, *_method_flags(data, method)))
    torch.manual_seed(0)
    return build_model(args, with_fusion=True)


def _step(model, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One SGD step of the stage-2 task on a copy of ``model``: its losses and its updated parameters."""
    model = copy.deepcopy(model)
    task = FusionPretrainTask(model, Stage2Weights()).train()
    torch.manual_seed(5)  # the heads' dropout masks
    out = task(batch)
    out["loss"].backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.optim.SGD(trainable, lr=0.5).step()
    return {k: v.detach() for k, v in out.items()}, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["t2vlp", "stoa"])
def test_cached_stage2_step_equals_the_uncached_step_and_the_cache_is_reused(
    method: str, synthetic_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model = _model(synthetic_small, tmp_path, method)
    encoder = model.encoder
    plain = _train_set(synthetic_small, tmp_path, method, encoder)
    cached = _train_set(synthetic_small, tmp_path, method, encoder, "--cache_visual_features")
    raw = default_collate([plain[i] for i in range(BATCH)])
    fast = default_collate([cached[i] for i in range(BATCH)])
    taps = encoder.num_visual_taps
    assert taps == (2 if method == "stoa" else 1)
    assert "video" not in fast and fast["visual_taps"].shape[:3] == (BATCH, taps, 4)
    # the cached taps and frame features are what the ViT gives the decoded videos
    frames, expected = encoder.visual_taps(raw["video"], raw["video_mask"])
    torch.testing.assert_close(fast["visual_taps"], expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(fast["frame_feats"], frames, rtol=RTOL, atol=ATOL)
    if method == "stoa":
        assert torch.equal(fast["object_boxes"], raw["object_boxes"]) and "noun_mask" in fast

    losses, params = _step(model, raw)
    cached_losses, cached_params = _step(model, fast)
    assert {"loss", "vtm", "mlm", "plm", "align" if method == "t2vlp" else "match"} <= set(losses)
    for key, value in losses.items():
        torch.testing.assert_close(cached_losses[key], value, rtol=RTOL, atol=ATOL, msg=key)
    moved = [n for n in params if not torch.equal(params[n], dict(model.named_parameters())[n])]
    assert any(n.startswith(f"encoder.{'objects' if method == 'stoa' else 'tubes'}.") for n in moved)
    for name, value in params.items():
        torch.testing.assert_close(cached_params[name], value, rtol=RTOL, atol=ATOL, msg=name)

    # built once: a second run (after the tube / object module trained) reads the cache, never the ViT
    with torch.no_grad():
        for p in (encoder.objects if method == "stoa" else encoder.tubes).parameters():
            p.add_(0.1)

    def no_vit(*args: object, **kwargs: object) -> None:
        raise AssertionError("the ViT ran although the cache holds every video")

    monkeypatch.setattr(encoder, "encode_video", no_vit)
    again = _train_set(synthetic_small, tmp_path, method, encoder, "--cache_visual_features")
    assert torch.equal(default_collate([again[i] for i in range(BATCH)])["visual_taps"], fast["visual_taps"])
    assert len(list((tmp_path / "visual_cache").iterdir())) == 1


def test_a_cache_of_other_settings_is_not_read_and_a_damaged_one_is_rebuilt(
    synthetic_small: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    dist = init_distributed()
    model = _model(synthetic_small, tmp_path, "stoa")
    encoder = model.encoder
    dataset = _train_set(synthetic_small, tmp_path, "stoa", encoder)
    n_videos = len(dataset.video_ids)
    root = tmp_path / "cache"
    settings = {"max_frames": 4, "method": "stoa", "visual_taps": 2}
    first = attach_visual_cache(dataset, encoder, root, settings, dist, 8, 0, visual_taps=2)
    assert first.computed == n_videos and np.load(first.directory / TAPS_FILE).shape[:2] == (n_videos, 2)
    # frame features only (MemBridge's cache of the same ViT and frame settings), or another method: other keys
    for other, taps in (({"max_frames": 4}, 0), ({"max_frames": 4, "method": "t2vlp", "visual_taps": 1}, 1)):
        fresh = _train_set(synthetic_small, tmp_path, "stoa", encoder)
        report = attach_visual_cache(fresh, encoder, root, other, dist, 8, 0, visual_taps=taps)
        assert report.directory != first.directory and report.computed == n_videos
    with pytest.raises(ValueError, match="settings must name the cached visual_taps"):
        attach_visual_cache(dataset, encoder, root, {"max_frames": 4}, dist, 8, 0, visual_taps=2)
    # a taps file that does not fit the index: rebuilt, with a warning naming the cache
    np.save(first.directory / TAPS_FILE, np.zeros((n_videos, 1, 4, 2, 2), dtype=np.float32))
    with caplog.at_level(logging.WARNING):
        rebuilt = attach_visual_cache(_train_set(synthetic_small, tmp_path, "stoa", encoder), encoder, root, settings,
                                      dist, 8, 0, visual_taps=2)  # fmt: skip
    assert (rebuilt.directory, rebuilt.computed) == (first.directory, n_videos)
    assert f"visual feature cache {first.directory} is damaged" in caplog.text
    # a frame-only cache read as a tap cache: one clear error
    frame_only = CachedFrameReader(
        attach_visual_cache(
            _train_set(synthetic_small, tmp_path, "stoa", encoder), encoder, root, {"max_frames": 4}, dist, 8, 0
        ).directory  # fmt: skip
    )
    with pytest.raises(Exception, match="holds no taps.npy; delete it to rebuild it"):
        frame_only.taps(dataset.video_ids[0])
