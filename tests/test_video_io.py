"""Frame sampling maths, decoding (PyAV and decord) on real and synthetic clips, bad files, the CLIP transform."""

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from dataloaders.errors import ConfigError, DataError
from dataloaders.transforms import CLIP_MEAN, CLIP_STD, ClipTransform
from dataloaders.video_io import (
    FileVideoSource,
    decode_frames,
    load_video,
    order_frames,
    pad_frames,
    plan_frames,
    probe_video,
    published_frame_indices,
    segment_frames,
    slice_frames,
)

MP4 = "mmaction2-testdata/tests_data_test.mp4"
AVI = "mmaction2-testdata/tests_data_test.avi"
DECODER_TOLERANCE = 2  # max abs uint8 difference allowed between the two decoders' colour conversions
TENSOR_PATH_TOLERANCE = 0.05  # max abs difference on real frames, normalised units (about 3/255 of a pixel)
TENSOR_PATH_NOISE_MEAN_TOLERANCE = 0.01  # mean abs difference on uniform noise, the kernels' worst case
SYN_FPS, SYN_FRAMES, SYN_GOP, SYN_H, SYN_W = 8, 50, 12, 48, 64
SYN_BIT_RATE = 2_000_000
BITS, BLOCK = 6, 8  # the synthetic frame index is written as 6 black/white 8x8 blocks along the top row


# ----------------------------------------------------------------------------------------------- index maths


def published_loop_reference(
    frame_count: int, fps: int, sample_fp: int, start_time: int | None = None, end_time: int | None = None
) -> list[int]:
    """The frame reads of CLIP4Clip's RawVideoExtractorCV2.video_to_tensor, written as a plain loop."""
    fps = int(fps)
    total_duration = (frame_count + fps - 1) // fps
    start_sec, end_sec = 0, total_duration
    if start_time is not None:
        start_sec, end_sec = start_time, min(end_time, total_duration)
    interval = fps // sample_fp if sample_fp > 0 else 1
    sample_fp = sample_fp if sample_fp > 0 else fps
    interval = max(interval, 1)
    offsets = list(range(0, fps, interval))[:sample_fp]
    reads, ok = [], True
    for sec in range(start_sec, end_sec + 1):
        if not ok:
            break
        for off in offsets:
            index = sec * fps + off
            ok = index < frame_count
            if not ok:
                break
            reads.append(index)
    return reads


def test_published_examples():
    assert published_frame_indices(300, 30.0, 1).tolist() == list(range(0, 300, 30))
    assert published_frame_indices(300, 30.0, 2).tolist() == sorted(list(range(0, 300, 30)) + list(range(15, 300, 30)))
    assert published_frame_indices(305, 30.0, 1).tolist() == list(range(0, 301, 30))  # partial last second
    assert published_frame_indices(300, 29.97, 1).tolist() == list(range(0, 300, 29))  # fps truncated to 29
    assert published_frame_indices(12, 3.0, 2).tolist() == [0, 1, 3, 4, 6, 7, 9, 10]
    assert published_frame_indices(7, 4.0, 0).tolist() == list(range(7))  # 0 = every frame


def test_published_segments():
    # DiDeMo-style [0, 30] s on a 25 s clip at 30 fps: end capped at the duration
    assert published_frame_indices(750, 30.0, 1, 0, 30).tolist() == list(range(0, 750, 30))
    assert published_frame_indices(750, 30.0, 1, 5, 10).tolist() == [150, 180, 210, 240, 270, 300]
    assert published_frame_indices(750, 30.0, 1, 2.5, 4.5).tolist() == [75, 105, 135]
    assert published_frame_indices(750, 30.0, 1, 5, 5).tolist() == [150]
    assert published_frame_indices(300, 30.0, 1, 12, 20).size == 0  # starts after the end
    with pytest.raises(DataError, match="segment"):
        published_frame_indices(300, 30.0, 1, -1, 5)
    with pytest.raises(DataError, match="segment"):
        published_frame_indices(300, 30.0, 1, 6, 5)


def test_low_fps_takes_every_frame():
    assert published_frame_indices(10, 2.0, 5).tolist() == list(range(10))


