"""Build indexed TFRecord shards of video frames (DESIGN §3.2), or verify a build.

Published input (one folder of extracted frames per video, frames sorted by file name), raw records exactly as the
published code writes them (``path-00000.tfrecord`` ... and ``path.index`` in the output folder)::

    python frozen_tfrecord.py --input_dir extracted_frames --output_dir WebVid_TFRecord

Straight from video files (12 uniformly sampled frames each), in the order of the caption file, as JPEG records,
decoding in 8 processes::

    python frozen_tfrecord.py --video_dir webvid_videos --video_list frozen_train_labels.json \\
        --output_dir WebVid_TFRecord --encoding jpeg --num_workers 8

Small frames for small models (JPEG records only; raw records are the published 256 x 256 layout): squash frames to
64 x 64 instead of 256 x 256, which shrinks the shards and the per-item decode cost::

    python frozen_tfrecord.py --video_dir webvid_videos --output_dir WebVid_TFRecord_64 --encoding jpeg \\
        --frame_size 64

Check every record of a build (framing, both CRCs, decoding); the last printed line is a JSON summary and the exit
code is 1 when any record is bad::

    python frozen_tfrecord.py --verify WebVid_TFRecord/path.index

Running a build again on the same ``--output_dir`` resumes it: complete shards are kept, an interrupted trailing
shard is discarded and its videos redone, videos already indexed are skipped. Unreadable videos are skipped and
listed in ``{output_dir}/{prefix}.skipped.json``. A build ends by printing a JSON summary line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataloaders import video_io
from dataloaders.errors import ConfigError, DataError, MemBridgeError
from dataloaders.tfrecord_io import (
    DEFAULT_EXAMPLES_PER_SHARD,
    DEFAULT_INDEX_PREFIX,
    DEFAULT_JPEG_QUALITY,
    ENCODINGS,
    RAW_FRAME_SIZE,
    ShardWriter,
    encode_video_example,
    resolve_shard,
    verify_index,
)

logger = logging.getLogger(__name__)

DEFAULT_NUM_FRAMES = 12
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
EXIT_BAD_INPUT = 2  # the build could not start or go on (bad flags, missing input folder, bad video list or index)
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


def check_build_args(args: argparse.Namespace) -> None:
    """Reject flag values a build cannot use (ConfigError naming the flag), before anything is written."""
    if args.output_dir is None:
        raise ConfigError("--output_dir is required to build shards")
    if args.num_frames < 1 or args.examples_per_shard < 1 or not 1 <= args.jpeg_quality <= 100:
        raise ConfigError("--num_frames and --examples_per_shard must be >= 1 and --jpeg_quality within 1..100")
    if args.frame_size < 1:
        raise ConfigError(f"--frame_size {args.frame_size}: frames need a side of at least 1 pixel")
    if args.encoding == "raw" and args.frame_size != RAW_FRAME_SIZE:
        raise ConfigError(
            f"--frame_size {args.frame_size} needs --encoding jpeg: raw records are the published layout, always "
            f"{RAW_FRAME_SIZE}x{RAW_FRAME_SIZE}; drop --frame_size or add --encoding jpeg"
        )


def build_shards(args: argparse.Namespace, on_record: Callable[[int], None] | None = None) -> dict:
    """Build (or resume) the shards described by parsed flags; return the summary.

    ``on_record(n)`` is called after the n-th record of this run is written (progress hooks; tests interrupt here).
    Bad flag values raise ConfigError before any file is written.
    """
    check_build_args(args)
    started = time.time()
    from_frames = args.input_dir is not None
    source_dir = Path(args.input_dir if from_frames else args.video_dir)
    video_ids = read_video_list(args.video_list) if args.video_list else None
    found = find_videos(source_dir, from_frames, video_ids)
    output_dir = Path(args.output_dir)
    writer = ShardWriter(os.path.join(args.output_dir, args.prefix), args.examples_per_shard)
    resumed = len(writer.entries)
    jobs = [
        VideoJob(video_id, path, from_frames, args.encoding, args.num_frames, args.jpeg_quality, args.frame_size)
        for video_id, path in found
        if video_id not in writer
    ]
    logger.info("%d videos to encode (%d already indexed) into %s", len(jobs), resumed, writer.index_path)
    skipped: list[dict] = []
    written = 0
    with writer, contextlib.ExitStack() as stack:
        pool = (
            stack.enter_context(multiprocessing.get_context().Pool(args.num_workers)) if args.num_workers > 1 else None
        )
        results = _results(jobs, pool, args.num_workers)
        for result in tqdm(results, total=len(jobs), desc="videos", disable=None):
            if result.payload is None:
                logger.warning("skipping video %s (%s): %s", result.video_id, result.path, result.error)
                skipped.append({"video_id": result.video_id, "path": result.path, "error": result.error})
                continue
            writer.write(result.video_id, result.payload)
            written += 1
            if on_record is not None:
                on_record(written)
    _write_json_atomic(output_dir / f"{args.prefix}.skipped.json", skipped)
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


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input_dir", help="folder of frame folders (one per video; jpg/png frames sorted by name)")
    source.add_argument("--video_dir", help="folder of video files (the file stem is the video id)")
    source.add_argument("--verify", metavar="INDEX", help="check every record of this index and print a JSON summary")
    parser.add_argument("--video_list", help="csv with a video_id column, or json list of ids / {'video_id'} objects")
    parser.add_argument("--output_dir", help="where the shards, the index and the skipped-video report go")
    parser.add_argument("--prefix", default=DEFAULT_INDEX_PREFIX, help="shard/index name prefix (path -> path.index)")
    parser.add_argument("--encoding", choices=ENCODINGS, default="raw", help="raw (published BGR arrays) or jpeg")
    parser.add_argument("--num_frames", type=int, default=DEFAULT_NUM_FRAMES, help="frames per video (--video_dir)")
    parser.add_argument("--num_workers", type=int, default=1, help="decoding processes (the writer is one process)")
    parser.add_argument("--examples_per_shard", type=int, default=DEFAULT_EXAMPLES_PER_SHARD, help="records per shard")
    parser.add_argument(
        "--jpeg_quality", type=int, default=DEFAULT_JPEG_QUALITY, help="JPEG quality (1-100; PIL advises <= 95)"
    )
    parser.add_argument(
        "--frame_size",
        type=int,
        default=RAW_FRAME_SIZE,
        help=f"frames are squashed to N x N (default {RAW_FRAME_SIZE}, the published size; other sizes need "
        "--encoding jpeg)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Build or verify shards; return the exit code (1: --verify found a bad record, 2: unusable input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verify:
        summary = verify_index(args.verify)
        for error in summary["errors"]:
            logger.error("%s", error["error"])
        print(json.dumps(summary))
        return 1 if summary["errors"] else 0
    try:
        summary = build_shards(args)
    except MemBridgeError as err:
        logger.error("%s", err)
        return EXIT_BAD_INPUT
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
