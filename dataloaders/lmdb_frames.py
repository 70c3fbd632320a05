"""HMMC's frame store: JPEG frames in an LMDB database (MCQ_HMMC.md §B.9), read as a ``VideoSource`` and written from
a folder of videos.

Layout (HMMC's ``tools/frame2lmdb.py``): for each video, ``N`` frames (``--lmdb_frames``, 30 for MSR-VTT / VATEX) under
the keys ``f"{video_id}_{i}"`` (``i`` the sample index 0..N-1), each a JPEG of the full-resolution frame, plus
``metadata.json`` ``{"length": videos}`` beside the database files.

Reading (:class:`LmdbVideoSource`): ``T = max_frames`` of the ``N`` stored frames, chosen by ``--frame_sample``
(:func:`lmdb_frame_indices`): ``uniform`` ``linspace(0, N, T, endpoint=False)``, ``random`` ``T`` distinct sorted
indices, ``uniform_random`` one random index per segment. HMMC's segments are ``[k·i, k·(i+1))`` with ``k = N // T``,
which never reach the last ``N − k·T`` frames (B.14 item 15); ours split all ``N`` frames (``quirks=True``: HMMC's).
With ``T > N`` the ``N`` frames are followed by zero frames with mask 0.

Writing (:func:`write_lmdb`, ``python -m dataloaders.lmdb_frames``): ``N`` frames at ``linspace(0, count − 1, N)`` of
each video (HMMC: ``linspace(0, count − 10, N)``, ``quirks=True``), decoded with ``video_io.decode_frames``. A video
that cannot be read is skipped and reported (the input list is never rewritten, unlike HMMC's tool, B.14 item 20).

The ``lmdb`` package (PyPI ``lmdb``, pinned in requirements.txt) is imported when a store is opened.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from dataloaders.errors import ConfigError, DataError
from dataloaders.video_io import decode_frames, probe_video

logger = logging.getLogger(__name__)

FRAME_SAMPLES = ("uniform", "random", "uniform_random")
DEFAULT_LMDB_FRAMES = 30
HMMC_WRITER_TAIL = 10  # HMMC samples up to frameCount - 10
METADATA_NAME = "metadata.json"
JPEG_QUALITY = 95  # OpenCV's default, as HMMC's cv2.imencode


def _lmdb():
    try:
        import lmdb
    except ImportError as exc:  # pragma: no cover - lmdb is a pinned requirement
        raise ConfigError("reading or writing an LMDB frame store needs the lmdb package: pip install lmdb") from exc
    return lmdb


_READERS: dict[tuple[str, int], object] = {}  # LMDB allows one environment per path and process


def _open_readonly(path: Path):
    key = (str(path.resolve()), os.getpid())
    if key not in _READERS:
        _READERS[key] = _lmdb().open(key[0], readonly=True, lock=False, readahead=False, subdir=True)
    return _READERS[key]


def frame_key(video_id: str, index: int) -> bytes:
    return f"{video_id}_{index}".encode()


def lmdb_frame_indices(
    n_stored: int, max_frames: int, mode: str, rng: np.random.Generator | None = None, quirks: bool = False
) -> np.ndarray:
    """Indices (sorted, distinct) of the stored frames to read: ``min(T, N)`` of them (see the module docstring)."""
    if mode not in FRAME_SAMPLES:
        raise ConfigError(f"--frame_sample {mode!r} is not one of {FRAME_SAMPLES}")
    if n_stored < 1 or max_frames < 1:
        raise ValueError(f"need at least one stored and one wanted frame (got {n_stored}, {max_frames})")
    t = min(max_frames, n_stored)
    if mode == "uniform":
        return np.linspace(0, n_stored, t, endpoint=False, dtype=int)
    rng = rng if rng is not None else np.random.default_rng()
    if mode == "random":
        return np.sort(rng.choice(n_stored, size=t, replace=False))
    if quirks:
        k = n_stored // t
        starts, ends = k * np.arange(t), k * np.arange(1, t + 1)
    else:
        bounds = np.floor(np.arange(t + 1) * n_stored / t).astype(int)
        starts, ends = bounds[:-1], bounds[1:]
    return np.array([int(rng.integers(s, e)) for s, e in zip(starts, ends, strict=True)], dtype=int)


def lmdb_sample_positions(frame_count: int, n: int, quirks: bool = False) -> np.ndarray:
    """The writer's frame numbers: ``linspace(0, count − 1, n)`` (``quirks``: HMMC's ``linspace(0, count − 10, n)``,
    clamped to the video)."""
    last = frame_count - (HMMC_WRITER_TAIL if quirks else 1)
    return np.clip(np.linspace(0, max(last, 0), n, dtype=int), 0, frame_count - 1)


class LmdbVideoSource:
    """``VideoSource`` over an HMMC LMDB frame store: ``load(video_id) -> (frames uint8 [T, H, W, 3], mask [T])``.

    The database is opened lazily in each process (DataLoader workers fork after construction)."""

    def __init__(
        self,
        path: str | os.PathLike,
        max_frames: int,
        frames_per_video: int = DEFAULT_LMDB_FRAMES,
        sample: str = "uniform",
        quirks: bool = False,
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"{self.path}: LMDB frame store not found: check --lmdb_path (build one with "
                            "`python -m dataloaders.lmdb_frames`)")  # fmt: skip
        if sample not in FRAME_SAMPLES:
            raise ConfigError(f"--frame_sample {sample!r} is not one of {FRAME_SAMPLES}")
        if max_frames < 1 or frames_per_video < 1:
            raise ConfigError(f"--max_frames ({max_frames}) and --lmdb_frames ({frames_per_video}) must be >= 1")
        self.max_frames = max_frames
        self.frames_per_video = frames_per_video
        self.sample = sample
        self.quirks = quirks
        self._env = None
        self._pid = None

    def _open(self):
        if self._env is None or self._pid != os.getpid():
            self._env = _open_readonly(self.path)
            self._pid = os.getpid()
        return self._env

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_env": None, "_pid": None}

    def load(
        self,
        video_id: str,
        start: float | None = None,
        end: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frames uint8 ``[T, H, W, 3]`` RGB and mask int64 ``[T]`` (``T = max_frames``)."""
        if start is not None or end is not None:
            raise ConfigError(f"{self.path}: an LMDB frame store holds whole videos; it cannot cut [{start}, {end}] s")
        wanted = lmdb_frame_indices(self.frames_per_video, self.max_frames, self.sample, rng, self.quirks)
        decoded = []
        with self._open().begin(write=False) as txn:
            for index in wanted:
                data = txn.get(frame_key(video_id, int(index)))
                if data is None:
                    raise DataError(
                        f"{self.path}: no frame {video_id}_{int(index)} in the LMDB store (it holds "
                        f"--lmdb_frames {self.frames_per_video} per video?): rebuild it or drop the video"
                    )
                try:
                    decoded.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                except OSError as exc:
                    raise DataError(
                        f"{self.path}: frame {video_id}_{int(index)} is not a readable JPEG ({exc})"
                    ) from exc
        frames = np.zeros((self.max_frames, *decoded[0].shape), dtype=np.uint8)
        frames[: len(decoded)] = np.stack(decoded)
        mask = np.zeros(self.max_frames, dtype=np.int64)
        mask[: len(decoded)] = 1
        return frames, mask


