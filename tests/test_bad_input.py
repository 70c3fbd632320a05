"""Bad input, one test each (DESIGN §5): every case gives ONE error of the project's type whose message names the
file, the row / offset / tensor, and what to do, and nothing else is lost (the other videos, records and rows still
load; training replaces an unreadable sample by the next readable one; evaluation names what it dropped)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import main_task_clip
from dataloaders import annotations as ann
from dataloaders import textio
from dataloaders.datasets import DATASETS, DataPaths, RetrievalTrainDataset
from dataloaders.errors import CheckpointError, ConfigError, DataError
from dataloaders.tfrecord_format import (
    bytes_feature,
    decode_example,
    encode_example,
    encode_video_example,
    int64_feature,
)
from dataloaders.tfrecord_io import ShardReader, ShardVideoSource, ShardWriter
from dataloaders.tokenizer import ClipTokenizer
from dataloaders.transforms import ClipTransform
from dataloaders.video_io import RE_ENCODE_HINT, FileVideoSource
from engine.builders import build_clip, build_model, load_init_model
from engine.flags import build_parser, effective_rerank_topk, validate
from modules.clip_model import CLIPConfig, load_clip
from tests.conftest import REPO
from video_qa.task import build_qa_parser

TINY = str(REPO / "CLIP-modules" / "tiny.json")
T, L, IMAGE = 4, 12, 32
GOOD = ("video0", "video1")
SHARD_HINT = "frozen_tfrecord.py"
SMALL_CONTEXT = 16  # text positional table of the hand-made CLIP file of the --max_words test


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(autouse=True)
def _drop_run_log_handlers():
    """In-process ``main()`` calls install run-log handlers on the root logger: remove them after each test."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_membridge", False)]:
        root.removeHandler(handler)
        handler.close()


