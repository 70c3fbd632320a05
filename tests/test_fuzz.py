"""Fuzz tests (hypothesis, bounded): the shard reader, the record decoder, the annotation parsers and the restricted
unpickler take arbitrary bytes / text. Any input either parses or raises the project's own error type, never another
exception, and never hangs (each example has a deadline far above its normal cost).

``decode_video_example`` works on a bare payload with no file to name: its documented error is
``tfrecord_format.RecordError``, which ``ShardReader`` turns into a ``DataError`` naming shard, offset and video (the
shard-level targets check that wrapped form).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataloaders import annotations as ann
from dataloaders.errors import DataError, MemBridgeError
from dataloaders.safe_pickle import safe_load_pickle
from dataloaders.tfrecord_format import (
    MAX_FRAME_PIXELS,
    MAX_FRAME_SIDE,
    RecordError,
    bytes_feature,
    decode_example,
    decode_video_example,
    encode_example,
    encode_video_example,
    frame_record,
    int64_feature,
    parse_video_example,
)
from dataloaders.tfrecord_io import ShardReader, ShardWriter, iter_records, read_index
from dataloaders.video_io import FileVideoSource

EXAMPLES = 150
PARSER_EXAMPLES = 100  # per annotation parser (ten of them)
DEADLINE = timedelta(seconds=5)  # a normal example takes milliseconds: this only catches hangs
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=DEADLINE,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
FRAME_SIZE = 16


def _frames(n: int, size: int = FRAME_SIZE) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


VALID_PAYLOADS = {
    "jpeg": encode_video_example(_frames(2), "jpeg"),
    "raw": encode_video_example(_frames(1, 256), "raw"),
}


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with a few bytes overwritten, then maybe truncated or extended."""
    data = bytearray(valid)
    for position, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=6)):
        data[position] = value
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    tail = draw(st.binary(max_size=16))
    return bytes(data[:cut]) + tail


def payloads() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), *(mutated(valid) for valid in VALID_PAYLOADS.values()))


# ------------------------------------------------------------------------------------------------ shards


