"""Data-pipeline throughput: clips/s from mp4 files vs raw and JPEG TFRecord shards, and the shards' size.

    python bench/bench_data.py                                        # the two real mmaction2 mp4s x 10 copies
    python bench/bench_data.py --videos DIR --copies 20 --repeat 3 --workdir /tmp

Every ``*.mp4`` of ``--videos`` is copied ``--copies`` times into a temporary folder under ``--workdir``; the copies
are turned into raw (published BGR arrays, 12 frames of 256x256) and JPEG shards by ``frozen_tfrecord.main``: ``jpeg``
at the published 256x256, ``jpeg224`` built at the model's input size (``--encoding jpeg --frame_size 224``), so that
the loader's resize is skipped (the squash to 224 happens once, at build time, instead of a 256 squash at build time
plus a 256 -> 224 resize every epoch; the frames differ from ``jpeg``'s by that one resampling step). Each
mode then loads every video as uint8 frames and turns them into CLIP-ready float clips ``(12, 3, 224, 224)`` with
``ClipTransform`` (``tensor``: batched, the default; ``pil``: the published pipeline, bit-exact), single process,
one torch thread, one decoder thread, page cache warm. The modes:

- ``mp4-pyav`` / ``mp4-decord``: ``FileVideoSource`` with the published 1-fps sampling (uniform slice);
- ``raw`` / ``jpeg`` / ``jpeg224``: ``ShardVideoSource`` over the shards' index.

All modes are timed side by side in one child process: each of ``--repeat`` passes visits every video and, per
video, every mode and transform in turn (after one warm-up clip per mode), so the other load on the machine falls
on all of them alike; a stage's time for a video is its median over the passes. ``clips_per_s`` of a transform is
``1 / (load time + transform time)`` per clip, ``cpu_clips_per_s`` the same in process CPU time, the check that
does not depend on the machine's other load (``load_average_1_5_15min_start`` / ``load_average_1_5_15min`` say how
busy it was). Peak resident memory (``ru_maxrss``) is then taken per mode in its own child process (one pass):
``peak_rss_after_imports_MiB`` is the part taken by the interpreter and its libraries (torch alone maps ~0.5 GiB),
``pipeline_rss_MiB`` the growth after it.

The last stdout line is one JSON object, including the targets (wall clock, and CPU time): shards (raw and JPEG) at
least 5x the clips/s of the best mp4 decoder with the published PIL transform on both sides, at least 20x with the
default tensor transform on both sides, JPEG shards at least 8x smaller than raw ones.
``default_transform_shards_vs_published_mp4_pipeline`` is shards + tensor over mp4 + PIL (the published pipeline
end to end). ``bytes_per_video`` counts whole shard files (record framing included).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import frozen_tfrecord  # noqa: E402
from dataloaders.tfrecord_format import DEFAULT_JPEG_QUALITY  # noqa: E402
from dataloaders.tfrecord_io import DEFAULT_INDEX_PREFIX, ShardReader, ShardVideoSource  # noqa: E402
from dataloaders.transforms import TRANSFORM_BACKENDS, ClipTransform  # noqa: E402
from dataloaders.video_io import DEFAULT_DECODE_THREADS, FileVideoSource  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_VIDEOS = REPO.parent / "shared" / "realdata" / "mmaction2-testdata"
VIDEO_GLOB = "*.mp4"
DEFAULT_COPIES = 10
DEFAULT_REPEAT = 2
MAX_FRAMES = 12
IMAGE_SIZE = 224
FEATURE_FRAMERATE = 1
SLICE_FRAMEPOS = "uniform"
DECODERS = ("pyav", "decord")
SHARD_MODES = {"raw": ("raw", None), "jpeg": ("jpeg", None), "jpeg224": ("jpeg", 224)}  # name: (encoding, frame side)
DEFAULT_TRANSFORM = "tensor"
PUBLISHED_TRANSFORM = "pil"
TORCH_THREADS = 1  # single process, single thread: the cost of one DataLoader worker
BUILD_WORKERS = 1
SHARD_SPEEDUP_TARGET = 5.0  # the first issue, with the published PIL transform on both sides
FAST_SPEEDUP_TARGET = 20.0  # the performance issue, with the default (tensor) transform on both sides
JPEG_SIZE_TARGET = 8.0
PIXEL_MAX = 255.0
KIB_PER_MIB = 1024  # ru_maxrss is in KiB on Linux
DIGITS = 4
DIFF_DIGITS = 6


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB, 1)


def mode_name(source: str, decoder: str | None) -> str:
    """Key of a mode in the JSON: ``mp4-pyav``, ``raw``..."""
    return f"{source}-{decoder}" if decoder else source


# --------------------------------------------------------------------------------------------------- child process


def open_source(source: str, path: Path, decoder: str | None) -> tuple[FileVideoSource | ShardVideoSource, list[str]]:
    """The ``VideoSource`` of a mode and its video ids."""
    if source == "mp4":
        video_source = FileVideoSource(path, MAX_FRAMES, FEATURE_FRAMERATE, SLICE_FRAMEPOS, backend=decoder or "auto")
        return video_source, sorted(p.stem for p in path.glob(VIDEO_GLOB))
    shard_source = ShardVideoSource(path / f"{DEFAULT_INDEX_PREFIX}.index", MAX_FRAMES, SLICE_FRAMEPOS)
    return shard_source, shard_source.video_ids


def load_and_transform(source: FileVideoSource | ShardVideoSource, video_id: str, transforms: dict) -> None:
    """One clip through every transform, checking the contract (warm-up and memory passes)."""
    frames, mask = source.load(video_id)
    expected = (MAX_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE)
    for transform in transforms.values():
        clip = transform(frames, mask)
        if tuple(clip.shape) != expected or clip.dtype != torch.float32:
            raise RuntimeError(f"{video_id}: expected a float32 {expected} clip, got {clip.dtype} {tuple(clip.shape)}")


def memory_mode(source: str, path: Path, decoder: str | None) -> dict:
    """Peak resident memory of one mode: every video loaded and transformed once (runs in its own child)."""
    rss_after_imports = peak_rss_mib()
    torch.set_num_threads(TORCH_THREADS)
    video_source, video_ids = open_source(source, path, decoder)
    transforms = {name: ClipTransform(IMAGE_SIZE, backend=name) for name in TRANSFORM_BACKENDS}
    for video_id in video_ids:
        load_and_transform(video_source, video_id, transforms)
    return {
        "peak_rss_after_imports_MiB": rss_after_imports,
        "peak_rss_MiB": peak_rss_mib(),
        "pipeline_rss_MiB": round(peak_rss_mib() - rss_after_imports, 1),
    }


def timing(paths: dict[str, Path], repeat: int) -> dict:
    """Time ``load`` and each transform of every mode, interleaved (runs in one child process).

    Each pass visits every video and, for each video, every mode in turn, so the machine's other load falls on all
    modes alike; a mode's time for a video is the median over passes, its total the sum over videos.
    """
    torch.set_num_threads(TORCH_THREADS)
    sources = {}
    for name, path in paths.items():
        source, decoder = name.split("-", 1) if "-" in name else (name, None)
        sources[name] = open_source(source, path, decoder)
    transforms = {name: ClipTransform(IMAGE_SIZE, backend=name) for name in TRANSFORM_BACKENDS}
    for video_source, video_ids in sources.values():  # warm-up: lazy imports, codec and allocator set-up
        load_and_transform(video_source, video_ids[0], transforms)
    n = len(next(iter(sources.values()))[1])
    stages = 1 + len(transforms)
    wall = {name: np.zeros((repeat, n, stages)) for name in sources}  # [pass, video, (load, *transforms)] seconds
    cpu = {name: np.zeros((repeat, n, stages)) for name in sources}  # the same in process CPU seconds
    for p in range(repeat):
        for v in range(n):
            for name, (video_source, video_ids) in sources.items():
                c0, t0 = time.process_time(), time.perf_counter()
                frames, mask = video_source.load(video_ids[v])
                wall[name][p, v, 0], cpu[name][p, v, 0] = time.perf_counter() - t0, time.process_time() - c0
                for i, transform in enumerate(transforms.values(), start=1):
                    c0, t0 = time.process_time(), time.perf_counter()
                    transform(frames, mask)
                    wall[name][p, v, i], cpu[name][p, v, i] = time.perf_counter() - t0, time.process_time() - c0
    modes = {}
    for name in sources:
        median = np.median(wall[name], axis=0).sum(axis=0)
        mean = wall[name].mean(axis=0).sum(axis=0)
        median_cpu = np.median(cpu[name], axis=0).sum(axis=0)
        modes[name] = {
            "videos": n,
            "load_only_clips_per_s": round(n / median[0], DIGITS),
            "load_only_cpu_clips_per_s": round(n / median_cpu[0], DIGITS),
            "transforms": {
                transform: {
                    "clips_per_s": round(n / (median[0] + median[i]), DIGITS),
                    "clips_per_s_mean": round(n / (mean[0] + mean[i]), DIGITS),
                    "cpu_clips_per_s": round(n / (median_cpu[0] + median_cpu[i]), DIGITS),
                    "transform_only_clips_per_s": round(n / median[i], DIGITS),
                    "ms_per_clip": round(1000 * (median[0] + median[i]) / n, 3),
                }
                for i, transform in enumerate(transforms, start=1)
            },
        }
    return modes


def in_child(args: list[str]) -> dict:
    """This script's hidden ``--child`` in a fresh interpreter (its own peak memory); its last stdout line."""
    cmd = [sys.executable, __file__, "--child", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(TORCH_THREADS), "MKL_NUM_THREADS": str(TORCH_THREADS)}
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------- parent process