def video_folder(synthetic: Path, tmp_path: Path) -> Path:
    """A folder with two real synthetic videos (symlinks), to which a test adds one bad file."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for video_id in GOOD:
        (folder / f"{video_id}.mp4").symlink_to(synthetic / "videos" / f"{video_id}.mp4")
    return folder


def check_video_error(folder: Path, bad: str, tokenizer: ClipTokenizer, *phrases: str) -> None:
    """The bad video raises one DataError naming it; the good ones still load; training skips the bad one."""
    source = FileVideoSource(folder, max_frames=T)
    with pytest.raises(DataError) as info:
        source.load(bad)
    message = str(info.value)
    assert str(folder / f"{bad}.mp4") in message and RE_ENCODE_HINT in message
    for phrase in phrases:
        assert phrase in message
    for video_id in GOOD:
        frames, mask = source.load(video_id)
        assert frames.shape[0] == T and mask.sum() == T and frames.any()
    pairs = [ann.TrainPair(v, (f"caption of {v}",)) for v in (GOOD[0], bad, GOOD[1])]
    train = RetrievalTrainDataset(pairs, source, ClipTransform(IMAGE), tokenizer, L)
    item = train[1]  # the bad sample is replaced by the next readable one, never a zero video
    assert train.video_ids[int(item["video_index"])] == GOOD[1] and item["video"].abs().sum() > 0
    assert train.samples_skipped == 1 and train.bad_video_ids == {bad}


def test_random_bytes_named_mp4(synthetic_small, tmp_path, tokenizer):
    folder = video_folder(synthetic_small, tmp_path)
    (folder / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    check_video_error(folder, "noise", tokenizer, "cannot be opened as a video")


def test_zero_length_video(synthetic_small, tmp_path, tokenizer):
    folder = video_folder(synthetic_small, tmp_path)
    (folder / "empty.mp4").write_bytes(b"")
    check_video_error(folder, "empty", tokenizer, "zero-length video file")


def test_header_only_mp4_without_frames(synthetic_small, tmp_path, tokenizer):
    folder = video_folder(synthetic_small, tmp_path)
    container = av.open(str(folder / "header.mp4"), "w")
    stream = container.add_stream("libx264", rate=10)
    stream.width = stream.height = IMAGE
    stream.pix_fmt = "yuv420p"
    container.start_encoding()
    container.close()
    assert (folder / "header.mp4").stat().st_size > 0
    check_video_error(folder, "header", tokenizer, "has no video stream")


def test_mp4_whose_frames_are_cut_off(synthetic_small, tmp_path, tokenizer):
    """The header (moov first) promises frames, but the file ends where the frame data starts: 0 decodable."""
    folder = video_folder(synthetic_small, tmp_path)
    full = tmp_path / "full.mp4"
    container = av.open(str(full), "w", options={"movflags": "faststart"})
    stream = container.add_stream("libx264", rate=10)
    stream.width = stream.height = IMAGE
    stream.pix_fmt = "yuv420p"
    rng = np.random.default_rng(0)
    for _ in range(10):
        frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (IMAGE, IMAGE, 3), dtype=np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()
    data = full.read_bytes()
    (folder / "cut.mp4").write_bytes(data[: data.index(b"mdat") + 4])
    check_video_error(folder, "cut", tokenizer, "the video stream holds no frames")


# ------------------------------------------------------------------------------------------------ shards


def shard_copy(synthetic: Path, tmp_path: Path) -> tuple[Path, ShardReader]:
    """A private copy of the synthetic shards (the index's shard paths resolve beside the copied index)."""
    folder = tmp_path / "tfrecord"
    shutil.copytree(synthetic / "webvid" / "tfrecord", folder)
    return folder, ShardReader(folder / "path.index")


def check_shard_error(index: Path, bad: str, *phrases: str) -> None:
    """Reading ``bad`` raises one DataError naming shard, offset and video; every other video still reads."""
    reader = ShardReader(index)
    entry = reader.entry(bad)
    with pytest.raises(DataError) as info:
        reader.read(bad)
    message = str(info.value)
    assert str(reader.shard_path(entry)) in message and f"offset {entry.offset}" in message
    assert repr(bad) in message and SHARD_HINT in message
    for phrase in phrases:
        assert phrase in message
    others = [v for v in reader.video_ids if v != bad]
    assert all(reader.read(v, [0]).shape[0] == 1 for v in others)


def test_truncated_tfrecord_record(synthetic_small, tmp_path):
    folder, reader = shard_copy(synthetic_small, tmp_path)
    last = max(reader.video_ids, key=lambda v: reader.entry(v).offset)
    shard = reader.shard_path(reader.entry(last))
    cut = reader.entry(last).offset + (shard.stat().st_size - reader.entry(last).offset) // 2
    os.truncate(shard, cut)
    check_shard_error(folder / "path.index", last, "truncated record")


def test_bit_flipped_tfrecord_record(synthetic_small, tmp_path):
    folder, reader = shard_copy(synthetic_small, tmp_path)
    victim = reader.video_ids[5]
    shard = reader.shard_path(reader.entry(victim))
    data = bytearray(shard.read_bytes())
    data[reader.entry(victim).offset + 100] ^= 0x10  # one bit inside the payload
    shard.write_bytes(bytes(data))
    check_shard_error(folder / "path.index", victim, "payload checksum mismatch")


def test_index_offset_past_the_end_of_the_shard(synthetic_small, tmp_path, tokenizer):
    folder, reader = shard_copy(synthetic_small, tmp_path)
    index = folder / "path.index"
    shard = reader.shard_path(reader.entry(reader.video_ids[0]))
    with index.open("a") as f:
        f.write(f"ghost\t{shard.name}\t{shard.stat().st_size + 1000}\n")
    check_shard_error(index, "ghost", "past the end")
    source = ShardVideoSource(index, max_frames=T)
    pairs = [ann.TrainPair(v, (f"caption of {v}",)) for v in ("video3", "ghost", "video4")]
    train = RetrievalTrainDataset(pairs, source, ClipTransform(IMAGE), tokenizer, L)
    assert train.video_ids[int(train[1]["video_index"])] == "video4" and train.samples_skipped == 1


def test_jpeg_record_claiming_huge_frames(synthetic_small, tmp_path, tokenizer):
    """A record whose header claims 10^6 x 10^6 pixel frames (or 10^9 frames) is refused before anything is allocated
    from the claim (ShardVideoSource.load would otherwise allocate T x 10^12 x 3 bytes); training skips it."""
    folder, _ = shard_copy(synthetic_small, tmp_path)
    jpeg = encode_video_example(np.full((1, 8, 8, 3), 128, dtype=np.uint8), "jpeg")
    image = decode_example(jpeg)["image"]  # one real 8x8 JPEG

    def record(n: int, h: int, w: int) -> bytes:
        sizes = {"n_frames": int64_feature(n), "height": int64_feature(h), "width": int64_feature(w)}
        return encode_example({"image": image, **sizes, "encoding": bytes_feature(b"jpeg")})

    index = folder / "path.index"
    with ShardWriter(folder / "path") as writer:  # appends a shard to the copied build
        writer.write("huge_frames", record(1, 10**6, 10**6))
    check_shard_error(index, "huge_frames", "record claims frames of 1000000x1000000 pixels")
    with ShardWriter(folder / "path") as writer:
        many = writer.write("many_frames", record(10**9, 8, 8))
    with pytest.raises(DataError) as info:
        ShardReader(index).read("many_frames")
    assert str(info.value).startswith(f"{many.shard}: record at offset {many.offset} for video 'many_frames'")
    assert "record claims 1000000000 frames; a record holds 1..100000" in str(info.value)
    source = ShardVideoSource(index, max_frames=T)
    pairs = [ann.TrainPair(v, (f"caption of {v}",)) for v in ("video3", "huge_frames", "many_frames", "video4")]
    train = RetrievalTrainDataset(pairs, source, ClipTransform(IMAGE), tokenizer, L)
    assert train.video_ids[int(train[1]["video_index"])] == "video4" and train.samples_skipped == 2
    assert train.bad_video_ids == {"huge_frames", "many_frames"}


# ------------------------------------------------------------------------------------------------ annotations


def corrupt_copy(original: Path, tmp_path: Path, edit) -> Path:
    """A copy of an annotation file with ``edit(text) -> text`` applied."""
    path = tmp_path / original.name
    path.write_text(edit(original.read_text()))
    return path


def test_msrvtt_data_json_invalid_json(synthetic_small, tmp_path):
    original = synthetic_small / "msrvtt" / "MSRVTT_data.json"
    path = corrupt_copy(original, tmp_path, lambda text: text.replace('"sentences":', '"sentences"::', 1))
    with pytest.raises(DataError) as info:
        ann.read_msrvtt_data(path)
    assert str(info.value).startswith(f"{path}: line ") and "invalid JSON" in str(info.value)
    assert len(ann.read_msrvtt_data(original).sentences) > 0  # the original still parses


def test_msrvtt_data_json_bad_entry(synthetic_small, tmp_path):
    original = synthetic_small / "msrvtt" / "MSRVTT_data.json"
    data = json.loads(original.read_text())
    del data["sentences"][7]["caption"]
    path = tmp_path / "MSRVTT_data.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"sentences entry 7: missing key 'caption'; fix the entry") as info:
        ann.read_msrvtt_data(path)
    assert str(path) in str(info.value)


def test_jsfusion_csv_row_with_extra_field(synthetic_small, tmp_path):
    original = synthetic_small / "msrvtt" / "MSRVTT_JSFUSION_test.csv"
    lines = original.read_text().splitlines()
    lines[4] += ",an extra, unquoted field"
    path = tmp_path / original.name
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 5: wrong number of fields; fix the row") as info:
        ann.read_msrvtt_jsfusion(path)
    assert str(path) in str(info.value)
    assert len(ann.read_msrvtt_jsfusion(original).texts) == len(lines) - 1


def test_qa_jsonl_line_that_is_not_json(synthetic_small, tmp_path):
    original = synthetic_small / "msrvtt_qa" / "test.jsonl"
    lines = original.read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]
    path = tmp_path / original.name
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 3: invalid JSON .*; fix the line") as info:
        ann.read_qa_jsonl(path)
    assert str(path) in str(info.value)


