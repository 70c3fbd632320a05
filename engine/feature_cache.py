"""``--cache_visual_features``: per-video CLIP frame features of a frozen encoder, computed once and reused.

In stage 2 the CLIP encoders are frozen, so when frame sampling is deterministic (shards, or files without frame
shuffling) a video's frame features never change. They are computed once (sharded across ranks), stored on disk as
memory-mapped arrays and read back instead of decoding the video and running the ViT every epoch.

Layout of ``CACHE_ROOT/<key>/`` where ``key`` hashes the encoder weights and the frame-sampling settings:
``features.npy`` float32 ``[N, T, D]``, ``masks.npy`` int8 ``[N, T]``, ``index.json``
``{"videos": {video_id: [row, video_fingerprint]}, ...}`` (row -1: the video could not be read; training skips it as it
would without the cache). A video whose fingerprint (file size + mtime, or shard
record location + shard size + mtime) changed is recomputed; other encoder weights or settings give another key.
Directories are written to a temp name and renamed, so a killed run never leaves a half-written cache; a cache damaged
otherwise (unreadable or inconsistent files) is rebuilt, and videos whose cached features are NaN / infinite are
encoded again (:func:`read_cache_index`).

T2VLP / STOA (``visual_taps``): their tube / object modules train in stage 2 on what the frozen ViT gives them, so the
cache also keeps those ViT taps, ``taps.npy`` float32 ``[N, n, T, 1+P, W]`` (``VideoCLIP.visual_taps``: T2VLP n=1,
the tokens entering block N-2; STOA n=2, those entering blocks N-2 and N-1), and the items carry ``visual_taps``
next to ``frame_feats``. The settings then name the method and the number of taps, and the encoder hash leaves out the
trainable ``tubes.`` / ``objects.`` tensors, so a cache built for one method, transform or frame setting is never
read by another. Cost at ViT-B/16 (197 tokens x 768 per frame, float32): 0.58 MB per frame and tap, i.e. with 12
frames 7.3 MB per video for T2VLP and 14.5 MB for STOA (MemBridge: 24.6 kB of frame features).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dataloaders.errors import DataError
from engine.data import TolerantVideos, encode_video_set, first_readable
from engine.distributed import DistInfo, barrier

logger = logging.getLogger(__name__)

FEATURES_FILE, MASKS_FILE, INDEX_FILE, TAPS_FILE = "features.npy", "masks.npy", "index.json", "taps.npy"
TRAINABLE_VIDEO_TOKEN_PREFIXES = ("tubes.", "objects.")  # trained in stage 2: not part of the cached encoder's hash
UNREADABLE_ROW = -1  # index row of a video that could not be read (no features stored)
CACHE_FORMAT = 1
NAN_SCAN_ROWS = 4096  # cached videos checked for non-finite features per read


def encoder_fingerprint(encoder: nn.Module, skip_prefixes: tuple[str, ...] = ()) -> str:
    """A hash of every tensor of the encoder (names, shapes, dtypes and bytes), but those whose names start with one
    of ``skip_prefixes``."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(encoder.state_dict().items()):
        if name.startswith(skip_prefixes):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def video_fingerprint(source: Any, video_id: str, key: str) -> str:
    """What identifies the stored video: file path + size + mtime, or shard record location + shard size + mtime."""
    try:
        if hasattr(source, "path_for"):
            path = Path(source.path_for(key))
            st = path.stat()
            return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        reader = getattr(source, "reader", None)
        if reader is not None:
            from dataloaders.tfrecord_io import resolve_shard

            entry = reader.entry(key)
            shard = resolve_shard(entry.shard, Path(reader.index_path).parent)
            st = shard.stat()
            return f"{shard.resolve()}:{entry.offset}:{st.st_size}:{st.st_mtime_ns}"
    except (OSError, DataError):  # a missing file / id: cached as unreadable until it appears
        return f"missing:{video_id}"
    return f"id:{video_id}"


