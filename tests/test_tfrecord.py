"""Indexed TFRecord shards: protobuf/framing equality with the ``tfrecord`` package (TF's format), round trips,
the builder CLI (resume, skipped videos, --verify) and the shard-backed VideoSource."""

from __future__ import annotations

import fcntl
import io
import itertools
import json
import multiprocessing
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tfrecord import example_pb2
from tfrecord.reader import tfrecord_loader
from tfrecord.writer import TFRecordWriter

import frozen_tfrecord
from dataloaders import shard_build, video_io
from dataloaders.errors import ConfigError, DataError
from dataloaders.tfrecord_format import (
    MAX_FRAME_PIXELS,
    MAX_FRAME_SIDE,
    MAX_RECORD_FRAMES,
    RAW_FRAME_SIZE,
    Feature,
    RecordError,
    VideoRecord,
    bytes_feature,
    count_frames,
    decode_example,
    decode_video_example,
    encode_example,
    encode_video_example,
    float_feature,
    frame_record,
    int64_feature,
    jpeg_size,
    masked_crc32c,
    parse_video_example,
)
from dataloaders.tfrecord_io import (
    ShardReader,
    ShardVideoSource,
    ShardWriter,
    iter_records,
    read_index,
    split_index,
    verify_index,
)
from tests.conftest import REPO

S = RAW_FRAME_SIZE


def smooth_frames(n: int, h: int = S, w: int = S, seed: int = 0) -> np.ndarray:
    """Natural-ish RGB frames: smooth gradients and a moving blob, uint8 [n, h, w, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for t in range(n):
        cx, cy = w * (0.2 + 0.6 * t / max(n, 1)), h * 0.5
        blob = 120 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (0.15 * w) ** 2))
        base = rng.uniform(30, 90, size=3)
        frame = np.stack([base[0] + 0.3 * x + blob, base[1] + 0.3 * y, base[2] + 0.2 * (x + y) - 0.5 * blob], -1)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_frame_folders(root: Path, n_videos: int, n_frames: int = 3) -> list[str]:
    """One folder of PNG frames per video (size 40x32, squashed to 256 by the builder); returns the ids."""
    ids = []
    for v in range(n_videos):
        folder = root / f"vid{v:03d}"
        folder.mkdir(parents=True)
        for i, frame in enumerate(smooth_frames(n_frames, 32, 40, seed=v)):
            Image.fromarray(frame).save(folder / f"{i:04d}.png")
        ids.append(folder.name)
    return ids


def write_video(path: Path, frames: np.ndarray, fps: int = 10) -> None:
    """A small real mp4 (mpeg4) written with PyAV."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def build(argv: list[str], **kwargs) -> dict:
    """Run the builder (``shard_build.build_shards``) on the CLI's parsed flags and return its summary."""
    options = shard_build.BuildOptions.from_namespace(frozen_tfrecord.build_parser().parse_args(argv))
    return shard_build.build_shards(options, **kwargs)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ protobuf + framing


def test_example_bytes_equal_protobuf() -> None:
    image = bytes(range(256)) * 3
    ref = example_pb2.Example(
        features=example_pb2.Features(
            feature={"image": example_pb2.Feature(bytes_list=example_pb2.BytesList(value=[image]))}
        )
    )
    assert encode_example({"image": bytes_feature(image)}) == ref.SerializeToString()  # published layout

    features = {
        "image": bytes_feature(b"abc", b"", b"\x00\xff"),
        "n_frames": int64_feature(-1, 0, 300, 2**63 - 1, -(2**63)),
        "scores": float_feature(1.5, -0.1, 3e38),
        "empty_bytes": Feature("bytes", ()),
        "empty_ints": Feature("int64", ()),
        "no_kind": Feature(None),
    }
    ref = example_pb2.Example()
    ref.features.feature["image"].bytes_list.value.extend([b"abc", b"", b"\x00\xff"])
    ref.features.feature["n_frames"].int64_list.value.extend([-1, 0, 300, 2**63 - 1, -(2**63)])
    ref.features.feature["scores"].float_list.value.extend([1.5, -0.1, 3e38])
    ref.features.feature["empty_bytes"].bytes_list.SetInParent()
    ref.features.feature["empty_ints"].int64_list.SetInParent()
    ref.features.feature["no_kind"].SetInParent()
    serialized = ref.SerializeToString(deterministic=True)
    assert encode_example(features) == serialized
    decoded = decode_example(serialized)
    assert decoded["n_frames"].values == (-1, 0, 300, 2**63 - 1, -(2**63))
    assert decoded["scores"].values == pytest.approx((1.5, -0.1, 3e38), rel=1e-7)
    assert encode_example(decoded) == serialized


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(
            st.lists(st.binary(max_size=20), max_size=4).map(lambda v: ("bytes", v)),
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4).map(lambda v: ("int64", v)),
            st.lists(st.floats(width=32, allow_nan=False), max_size=4).map(lambda v: ("float", v)),
        ),
        max_size=5,
    ).filter(lambda d: not any(a != b and b.startswith(a) for a in d for b in d))
)
def test_example_matches_protobuf_property(spec: dict) -> None:
    """Against upb, whose deterministic map order puts a key after its own extensions ("00" < "0"), so the
    property uses prefix-free key sets; prefixes are checked against protobuf's reference order below."""
    ref = example_pb2.Example()
    ref.features.SetInParent()
    for key, (kind, values) in spec.items():
        getattr(ref.features.feature[key], f"{kind}_list").value.extend(values)
    serialized = ref.SerializeToString(deterministic=True)
    ours = encode_example({key: Feature(kind, tuple(values)) for key, (kind, values) in spec.items()})
    assert ours == serialized
    parsed = example_pb2.Example()
    parsed.ParseFromString(ours)
    assert parsed == ref
    assert encode_example(decode_example(serialized)) == serialized


