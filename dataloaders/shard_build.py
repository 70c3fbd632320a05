"""Build indexed TFRecord shards of video frames (DESIGN §3.2) from frame folders or video files; the library behind
``frozen_tfrecord.py``.

``build_shards`` decodes videos (in worker processes when asked), encodes each as a raw or jpeg record
(``dataloaders.tfrecord_format``) and appends it to a ``ShardWriter`` (``dataloaders.tfrecord_io``). Running it
again on the same output folder resumes: complete shards are kept, an interrupted trailing shard (and a torn last
index line) is discarded and its videos redone, videos already indexed are skipped. Unreadable videos are skipped and
listed in ``{output_dir}/{prefix}.skipped.json``. One build at a time may write into a folder: a build holds an
exclusive lock (``fcntl.flock`` on ``{output_dir}/.frozen_tfrecord.lock``) and a second one is refused with a
DataError naming the folder, before it writes anything.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataloaders import video_io
from dataloaders.errors import ConfigError, DataError
from dataloaders.tfrecord_format import DEFAULT_JPEG_QUALITY, RAW_FRAME_SIZE, encode_video_example
from dataloaders.tfrecord_io import DEFAULT_EXAMPLES_PER_SHARD, DEFAULT_INDEX_PREFIX, ShardWriter, resolve_shard

logger = logging.getLogger(__name__)

DEFAULT_NUM_FRAMES = 12
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
LOCK_NAME = ".frozen_tfrecord.lock"  # in the output folder while a build writes there
_LOCK_ATTEMPTS = 3  # a lock file removed by a finishing build between our open and flock is opened again
PREFETCH_PER_WORKER = 4  # decoded videos in flight per worker, so a slow disk never piles up frames in memory


@dataclass(frozen=True)
class VideoJob:
    """One video to encode: where it is, and how."""

    video_id: str
    path: str | None  # None: named in --video_list but not found
    from_frames: bool  # a folder of frames (True) or a video file (False)
    encoding: str
    num_frames: int
    jpeg_quality: int
    frame_size: int


@dataclass(frozen=True)
class JobResult:
    """A worker's answer: the encoded Example payload, or why the video was skipped."""

    video_id: str
    path: str | None
    payload: bytes | None
    error: str | None


