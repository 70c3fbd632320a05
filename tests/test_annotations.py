"""Annotation parsers on small files in the exact real formats, malformed rows, and the real test files."""

import json
import pickle
from pathlib import Path

import pytest

from dataloaders import annotations as ann
from dataloaders import textio
from dataloaders.errors import DataError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _msrvtt_json(tmp_path: Path, videos: list[tuple[str, str]], sentences: list[tuple[str, str]]) -> Path:
    data = {
        "info": {"year": 2016},
        "videos": [
            {
                "category": 9,
                "url": "https://youtube.com/watch?v=x",
                "video_id": v,
                "start time": 1.0,
                "end time": 11.0,
                "split": s,
                "id": i,
            }
            for i, (v, s) in enumerate(videos)
        ],
        "sentences": [{"caption": c, "video_id": v, "sen_id": i} for i, (v, c) in enumerate(sentences)],
    }
    return _write(tmp_path / "MSRVTT_data.json", json.dumps(data))


# ----------------------------------------------------------------------------------------------- WebVid


def test_webvid_captions(tmp_path):
    path = _write(
        tmp_path / "frozen_train_labels.json",
        json.dumps(
            [{"video_id": "1066674784", "caption": "Aerial shot of a lake"}, {"video_id": 5, "caption": "A cat"}]
        ),
    )
    assert ann.read_webvid_captions(path) == [("1066674784", "Aerial shot of a lake"), ("5", "A cat")]


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"video_id": "1", "caption": "ok"}, {"video_id": "2"}]', "entry 1: missing key 'caption'"),
        ('[{"video_id": "1", "caption": "  "}]', "entry 0: empty 'caption'"),
        ('[{"video_id": "1", "caption": ["a"]}]', "entry 0: 'caption' has type list"),
        ('[{"video_id": "1", "caption": "a"},\n {"video_id": "2" "caption": "b"}]', "line 2: invalid JSON"),
        ('{"video_id": "1"}', "expected a JSON list"),
    ],
)
def test_webvid_malformed(tmp_path, content, message):
    path = _write(tmp_path / "frozen_train_labels.json", content)
    with pytest.raises(DataError) as info:
        ann.read_webvid_captions(path)
    assert str(path) in str(info.value) and message in str(info.value)


# ----------------------------------------------------------------------------------------------- MSR-VTT


@pytest.fixture
def msrvtt(tmp_path):
    videos = [("video0", "train"), ("video1", "train"), ("video2", "validate"), ("video3", "test")]
    sentences = [
        ("video1", "b one"),
        ("video0", "a one"),
        ("video1", "b two"),
        ("video2", "c"),
        ("video3", "d"),
        ("video0", "a two"),
        ("video3", "d two"),
    ]
    data_file = _msrvtt_json(tmp_path, videos, sentences)
    train_csv = _write(tmp_path / "MSRVTT_train.9k.csv", "video_id\nvideo0\nvideo1\n")
    return data_file, train_csv


def test_msrvtt_train_pairs(msrvtt):
    data_file, train_csv = msrvtt
    data = ann.read_msrvtt_data(data_file)
    assert data.video_split == {"video0": "train", "video1": "train", "video2": "validate", "video3": "test"}
    train_ids = ann.read_video_id_csv(train_csv)
    assert train_ids == ["video0", "video1"]
    expanded = ann.msrvtt_train_pairs(train_ids, data, expand_sentences=True, train_file=train_csv)
    assert [(p.video_id, p.captions) for p in expanded] == [
        ("video1", ("b one",)),
        ("video0", ("a one",)),
        ("video1", ("b two",)),
        ("video0", ("a two",)),
    ]
    per_video = ann.msrvtt_train_pairs(train_ids, data, expand_sentences=False, train_file=train_csv)
    assert per_video == [ann.TrainPair("video0", ("a one", "a two")), ann.TrainPair("video1", ("b one", "b two"))]


def test_msrvtt_train_unknown_video(msrvtt, tmp_path):
    data_file, _ = msrvtt
    bad_csv = _write(tmp_path / "MSRVTT_train.7k.csv", "video_id\nvideo0\nvideo77\nvideo78\n")
    with pytest.raises(DataError) as info:
        ann.msrvtt_train_pairs(ann.read_video_id_csv(bad_csv), ann.read_msrvtt_data(data_file), False, bad_csv)
    assert "MSRVTT_train.7k.csv" in str(info.value) and "2 video id(s)" in str(info.value)
    assert "video77" in str(info.value)


