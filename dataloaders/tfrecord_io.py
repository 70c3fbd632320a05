"""Indexed TFRecord shards of video frames, read and written without TensorFlow.

Layout (the published WebVid one, DESIGN §3.2): shards ``{prefix}-00000.tfrecord`` of up to 1000 records each,
every record a serialised ``tf.train.Example``, and an index ``{prefix}.index`` with one line per video
``video_id \\t shard \\t offset`` where ``shard`` is the shard path as the builder wrote it and ``offset`` the
byte offset of the record start. Record framing (TensorFlow's): uint64 LE payload length, uint32 masked CRC32C of
those 8 bytes, the payload, uint32 masked CRC32C of the payload.

Two encodings, detected per record:

- ``raw`` (published, byte for byte): one feature ``image`` = a bytes list holding one string, the uint8 array
  ``(N, 256, 256, 3)`` in **BGR** C-order.
- ``jpeg``: ``image`` holds one JPEG per frame (RGB), plus int64 ``n_frames``, ``height``, ``width`` and bytes
  ``encoding`` = ``b"jpeg"``. A record without ``encoding`` is raw.

Readers return RGB frames and decode only the frames asked for (``parse_video_example`` reads the header and frame
layout, ``VideoRecord.decode(indices)`` the chosen frames). ``ShardVideoSource`` is the shard-backed ``VideoSource``
of docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import crc32c
import numpy as np
import torch
from PIL import Image

try:  # torchvision's libjpeg-turbo decoder (deprecated in 0.29 in favour of torchcodec, still shipped): PIL otherwise
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a torchvision without image ops
    decode_jpeg = None

from dataloaders import video_io
from dataloaders.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

RAW_FRAME_SIZE = 256  # the published raw layout stores frames squashed to 256 x 256
DEFAULT_EXAMPLES_PER_SHARD = 1000
DEFAULT_JPEG_QUALITY = 90
DEFAULT_INDEX_PREFIX = "path"  # published names: path-00000.tfrecord, path.index
MAX_OPEN_SHARDS = 64  # file handles a reader keeps open per process (WebVid-2.5M has 2,500 shards)
ENCODINGS = ("raw", "jpeg")

_CRC_MASK_DELTA = 0xA282EAD8
_UINT32 = 0xFFFFFFFF
_UINT64 = (1 << 64) - 1
_HEADER = struct.Struct("<QI")  # payload length, masked CRC of the length bytes
_FOOTER = struct.Struct("<I")  # masked CRC of the payload
_FRAMING_BYTES = _HEADER.size + _FOOTER.size
_TEMP_SUFFIX = ".tmp"
_SHARD_NAME = re.compile(r"-(\d{5,})\.tfrecord$")
_JPEG_SOI = b"\xff\xd8"  # start of image
_JPEG_MARKER_PREFIX = 0xFF
_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STOP_MARKERS = frozenset({0xD9, 0xDA})  # end of image, start of scan: no frame header after them
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: markers without a length field
_JPEG_SEGMENT_HEAD = 4  # marker (2 bytes) + segment length (2 bytes)
_JPEG_SOF_END = 9  # marker, length, precision, height (2), width (2)
_VERIFY_HINT = "rebuild the shards with frozen_tfrecord.py, or list every bad record with `frozen_tfrecord.py --verify`"


# ----------------------------------------------------------------------------------------------------------------
# tf.train.Example protobuf (Example{features: Features{feature: map<string, Feature>}})
# ----------------------------------------------------------------------------------------------------------------

FeatureKind = Literal["bytes", "float", "int64"]
_KIND_FIELD: dict[str, int] = {"bytes": 1, "float": 2, "int64": 3}  # Feature.oneof kind field numbers
_FIELD_KIND = {field: kind for kind, field in _KIND_FIELD.items()}
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5


class ProtoError(ValueError):
    """A payload that is not a valid serialised ``tf.train.Example``."""


@dataclass(frozen=True)
class Feature:
    """One ``tf.train.Feature``: ``kind`` None is a Feature with no list set."""

    kind: FeatureKind | None
    values: tuple = ()


def bytes_feature(*values: bytes) -> Feature:
    """A ``bytes_list`` feature."""
    return Feature("bytes", tuple(values))


def int64_feature(*values: int) -> Feature:
    """An ``int64_list`` feature."""
    return Feature("int64", tuple(int(v) for v in values))


def float_feature(*values: float) -> Feature:
    """A ``float_list`` feature (stored as float32)."""
    return Feature("float", tuple(float(v) for v in values))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | _WIRE_LEN) + _varint(len(payload)) + payload


def encode_feature(feature: Feature) -> bytes:
    """Serialise a Feature message body (packed int64/float lists, as protobuf writes proto3 repeated scalars)."""
    if feature.kind is None:
        return b""
    if feature.kind == "bytes":
        body = b"".join(_len_field(1, bytes(v)) for v in feature.values)
    elif feature.kind == "float":
        body = _len_field(1, np.asarray(feature.values, dtype="<f4").tobytes()) if feature.values else b""
    elif feature.kind == "int64":
        body = _len_field(1, b"".join(_varint(v & _UINT64) for v in feature.values)) if feature.values else b""
    else:
        raise ValueError(f"unknown feature kind {feature.kind!r}; expected one of {sorted(_KIND_FIELD)}")
    return _len_field(_KIND_FIELD[feature.kind], body)


def encode_example(features: Mapping[str, Feature]) -> bytes:
    """Serialise a ``tf.train.Example``; byte-identical to protobuf's deterministic serialisation (sorted keys).

    With one feature (the published raw layout) this is also what a plain ``SerializeToString()`` writes.
    """
    entries = b"".join(
        _len_field(1, _len_field(1, key.encode("utf-8")) + _len_field(2, encode_feature(features[key])))
        for key in sorted(features)
    )
    return _len_field(1, entries)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtoError(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & _UINT64, pos
        shift += 7
        if shift >= 70:
            raise ProtoError(f"varint longer than 10 bytes at byte {pos}")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield ``(field number, wire type, value)``; value is an int, or a memoryview for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _WIRE_LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise ProtoError(f"field {field} of {size} bytes at byte {pos} runs past the end ({len(buf)} bytes)")
            value, pos = buf[pos : pos + size], pos + size
        elif wire in (_WIRE_FIXED32, _WIRE_FIXED64):
            width = 4 if wire == _WIRE_FIXED32 else 8
            if pos + width > len(buf):
                raise ProtoError(f"truncated fixed-width field {field} at byte {pos}")
            value, pos = int.from_bytes(buf[pos : pos + width], "little"), pos + width
        else:
            raise ProtoError(f"unsupported wire type {wire} (field {field}) at byte {pos}")
        yield field, wire, value


def _decode_list(kind: str, buf: memoryview, copy_bytes: bool = True) -> tuple:
    """The values of a packed or unpacked list; ``copy_bytes=False`` keeps bytes entries as views of ``buf``."""
    values: list = []
    for field, wire, value in _fields(buf):
        if field != 1:
            continue
        if kind == "bytes" and wire == _WIRE_LEN:
            values.append(bytes(value) if copy_bytes else value)
        elif kind == "float" and wire == _WIRE_LEN:
            if len(value) % 4:
                raise ProtoError(f"packed float list of {len(value)} bytes is not a multiple of 4")
            values.extend(np.frombuffer(value, dtype="<f4").tolist())
        elif kind == "float" and wire == _WIRE_FIXED32:
            values.append(float(np.frombuffer(struct.pack("<I", value), dtype="<f4")[0]))
        elif kind == "int64" and wire in (_WIRE_LEN, _WIRE_VARINT):
            raw = [value] if wire == _WIRE_VARINT else []
            pos = 0
            while wire == _WIRE_LEN and pos < len(value):
                item, pos = _read_varint(value, pos)
                raw.append(item)
            values.extend(v - (1 << 64) if v >= 1 << 63 else v for v in raw)
        else:
            raise ProtoError(f"wire type {wire} is invalid for a {kind} list")
    return tuple(values)


def _decode_feature(buf: memoryview, copy_bytes: bool = True) -> Feature:
    feature = Feature(None)
    for field, wire, value in _fields(buf):
        if field in _FIELD_KIND and wire == _WIRE_LEN:
            kind = _FIELD_KIND[field]
            feature = Feature(kind, _decode_list(kind, value, copy_bytes))  # type: ignore[arg-type]
    return feature


def decode_example(payload: bytes | memoryview, copy_bytes: bool = True) -> dict[str, Feature]:
    """Parse a serialised ``tf.train.Example`` (unknown fields are skipped, as protobuf does).

    ``copy_bytes=False`` leaves bytes values as memoryviews into ``payload`` (no copy of large frame data).
    """
    features: dict[str, Feature] = {}
    for field, wire, value in _fields(memoryview(payload)):
        if field != 1 or wire != _WIRE_LEN:
            continue
        for entry_field, entry_wire, entry in _fields(value):  # type: ignore[arg-type]
            if entry_field != 1 or entry_wire != _WIRE_LEN:
                continue
            key, feature = "", Feature(None)
            for item_field, item_wire, item in _fields(entry):  # type: ignore[arg-type]
                if item_field == 1 and item_wire == _WIRE_LEN:
                    try:
                        key = bytes(item).decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise ProtoError(f"feature name is not UTF-8: {err}") from err
                elif item_field == 2 and item_wire == _WIRE_LEN:
                    feature = _decode_feature(item, copy_bytes)  # type: ignore[arg-type]
            features[key] = feature
    return features


# ----------------------------------------------------------------------------------------------------------------
# Record framing
# ----------------------------------------------------------------------------------------------------------------


class RecordError(ValueError):
    """A record whose framing, checksums or contents are wrong; callers add the file, offset and video id."""


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC32C: rotate right by 15 bits and add a constant, modulo 2^32."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & _UINT32


def frame_record(payload: bytes) -> bytes:
    """One framed TFRecord record: header (length + CRC), payload, payload CRC."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + _FOOTER.pack(masked_crc32c(payload))