def test_example_key_order_matches_reference_protobuf() -> None:
    """Map keys in byte order, as C++ protobuf (TensorFlow) and protobuf's pure-Python serialiser write them."""
    keys = ["00", "0", "", "b"]
    script = (
        "from tfrecord import example_pb2\n"
        "e = example_pb2.Example()\n"
        f"for k in {keys!r}: e.features.feature[k].bytes_list.value.append(k.encode())\n"
        "print(e.SerializeToString(deterministic=True).hex())"
    )
    env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    ref = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert encode_example({k: bytes_feature(k.encode()) for k in keys}).hex() == ref.stdout.strip()


def test_decode_unpacked_lists_and_unknown_fields() -> None:
    # int64 list written unpacked (wire type 0) and a float as fixed32, plus an unknown field 7 in the Feature.
    int_list = b"\x08\x05\x08\x7f"  # value: 5, value: 127
    float_list = b"\x0d" + struct.pack("<f", 2.5)
    feature_ints = b"\x1a" + bytes([len(int_list)]) + int_list + b"\x38\x01"
    feature_floats = b"\x12" + bytes([len(float_list)]) + float_list

    def entry(key: bytes, feature: bytes) -> bytes:
        body = b"\x0a" + bytes([len(key)]) + key + b"\x12" + bytes([len(feature)]) + feature
        return b"\x0a" + bytes([len(body)]) + body

    features = entry(b"a", feature_ints) + entry(b"b", feature_floats)
    payload = b"\x0a" + bytes([len(features)]) + features
    ref = example_pb2.Example()
    ref.ParseFromString(payload)
    decoded = decode_example(payload)
    assert decoded["a"].values == tuple(ref.features.feature["a"].int64_list.value) == (5, 127)
    assert decoded["b"].values == tuple(ref.features.feature["b"].float_list.value) == (2.5,)


def test_framing_equals_tfrecord_writer(tmp_path: Path) -> None:
    frames = smooth_frames(2)[..., ::-1]
    ref_path = tmp_path / "ref.tfrecord"
    writer = TFRecordWriter(str(ref_path))
    writer.write({"image": (np.ascontiguousarray(frames).tobytes(), "byte")})
    writer.write({"image": (b"second", "byte")})
    writer.close()
    payloads = [encode_example({"image": bytes_feature(np.ascontiguousarray(frames).tobytes())})]
    payloads.append(encode_example({"image": bytes_feature(b"second")}))
    assert b"".join(frame_record(p) for p in payloads) == ref_path.read_bytes()
    assert masked_crc32c(b"") == struct.unpack("<I", TFRecordWriter.masked_crc(b""))[0]
    assert [p for _, p in iter_records(ref_path)] == payloads


def test_published_layout_written_by_tfrecord_package_reads_back(tmp_path: Path) -> None:
    """Shards + index in the published layout (index names shards by a path on another machine) read identically."""
    out = tmp_path / "WebVid_TFRecord"
    out.mkdir()
    videos = {f"vid{i}": smooth_frames(2 + i, seed=i) for i in range(3)}
    writer = TFRecordWriter(str(out / "path-00000.tfrecord"))
    lines, offset = [], 0
    for vid, rgb in videos.items():
        bgr = np.ascontiguousarray(rgb[..., ::-1]).tobytes()
        payload = TFRecordWriter.serialize_tf_example({"image": (bgr, "byte")})
        writer.write({"image": (bgr, "byte")})
        lines.append(f"{vid}\t/apdcephfs/elsewhere/WebVid_TFRecord/path-00000.tfrecord\t{offset}\n")
        offset += len(payload) + 16
    writer.close()
    (out / "path.index").write_text("".join(lines))
    reader = ShardReader(out)  # a folder resolves to its path.index
    assert reader.video_ids == list(videos)
    for vid, rgb in videos.items():
        frames, encoding = reader.read_with_encoding(vid)
        assert encoding == "raw" and frames.dtype == np.uint8
        np.testing.assert_array_equal(frames, rgb)


def test_our_shards_read_by_tfrecord_package(tmp_path: Path) -> None:
    rgb = smooth_frames(3)
    with ShardWriter(tmp_path / "path", examples_per_shard=10) as writer:
        writer.write("a", encode_video_example(rgb, "raw"))
        writer.write("b", encode_video_example(rgb, "jpeg"))
    records = list(tfrecord_loader(str(tmp_path / "path-00000.tfrecord"), None))
    assert np.array_equal(np.frombuffer(records[0]["image"], np.uint8).reshape(rgb.shape), rgb[..., ::-1])
    assert list(records[1]["n_frames"]) == [3] and bytes(records[1]["encoding"]) == b"jpeg"


# ----------------------------------------------------------------------------------------------- round trips


def test_round_trip_raw_and_jpeg(tmp_path: Path) -> None:
    raw, jpeg = smooth_frames(4, seed=1), smooth_frames(3, 96, 128, seed=2)
    with ShardWriter(tmp_path / "path", examples_per_shard=2) as writer:
        writer.write("raw", encode_video_example(raw, "raw"))
        writer.write("jpeg", encode_video_example(jpeg, "jpeg", jpeg_quality=90))
        writer.write("third", encode_video_example(raw[:1], "raw"))
    reader = ShardReader(tmp_path / "path.index")
    out_raw, enc_raw = reader.read_with_encoding("raw")
    assert enc_raw == "raw"
    np.testing.assert_array_equal(out_raw, raw)  # BGR on disk, RGB back, exact
    out_jpeg, enc_jpeg = reader.read_with_encoding("jpeg")
    assert enc_jpeg == "jpeg" and out_jpeg.shape == jpeg.shape
    assert np.abs(out_jpeg.astype(int) - jpeg).mean() < 2.0
    # a wrongly ordered channel would be off by far more than JPEG error on these colourful frames
    assert np.abs(out_jpeg[..., ::-1].astype(int) - jpeg).mean() > 10
    np.testing.assert_array_equal(reader.read("third"), raw[:1])
    # ShardVideoSource's clips: decoded into the padded clip buffer, zero padding
    source = ShardVideoSource(tmp_path / "path.index", max_frames=5, pad_mode="zero")
    clip_raw, mask_raw = source.load("raw")
    clip_jpeg, mask_jpeg = source.load("jpeg")
    np.testing.assert_array_equal(clip_raw[:4], raw)
    np.testing.assert_array_equal(clip_jpeg[:3], out_jpeg)
    assert mask_raw.tolist() == [1, 1, 1, 1, 0] and mask_jpeg.tolist() == [1, 1, 1, 0, 0]
    assert not clip_raw[4:].any() and not clip_jpeg[3:].any()
    with pytest.raises(ValueError, match="256x256"):
        encode_video_example(jpeg, "raw")