def test_msrvtt_json_malformed(tmp_path):
    path = _msrvtt_json(tmp_path, [("video0", "train")], [("video0", "a"), ("video9", "b")])
    with pytest.raises(DataError, match="video9"):
        ann.read_msrvtt_data(path)
    data = json.loads(path.read_text())
    del data["sentences"][1]["caption"]
    _write(path, json.dumps(data))
    with pytest.raises(DataError, match="sentences entry 1: missing key 'caption'"):
        ann.read_msrvtt_data(path)


def test_msrvtt_csv_malformed(tmp_path):
    with pytest.raises(DataError, match="lacks column"):
        ann.read_video_id_csv(_write(tmp_path / "a.csv", "vid\nvideo0\n"))
    path = _write(
        tmp_path / "MSRVTT_JSFUSION_test.csv", "key,vid_key,video_id,sentence\nret0,msr1,video1,a\nret1,msr2\n"
    )
    with pytest.raises(DataError) as info:
        ann.read_msrvtt_jsfusion(path)
    assert str(path) in str(info.value) and "line 3" in str(info.value)
    _write(path, "key,vid_key,video_id,sentence\nret0,msr1,video1,\n")
    with pytest.raises(DataError, match="line 2: empty sentence"):
        ann.read_msrvtt_jsfusion(path)


def test_msrvtt_jsfusion_small(tmp_path):
    rows = 'key,vid_key,video_id,sentence\nret0,msr9770,video9770,"a man, talking"\nret1,msr9771,video9771,b\n'
    path = _write(tmp_path / "MSRVTT_JSFUSION_test.csv", rows)
    result = ann.read_msrvtt_jsfusion(path)
    assert result.video_ids == ["video9770", "video9771"]
    assert result.texts == ["a man, talking", "b"] and result.text_to_video == [0, 1]


def test_msrvtt_caption_split(msrvtt):
    data_file, _ = msrvtt
    data = ann.read_msrvtt_data(data_file)
    assert ann.msrvtt_caption_split(data, "train", data_file) == {
        "video0": ["a one", "a two"],
        "video1": ["b one", "b two"],
    }
    assert ann.msrvtt_caption_split(data, "val", data_file) == {"video2": ["c"]}
    assert ann.msrvtt_caption_split(data, "test", data_file) == {"video3": ["d", "d two"]}


def test_msrvtt_caption_split_checks_standard_boundaries(tmp_path):
    def split_of(n: int) -> str:
        return "train" if n < 6513 else "validate" if n < 7010 else "test"

    videos = [(f"video{n}", split_of(n)) for n in range(10000)]
    sentences = [(f"video{n}", f"caption {n}") for n in range(10000)]
    data_file = _msrvtt_json(tmp_path, videos, sentences)
    test_refs = ann.msrvtt_caption_split(ann.read_msrvtt_data(data_file), "test", data_file)
    assert len(test_refs) == 2990 and next(iter(test_refs)) == "video7010"
    videos[7010] = ("video7010", "train")
    data_file = _msrvtt_json(tmp_path, videos, sentences)
    with pytest.raises(DataError, match="video7010"):
        ann.msrvtt_caption_split(ann.read_msrvtt_data(data_file), "test", data_file)


# ----------------------------------------------------------------------------------------------- MSVD


MSVD_CAPTIONS = {
    "-4wsuPCjDBc_5_15": [["a", "squirrel", "is", "eating"], ["a", "chipmunk", "eats"]],
    "-7KMZQEsJW4_205_208": [["a", "woman", "is", "cooking"]],
    "-8y1Q0rA3n8_108_115": [["a", "man", "runs"], ["someone", "runs"], ["a", "person", "jogs"]],
}


@pytest.fixture
def msvd(tmp_path):
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps(MSVD_CAPTIONS, protocol=2))
    _write(tmp_path / "train_list.txt", "-4wsuPCjDBc_5_15\n-7KMZQEsJW4_205_208\n")
    _write(tmp_path / "test_list.txt", "-8y1Q0rA3n8_108_115\n-4wsuPCjDBc_5_15\n\n")
    return tmp_path


def test_msvd_pickle_and_json(msvd):
    captions = ann.read_msvd_captions(msvd)
    assert captions["-4wsuPCjDBc_5_15"] == ["a squirrel is eating", "a chipmunk eats"]
    (msvd / "raw-captions.json").write_text(json.dumps({"x": [["from", "json"]]}))
    assert ann.read_msvd_captions(msvd) == {"x": ["from json"]}  # the JSON conversion wins when present


