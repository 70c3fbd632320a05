"""Indexed TFRecord shards of video frames: the index, shard writer and reader, and the shard-backed VideoSource.

Layout (the published WebVid one, DESIGN §3.2): shards ``{prefix}-00000.tfrecord`` of up to 1000 records each,
every record a framed, serialised ``tf.train.Example`` (``dataloaders.tfrecord_format``), and an index
``{prefix}.index`` with one line per video ``video_id \\t shard \\t offset`` where ``shard`` is the shard path as the
builder wrote it and ``offset`` the byte offset of the record start.

Index files are read as UTF-8 (a leading byte-order mark is accepted) and split on ``\\n`` only, so a video id may
hold any other character (U+2028, U+0085, ...) and a reported line number is the file's own line. ``ShardVideoSource``
is the shard-backed ``VideoSource`` of docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataloaders import video_io
from dataloaders.errors import ConfigError, DataError
from dataloaders.tfrecord_format import (
    ENCODINGS,
    FOOTER,
    FRAMING_BYTES,
    HEADER,
    RecordError,
    VideoRecord,
    check_payload,
    frame_record,
    parse_header,
    parse_video_example,
)

logger = logging.getLogger(__name__)

DEFAULT_EXAMPLES_PER_SHARD = 1000
DEFAULT_INDEX_PREFIX = "path"  # published names: path-00000.tfrecord, path.index
MAX_OPEN_SHARDS = 64  # file handles a reader keeps open per process (WebVid-2.5M has 2,500 shards)

_TEMP_SUFFIX = ".tmp"
_OFFSET = re.compile(r"[0-9]{1,19}")  # ASCII digits only: str.isdigit() accepts "²"
_SHARD_NAME = re.compile(r"-(\d{5,})\.tfrecord$")
_VERIFY_HINT = "rebuild the shards with frozen_tfrecord.py, or list every bad record with `frozen_tfrecord.py --verify`"


# ----------------------------------------------------------------------------------------------------------------
# Shard files
# ----------------------------------------------------------------------------------------------------------------


def iter_records(shard_path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Read a shard front to back, yielding ``(offset, payload)`` after checking framing and both CRCs."""
    size = os.path.getsize(shard_path)
    with open(shard_path, "rb") as f:
        offset = 0
        while offset < size:
            try:
                length = parse_header(f.read(HEADER.size), size - offset)
                payload = f.read(length)
                check_payload(payload, f.read(FOOTER.size))
            except RecordError as err:
                raise DataError(f"{shard_path}: bad record at offset {offset}: {err}; {_VERIFY_HINT}") from err
            yield offset, payload
            offset += length + FRAMING_BYTES


# ----------------------------------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexEntry:
    """One index line: where a video's record starts."""

    video_id: str
    shard: str  # the shard path exactly as written in the index
    offset: int


def resolve_index_path(path: str | os.PathLike) -> Path:
    """An index file, or a folder holding the published ``path.index``."""
    path = Path(path)
    return path / f"{DEFAULT_INDEX_PREFIX}.index" if path.is_dir() else path


def parse_index_line(line: str, index_path: str | os.PathLike, line_number: int) -> IndexEntry:
    """Parse ``video_id \\t shard \\t offset``; a malformed line raises DataError naming file and line.

    The offset is ASCII digits (at most 19, so it fits a file offset); any other character (Unicode separators
    included) belongs to the id or the shard path.
    """
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) != 3 or not parts[0] or not parts[1] or not _OFFSET.fullmatch(parts[2]):
        raise DataError(
            f"{index_path}, line {line_number}: expected 'video_id<TAB>shard<TAB>offset', got {line.rstrip()!r}; "
            "fix or delete the line, or rebuild the index with frozen_tfrecord.py"
        )
    return IndexEntry(parts[0], parts[1], int(parts[2]))


def _decode_index_line(raw: bytes, index_path: str | os.PathLike, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{index_path}, line {line_number}: not UTF-8 text ({err.reason} at byte {err.start} of the line); an "
            "index is UTF-8: fix the line, or rebuild the index with frozen_tfrecord.py"
        ) from err