def test_index_format(tmp_path: Path) -> None:
    ids = write_frame_folders(tmp_path / "frames", 5)
    out = tmp_path / "out"
    summary = build(["--input_dir", str(tmp_path / "frames"), "--output_dir", str(out), "--examples_per_shard", "2"])
    assert summary["videos_written"] == 5 and summary["shards"] == 3 and summary["skipped"] == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "path-00000.tfrecord",
        "path-00001.tfrecord",
        "path-00002.tfrecord",
        "path.index",
        "path.skipped.json",
    ]
    lines = (out / "path.index").read_text().splitlines()
    expected = []
    for shard in range(3):
        shard_path = os.path.join(str(out), f"path-{shard:05d}.tfrecord")  # as the published builder writes it
        expected += [(shard_path, offset) for offset, _ in iter_records(shard_path)]
    assert [line.split("\t") for line in lines] == [[vid, s, str(o)] for vid, (s, o) in zip(ids, expected, strict=True)]
    assert summary["bytes"] == sum(os.path.getsize(s) for s in {s for s, _ in expected})
    reader = ShardReader(out / "path.index")
    for vid in ids:
        np.testing.assert_array_equal(reader.read(vid), shard_build.read_frame_folder(str(tmp_path / "frames" / vid)))


# --------------------------------------------------------------------------------------------- builder: resume


class Interrupt(Exception):
    pass


def _stop_after(k: int):
    def hook(n: int) -> None:
        if n == k:
            raise Interrupt

    return hook


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes().replace(str(out).encode(), b"OUT") for p in sorted(out.iterdir())}


@pytest.mark.parametrize("stop_after", [3, 4])  # mid-shard, and right after a shard completed
def test_resume_equals_uninterrupted_build(tmp_path: Path, stop_after: int) -> None:
    write_frame_folders(tmp_path / "frames", 7, n_frames=2)
    flags = ["--input_dir", str(tmp_path / "frames"), "--examples_per_shard", "2", "--encoding", "jpeg"]
    build([*flags, "--output_dir", str(tmp_path / "ref")])

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        build([*flags, "--output_dir", str(out)], on_record=_stop_after(stop_after))
    assert (stop_after % 2 == 1) == any(p.name.endswith(".tmp") for p in out.iterdir())
    summary = build([*flags, "--output_dir", str(out)])
    assert summary["resumed_from"] == stop_after - stop_after % 2  # the incomplete shard's videos are redone
    assert summary["videos_indexed"] == 7
    assert _snapshot(out) == _snapshot(tmp_path / "ref")