def test_msvd_splits(msvd):
    captions = ann.read_msvd_captions(msvd)
    test_ids = ann.read_video_list(msvd / "test_list.txt")
    assert test_ids == ["-8y1Q0rA3n8_108_115", "-4wsuPCjDBc_5_15"]
    split = ann.msvd_captions_for(test_ids, captions, msvd / "test_list.txt")
    evaluation = ann.eval_from_captions(split)
    assert evaluation.video_ids == test_ids
    assert evaluation.texts == [
        "a man runs",
        "someone runs",
        "a person jogs",
        "a squirrel is eating",
        "a chipmunk eats",
    ]
    assert evaluation.text_to_video == [0, 0, 0, 1, 1]
    train = ann.expand_train_pairs(ann.msvd_captions_for(ann.read_video_list(msvd / "train_list.txt"), captions, "x"))
    assert [p.video_id for p in train] == ["-4wsuPCjDBc_5_15", "-4wsuPCjDBc_5_15", "-7KMZQEsJW4_205_208"]


def test_msvd_malformed(msvd):
    _write(msvd / "val_list.txt", "-4wsuPCjDBc_5_15\nnot_a_video\n")
    with pytest.raises(DataError, match="val_list.txt: 1 video id"):
        ann.msvd_captions_for(
            ann.read_video_list(msvd / "val_list.txt"), ann.read_msvd_captions(msvd), msvd / "val_list.txt"
        )
    (msvd / "raw-captions.pkl").write_bytes(pickle.dumps({"v": [["a"], "not a token list"]}, protocol=4))
    with pytest.raises(DataError, match="video 'v' caption 1"):
        ann.read_msvd_captions(msvd)
    (msvd / "raw-captions.pkl").write_bytes(pickle.dumps({"v": [[]]}, protocol=4))
    with pytest.raises(DataError, match="empty caption"):
        ann.read_msvd_captions(msvd)


# ----------------------------------------------------------------------------------------------- LSMDC


LSMDC_LINES = [
    "1004_Juno_00.00.32.849-00.00.35.458\t00.00.32.849\t00.00.35.458\t00.00.32.514\t00.00.35.669\tSomeone sits.",
    "1004_Juno_00.00.35.642-00.00.38.012\t00.00.35.642\t00.00.38.012\t00.00.35.500\t00.00.38.500\tShe stands up.",
    "1004_Juno_00.00.32.849-00.00.35.458\t00.00.32.849\t00.00.35.458\t00.00.32.514\t00.00.35.669\tSomeone drinks.",
]


def test_lsmdc(tmp_path):
    path = _write(tmp_path / ann.LSMDC_FILES["train"], "\n".join(LSMDC_LINES) + "\n\n")
    rows = ann.read_lsmdc(path)
    assert len(rows) == 3 and rows[1].sentence == "She stands up." and rows[0].start_extracted == "00.00.32.514"
    captions = ann.lsmdc_captions(rows)
    assert captions == {
        "1004_Juno_00.00.32.849-00.00.35.458": ["Someone sits.", "Someone drinks."],
        "1004_Juno_00.00.35.642-00.00.38.012": ["She stands up."],
    }
    assert ann.LSMDC_FILES["test"] == "LSMDC16_challenge_1000_publictect.csv"


def test_lsmdc_malformed(tmp_path):
    path = _write(tmp_path / "LSMDC16_annos_val.csv", LSMDC_LINES[0] + "\n" + LSMDC_LINES[1].replace("\t", " ", 2))
    with pytest.raises(DataError) as info:
        ann.read_lsmdc(path)
    assert "LSMDC16_annos_val.csv: line 2: 4 tab-separated fields" in str(info.value)
    _write(path, LSMDC_LINES[0].rsplit("\t", 1)[0] + "\t \n")
    with pytest.raises(DataError, match="line 1: empty sentence"):
        ann.read_lsmdc(path)


def test_index_video_files_walks_movie_folders(tmp_path):
    movie = tmp_path / "1004_Juno"
    movie.mkdir()
    (movie / "1004_Juno_00.00.32.849-00.00.35.458.avi").write_bytes(b"")
    (tmp_path / "other.avi").write_bytes(b"")
    found = ann.index_video_files(tmp_path, ["1004_Juno_00.00.32.849-00.00.35.458", "missing"], keep_extension=False)
    assert found == {"1004_Juno_00.00.32.849-00.00.35.458": movie / "1004_Juno_00.00.32.849-00.00.35.458.avi"}
    assert ann.index_video_files(tmp_path, ["other.avi"], keep_extension=True) == {"other.avi": tmp_path / "other.avi"}


# ----------------------------------------------------------------------------------------------- DiDeMo


