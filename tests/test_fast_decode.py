"""The shard decoders' fast paths give the same pixels as the reference decoders they replaced."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dataloaders.tfrecord_format import (
    RAW_FRAME_SIZE,
    RecordError,
    VideoRecord,
    encode_video_example,
    parse_video_example,
)
from dataloaders.video_io import load_video

MP4 = "mmaction2-testdata/tests_data_test.mp4"


@pytest.fixture(scope="module")
def shard_frames(realdata) -> np.ndarray:
    """Real frames squashed to the raw layout's 256 x 256, as frozen_tfrecord stores them."""
    frames, _ = load_video(realdata / MP4, max_frames=6)
    return np.stack([np.asarray(Image.fromarray(f).resize((RAW_FRAME_SIZE, RAW_FRAME_SIZE))) for f in frames])


def test_raw_decode_is_the_bgr_bytes_swapped(shard_frames):
    record = parse_video_example(encode_video_example(shard_frames, "raw"))
    np.testing.assert_array_equal(record.decode(), shard_frames)
    np.testing.assert_array_equal(record.decode([5, 0, 5]), shard_frames[[5, 0, 5]])
    # the published reader's channel swap, by hand: stored BGR bytes reversed per pixel
    stored = np.frombuffer(record.data[2], dtype=np.uint8).reshape(RAW_FRAME_SIZE, RAW_FRAME_SIZE, 3)
    np.testing.assert_array_equal(record.decode([2])[0], stored[..., ::-1])


@pytest.mark.parametrize("quality", [90, 50])
def test_jpeg_decode_matches_pil_decoder(shard_frames, quality):
    record = parse_video_example(encode_video_example(shard_frames, "jpeg", jpeg_quality=quality))
    fast = record.decode()
    reference = np.stack([record._decode_jpeg_pil(i) for i in range(record.n_frames)])
    np.testing.assert_array_equal(fast, reference)
    assert np.abs(fast.astype(int) - shard_frames).mean() < 6  # and it is the picture (lossy, close: ~1.5 at q90)


def test_jpeg_decode_rejects_a_corrupt_body(shard_frames):
    good = parse_video_example(encode_video_example(shard_frames[:1], "jpeg"))
    data = bytes(good.data[0])
    broken = data[: len(data) // 3]  # header intact (size readable), entropy-coded data cut short
    record = VideoRecord("jpeg", good.height, good.width, (memoryview(broken),))
    with pytest.raises(RecordError, match="frame 0"):
        record.decode()


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_decode_into_a_clip_buffer_of_either_layout_equals_plain_decode(shard_frames, encoding):
    record = parse_video_example(encode_video_example(shard_frames, encoding))
    k, h, w = record.n_frames, record.height, record.width
    for indices in (None, [5, 0, 5, 1], [0, 2, 3]):  # all in order, shuffled with a repeat, a subset in order
        expected = record.decode(indices)
        count = len(expected)
        interleaved = np.full((count + 2, h, w, 3), 7, dtype=np.uint8)  # a padded clip buffer
        planar = np.full((count + 2, 3, h, w), 7, dtype=np.uint8).transpose(0, 2, 3, 1)
        for buffer in (interleaved, planar):
            returned = record.decode(indices, out=buffer[:count])
            assert np.shares_memory(returned, buffer)
            np.testing.assert_array_equal(buffer[:count], expected)
            assert (buffer[count:] == 7).all()  # rows past the frames are not touched
    with pytest.raises(ValueError, match=r"shape \(6, 256, 256, 3\)"):
        record.decode(out=np.empty((5, h, w, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="writable uint8"):
        record.decode(out=np.empty((k, h, w, 3), dtype=np.float32))