class CachedFrameReader:
    """Drop-in for a dataset's video reader: returns cached ``frame_feats [T, D]`` and ``video_mask [T]``; with a
    ``taps.npy`` also :meth:`taps` (the ViT taps of T2VLP / STOA, given to the items by :class:`CachedTaps`)."""

    output_key = "frame_feats"

    def __init__(self, directory: Path):
        index = json.loads((directory / INDEX_FILE).read_text())
        self.rows = {vid: row for vid, (row, _) in index["videos"].items()}
        self.directory = directory
        self._features: np.ndarray | None = None
        self._masks: np.ndarray | None = None
        self._taps: np.ndarray | None = None

    def _open(self) -> None:
        # opened lazily so that every DataLoader worker maps the files itself
        self._features = np.load(self.directory / FEATURES_FILE, mmap_mode="r")
        self._masks = np.load(self.directory / MASKS_FILE, mmap_mode="r")
        if (self.directory / TAPS_FILE).is_file():
            self._taps = np.load(self.directory / TAPS_FILE, mmap_mode="r")

    def taps(self, video_id: str) -> torch.Tensor:
        """The cached ViT taps ``[n, T, 1+P, W]`` of a readable video (after :meth:`__call__` for it)."""
        if self._features is None:
            self._open()
        if self._taps is None:
            raise DataError(f"the visual feature cache {self.directory} holds no {TAPS_FILE}; delete it to rebuild it")
        return torch.from_numpy(np.array(self._taps[self.rows[video_id]]))

    def __call__(self, video_id: str, clip, rng) -> tuple[torch.Tensor, torch.Tensor]:
        if self._features is None:
            self._open()
        row = self.rows[video_id]
        if row == UNREADABLE_ROW:
            raise DataError(
                f"video {video_id!r} could not be read when the visual feature cache {self.directory} was built (the "
                "warnings of that run name the reason); fix or remove it, the cache then recomputes it"
            )
        return torch.from_numpy(np.array(self._features[row])), torch.from_numpy(np.array(self._masks[row], np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_features": None, "_masks": None, "_taps": None}


class CachedTaps:
    """A dataset's ``video_extras`` hook adding the cached ViT taps (``visual_taps``) to each item, after the hook it
    replaces (e.g. STOA's boxes)."""

    def __init__(self, reader: CachedFrameReader, previous=None):
        self.reader = reader
        self.previous = previous

    def __call__(self, video_id: str, video_mask: torch.Tensor) -> dict:
        item = dict(self.previous(video_id, video_mask)) if self.previous is not None else {}
        item["visual_taps"] = self.reader.taps(video_id)
        return item


class _UniqueVideos(Dataset):
    """The distinct videos of a training set, decoded deterministically with the set's own reader."""

    def __init__(self, read_video, video_ids: list[str], clips: dict[str, tuple | None]):
        self.read_video = read_video
        self.video_ids = video_ids
        self.clips = clips

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, index: int) -> dict:
        vid = self.video_ids[index]
        video, mask = self.read_video(vid, self.clips.get(vid), np.random.default_rng(0))
        return {"video": video, "video_mask": mask}


@dataclass(frozen=True)
class CacheReport:
    """Where the cache lives and how many videos were reused / computed by this call."""

    directory: Path
    reused: int
    computed: int


def _settings_key(encoder_fp: str, settings: dict) -> str:
    payload = json.dumps({"encoder": encoder_fp, "settings": settings, "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.blake2b(payload.encode(), digest_size=12).hexdigest()


def read_cache_index(directory: Path, visual_taps: int = 0) -> dict[str, list]:
    """The usable entries of the cache in ``directory``: ``{video_id: [row, fingerprint]}``; ``visual_taps > 0``:
    the cache must also hold that many ViT taps per video (``taps.npy``).

    A damaged cache (index that is not valid JSON or of the wrong shape, feature / mask files that cannot be read or
    disagree with the index) is rebuilt: {} with a warning. Rows holding NaN or infinite features are left out, so
    their videos are encoded again.
    """
    if not (directory / INDEX_FILE).is_file():
        return {}
    try:
        videos = json.loads((directory / INDEX_FILE).read_text())["videos"]
        if not isinstance(videos, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
            for v in videos.values()
        ):
            raise ValueError(f"{INDEX_FILE} does not map video ids to [row, fingerprint]")
        rows = [row for row, _ in videos.values() if row != UNREADABLE_ROW]
        if not rows:
            return videos
        feats = np.load(directory / FEATURES_FILE, mmap_mode="r")
        masks = np.load(directory / MASKS_FILE, mmap_mode="r")
        if feats.ndim != 3 or masks.shape != feats.shape[:2] or min(rows) < 0 or max(rows) >= len(feats):
            raise ValueError(f"features {feats.shape} / masks {masks.shape} do not fit the {len(rows)} indexed rows")
        if visual_taps:
            taps = np.load(directory / TAPS_FILE, mmap_mode="r")
            if taps.ndim != 5 or taps.shape[:3] != (len(feats), visual_taps, feats.shape[1]):
                raise ValueError(f"{TAPS_FILE} {taps.shape} does not fit {len(feats)} videos x {visual_taps} taps")
        finite = np.ones(len(feats), dtype=bool)
        for start in range(0, len(feats), NAN_SCAN_ROWS):  # in chunks: the file may be far larger than memory
            finite[start : start + NAN_SCAN_ROWS] = np.isfinite(feats[start : start + NAN_SCAN_ROWS]).all(axis=(1, 2))
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:  # json / numpy errors of a damaged file
        logger.warning("visual feature cache %s is damaged (%s): rebuilding it", directory, " ".join(str(exc).split()))
        return {}
    broken = sorted(vid for vid, (row, _) in videos.items() if row != UNREADABLE_ROW and not finite[row])
    if broken:
        logger.warning(
            "visual feature cache %s: %d videos have NaN or infinite features, encoding them again: %s",
            directory, len(broken), broken[:20],
        )  # fmt: skip
    return {vid: entry for vid, entry in videos.items() if vid not in broken}


@torch.no_grad()
def attach_visual_cache(
    dataset: Any,
    encoder: nn.Module,
    cache_root: str | os.PathLike,
    settings: dict,
    dist: DistInfo,
    batch_size: int,
    num_workers: int,
    encoder_key: str | None = None,
    visual_taps: int = 0,
) -> CacheReport:
    """Compute (or reuse) the frame features of every video of ``dataset`` and make it return them.

    ``visual_taps`` (T2VLP 1, STOA 2; ``encoder.num_visual_taps``): also cache the ViT taps its trainable tube /
    object module reads; the items then carry ``visual_taps [n, T, 1+P, W]`` (through ``dataset.video_extras``).

    ``encoder_key``: the encoder's :func:`encoder_fingerprint` when the caller already knows it (search remembers it
    per weights file); computed here otherwise.

    ``dataset`` is a training set with ``pairs`` (``video_id``, ``start``, ``end``) and a ``read_video`` reader;
    afterwards its items carry ``frame_feats`` instead of ``video``.
    """
    if visual_taps and settings.get("visual_taps") != visual_taps:
        raise ValueError("attach_visual_cache: settings must name the cached visual_taps (they key the cache)")
    reader = dataset.read_video
    video_ids = list(dict.fromkeys(p.video_id for p in dataset.pairs))
    clips = {p.video_id: (None if p.start is None and p.end is None else (p.start, p.end)) for p in dataset.pairs}
    keys = {vid: reader.video_keys.get(vid, vid) for vid in video_ids}
    fingerprints = {vid: video_fingerprint(reader.source, vid, keys[vid]) for vid in video_ids}
    skip = TRAINABLE_VIDEO_TOKEN_PREFIXES if visual_taps else ()
    directory = Path(cache_root) / _settings_key(encoder_key or encoder_fingerprint(encoder, skip), settings)

    def attach() -> None:
        reader = CachedFrameReader(directory)
        dataset.read_video = reader
        if visual_taps:
            dataset.video_extras = CachedTaps(reader, dataset.video_extras)

    old = read_cache_index(directory, visual_taps)
    reuse = {vid: old[vid][0] for vid in video_ids if vid in old and old[vid][1] == fingerprints[vid]}
    todo = [vid for vid in video_ids if vid not in reuse]
    logger.info("visual feature cache %s: %d videos cached, %d to compute", directory, len(reuse), len(todo))
    if not todo and len(reuse) == len(old):
        attach()
        return CacheReport(directory, len(reuse), 0)

    feats = masks = ok = taps = None
    if todo:
        videos = _UniqueVideos(reader, todo, clips)
        videos = TolerantVideos(videos, first_readable(videos, "the videos to cache"), "visual feature cache")
        if visual_taps:
            feats, masks, ok, taps = encode_video_set(
                encoder, videos, batch_size, num_workers, dist, "caching visual features and ViT taps", visual_taps=True
            )
            taps = taps.cpu().numpy()
        else:
            feats, masks, ok = encode_video_set(
                encoder, videos, batch_size, num_workers, dist, "caching visual features"
            )
        feats, masks, ok = feats.cpu().numpy(), masks.cpu().numpy().astype(np.int8), ok.cpu().numpy().astype(bool)
        if not ok.all():
            logger.warning(
                "visual feature cache: %d of %d videos could not be read and are not cached (training skips them, as "
                "without the cache): %s", int((~ok).sum()), len(todo), [todo[i] for i in np.flatnonzero(~ok)[:20]],
            )  # fmt: skip

    if dist.rank == 0:
        _write_cache(directory, video_ids, reuse, todo, feats, masks, ok, fingerprints, settings, taps)
    barrier()
    attach()
    return CacheReport(directory, len(reuse), len(todo))


def _write_cache(
    directory: Path,
    video_ids: list[str],
    reuse: dict[str, int],
    todo: list[str],
    feats: np.ndarray | None,
    masks: np.ndarray | None,
    ok: np.ndarray | None,
    fingerprints: dict[str, str],
    settings: dict,
    taps: np.ndarray | None = None,
) -> None:
    """Merge reused rows and new rows into a fresh directory, then swap it in atomically. Unreadable videos get no
    row (``UNREADABLE_ROW`` in the index), so they are not decoded again while their fingerprint stays the same."""
    old_feats = np.load(directory / FEATURES_FILE, mmap_mode="r") if reuse else None
    old_masks = np.load(directory / MASKS_FILE, mmap_mode="r") if reuse else None
    with_taps = bool(settings.get("visual_taps"))
    old_taps = np.load(directory / TAPS_FILE, mmap_mode="r") if reuse and with_taps else None
    sample_taps = taps if taps is not None and len(taps) else old_taps
    sample_feats = feats if feats is not None and len(feats) else old_feats
    sample_masks = masks if masks is not None and len(masks) else old_masks
    new_row = {vid: i for i, vid in enumerate(todo)}
    readable = [vid for vid in video_ids if (reuse[vid] != UNREADABLE_ROW if vid in reuse else bool(ok[new_row[vid]]))]
    n = len(readable)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    out_f = np.lib.format.open_memmap(tmp / FEATURES_FILE, "w+", np.float32, (n, *sample_feats.shape[1:]))
    out_m = np.lib.format.open_memmap(tmp / MASKS_FILE, "w+", np.int8, (n, *sample_masks.shape[1:]))
    out_t = None
    if with_taps:
        out_t = np.lib.format.open_memmap(tmp / TAPS_FILE, "w+", np.float32, (n, *sample_taps.shape[1:]))
    index = {vid: [UNREADABLE_ROW, fingerprints[vid]] for vid in video_ids}
    for row, vid in enumerate(readable):
        if vid in reuse:
            out_f[row], out_m[row] = old_feats[reuse[vid]], old_masks[reuse[vid]]
        else:
            out_f[row], out_m[row] = feats[new_row[vid]], masks[new_row[vid]]
        if out_t is not None:
            out_t[row] = old_taps[reuse[vid]] if vid in reuse else taps[new_row[vid]]
        index[vid] = [row, fingerprints[vid]]
    for out in (out_f, out_m, out_t):
        if out is not None:
            out.flush()
    del out_f, out_m, out_t, old_feats, old_masks, old_taps
    (tmp / INDEX_FILE).write_text(json.dumps({"format": CACHE_FORMAT, "settings": settings, "videos": index}))
    if directory.exists():
        trash = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, trash)
        os.replace(tmp, directory)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, directory)