def replicate_videos(sources: list[Path], copies: int, target: Path) -> None:
    """Copy every source video ``copies`` times into ``target`` as ``{stem}_{copy:03d}{suffix}``."""
    target.mkdir(parents=True)
    for src in sources:
        for copy in range(copies):
            shutil.copyfile(src, target / f"{src.stem}_{copy:03d}{src.suffix}")


def build_shards(video_dir: Path, output_dir: Path, encoding: str, frame_size: int | None = None) -> dict:
    """Shards of every video in ``video_dir`` via ``frozen_tfrecord.main``; its JSON summary."""
    captured = io.StringIO()
    argv = ["--video_dir", str(video_dir), "--output_dir", str(output_dir), "--encoding", encoding]
    if frame_size is not None:
        argv += ["--frame_size", str(frame_size)]
    argv += ["--num_frames", str(MAX_FRAMES), "--num_workers", str(BUILD_WORKERS)]
    with contextlib.redirect_stdout(captured):
        code = frozen_tfrecord.main(argv)
    if code != 0:
        raise RuntimeError(f"frozen_tfrecord.main({argv}) exited with {code}")
    summary = json.loads(captured.getvalue().strip().splitlines()[-1])
    if summary["skipped"]:
        raise RuntimeError(f"{output_dir}: {summary['skipped']} videos could not be encoded; see the log above")
    return summary


