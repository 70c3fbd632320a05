"""Embedded synthetic dataset: real mp4 videos of coloured shapes, with captions and questions (DESIGN §3.4).

Command lines::

    python -m dataloaders.synthetic --output_dir data/synthetic                  # default set (~1 min on 2 cores)
    python -m dataloaders.synthetic --output_dir /tmp/syn --small --seed 1       # unit-test set (a few seconds)
    python -m dataloaders.synthetic --output_dir data/syn --num_videos 1000 --encoding raw --num_workers 8

Layout written under ``--output_dir`` (the same file formats as the real datasets)::

    videos/{video_id}.mp4                           H.264, yuv420p, 8 fps, 6 s
    msrvtt/MSRVTT_data.json  MSRVTT_train.9k.csv  MSRVTT_train.7k.csv  MSRVTT_JSFUSION_test.csv
    msvd/train_list.txt  val_list.txt  test_list.txt  raw-captions.pkl
    msrvtt_qa/train.jsonl  val.jsonl  test.jsonl  train_ans2label.json
    webvid/frozen_train_labels.json  webvid/tfrecord/path-00000.tfrecord ... path.index   (train videos only)
    webvid/noun_verb.tsv                            MCQ phrase file: exact noun / verb phrases of each WebVid caption
    webvid/noun_verb_tags.json                      STOA's POS tags: {caption index: [tag per CLIP-BPE token]}
    objects/{video_id}.json  object_label_map.json  STOA's detections (dataloaders/detections.py format), exact
    manifest.json                                   counts, video format, vocabularies, chance levels, attributes

Every video shows 1-3 shapes of one colour and one type that move left / right / up / down, grow or shrink. Each
split holds distinct (colour, shape, motion, count) combinations where the grid allows, and every caption names all
four, so retrieval is unambiguous. A moving shape leaves a fading streak of its recent states (a growing shape a dim
core, a shrinking one a dim halo), so the motion is visible in every single frame and even an order-agnostic model
(meanP pooling) can learn it. A few test videos use a colour never seen in training: their colour answers are the
out-of-vocabulary QA answers. The same seed gives identical annotation files and identical mp4 bytes (x264 is
deterministic with ENCODER_OPTIONS), whatever the number of workers.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import av
import numpy as np
from tqdm import tqdm

from dataloaders import shard_build
from dataloaders.errors import ConfigError, DataError
from dataloaders.mcq_questions import format_phrase_row
from dataloaders.tfrecord_format import RAW_FRAME_SIZE
from dataloaders.tfrecord_io import read_index

logger = logging.getLogger(__name__)

# ---- attribute vocabularies -------------------------------------------------------------------------------------
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (240, 230, 30),
    "green": (40, 200, 40),
    "cyan": (0, 210, 220),
    "blue": (40, 70, 245),
    "purple": (150, 50, 220),
    "pink": (250, 110, 190),
}
HELD_OUT_COLORS: dict[str, tuple[int, int, int]] = {"white": (235, 235, 235)}  # test split only (OOV answers)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "grow", "shrink")
COUNTS: tuple[int, ...] = (1, 2, 3)
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

# (singular present, plural present, gerund) phrasings of each motion; every caption uses one of them.
MOTION_PHRASES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "left": (
        ("moves to the left", "move to the left", "moving to the left"),
        ("slides left", "slide left", "sliding left"),
        ("drifts leftward", "drift leftward", "drifting leftward"),
    ),
    "right": (
        ("moves to the right", "move to the right", "moving to the right"),
        ("slides right", "slide right", "sliding right"),
        ("drifts rightward", "drift rightward", "drifting rightward"),
    ),
    "up": (
        ("moves up", "move up", "moving up"),
        ("rises", "rise", "rising"),
        ("floats upward", "float upward", "floating upward"),
    ),
    "down": (
        ("moves down", "move down", "moving down"),
        ("falls", "fall", "falling"),
        ("sinks downward", "sink downward", "sinking downward"),
    ),
    "grow": (
        ("grows bigger", "grow bigger", "growing bigger"),
        ("gets larger", "get larger", "getting larger"),
        ("expands", "expand", "expanding"),
    ),
    "shrink": (
        ("shrinks", "shrink", "shrinking"),
        ("gets smaller", "get smaller", "getting smaller"),
        ("contracts", "contract", "contracting"),
    ),
}
# Fields: n = count phrase, c = colour, s = shape noun, v = present verb phrase, g = gerund phrase, be = is/are.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{n} {c} {s} {v}",
    "{n} {c} {s} {g}",
    "there {be} {n} {c} {s} {g}",
    "a video of {n} {c} {s} {g}",
    "{n} {s} colored {c} {v}",
    "in this clip {n} {c} {s} {v}",
)
SINGLE_COUNT_PHRASES: tuple[str, ...] = ("a", "one", "a single")
QA_QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": (
        "what color is shown in the video?",
        "what is the color of the shapes?",
        "which color do the shapes have?",
    ),
    "shape": ("what shape is in the video?", "what kind of shape is shown?", "which shape appears in the video?"),
    "count": ("how many shapes are there?", "how many shapes are in the video?", "what is the number of shapes?"),
    "motion": ("how do the shapes move?", "what motion is shown in the video?", "what happens to the shapes?"),
}

# ---- sizes ------------------------------------------------------------------------------------------------------
MSRVTT_CAPTIONS_PER_VIDEO = 10
MSVD_CAPTIONS_PER_VIDEO = 8
WEBVID_NUM_FRAMES = 12  # frames per video stored in the shards (uniform sampling), the default --max_frames
DEFAULT_SPLITS: tuple[int, int, int] = (340, 40, 120)  # train, val, test
SMALL_SPLITS: tuple[int, int, int] = (24, 8, 12)
VAL_FRACTION = 0.08  # split fractions used when --num_videos is given
TEST_FRACTION = 0.24
HELD_OUT_TEST_FRACTION = 0.05  # share of test videos drawn in a held-out colour (at least one)
MAX_DEFAULT_WORKERS = 4
RECALL_KS = (1, 5, 10)  # retrieval recall cut-offs whose chance level the manifest states
CHUNKS_PER_WORKER = 4  # video jobs are handed to each worker in about this many chunks
COMBO_REPAIR_ROUNDS = 10_000

# ---- rendering --------------------------------------------------------------------------------------------------
RADIUS_FRACTION: dict[int, float] = {1: 0.22, 2: 0.16, 3: 0.12}  # shape radius / frame size, by shape count
RADIUS_JITTER = (0.9, 1.0)
SPACING_FACTOR = 2.7  # centre distance between neighbouring shapes, in radii
EXTENT_FACTOR = 1.3  # farthest point of any shape from its centre, in radii (star tips)
SQUARE_HALF_SIDE = 0.9  # in radii
TRIANGLE_CIRCUMRADIUS = 1.25
STAR_OUTER, STAR_INNER, STAR_POINTS = 1.3, 0.55, 5
SCALE_RANGE = (0.55, 1.1)  # radius multiplier at the start / end of "grow" (reversed for "shrink")
TRAVEL_JITTER = 0.05  # random shortening of each end of a translation, as a fraction of the frame size
TRAIL_ALPHAS = (0.5, 0.25)  # opacity of the streak copies, nearest first
TRAIL_STEP = 0.6  # distance between streak copies of a moving shape, in radii
TRAIL_SCALE_STEP = 0.2  # radius change between streak copies of a growing / shrinking shape
BACKGROUND_LEVEL = (20, 70)  # grey level range of the background
TEXTURE_AMPLITUDE = 8.0
TEXTURE_PROBABILITY = 0.5  # share of videos with a light sinusoidal texture instead of a plain background
TEXTURE_MAX_CYCLES = 3
# x264 with macroblock-tree rate control gave different bytes from run to run on a loaded machine (even with one
# thread); without it, repeated runs are byte-identical (checked with 24 concurrent runs).
ENCODER_OPTIONS = {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}

PHRASE_FILE_NAME = "noun_verb.tsv"  # under webvid/ (--phrase_file of --stage1_objective mcq)
TAG_FILE_NAME = "noun_verb_tags.json"  # under webvid/ (--tag_file of --method stoa)
LABEL_MAP_FILE_NAME = "object_label_map.json"  # --labelmap_path of --method stoa; detections under objects/
DISTRACTOR_CLASS = "blob"
DISTRACTOR_PROBABILITY = 0.3  # per frame and distractor kind
DISTRACTOR_SIZE = 0.15  # side of a random distractor box (normalised)
DETECTION_SEED_SALT = 7  # the detection jitter's generator is seeded [spec.seed, salt]
MSRVTT_SPLIT_NAMES = {"train": "train", "val": "validate", "test": "test"}
SPLITS = ("train", "val", "test")
MOTION_DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class VideoFormat:
    """Frame size (square), frame rate and length of every generated video."""

    size: int
    fps: int
    num_frames: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.num_frames / self.fps


DEFAULT_FORMAT = VideoFormat(size=64, fps=8, num_frames=48)
SMALL_FORMAT = VideoFormat(size=32, fps=8, num_frames=48)


@dataclass(frozen=True)
class SceneSpec:
    """One video: its attributes and the seed of its nuisance parameters (position, size jitter, background)."""

    video_id: str
    split: str
    color: str
    shape: str
    motion: str
    count: int
    seed: int

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The shapes' colour."""
        return {**COLORS, **HELD_OUT_COLORS}[self.color]


