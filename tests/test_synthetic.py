"""The embedded synthetic dataset: file formats, the visual signal, QA answers, shards and determinism."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import av
import numpy as np
import pytest

from dataloaders import synthetic
from dataloaders.errors import ConfigError
from dataloaders.safe_pickle import safe_load_pickle

ANNOTATION_FILES = (
    "msrvtt/MSRVTT_data.json",
    "msrvtt/MSRVTT_train.9k.csv",
    "msrvtt/MSRVTT_train.7k.csv",
    "msrvtt/MSRVTT_JSFUSION_test.csv",
    "msvd/train_list.txt",
    "msvd/val_list.txt",
    "msvd/test_list.txt",
    "msvd/raw-captions.pkl",
    "msrvtt_qa/train.jsonl",
    "msrvtt_qa/val.jsonl",
    "msrvtt_qa/test.jsonl",
    "msrvtt_qa/train_ans2label.json",
    "webvid/frozen_train_labels.json",
    "manifest.json",
)
ALL_COLORS = {**synthetic.COLORS, **synthetic.HELD_OUT_COLORS}
FOREGROUND_DISTANCE = 40.0  # RGB distance from the frame's median that counts as a shape pixel


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _split_ids(root: Path, split: str) -> list[str]:
    return [vid for vid, attrs in _manifest(root)["videos"].items() if attrs["split"] == split]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _foreground(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel distance from each frame's median colour (the background), and the frames as float."""
    frames = frames.astype(np.float64)
    background = np.median(frames.reshape(len(frames), -1, 3), axis=1)[:, None, None, :]
    return np.linalg.norm(frames - background, axis=-1), frames


def _visible_color(frames: np.ndarray) -> str:
    """Palette colour nearest to the mean of the strongest foreground pixels (the full-colour shapes, not streaks)."""
    distance, frames = _foreground(frames)
    strong = frames[distance >= np.quantile(distance[distance > FOREGROUND_DISTANCE], 0.5)].mean(axis=0)
    return min(ALL_COLORS, key=lambda name: np.linalg.norm(strong - np.asarray(ALL_COLORS[name])))


def _words_of(caption: str, vocabulary: list[str]) -> set[str]:
    return set(caption.split()) & set(vocabulary)


def _check_caption(caption: str, attrs: dict) -> None:
    """The caption names exactly the video's colour, shape, count and motion."""
    words = caption.split()
    assert _words_of(caption, list(ALL_COLORS)) == {attrs["color"]}, caption
    assert {w.rstrip("s") for w in words} & set(synthetic.SHAPES) == {attrs["shape"]}, caption
    counts = set(words) & {"two", "three"}
    if attrs["count"] == 1:
        assert not counts and set(words) & {"a", "an", "one"}, caption
    else:
        assert counts == {synthetic.COUNT_WORDS[attrs["count"]]}, caption
    phrases = {motion: {p for forms in options for p in forms} for motion, options in synthetic.MOTION_PHRASES.items()}
    named = {motion for motion, options in phrases.items() if any(f" {p}" in f" {caption}" for p in options)}
    assert named == {attrs["motion"]}, caption


def test_every_file_is_written(synthetic_small: Path) -> None:
    for name in ANNOTATION_FILES:
        assert (synthetic_small / name).is_file(), name
    manifest = _manifest(synthetic_small)
    assert manifest["splits"] == dict(zip(synthetic.SPLITS, synthetic.SMALL_SPLITS, strict=True))
    assert len(manifest["videos"]) == manifest["num_videos"] == sum(synthetic.SMALL_SPLITS)
    videos = sorted(p.stem for p in (synthetic_small / "videos").iterdir())
    assert videos == sorted(manifest["videos"]) and all(
        p.suffix == ".mp4" for p in (synthetic_small / "videos").iterdir()
    )
    num_test = manifest["splits"]["test"]
    assert manifest["chance"]["retrieval_R1"] == pytest.approx(100.0 / num_test)
    assert manifest["vocabularies"]["count"] == ["one", "two", "three"]