def _jpeg(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_lmdb(
    video_dir: str | os.PathLike,
    video_ids: Iterable[str],
    output: str | os.PathLike,
    frames_per_video: int = DEFAULT_LMDB_FRAMES,
    extension: str = ".mp4",
    map_size_gb: float = 50.0,
    quirks: bool = False,
) -> tuple[int, list[str]]:
    """Write ``frames_per_video`` JPEG frames of every ``video_dir/<id><extension>`` to the LMDB store ``output`` (a
    new folder). Returns ``(videos written, skipped video ids)``; each skipped one is logged with its reason."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"{output} exists and is not empty: choose a new --output folder")
    output.mkdir(parents=True, exist_ok=True)
    env = _lmdb().open(str(output), map_size=int(map_size_gb * (1 << 30)), subdir=True)
    written, skipped = 0, []
    try:
        for video_id in video_ids:
            path = Path(video_dir) / f"{video_id}{extension}"
            try:
                count = probe_video(path).num_frames
                frames = decode_frames(path, lmdb_sample_positions(count, frames_per_video, quirks))
            except DataError as err:
                logger.warning("skipped %s: %s", video_id, err)
                skipped.append(video_id)
                continue
            with env.begin(write=True) as txn:
                for index, frame in enumerate(frames):
                    txn.put(frame_key(video_id, index), _jpeg(frame))
            written += 1
    finally:
        env.close()
    (output / METADATA_NAME).write_text(json.dumps({"length": written}))
    if skipped:
        logger.warning("%d of %d videos could not be read and were skipped: %s", len(skipped), written + len(skipped),
                       skipped)  # fmt: skip
    return written, skipped


def _read_ids(path: Path) -> list[str]:
    """Video ids of a JSON-lines file of ``{"video_id": ...}`` (HMMC's tools/*.json) or a plain list, one per line."""
    ids = []
    for row, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                ids.append(str(json.loads(line)["video_id"]))
            except (json.JSONDecodeError, KeyError) as exc:
                raise DataError(f"{path}: row {row} is not a JSON object with a video_id ({exc}): fix the row") from exc
        else:
            ids.append(line)
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Videos -> HMMC's LMDB frame store (MCQ_HMMC.md B.9)")
    parser.add_argument("--video_dir", required=True, help="folder of <video_id>.mp4")
    parser.add_argument("--video_list", required=True, help='JSON lines {"video_id": ...} or one id per line')
    parser.add_argument("--output", required=True, help="new folder for the LMDB store")
    parser.add_argument("--frames", type=int, default=DEFAULT_LMDB_FRAMES, help="frames stored per video (HMMC: 30)")
    parser.add_argument("--extension", default=".mp4", help="video file extension")
    parser.add_argument("--map_size_gb", type=float, default=50.0, help="LMDB map size in GiB (HMMC: 50 for MSR-VTT)")
    parser.add_argument("--official_quirks", action="store_true", help="HMMC's sampling up to frameCount - 10")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    written, skipped = write_lmdb(args.video_dir, _read_ids(Path(args.video_list)), args.output, args.frames,
                                  args.extension, args.map_size_gb, args.official_quirks)  # fmt: skip
    print(f"{written} videos written to {args.output}, {len(skipped)} skipped")


if __name__ == "__main__":
    main()