# ---- rendering --------------------------------------------------------------------------------------------------
def _polygon_mask(vx: np.ndarray, vy: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of pixel centres ``(xx, yy)`` against the vertices ``(vx, vy)``."""
    x1, y1 = vx[:, None, None], vy[:, None, None]
    x2, y2 = np.roll(vx, -1)[:, None, None], np.roll(vy, -1)[:, None, None]
    straddles = (y1 > yy) != (y2 > yy)
    dy = np.where(y2 == y1, 1.0, y2 - y1)
    crosses = straddles & (xx < x1 + (yy - y1) * (x2 - x1) / dy)
    return crosses.sum(axis=0) % 2 == 1


def shape_mask(shape: str, cx: float, cy: float, radius: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Boolean mask of one shape centred at ``(cx, cy)`` (image coordinates, y down) of nominal ``radius``."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= SQUARE_HALF_SIDE * radius
    xs, ys = polygon_vertices(shape, radius)
    return _polygon_mask(cx + xs, cy + ys, xx, yy)


def polygon_vertices(shape: str, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex offsets ``(xs, ys)`` around the centre of a triangle or star of nominal ``radius``."""
    if shape == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        radii = np.full(3, TRIANGLE_CIRCUMRADIUS * radius)
    elif shape == "star":
        angles = np.deg2rad(-90.0 + np.arange(2 * STAR_POINTS) * 180.0 / STAR_POINTS)
        radii = np.where(np.arange(2 * STAR_POINTS) % 2 == 0, STAR_OUTER, STAR_INNER) * radius
    else:
        raise ConfigError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return radii * np.cos(angles), radii * np.sin(angles)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A neutral grey background [H, W, 3] float, plain or with a light sinusoidal texture."""
    level = rng.uniform(*BACKGROUND_LEVEL)
    background = np.full((size, size), level, dtype=np.float64)
    if rng.random() < TEXTURE_PROBABILITY:
        cycles = rng.integers(1, TEXTURE_MAX_CYCLES + 1)
        angle, phase = rng.uniform(0.0, np.pi), rng.uniform(0.0, 2.0 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size]
        waves = cycles * (xx * np.cos(angle) + yy * np.sin(angle)) / size
        background += TEXTURE_AMPLITUDE * np.sin(2.0 * np.pi * waves + phase)
    return np.repeat(background[:, :, None], 3, axis=2)


def _centre_range(size: int, half_extent: float) -> tuple[float, float]:
    """Allowed centre coordinates for an object reaching ``half_extent`` from its centre (the middle if none)."""
    low, high = half_extent + 1.0, size - half_extent - 1.0
    return (low, high) if low <= high else (size / 2.0, size / 2.0)


def _layout(
    spec: SceneSpec, size: int, num_frames: int, rng: np.random.Generator
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Shape radius, per-shape offsets [count, 2], group centres [F, 2] (x, y) and radius scales [F] of a scene."""
    count = spec.count
    radius = RADIUS_FRACTION[count] * size * rng.uniform(*RADIUS_JITTER)
    spacing = SPACING_FACTOR * radius
    # Shapes sit in a line across the direction of travel (a row for up/down and for grow/shrink).
    along_x = spec.motion in ("left", "right")
    steps = (np.arange(count) - (count - 1) / 2.0) * spacing
    offsets = np.stack([np.zeros(count), steps], 1) if along_x else np.stack([steps, np.zeros(count)], 1)
    line_half = (count - 1) / 2.0 * spacing
    times = np.linspace(0.0, 1.0, num_frames)
    if spec.motion in MOTION_DIRECTIONS:
        low, high = _centre_range(size, EXTENT_FACTOR * radius)
        cross = rng.uniform(*_centre_range(size, line_half + EXTENT_FACTOR * radius))
        jitter = TRAVEL_JITTER * size * rng.random(2)
        start, end = low + jitter[0], high - jitter[1]
        if sum(MOTION_DIRECTIONS[spec.motion]) < 0:
            start, end = end, start
        along = start + (end - start) * times
        columns = [along, np.full_like(along, cross)]
        return radius, offsets, np.stack(columns if along_x else columns[::-1], axis=1), np.ones(num_frames)
    half_max = EXTENT_FACTOR * radius * SCALE_RANGE[1]
    centre = [rng.uniform(*_centre_range(size, line_half + half_max)), rng.uniform(*_centre_range(size, half_max))]
    first, last = SCALE_RANGE if spec.motion == "grow" else SCALE_RANGE[::-1]
    return radius, offsets, np.tile(np.asarray(centre), (num_frames, 1)), first + (last - first) * times


def render_video(spec: SceneSpec, fmt: VideoFormat) -> np.ndarray:
    """Draw the scene of ``spec``: uint8 RGB frames [F, H, W, 3] (F = ``fmt.num_frames``, H = W = ``fmt.size``)."""
    rng = np.random.default_rng(spec.seed)
    size = fmt.size
    radius, offsets, centres, scales = _layout(spec, size, fmt.num_frames, rng)
    background = _background(rng, size)
    colour = np.asarray(spec.rgb, dtype=np.float64)
    direction = np.asarray(MOTION_DIRECTIONS.get(spec.motion, (0.0, 0.0)))
    yy, xx = np.mgrid[0:size, 0:size] + 0.5

    def union(centre: np.ndarray, shape_radius: float) -> np.ndarray:
        """Mask of all shapes, each rasterised only inside its bounding box."""
        mask = np.zeros((size, size), dtype=bool)
        reach = EXTENT_FACTOR * shape_radius + 1.0
        for cx, cy in centre + offsets:
            x0, x1 = np.clip([int(cx - reach), int(cx + reach) + 1], 0, size)
            y0, y1 = np.clip([int(cy - reach), int(cy + reach) + 1], 0, size)
            box = (slice(y0, y1), slice(x0, x1))
            mask[box] |= shape_mask(spec.shape, cx, cy, shape_radius, xx[box], yy[box])
        return mask

    frames = np.empty((fmt.num_frames, size, size, 3), dtype=np.uint8)
    for index, (centre, scale) in enumerate(zip(centres, scales, strict=True)):
        frame = background.copy()
        trail = []
        for step in range(1, len(TRAIL_ALPHAS) + 1):
            if spec.motion in MOTION_DIRECTIONS:
                trail.append(union(centre - direction * step * TRAIL_STEP * radius, radius))
            else:
                sign = -1.0 if spec.motion == "grow" else 1.0
                trail.append(union(centre, radius * scale * (1.0 + sign * step * TRAIL_SCALE_STEP)))
        if spec.motion != "grow":  # streak / halo behind the shapes, farthest copy first
            for mask, alpha in reversed(list(zip(trail, TRAIL_ALPHAS, strict=True))):
                frame[mask] = (1.0 - alpha) * frame[mask] + alpha * colour
        frame[union(centre, radius * scale)] = colour
        if spec.motion == "grow":  # a dim core: the smaller past states, fading towards the background
            for mask, alpha in zip(trail, TRAIL_ALPHAS, strict=True):
                frame[mask] = (1.0 - alpha) * frame[mask] + alpha * background[mask]
        frames[index] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return frames


def write_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    """Encode uint8 RGB frames [F, H, W, 3] as H.264 (yuv420p) mp4 at ``path`` (written atomically)."""
    temporary = path.with_name(path.name + ".part")
    with av.open(str(temporary), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = dict(ENCODER_OPTIONS)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    temporary.replace(path)


def _write_video(job: tuple[SceneSpec, VideoFormat, Path]) -> str:
    """Worker: render and encode one video; returns its id."""
    spec, fmt, videos_dir = job
    write_mp4(render_video(spec, fmt), videos_dir / f"{spec.video_id}.mp4", fmt.fps)
    return spec.video_id


# ---- STOA's object detections and POS tags -----------------------------------------------------------------------
def shape_extent(shape: str, radius: float) -> tuple[float, float, float, float]:
    """Bounding box offsets ``(left, top, right, bottom)`` of one shape of nominal ``radius`` around its centre."""
    if shape == "circle":
        return (-radius, -radius, radius, radius)
    if shape == "square":
        half = SQUARE_HALF_SIDE * radius
        return (-half, -half, half, half)
    xs, ys = polygon_vertices(shape, radius)
    return (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))


def shape_boxes(spec: SceneSpec, fmt: VideoFormat) -> np.ndarray:
    """Normalised ``[x1, y1, x2, y2]`` boxes ``[F, count, 4]`` of the scene's shapes in every frame (exact: the
    layout :func:`render_video` draws, clipped to the frame)."""
    radius, offsets, centres, scales = _layout(spec, fmt.size, fmt.num_frames, np.random.default_rng(spec.seed))
    boxes = np.empty((fmt.num_frames, spec.count, 4))
    for f, (centre, scale) in enumerate(zip(centres, scales, strict=True)):
        extent = np.asarray(shape_extent(spec.shape, radius * scale))
        for k, (cx, cy) in enumerate(centre + offsets):
            boxes[f, k] = np.array([cx, cy, cx, cy]) + extent
    return np.clip(boxes / fmt.size, 0.0, 1.0)


def _shifted(box: np.ndarray, dx: float, dy: float) -> list[float]:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    return [float(np.clip(v, 0.0, 1.0)) for v in (x1 + dx * w, y1 + dy * h, x2 + dx * w, y2 + dy * h)]


def detection_entries(spec: SceneSpec, fmt: VideoFormat) -> list[dict[str, Any]]:
    """The detection file of one scene (dataloaders/detections.py format): one object per shape (class = shape
    name, exact box, attribute = colour), plus distractors: in some frames a random small ``blob`` box, a
    same-class duplicate (IoU >= 0.2 with its shape: dropped by the selection) and a ``blob`` box overlapping a shape
    (IoU >= 0.5: dropped)."""
    rng = np.random.default_rng([spec.seed, DETECTION_SEED_SALT])
    frames = []
    for boxes in shape_boxes(spec, fmt):
        objects = [
            {
                "class": spec.shape, "rect": [round(float(v), 6) for v in box],
                "conf": round(float(rng.uniform(0.85, 0.95)), 4), "attributes": [spec.color], "attr_scores": [0.9],
            }
            for box in boxes
        ]  # fmt: skip
        if rng.random() < DISTRACTOR_PROBABILITY:
            x, y = rng.uniform(0.0, 1.0 - DISTRACTOR_SIZE, 2)
            rect = [float(x), float(y), float(x + DISTRACTOR_SIZE), float(y + DISTRACTOR_SIZE)]
            objects.append({"class": DISTRACTOR_CLASS, "rect": [round(v, 6) for v in rect], "conf": 0.3})
        if rng.random() < DISTRACTOR_PROBABILITY:  # duplicate of the first shape, shifted by 10 % of its size
            objects.append({"class": spec.shape, "rect": _shifted(boxes[0], 0.1, 0.1), "conf": 0.5})
        if rng.random() < DISTRACTOR_PROBABILITY:  # another class almost on top of the first shape
            objects.append({"class": DISTRACTOR_CLASS, "rect": _shifted(boxes[0], 0.05, 0.0), "conf": 0.4})
        frames.append({"objects": objects})
    return frames


def _write_detections(output_dir: Path, specs: list[SceneSpec], fmt: VideoFormat) -> None:
    """``objects/{video_id}.json`` of every video and ``object_label_map.json`` (shapes + the distractor class)."""
    folder = output_dir / "objects"
    folder.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        _write_json(folder / f"{spec.video_id}.json", detection_entries(spec, fmt))
    labels = {name: index + 1 for index, name in enumerate((*SHAPES, DISTRACTOR_CLASS))}
    _write_json(output_dir / LABEL_MAP_FILE_NAME, {"label_to_idx": labels})


def word_tags(caption: str) -> list[str]:
    """Universal-POS tag of each word of a templated caption (known by construction of the templates)."""
    shapes = set(SHAPES) | {shape + "s" for shape in SHAPES}
    verbs = {phrase.split()[0] for phrases in MOTION_PHRASES.values() for triple in phrases for phrase in triple}
    verbs.add("colored")
    colours = set(COLORS) | set(HELD_OUT_COLORS)
    fixed = {"a": "DET", "an": "DET", "this": "DET", "the": "DET", "one": "NUM", "two": "NUM", "three": "NUM"}
    fixed |= {"there": "PRON", "is": "AUX", "are": "AUX", "of": "ADP", "in": "ADP", "to": "ADP", "single": "ADJ"}
    tags = []
    for word in caption.split():
        if word in shapes or word in ("video", "clip"):
            tags.append("NOUN")
        elif word in verbs:
            tags.append("VERB")
        elif word in colours:
            tags.append("ADJ")
        else:
            tags.append(fixed.get(word, "ADV"))
    return tags


def caption_token_tags(caption: str, tokenizer: Any) -> list[str]:
    """One tag per CLIP-BPE token of ``caption`` (a word's tag repeated over its sub-tokens)."""
    tags = []
    for word, tag in zip(caption.split(), word_tags(caption), strict=True):
        tags += [tag] * len(tokenizer.tokenize_words(word))
    if len(tags) != len(tokenizer.tokenize_words(caption)):
        raise DataError(f"caption {caption!r}: word-wise BPE differs from the caption's; cannot align its tags")
    return tags


def _write_tag_file(path: Path, captions: list[str]) -> None:
    """STOA's tag file ``{caption index: [tag per CLIP-BPE token]}`` of the WebVid captions."""
    from dataloaders.tokenizer import ClipTokenizer

    tokenizer = ClipTokenizer()
    _write_json(path, {str(index): caption_token_tags(caption, tokenizer) for index, caption in enumerate(captions)})


# ---- attributes, captions, questions ---------------------------------------------------------------------------
def split_sizes(num_videos: int | None, small: bool) -> dict[str, int]:
    """Videos per split: the preset (default or small) or ``num_videos`` cut by VAL_FRACTION / TEST_FRACTION."""
    if num_videos is None:
        return dict(zip(SPLITS, SMALL_SPLITS if small else DEFAULT_SPLITS, strict=True))
    val, test = max(1, round(num_videos * VAL_FRACTION)), max(1, round(num_videos * TEST_FRACTION))
    if num_videos - val - test < 1:
        raise ConfigError(f"--num_videos {num_videos} is too small: every split needs a video; use at least 3")
    return {"train": num_videos - val - test, "val": val, "test": test}


def _balanced_combos(columns: list[list[int]], rng: np.random.Generator) -> np.ndarray:
    """Shuffle each attribute column, then swap entries within columns until every row is distinct.

    Swaps keep each column's multiset, so every attribute value keeps its balanced share of the split.
    Rows stay repeated only when the split is larger than the attribute grid.
    """
    combos = np.stack([rng.permutation(np.asarray(column)) for column in columns], axis=1)
    grid = int(np.prod([len(set(column)) for column in columns]))
    if len(combos) > grid:
        logger.warning("%d videos but only %d attribute combinations: some combinations repeat", len(combos), grid)
        return combos
    for _ in range(COMBO_REPAIR_ROUNDS):
        _, first = np.unique(combos, axis=0, return_index=True)
        if len(first) == len(combos):
            return combos
        for row in np.setdiff1d(np.arange(len(combos)), first):
            column, other = rng.integers(combos.shape[1]), rng.integers(len(combos))
            combos[[row, other], column] = combos[[other, row], column]
    raise RuntimeError(f"could not make {len(combos)} attribute combinations distinct in {COMBO_REPAIR_ROUNDS} rounds")


def _balanced_column(values: Sequence[Any], n: int) -> list[Any]:
    """``n`` entries cycling through ``values``: each value appears floor(n/k) or ceil(n/k) times."""
    return [values[i % len(values)] for i in range(n)]


def make_specs(sizes: dict[str, int], seed: int) -> list[SceneSpec]:
    """Scene specs of every split (ids video0.. in train, val, test order) with balanced, distinct attributes."""
    rng = np.random.default_rng(seed)
    colours = list(COLORS) + list(HELD_OUT_COLORS)
    specs: list[SceneSpec] = []
    for split in SPLITS:
        n = sizes[split]
        held_out = max(1, round(n * HELD_OUT_TEST_FRACTION)) if split == "test" else 0
        colour_column = _balanced_column(range(len(COLORS)), n - held_out)
        colour_column += _balanced_column(range(len(COLORS), len(colours)), held_out)
        columns = [colour_column] + [_balanced_column(range(len(vocab)), n) for vocab in (SHAPES, MOTIONS, COUNTS)]
        for c, s, m, k in _balanced_combos(columns, rng):
            index = len(specs)
            specs.append(
                SceneSpec(
                    video_id=f"video{index}",
                    split=split,
                    color=colours[c],
                    shape=SHAPES[s],
                    motion=MOTIONS[m],
                    count=COUNTS[k],
                    seed=int(np.random.SeedSequence([seed, index]).generate_state(1)[0]),
                )
            )
    return specs


def caption_variants(spec: SceneSpec) -> list[str]:
    """Every templated caption of the scene; each names the colour, shape, count and motion."""
    return [caption for caption, _, _ in caption_variants_with_phrases(spec)]


def caption_phrases(spec: SceneSpec, caption: str) -> tuple[list[str], list[str]]:
    """The exact noun and verb phrases of one of the scene's captions (MCQ's questions, dataloaders/mcq_questions.py):
    nouns ``"{c} {s}"`` (``"{s}"`` and ``"{c}"`` where the template separates them), verbs the motion phrase."""
    for text, nouns, verbs in caption_variants_with_phrases(spec):
        if text == caption:
            return nouns, verbs
    raise ValueError(f"{caption!r} is not a caption of scene {spec.video_id}")


def caption_variants_with_phrases(spec: SceneSpec) -> list[tuple[str, list[str], list[str]]]:
    """``(caption, nouns, verbs)`` for every templated caption of the scene (see :func:`caption_phrases`)."""
    plural = spec.count > 1
    if plural:
        count_phrases: tuple[str, ...] = (COUNT_WORDS[spec.count],)
    else:
        article = "an" if spec.color[0] in "aeiou" else "a"
        count_phrases = tuple(article if phrase == "a" else phrase for phrase in SINGLE_COUNT_PHRASES)
    noun = spec.shape + ("s" if plural else "")
    captions = []
    for template in CAPTION_TEMPLATES:
        for count_phrase in count_phrases:
            for singular, plural_verb, gerund in MOTION_PHRASES[spec.motion]:
                fields = {"n": count_phrase, "c": spec.color, "s": noun, "g": gerund}
                fields |= {"v": plural_verb if plural else singular, "be": "are" if plural else "is"}
                together = "{c} {s}" in template
                nouns = [f"{spec.color} {noun}"] if together else [noun, spec.color]
                verbs = [fields["v"] if "{v}" in template else gerund]
                captions.append((template.format(**fields), nouns, verbs))
    return captions


def sample_captions(spec: SceneSpec, k: int, rng: np.random.Generator) -> list[str]:
    """``k`` distinct captions of the scene (all of them if fewer exist), in random order."""
    variants = caption_variants(spec)
    return [variants[i] for i in rng.permutation(len(variants))[:k]]


def qa_items(spec: SceneSpec, rng: np.random.Generator) -> list[dict[str, str]]:
    """One question per kind (colour, shape, count, motion) with its one-word answer; answer_type is the kind."""
    answers = {"color": spec.color, "shape": spec.shape, "count": COUNT_WORDS[spec.count], "motion": spec.motion}
    return [
        {
            "video_id": spec.video_id,
            "question": str(rng.choice(QA_QUESTIONS[kind])),
            "answer": answer,
            "answer_type": kind,
        }
        for kind, answer in answers.items()
    ]


# ---- writers ----------------------------------------------------------------------------------------------------
def _write_phrase_file(path: Path, specs: list[SceneSpec], entries: list[dict[str, str]]) -> None:
    """MCQ's noun/verb TSV (header, then caption, video id, nouns, verbs) with the exact phrases of each caption."""
    by_id = {spec.video_id: spec for spec in specs}
    lines = ["caption\tpath\tnoun\tverb"]
    for entry in entries:
        nouns, verbs = caption_phrases(by_id[entry["video_id"]], entry["caption"])
        lines.append(format_phrase_row(entry["caption"], entry["video_id"], nouns, verbs))
    _write_lines(path, lines)


def _write_json(path: Path, data: Any, indent: int | None = None) -> None:
    path.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_msrvtt(
    root: Path, specs: list[SceneSpec], captions: dict[str, list[str]], duration: float, rng: np.random.Generator
) -> int:
    """MSR-VTT json + 9k/7k train csv + JSFUSION test csv (one caption per test video); returns the sentence count."""
    root.mkdir(parents=True, exist_ok=True)
    videos, sentences = [], []
    for index, spec in enumerate(specs):
        videos.append(
            {
                "category": SHAPES.index(spec.shape),
                "url": f"synthetic://{spec.video_id}",
                "video_id": spec.video_id,
                "start time": 0.0,
                "end time": duration,
                "split": MSRVTT_SPLIT_NAMES[spec.split],
                "id": index,
            }
        )
        for caption in captions[spec.video_id]:
            sentences.append({"caption": caption, "video_id": spec.video_id, "sen_id": len(sentences)})
    _write_json(root / "MSRVTT_data.json", {"videos": videos, "sentences": sentences})
    by_split = {split: [spec.video_id for spec in specs if spec.split == split] for split in SPLITS}
    _write_csv(root / "MSRVTT_train.9k.csv", ["video_id"], [[v] for v in by_split["train"] + by_split["val"]])
    _write_csv(root / "MSRVTT_train.7k.csv", ["video_id"], [[v] for v in by_split["train"]])
    rows = []
    for i, video_id in enumerate(by_split["test"]):
        options = captions[video_id]
        rows.append([f"ret{i}", f"msr{video_id.removeprefix('video')}", video_id, options[rng.integers(len(options))]])
    _write_csv(root / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"], rows)
    return len(sentences)


def _write_msvd(root: Path, specs: list[SceneSpec], rng: np.random.Generator) -> None:
    """MSVD split lists + raw-captions.pkl (video id -> list of lower-case token lists, pickle protocol 2)."""
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        _write_lines(root / f"{split}_list.txt", [spec.video_id for spec in specs if spec.split == split])
    raw = {spec.video_id: [c.split() for c in sample_captions(spec, MSVD_CAPTIONS_PER_VIDEO, rng)] for spec in specs}
    (root / "raw-captions.pkl").write_bytes(pickle.dumps(raw, protocol=2))


def _majority_accuracy(train: list[dict[str, str]], test: list[dict[str, str]], key: str | None) -> float:
    """Test accuracy (%) of answering the most frequent training answer (per ``answer_type`` when key is set)."""
    groups = Counter(item[key] for item in train) if key else {None: len(train)}
    majority = {
        group: Counter(item["answer"] for item in train if key is None or item[key] == group).most_common(1)[0][0]
        for group in groups
    }
    hits = sum(item["answer"] == majority.get(item[key] if key else None) for item in test)
    return 100.0 * hits / len(test)


def _write_qa(root: Path, specs: list[SceneSpec], rng: np.random.Generator) -> dict[str, Any]:
    """MSRVTT-QA style jsonl per split + train_ans2label.json; returns counts and QA chance levels."""
    root.mkdir(parents=True, exist_ok=True)
    items = {split: [q for spec in specs if spec.split == split for q in qa_items(spec, rng)] for split in SPLITS}
    for split, questions in items.items():
        _write_lines(root / f"{split}.jsonl", [json.dumps(q) for q in questions])
    frequency = Counter(q["answer"] for q in items["train"])
    answers = sorted(frequency, key=lambda answer: (-frequency[answer], answer))
    _write_json(root / "train_ans2label.json", {answer: index for index, answer in enumerate(answers)})
    oov = sum(q["answer"] not in frequency for q in items["test"])
    return {
        "questions": {split: len(questions) for split, questions in items.items()},
        "num_answers": len(answers),
        "majority_answer": answers[0],
        "majority_answer_accuracy": _majority_accuracy(items["train"], items["test"], None),
        "per_type_majority_accuracy": _majority_accuracy(items["train"], items["test"], "answer_type"),
        "test_oov_answers": oov,
        "test_oov_fraction": oov / len(items["test"]),
    }


def _build_shards(
    output_dir: Path, video_dir: Path, video_ids: list[str], encoding: str, num_workers: int, frame_size: int
) -> dict[str, Any]:
    """WebVid-style TFRecord shards of ``video_ids`` via ``shard_build.build_shards``; returns its summary.

    Checks that the index lists exactly ``video_ids``.
    """
    with tempfile.TemporaryDirectory() as scratch:
        video_list = Path(scratch) / "webvid_train_ids.json"
        _write_json(video_list, video_ids)
        options = shard_build.BuildOptions(
            output_dir=output_dir,
            video_dir=video_dir,
            video_list=video_list,
            encoding=encoding,
            num_frames=WEBVID_NUM_FRAMES,
            num_workers=num_workers,
            # jpeg records keep the videos' own size; raw is the published 256 x 256 layout
            frame_size=frame_size if encoding == "jpeg" else RAW_FRAME_SIZE,
        )
        summary = shard_build.build_shards(options)
    logger.info("shard build: %s", summary)
    index_path = output_dir / "path.index"
    indexed = [entry.video_id for entry in read_index(index_path)]
    if sorted(indexed) != sorted(video_ids):
        missing = sorted(set(video_ids) - set(indexed))[:5]
        raise DataError(
            f"{index_path}: lists {len(indexed)} videos, expected the {len(video_ids)} WebVid training videos "
            f"(missing e.g. {missing}); see {output_dir / 'path.skipped.json'} "
            "and re-run the generator"
        )
    return summary


# ---- entry points -----------------------------------------------------------------------------------------------
OUTPUT_SUBDIRS = ("videos", "msrvtt", "msvd", "msrvtt_qa", "webvid", "objects")


def _prepare_output(output_dir: Path) -> None:
    """Create ``output_dir``; clear a previous generation there; refuse a non-empty folder of other files."""
    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / "manifest.json").is_file():
            raise ConfigError(
                f"--output_dir {output_dir} is not empty and holds no synthetic manifest.json; "
                "choose an empty or new folder (a previous synthetic set there is replaced)"
            )
        (output_dir / "manifest.json").unlink()
        for name in OUTPUT_SUBDIRS:
            shutil.rmtree(output_dir / name, ignore_errors=True)
    (output_dir / "videos").mkdir(parents=True, exist_ok=True)


def default_num_workers() -> int:
    """min(MAX_DEFAULT_WORKERS, usable CPUs)."""
    return max(1, min(MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0))))