def _parse_header(header: bytes, available: int) -> int:
    """Check a 12-byte header against the bytes left in the file; return the payload length."""
    if len(header) < _HEADER.size:
        raise RecordError(f"truncated record header ({len(header)} of {_HEADER.size} bytes)")
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise RecordError("length checksum mismatch (not a record start, or corrupt header)")
    if length + _FRAMING_BYTES > available:
        raise RecordError(f"truncated record: {length + _FRAMING_BYTES} bytes expected, {available} left in the file")
    return length


def _check_payload(payload: bytes, footer: bytes) -> None:
    if _FOOTER.unpack(footer)[0] != masked_crc32c(payload):
        raise RecordError("payload checksum mismatch (corrupt record)")


def iter_records(shard_path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Read a shard front to back, yielding ``(offset, payload)`` after checking framing and both CRCs."""
    size = os.path.getsize(shard_path)
    with open(shard_path, "rb") as f:
        offset = 0
        while offset < size:
            try:
                length = _parse_header(f.read(_HEADER.size), size - offset)
                payload = f.read(length)
                _check_payload(payload, f.read(_FOOTER.size))
            except RecordError as err:
                raise DataError(f"{shard_path}: bad record at offset {offset}: {err}; {_VERIFY_HINT}") from err
            yield offset, payload
            offset += length + _FRAMING_BYTES


# ----------------------------------------------------------------------------------------------------------------
# Video records
# ----------------------------------------------------------------------------------------------------------------


def encode_video_example(frames: np.ndarray, encoding: str = "raw", jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Serialise RGB frames uint8 [N, H, W, 3] as an Example payload in the given encoding.

    ``raw`` needs frames of RAW_FRAME_SIZE x RAW_FRAME_SIZE (the published reader hard-codes that shape).
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [N, H, W, 3] with N >= 1, got {frames.dtype} {frames.shape}")
    if encoding == "raw":
        if frames.shape[1:3] != (RAW_FRAME_SIZE, RAW_FRAME_SIZE):
            raise ValueError(f"raw records hold {RAW_FRAME_SIZE}x{RAW_FRAME_SIZE} frames, got {frames.shape[1:3]}")
        bgr = np.ascontiguousarray(frames[..., ::-1])
        return encode_example({"image": bytes_feature(bgr.tobytes())})
    if encoding == "jpeg":
        jpegs = []
        for frame in frames:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=jpeg_quality)
            jpegs.append(buf.getvalue())
        n, h, w = frames.shape[:3]
        return encode_example(
            {
                "image": bytes_feature(*jpegs),
                "n_frames": int64_feature(n),
                "height": int64_feature(h),
                "width": int64_feature(w),
                "encoding": bytes_feature(b"jpeg"),
            }
        )
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def _single_int(features: Mapping[str, Feature], name: str) -> int:
    feature = features.get(name)
    if feature is None or feature.kind != "int64" or len(feature.values) != 1:
        raise RecordError(f"jpeg record needs one int64 '{name}', found {feature}")
    return int(feature.values[0])


def frame_indices(indices: Sequence[int] | np.ndarray | None, n_frames: int) -> np.ndarray:
    """Requested frame indices as int64 ``[K]`` (``arange(n_frames)`` for None); IndexError outside ``[0, N)``."""
    if indices is None:
        return np.arange(n_frames, dtype=np.int64)
    requested = np.asarray(indices)
    if requested.ndim != 1 or (requested.size and requested.dtype.kind not in "iu"):
        raise ValueError(f"frame indices must be a 1-D sequence of integers, got {requested.dtype} {requested.shape}")
    requested = requested.astype(np.int64, copy=False)
    if requested.size and (requested.min() < 0 or requested.max() >= n_frames):
        raise IndexError(
            f"frame indices {requested.min()}..{requested.max()} fall outside the record's {n_frames} frames"
        )
    return requested


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's frame header (SOFn), or None when ``data`` has none before its scan."""
    if bytes(data[:2]) != _JPEG_SOI:
        return None
    pos = 2
    while pos + _JPEG_SEGMENT_HEAD <= len(data):
        if data[pos] != _JPEG_MARKER_PREFIX:
            return None
        marker = data[pos + 1]
        if marker == _JPEG_MARKER_PREFIX:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in _JPEG_SOF_MARKERS:
            if pos + _JPEG_SOF_END > len(data):
                return None
            return int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(data[pos + 7 : pos + 9], "big")
        if marker in _JPEG_STOP_MARKERS:
            return None
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


@dataclass(frozen=True)
class VideoRecord:
    """A video record parsed down to its frame data, nothing decoded yet (see ``parse_video_example``).

    ``data`` holds one view into the payload per stored frame, no copy: its BGR bytes (raw) or its JPEG (jpeg).
    """

    encoding: str
    height: int
    width: int
    data: tuple[memoryview, ...]

    @property
    def n_frames(self) -> int:
        """Stored frame count N."""
        return len(self.data)

    def decode(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """RGB frames uint8 ``[K, H, W, 3]`` for ``indices`` in their order (all N frames when None).

        Repeats are allowed; only the requested frames are decoded, each distinct one once. Raises RecordError when
        a requested JPEG is unreadable or not of the recorded size.
        """
        wanted = frame_indices(indices, self.n_frames)
        distinct, inverse = np.unique(wanted, return_inverse=True)
        frames = np.empty((len(distinct), self.height, self.width, 3), dtype=np.uint8)
        decode_frame = self._decode_raw if self.encoding == "raw" else self._decode_jpeg
        for slot, i in enumerate(distinct.tolist()):
            frames[slot] = decode_frame(i)
        if np.array_equal(distinct, wanted):  # ascending without repeats (e.g. all frames): already in order
            return frames
        return frames[inverse.reshape(-1)]

    def _decode_raw(self, i: int) -> np.ndarray:
        # BGR -> RGB as three channel copies: ~1.7x faster than PIL's BGR unpacker plus the copy out of the image,
        # ~3x faster than numpy's strided copy of bgr[..., ::-1]
        bgr = np.frombuffer(self.data[i], dtype=np.uint8).reshape(self.height, self.width, 3)
        rgb = np.empty_like(bgr)
        for channel in range(3):
            rgb[..., channel] = bgr[..., 2 - channel]
        return rgb

    def _decode_jpeg(self, i: int) -> np.ndarray:
        size = jpeg_size(self.data[i])
        if size is None:
            raise RecordError(f"frame {i} is not a readable JPEG (no JPEG frame header)")
        if size != (self.height, self.width):
            raise RecordError(f"frame {i} is {size}, record says {(self.height, self.width)}")
        if decode_jpeg is None:  # pragma: no cover - a torchvision without image ops
            return self._decode_jpeg_pil(i)
        # torchvision's libjpeg-turbo: PIL's pixels (same library, same default IDCT and upsampling; tests pin the
        # equality) in about half the time; the bytearray copy (~16 KB) makes the buffer writable for torch. Its
        # deprecation notice (requirements.txt pins torchvision 0.29.1) would otherwise come with every frame.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                data = torch.frombuffer(bytearray(self.data[i]), dtype=torch.uint8)
                image = decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as err:
            raise RecordError(f"frame {i} is not a readable JPEG: {err}") from err
        if tuple(image.shape) != (3, self.height, self.width):
            raise RecordError(f"frame {i} decodes to {tuple(image.shape)}, record says {(self.height, self.width)}")
        return image.permute(1, 2, 0).numpy()  # the decoder's HWC memory: no copy

    def _decode_jpeg_pil(self, i: int) -> np.ndarray:
        # libjpeg straight into an image of the known size: PIL's pixels without Image.open's Python marker parsing
        try:
            image = Image.frombytes("RGB", (self.width, self.height), self.data[i], "jpeg", "RGB", "")
        except (OSError, ValueError) as err:
            raise RecordError(f"frame {i} is not a readable JPEG: {err}") from err
        return np.asarray(image)


def parse_video_example(payload: bytes | memoryview) -> VideoRecord:
    """Parse an Example payload's header and frame layout without decoding any frame; raise RecordError if bad."""
    try:
        features = decode_example(payload, copy_bytes=False)
    except ProtoError as err:
        raise RecordError(f"not a tf.train.Example: {err}") from err
    image = features.get("image")
    if image is None or image.kind != "bytes" or not image.values:
        raise RecordError(f"no bytes feature 'image' (features: {sorted(features)})")
    encoding_feature = features.get("encoding")
    encoding = "raw" if encoding_feature is None else b"".join(encoding_feature.values).decode("ascii", "replace")
    if encoding == "raw":
        data = image.values[0]
        frame_bytes = RAW_FRAME_SIZE * RAW_FRAME_SIZE * 3
        if len(data) == 0 or len(data) % frame_bytes:
            raise RecordError(f"raw image of {len(data)} bytes is not a whole number of 256x256x3 frames")
        frames = tuple(data[start : start + frame_bytes] for start in range(0, len(data), frame_bytes))
        return VideoRecord(encoding, RAW_FRAME_SIZE, RAW_FRAME_SIZE, frames)
    if encoding == "jpeg":
        n, h, w = (_single_int(features, name) for name in ("n_frames", "height", "width"))
        if len(image.values) != n:
            raise RecordError(f"n_frames says {n} but 'image' holds {len(image.values)} JPEGs")
        if h < 1 or w < 1:
            raise RecordError(f"jpeg record says its frames are {(h, w)}; height and width must be >= 1")
        return VideoRecord(encoding, h, w, tuple(image.values))
    raise RecordError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def count_frames(payload: bytes | memoryview) -> int:
    """Stored frame count N of an Example payload, from its header alone; raise RecordError if bad."""
    return parse_video_example(payload).n_frames


def decode_video_example(
    payload: bytes | memoryview, indices: Sequence[int] | np.ndarray | None = None
) -> tuple[np.ndarray, str]:
    """Decode an Example payload into ``(frames uint8 [K, H, W, 3] RGB, encoding)``; raise RecordError if bad.

    ``indices`` picks stored frames in the order given (repeats allowed); None decodes all N of them.
    """
    record = parse_video_example(payload)
    return record.decode(indices), record.encoding


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
    """Parse ``video_id \\t shard \\t offset``; a malformed line raises DataError naming file and line."""
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2].isdigit():
        raise DataError(
            f"{index_path}, line {line_number}: expected 'video_id<TAB>shard<TAB>offset', got {line.rstrip()!r}; "
            "fix or delete the line, or rebuild the index with frozen_tfrecord.py"
        )
    return IndexEntry(parts[0], parts[1], int(parts[2]))


def read_index(index_path: str | os.PathLike) -> list[IndexEntry]:
    """All entries of an index, in file order (blank lines are ignored)."""
    try:
        with open(index_path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as err:
        raise DataError(f"{index_path}: cannot read the shard index ({err}); build it with frozen_tfrecord.py") from err
    return [parse_index_line(line, index_path, number) for number, line in enumerate(lines, 1) if line.strip()]


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
    shards are kept, the trailing temporary shard and its index lines are discarded, and writing continues with
    the next shard number, so the finished output equals an uninterrupted build.
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
        self._index = open(self.index_path, "a", encoding="utf-8")
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
        """Keep the index lines of complete shards; drop a trailing temporary shard and its lines."""
        for name in self._shard_files(_TEMP_SUFFIX).values():
            logger.info("discarding the incomplete shard %s of an interrupted build", name)
            os.remove(os.path.join(self._dir, name))
        if not os.path.exists(self.index_path):
            return []
        with open(self.index_path, encoding="utf-8") as f:
            lines = f.readlines()
        if lines and not lines[-1].endswith("\n"):
            lines.pop()  # a line cut short by the interruption; its shard was never completed
        kept: list[IndexEntry] = []
        index_dir = Path(self.index_path).parent
        for number, line in enumerate(lines, 1):
            if line.strip():
                entry = parse_index_line(line, self.index_path, number)
                if resolve_shard(entry.shard, index_dir).is_file():
                    kept.append(entry)
        if len(kept) != len(lines):
            logger.info(
                "resuming %s: kept %d videos of complete shards, dropped %d index lines of an incomplete one",
                self.index_path,
                len(kept),
                len(lines) - len(kept),
            )
            tmp = self.index_path + _TEMP_SUFFIX
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(f"{e.video_id}\t{e.shard}\t{e.offset}\n" for e in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.index_path)
        elif kept:
            logger.info("resuming %s: %d videos already written", self.index_path, len(kept))
        return kept

    def _next_shard_number(self) -> int:
        return max(self._shard_files(), default=-1) + 1

    def write(self, video_id: str, payload: bytes) -> IndexEntry:
        """Append one record (an encoded Example) and its index line; return the index entry."""
        if not video_id or any(c in video_id for c in "\t\r\n"):
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
        self._offset += len(payload) + _FRAMING_BYTES
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
            length = _parse_header(os.pread(fd, _HEADER.size, entry.offset), size - entry.offset)
            payload = os.pread(fd, length, entry.offset + _HEADER.size)  # read apart from the footer: no slice copy
            _check_payload(payload, os.pread(fd, _FOOTER.size, entry.offset + _HEADER.size + length))
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
        self, video_id: str, record: VideoRecord, indices: Sequence[int] | np.ndarray | None = None
    ) -> np.ndarray:
        """``record.decode(indices)`` for the record of ``video_id``, a bad frame raising DataError naming its file."""
        try:
            return record.decode(indices)
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
        frames = np.zeros((self.max_frames, record.height, record.width, 3), dtype=np.uint8)
        frames[: len(wanted)] = self.reader.decode(video_id, record, wanted)  # only the planned frames are decoded
        return frames, mask
