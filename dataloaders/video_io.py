"""Frame decoding and the published frame sampling of CLIP4Clip / MemBridge.

The pipeline of one video is four small pure functions over frame indices followed by one decode:

1. ``published_frame_indices``: ``feature_framerate`` frames per second, as CLIP4Clip's ``RawVideoExtractorCV2``
   (``frame_sampling='fps'``, the default); or ``segment_frames`` over all decoded frames (``segment_middle`` /
   ``segment_random``: Frozen's / MCQ's "uniform" / "rand", one frame per each of ``max_frames`` equal segments);
2. ``slice_frames``: keep ``max_frames`` of them (head / tail / uniform);
3. ``pad_frames``: fill short videos to ``max_frames`` (MemBridge ``repeat`` or CLIP4Clip ``zero``);
4. ``order_frames``: keep / reverse / shuffle the valid frames;

then ``decode_frames`` reads each distinct frame once (decord or PyAV). ``load_video`` runs all of it and
``FileVideoSource`` serves a folder of videos through the ``VideoSource`` protocol of docs/ARCHITECTURE.md.

Frame ``i`` is the ``i``-th frame in presentation order, counted from the demuxed packets (PyAV), so the
count does not trust the container's ``nb_frames`` header.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from dataloaders.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SLICE_CODES: dict[int, str] = {0: "head", 1: "tail", 2: "uniform"}
ORDER_CODES: dict[int, str] = {0: "keep", 1: "reverse", 2: "shuffle"}
SLICE_MODES: tuple[str, ...] = tuple(SLICE_CODES.values())
ORDER_MODES: tuple[str, ...] = tuple(ORDER_CODES.values())
PAD_MODES: tuple[str, ...] = ("repeat", "zero")
FRAME_SAMPLINGS: tuple[str, ...] = ("fps", "segment_middle", "segment_random")
BACKENDS: tuple[str, ...] = ("auto", "decord", "pyav")
# ``auto`` tries these in order. PyAV first: as fast as decord on the real clips (bench/bench_data.py) and exact
# where decord 0.6 is not (a stale frame after a long jump to an AVI's last frame; frames one GOP off after seeks
# in an MPEG-4 AVI with B-frames, see tests/test_video_io.py).
AUTO_BACKEND_ORDER: tuple[str, ...] = ("pyav", "decord")
DEFAULT_EXTENSIONS: tuple[str, ...] = (".mp4", ".webm", ".avi", ".mkv")
DEFAULT_FEATURE_FRAMERATE = 1
DEFAULT_DECODE_THREADS = 1  # one decoder thread: DataLoader workers already run in parallel
RE_ENCODE_HINT = "re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4) or remove it from the annotation list"


@dataclass(frozen=True)
class VideoInfo:
    """Stream facts used by the sampler: exact frame count, frame rate, duration in seconds, frame size."""

    num_frames: int
    fps: float
    duration: float
    height: int
    width: int


# ----------------------------------------------------------------------------------------------- option parsing


def _choice(value: str | int, names: Sequence[str], flag: str, codes: dict[int, str] | None = None) -> str:
    """The name ``value`` stands for (a name, or a published integer code); ConfigError otherwise."""
    codes = codes or {}
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and int(value) in codes:
        return codes[int(value)]
    if isinstance(value, str) and value in names:
        return value
    allowed = ", ".join(f"{name} ({code})" for code, name in codes.items()) or ", ".join(names)
    raise ConfigError(f"{flag}={value!r} is not one of {allowed}: pass one of these")


def _check_max_frames(max_frames: int) -> None:
    if max_frames < 1:
        raise ConfigError(f"max_frames={max_frames} must be >= 1: set --max_frames to a positive number")


# ------------------------------------------------------------------------------------------------ index maths


def published_frame_indices(
    num_frames: int,
    fps: float,
    feature_framerate: float = DEFAULT_FEATURE_FRAMERATE,
    start_sec: float | None = None,
    end_sec: float | None = None,
) -> np.ndarray:
    """Frame indices sampled by CLIP4Clip's ``RawVideoExtractorCV2.video_to_tensor``.

    ``fps`` is truncated to an integer; each second ``sec`` from ``start_sec`` to ``end_sec`` (inclusive; ``end_sec``
    is capped at ``ceil(num_frames / fps)``) contributes frames ``int(sec * fps) + k * (fps // feature_framerate)``
    for the first ``feature_framerate`` values of ``k``; frames past the end are dropped (the published loop stops
    at the first failed read). ``feature_framerate=0`` takes every frame; a rate above ``fps`` (which the
    published code rejects with an assertion) also takes every frame. The result may be empty when the
    segment starts after the video ends. Returns int64 indices in increasing order.
    """
    if num_frames < 1:
        raise DataError(f"the video has {num_frames} frames: {RE_ENCODE_HINT}")
    if not math.isfinite(fps) or int(fps) < 1:
        raise DataError(f"the video reports a frame rate of {fps} fps, which cannot be sampled: {RE_ENCODE_HINT}")
    if feature_framerate < 0 or feature_framerate != int(feature_framerate):
        raise ConfigError(
            f"feature_framerate={feature_framerate} must be a whole number >= 0 (0 = every frame): fix the flag"
        )
    fps_int = int(fps)
    sample_fp = int(feature_framerate) or fps_int
    if sample_fp > fps_int:
        logger.debug("feature_framerate %s exceeds the video's %s fps: taking every frame", sample_fp, fps_int)
        sample_fp = fps_int
    interval = max(fps_int // sample_fp, 1)
    offsets = np.arange(0, fps_int, interval, dtype=np.int64)[:sample_fp]

    total_duration = (num_frames + fps_int - 1) // fps_int
    start = 0.0 if start_sec is None else float(start_sec)
    end = float(total_duration) if end_sec is None else min(float(end_sec), float(total_duration))
    if start < 0 or (end_sec is not None and float(end_sec) < start):
        raise DataError(
            f"segment [{start_sec}, {end_sec}] s is invalid (need 0 <= start <= end): fix the annotation times"
        )
    if start > end:
        return np.zeros(0, dtype=np.int64)
    seconds = start + np.arange(math.floor(end - start) + 1, dtype=np.float64)
    bases = (seconds * fps_int).astype(np.int64)
    indices = (bases[:, None] + offsets[None, :]).reshape(-1)
    return indices[indices < num_frames]


def segment_frames(n: int, max_frames: int, mode: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """Positions (into ``n`` frames) of Frozen-in-Time / MCQ's ``sample_frames``: ``min(max_frames, n)`` equal
    segments with edges ``int(linspace(0, n, k + 1))``, segment ``i`` covering ``[edge_i, edge_{i+1} - 1]``;
    ``segment_middle`` takes ``(first + last) // 2`` of each (their 'uniform'), ``segment_random`` a uniformly random
    frame of each (their 'rand', which draws from ``range(first, last)`` and so never takes a segment's last frame
    and fails on one-frame segments; here every frame of the segment can be drawn). ``segment_random`` needs ``rng``.
    """
    mode = _choice(mode, FRAME_SAMPLINGS[1:], "frame_sampling")
    _check_max_frames(max_frames)
    if n < 1:
        raise ValueError(f"segment_frames needs n >= 1 frames, got {n}")
    count = min(max_frames, n)
    edges = np.linspace(0, n, num=count + 1).astype(np.int64)
    first, last = edges[:-1], edges[1:] - 1
    if mode == "segment_middle":
        return (first + last) // 2
    if rng is None:
        raise ValueError("frame_sampling='segment_random' needs a numpy Generator (rng)")
    return first + rng.integers(0, last - first + 1)


def slice_frames(n: int, max_frames: int, slice_framepos: str | int) -> np.ndarray:
    """Positions (into ``n`` sampled frames) kept when ``n > max_frames``: head, tail or uniform (linspace).

    A video with ``n <= max_frames`` keeps all ``n``; ``pad_frames`` fills the rest. Integer codes 0/1/2 work.
    """
    mode = _choice(slice_framepos, SLICE_MODES, "slice_framepos", SLICE_CODES)
    _check_max_frames(max_frames)
    if n <= max_frames:
        return np.arange(n, dtype=np.int64)
    if mode == "head":
        return np.arange(max_frames, dtype=np.int64)
    if mode == "tail":
        return np.arange(n - max_frames, n, dtype=np.int64)
    return np.linspace(0, n - 1, num=max_frames, dtype=int).astype(np.int64)


def order_frames(idx: np.ndarray, frame_order: str | int, rng: np.random.Generator | None = None) -> np.ndarray:
    """``idx`` kept, reversed or shuffled (codes 0/1/2); ``shuffle`` needs ``rng``."""
    mode = _choice(frame_order, ORDER_MODES, "frame_order", ORDER_CODES)
    idx = np.asarray(idx)
    if mode == "keep":
        return idx.copy()
    if mode == "reverse":
        return idx[::-1].copy()
    if rng is None:
        raise ValueError("frame_order='shuffle' needs a numpy Generator (rng)")
    return rng.permutation(idx)


def pad_frames(n_valid: int, max_frames: int, mode: str | int) -> tuple[np.ndarray, np.ndarray]:
    """Plan for ``n_valid <= max_frames`` frames filling ``max_frames`` slots.

    Returns ``(positions, mask)``: ``positions`` int64 indexes the ``n_valid`` frames for the leading valid slots,
    ``mask`` int64 ``[max_frames]`` is 1 on them. ``repeat`` (MemBridge) spreads the frames over every slot with
    ``linspace`` (so frames repeat and the mask is all ones); ``zero`` (CLIP4Clip) keeps the ``n_valid`` frames
    once and leaves the remaining slots empty (mask 0), to be filled with zero frames.
    """
    mode = _choice(mode, PAD_MODES, "pad_frames")
    _check_max_frames(max_frames)
    if not 1 <= n_valid <= max_frames:
        raise ValueError(f"pad_frames needs 1 <= n_valid <= max_frames, got n_valid={n_valid}, max={max_frames}")
    if mode == "repeat":
        positions = np.linspace(0, n_valid - 1, num=max_frames, dtype=int).astype(np.int64)
    else:
        positions = np.arange(n_valid, dtype=np.int64)
    mask = np.zeros(max_frames, dtype=np.int64)
    mask[: len(positions)] = 1
    return positions, mask


def plan_frames(
    sampled: np.ndarray,
    max_frames: int,
    slice_framepos: str | int = "uniform",
    frame_order: str | int = "keep",
    pad_mode: str | int = "repeat",
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices for the valid slots and the ``[max_frames]`` mask, from the sampled frame indices.

    Slice, then pad, then order the valid slots: MemBridge reorders after its linspace repeat, CLIP4Clip
    reorders the kept frames before zero padding; both are "order the valid slots".
    """
    kept = np.asarray(sampled, dtype=np.int64)[slice_frames(len(sampled), max_frames, slice_framepos)]
    positions, mask = pad_frames(len(kept), max_frames, pad_mode)
    return kept[order_frames(positions, frame_order, rng)], mask


# ---------------------------------------------------------------------------------------------------- decoding


def _check_file(path: str | os.PathLike) -> Path:
    """The path as a Path, or DataError if it is missing, not a file or empty."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"{path}: video file not found: check --features_path (or --webvid_video_dir) / the annotation's video id"
        )
    if not path.is_file():
        raise DataError(f"{path}: is not a file: point the video folder at the video files themselves")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: zero-length video file (an interrupted download?): {RE_ENCODE_HINT}")
    return path


class _PyAVReader:
    """One open PyAV container with the presentation-order timestamp of every frame (from a demux pass)."""

    def __init__(self, path: Path, threads: int = DEFAULT_DECODE_THREADS) -> None:
        self.path = path
        try:
            self.container = av.open(str(path))
        except av.FFmpegError as err:
            raise DataError(f"{path}: cannot be opened as a video ({err}): {RE_ENCODE_HINT}") from err
        try:
            if not self.container.streams.video:
                raise DataError(f"{path}: has no video stream: {RE_ENCODE_HINT}")
            self.stream = self.container.streams.video[0]
            self.stream.codec_context.thread_count = threads
            self.sorted_pts, self.key_ranks = self._index()
        except BaseException:
            self.container.close()
            raise

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted timestamps of every frame and the presentation ranks of the key frames."""
        stamps, keys = [], []
        try:
            for packet in self.container.demux(self.stream):
                stamp = packet.pts if packet.pts is not None else packet.dts
                if packet.size == 0 or stamp is None or packet.is_discard:  # flush / edit-list-dropped packets
                    continue
                stamps.append(stamp)
                keys.append(packet.is_keyframe)
        except av.FFmpegError as err:
            raise DataError(
                f"{self.path}: demuxing failed after {len(stamps)} frames ({err}): {RE_ENCODE_HINT}"
            ) from err
        if not stamps:
            raise DataError(f"{self.path}: the video stream holds no frames: {RE_ENCODE_HINT}")
        stamps_arr = np.asarray(stamps, dtype=np.int64)
        order = np.argsort(stamps_arr, kind="stable")
        ranks = np.empty_like(order)
        ranks[order] = np.arange(len(order))
        key_ranks = np.sort(ranks[np.asarray(keys, dtype=bool)])
        return stamps_arr[order], key_ranks

    def info(self) -> VideoInfo:
        """Frame count from the packets, rate from the stream header."""
        rate = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
        fps = float(rate) if rate else 0.0
        if self.stream.duration is not None and self.stream.time_base is not None:
            duration = float(self.stream.duration * self.stream.time_base)
        elif self.container.duration is not None:
            duration = self.container.duration / av.time_base
        else:
            duration = len(self.sorted_pts) / fps if fps > 0 else 0.0
        ctx = self.stream.codec_context
        return VideoInfo(len(self.sorted_pts), fps, duration, int(ctx.height), int(ctx.width))

    def _rank(self, frame: av.VideoFrame) -> int:
        """Presentation rank of a decoded frame: the nearest packet timestamp."""
        stamp = frame.pts if frame.pts is not None else frame.dts
        if stamp is None:
            raise DataError(f"{self.path}: a decoded frame carries no timestamp: {RE_ENCODE_HINT}")
        pos = int(np.searchsorted(self.sorted_pts, stamp))
        if pos == len(self.sorted_pts) or (pos > 0 and stamp - self.sorted_pts[pos - 1] < self.sorted_pts[pos] - stamp):
            pos -= 1
        return pos

    def _seek(self, rank: int) -> Iterator[av.VideoFrame]:
        """Seek to the key frame at or before frame ``rank``; a fresh frame iterator."""
        try:
            self.container.seek(int(self.sorted_pts[rank]), stream=self.stream, backward=True, any_frame=False)
        except av.FFmpegError as err:
            raise DataError(f"{self.path}: seeking to frame {rank} failed ({err}): {RE_ENCODE_HINT}") from err
        return self.container.decode(self.stream)

    def decode(self, wanted: np.ndarray) -> dict[int, np.ndarray]:
        """RGB frames for the sorted distinct indices ``wanted``.

        Seeks to the key frame before the next wanted frame when one lies ahead of the decoder, then decodes
        forward; the first frame after a seek is placed by its timestamp, the following ones by counting
        (the decoder emits presentation order; counting is also right where an AVI's packed B-frames carry
        scrambled timestamps).
        """
        out: dict[int, np.ndarray] = {}
        wanted_set = {int(i) for i in wanted}
        frames, pos = None, -1
        for target in (int(i) for i in wanted):
            if target in out:
                continue
            key_at = int(np.searchsorted(self.key_ranks, target, side="right")) - 1
            key = int(self.key_ranks[key_at]) if key_at >= 0 else 0
            if frames is None or key > pos:
                frames, pos = self._seek(key), -1
            pos = self._decode_until(frames, target, pos, wanted_set, out)
            if target not in out:  # the seek landed after the target: decode from the first frame instead
                frames = self._seek(0)
                pos = self._decode_until(frames, target, -1, wanted_set, out)
            if target not in out:
                raise DataError(
                    f"{self.path}: frame {target} of {len(self.sorted_pts)} could not be decoded "
                    f"(truncated or corrupt stream): {RE_ENCODE_HINT}"
                )
        return out

    def _decode_until(
        self, frames: Iterator[av.VideoFrame], target: int, pos: int, wanted: set[int], out: dict[int, np.ndarray]
    ) -> int:
        """Decode forward until frame ``target`` (or past it); store wanted frames; return the last position."""
        try:
            for frame in frames:
                pos = self._rank(frame) if pos < 0 else pos + 1
                if pos in wanted and pos not in out:
                    out[pos] = frame.to_ndarray(format="rgb24")
                if pos >= target:
                    break
        except av.FFmpegError as err:
            raise DataError(f"{self.path}: decoding failed near frame {pos + 1} ({err}): {RE_ENCODE_HINT}") from err
        return pos

    def close(self) -> None:
        """Release the container."""
        self.container.close()


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Exact frame count (demuxed packets), frame rate, duration and size of the first video stream."""
    reader = _PyAVReader(_check_file(path))
    try:
        return reader.info()
    finally:
        reader.close()


def _as_indices(path: Path, indices: Sequence[int] | np.ndarray, num_frames: int) -> np.ndarray:
    """Indices as int64, DataError if any lies outside the video."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx) == 0:
        raise ValueError("decode_frames needs at least one frame index")
    bad = idx[(idx < 0) | (idx >= num_frames)]
    if len(bad):
        raise DataError(
            f"{path}: frame index {int(bad[0])} is outside the video's {num_frames} frames: "
            "sample indices from probe_video(path).num_frames"
        )
    return idx


def _decode_pyav(path: Path, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    reader = _PyAVReader(path)
    try:
        idx = _as_indices(path, indices, len(reader.sorted_pts))
        distinct = np.unique(idx)
        frames = reader.decode(distinct)
    finally:
        reader.close()
    return np.stack([frames[int(i)] for i in idx])


def _decode_decord(path: Path, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    import decord  # optional at import time: only this backend needs it

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=DEFAULT_DECODE_THREADS)
    except (decord.DECORDError, RuntimeError) as err:
        raise DataError(f"{path}: decord cannot open it ({str(err).splitlines()[0]}): {RE_ENCODE_HINT}") from err
    idx = _as_indices(path, indices, len(reader))
    distinct, inverse = np.unique(idx, return_inverse=True)
    try:
        frames = reader.get_batch(distinct.tolist()).asnumpy()
    except (decord.DECORDError, RuntimeError) as err:
        raise DataError(
            f"{path}: decord failed to decode frames ({str(err).splitlines()[0]}): {RE_ENCODE_HINT}"
        ) from err
    return frames[inverse.reshape(-1)]


_DECODERS = {"pyav": _decode_pyav, "decord": _decode_decord}


def decode_frames(path: str | os.PathLike, indices: Sequence[int] | np.ndarray, backend: str = "auto") -> np.ndarray:
    """RGB uint8 frames ``[N, H, W, 3]`` at ``indices`` (any order, repeats allowed; each frame decoded once).

    ``backend``: ``pyav`` (exact, key-frame seeking), ``decord`` (``get_batch``) or ``auto`` (the order of
    ``AUTO_BACKEND_ORDER``, falling back to the next on failure). Every failure is a DataError naming the file.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"decode backend {backend!r} is not one of {BACKENDS}: fix the flag")
    path = _check_file(path)
    if backend != "auto":
        return _DECODERS[backend](path, indices)
    errors = []
    for name in AUTO_BACKEND_ORDER:
        try:
            return _DECODERS[name](path, indices)
        except DataError as err:
            errors.append(f"{name}: {err}")
            logger.debug("%s backend failed on %s: %s", name, path, err)
    raise DataError(f"{path}: no decoder could read it; " + " | ".join(errors))


def load_video(
    path: str | os.PathLike,
    max_frames: int,
    feature_framerate: float = DEFAULT_FEATURE_FRAMERATE,
    slice_framepos: str | int = "uniform",
    frame_order: str | int = "keep",
    pad_mode: str | int = "repeat",
    start_sec: float | None = None,
    end_sec: float | None = None,
    rng: np.random.Generator | None = None,
    backend: str = "auto",
    frame_sampling: str = "fps",
) -> tuple[np.ndarray, np.ndarray]:
    """The published frame pipeline of one video: ``(frames uint8 [T, H, W, 3] RGB, mask int64 [T])``.

    ``T = max_frames``; slots with mask 0 (``pad_mode='zero'``) hold all-zero frames. A video that yields no
    frame (unreadable, empty, or a segment after its end) raises DataError, never a zero video. ``rng`` is only
    used by ``frame_order='shuffle'`` and ``frame_sampling='segment_random'`` (a fresh unseeded generator when
    None). ``frame_sampling`` other than ``fps`` splits every frame of the video (or of its segment) into
    ``max_frames`` parts (``segment_frames``; ``feature_framerate`` and ``slice_framepos`` then have no effect).
    """
    path = _check_file(path)
    info = probe_video(path)
    frame_sampling = _choice(frame_sampling, FRAME_SAMPLINGS, "frame_sampling")
    if rng is None:
        rng = np.random.default_rng()
    try:
        rate = feature_framerate if frame_sampling == "fps" else 0  # 0: every frame
        sampled = published_frame_indices(info.num_frames, info.fps, rate, start_sec, end_sec)
        if frame_sampling != "fps" and len(sampled):
            sampled = sampled[segment_frames(len(sampled), max_frames, frame_sampling, rng)]
    except DataError as err:
        raise DataError(f"{path}: {err}") from err
    if len(sampled) == 0:
        raise DataError(
            f"{path}: segment [{start_sec}, {end_sec}] s starts after the video's end ({info.duration:.2f} s, "
            f"{info.num_frames} frames): fix the annotation times or the video"
        )
    wanted, mask = plan_frames(sampled, max_frames, slice_framepos, frame_order, pad_mode, rng)
    decoded = decode_frames(path, wanted, backend)
    frames = np.zeros((max_frames, *decoded.shape[1:]), dtype=np.uint8)
    frames[: len(decoded)] = decoded
    return frames, mask


def _check_contained(video_id: str, video_dir: Path) -> None:
    """DataError unless ``video_dir / video_id`` stays inside ``video_dir`` by its spelling (relative, no ``..``)."""
    parts = video_id.replace("\\", "/").split("/")
    if "\0" in video_id or os.path.isabs(video_id) or ".." in parts:
        raise DataError(
            f"{video_dir}: video id {video_id!r} from the annotation file points outside the video folder (an "
            "absolute path, a '..' part or a NUL byte); video ids must be file names inside --features_path (or "
            "--webvid_video_dir): fix or remove that annotation row"
        )


class FileVideoSource:
    """A folder of videos ``<video_dir>/<video_id><ext>`` read with the published sampling (a ``VideoSource``)."""

    def __init__(
        self,
        video_dir: str | os.PathLike,
        max_frames: int,
        feature_framerate: float = DEFAULT_FEATURE_FRAMERATE,
        slice_framepos: str | int = "uniform",
        frame_order: str | int = "keep",
        pad_mode: str | int = "repeat",
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        backend: str = "auto",
        frame_sampling: str = "fps",
    ) -> None:
        self.video_dir = Path(video_dir)
        if not self.video_dir.is_dir():
            raise DataError(f"{self.video_dir}: video folder not found: check --features_path (or --webvid_video_dir)")
        _check_max_frames(max_frames)
        if backend not in BACKENDS:
            raise ConfigError(f"decode backend {backend!r} is not one of {BACKENDS}: fix the flag")
        self.max_frames = max_frames
        self.feature_framerate = feature_framerate
        self.slice_framepos = _choice(slice_framepos, SLICE_MODES, "slice_framepos", SLICE_CODES)
        self.frame_order = _choice(frame_order, ORDER_MODES, "frame_order", ORDER_CODES)
        self.pad_mode = _choice(pad_mode, PAD_MODES, "pad_frames")
        self.frame_sampling = _choice(frame_sampling, FRAME_SAMPLINGS, "frame_sampling")
        self.extensions = tuple(extensions)
        self.backend = backend

    def path_for(self, video_id: str) -> Path:
        """``video_dir/video_id`` when the id already names a file (DiDeMo ids carry their extension), else the first
        existing ``video_dir/video_id + ext`` over ``extensions``; DataError if none exists.

        Ids come from annotation files: an absolute id, one with a ``..`` part or a NUL byte is a DataError (a
        training set skips it like an unreadable video), so no id reaches a file outside ``video_dir``. Ids may
        name sub-folders (LSMDC movie folders); links placed inside ``video_dir`` are followed as the user set them.
        """
        _check_contained(video_id, self.video_dir)
        exact = self.video_dir / video_id
        if exact.is_file():
            return exact
        for ext in self.extensions:
            candidate = self.video_dir / f"{video_id}{ext}"
            if candidate.is_file():
                return candidate
        raise DataError(
            f"{self.video_dir}: no video for id {video_id!r} (looked for {', '.join(self.extensions)}): "
            "check --features_path (or --webvid_video_dir) and that the id in the annotation file matches a file name"
        )

    def load(
        self,
        video_id: str,
        start: float | None = None,
        end: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(frames uint8 [T, H, W, 3] RGB, mask int64 [T])`` of ``video_id`` (or of its segment [start, end] s)."""
        return load_video(
            self.path_for(video_id),
            self.max_frames,
            self.feature_framerate,
            self.slice_framepos,
            self.frame_order,
            self.pad_mode,
            start_sec=start,
            end_sec=end,
            rng=rng,
            backend=self.backend,
            frame_sampling=self.frame_sampling,
        )