def jpeg_psnr(raw_dir: Path, jpeg_dir: Path) -> float:
    """PSNR (dB) of the JPEG shards' frames against the raw shards' (lossless) frames, over all videos."""
    raw = ShardReader(raw_dir / f"{DEFAULT_INDEX_PREFIX}.index")
    jpeg = ShardReader(jpeg_dir / f"{DEFAULT_INDEX_PREFIX}.index")
    squared_error = count = 0.0
    for video_id in raw.video_ids:
        diff = raw.read(video_id).astype(np.float64) - jpeg.read(video_id).astype(np.float64)
        squared_error += float(np.square(diff).sum())
        count += diff.size
    raw.close()
    jpeg.close()
    return 10 * math.log10(PIXEL_MAX**2 / (squared_error / count))


def transform_agreement(video_dir: Path) -> dict:
    """Largest and mean gap between the tensor and PIL transforms on one mp4 clip (CLIP-normalised units)."""
    video_id = sorted(p.stem for p in video_dir.glob(VIDEO_GLOB))[0]
    frames, mask = FileVideoSource(video_dir, MAX_FRAMES, FEATURE_FRAMERATE, SLICE_FRAMEPOS).load(video_id)
    gap = (ClipTransform(IMAGE_SIZE, "tensor")(frames, mask) - ClipTransform(IMAGE_SIZE, "pil")(frames, mask)).abs()
    return {
        "max_abs_diff": round(float(gap.max()), DIFF_DIGITS),
        "mean_abs_diff": round(float(gap.mean()), DIFF_DIGITS),
    }