def test_qa_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"video_id": "v", "question": "q?", "answer": "a"}\n7\n')
    with pytest.raises(DataError, match=r"line 2: expected an object, got int"):
        ann.read_qa_jsonl(path)


def test_webvid_json_entry_of_the_wrong_type(synthetic_small, tmp_path):
    original = synthetic_small / "webvid" / "frozen_train_labels.json"
    data = json.loads(original.read_text())
    data[2]["caption"] = 17
    path = tmp_path / original.name
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"entry 2: 'caption' has type int; fix the entry") as info:
        ann.read_webvid_captions(path)
    assert str(path) in str(info.value)


def test_unknown_video_ids_in_a_split_file(synthetic_small, tmp_path):
    data = ann.read_msrvtt_data(synthetic_small / "msrvtt" / "MSRVTT_data.json")
    train_csv = tmp_path / "MSRVTT_train.9k.csv"
    train_csv.write_text("video_id\nvideo0\nvideo999\nvideo1\nvideo998\n")
    ids = ann.read_video_id_csv(train_csv)
    with pytest.raises(DataError) as info:
        ann.msrvtt_train_pairs(ids, data, False, train_csv)
    assert str(info.value).startswith(f"{train_csv}: 2 video id(s) have no video, e.g. ['video998', 'video999']")
    assert "remove those rows" in str(info.value)