@FUZZ
@given(payload=payloads(), indices=st.sampled_from([None, [0], [0, 0]]))
def test_decode_video_example_decodes_or_raises_record_error(payload: bytes, indices: list[int] | None) -> None:
    """Indices are valid for any record (a parsed record holds at least one frame); out-of-range indices are a
    caller's error (IndexError), not bad data."""
    try:
        frames, encoding = decode_video_example(payload, indices)
    except RecordError:
        return
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
    assert encoding in ("raw", "jpeg")


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shard of three valid jpeg records and its index."""
    folder = tmp_path_factory.mktemp("fuzz_shard")
    with ShardWriter(folder / "path") as writer:
        for n in (1, 2, 3):
            writer.write(f"v{n}", encode_video_example(_frames(n), "jpeg"))
    return folder


@FUZZ
@given(data=st.data())
def test_shard_reader_reads_or_raises_data_error(shard_folder: Path, data: st.DataObject) -> None:
    """A mutated shard (bytes overwritten, cut, extended) behind a valid index: every video reads or raises."""
    (shard,) = shard_folder.glob("path-*.tfrecord")
    original = shard_folder / "original.bin"
    if not original.exists():
        original.write_bytes(shard.read_bytes())
    shard.write_bytes(data.draw(mutated(original.read_bytes())))
    reader = ShardReader(shard_folder / "path.index")
    try:
        for video_id in reader.video_ids:
            try:
                frames = reader.read(video_id)
            except MemBridgeError:
                continue
            assert frames.dtype == np.uint8 and frames.ndim == 4
    finally:
        reader.close()


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=256), st.lists(payloads(), max_size=3).map(lambda ps: b"".join(map(frame_record, ps)))
    )
)
def test_iter_records_yields_or_raises_data_error(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-iter.tfrecord"
    path.write_bytes(data)
    try:
        for offset, payload in iter_records(path):
            assert 0 <= offset < len(data) and len(payload) <= len(data)
    except MemBridgeError:
        pass


@FUZZ
@given(text=st.text(max_size=200))
def test_shard_index_parses_or_raises_data_error(shard_folder: Path, text: str) -> None:
    index = shard_folder / "fuzz.index"
    index.write_text(text, encoding="utf-8")
    try:
        reader = ShardReader(index)
    except MemBridgeError:
        return
    reader.close()


INDEX_ALPHABET = st.sampled_from(
    [
        "a",
        "0",
        "9",
        "\t",
        "\n",
        "\r",
        " ",
        "\ufeff",
        "\u00b2",
        "\u0663",
        "\u2028",
        "\u2029",
        "\x85",
        "\x0b",
        "\x0c",
        "\x1c",
    ]
)


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.text(INDEX_ALPHABET, max_size=80).map(lambda text: text.encode("utf-8")),
        st.tuples(st.text(INDEX_ALPHABET, max_size=60), st.binary(max_size=4)).map(lambda t: t[0].encode() + t[1]),
    )
)
def test_index_reader_counts_newline_lines_only(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    """Any bytes: entries or a DataError; when they parse, one entry per non-blank ``\\n`` line (no other
    character splits a line), and an error names a line number that exists in the file."""
    index = tmp_path_factory.getbasetemp() / "fuzz-lines.index"
    index.write_bytes(data)
    try:
        entries = read_index(index)
    except DataError as err:
        number = int(re.search(r", line (\d+): ", str(err)).group(1))
        assert 1 <= number <= data.count(b"\n") + 1
        return
    body = data.removeprefix(b"\xef\xbb\xbf")
    assert len(entries) == sum(1 for line in body.split(b"\n") if line.strip(b" \t\r"))
    assert all(entry.offset >= 0 and "\n" not in entry.video_id + entry.shard for entry in entries)


INDEX_ID = st.text(st.characters(blacklist_characters="\t\r\n", blacklist_categories=("Cs",)), min_size=1, max_size=8)


@FUZZ
@given(
    rows=st.lists(st.tuples(INDEX_ID, INDEX_ID, st.integers(0, 2**63 - 1)), max_size=6),
    bom=st.booleans(),
)
def test_index_lines_round_trip(tmp_path_factory: pytest.TempPathFactory, rows: list, bom: bool) -> None:
    """Ids and shard paths holding any character but tab / CR / LF (Unicode separators included) read back as
    written, with or without a byte-order mark."""
    rows = [row for row in rows if not row[0].startswith("\ufeff")]  # ShardWriter refuses such an id
    index = tmp_path_factory.getbasetemp() / "fuzz-round-trip.index"
    text = "".join(f"{vid}\t{shard}\t{offset}\n" for vid, shard, offset in rows)
    index.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    assert [(e.video_id, e.shard, e.offset) for e in read_index(index)] == rows


SIZE_CLAIMS = st.one_of(
    st.integers(-3, 20), st.integers(-(2**63), 2**63 - 1), st.sampled_from([MAX_FRAME_SIDE, MAX_FRAME_SIDE + 1, 10**6])
)


@FUZZ
@given(n=SIZE_CLAIMS, height=SIZE_CLAIMS, width=SIZE_CLAIMS, jpegs=st.integers(1, 3))
def test_jpeg_record_sizes_parse_within_bounds_or_raise(n: int, height: int, width: int, jpegs: int) -> None:
    """Any claimed frame count and size (int64): a RecordError, or a record within the bounds (so a decode never
    allocates more than MAX_FRAME_PIXELS a frame); small ones decode or raise RecordError."""
    frame = decode_example(VALID_PAYLOADS["jpeg"])["image"].values[0]
    payload = encode_example(
        {
            "image": bytes_feature(*[frame] * jpegs),
            "n_frames": int64_feature(n),
            "height": int64_feature(height),
            "width": int64_feature(width),
            "encoding": bytes_feature(b"jpeg"),
        }
    )
    try:
        record = parse_video_example(payload)
    except RecordError:
        return
    assert record.n_frames == n == jpegs and 1 <= record.height <= MAX_FRAME_SIDE and 1 <= record.width
    assert record.height * record.width <= MAX_FRAME_PIXELS
    if height * width <= 64 * 64:
        try:
            frames = record.decode([0])
        except RecordError:
            return
        assert frames.shape == (1, FRAME_SIZE, FRAME_SIZE, 3)  # only the true size decodes


# ------------------------------------------------------------------------------------------------ annotations

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
FIELDS = ("video_id", "caption", "question", "answer", "answer_type", "video", "description", "split", "sentences",
          "videos")  # fmt: skip
shaped_entries = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5)
json_documents = st.one_of(
    json_values,
    st.lists(shaped_entries, max_size=4),
    st.fixed_dictionaries(
        {"videos": st.lists(shaped_entries, max_size=3), "sentences": st.lists(shaped_entries, max_size=3)}
    ),
).map(json.dumps)
csv_rows = st.lists(
    st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8), min_size=1, max_size=6),
    max_size=5,
)


def _csv_text(header: str, rows: list[list[str]]) -> str:
    return header + "\n" + "\n".join(",".join(row) for row in rows) + "\n"


def _jsonl_text(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


TEXT_PARSERS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "webvid json": ("frozen_train_labels.json", ann.read_webvid_captions),
    "MSRVTT_data.json": ("MSRVTT_data.json", ann.read_msrvtt_data),
    "JSFUSION csv": ("MSRVTT_JSFUSION_test.csv", ann.read_msrvtt_jsfusion),
    "train csv": ("MSRVTT_train.9k.csv", ann.read_video_id_csv),
    "QA jsonl": ("test.jsonl", ann.read_qa_jsonl),
    "ans2label": ("train_ans2label.json", ann.read_ans2label),
    "LSMDC tsv": ("LSMDC16_challenge_1000_publictect.csv", ann.read_lsmdc),
    "DiDeMo json": ("test_data.json", ann.read_didemo_paragraphs),
    "split list": ("test_list.txt", ann.read_video_list),
    "MSVD captions json": ("raw-captions.json", lambda path: ann.read_msvd_captions(path.parent)),
}


SEPARATORS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"  # str.splitlines() line breaks that are not line endings
odd_text = st.one_of(  # brackets, quotes, separators, a BOM, line endings: the characters the text readers handle
    st.text(alphabet=st.sampled_from(list('[]{}"\\,:\t\r\n a1\ufeff' + SEPARATORS)), max_size=300),
    st.integers(0, 5000).map(lambda n: "[" * n + "]" * (n % 3)),  # nesting far past the bound
    st.integers(0, 5000).map(lambda n: '{"a":' * n),
).map(lambda text: text if text[:1] != "\ufeff" else "\ufeff" + text)


def any_text_for(name: str) -> st.SearchStrategy[str]:
    """Free text plus inputs shaped like the parser's format, so fuzzing reaches past the first check."""
    shaped = {
        "JSFUSION csv": csv_rows.map(lambda rows: _csv_text("key,vid_key,video_id,sentence", rows)),
        "train csv": csv_rows.map(lambda rows: _csv_text("video_id", rows)),
        "QA jsonl": st.lists(json_documents | st.text(max_size=20), max_size=4).map(_jsonl_text),
        "LSMDC tsv": st.lists(st.lists(st.text(max_size=6), max_size=7).map("\t".join), max_size=4).map(_jsonl_text),
    }
    return st.one_of(st.text(max_size=300), odd_text, json_documents, shaped.get(name, json_documents))