def speedups(modes: dict[str, dict], value: Callable[[dict], float]) -> dict:
    """Throughput ``value(mode)`` of each shard encoding over that of the best mp4 decoder."""
    mp4 = {decoder: value(modes[mode_name("mp4", decoder)]) for decoder in DECODERS}
    best = max(mp4, key=mp4.get)
    out: dict = {"best_mp4_decoder": best}
    for shard_mode in SHARD_MODES:
        out[shard_mode] = round(value(modes[shard_mode]) / mp4[best], 2)
    return out


def end_to_end(transform: str, key: str) -> Callable[[dict], float]:
    """Reads ``key`` of one transform backend out of a mode's result."""
    return lambda mode: mode["transforms"][transform][key]


def targets(speedup: dict, size_ratio: float) -> dict:
    """The issues' targets as booleans: 5x with the published transform, 20x with the default one, 8x smaller."""
    published, fast = speedup[PUBLISHED_TRANSFORM], speedup[DEFAULT_TRANSFORM]
    return {
        "raw_shards_5x_faster_than_mp4_pil": published["raw"] >= SHARD_SPEEDUP_TARGET,
        "jpeg_shards_5x_faster_than_mp4_pil": published["jpeg"] >= SHARD_SPEEDUP_TARGET,
        "raw_shards_20x_faster_than_mp4_tensor": fast["raw"] >= FAST_SPEEDUP_TARGET,
        "jpeg_shards_20x_faster_than_mp4_tensor": fast["jpeg"] >= FAST_SPEEDUP_TARGET,
        "jpeg224_shards_20x_faster_than_mp4_tensor": fast["jpeg224"] >= FAST_SPEEDUP_TARGET,
        "jpeg_8x_smaller_than_raw": size_ratio >= JPEG_SIZE_TARGET,
    }


def published_pipeline_speedup(modes: dict[str, dict]) -> dict:
    """Shards with the default transform over the best mp4 decoder with the published PIL transform."""
    mp4 = {d: end_to_end(PUBLISHED_TRANSFORM, "clips_per_s")(modes[mode_name("mp4", d)]) for d in DECODERS}
    best = max(mp4, key=mp4.get)
    out: dict = {"best_mp4_decoder": best}
    for shard_mode in SHARD_MODES:
        out[shard_mode] = round(modes[shard_mode]["transforms"][DEFAULT_TRANSFORM]["clips_per_s"] / mp4[best], 2)
    return out