def _build_manifest(
    specs: list[SceneSpec],
    sizes: dict[str, int],
    fmt: VideoFormat,
    seed: int,
    small: bool,
    encoding: str,
    num_sentences: int,
    qa: dict[str, Any],
    shards: dict[str, Any],
) -> dict[str, Any]:
    """What was generated: counts, video format, vocabularies, chance levels and every video's attributes."""
    num_test = sizes["test"]
    train = sum(spec.split == "train" for spec in specs)
    return {
        "generator": "dataloaders.synthetic",
        "seed": seed,
        "small": small,
        "splits": sizes,
        "num_videos": len(specs),
        "video": {
            "width": fmt.size,
            "height": fmt.size,
            "fps": fmt.fps,
            "num_frames": fmt.num_frames,
            "duration_s": fmt.duration,
            "codec": "h264",
            "pix_fmt": "yuv420p",
            "container": "mp4",
        },
        "captions_per_video": {"msrvtt": MSRVTT_CAPTIONS_PER_VIDEO, "msvd": MSVD_CAPTIONS_PER_VIDEO, "webvid": 1},
        "msrvtt_sentences": num_sentences,
        "webvid": {
            "num_videos": train,
            "num_frames": WEBVID_NUM_FRAMES,
            "encoding": encoding,
            "shards": shards.get("shards"),
            "bytes": shards.get("bytes"),
        },
        "qa": qa,
        "vocabularies": {
            "color": list(COLORS),
            "held_out_color": list(HELD_OUT_COLORS),
            "shape": list(SHAPES),
            "motion": list(MOTIONS),
            "count": [COUNT_WORDS[k] for k in COUNTS],
        },
        "chance": {
            **{f"retrieval_R{k}": min(100.0, 100.0 * k / num_test) for k in RECALL_KS},
            "qa_majority_answer_accuracy": qa["majority_answer_accuracy"],
            "qa_per_type_majority_accuracy": qa["per_type_majority_accuracy"],
        },
        "videos": {
            spec.video_id: {k: v for k, v in asdict(spec).items() if k not in ("video_id", "seed")} for spec in specs
        },
    }