def test_msrvtt_files(synthetic_small: Path) -> None:
    root = synthetic_small / "msrvtt"
    data = json.loads((root / "MSRVTT_data.json").read_text())
    assert set(data) == {"videos", "sentences"}
    split_of = {"train": "train", "val": "validate", "test": "test"}
    manifest = _manifest(synthetic_small)["videos"]
    for video in data["videos"]:
        assert set(video) == {"video_id", "split", "category", "url", "start time", "end time", "id"}
        assert video["split"] == split_of[manifest[video["video_id"]]["split"]]
    assert [v["id"] for v in data["videos"]] == list(range(len(manifest)))
    captions: dict[str, list[str]] = {}
    for sentence in data["sentences"]:
        assert set(sentence) == {"sen_id", "video_id", "caption"}
        captions.setdefault(sentence["video_id"], []).append(sentence["caption"])
        _check_caption(sentence["caption"], manifest[sentence["video_id"]])
    assert sorted(s["sen_id"] for s in data["sentences"]) == list(range(len(data["sentences"])))
    assert all(len(c) == len(set(c)) == synthetic.MSRVTT_CAPTIONS_PER_VIDEO for c in captions.values())
    assert set(captions) == set(manifest)

    def column(name: str) -> list[str]:
        with (root / name).open(newline="") as handle:
            rows = list(csv.reader(handle))
        assert rows[0] == ["video_id"]
        return [row[0] for row in rows[1:]]

    train, val, test = (_split_ids(synthetic_small, split) for split in synthetic.SPLITS)
    assert column("MSRVTT_train.9k.csv") == train + val
    assert column("MSRVTT_train.7k.csv") == train
    with (root / "MSRVTT_JSFUSION_test.csv").open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    assert header == ["key", "vid_key", "video_id", "sentence"]
    assert [row[2] for row in rows] == test
    for i, (key, vid_key, video_id, sentence) in enumerate(rows):
        assert key == f"ret{i}" and vid_key == "msr" + video_id.removeprefix("video")
        assert sentence in captions[video_id]


def test_msvd_files(synthetic_small: Path) -> None:
    root = synthetic_small / "msvd"
    for split in synthetic.SPLITS:
        assert (root / f"{split}_list.txt").read_text().split() == _split_ids(synthetic_small, split)
    assert (root / "raw-captions.pkl").read_bytes()[:2] == b"\x80\x02"  # pickle protocol 2
    raw = safe_load_pickle(root / "raw-captions.pkl")
    manifest = _manifest(synthetic_small)["videos"]
    assert set(raw) == set(manifest)
    for video_id, token_lists in raw.items():
        assert len(token_lists) == synthetic.MSVD_CAPTIONS_PER_VIDEO
        for tokens in token_lists:
            assert all(isinstance(t, str) and t == t.lower() and " " not in t for t in tokens)
            _check_caption(" ".join(tokens), manifest[video_id])


def test_qa_answers_match_attributes(synthetic_small: Path) -> None:
    root = synthetic_small / "msrvtt_qa"
    manifest = _manifest(synthetic_small)
    items = {split: _jsonl(root / f"{split}.jsonl") for split in synthetic.SPLITS}
    for split, questions in items.items():
        assert sorted({q["video_id"] for q in questions}) == sorted(_split_ids(synthetic_small, split))
        for q in questions:
            assert set(q) == {"video_id", "question", "answer", "answer_type"}
            attrs = manifest["videos"][q["video_id"]]
            expected = {"color": attrs["color"], "shape": attrs["shape"], "motion": attrs["motion"]}
            expected["count"] = synthetic.COUNT_WORDS[attrs["count"]]
            assert q["answer"] == expected[q["answer_type"]]
            assert q["question"] in synthetic.QA_QUESTIONS[q["answer_type"]]
    ans2label = json.loads((root / "train_ans2label.json").read_text())
    assert set(ans2label) == {q["answer"] for q in items["train"]}
    assert sorted(ans2label.values()) == list(range(len(ans2label)))
    assert all(q["answer"] in ans2label for q in items["val"])
    oov = [q for q in items["test"] if q["answer"] not in ans2label]
    assert 0 < len(oov) <= 0.1 * len(items["test"])
    assert {q["answer"] for q in oov} <= set(synthetic.HELD_OUT_COLORS)
    assert manifest["qa"]["test_oov_answers"] == len(oov)
    majority = max(ans2label, key=lambda a: sum(q["answer"] == a for q in items["train"]))
    accuracy = 100.0 * sum(q["answer"] == majority for q in items["test"]) / len(items["test"])
    assert manifest["chance"]["qa_majority_answer_accuracy"] == pytest.approx(accuracy)