def run_benchmark(videos: Path, copies: int, repeat: int, workdir: Path | None) -> dict:
    """Build the temporary data set, measure every mode, and assemble the JSON report."""
    sources = sorted(videos.glob(VIDEO_GLOB))
    if not sources:
        raise SystemExit(f"{videos}: no {VIDEO_GLOB} files; pass --videos with a folder of mp4 videos")
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_data_", dir=workdir) as tmp:
        video_dir = Path(tmp) / "videos"
        replicate_videos(sources, copies, video_dir)
        builds = {}
        for shard_mode, (encoding, frame_size) in SHARD_MODES.items():
            logger.info("building %s shards", shard_mode)
            builds[shard_mode] = build_shards(video_dir, Path(tmp) / shard_mode, encoding, frame_size)
        plan = [("mp4", decoder) for decoder in DECODERS] + [(shard_mode, None) for shard_mode in SHARD_MODES]
        paths = {
            mode_name(source, decoder): video_dir if source == "mp4" else Path(tmp) / source for source, decoder in plan
        }
        logger.info("timing %s, interleaved, %d passes", ", ".join(paths), repeat)
        modes = in_child(["timing", json.dumps({name: str(path) for name, path in paths.items()}), str(repeat)])
        for source, decoder in plan:
            name = mode_name(source, decoder)
            logger.info("peak memory of %s", name)
            modes[name].update(in_child(["memory", json.dumps([source, str(paths[name]), decoder]), "0"]))
        psnr = jpeg_psnr(Path(tmp) / "raw", Path(tmp) / "jpeg")
        agreement = transform_agreement(video_dir)
    n_videos = len(sources) * copies
    bytes_per_video = {"mp4": round(sum(p.stat().st_size for p in sources) / len(sources))}
    bytes_per_video.update({enc: round(build["bytes"] / build["videos_indexed"]) for enc, build in builds.items()})
    size_ratio = bytes_per_video["raw"] / bytes_per_video["jpeg"]
    speedup = {name: speedups(modes, end_to_end(name, "clips_per_s")) for name in TRANSFORM_BACKENDS}
    speedup_cpu = {name: speedups(modes, end_to_end(name, "cpu_clips_per_s")) for name in TRANSFORM_BACKENDS}
    return {
        "bench": "data_pipeline",
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "load_average_1_5_15min_start": [round(load, 2) for load in load_at_start],
        "load_average_1_5_15min": [round(load, 2) for load in os.getloadavg()],
        "source_videos": [str(p) for p in sources],
        "videos": n_videos,
        "copies": copies,
        "repeat": repeat,
        "clip_shape": [MAX_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE],
        "sampling": f"{FEATURE_FRAMERATE} fps, slice {SLICE_FRAMEPOS}, max_frames {MAX_FRAMES}",
        "torch_threads": TORCH_THREADS,
        "decode_threads": DEFAULT_DECODE_THREADS,
        "default_transform": DEFAULT_TRANSFORM,
        "modes": modes,
        "speedup_vs_best_mp4": speedup,
        "default_transform_shards_vs_published_mp4_pipeline": published_pipeline_speedup(modes),
        "cpu_speedup_vs_best_mp4": speedup_cpu,
        "load_only_speedup_vs_best_mp4": speedups(modes, lambda mode: mode["load_only_clips_per_s"]),
        "bytes_per_video": bytes_per_video,
        "raw_over_jpeg_bytes": round(size_ratio, 2),
        "jpeg_quality": DEFAULT_JPEG_QUALITY,
        "jpeg_vs_raw_psnr_dB": round(psnr, 2),
        "tensor_vs_pil_transform": agreement,
        "build_s_per_video": {enc: round(build["seconds"] / n_videos, DIGITS) for enc, build in builds.items()},
        "targets": targets(speedup, size_ratio),
        "targets_cpu_time": targets(speedup_cpu, size_ratio),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (or, with the hidden ``--child``, one mode) and print its JSON on the last line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, default=DEFAULT_VIDEOS, help=f"folder of source videos ({VIDEO_GLOB})")
    parser.add_argument("--copies", type=int, default=DEFAULT_COPIES, help="copies of each source video")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="timed passes over all videos per mode")
    parser.add_argument("--workdir", type=Path, help="where the temporary videos and shards go (default: system tmp)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SPEC", "REPEAT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.copies < 1 or args.repeat < 1:
        parser.error("--copies and --repeat must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child:
        kind, spec, child_repeat = args.child
        if kind == "timing":
            result = timing({name: Path(path) for name, path in json.loads(spec).items()}, int(child_repeat))
        else:
            source, path, decoder = json.loads(spec)
            result = memory_mode(source, Path(path), decoder)
        print(json.dumps(result))
        return result
    result = run_benchmark(args.videos, args.copies, args.repeat, args.workdir)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