@pytest.mark.parametrize("name", sorted(TEXT_PARSERS))
def test_annotation_parsers_parse_or_raise_data_error(tmp_path: Path, name: str) -> None:
    filename, parse = TEXT_PARSERS[name]
    path = tmp_path / filename

    @settings(FUZZ, max_examples=PARSER_EXAMPLES)
    @given(text=any_text_for(name))
    def run(text: str) -> None:
        path.write_text(text, encoding="utf-8")
        try:
            parse(path)
        except MemBridgeError:
            pass

    run()


@pytest.mark.parametrize("name", sorted(TEXT_PARSERS))
def test_annotation_parsers_take_any_bytes(tmp_path: Path, name: str) -> None:
    """Bytes that are not UTF-8 (or are): parse or a ``MemBridgeError``, never ``UnicodeDecodeError``."""
    filename, parse = TEXT_PARSERS[name]
    path = tmp_path / filename

    @settings(FUZZ, max_examples=PARSER_EXAMPLES // 2)
    @given(
        data=st.one_of(
            st.binary(max_size=200),
            any_text_for(name).map(str.encode).flatmap(lambda b: mutated(b) if b else st.just(b)),
        )
    )
    def run(data: bytes) -> None:
        path.write_bytes(data)
        try:
            parse(path)
        except MemBridgeError:
            pass

    run()


row_text = st.text(alphabet=st.sampled_from(list("abc ?" + SEPARATORS)), min_size=1, max_size=12).filter(str.strip)


@FUZZ
@given(questions=st.lists(row_text, min_size=1, max_size=5), crlf=st.booleans(), bom=st.booleans())
def test_rows_holding_separators_read_whole(tmp_path_factory: pytest.TempPathFactory, questions, crlf, bom) -> None:
    """Rows whose text holds Unicode line separators read back one row each, text intact, in the QA jsonl, LSMDC tsv
    and csv readers (with ``\\r\\n`` or ``\\n`` endings and an optional BOM)."""
    end, start = ("\r\n" if crlf else "\n"), ("\ufeff" if bom else "")
    folder = tmp_path_factory.getbasetemp()
    qa = folder / "sep.jsonl"
    lines = [
        json.dumps({"video_id": f"v{i}", "question": q, "answer": "a"}, ensure_ascii=False)
        for i, q in enumerate(questions)
    ]
    qa.write_text(start + end.join(lines) + end, encoding="utf-8", newline="")
    assert [r.question for r in ann.read_qa_jsonl(qa)] == questions
    tsv = folder / "sep.tsv"
    tsv.write_text(start + end.join(f"c{i}\t1\t2\t1\t2\t{q}" for i, q in enumerate(questions)) + end, newline="")
    assert [r.sentence for r in ann.read_lsmdc(tsv)] == [q.strip() for q in questions]
    csv_file = folder / "sep.csv"
    csv_rows = "".join(f"{i},msr{i},video{i},{q}{end}" for i, q in enumerate(questions))
    csv_file.write_text(f"{start}key,vid_key,video_id,sentence{end}{csv_rows}", encoding="utf-8", newline="")
    assert ann.read_msrvtt_jsfusion(csv_file).texts == questions


@pytest.fixture(scope="module")
def video_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/videos/{a.mp4, sub/b.mp4}`` and ``root/outside.mp4``, a file an id must never reach."""
    root = tmp_path_factory.mktemp("fuzz_videos")
    (root / "videos" / "sub").mkdir(parents=True)
    for path in (root / "videos" / "a.mp4", root / "videos" / "sub" / "b.mp4", root / "outside.mp4"):
        path.write_bytes(b"not decoded here")
    return root


path_parts = st.sampled_from(["..", ".", "", "a", "a.mp4", "sub", "b", "b.mp4", "outside", "outside.mp4", "\\", "\x00"])


@FUZZ
@given(parts=st.lists(path_parts, min_size=1, max_size=6), absolute=st.booleans())
def test_video_ids_stay_inside_the_video_folder(video_tree: Path, parts: list[str], absolute: bool) -> None:
    """Any id built from path parts resolves to a file inside the folder, or is a ``DataError``."""
    video_id = ("/" if absolute else "") + "/".join(parts)
    if absolute:
        video_id = str(video_tree) + video_id
    source = FileVideoSource(video_tree / "videos", max_frames=1)
    try:
        path = source.path_for(video_id)
    except MemBridgeError:
        return
    assert Path(os.path.realpath(path)).is_relative_to(os.path.realpath(video_tree / "videos"))


@st.composite
def memo_bombs(draw: st.DrawFn) -> bytes:
    """Pickles of lists referencing one shared list many levels down ("billion laughs"), maybe mutated."""
    value: list = [draw(st.text(max_size=4))] * draw(st.integers(1, 12))
    for _ in range(draw(st.integers(0, 12))):
        value = [value] * draw(st.integers(1, 12))
    return draw(mutated(pickle.dumps({"vid": value}, protocol=draw(st.sampled_from([0, 2, 4, 5])))))


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.sampled_from([0, 2, 4, 5]).flatmap(
            lambda protocol: mutated(pickle.dumps({"vid": [["a", "dog"], ["runs"]], "n": (1, 2.5, None)}, protocol))
        ),
        memo_bombs(),
    )
)
def test_safe_load_pickle_loads_or_raises_data_error(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-raw-captions.pkl"
    path.write_bytes(data)
    try:
        safe_load_pickle(path)
    except MemBridgeError:
        pass