@pytest.mark.parametrize("fps", [0.0, 0.5, float("nan"), float("inf")])
def test_unusable_fps_raises(fps):
    with pytest.raises(DataError, match="frame rate"):
        published_frame_indices(100, fps, 1)


def test_bad_counts_and_rates_raise():
    with pytest.raises(DataError, match="0 frames"):
        published_frame_indices(0, 30.0, 1)
    with pytest.raises(ConfigError, match="feature_framerate"):
        published_frame_indices(100, 30.0, 1.5)


@settings(max_examples=300, deadline=None)
@given(
    frame_count=st.integers(1, 3000),
    fps=st.integers(1, 60),
    rate=st.integers(0, 60),
    segment=st.one_of(st.none(), st.tuples(st.integers(0, 120), st.integers(0, 120))),
)
def test_matches_published_loop(frame_count, fps, rate, segment):
    sample_fp = min(rate, fps)  # the published code asserts on larger rates
    start, end = (None, None) if segment is None else (min(segment), max(segment))
    got = published_frame_indices(frame_count, float(fps), sample_fp, start, end)
    assert got.tolist() == published_loop_reference(frame_count, fps, sample_fp, start, end)


def test_slice_frames():
    assert slice_frames(5, 12, "uniform").tolist() == [0, 1, 2, 3, 4]
    assert slice_frames(20, 4, "head").tolist() == [0, 1, 2, 3]
    assert slice_frames(20, 4, "tail").tolist() == [16, 17, 18, 19]
    assert slice_frames(20, 4, "uniform").tolist() == [0, 6, 12, 19]
    for code, name in enumerate(("head", "tail", "uniform")):
        assert slice_frames(30, 7, code).tolist() == slice_frames(30, 7, name).tolist()
    with pytest.raises(ConfigError, match="slice_framepos"):
        slice_frames(20, 4, "middle")
    with pytest.raises(ConfigError, match="max_frames"):
        slice_frames(20, 0, "head")


def test_order_frames():
    idx = np.arange(10, 20)
    assert order_frames(idx, "keep").tolist() == idx.tolist()
    assert order_frames(idx, 1).tolist() == idx[::-1].tolist()
    shuffled = order_frames(idx, "shuffle", np.random.default_rng(3))
    assert sorted(shuffled.tolist()) == idx.tolist() and shuffled.tolist() != idx.tolist()
    assert shuffled.tolist() == order_frames(idx, 2, np.random.default_rng(3)).tolist()
    with pytest.raises(ValueError, match="rng"):
        order_frames(idx, "shuffle")
    with pytest.raises(ConfigError, match="frame_order"):
        order_frames(idx, 3)


def test_pad_frames():
    positions, mask = pad_frames(3, 5, "repeat")
    assert positions.tolist() == [0, 0, 1, 1, 2] and mask.tolist() == [1] * 5
    positions, mask = pad_frames(3, 5, "zero")
    assert positions.tolist() == [0, 1, 2] and mask.tolist() == [1, 1, 1, 0, 0]
    positions, mask = pad_frames(5, 5, "repeat")
    assert positions.tolist() == list(range(5)) and mask.tolist() == [1] * 5
    with pytest.raises(ValueError):
        pad_frames(6, 5, "zero")
    with pytest.raises(ConfigError, match="pad_frames"):
        pad_frames(3, 5, 0)


def test_plan_orders_after_repeat_as_published():
    sampled = np.array([0, 30, 60])
    wanted, mask = plan_frames(sampled, 5, "uniform", "reverse", "repeat")
    assert wanted.tolist() == [60, 30, 30, 0, 0] and mask.tolist() == [1] * 5
    wanted, mask = plan_frames(sampled, 5, "uniform", "reverse", "zero")
    assert wanted.tolist() == [60, 30, 0] and mask.tolist() == [1, 1, 1, 0, 0]
    wanted, mask = plan_frames(np.arange(0, 600, 30), 4, "tail", "keep", "zero")
    assert wanted.tolist() == [480, 510, 540, 570] and mask.tolist() == [1] * 4


# ---------------------------------------------------------------------------------------------- real clips