# ------------------------------------------------------------------------------------------------ annotation text

SEPARATORS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"  # str.splitlines() splits on each of these


def build(name: str, split: str, paths: DataPaths, source=None):
    """A dataset built the way the entry scripts build it: through the registry, from written files."""
    source = source if source is not None else NoVideos()
    return DATASETS[name](split, paths, source, ClipTransform(IMAGE), ClipTokenizer(), L)


class NoVideos:
    """A video source for parser-only tests: every load fails like an unreadable video."""

    def load(self, video_id, start=None, end=None, rng=None):
        raise DataError(f"no video for {video_id!r} in this test")


def qa_line(video_id: str, question: str, answer: str = "yes") -> str:
    return json.dumps({"video_id": video_id, "question": question, "answer": answer}, ensure_ascii=False)


def written(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


# Each reader with a file of three real lines: line 1 a valid row whose text holds every separator, line 2 valid,
# line 3 malformed. The error must say line 3 (splitlines() would count 10 and more lines before it).
QA_LINES = [qa_line("v1", f"what{SEPARATORS}is it?"), qa_line("v2", "who?"), '{"video_id": "v3", "question"']
LINE_READERS = {  # reader: (dataset, file, content, phrase of the error)
    "QA jsonl": ("msrvtt_qa", "test.jsonl", "\n".join(QA_LINES) + "\n", "invalid JSON"),
    "LSMDC tsv": (
        "lsmdc",
        ann.LSMDC_FILES["test"],
        f"c1\t1\t2\t1\t2\tShe{SEPARATORS} runs.\r\nc2\t1\t2\t1\t2\tHe sits.\r\nc3\t1\t2\tonly four\r\n",
        "4 tab-separated fields, expected 6",
    ),
    "MSVD split list": ("msvd", "test_list.txt", f"vid{SEPARATORS}1\nvid2\nvid3\n", "1 video id(s) have no video"),
    "JSFUSION csv": (
        "msrvtt",
        "MSRVTT_JSFUSION_test.csv",
        f"key,vid_key,video_id,sentence\nret0,msr1,video1,a{SEPARATORS}dog\nret1,msr2,video2,x,extra\n",
        "wrong number of fields",
    ),
}


def line_reader_paths(reader: str, folder: Path) -> DataPaths:
    """The reader's file written into ``folder`` (with what its dataset also needs) and the flags naming it."""
    _, filename, content, _ = LINE_READERS[reader]
    path = written(folder / filename, content)
    if reader == "QA jsonl":
        labels = written(folder / "train_ans2label.json", '{"yes": 0}')
        return DataPaths(msrvtt_qa_test_json=str(path), msrvtt_qa_anslabel_json=str(labels))
    if reader == "JSFUSION csv":
        return DataPaths(val_csv=str(path))
    if reader == "MSVD split list":  # captions for the id holding the separators and for vid2, none for vid3
        written(folder / "raw-captions.json", json.dumps({f"vid{SEPARATORS}1": [["a"]], "vid2": [["b"]]}))
    return DataPaths(data_path=str(folder))


@pytest.mark.parametrize("reader", sorted(LINE_READERS))
def test_unicode_line_separators_inside_a_row_do_not_split_it(tmp_path, reader):
    dataset, filename, _, phrase = LINE_READERS[reader]
    folder = tmp_path / "data"
    with pytest.raises(DataError) as info:
        build(dataset, "test", line_reader_paths(reader, folder))
    message = str(info.value)
    assert str(folder / filename) in message and phrase in message
    if reader != "MSVD split list":
        assert "line 3" in message and "line 1" not in message
    else:  # the list's error is about its ids: one unknown id, read whole
        assert "['vid3']" in message
    assert textio.split_lines(f"a{SEPARATORS}b\r\nc\rd\n") == [f"a{SEPARATORS}b", "c", "d"]


def test_unicode_line_separators_are_kept_inside_the_rows(tmp_path):
    """The valid rows read whole: their text still holds every separator (one row, one caption)."""
    rows = f'ret0,msr1,video1,a{SEPARATORS}dog\r\nret1,msr2,video2,"two\nlines"\r\n'
    csv_file = written(tmp_path / "MSRVTT_JSFUSION_test.csv", "key,vid_key,video_id,sentence\r\n" + rows)
    evaluation = build("msrvtt", "test", DataPaths(val_csv=str(csv_file)))
    assert evaluation.texts == [f"a{SEPARATORS}dog", "two\nlines"] and evaluation.video_ids == ["video1", "video2"]
    qa = written(tmp_path / "test.jsonl", qa_line("v1", f"what{SEPARATORS}?") + "\n" + qa_line("v2", "who?") + "\n")
    labels = written(tmp_path / "train_ans2label.json", '{"yes": 0}')
    questions = build("msrvtt_qa", "test", DataPaths(msrvtt_qa_test_json=str(qa), msrvtt_qa_anslabel_json=str(labels)))
    assert [r.question for r in questions.rows] == [f"what{SEPARATORS}?", "who?"]


def test_utf8_byte_order_mark_in_csv_and_json(tmp_path):
    """Spreadsheet exports start with a BOM: the first header name and json.loads must not see it."""
    bom = "\ufeff"
    data = {"videos": [{"video_id": "video0", "split": "train"}], "sentences": [{"video_id": "video0", "caption": "c"}]}
    paths = DataPaths(
        train_csv=str(written(tmp_path / "MSRVTT_train.9k.csv", bom + "video_id\r\nvideo0\r\n")),
        data_path=str(written(tmp_path / "MSRVTT_data.json", bom + json.dumps(data))),
    )
    assert build("msrvtt", "train", paths).pairs == [ann.TrainPair("video0", ("c",))]
    webvid = written(tmp_path / "frozen_train_labels.json", bom + json.dumps([{"video_id": 7, "caption": "sky"}]))
    assert build("webvid", "train", DataPaths(train_csv=str(webvid))).pairs == [ann.TrainPair("7", ("sky",))]
    lsmdc = written(tmp_path / "lsmdc" / ann.LSMDC_FILES["val"], bom + "c1\t1\t2\t1\t2\tShe runs.\n")
    assert build("lsmdc", "val", DataPaths(data_path=str(lsmdc.parent))).video_ids == ["c1"]


def test_non_utf8_annotation_file_names_the_line_and_byte(tmp_path):
    text = "c1\t1\t2\t1\t2\tShe runs.\nc2\t1\t2\t1\t2\tHe sits.\nc3\t1\t2\t1\t2\tCaf\xe9 scene.\n"
    lsmdc = written(tmp_path / ann.LSMDC_FILES["test"], text.encode("latin-1"))
    with pytest.raises(DataError) as info:
        build("lsmdc", "test", DataPaths(data_path=str(tmp_path)))
    offset = text.index("\xe9")  # latin-1: one byte a character
    assert str(info.value).startswith(f"{lsmdc}: line 3 (byte {offset}): not UTF-8 text (byte 0xe9")
    assert "save the file as UTF-8" in str(info.value)


@pytest.mark.parametrize("depth", [65, 100_000])
def test_deeply_nested_json_is_refused_before_parsing(tmp_path, depth):
    webvid = written(tmp_path / "frozen_train_labels.json", "\n" + "[" * depth + "]" * depth)
    with pytest.raises(DataError) as info:
        build("webvid", "train", DataPaths(train_csv=str(webvid)))
    assert str(info.value).startswith(f"{webvid}: line 2: JSON nested deeper than 64 levels")
    nested = {"video_id": "v1", "question": "q?", "answer": "yes", "extra": json.loads("[" * 63 + "]" * 63)}
    qa = written(tmp_path / "test.jsonl", json.dumps(nested) + "\n" + qa_line("v2", "[" * 80) + "\n" + "[" * depth)
    labels = written(tmp_path / "train_ans2label.json", '{"yes": 0}')
    with pytest.raises(DataError) as info:  # 64 levels and brackets inside strings are fine; line 3 is not
        build("msrvtt_qa", "test", DataPaths(msrvtt_qa_test_json=str(qa), msrvtt_qa_anslabel_json=str(labels)))
    assert str(info.value).startswith(f"{qa}: line 3: JSON nested deeper than 64 levels")


def test_answer_index_far_beyond_the_vocabulary_size(tmp_path):
    """A 10**12 index would make a 10**12-output classifier: refused naming the file and the answer."""
    qa = written(tmp_path / "test.jsonl", qa_line("v1", "q?", "cat") + "\n")
    labels = written(tmp_path / "train_ans2label.json", json.dumps({"cat": 0, "dog": 10**12, "fish": 5}))
    paths = DataPaths(msrvtt_qa_test_json=str(qa), msrvtt_qa_anslabel_json=str(labels))
    with pytest.raises(DataError) as info:
        build("msrvtt_qa", "test", paths)
    message = str(info.value)
    assert message.startswith(f"{labels}: answer 'dog': index 1000000000000 is far beyond the file's 3 answers")
    assert f"indices must be below {4 * 3 + 1024}" in message and "number the answers 0..2" in message
    written(labels, json.dumps({"cat": 0, "dog": 1, "fish": 1035}))  # sparse but bounded: still accepted
    assert build("msrvtt_qa", "test", paths).ans2label == {"cat": 0, "dog": 1, "fish": 1035}


def test_billion_laughs_raw_captions_pickle(tmp_path):
    """Ten references to a list of ten references to ...: 245 bytes that walk as 10**10 words."""
    caption = ["lol"] * 10
    for _ in range(9):
        caption = [caption] * 10
    data = written(tmp_path / "msvd" / "raw-captions.pkl", pickle.dumps({"vid1": caption}, protocol=4))
    written(tmp_path / "msvd" / "test_list.txt", "vid1\n")
    with pytest.raises(DataError) as info:
        build("msvd", "test", DataPaths(data_path=str(data.parent)))
    assert str(info.value).startswith(f"{data}: expands to more than ") and "billion laughs" in str(info.value)


ESCAPING_IDS = ["../outside.mp4", "/ABS/outside.mp4", "sub/../../outside.mp4", "..", "a\x00b"]


@pytest.mark.parametrize("bad_id", ESCAPING_IDS)
def test_video_ids_cannot_reach_files_outside_the_video_folder(synthetic_small, tmp_path, tokenizer, bad_id):
    """A DiDeMo id ``as named in the json`` pointing at a real video outside --features_path: a DataError naming the
    id and the folder, in evaluation; a training set skips it like an unreadable video."""
    folder = video_folder(synthetic_small, tmp_path)
    (tmp_path / "outside.mp4").symlink_to(synthetic_small / "videos" / "video2.mp4")
    bad_id = bad_id.replace("/ABS", str(tmp_path))
    source = FileVideoSource(folder, max_frames=T)
    if "\x00" not in bad_id:
        assert (folder / bad_id).resolve().is_file() or bad_id == ".."  # the file is there to be reached
    entries = [{"video": v, "description": f"about {v}", "times": [[0, 1]]} for v in (GOOD[0], bad_id, GOOD[1])]
    data = written(tmp_path / "didemo" / "train_data.json", json.dumps(entries))
    written(data.parent / "test_data.json", json.dumps(entries))
    paths = DataPaths(data_path=str(data.parent))
    evaluation = DATASETS["didemo"]("test", paths, source, ClipTransform(IMAGE), tokenizer, L)
    videos = evaluation.video_dataset()
    with pytest.raises(DataError) as info:
        videos[1]
    assert str(info.value).startswith(f"{folder}: video id {bad_id!r} from the annotation file points outside")
    assert videos[0]["video"].abs().sum() > 0
    train = DATASETS["didemo"]("train", paths, source, ClipTransform(IMAGE), tokenizer, L)
    item = train[1]  # replaced by the next readable sample
    assert train.video_ids[int(item["video_index"])] == GOOD[1] and train.bad_video_ids == {bad_id}


# ------------------------------------------------------------------------------------------------ checkpoints


def tiny_args(tmp_path: Path, *extra: str):
    return build_parser("clip").parse_args(
        ["--do_eval", "--output_dir", str(tmp_path / "out"), "--clip_config", TINY, "--max_frames", str(T),
         "--max_words", str(L), "--loose_type", *extra]
    )  # fmt: skip


def test_init_model_with_wrong_shapes(synthetic_small, tmp_path):
    state = build_model(tiny_args(tmp_path), with_fusion=False).state_dict()
    bad = {k: v.clone().contiguous() for k, v in state.items()}
    bad["encoder.clip.text_projection"] = torch.zeros(3, 5)
    path = tmp_path / "stage1.safetensors"
    save_file(bad, str(path))
    argv = ["--do_eval", "--output_dir", str(tmp_path / "run"), "--clip_config", TINY, "--loose_type",
            "--val_csv", str(synthetic_small / "msrvtt" / "MSRVTT_JSFUSION_test.csv"),
            "--features_path", str(synthetic_small / "videos"), "--init_model", str(path)]  # fmt: skip
    with pytest.raises(CheckpointError) as info:
        main_task_clip.main(argv)
    message = str(info.value)
    assert message.startswith(f"{path}: 1 tensors have the wrong shape")
    assert "encoder.clip.text_projection: checkpoint (3, 5) vs model (64, 64)" in message
    assert "Build the model with the flags it was trained with" in message


def test_init_model_with_missing_keys(tmp_path, caplog):
    args = tiny_args(tmp_path)
    source = build_model(args, with_fusion=False)
    state = source.state_dict()
    dropped = sorted(k for k in state if ".visual." in k)
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if k not in dropped}, str(path))
    args.init_model = str(path)
    target = build_model(tiny_args(tmp_path), with_fusion=False)
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        report = load_init_model(args, target)
    assert report.missing == [k for k in state if k in dropped] and report.loaded == len(state) - len(dropped)
    assert f"{len(dropped)} model tensors were not in {path}" in caplog.text
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state if k not in dropped)  # the rest did load