def split_index(data: bytes, index_path: str | os.PathLike) -> tuple[list[tuple[int, str]], bytes]:
    """``([(line number, text), ...], tail)`` of an index file's bytes.

    Lines end at ``\\n`` only (a trailing ``\\r`` is dropped; no other character ends a line, unlike
    ``str.splitlines``), so the numbers are the file's own lines. A leading UTF-8 byte-order mark is skipped; blank
    lines are left out. ``tail`` is the bytes after the last ``\\n`` (empty when the file ends with one): a complete
    last line for a hand-written index, a torn one for an interrupted build. A line that is not UTF-8 raises DataError.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    pieces = data.split(b"\n")
    tail = pieces.pop()
    lines = []
    for number, raw in enumerate(pieces, 1):
        text = _decode_index_line(raw, index_path, number).removesuffix("\r")
        if text.strip(" \t"):
            lines.append((number, text))
    return lines, tail


def _read_index_bytes(index_path: str | os.PathLike) -> bytes:
    try:
        with open(index_path, "rb") as f:
            return f.read()
    except OSError as err:
        raise DataError(f"{index_path}: cannot read the shard index ({err}); build it with frozen_tfrecord.py") from err


def read_index(index_path: str | os.PathLike) -> list[IndexEntry]:
    """All entries of an index, in file order (blank lines are ignored; a last line without ``\\n`` counts)."""
    data = _read_index_bytes(index_path)
    lines, tail = split_index(data, index_path)
    if tail.strip(b" \t\r"):
        number = data.count(b"\n") + 1
        lines.append((number, _decode_index_line(tail, index_path, number).removesuffix("\r")))
    return [parse_index_line(line, index_path, number) for number, line in lines]


def resolve_shard(shard: str, index_dir: Path) -> Path:
    """Where a shard named in an index is: next to the index first (so a moved folder still reads), else as written.

    The published builder writes ``os.path.join(output_dir, name)``, often relative to where it ran or an absolute
    path on another machine; the shards always sit beside their index.
    """
    beside = index_dir / os.path.basename(shard)
    return beside if beside.is_file() else Path(shard)


# ----------------------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Append framed records to ``{prefix}-NNNNN.tfrecord`` shards and ``video_id\\tshard\\toffset`` lines to the index.

    A shard is written under a temporary name and renamed once it holds ``examples_per_shard`` records (or at
    ``close()``); it is fsynced, with the index, before the rename. Each index line is written after its record has
    been flushed. Opening a prefix that holds an interrupted build resumes it: index lines of complete (renamed)
    shards are kept, the trailing temporary shard and its index lines are discarded, a torn last index line (one
    without its newline) is dropped and the index rewritten, and writing continues with the next shard number, so
    the finished output equals an uninterrupted build. A writer does not lock its folder: one writer per prefix at a
    time (``dataloaders.shard_build`` takes a folder lock).
    """

    def __init__(self, output_prefix: str | os.PathLike, examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD):
        if examples_per_shard < 1:
            raise ConfigError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
        self.prefix = os.fspath(output_prefix)
        self.index_path = self.prefix + ".index"
        self.examples_per_shard = examples_per_shard
        self._dir = os.path.dirname(self.prefix) or "."
        os.makedirs(self._dir, exist_ok=True)
        self.entries: list[IndexEntry] = self._recover()
        self._written = {entry.video_id for entry in self.entries}
        self._next_shard = self._next_shard_number()
        self._index = open(self.index_path, "a", encoding="utf-8", newline="\n")
        self._shard_file: io.BufferedWriter | None = None
        self._shard_records = 0
        self._offset = 0

    def shard_path(self, number: int) -> str:
        """The shard path for a shard number, as written in the index (``{prefix}-00000.tfrecord``)."""
        return f"{self.prefix}-{number:05d}.tfrecord"

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._written

    def _shard_files(self, suffix: str = "") -> dict[int, str]:
        """``{shard number: file name}`` of this prefix's shards in the output folder (``suffix``: temporary ones)."""
        base = os.path.basename(self.prefix)
        found = {}
        for name in os.listdir(self._dir):
            stem = name[: len(name) - len(suffix)] if suffix else name
            match = _SHARD_NAME.search(stem)
            if name.endswith(suffix) and match and stem[: match.start()] == base and stem.endswith(".tfrecord"):
                found[int(match.group(1))] = name
        return found

    def _recover(self) -> list[IndexEntry]:
        """Keep the index lines of complete shards; drop a trailing temporary shard, its lines and a torn last line."""
        for name in self._shard_files(_TEMP_SUFFIX).values():
            logger.info("discarding the incomplete shard %s of an interrupted build", name)
            os.remove(os.path.join(self._dir, name))
        if not os.path.exists(self.index_path):
            return []
        lines, tail = split_index(_read_index_bytes(self.index_path), self.index_path)
        torn = bool(tail)  # a last line cut short by the interruption: dropped, and its video is built again
        if torn:
            logger.info("resuming %s: dropping its torn last line %r", self.index_path, tail[:200])
        kept: list[IndexEntry] = []
        index_dir = Path(self.index_path).parent
        for number, line in lines:
            entry = parse_index_line(line, self.index_path, number)
            if resolve_shard(entry.shard, index_dir).is_file():
                kept.append(entry)
        if torn or len(kept) != len(lines):
            logger.info(
                "resuming %s: kept %d videos of complete shards, dropped %d index lines of an incomplete one",
                self.index_path,
                len(kept),
                len(lines) - len(kept),
            )
            tmp = self.index_path + _TEMP_SUFFIX
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(f"{e.video_id}\t{e.shard}\t{e.offset}\n" for e in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.index_path)
            _fsync_dir(self._dir)
        elif kept:
            logger.info("resuming %s: %d videos already written", self.index_path, len(kept))
        return kept

    def _next_shard_number(self) -> int:
        return max(self._shard_files(), default=-1) + 1

    def write(self, video_id: str, payload: bytes) -> IndexEntry:
        """Append one record (an encoded Example) and its index line; return the index entry."""
        if not video_id or any(c in video_id for c in "\t\r\n") or video_id.startswith("\ufeff"):
            raise DataError(f"video id {video_id!r} cannot go in the index {self.index_path}: rename the video")
        if video_id in self._written:
            raise DataError(f"{self.index_path}: video {video_id!r} is already written; drop the duplicate")
        if self._shard_file is None:
            self._shard_file = open(self.shard_path(self._next_shard) + _TEMP_SUFFIX, "wb")
            self._shard_records = 0
            self._offset = 0
        self._shard_file.write(frame_record(payload))
        self._shard_file.flush()
        entry = IndexEntry(video_id, self.shard_path(self._next_shard), self._offset)
        self._index.write(f"{entry.video_id}\t{entry.shard}\t{entry.offset}\n")
        self._index.flush()
        self.entries.append(entry)
        self._written.add(video_id)
        self._offset += len(payload) + FRAMING_BYTES
        self._shard_records += 1
        if self._shard_records == self.examples_per_shard:
            self._finish_shard()
        return entry

    def _finish_shard(self) -> None:
        assert self._shard_file is not None
        os.fsync(self._shard_file.fileno())
        self._shard_file.close()
        self._shard_file = None
        os.fsync(self._index.fileno())
        final = self.shard_path(self._next_shard)
        os.replace(final + _TEMP_SUFFIX, final)
        _fsync_dir(self._dir)
        self._next_shard += 1

    def close(self) -> None:
        """Complete the trailing shard and close the index."""
        if self._shard_file is not None:
            self._finish_shard()
        self._index.close()

    def abort(self) -> None:
        """Close without completing the trailing shard (a later writer on this prefix discards it and resumes)."""
        if self._shard_file is not None:
            self._shard_file.close()
            self._shard_file = None
        self._index.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------------------------