def read_video_list(path: str | os.PathLike) -> list[str]:
    """Video ids of a csv (``video_id`` column) or json (list of ids or of ``{"video_id"}``), repeats dropped."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if "video_id" not in (reader.fieldnames or []):
                    raise DataError(f"{path}: no 'video_id' column (header {reader.fieldnames}); add one")
                ids = [row["video_id"] for row in reader]
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of video ids or of {{'video_id': ...}} objects")
            ids = []
            for row, item in enumerate(data):
                video_id = item.get("video_id") if isinstance(item, dict) else item
                if not isinstance(video_id, str) or not video_id:
                    raise DataError(f"{path}, item {row}: no video id in {item!r}; give a string or {{'video_id'}}")
                ids.append(video_id)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the video list ({err})") from err
    return list(dict.fromkeys(ids))


def find_videos(source_dir: Path, from_frames: bool, video_ids: Sequence[str] | None) -> list[tuple[str, str | None]]:
    """``(video_id, path)`` pairs: every sub-folder / video file sorted by name, or the listed ids in list order."""
    if not source_dir.is_dir():
        raise DataError(
            f"{source_dir}: not a folder; pass the folder of {'frame folders' if from_frames else 'videos'}"
        )
    if from_frames:
        found = {p.name: str(p) for p in source_dir.iterdir() if p.is_dir()}
    else:
        found = {}
        for p in sorted(source_dir.iterdir()):
            if p.is_file() and p.suffix.lower() in video_io.DEFAULT_EXTENSIONS:
                found.setdefault(p.stem, str(p))
    order = sorted(found) if video_ids is None else list(video_ids)
    return [(video_id, found.get(video_id)) for video_id in order]


def squash_frames(frames: Iterable[Image.Image], size: int = RAW_FRAME_SIZE) -> np.ndarray:
    """Resize (squash, no crop) RGB frames to size x size, as the published builder does; uint8 [N, size, size, 3]."""
    return np.stack([np.asarray(f.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)) for f in frames])


def read_frame_folder(folder: str, size: int = RAW_FRAME_SIZE) -> np.ndarray:
    """All frames of a folder of images, sorted by file name, squashed to size x size; RGB uint8 [N, size, size, 3]."""
    names = sorted(n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in FRAME_EXTENSIONS)
    if not names:
        raise DataError(f"{folder}: no frames ({', '.join(FRAME_EXTENSIONS)} files)")
    images = []
    for name in names:
        try:
            with Image.open(os.path.join(folder, name)) as img:
                img.load()
                images.append(img.convert("RGB"))
        except OSError as err:
            raise DataError(f"{os.path.join(folder, name)}: unreadable frame ({err})") from err
    return squash_frames(images, size)


def read_video_file(path: str, num_frames: int, size: int = RAW_FRAME_SIZE) -> np.ndarray:
    """``num_frames`` frames sampled uniformly over a video, squashed to size x size; RGB uint8 [N, size, size, 3]."""
    info = video_io.probe_video(path)
    if info.num_frames < 1:
        raise DataError(f"{path}: the video has no frames; re-encode it or drop it from --video_list")
    indices = np.linspace(0, info.num_frames - 1, num=num_frames, dtype=int)
    frames = video_io.decode_frames(path, indices)
    return squash_frames((Image.fromarray(frame) for frame in frames), size)


def prepare(job: VideoJob) -> JobResult:
    """Decode and encode one video (runs in a worker process); failures come back as an error message."""
    if job.path is None:
        return JobResult(job.video_id, None, None, "not found in the input folder")
    try:
        if job.from_frames:
            frames = read_frame_folder(job.path, job.frame_size)
        else:
            frames = read_video_file(job.path, job.num_frames, job.frame_size)
        payload = encode_video_example(frames, job.encoding, job.jpeg_quality)
    except Exception as err:  # any decoder failure skips this video and is reported, never a silent hole
        return JobResult(job.video_id, job.path, None, f"{type(err).__name__}: {err}")
    return JobResult(job.video_id, job.path, payload, None)


def _windows(items: Sequence[VideoJob], size: int) -> Iterator[Sequence[VideoJob]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _results(jobs: Sequence[VideoJob], pool: Pool | None, num_workers: int) -> Iterator[JobResult]:
    """Results in job order; with a pool, a bounded window of videos is decoded ahead of the writer."""
    if pool is None:
        yield from map(prepare, jobs)
        return
    for window in _windows(jobs, num_workers * PREFETCH_PER_WORKER):
        yield from pool.imap(prepare, window)


def _write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[Path]:
    """Hold the exclusive build lock of ``output_dir`` (created if missing); DataError when another build holds it.

    The lock file is removed on exit (while still locked); a build that opened the file before that removal sees, once
    it holds the lock, that the path no longer names its file, and opens it again, so two builds never both proceed.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    lock_path = output_dir / LOCK_NAME
    for _ in range(_LOCK_ATTEMPTS):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataError(
                f"{output_dir}: another shard build is writing into this folder (it holds {lock_path}); wait for it "
                "to finish, or pass another --output_dir"
            ) from None
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the file we locked was removed by a build that just finished; lock the current one
    else:
        raise DataError(f"{output_dir}: could not take the build lock {lock_path}; is another build starting there?")
    try:
        yield lock_path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


@dataclass(frozen=True)
class BuildOptions:
    """What to build: the source (``input_dir`` frame folders or ``video_dir`` video files), where, and how.

    The fields are the flags of ``frozen_tfrecord.py`` (same names and defaults); ``from_namespace`` takes its
    parsed flags.
    """

    output_dir: str | os.PathLike | None
    input_dir: str | os.PathLike | None = None
    video_dir: str | os.PathLike | None = None
    video_list: str | os.PathLike | None = None
    prefix: str = DEFAULT_INDEX_PREFIX
    encoding: str = "raw"
    num_frames: int = DEFAULT_NUM_FRAMES
    num_workers: int = 1
    examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    frame_size: int = RAW_FRAME_SIZE

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> BuildOptions:
        """The options among parsed flags (other flags, such as ``--verify``, are ignored)."""
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


