"""The fast (tensor) CLIP transform against the exact published PIL pipeline, within the stated tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from dataloaders.errors import ConfigError
from dataloaders.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_TRANSFORM_BACKEND,
    TENSOR_MAX_ABS_DIFF,
    TENSOR_MEAN_ABS_DIFF,
    ClipTransform,
)
from dataloaders.video_io import load_video

MP4 = "mmaction2-testdata/tests_data_test.mp4"
SHARD_SIDE = 256  # frozen_tfrecord's raw frames
FLOAT_ROUNDING = 1e-5  # folded scale-and-shift vs divide-subtract-divide, normalised units
REAL_FRAME_MEAN_GAP = 1e-3  # real frames are smooth: the kernels' rounding rarely differs


def published(frames: np.ndarray, size: int) -> torch.Tensor:
    """torchvision's published pipeline, one PIL image at a time (the reference)."""
    pipeline = Compose(
        [
            Resize(size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(size),
            ToTensor(),
            Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return torch.stack([pipeline(Image.fromarray(f)) for f in frames])


@pytest.fixture(scope="module")
def real_frames(realdata) -> np.ndarray:
    frames, mask = load_video(realdata / MP4, max_frames=6)
    assert mask.all()
    return frames


def test_default_is_tensor_and_pil_stays_exact(real_frames):
    assert DEFAULT_TRANSFORM_BACKEND == "tensor" and ClipTransform().backend == "tensor"
    assert torch.equal(ClipTransform(224, "pil")(real_frames), published(real_frames, 224))


@pytest.mark.parametrize("size", [224, 96])
def test_tensor_path_within_tolerance_on_real_frames(real_frames, size):
    reference = published(real_frames, size)
    fast = ClipTransform(size)(real_frames)
    assert fast.shape == reference.shape and fast.dtype == torch.float32 and fast.is_contiguous()
    gap = (fast - reference).abs()
    assert gap.max() <= TENSOR_MAX_ABS_DIFF
    assert gap.mean() <= REAL_FRAME_MEAN_GAP


def test_tensor_path_within_tolerance_on_shard_sized_frames(real_frames):
    shard_like = np.stack([np.asarray(Image.fromarray(f).resize((SHARD_SIDE, SHARD_SIDE))) for f in real_frames])
    gap = (ClipTransform()(shard_like) - published(shard_like, 224)).abs()
    assert gap.max() <= TENSOR_MAX_ABS_DIFF and gap.mean() <= REAL_FRAME_MEAN_GAP


@pytest.mark.parametrize("shape", [(3, 40, 70, 3), (2, 90, 33, 3), (1, 12, 20, 3)])
def test_tensor_path_within_tolerance_on_noise(shape):
    frames = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    gap = (ClipTransform(32)(frames) - published(frames, 32)).abs()
    assert gap.mean() <= TENSOR_MEAN_ABS_DIFF


def test_no_resize_needed_is_exact_up_to_float_rounding():
    frames = np.random.default_rng(3).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)  # short side already 32
    reference = published(frames, 32)
    fast = ClipTransform(32)(frames)
    assert (fast - reference).abs().max() <= FLOAT_ROUNDING
    # the hand-computed normalisation of one pixel: top-left of the centred crop (left = 8)
    pixel = frames[1, 0, 8].astype(np.float64)
    expected = (pixel / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert np.allclose(fast[1, :, 0, 0].numpy(), expected, atol=FLOAT_ROUNDING)


@pytest.mark.parametrize("mask", [[1, 1, 1, 0, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]])
@pytest.mark.parametrize("backend", ["tensor", "pil"])
def test_masked_frames_are_zero_and_valid_ones_match(real_frames, mask, backend):
    frames = real_frames[:5]
    valid = np.asarray(mask, dtype=bool)
    out = ClipTransform(64, backend)(frames, np.asarray(mask))
    assert out.shape == (5, 3, 64, 64)
    assert not out[torch.from_numpy(~valid)].any()
    if valid.any():
        reference = published(frames[valid], 64)
        tolerance = 0.0 if backend == "pil" else TENSOR_MAX_ABS_DIFF
        assert (out[torch.from_numpy(valid)] - reference).abs().max() <= tolerance


def test_bad_backend_and_frames():
    with pytest.raises(ConfigError, match="--transform"):
        ClipTransform(32, backend="cv2")
    with pytest.raises(ValueError, match="uint8"):
        ClipTransform(32)(np.zeros((2, 8, 8, 3), dtype=np.float32))


@pytest.mark.parametrize("backend", ["tensor", "pil"])
@pytest.mark.parametrize("size", [32, 24])  # 32: no resize (short side already 32); 24: resized
def test_any_memory_layout_of_the_frames_gives_the_same_clip(backend, size):
    frames = np.random.default_rng(4).integers(0, 256, (3, 32, 40, 3), dtype=np.uint8)
    mask = np.array([1, 0, 1])
    transform = ClipTransform(size, backend)
    expected = transform(frames, mask)
    planar = np.ascontiguousarray(frames.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)  # channel planes
    reversed_view = np.ascontiguousarray(frames[..., ::-1])[..., ::-1]  # negative channel stride
    read_only = frames.copy()
    read_only.flags.writeable = False
    for layout in (planar, reversed_view, read_only):
        np.testing.assert_array_equal(layout, frames)
        assert torch.equal(transform(layout, mask), expected)