class ShardReader:
    """Random access to the videos of an index: ``read(video_id, indices=None) -> uint8 [K, H, W, 3] RGB``.

    ``read_record`` + ``decode`` split a read in two, so a caller can choose frames from the stored count N first
    and decode only those.

    Shard file handles are cached per process (at most MAX_OPEN_SHARDS, least recently used closed first) and
    read with ``os.pread``, which has no shared file position; a forked DataLoader worker notices the new pid and
    opens its own handles, and pickling (spawned workers) drops them.
    """

    def __init__(self, index_path: str | os.PathLike):
        self.index_path = resolve_index_path(index_path)
        self._entries: dict[str, IndexEntry] = {}
        duplicates = 0
        for entry in read_index(self.index_path):
            if entry.video_id in self._entries:
                duplicates += 1  # the published reader uses the first line of a repeated id; so do we
            else:
                self._entries[entry.video_id] = entry
        if duplicates:
            logger.warning("%s: %d repeated video ids; the first line of each is used", self.index_path, duplicates)
        self._paths: dict[str, Path] = {}
        self._fds: OrderedDict[Path, int] = OrderedDict()
        self._pid = os.getpid()

    @property
    def video_ids(self) -> list[str]:
        """Indexed video ids in index order."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._entries

    def entry(self, video_id: str) -> IndexEntry:
        """The index entry of a video; DataError when the id is not indexed."""
        try:
            return self._entries[video_id]
        except KeyError:
            raise DataError(
                f"{self.index_path}: video {video_id!r} is not in the index; build its record with "
                "frozen_tfrecord.py or drop it from the caption file"
            ) from None

    def shard_path(self, entry: IndexEntry) -> Path:
        """The file holding an entry's record."""
        path = self._paths.get(entry.shard)
        if path is None:
            path = self._paths[entry.shard] = resolve_shard(entry.shard, self.index_path.parent)
        return path

    def _fd(self, path: Path) -> int:
        if self._pid != os.getpid():  # forked: close this process's copies of the parent's descriptors
            self.close()
            self._pid = os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
            if len(self._fds) > MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(path)
        return fd

    def read_payload(self, video_id: str) -> bytes:
        """The checked Example payload of a video (framing and both CRCs verified)."""
        entry = self.entry(video_id)
        path = self.shard_path(entry)
        try:
            fd = self._fd(path)
        except OSError as err:
            raise DataError(
                f"{path}: cannot open the shard of video {video_id!r} (index {self.index_path}): {err}; {_VERIFY_HINT}"
            ) from err
        try:
            size = os.fstat(fd).st_size
            if entry.offset >= size:
                raise RecordError(f"offset is past the end of the {size}-byte shard")
            length = parse_header(os.pread(fd, HEADER.size, entry.offset), size - entry.offset)
            payload = os.pread(fd, length, entry.offset + HEADER.size)  # read apart from the footer: no slice copy
            check_payload(payload, os.pread(fd, FOOTER.size, entry.offset + HEADER.size + length))
        except RecordError as err:
            raise DataError(
                f"{path}: bad record at offset {entry.offset} for video {video_id!r}: {err}; {_VERIFY_HINT}"
            ) from err
        return payload

    def _record_error(self, video_id: str, err: RecordError) -> DataError:
        entry = self.entry(video_id)
        return DataError(
            f"{self.shard_path(entry)}: record at offset {entry.offset} for video {video_id!r} does not decode: "
            f"{err}; {_VERIFY_HINT}"
        )

    def read_record(self, video_id: str) -> VideoRecord:
        """The checked, parsed record of a video, frames not decoded yet (its ``n_frames`` plans a partial read)."""
        try:
            return parse_video_example(self.read_payload(video_id))
        except RecordError as err:
            raise self._record_error(video_id, err) from err

    def decode(
        self,
        video_id: str,
        record: VideoRecord,
        indices: Sequence[int] | np.ndarray | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """``record.decode(indices, out)`` for the record of ``video_id``, a bad frame raising DataError naming its
        file."""
        try:
            return record.decode(indices, out)
        except RecordError as err:
            raise self._record_error(video_id, err) from err

    def read_with_encoding(
        self, video_id: str, indices: Sequence[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, str]:
        """``(frames uint8 [K, H, W, 3] RGB, encoding)`` of a video: the stored frames ``indices`` (None: all)."""
        record = self.read_record(video_id)
        return self.decode(video_id, record, indices), record.encoding

    def read(self, video_id: str, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Frames uint8 [K, H, W, 3] RGB of a video: the stored frames ``indices`` in that order (None: all N)."""
        return self.read_with_encoding(video_id, indices)[0]

    def close(self) -> None:
        """Close the cached shard handles (in a forked child, its own copies; the parent's stay open)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()
        return state

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()


def verify_index(index_path: str | os.PathLike) -> dict:
    """Read and decode every indexed record; return the ``--verify`` summary.

    ``{"videos": indexed videos, "frames": frames of the good records, "encodings": {"raw": n, "jpeg": m},
    "errors": [{"video_id", "shard", "offset", "error"}]}``; an unreadable index is one error with no video id.
    """
    summary: dict = {"videos": 0, "frames": 0, "encodings": dict.fromkeys(ENCODINGS, 0), "errors": []}
    try:
        reader = ShardReader(index_path)
    except DataError as err:
        summary["errors"].append({"video_id": None, "shard": str(index_path), "offset": None, "error": str(err)})
        return summary
    summary["videos"] = len(reader)
    order = sorted(reader.video_ids, key=lambda vid: (reader.entry(vid).shard, reader.entry(vid).offset))
    for video_id in order:
        try:
            frames, encoding = reader.read_with_encoding(video_id)
        except DataError as err:
            entry = reader.entry(video_id)
            summary["errors"].append(
                {
                    "video_id": video_id,
                    "shard": str(reader.shard_path(entry)),
                    "offset": entry.offset,
                    "error": str(err),
                }
            )
            continue
        summary["frames"] += len(frames)
        summary["encodings"][encoding] += 1
    reader.close()
    return summary


# ----------------------------------------------------------------------------------------------------------------
# VideoSource
# ----------------------------------------------------------------------------------------------------------------


class ShardVideoSource:
    """``VideoSource`` over indexed shards: ``load(video_id) -> (frames uint8 [T, H, W, 3] RGB, mask int64 [T])``.

    The stored frames (already sampled when the shards were built) go through video_io's published rules
    (``plan_frames``): more than ``max_frames`` are sliced head / tail / uniform; fewer are spread with linspace
    (``repeat``, all valid) or kept once and followed by zero frames with mask 0 (``zero``); then ordered.
    The plan is made from the record header (N), and only the distinct planned frames are decoded.
    Options take the names or the published integer codes.
    """

    def __init__(
        self,
        index_path: str | os.PathLike,
        max_frames: int,
        slice_framepos: str | int = "uniform",
        frame_order: str | int = "keep",
        pad_mode: str | int = "repeat",
    ):
        video_io.slice_frames(1, max_frames, slice_framepos)  # validate the options once (ConfigError)
        video_io.order_frames(np.arange(1), frame_order, np.random.default_rng())
        video_io.pad_frames(1, max_frames, pad_mode)
        self.reader = ShardReader(index_path)
        self.max_frames = max_frames
        self.slice_framepos = slice_framepos
        self.frame_order = frame_order
        self.pad_mode = pad_mode

    @property
    def video_ids(self) -> list[str]:
        """Indexed video ids in index order."""
        return self.reader.video_ids

    def __contains__(self, video_id: object) -> bool:
        return video_id in self.reader

    def load(
        self,
        video_id: str,
        start: float | None = None,
        end: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frames uint8 [T, H, W, 3] RGB and mask int64 [T] of an indexed video (T = max_frames).

        ``rng`` is only used by ``frame_order='shuffle'`` (a fresh unseeded generator when None).
        """
        if start is not None or end is not None:
            raise ConfigError(
                f"{self.reader.index_path}: shards hold pre-sampled frames without timestamps, so video "
                f"{video_id!r} cannot be clipped to [{start}, {end}] s; use a FileVideoSource for clipped videos"
            )
        record = self.reader.read_record(video_id)
        wanted, mask = video_io.plan_frames(
            np.arange(record.n_frames),
            self.max_frames,
            self.slice_framepos,
            self.frame_order,
            self.pad_mode,
            rng if rng is not None else np.random.default_rng(),
        )
        # only the planned frames are decoded, straight into the clip buffer (the BGR -> RGB copy of raw frames, the
        # one copy out of the JPEG decoder's HWC output); the padding rows are zeroed
        frames = np.empty((self.max_frames, record.height, record.width, 3), dtype=np.uint8)
        frames[len(wanted) :] = 0
        self.reader.decode(video_id, record, wanted, out=frames[: len(wanted)])
        return frames, mask