# ------------------------------------------------------------------------------------------------ flags


def test_max_words_beyond_the_positional_table_of_the_config(tmp_path):
    with pytest.raises(ConfigError, match=r"--max_words 100 is longer than the text positional table \(77"):
        main_task_clip.main(["--do_eval", "--output_dir", str(tmp_path), "--clip_config", TINY, "--max_words", "100"])


def test_max_words_beyond_the_positional_table_of_the_weights(tmp_path):
    config = json.loads(Path(TINY).read_text())
    clip = load_clip(config=CLIPConfig(**{**config, "context_length": SMALL_CONTEXT}))
    weights = tmp_path / "small-context.pt"
    torch.save(clip.state_dict(), weights)
    argv = ["--do_eval", "--output_dir", str(tmp_path / "run"), "--visual_pretrain_path", str(weights),
            "--max_words", str(SMALL_CONTEXT + 4), "--max_frames", str(T)]  # fmt: skip
    expected = (
        f"--max_words {SMALL_CONTEXT + 4} is longer than the text positional table of {weights} ({SMALL_CONTEXT} "
        f"positions): use --max_words <= {SMALL_CONTEXT}"
    )
    with pytest.raises(ConfigError) as info:
        main_task_clip.main(argv)
    assert str(info.value) == expected
    # every entry script builds its CLIP through engine.builders.build_clip, which checks it
    qa_args = build_qa_parser().parse_args(argv)
    with pytest.raises(ConfigError) as info:
        build_clip(qa_args)
    assert str(info.value) == expected