def generate(
    output_dir: str | Path,
    num_videos: int | None = None,
    seed: int = 0,
    small: bool = False,
    encoding: str = "jpeg",
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Write the whole synthetic dataset under ``output_dir`` and return its manifest (also in manifest.json)."""
    output_dir = Path(output_dir)
    if encoding not in ("jpeg", "raw"):
        raise ConfigError(f"--encoding {encoding!r}: expected 'jpeg' or 'raw'")
    workers = default_num_workers() if num_workers is None else max(1, num_workers)
    fmt = SMALL_FORMAT if small else DEFAULT_FORMAT
    sizes = split_sizes(num_videos, small)
    specs = make_specs(sizes, seed)
    _prepare_output(output_dir)
    rng = np.random.default_rng([seed, len(specs)])
    captions = {spec.video_id: sample_captions(spec, MSRVTT_CAPTIONS_PER_VIDEO, rng) for spec in specs}
    num_sentences = _write_msrvtt(output_dir / "msrvtt", specs, captions, fmt.duration, rng)
    _write_msvd(output_dir / "msvd", specs, rng)
    qa = _write_qa(output_dir / "msrvtt_qa", specs, rng)
    train = [spec for spec in specs if spec.split == "train"]
    (output_dir / "webvid").mkdir(parents=True, exist_ok=True)
    webvid = [{"video_id": spec.video_id, "caption": sample_captions(spec, 1, rng)[0]} for spec in train]
    _write_json(output_dir / "webvid" / "frozen_train_labels.json", webvid)
    _write_phrase_file(output_dir / "webvid" / PHRASE_FILE_NAME, train, webvid)
    _write_tag_file(output_dir / "webvid" / TAG_FILE_NAME, [entry["caption"] for entry in webvid])
    _write_detections(output_dir, specs, fmt)

    jobs = [(spec, fmt, output_dir / "videos") for spec in specs]
    with contextlib.ExitStack() as stack:
        if workers == 1:
            written = map(_write_video, jobs)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=get_context("spawn")))
            written = pool.map(_write_video, jobs, chunksize=max(1, len(jobs) // (CHUNKS_PER_WORKER * workers)))
        for _ in tqdm(written, total=len(jobs), desc="synthetic videos", unit="video"):
            pass
    shards = _build_shards(
        output_dir / "webvid" / "tfrecord",
        output_dir / "videos",
        [s.video_id for s in train],
        encoding,
        workers,
        fmt.size,
    )

    manifest = _build_manifest(specs, sizes, fmt, seed, small, encoding, num_sentences, qa, shards)
    _write_json(output_dir / "manifest.json", manifest, indent=1)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: generate the set and print a one-line JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="folder to write (empty, new, or a previous synthetic set)")
    parser.add_argument("--num_videos", type=int, default=None, help="total videos (default: the preset's 500 or 44)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--small", action="store_true", help="unit-test preset: 24/8/12 videos of 32x32 pixels")
    parser.add_argument("--encoding", choices=("jpeg", "raw"), default="jpeg", help="frame encoding in the shards")
    parser.add_argument("--num_workers", type=int, default=None, help="parallel writers (default min(4, CPUs))")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    manifest = generate(args.output_dir, args.num_videos, args.seed, args.small, args.encoding, args.num_workers)
    summary = {
        "output_dir": str(args.output_dir),
        "seconds": round(time.perf_counter() - started, 2),
        "splits": manifest["splits"],
        "msrvtt_sentences": manifest["msrvtt_sentences"],
        "qa_questions": manifest["qa"]["questions"],
        "webvid_videos": manifest["webvid"]["num_videos"],
        "chance": manifest["chance"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