def test_webvid_labels_and_shard_index(synthetic_small: Path) -> None:
    train = _split_ids(synthetic_small, "train")
    labels = json.loads((synthetic_small / "webvid" / "frozen_train_labels.json").read_text())
    assert [set(item) for item in labels] == [{"video_id", "caption"}] * len(train)
    assert [item["video_id"] for item in labels] == train
    manifest = _manifest(synthetic_small)["videos"]
    for item in labels:
        _check_caption(item["caption"], manifest[item["video_id"]])
    shard_dir = synthetic_small / "webvid" / "tfrecord"
    rows = [line.split("\t") for line in (shard_dir / "path.index").read_text().splitlines()]
    assert sorted(row[0] for row in rows) == sorted(train)
    assert (shard_dir / "path-00000.tfrecord").stat().st_size > max(int(row[2]) for row in rows)


def test_videos_decode_to_the_stated_format(synthetic_small: Path) -> None:
    fmt = _manifest(synthetic_small)["video"]
    for path in sorted((synthetic_small / "videos").iterdir()):
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
            assert stream.average_rate == fmt["fps"]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert len(frames) == fmt["num_frames"] == round(fmt["duration_s"] * fmt["fps"])
        assert frames[0].shape == (fmt["height"], fmt["width"], 3)


def test_visible_colour_matches_caption(synthetic_small: Path) -> None:
    data = json.loads((synthetic_small / "msrvtt" / "MSRVTT_data.json").read_text())
    first_caption = {}
    for sentence in data["sentences"]:
        first_caption.setdefault(sentence["video_id"], sentence["caption"])
    for video_id, caption in first_caption.items():
        (colour,) = _words_of(caption, list(ALL_COLORS))
        assert _visible_color(_decode(synthetic_small / "videos" / f"{video_id}.mp4")) == colour, video_id


def test_visible_motion_matches_attributes(synthetic_small: Path) -> None:
    """Translations move the foreground centroid by a fifth of the frame the right way; grow/shrink change its area."""
    manifest = _manifest(synthetic_small)
    size = manifest["video"]["width"]
    for video_id, attrs in manifest["videos"].items():
        distance, _ = _foreground(_decode(synthetic_small / "videos" / f"{video_id}.mp4"))
        first, last = distance[0] > FOREGROUND_DISTANCE, distance[-1] > FOREGROUND_DISTANCE
        if attrs["motion"] in synthetic.MOTION_DIRECTIONS:
            dx, dy = synthetic.MOTION_DIRECTIONS[attrs["motion"]]
            axis = 1 if dx else 0
            shift = np.nonzero(last)[axis].mean() - np.nonzero(first)[axis].mean()
            assert shift * (dx or dy) > size / 5, (video_id, attrs, shift)
        else:
            ratio = last.sum() / first.sum()
            assert (ratio > 1.5) if attrs["motion"] == "grow" else (ratio < 1 / 1.5), (video_id, attrs, ratio)