def test_didemo_paragraphs(tmp_path):
    entries = [
        {"video": "v1.mp4", "description": "first", "times": [[0, 0]], "annotation_id": 1},
        {"video": "v2.mov", "description": "other", "times": [[1, 2]], "annotation_id": 2},
        {"video": "v1.mp4", "description": "second", "times": [[2, 3]], "annotation_id": 3},
    ]
    path = _write(tmp_path / "test_data.json", json.dumps(entries))
    assert ann.read_didemo_paragraphs(path) == {"v1.mp4": "first second", "v2.mov": "other"}
    assert ann.read_didemo_paragraphs(path, ["v2.mov"]) == {"v2.mov": "other"}
    evaluation = ann.didemo_eval(ann.read_didemo_paragraphs(path))
    assert evaluation.video_ids == ["v1.mp4", "v2.mov"] and evaluation.text_to_video == [0, 1]
    assert evaluation.video_clips == {"v1.mp4": (0.0, 30.0), "v2.mov": (0.0, 30.0)}
    assert ann.didemo_train_pairs({"v": "p"}) == [ann.TrainPair("v", ("p",), 0.0, 30.0)]
    entries[2]["description"] = 7
    _write(path, json.dumps(entries))
    with pytest.raises(DataError, match="test_data.json: entry 2: 'description' has type int"):
        ann.read_didemo_paragraphs(path)


# ----------------------------------------------------------------------------------------------- QA