@pytest.mark.parametrize("scale", ["-1", "nan", "inf"])
def test_vtm_negative_scale_must_be_finite_and_non_negative(tmp_path, scale):
    args = build_parser("fusion").parse_args(
        ["--do_train", "--output_dir", str(tmp_path), "--clip_config", TINY, "--vtm_negative_scale", scale]
    )
    with pytest.raises(ConfigError, match=rf"--vtm_negative_scale must be a finite number >= 0 \(got {scale}"):
        validate(args)


def test_rerank_topk_larger_than_the_test_set_is_clamped_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="engine.flags"):
        assert effective_rerank_topk(32, 10, 12, "test.csv") == 10
        assert effective_rerank_topk(8, 10, 12, "test.csv") == 8
        assert effective_rerank_topk(0, 10, 12, "test.csv") == 0
    assert len(caplog.records) == 1
    assert "--rerank_topk 32 is larger than the test set of test.csv (10 captions, 12 videos)" in caplog.text


# ------------------------------------------------------------------------------------------------ evaluation


def test_evaluation_refuses_missing_videos_unless_allowed(synthetic_small, tmp_path):
    """main_task_clip --do_eval on a copy of the synthetic test videos with one deleted and one corrupted."""
    csv = synthetic_small / "msrvtt" / "MSRVTT_JSFUSION_test.csv"
    test_ids = ann.read_msrvtt_jsfusion(csv).video_ids
    deleted, corrupted = test_ids[3], test_ids[7]
    folder = tmp_path / "videos"
    folder.mkdir()
    for video_id in test_ids:
        if video_id != deleted and video_id != corrupted:
            (folder / f"{video_id}.mp4").symlink_to(synthetic_small / "videos" / f"{video_id}.mp4")
    (folder / f"{corrupted}.mp4").write_bytes(b"\x00" * 2048)
    argv = ["--do_eval", "--clip_config", TINY, "--val_csv", str(csv), "--features_path", str(folder),
            "--max_frames", str(T), "--max_words", str(L), "--batch_size_val", "4", "--num_thread_reader", "0",
            "--loose_type", "--seed", "0"]  # fmt: skip
    with pytest.raises(DataError) as info:
        main_task_clip.main([*argv, "--output_dir", str(tmp_path / "strict")])
    message = str(info.value)
    assert f"no video for id {deleted!r}" in message and "--allow_missing_eval_videos" in message
    assert not (tmp_path / "strict" / "eval_results.json").exists()

    metrics = main_task_clip.main([*argv, "--output_dir", str(tmp_path / "tolerant"), "--allow_missing_eval_videos"])
    results = json.loads((tmp_path / "tolerant" / "eval_results.json").read_text())
    assert sorted(metrics["dropped_videos"]) == sorted(results["dropped_videos"]) == sorted([deleted, corrupted])
    assert results["num_videos"] == len(test_ids) - 2