def test_same_seed_is_identical_and_other_seed_differs(
    synthetic_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CLI run with one worker reproduces the fixture (two workers) byte for byte; seed 1 gives other data."""
    again, other = tmp_path / "again", tmp_path / "other"
    assert synthetic.main(["--output_dir", str(again), "--small", "--num_workers", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["splits"] == _manifest(synthetic_small)["splits"]
    for name in ANNOTATION_FILES:
        assert (again / name).read_bytes() == (synthetic_small / name).read_bytes(), name
    for path in (synthetic_small / "videos").iterdir():
        assert (again / "videos" / path.name).read_bytes() == path.read_bytes(), path.name
    assert np.array_equal(_decode(again / "videos" / "video0.mp4"), _decode(synthetic_small / "videos" / "video0.mp4"))

    synthetic.generate(other, small=True, seed=1, num_workers=1)
    for name in ("msrvtt/MSRVTT_data.json", "msrvtt_qa/train.jsonl", "webvid/frozen_train_labels.json"):
        assert (other / name).read_bytes() != (synthetic_small / name).read_bytes(), name
    assert not np.array_equal(
        _decode(other / "videos" / "video0.mp4"), _decode(synthetic_small / "videos" / "video0.mp4")
    )


def test_regenerating_replaces_a_previous_set_and_refuses_foreign_folders(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        synthetic.generate(foreign, small=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_split_sizes_and_balanced_distinct_attributes() -> None:
    assert synthetic.split_sizes(None, small=False) == {"train": 340, "val": 40, "test": 120}
    assert synthetic.split_sizes(200, small=False) == {"train": 136, "val": 16, "test": 48}
    with pytest.raises(ConfigError):
        synthetic.split_sizes(2, small=True)
    specs = synthetic.make_specs(synthetic.split_sizes(None, small=False), seed=3)
    assert [s.video_id for s in specs] == [f"video{i}" for i in range(len(specs))]
    for split in synthetic.SPLITS:
        rows = [(s.color, s.shape, s.motion, s.count) for s in specs if s.split == split]
        assert len(set(rows)) == len(rows)
        for column, vocab in ((1, synthetic.SHAPES), (2, synthetic.MOTIONS), (3, synthetic.COUNTS)):
            counts = [sum(row[column] == value for row in rows) for value in vocab]
            assert max(counts) - min(counts) <= 1
        held_out = sum(row[0] in synthetic.HELD_OUT_COLORS for row in rows)
        assert held_out == (max(1, round(len(rows) * synthetic.HELD_OUT_TEST_FRACTION)) if split == "test" else 0)
    assert synthetic.make_specs({"train": 5, "val": 2, "test": 3}, seed=3) != synthetic.make_specs(
        {"train": 5, "val": 2, "test": 3}, seed=4
    )


@pytest.mark.parametrize(
    ("shape", "area"),
    [
        ("circle", math.pi),
        ("square", (2 * synthetic.SQUARE_HALF_SIDE) ** 2),
        ("triangle", 3 * math.sqrt(3) / 4 * synthetic.TRIANGLE_CIRCUMRADIUS**2),
        (
            "star",
            synthetic.STAR_POINTS
            * synthetic.STAR_OUTER
            * synthetic.STAR_INNER
            * math.sin(math.pi / synthetic.STAR_POINTS),
        ),
    ],
)
def test_shape_mask_area_matches_geometry(shape: str, area: float) -> None:
    """Pixel count of a large rasterised shape equals its analytic area (unit radius scaled by r^2)."""
    size, radius = 401, 120.0
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    mask = synthetic.shape_mask(shape, size / 2, size / 2, radius, xx, yy)
    assert mask.sum() == pytest.approx(area * radius**2, rel=0.01)


def test_caption_variants_are_distinct_and_grammatical() -> None:
    spec = synthetic.SceneSpec("video0", "train", "orange", "star", "grow", 1, 0)
    variants = synthetic.caption_variants(spec)
    assert len(variants) == len(set(variants)) >= synthetic.MSRVTT_CAPTIONS_PER_VIDEO
    assert "an orange star grows bigger" in variants and not any(v.startswith("a orange") for v in variants)
    plural = synthetic.caption_variants(synthetic.SceneSpec("video1", "train", "red", "circle", "left", 2, 0))
    assert "two red circles move to the left" in plural and "there are two red circles sliding left" in plural