def test_qa_rows_and_vocabulary(tmp_path):
    lines = [
        {"video_id": "video1", "question": "what is a man doing?", "answer": "sing", "answer_type": "what"},
        {"video_id": "video1", "question": "who sings?", "answer": "man", "answer_type": "who"},
        {"video_id": "video2", "question": "what is played?", "answer": "guitar", "answer_type": "what"},
        {"video_id": "video3", "question": "what is sung?", "answer": "sing", "answer_type": "what"},
        {"video_id": "video3", "question": "who?", "answer": "woman"},
    ]
    path = _write(tmp_path / "train.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    rows = ann.read_qa_jsonl(path)
    assert rows[0] == ann.QARow("video1", "what is a man doing?", "sing", "what") and rows[4].answer_type == ""
    # counts: sing 2, then guitar/man/woman 1 each, ties alphabetical
    assert ann.build_answer_vocab(rows) == {"sing": 0, "guitar": 1, "man": 2, "woman": 3}
    top2 = ann.build_answer_vocab(rows, num_answers=2)
    assert top2 == {"sing": 0, "guitar": 1}
    assert [ann.answer_label(r.answer, top2) for r in rows] == [0, -1, 1, 0, -1]
    labels = _write(tmp_path / "train_ans2label.json", json.dumps({"man": 0, "sing": 1}))
    from_file = ann.build_answer_vocab(rows, ann.read_ans2label(labels), num_answers=1)
    assert from_file == {"man": 0, "sing": 1}


def test_qa_malformed(tmp_path):
    good = json.dumps({"video_id": "v", "question": "q?", "answer": "a", "answer_type": "what"})
    path = _write(tmp_path / "val.jsonl", good + "\n" + '{"video_id": "v", "question": "q?"\n')
    with pytest.raises(DataError, match="val.jsonl: line 2: invalid JSON"):
        ann.read_qa_jsonl(path)
    _write(path, good + "\n" + good + "\n" + json.dumps({"video_id": "v", "question": "q?"}))
    with pytest.raises(DataError, match="val.jsonl: line 3: missing key 'answer'"):
        ann.read_qa_jsonl(path)
    labels = _write(tmp_path / "train_ans2label.json", json.dumps({"a": 0, "b": 0}))
    with pytest.raises(DataError, match="index 0 also used"):
        ann.read_ans2label(labels)
    _write(labels, json.dumps({"a": "0"}))
    with pytest.raises(DataError, match="not a non-negative integer"):
        ann.read_ans2label(labels)


def test_check_ids(tmp_path):
    ann.check_ids(["a", "b"], {"a", "b", "c"}, tmp_path / "f.csv")
    with pytest.raises(DataError) as info:
        ann.check_ids([f"x{i}" for i in range(9)] + ["a"], ["a"], tmp_path / "f.csv")
    assert "f.csv: 9 video id(s)" in str(info.value) and "x0" in str(info.value) and "x8" not in str(info.value)


# ----------------------------------------------------------------------------------------------- real files


def test_real_msrvtt_jsfusion(realdata):
    result = ann.read_msrvtt_jsfusion(realdata / "msrvtt-jsfusion-aic" / "MSRVTT_JSFUSION_test.csv")
    expected_ids = ann.read_video_list(realdata / "msrvtt-contextiq" / "val_list_jsfusion.txt")
    assert len(result.texts) == 1000 and len(result.video_ids) == 1000
    assert set(result.video_ids) == set(expected_ids)
    assert result.text_to_video == list(range(1000))
    assert result.video_ids[0] == "video9770" and result.texts[0] == "a person is connecting something to system"


def test_real_didemo_val_paragraphs(realdata):
    path = realdata / "didemo-localizingmoments" / "val_data.json"
    paragraphs = ann.read_didemo_paragraphs(path)
    entries = json.loads(path.read_text())
    assert len(paragraphs) == len({e["video"] for e in entries}) == 1094
    assert paragraphs["35034348999@N01_6060447507_dc1a90b8ef.mov"] == (
        "the man in the hat briefly bends over the machine the man is waving his arm around man is holding his hat. "
        "man with hat waves right hand up and down a man with a hat looking at a wavy object."
    )
    assert next(iter(paragraphs)) == entries[0]["video"]


# ----------------------------------------------------------------------------------------------- shared text reading


def test_split_lines_splits_on_real_line_endings_only():
    separators = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"
    text = f"one{separators}row\r\ntwo\rthree\n\nfive"
    assert textio.split_lines(text) == [f"one{separators}row", "two", "three", "", "five"]
    assert len(text.splitlines()) == 13  # what the readers used to count
    assert textio.split_lines("a\n") == ["a"] and textio.split_lines("") == []


def test_read_text_drops_a_bom_and_names_bad_bytes(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(b"\xef\xbb\xbfvideo1\nvideo2\n")
    assert ann.read_video_list(path) == ["video1", "video2"]
    path.write_bytes(b"\xef\xbb\xbfvideo1\nvid\xffeo2\n")  # byte 3 + 7 + 3 = 13, line 2
    with pytest.raises(DataError, match=r"list.txt: line 2 \(byte 13\): not UTF-8 text \(byte 0xff"):
        ann.read_video_list(path)
    with pytest.raises(DataError, match=r"absent.txt: file not found; check --data_path"):
        ann.read_video_list(tmp_path / "absent.txt")


def test_parse_json_names_lines_and_bounds_nesting(tmp_path):
    assert textio.parse_json('{"a": ["[[[[", "\\"]]"]}', "f") == {"a": ["[[[[", '"]]']}
    assert textio.parse_json("[" * 64 + "]" * 64, "f") == json.loads("[" * 64 + "]" * 64)
    with pytest.raises(DataError, match=r"^f: line 3: JSON nested deeper than 64 levels"):
        textio.parse_json("{\n" + '"a": {"b": [\n' + "[" * 70, "f")
    with pytest.raises(DataError, match=r"^f: line 12: invalid JSON \(Expecting value\); fix the line$"):
        textio.parse_json('{"a": }', "f", first_line=12, todo="fix the line")
    with pytest.raises(DataError, match=r"^f: line 7: JSON that cannot be read \(Exceeds the limit"):
        textio.parse_json("1" * 5000, "f", first_line=7)
    path = _write(tmp_path / "val.jsonl", '{"video_id": "v", "question": "q", "answer": ' + "1" * 5000 + "}\n")
    with pytest.raises(DataError, match="val.jsonl: line 1: JSON that cannot be read"):
        ann.read_qa_jsonl(path)


def test_csv_field_over_the_size_limit_is_a_data_error(tmp_path):
    path = _write(tmp_path / "MSRVTT_train.9k.csv", "video_id\nvideo1\n" + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"MSRVTT_train.9k.csv: line 3: unreadable CSV \(field larger than"):
        ann.read_video_id_csv(path)
    good = '\ufeffvideo_id\r\n"video\u20281"\r\n"video\n2"\r\nvideo3\r\n'
    assert ann.read_video_id_csv(_write(tmp_path / "ok.csv", good)) == ["video\u20281", "video\n2", "video3"]
    _write(path, good + '\r\n""\r\n')
    with pytest.raises(DataError, match=r"line 7: empty video_id"):  # a quoted row of two lines counts two
        ann.read_video_id_csv(path)


def test_answer_indices_are_bounded_by_the_answer_count(tmp_path):
    assert ann.answer_index_limit(3) == 4 * 3 + 1024
    labels = _write(tmp_path / "train_ans2label.json", json.dumps({"a": 0, "b": 1, "c": 1035}))
    assert ann.read_ans2label(labels) == {"a": 0, "b": 1, "c": 1035}
    _write(labels, json.dumps({"a": 0, "b": 1, "c": 1036}))
    with pytest.raises(DataError, match=r"train_ans2label.json: answer 'c': index 1036 is far beyond the file's 3"):
        ann.read_ans2label(labels)
