"""The CLIP image transform applied to decoded video frames (DESIGN §3.1).

Two backends, one contract (uint8 RGB ``[N, H, W, 3]`` -> CLIP-normalised float ``[N, 3, S, S]``):

- ``tensor`` (default): the whole clip is resized at once on its uint8 channels-last view with
  ``torchvision.transforms.v2.functional.resize`` (antialiased bicubic, torch's vectorised uint8 kernel), centre
  cropped as a view, and written into the float output in one conversion pass followed by one fused per-channel
  scale-and-shift (``x * 1/(255 std) - mean/std``). It differs from the published PIL pipeline only by the
  resampling kernels' rounding: on real frames at most ``TENSOR_MAX_STEPS`` uint8 steps on a pixel
  (``TENSOR_MAX_ABS_DIFF`` in normalised units; measured 0.030), and on average under ``TENSOR_MEAN_ABS_DIFF`` even
  on uniform noise, the kernels' worst case (tests/test_transforms.py pins both). When no resize is needed
  (frames already ``S`` on their short side) the two backends agree to float rounding.
- ``pil``: the published torchvision pipeline bit for bit (PIL ``Resize(S, BICUBIC)``, ``CenterCrop(S)``,
  ``ToTensor``, ``Normalize``), one frame at a time; choose it with ``--transform pil`` for exact reproduction.

Measured on the 2-core development CPU, one thread, 12 frames 256x256 -> 224: tensor ~3.5 ms per clip, pil ~18 ms
(bench/bench_data.py has the side-by-side figures).
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dataloaders.errors import ConfigError

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = 224
TRANSFORM_BACKENDS: tuple[str, ...] = ("tensor", "pil")
DEFAULT_TRANSFORM_BACKEND = "tensor"
UINT8_MAX = 255
TENSOR_MAX_STEPS = 3  # the tensor backend's largest gap to PIL on one pixel, in uint8 steps
TENSOR_MAX_ABS_DIFF = TENSOR_MAX_STEPS / UINT8_MAX / min(CLIP_STD)  # the same in normalised units (~0.0455)
TENSOR_MEAN_ABS_DIFF = 0.01  # mean gap to PIL in normalised units (uniform noise; real frames are ~1e-4)


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(new_height, new_width)`` with the short side ``size`` and the long side truncated, as torchvision."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def centre_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """``(top, left)`` of the centred ``size x size`` crop, rounded as torchvision's ``CenterCrop``."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


class ClipTransform:
    """uint8 RGB frames ``[N, H, W, 3]`` (+ optional mask ``[N]``) -> CLIP-normalised float ``[N, 3, S, S]``.

    Frames whose mask is 0 (zero padding) are not transformed and come out as exact zeros, as in CLIP4Clip.
    ``backend`` is one of ``TRANSFORM_BACKENDS`` (see the module docstring for their agreement).
    """

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, backend: str = DEFAULT_TRANSFORM_BACKEND) -> None:
        if backend not in TRANSFORM_BACKENDS:
            raise ConfigError(f"transform backend {backend!r} is not one of {TRANSFORM_BACKENDS}: fix --transform")
        if image_size < 1:
            raise ConfigError(f"image_size={image_size} must be >= 1: fix --image_size")
        self.image_size = image_size
        self.backend = backend
        self.mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
        # tensor backend: (x / 255 - mean) / std folded into one scale and one shift per channel
        self.scale = (1.0 / (UINT8_MAX * self.std.double())).float()
        self.shift = (-self.mean.double() / self.std.double()).float()

    def _pil(self, frames: np.ndarray) -> torch.Tensor:
        """The published pipeline, frame by frame -> float ``[N, 3, S, S]`` (bit-exact)."""
        size = self.image_size
        out = []
        for frame in frames:
            height, width = short_side_size(frame.shape[0], frame.shape[1], size)
            image = Image.fromarray(frame).resize((width, height), Image.BICUBIC)
            top, left = centre_crop_box(height, width, size)
            out.append(np.asarray(image.crop((left, top, left + size, top + size))))
        pixels = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
        # contiguous NCHW before the float maths: the channels-last view of the clip is 3x slower
        return pixels.contiguous().to(torch.float32).div_(UINT8_MAX).sub_(self.mean).div_(self.std)

    def _resize_crop_tensor(self, frames: np.ndarray) -> torch.Tensor:
        """Batched antialiased bicubic resize + centre crop -> uint8 ``[N, 3, S, S]`` (a view of the resized clip)."""
        size = self.image_size
        if any(stride < 0 for stride in frames.strides) or not frames.flags.writeable:
            frames = frames.copy()  # torch.from_numpy needs positive strides and (without a warning) writable memory
        clip = torch.from_numpy(frames).permute(0, 3, 1, 2)  # NCHW view (of NHWC memory for decoded frames)
        height, width = short_side_size(clip.shape[-2], clip.shape[-1], size)
        if (height, width) != tuple(clip.shape[-2:]):
            clip = TF.resize(clip, [height, width], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        top, left = centre_crop_box(height, width, size)
        return clip[..., top : top + size, left : left + size]

    def _normalise_into(self, out: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``pixels`` -> ``out`` (float, contiguous): one converting copy, then one scale-and-shift pass."""
        out.copy_(pixels)
        return out.mul_(self.scale).add_(self.shift)

    def __call__(self, frames: np.ndarray, mask: np.ndarray | None = None) -> torch.Tensor:
        """Transform ``frames``; rows with ``mask == 0`` are returned as zeros without being resized."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"ClipTransform needs uint8 RGB frames [N, H, W, 3], got {frames.dtype} {frames.shape}")
        valid = np.ones(len(frames), dtype=bool) if mask is None else np.asarray(mask).astype(bool)
        shape = (len(frames), 3, self.image_size, self.image_size)
        if not valid.any():
            return torch.zeros(shape, dtype=torch.float32)
        kept = frames if valid.all() else frames[valid]
        if self.backend == "pil":
            normalised = self._pil(kept)
            if valid.all():
                return normalised
            out = torch.zeros(shape, dtype=torch.float32)
            out[torch.from_numpy(valid)] = normalised
            return out
        pixels = self._resize_crop_tensor(kept)
        if valid.all():
            return self._normalise_into(torch.empty(shape, dtype=torch.float32), pixels)
        out = torch.zeros(shape, dtype=torch.float32)
        rows = torch.from_numpy(np.flatnonzero(valid))
        if torch.equal(rows, torch.arange(len(rows))):  # padding at the end (the zero pad mode): write in place
            self._normalise_into(out[: len(rows)], pixels)
        else:
            out[rows] = self._normalise_into(torch.empty((len(rows), *shape[1:]), dtype=torch.float32), pixels)
        return out