def check_build_options(options: BuildOptions) -> None:
    """Reject option values a build cannot use (ConfigError naming the flag), before anything is written."""
    if options.output_dir is None:
        raise ConfigError("--output_dir is required to build shards")
    if (options.input_dir is None) == (options.video_dir is None):
        raise ConfigError("pass exactly one source: --input_dir (frame folders) or --video_dir (video files)")
    if options.num_frames < 1 or options.examples_per_shard < 1 or not 1 <= options.jpeg_quality <= 100:
        raise ConfigError("--num_frames and --examples_per_shard must be >= 1 and --jpeg_quality within 1..100")
    if options.num_workers < 1:
        raise ConfigError(f"--num_workers {options.num_workers}: at least one process decodes the videos")
    if options.frame_size < 1:
        raise ConfigError(f"--frame_size {options.frame_size}: frames need a side of at least 1 pixel")
    if options.encoding == "raw" and options.frame_size != RAW_FRAME_SIZE:
        raise ConfigError(
            f"--frame_size {options.frame_size} needs --encoding jpeg: raw records are the published layout, always "
            f"{RAW_FRAME_SIZE}x{RAW_FRAME_SIZE}; drop --frame_size or add --encoding jpeg"
        )


def build_shards(options: BuildOptions, on_record: Callable[[int], None] | None = None) -> dict:
    """Build (or resume) the shards described by ``options``; return the summary.

    ``on_record(n)`` is called after the n-th record of this run is written (progress hooks; tests interrupt here).
    Bad flag values raise ConfigError before any file is written; another build holding the folder's lock raises
    DataError, also before anything is written.
    """
    check_build_options(options)
    started = time.time()
    from_frames = options.input_dir is not None
    source_dir = Path(options.input_dir if from_frames else options.video_dir)
    video_ids = read_video_list(options.video_list) if options.video_list else None
    found = find_videos(source_dir, from_frames, video_ids)
    output_dir = Path(options.output_dir)
    with output_lock(output_dir):
        return _build_locked(options, started, from_frames, found, output_dir, on_record)


def _build_locked(
    options: BuildOptions,
    started: float,
    from_frames: bool,
    found: list[tuple[str, str | None]],
    output_dir: Path,
    on_record: Callable[[int], None] | None,
) -> dict:
    """The part of ``build_shards`` that writes, run while the output folder's lock is held."""
    writer = ShardWriter(os.path.join(options.output_dir, options.prefix), options.examples_per_shard)
    resumed = len(writer.entries)
    jobs = [
        VideoJob(
            video_id, path, from_frames, options.encoding, options.num_frames, options.jpeg_quality, options.frame_size
        )
        for video_id, path in found
        if video_id not in writer
    ]
    logger.info("%d videos to encode (%d already indexed) into %s", len(jobs), resumed, writer.index_path)
    skipped: list[dict] = []
    written = 0
    with writer, contextlib.ExitStack() as stack:
        workers = options.num_workers
        pool = stack.enter_context(multiprocessing.get_context().Pool(workers)) if workers > 1 else None
        results = _results(jobs, pool, options.num_workers)
        for result in tqdm(results, total=len(jobs), desc="videos", disable=None):
            if result.payload is None:
                logger.warning("skipping video %s (%s): %s", result.video_id, result.path, result.error)
                skipped.append({"video_id": result.video_id, "path": result.path, "error": result.error})
                continue
            writer.write(result.video_id, result.payload)
            written += 1
            if on_record is not None:
                on_record(written)
    _write_json_atomic(output_dir / f"{options.prefix}.skipped.json", skipped)
    shards = {resolve_shard(entry.shard, output_dir) for entry in writer.entries}
    total_bytes = sum(shard.stat().st_size for shard in shards)
    return {
        "videos_written": written,
        "videos_indexed": len(writer.entries),
        "resumed_from": resumed,
        "skipped": len(skipped),
        "shards": len(shards),
        "bytes": total_bytes,
        "seconds": round(time.time() - started, 3),
    }