def decode_all(path: Path) -> np.ndarray:
    """Every frame by plain sequential PyAV decoding: the ground truth for indexed reads."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.parametrize("name, frames, fps, height, width", [(MP4, 300, 30.0, 256, 340), (AVI, 164, 25.0, 240, 320)])
def test_real_clip_probe_and_decoders_agree(realdata, name, frames, fps, height, width):
    path = realdata / name
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.height, info.width) == (frames, fps, height, width)
    idx = published_frame_indices(info.num_frames, info.fps, 1)
    assert len(idx) == int(np.ceil(frames / fps))
    by_pyav = decode_frames(path, idx, backend="pyav")
    by_decord = decode_frames(path, idx, backend="decord")
    assert by_pyav.shape == (len(idx), height, width, 3) and by_pyav.dtype == np.uint8
    assert np.abs(by_pyav.astype(int) - by_decord.astype(int)).max() <= DECODER_TOLERANCE
    step_change = np.abs(np.diff(by_pyav.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    assert (step_change > 1.0).all()  # consecutive sampled seconds show different content


@pytest.mark.parametrize("name", [MP4, AVI])
def test_pyav_indexed_reads_match_sequential_decode(realdata, name):
    path = realdata / name
    truth = decode_all(path)
    last = len(truth) - 1
    for idx in ([last, 0, 90, 90, last - 1], [90, last], list(range(0, len(truth), 7))):
        assert np.array_equal(decode_frames(path, idx, backend="pyav"), truth[idx])


def test_load_video_real_clip(realdata):
    frames, mask = load_video(realdata / MP4, max_frames=12)  # 10 sampled frames repeated to 12
    assert frames.shape == (12, 256, 340, 3) and mask.tolist() == [1] * 12
    assert np.array_equal(frames[0], frames[1])  # linspace(0, 9, 12) repeats the first frame
    frames, mask = load_video(realdata / MP4, max_frames=12, pad_mode="zero")
    assert mask.tolist() == [1] * 10 + [0, 0] and not frames[10:].any() and frames[:10].any()


# ---------------------------------------------------------------------------------------------- synthetic clip


def write_index_clip(path: Path, codec: str) -> None:
    """A clip with B-frames and a key frame every SYN_GOP frames; frame i shows i in binary blocks.

    ``libx264`` (into .mp4) or ``mpeg4`` (into .avi, the HMDB/UCF-style layout where decord 0.6 misplaces
    frames after a seek).
    """
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=SYN_FPS)
        stream.width, stream.height, stream.pix_fmt = SYN_W, SYN_H, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10", "x264-params": f"keyint={SYN_GOP}:min-keyint={SYN_GOP}:scenecut=0:bframes=2"}
        else:
            stream.codec_context.gop_size, stream.codec_context.max_b_frames = SYN_GOP, 2
            stream.codec_context.bit_rate = SYN_BIT_RATE
        for i in range(SYN_FRAMES):
            image = np.full((SYN_H, SYN_W, 3), 100, dtype=np.uint8)
            for bit in range(BITS):
                image[:BLOCK, bit * BLOCK : (bit + 1) * BLOCK] = 255 if (i >> bit) & 1 else 0
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def read_index(frame: np.ndarray) -> int:
    """The frame index written by write_index_clip; -1 for an all-zero (padding) frame."""
    if not frame.any():
        return -1
    blocks = [frame[:BLOCK, bit * BLOCK : (bit + 1) * BLOCK].mean() > 128 for bit in range(BITS)]
    return sum(int(on) << bit for bit, on in enumerate(blocks))


@pytest.fixture(scope="module")
def index_clip(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    write_index_clip(folder / "clip7.mp4", "libx264")
    return folder / "clip7.mp4"


@pytest.fixture(scope="module")
def index_avi(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("avi") / "clip9.avi"
    write_index_clip(path, "mpeg4")
    return path


SEEK_PATTERN = [49, 3, 3, 12, 11, 24, 0, 37, 36, 48, 13, 25]  # across key frames, backwards, repeats


@pytest.mark.parametrize("backend", ["pyav", "decord", "auto"])
def test_synthetic_mp4_exact_frames(index_clip, backend):
    assert probe_video(index_clip).num_frames == SYN_FRAMES
    frames = decode_frames(index_clip, SEEK_PATTERN, backend=backend)
    assert [read_index(f) for f in frames] == SEEK_PATTERN


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_synthetic_avi_exact_frames(index_avi, backend):
    assert probe_video(index_avi).num_frames == SYN_FRAMES
    frames = decode_frames(index_avi, SEEK_PATTERN, backend=backend)
    assert [read_index(f) for f in frames] == SEEK_PATTERN


def test_load_video_synthetic(index_clip):
    sampled = [0, 8, 16, 24, 32, 40, 48]  # 50 frames at 8 fps: 7 seconds, first frame of each
    frames, mask = load_video(index_clip, max_frames=4, slice_framepos="uniform")
    assert [read_index(f) for f in frames] == [sampled[i] for i in (0, 2, 4, 6)] and mask.tolist() == [1] * 4
    frames, mask = load_video(index_clip, max_frames=9, pad_mode="zero", frame_order="reverse")
    assert [read_index(f) for f in frames] == sampled[::-1] + [-1, -1] and mask.tolist() == [1] * 7 + [0, 0]
    frames, _ = load_video(index_clip, max_frames=3, slice_framepos=0, start_sec=2, end_sec=5)
    assert [read_index(f) for f in frames] == [16, 24, 32]
    frames, _ = load_video(index_clip, max_frames=7, frame_order="shuffle", rng=np.random.default_rng(0))
    assert sorted(read_index(f) for f in frames) == sampled


def test_file_video_source(index_clip):
    source = FileVideoSource(index_clip.parent, max_frames=5, slice_framepos=2, frame_order=0)
    assert source.path_for("clip7") == index_clip
    frames, mask = source.load("clip7", start=1, end=3)
    assert frames.shape == (5, SYN_H, SYN_W, 3) and mask.dtype == np.int64 and mask.tolist() == [1] * 5
    assert [read_index(f) for f in frames] == [8, 8, 16, 16, 24]
    with pytest.raises(DataError, match="clip8") as err:
        source.load("clip8")
    assert str(index_clip.parent) in str(err.value)
    with pytest.raises(DataError, match="video folder not found"):
        FileVideoSource(index_clip.parent / "nope", max_frames=5)


def test_segment_after_end_raises(index_clip):
    with pytest.raises(DataError, match="after the video's end"):
        load_video(index_clip, max_frames=4, start_sec=20, end_sec=30)


# ---------------------------------------------------------------------------------------------- bad files


def write_audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


@pytest.mark.parametrize("backend", ["pyav", "decord", "auto"])
@pytest.mark.parametrize("kind", ["missing", "empty", "random", "audio", "folder"])
def test_bad_files_raise_data_error(tmp_path, backend, kind):
    path = tmp_path / "bad.mp4"
    if kind == "empty":
        path.touch()
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "audio":
        write_audio_only(path)
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(DataError, match="bad.mp4"):
        decode_frames(path, [0], backend=backend)
    with pytest.raises(DataError, match="bad.mp4"):
        load_video(path, max_frames=4, backend=backend)


def test_out_of_range_index_raises(index_clip):
    for backend in ("pyav", "decord"):
        with pytest.raises(DataError, match="outside"):
            decode_frames(index_clip, [0, SYN_FRAMES], backend=backend)
    with pytest.raises(ConfigError, match="backend"):
        decode_frames(index_clip, [0], backend="opencv")


# ---------------------------------------------------------------------------------------------- transform


def published_transform(size: int) -> Compose:
    return Compose(
        [
            Resize(size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(size),
            ToTensor(),
            Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


@pytest.mark.parametrize("shape", [(3, 40, 70, 3), (2, 90, 33, 3), (2, 32, 32, 3), (1, 12, 20, 3)])
def test_clip_transform_matches_torchvision(shape):
    size = 32
    frames = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    reference = torch.stack([published_transform(size)(Image.fromarray(f)) for f in frames])
    out = ClipTransform(size, backend="pil")(frames)
    assert out.shape == (shape[0], 3, size, size) and out.dtype == torch.float32
    assert torch.equal(out, reference)
    fast = ClipTransform(size, backend="tensor")(frames)
    assert fast.shape == out.shape and (fast - reference).abs().mean() < TENSOR_PATH_NOISE_MEAN_TOLERANCE


def test_clip_transform_real_frames_and_mask(realdata):
    frames, mask = load_video(realdata / MP4, max_frames=12, pad_mode="zero")
    reference = torch.stack([published_transform(224)(Image.fromarray(f)) for f in frames[:10]])
    for backend, tolerance in (("pil", 0.0), ("tensor", TENSOR_PATH_TOLERANCE)):
        out = ClipTransform(backend=backend)(frames, mask)
        assert out.shape == (12, 3, 224, 224)
        assert (out[:10] - reference).abs().max() <= tolerance
        assert not out[10:].any()  # zero-padded frames stay exact zeros


def test_clip_transform_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        ClipTransform(32)(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="backend"):
        ClipTransform(32, backend="cv2")


def test_segment_frames_hand_computed():
    # 10 frames, 4 segments: edges int(linspace(0, 10, 5)) = 0 2 5 7 10 -> [0,1] [2,4] [5,6] [7,9]
    assert segment_frames(10, 4, "segment_middle").tolist() == [0, 3, 5, 8]
    # 50 frames, 4 segments: edges 0 12 25 37 50 -> [0,11] [12,24] [25,36] [37,49]
    assert segment_frames(50, 4, "segment_middle").tolist() == [5, 18, 30, 43]
    assert segment_frames(3, 4, "segment_middle").tolist() == [0, 1, 2]  # fewer frames than slots: each once
    assert segment_frames(7, 1, "segment_middle").tolist() == [3]
    draws = np.array([segment_frames(10, 4, "segment_random", np.random.default_rng(s)) for s in range(300)])
    for column, (first, last) in enumerate([(0, 1), (2, 4), (5, 6), (7, 9)]):
        assert set(draws[:, column].tolist()) == set(range(first, last + 1))  # every frame of a segment, no other
    same = segment_frames(50, 8, "segment_random", np.random.default_rng(4))
    assert same.tolist() == segment_frames(50, 8, "segment_random", np.random.default_rng(4)).tolist()
    with pytest.raises(ValueError, match="rng"):
        segment_frames(10, 4, "segment_random")
    with pytest.raises(ConfigError, match="frame_sampling"):
        segment_frames(10, 4, "uniform")


def test_load_video_segment_sampling(index_clip):
    # all 50 frames in 4 segments (not the 1-fps frames 0, 8, ..., 48 of the default)
    frames, mask = load_video(index_clip, max_frames=4, frame_sampling="segment_middle", feature_framerate=3)
    assert [read_index(f) for f in frames] == [5, 18, 30, 43] and mask.tolist() == [1] * 4
    # the segment 2-3 s at 8 fps holds frames 16..31 (seconds 2 and 3, every frame): edges 0 5 10 16 -> middles 2 7 12
    frames, _ = load_video(index_clip, max_frames=3, frame_sampling="segment_middle", start_sec=2, end_sec=3)
    assert [read_index(f) for f in frames] == [16 + 2, 16 + 7, 16 + 12]
    rng = np.random.default_rng(1)
    expected = segment_frames(50, 4, "segment_random", np.random.default_rng(1))
    frames, _ = load_video(index_clip, max_frames=4, frame_sampling="segment_random", rng=rng)
    assert [read_index(f) for f in frames] == expected.tolist()
    source = FileVideoSource(index_clip.parent, max_frames=60, pad_mode="zero", frame_sampling="segment_middle")
    frames, mask = source.load("clip7")
    assert [read_index(f) for f in frames[:50]] == list(range(50)) and mask.tolist() == [1] * 50 + [0] * 10


def test_frame_sampling_flag_reaches_the_video_source(index_clip):
    from engine.builders import file_source
    from engine.flags import build_parser

    folder = str(index_clip.parent)
    default = build_parser("retrieval").parse_args(["--output_dir", "o"])
    assert file_source(default, folder, train=True).frame_sampling == "fps"
    args = build_parser("retrieval").parse_args(["--output_dir", "o", "--frame_sampling", "segment_random"])
    assert file_source(args, folder, train=True).frame_sampling == "segment_random"
    assert file_source(args, folder, train=False).frame_sampling == "segment_middle"  # evaluation: the middles