def test_resume_after_kill_with_partial_index_line(tmp_path: Path) -> None:
    write_frame_folders(tmp_path / "frames", 5, n_frames=2)
    flags = ["--input_dir", str(tmp_path / "frames"), "--examples_per_shard", "2"]
    build([*flags, "--output_dir", str(tmp_path / "ref")])
    out = tmp_path / "killed"
    with pytest.raises(Interrupt):
        build([*flags, "--output_dir", str(out)], on_record=_stop_after(3))
    with open(out / "path.index", "a") as f:
        f.write("vid003\tpath-0000")  # a line cut short by a kill
    build([*flags, "--output_dir", str(out)])
    assert _snapshot(out) == _snapshot(tmp_path / "ref")
    assert build([*flags, "--output_dir", str(out)])["videos_written"] == 0  # a finished build has nothing to do


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """``python frozen_tfrecord.py ARGV`` in a fresh process, from the repository root."""
    return subprocess.run(
        [sys.executable, str(REPO / "frozen_tfrecord.py"), *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def _index_lines(index: Path) -> list[bytes]:
    return index.read_bytes().split(b"\n")


@pytest.mark.parametrize("torn_at", ["shard_boundary", "inside_a_complete_shard"])
def test_cli_resume_repairs_a_torn_index_tail(tmp_path: Path, torn_at: str) -> None:
    """A build killed while writing an index line leaves a partial last line; the rerun drops it and rebuilds that
    video (before the fix it appended to the partial line, reported success, and the index no longer parsed)."""
    ids = write_frame_folders(tmp_path / "frames", 5, n_frames=2)
    flags = ["--input_dir", str(tmp_path / "frames"), "--examples_per_shard", "2", "--encoding", "jpeg"]
    ref = tmp_path / "ref"
    assert run_cli(*flags, "--output_dir", str(ref)).returncode == 0
    out = tmp_path / "torn"
    assert run_cli(*flags, "--output_dir", str(out)).returncode == 0
    index = out / "path.index"
    lines = _index_lines(index)  # five lines and the empty piece after the last newline
    if torn_at == "shard_boundary":
        # killed while indexing vid004, the first record of shard 2: shard 2 is still a temporary file and only the
        # first 9 bytes of its index line ("vid004\t" and 2 bytes of the shard path) reached the disk
        os.replace(out / "path-00002.tfrecord", out / "path-00002.tfrecord.tmp")
        torn = b"\n".join(lines[:4]) + b"\n" + lines[4][:9]
    else:  # vid003's line, the last of the complete shard 1, cut short (so vid004 was never written)
        os.remove(out / "path-00002.tfrecord")
        torn = b"\n".join(lines[:3]) + b"\n" + lines[3][:12]
    index.write_bytes(torn)
    result = run_cli(*flags, "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    redone = 1 if torn_at == "shard_boundary" else 2
    assert (
        summary["videos_written"] == redone and summary["videos_indexed"] == 5 and summary["resumed_from"] == 5 - redone
    )
    reader, reference = ShardReader(index), ShardReader(ref / "path.index")
    assert reader.video_ids == ids and all(line.count(b"\t") == 2 for line in _index_lines(index)[:-1])
    for vid in ids:
        np.testing.assert_array_equal(reader.read(vid), reference.read(vid))
    assert verify_index(index)["errors"] == []
    if torn_at == "shard_boundary":  # the rebuilt shard 2 equals the uninterrupted build's, byte for byte
        assert _snapshot(out) == _snapshot(ref)
    assert not (out / shard_build.LOCK_NAME).exists()


def test_cli_refuses_a_second_build_into_a_locked_folder(tmp_path: Path) -> None:
    """While a build holds the output folder's lock, another build into it is refused with one error line."""
    write_frame_folders(tmp_path / "frames", 2, n_frames=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "path.index").write_text("keep\tpath-00000.tfrecord\t0\n")  # an earlier build's files stay untouched
    (out / "path-00000.tfrecord.tmp").write_bytes(b"partial")
    before = _snapshot(out)
    flags = ["--input_dir", str(tmp_path / "frames"), "--output_dir", str(out)]
    with open(out / shard_build.LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running build holds
        result = run_cli(*flags)
        assert result.returncode == frozen_tfrecord.EXIT_BAD_INPUT and result.stdout == ""
        assert result.stderr.splitlines() == [
            f"error: {out}: another shard build is writing into this folder (it holds {out / shard_build.LOCK_NAME}); "
            "wait for it to finish, or pass another --output_dir"
        ]
        assert _snapshot(out) == {**before, shard_build.LOCK_NAME: b""}
    result = run_cli(*flags)  # lock released: the build runs (resuming over the earlier files) and removes the lock
    assert result.returncode == 0, result.stderr
    assert ShardReader(out / "path.index").video_ids == ["vid000", "vid001"]  # "keep" pointed at an incomplete shard
    assert not (out / shard_build.LOCK_NAME).exists()


def test_output_lock_in_process(tmp_path: Path) -> None:
    """The lock is exclusive between open files (and so between processes); it is free again after the block."""
    with shard_build.output_lock(tmp_path / "new") as lock_path:
        assert lock_path == tmp_path / "new" / shard_build.LOCK_NAME and lock_path.exists()
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'new'}: another shard build is writing")):
            with shard_build.output_lock(tmp_path / "new"):
                pass
    assert not lock_path.exists()
    with shard_build.output_lock(tmp_path / "new"):
        pass


def test_parallel_build_equals_serial(tmp_path: Path) -> None:
    write_frame_folders(tmp_path / "frames", 6, n_frames=2)
    flags = ["--input_dir", str(tmp_path / "frames"), "--examples_per_shard", "4"]
    build([*flags, "--output_dir", str(tmp_path / "serial")])
    build([*flags, "--output_dir", str(tmp_path / "parallel"), "--num_workers", "2"])
    serial = _snapshot(tmp_path / "serial")
    assert len(serial) == 4  # 2 shards, index, skipped report
    assert _snapshot(tmp_path / "parallel") == serial


# ------------------------------------------------------------------------------------ builder: bad inputs


def test_skipped_videos_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    frames = tmp_path / "frames"
    write_frame_folders(frames, 3, n_frames=2)
    (frames / "broken").mkdir()
    (frames / "broken" / "0000.jpg").write_bytes(b"not a jpeg")
    (frames / "empty").mkdir()
    video_list = tmp_path / "list.json"
    video_list.write_text(json.dumps([{"video_id": v} for v in ["vid000", "broken", "missing", "empty", "vid002"]]))
    out = tmp_path / "out"
    argv = ["--input_dir", str(frames), "--video_list", str(video_list), "--output_dir", str(out)]
    assert frozen_tfrecord.main(argv) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["videos_written"] == 2 and summary["skipped"] == 3
    skipped = json.loads((out / "path.skipped.json").read_text())
    assert [s["video_id"] for s in skipped] == ["broken", "missing", "empty"]
    assert skipped[0]["path"] == str(frames / "broken") and "0000.jpg" in skipped[0]["error"]
    assert skipped[1]["path"] is None and "not found" in skipped[1]["error"]
    assert [e.video_id for e in read_index(out / "path.index")] == ["vid000", "vid002"]


def test_build_from_videos_and_csv_list(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = smooth_frames(20, 64, 80, seed=3)
    write_video(videos / "clip_a.mp4", clip)
    write_video(videos / "clip_b.mp4", clip[:5])
    (videos / "bad.mp4").write_bytes(b"\x00" * 100)
    (tmp_path / "list.csv").write_text("video_id,caption\nclip_b,x\nbad,y\nclip_a,z\nclip_b,again\n")
    out = tmp_path / "out"
    summary = build(
        ["--video_dir", str(videos), "--video_list", str(tmp_path / "list.csv"), "--output_dir", str(out)]
        + ["--num_frames", "4"]
    )
    assert summary["videos_written"] == 2 and summary["skipped"] == 1
    reader = ShardReader(out / "path.index")
    assert reader.video_ids == ["clip_b", "clip_a"]
    a = reader.read("clip_a")
    assert a.shape == (4, S, S, 3)
    # uniform sampling: linspace(0, 19, 4) -> frames 0, 6, 12, 19 of the clip, squashed to 256
    expected = shard_build.squash_frames(Image.fromarray(f) for f in clip[[0, 6, 12, 19]])
    assert np.abs(a.astype(int) - expected).mean() < 6  # mpeg4 coding error only
    assert reader.read("clip_b").shape == (4, S, S, 3)  # 5 frames -> 4 uniform


def test_jpeg_much_smaller_than_raw_on_real_clip(tmp_path: Path, realdata: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    os.symlink(realdata / "mmaction2-testdata" / "tests_data_test.mp4", videos / "real.mp4")
    sizes = {}
    for encoding in ("raw", "jpeg"):
        out = tmp_path / encoding
        summary = build(["--video_dir", str(videos), "--output_dir", str(out), "--encoding", encoding])
        assert summary["videos_written"] == 1
        sizes[encoding] = summary["bytes"]
    assert sizes["raw"] > 12 * S * S * 3
    assert sizes["raw"] >= 8 * sizes["jpeg"], sizes
    raw, jpeg = ShardReader(tmp_path / "raw" / "path.index"), ShardReader(tmp_path / "jpeg" / "path.index")
    assert np.abs(raw.read("real").astype(int) - jpeg.read("real")).mean() < 4


# ------------------------------------------------------------------------------------------------- verify


def _good_build(tmp_path: Path) -> Path:
    write_frame_folders(tmp_path / "frames", 4, n_frames=2)
    out = tmp_path / "out"
    build(["--input_dir", str(tmp_path / "frames"), "--output_dir", str(out), "--examples_per_shard", "2"])
    return out


def test_verify_good_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = _good_build(tmp_path)
    assert frozen_tfrecord.main(["--verify", str(out / "path.index")]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary == {"videos": 4, "frames": 8, "encodings": {"raw": 4, "jpeg": 0}, "errors": []}


def test_verify_truncated_shard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = _good_build(tmp_path)
    shard = out / "path-00001.tfrecord"
    offsets = [e.offset for e in read_index(out / "path.index")[2:]]  # vid002, vid003 in the second shard
    with open(shard, "r+b") as f:
        f.truncate(offsets[1] + 100)
    assert frozen_tfrecord.main(["--verify", str(out / "path.index")]) == 1
    summary = last_json(capsys.readouterr().out)
    assert summary["encodings"]["raw"] == 3 and len(summary["errors"]) == 1
    error = summary["errors"][0]
    assert error["video_id"] == "vid003" and error["shard"] == str(shard) and error["offset"] == offsets[1]
    assert str(shard) in error["error"] and f"offset {offsets[1]}" in error["error"] and "truncated" in error["error"]


def test_verify_bit_flip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = _good_build(tmp_path)
    shard = out / "path-00000.tfrecord"
    data = bytearray(shard.read_bytes())
    data[-1000] ^= 0x10  # inside the second record's payload
    shard.write_bytes(bytes(data))
    assert frozen_tfrecord.main(["--verify", str(out / "path.index")]) == 1
    error = last_json(capsys.readouterr().out)["errors"]
    assert [(e["video_id"], e["shard"]) for e in error] == [("vid001", str(shard))]
    assert "checksum" in error[0]["error"] and f"offset {error[0]['offset']}" in error[0]["error"]


# ------------------------------------------------------------------------------------------- reader errors


def test_reader_errors(tmp_path: Path) -> None:
    out = _good_build(tmp_path)
    index = out / "path.index"
    entries = read_index(index)
    reader = ShardReader(index)
    with pytest.raises(DataError, match=r"'nope' is not in the index"):
        reader.read("nope")

    shard = out / "path-00001.tfrecord"
    with open(shard, "r+b") as f:
        f.truncate(entries[3].offset + 20)
    with pytest.raises(
        DataError, match=rf"{re.escape(str(shard))}: bad record at offset {entries[3].offset} for video 'vid003'"
    ):
        reader.read("vid003")

    lines = index.read_text().splitlines()
    past_end = lines[:1] + [f"vid001\t{entries[1].shard}\t{10**9}"]
    index.write_text("\n".join(past_end) + "\n")
    with pytest.raises(DataError, match=r"offset 1000000000 for video 'vid001'.*past the end.*--verify"):
        ShardReader(index).read("vid001")

    index.write_text(lines[0] + "\nvid001 no tabs here\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(index))}, line 2: expected"):
        ShardReader(index)

    with pytest.raises(DataError, match="does not decode"):
        mangled = tmp_path / "mangled"
        with ShardWriter(mangled / "path") as writer:
            writer.write("x", encode_example({"image": bytes_feature(b"\x00" * 17)}))
        ShardReader(mangled / "path.index").read("x")
    with pytest.raises(RecordError, match="no bytes feature 'image'"):
        decode_video_example(encode_example({"other": int64_feature(1)}))


def _read_in_child(reader: ShardReader, video_id: str) -> np.ndarray:
    return reader.read(video_id)


def test_reader_after_fork(tmp_path: Path) -> None:
    out = _good_build(tmp_path)
    reader = ShardReader(out / "path.index")
    parent = [reader.read(v) for v in reader.video_ids]  # handles cached in the parent
    with multiprocessing.get_context("fork").Pool(2) as pool:
        children = pool.starmap(_read_in_child, [(reader, v) for v in reversed(reader.video_ids)])
    for a, b in zip(parent, reversed(children), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(reader.read("vid000"), parent[0])


# --------------------------------------------------------------------------------------------- VideoSource


@pytest.fixture()
def source_index(tmp_path: Path) -> tuple[Path, np.ndarray]:
    stored = np.stack([np.full((S, S, 3), 10 * (i + 1), np.uint8) for i in range(6)])  # frame i has value 10(i+1)
    with ShardWriter(tmp_path / "path") as writer:
        writer.write("v", encode_video_example(stored, "raw"))
    return tmp_path / "path.index", stored


@pytest.mark.parametrize(
    ("max_frames", "slice_framepos", "frame_order", "pad_mode", "expected", "mask"),
    [
        (4, "uniform", "keep", "repeat", [0, 1, 3, 5], [1, 1, 1, 1]),
        (4, "head", "keep", "repeat", [0, 1, 2, 3], [1, 1, 1, 1]),
        (4, "tail", "reverse", "repeat", [5, 4, 3, 2], [1, 1, 1, 1]),
        (8, "uniform", "keep", "repeat", [0, 0, 1, 2, 2, 3, 4, 5], [1] * 8),  # published linspace repeat
        (8, "uniform", "keep", "zero", [0, 1, 2, 3, 4, 5, -1, -1], [1] * 6 + [0, 0]),
        (6, 2, 1, "repeat", [5, 4, 3, 2, 1, 0], [1] * 6),  # published integer codes
    ],
)
def test_shard_video_source(source_index, max_frames, slice_framepos, frame_order, pad_mode, expected, mask) -> None:
    index, stored = source_index
    source = ShardVideoSource(index, max_frames, slice_framepos, frame_order, pad_mode)
    frames, got_mask = source.load("v")
    assert frames.shape == (max_frames, S, S, 3) and frames.dtype == np.uint8 and got_mask.dtype == np.int64
    assert got_mask.tolist() == mask
    want = np.stack([stored[i] if i >= 0 else np.zeros_like(stored[0]) for i in expected])
    np.testing.assert_array_equal(frames, want)
    assert source.video_ids == ["v"] and "v" in source and "w" not in source


def test_shard_video_source_shuffle_and_errors(source_index) -> None:
    index, stored = source_index
    source = ShardVideoSource(index, 6, frame_order="shuffle")
    a, _ = source.load("v", rng=np.random.default_rng(5))
    b, _ = source.load("v", rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert sorted(int(f[0, 0, 0]) for f in a) == [10, 20, 30, 40, 50, 60]
    with pytest.raises(ConfigError, match="cannot be clipped"):
        source.load("v", start=1.0, end=2.0)
    with pytest.raises(ConfigError):
        ShardVideoSource(index, 4, slice_framepos="middle")
    with pytest.raises(DataError, match="not in the index"):
        source.load("missing")


def test_writer_rejects_bad_ids(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "path") as writer:
        writer.write("a", encode_example({"image": bytes_feature(b"")}))
        with pytest.raises(DataError, match="already written"):
            writer.write("a", b"")
        with pytest.raises(DataError, match="cannot go in the index"):
            writer.write("a\tb", b"")
    assert verify_index(tmp_path / "path.index")["errors"][0]["video_id"] == "a"  # image of 0 bytes is not a video


def test_writer_resume_touches_only_its_prefix(tmp_path: Path) -> None:
    for name in ["path-00000.tfrecord", "path-00003.tfrecord", "path-00004.tfrecord.tmp"]:
        (tmp_path / name).write_bytes(b"")
    others = ["path-x-00007.tfrecord", "path-x-00001.tfrecord.tmp", "pathy-00009.tfrecord"]
    for name in others:
        (tmp_path / name).write_bytes(b"")
    with ShardWriter(tmp_path / "path") as writer:
        writer.write("a", encode_example({"image": bytes_feature(b"x")}))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["path-00000.tfrecord", "path-00003.tfrecord", "path-00004.tfrecord", "path.index", *others]
    )
    assert read_index(tmp_path / "path.index")[0].shard == str(tmp_path / "path-00004.tfrecord")


def test_cli_bad_input_is_one_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "list.csv").write_text("id,caption\nx,y\n")
    argv = ["--input_dir", str(tmp_path), "--video_list", str(tmp_path / "list.csv"), "--output_dir", str(tmp_path)]
    assert frozen_tfrecord.main(argv) == frozen_tfrecord.EXIT_BAD_INPUT
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path / 'list.csv'}: no 'video_id' column (header ['id', 'caption']); add one\n"
    )
    assert frozen_tfrecord.main(["--input_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a folder" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- partial decoding


def _jpeg_with_bad_frame(frames: np.ndarray, bad: int) -> bytes:
    """A jpeg record whose frame ``bad`` is not a JPEG (so decoding it, and only it, fails)."""
    features = decode_example(encode_video_example(frames, "jpeg"))
    jpegs = list(features["image"].values)
    jpegs[bad] = b"not a jpeg"
    return encode_example({**features, "image": bytes_feature(*jpegs)})


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_partial_decode_equals_full_decode(encoding: str) -> None:
    stored = smooth_frames(6, seed=4) if encoding == "raw" else smooth_frames(6, 24, 40, seed=4)
    payload = encode_video_example(stored, encoding)
    full, got_encoding = decode_video_example(payload)
    assert got_encoding == encoding and full.shape == stored.shape and count_frames(payload) == 6
    record = parse_video_example(payload)
    assert (record.encoding, record.n_frames, record.height, record.width) == (encoding, 6, *stored.shape[1:3])
    for indices in ([], [3], [5, 0, 5, 2], [0, 1, 2, 3, 4, 5], np.array([4, 4, 4]), np.arange(6)[::-1], range(1, 6, 2)):
        frames, _ = decode_video_example(payload, indices)
        assert frames.shape == (len(indices), *stored.shape[1:]) and frames.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(frames, full[np.asarray(indices, dtype=np.int64)])
    with pytest.raises(IndexError, match="outside the record's 6 frames"):
        record.decode([0, 6])
    with pytest.raises(IndexError):
        record.decode([-1])
    with pytest.raises(ValueError, match="1-D sequence of integers"):
        record.decode([0.5])


def test_jpeg_frames_decode_exactly_as_pil() -> None:
    """Records decode to PIL's pixels (the reference decoder), also for grey, progressive and 4:4:4 JPEGs."""
    frames = smooth_frames(4, 37, 53, seed=10)
    variants = [{}, {"progressive": True}, {"subsampling": 0, "quality": 40}, {"quality": 97}]
    jpegs = []
    for i, (frame, options) in enumerate(zip(frames, variants, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(frame if i else frame[..., 1]).save(buf, format="JPEG", **options)  # frame 0 is grey
        jpegs.append(buf.getvalue())
    features = {
        "image": bytes_feature(*jpegs),
        "n_frames": int64_feature(4),
        "height": int64_feature(37),
        "width": int64_feature(53),
        "encoding": bytes_feature(b"jpeg"),
    }
    payload = encode_example(features)
    reference = np.stack([np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg in jpegs])
    np.testing.assert_array_equal(decode_video_example(payload)[0], reference)
    np.testing.assert_array_equal(decode_video_example(payload, [2, 0])[0], reference[[2, 0]])
    assert [jpeg_size(jpeg) for jpeg in jpegs] == [(37, 53)] * 4
    with_metadata = io.BytesIO()
    Image.fromarray(frames[0]).save(
        with_metadata, format="JPEG", exif=b"Exif\x00\x00" + bytes(3000), icc_profile=b"x" * 900
    )
    assert jpeg_size(with_metadata.getvalue()) == (37, 53)  # APPn segments before the frame header are skipped
    assert jpeg_size(b"not a jpeg") is None and jpeg_size(jpegs[0][:12]) is None
    for height, width in [(36, 53), (37, 60)]:  # a header that disagrees with the JPEGs
        wrong = encode_example({**features, "height": int64_feature(height), "width": int64_feature(width)})
        with pytest.raises(RecordError, match=rf"frame 1 is \(37, 53\), record says \({height}, {width}\)"):
            decode_video_example(wrong, [1])


def test_partial_decode_decodes_each_wanted_frame_once(monkeypatch: pytest.MonkeyPatch) -> None:
    stored = smooth_frames(5, 16, 16, seed=5)
    payload = _jpeg_with_bad_frame(stored, bad=2)
    assert count_frames(payload) == 5  # the header parse never touches the frames
    frames, _ = decode_video_example(payload, [4, 0, 1, 4, 3])  # the broken frame 2 is never decoded
    reference, _ = decode_video_example(encode_video_example(stored, "jpeg"), [4, 0, 1, 4, 3])
    np.testing.assert_array_equal(frames, reference)
    with pytest.raises(RecordError, match="frame 2 is not a readable JPEG"):
        decode_video_example(payload, [1, 2])

    decoded: list[int] = []
    original = VideoRecord._decode_jpeg

    def counting(self: VideoRecord, i: int) -> np.ndarray:
        decoded.append(i)
        return original(self, i)

    monkeypatch.setattr(VideoRecord, "_decode_jpeg", counting)
    decode_video_example(payload, [3, 3, 0, 3, 1, 0])
    assert sorted(decoded) == [0, 1, 3]


def test_reader_partial_read_and_bad_frame_error(tmp_path: Path) -> None:
    stored = smooth_frames(4, 16, 24, seed=6)
    with ShardWriter(tmp_path / "path") as writer:
        writer.write("good", encode_video_example(stored, "jpeg"))
        entry = writer.write("bad", _jpeg_with_bad_frame(stored, bad=1))
    reader = ShardReader(tmp_path / "path.index")
    np.testing.assert_array_equal(reader.read("good", [3, 0]), reader.read("good")[[3, 0]])
    assert reader.read_with_encoding("bad", [0, 3])[1] == "jpeg"
    with pytest.raises(DataError, match=rf"offset {entry.offset} for video 'bad' does not decode: frame 1 is not"):
        reader.read("bad", [1])
    source = ShardVideoSource(tmp_path / "path.index", max_frames=2, slice_framepos="tail")
    np.testing.assert_array_equal(source.load("bad")[0], reader.read("bad", [2, 3]))  # frame 1 is not needed
    with pytest.raises(DataError, match="frame 1 is not a readable JPEG"):
        ShardVideoSource(tmp_path / "path.index", max_frames=4).load("bad")


def test_shard_video_source_equals_full_decode_in_every_mode(tmp_path: Path) -> None:
    """Plan-then-decode gives exactly ``plan_frames`` applied to the fully decoded video, for raw and jpeg."""
    with ShardWriter(tmp_path / "path") as writer:
        writer.write("raw", encode_video_example(smooth_frames(7, seed=7), "raw"))
        writer.write("jpeg", encode_video_example(smooth_frames(7, 20, 28, seed=8), "jpeg"))
    reader = ShardReader(tmp_path / "path.index")
    full = {video_id: reader.read(video_id) for video_id in reader.video_ids}
    modes = itertools.product(
        [3, 7, 10], ["head", "tail", "uniform"], ["keep", "reverse", "shuffle"], ["repeat", "zero"]
    )
    for mode in modes:
        source = ShardVideoSource(tmp_path / "path.index", *mode)
        for video_id, stored in full.items():
            wanted, want_mask = video_io.plan_frames(np.arange(len(stored)), *mode, np.random.default_rng(3))
            want = np.zeros((mode[0], *stored.shape[1:]), np.uint8)
            want[: len(wanted)] = stored[wanted]
            frames, mask = source.load(video_id, rng=np.random.default_rng(3))
            np.testing.assert_array_equal(mask, want_mask)
            np.testing.assert_array_equal(frames, want, err_msg=f"video {video_id}, mode {mode}")


# -------------------------------------------------------------------------------------------- --frame_size


def test_jpeg_frame_size_round_trip_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = smooth_frames(12, 48, 64, seed=9)
    write_video(videos / "clip.mp4", clip)
    out = tmp_path / "out"
    argv = ["--video_dir", str(videos), "--output_dir", str(out), "--encoding", "jpeg", "--frame_size", "64"]
    assert frozen_tfrecord.main([*argv, "--num_frames", "6"]) == 0
    assert last_json(capsys.readouterr().out)["videos_written"] == 1
    frames, encoding = ShardReader(out / "path.index").read_with_encoding("clip")
    assert encoding == "jpeg" and frames.shape == (6, 64, 64, 3)
    # linspace(0, 11, 6) -> frames 0, 2, 4, 6, 8, 11 of the clip, squashed to 64 x 64
    expected = shard_build.squash_frames((Image.fromarray(f) for f in clip[[0, 2, 4, 6, 8, 11]]), 64)
    assert np.abs(frames.astype(int) - expected).mean() < 6  # mpeg4 + JPEG coding error only
    loaded, mask = ShardVideoSource(out / "path.index", max_frames=4).load("clip")
    assert loaded.shape == (4, 64, 64, 3) and mask.tolist() == [1, 1, 1, 1]

    assert frozen_tfrecord.main(["--verify", str(out / "path.index")]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary == {"videos": 1, "frames": 6, "encodings": {"raw": 0, "jpeg": 1}, "errors": []}


def test_raw_rejects_other_frame_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_frame_folders(tmp_path / "frames", 1, n_frames=2)
    out = tmp_path / "out"
    argv = ["--input_dir", str(tmp_path / "frames"), "--output_dir", str(out), "--frame_size", "64"]
    assert frozen_tfrecord.main(argv) == frozen_tfrecord.EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("error: --frame_size 64 needs --encoding jpeg") and not out.exists()
    with pytest.raises(ConfigError, match="published layout, always 256x256"):
        build([*argv, "--encoding", "raw"])
    with pytest.raises(ConfigError, match="--frame_size 0"):
        build([*argv[:-1], "0", "--encoding", "jpeg"])
    assert build([*argv[:-1], str(S)])["videos_written"] == 1  # raw at the published size is fine
    assert ShardReader(out / "path.index").read("vid000").shape == (2, S, S, 3)


# ------------------------------------------------------------------------------------------- index text, record sizes

SEPARATORS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"  # each ends a line for str.splitlines(), none for an index


def test_index_lines_end_at_newline_only(tmp_path: Path) -> None:
    ids = [f"v{i}{sep}x" for i, sep in enumerate(SEPARATORS)]
    with ShardWriter(tmp_path / "path") as writer:
        for vid in ids:
            writer.write(vid, encode_video_example(smooth_frames(1, 8, 8), "jpeg"))
        with pytest.raises(DataError, match="cannot go in the index"):
            writer.write("\ufeffx", b"")  # would read back without its first character (a byte-order mark)
    index = tmp_path / "path.index"
    assert [e.video_id for e in read_index(index)] == ids
    reader = ShardReader(index)
    assert reader.video_ids == ids and reader.read(ids[0]).shape == (1, 8, 8, 3)
    # a bad line after lines holding separators is reported with its real line number (10, not 18)
    text = index.read_text(encoding="utf-8")
    index.write_text(text + "\nbroken line\n", encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{index}, line 10: expected 'video_id<TAB>shard<TAB>offset'")):
        read_index(index)
    # a UTF-8 byte-order mark and CRLF line ends are accepted; a last line without a newline counts
    index.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8").rstrip(b"\r\n"))
    assert [e.video_id for e in read_index(index)] == ids
    # an offset must be ASCII digits ("\u00b2".isdigit() is True, int("\u00b2") fails), at most 19 of them
    for offset in ("\u00b2", "\u0663", "1" * 20, "-1", ""):
        index.write_text(f"a\tpath-00000.tfrecord\t{offset}\n", encoding="utf-8")
        with pytest.raises(DataError, match="line 1: expected"):
            read_index(index)


def test_non_utf8_index_is_one_clear_error(tmp_path: Path) -> None:
    index = tmp_path / "path.index"
    index.write_bytes(b"a\tpath-00000.tfrecord\t0\nb\xe9\tpath-00000.tfrecord\t9\n")  # Latin-1 "\xe9"
    with pytest.raises(DataError) as info:
        read_index(index)
    assert str(info.value).startswith(f"{index}, line 2: not UTF-8 text (invalid continuation byte at byte 1 ")
    assert "rebuild the index with frozen_tfrecord.py" in str(info.value)
    assert verify_index(index)["errors"][0]["error"] == str(info.value)


def test_split_index_keeps_the_tail_apart() -> None:
    assert split_index(b"a\tb\t1\n\n  \nc\td\t2\r\nc\td", "I") == ([(1, "a\tb\t1"), (4, "c\td\t2")], b"c\td")
    assert split_index(b"\xef\xbb\xbf", "I") == ([], b"")
    assert split_index(b"x\n\xe9", "I") == ([(1, "x")], b"\xe9")  # a torn tail is never decoded


def _jpeg_record(n_frames: int, height: int, width: int, jpegs: int = 1) -> bytes:
    frame = io.BytesIO()
    Image.fromarray(smooth_frames(1, 8, 8)[0]).save(frame, format="JPEG")
    return encode_example(
        {
            "image": bytes_feature(*[frame.getvalue()] * jpegs),
            "n_frames": int64_feature(n_frames),
            "height": int64_feature(height),
            "width": int64_feature(width),
            "encoding": bytes_feature(b"jpeg"),
        }
    )


@pytest.mark.parametrize(
    ("claim", "message"),
    [
        ((10**9, 8, 8), "record claims 1000000000 frames; a record holds 1..100000"),
        ((MAX_RECORD_FRAMES + 1, 8, 8), f"record claims {MAX_RECORD_FRAMES + 1} frames"),
        ((0, 8, 8), "record claims 0 frames"),
        ((1, 10**6, 10**6), "record claims frames of 1000000x1000000 pixels; sides must be 1..16384"),
        ((1, MAX_FRAME_SIDE + 1, 1), f"frames of {MAX_FRAME_SIDE + 1}x1 pixels"),
        ((1, 8192, 8193), "frames of 8192x8193 pixels"),  # each side allowed, the product is not
        ((1, -8, 8), "frames of -8x8 pixels"),
    ],
)
def test_jpeg_record_sizes_are_bounded_before_allocation(claim: tuple[int, int, int], message: str) -> None:
    with pytest.raises(RecordError, match=re.escape(message)):
        parse_video_example(_jpeg_record(*claim))


def test_jpeg_record_size_bounds_are_inclusive() -> None:
    assert MAX_FRAME_PIXELS == 8192 * 8192
    record = parse_video_example(_jpeg_record(1, 8192, 8192))  # parsing allocates nothing from the claim
    assert (record.n_frames, record.height, record.width) == (1, 8192, 8192)
    with pytest.raises(RecordError, match=re.escape("frame 0 is (8, 8), record says (8192, 8192)")):
        record.decode([0])  # the frame header disagrees: refused before decoding (the 192 MiB buffer is allocated)
    assert parse_video_example(_jpeg_record(3, 8, 8, jpegs=3)).decode().shape == (3, 8, 8, 3)


def test_shard_record_claiming_huge_frames_is_a_data_error_naming_shard_and_offset(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "path") as writer:
        writer.write("good", _jpeg_record(1, 8, 8))
        bad = writer.write("huge", _jpeg_record(1, 10**6, 10**6))
    reader = ShardReader(tmp_path / "path.index")
    with pytest.raises(DataError) as info:
        reader.read("huge")
    assert str(info.value).startswith(f"{bad.shard}: record at offset {bad.offset} for video 'huge' does not decode")
    assert "1000000x1000000 pixels" in str(info.value)
    with pytest.raises(DataError, match="1000000x1000000 pixels"):
        ShardVideoSource(tmp_path / "path.index", max_frames=4).load("huge")
    assert reader.read("good").shape == (1, 8, 8, 3)
