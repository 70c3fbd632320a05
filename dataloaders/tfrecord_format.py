"""The TFRecord video format, without TensorFlow: record framing, masked CRC, ``tf.train.Example`` protobuf, and
the raw / jpeg video payloads. Nothing here touches a file; shards and their index are ``dataloaders.tfrecord_io``.

Record framing (TensorFlow's): uint64 LE payload length, uint32 masked CRC32C of those 8 bytes, the payload, uint32
masked CRC32C of the payload. Every record payload is a serialised ``tf.train.Example``.

Two encodings, detected per record:

- ``raw`` (published, byte for byte): one feature ``image`` = a bytes list holding one string, the uint8 array
  ``(N, 256, 256, 3)`` in **BGR** C-order.
- ``jpeg``: ``image`` holds one JPEG per frame (RGB), plus int64 ``n_frames``, ``height``, ``width`` and bytes
  ``encoding`` = ``b"jpeg"``. A record without ``encoding`` is raw.

Sizes read from a record are bounded before anything is allocated from them: a jpeg record may claim at most
``MAX_RECORD_FRAMES`` frames of at most ``MAX_FRAME_PIXELS`` pixels (``MAX_FRAME_SIDE`` a side); more is a
RecordError. Readers decode only the frames asked for (``parse_video_example`` reads the header and frame layout,
``VideoRecord.decode(indices)`` the chosen frames).
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import crc32c
import numpy as np
import torch
from PIL import Image

try:  # torchvision's libjpeg-turbo decoder (deprecated in 0.29 in favour of torchcodec, still shipped): PIL otherwise
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a torchvision without image ops
    decode_jpeg = None

RAW_FRAME_SIZE = 256  # the published raw layout stores frames squashed to 256 x 256
DEFAULT_JPEG_QUALITY = 90
ENCODINGS = ("raw", "jpeg")
MAX_RECORD_FRAMES = 100_000  # frames one jpeg record may claim (the published builder stores 12)
MAX_FRAME_SIDE = 16_384  # pixels per side of a jpeg record's frames
MAX_FRAME_PIXELS = 8192 * 8192  # height * width of one frame (192 MiB decoded): bounds every frame allocation

_CRC_MASK_DELTA = 0xA282EAD8
_UINT32 = 0xFFFFFFFF
_UINT64 = (1 << 64) - 1
HEADER = struct.Struct("<QI")  # payload length, masked CRC of the length bytes
FOOTER = struct.Struct("<I")  # masked CRC of the payload
FRAMING_BYTES = HEADER.size + FOOTER.size
_JPEG_SOI = b"\xff\xd8"  # start of image
_JPEG_MARKER_PREFIX = 0xFF
_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STOP_MARKERS = frozenset({0xD9, 0xDA})  # end of image, start of scan: no frame header after them
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: markers without a length field
_JPEG_SEGMENT_HEAD = 4  # marker (2 bytes) + segment length (2 bytes)
_JPEG_SOF_END = 9  # marker, length, precision, height (2), width (2)


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
    return length + struct.pack("<I", masked_crc32c(length)) + payload + FOOTER.pack(masked_crc32c(payload))


def parse_header(header: bytes, available: int) -> int:
    """Check a 12-byte header against the bytes left in the file; return the payload length."""
    if len(header) < HEADER.size:
        raise RecordError(f"truncated record header ({len(header)} of {HEADER.size} bytes)")
    length, length_crc = HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise RecordError("length checksum mismatch (not a record start, or corrupt header)")
    if length + FRAMING_BYTES > available:
        raise RecordError(f"truncated record: {length + FRAMING_BYTES} bytes expected, {available} left in the file")
    return length


def check_payload(payload: bytes, footer: bytes) -> None:
    if FOOTER.unpack(footer)[0] != masked_crc32c(payload):
        raise RecordError("payload checksum mismatch (corrupt record)")


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


def check_frame_layout(n_frames: int, height: int, width: int) -> None:
    """Reject a frame count or size read from a record before anything is allocated from it (RecordError).

    Bounds: 1 <= n_frames <= MAX_RECORD_FRAMES, 1 <= height, width <= MAX_FRAME_SIDE, height * width <=
    MAX_FRAME_PIXELS.
    """
    if not 1 <= n_frames <= MAX_RECORD_FRAMES:
        raise RecordError(f"record claims {n_frames} frames; a record holds 1..{MAX_RECORD_FRAMES}")
    if not (1 <= height <= MAX_FRAME_SIDE and 1 <= width <= MAX_FRAME_SIDE) or height * width > MAX_FRAME_PIXELS:
        raise RecordError(
            f"record claims frames of {height}x{width} pixels; sides must be 1..{MAX_FRAME_SIDE} and a frame at most "
            f"{MAX_FRAME_PIXELS} pixels"
        )


@dataclass(frozen=True)
class VideoRecord:
    """A video record parsed down to its frame data, nothing decoded yet (see ``parse_video_example``).

    ``data`` holds one view into the payload per stored frame, no copy: its BGR bytes (raw) or its JPEG (jpeg).
    """

    encoding: str
    height: int
    width: int
    data: tuple[memoryview, ...]

    def __post_init__(self) -> None:
        check_frame_layout(len(self.data), self.height, self.width)  # decode allocates [K, H, W, 3] from these

    @property
    def n_frames(self) -> int:
        """Stored frame count N."""
        return len(self.data)

    def decode(self, indices: Sequence[int] | np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """RGB frames uint8 ``[K, H, W, 3]`` for ``indices`` in their order (all N frames when None).

        Repeats are allowed; only the requested frames are decoded, each distinct one once. With ``out`` (uint8
        ``[K, H, W, 3]`` of any memory layout, e.g. the first K rows of a padded clip buffer) the frames are written
        into it and it is returned: raw frames then go from the record's bytes to their slot in one pass (the
        BGR -> RGB copy) instead of through two intermediate arrays. Raises RecordError when a requested JPEG is
        unreadable or not of the recorded size.
        """
        wanted = frame_indices(indices, self.n_frames)
        shape = (len(wanted), self.height, self.width, 3)
        if out is not None and (out.shape != shape or out.dtype != np.uint8 or not out.flags.writeable):
            raise ValueError(f"decode(out=...) needs a writable uint8 array of shape {shape}, got "
                             f"{out.dtype} {out.shape}")  # fmt: skip
        distinct, inverse = np.unique(wanted, return_inverse=True)
        in_order = np.array_equal(distinct, wanted)  # ascending without repeats (e.g. all frames)
        frames = out if in_order and out is not None else np.empty((len(distinct), *shape[1:]), dtype=np.uint8)
        for slot, i in enumerate(distinct.tolist()):
            if self.encoding == "raw":
                self._decode_raw_into(i, frames[slot])
            else:
                frames[slot] = self._decode_jpeg(i)
        if in_order:
            return frames
        if out is None:
            return frames[inverse.reshape(-1)]
        np.take(frames, inverse.reshape(-1), axis=0, out=out)
        return out

    def _decode_raw_into(self, i: int, rgb: np.ndarray) -> None:
        # BGR -> RGB as three channel copies straight into the destination: ~1.7x faster than PIL's BGR unpacker
        # plus the copy out of the image, ~3x faster than numpy's strided copy of bgr[..., ::-1]
        bgr = np.frombuffer(self.data[i], dtype=np.uint8).reshape(self.height, self.width, 3)
        for channel in range(3):
            rgb[..., channel] = bgr[..., 2 - channel]

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
        check_frame_layout(n, h, w)
        if len(image.values) != n:
            raise RecordError(f"n_frames says {n} but 'image' holds {len(image.values)} JPEGs")
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
