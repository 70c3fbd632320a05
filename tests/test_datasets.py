"""Datasets: batch-contract items, caption sampling, clips, multi-caption eval sets, QA labels, skip-and-count
in training and re-raise in evaluation, the registry builders on small real-format files."""

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders import annotations as ann
from dataloaders.datasets import (
    DATASETS,
    CaptionDataset,
    DataPaths,
    QADataset,
    RetrievalEvalSet,
    RetrievalTrainDataset,
)
from dataloaders.errors import ConfigError, DataError
from dataloaders.tokenizer import ClipTokenizer

T, SIZE, L = 4, 8, 16
JSFUSION_HEADER = "key,vid_key,video_id,sentence\n"


class FakeSource:
    """Deterministic frames per id (every pixel of frame t = base(id) + t); ids in ``broken`` raise DataError."""

    def __init__(self, broken: tuple[str, ...] = ()) -> None:
        self.broken = set(broken)
        self.calls: list[tuple[str, float | None, float | None]] = []

    @staticmethod
    def base(video_id: str) -> int:
        return sum(map(ord, video_id)) % 200

    def load(self, video_id, start=None, end=None, rng=None):
        self.calls.append((video_id, start, end))
        if video_id in self.broken:
            raise DataError(f"/videos/{video_id}.mp4: cannot decode")
        frames = np.empty((T, SIZE, SIZE, 3), dtype=np.uint8)
        for t in range(T):
            frames[t] = self.base(video_id) + t
        return frames, np.ones(T, dtype=np.int64)


def fake_transform(frames: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, H, W], masked frames 0."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    return video * torch.from_numpy(mask).float()[:, None, None, None]


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


def _check_video(item, video_id):
    assert item["video"].dtype == torch.float32 and item["video"].shape == (T, 3, SIZE, SIZE)
    assert item["video_mask"].dtype == torch.long and item["video_mask"].tolist() == [1] * T
    assert item["video"][:, 0, 0, 0].tolist() == [FakeSource.base(video_id) + t for t in range(T)]


def _check_text(item, tok, text, prefix="text"):
    ids, mask = tok.encode(text, L)
    assert item[f"{prefix}_ids"].dtype == torch.long and item[f"{prefix}_ids"].tolist() == ids.tolist()
    assert item[f"{prefix}_mask"].dtype == torch.long and item[f"{prefix}_mask"].tolist() == mask.tolist()


# ----------------------------------------------------------------------------------------------- training


def test_train_items_and_collate(tok):
    pairs = [ann.TrainPair("v1", ("a dog runs",)), ann.TrainPair("v2", ("a cat",)), ann.TrainPair("v1", ("grass",))]
    ds = RetrievalTrainDataset(pairs, FakeSource(), fake_transform, tok, L)
    assert len(ds) == 3 and ds.video_ids == ["v1", "v2"]
    for index, (video_id, (caption,), _, _) in enumerate(pairs):
        item = ds[index]
        assert set(item) == {"video", "video_mask", "text_ids", "text_mask", "video_index"}
        _check_video(item, video_id)
        _check_text(item, tok, caption)
        assert item["video_index"].dtype == torch.long and item["video_index"].ndim == 0
        assert ds.video_ids[int(item["video_index"])] == video_id
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["video"].shape == (3, T, 3, SIZE, SIZE) and batch["text_ids"].shape == (3, L)
    assert batch["video_index"].tolist() == [0, 1, 0]


def test_multi_caption_pair_draws_per_seed_epoch_index(tok):
    captions = ("first caption", "second caption", "third caption")
    ds = RetrievalTrainDataset([ann.TrainPair("v", captions)], FakeSource(), fake_transform, tok, L, rng_seed=3)
    encoded = {tuple(tok.encode(c, L)[0].tolist()): c for c in captions}
    drawn = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        first = encoded[tuple(ds[0]["text_ids"].tolist())]
        assert encoded[tuple(ds[0]["text_ids"].tolist())] == first  # same (seed, epoch, index): same draw
        drawn.append(first)
    assert set(drawn) == set(captions)
    rng = np.random.default_rng([3, 5, 0])
    assert drawn[5] == captions[int(rng.integers(3))]


def test_clip_times_reach_the_source(tok):
    source = FakeSource()
    ds = RetrievalTrainDataset([ann.TrainPair("v.mp4", ("p",), 0.0, 30.0)], source, fake_transform, tok, L)
    ds[0]
    assert source.calls == [("v.mp4", 0.0, 30.0)]


def test_train_skips_unreadable_video_and_counts(tok, caplog):
    pairs = [ann.TrainPair(v, (f"caption {v}",)) for v in ["ok1", "bad", "bad", "ok2"]]
    source = FakeSource(broken=("bad",))
    ds = RetrievalTrainDataset(pairs, source, fake_transform, tok, L)
    with caplog.at_level(logging.WARNING, logger="dataloaders.datasets"):
        item = ds[1]
    _check_video(item, "ok2")  # the next readable sample, never a zero video
    _check_text(item, tok, "caption ok2")
    assert ds.skipped == 1 and ds.bad_video_ids == {"bad"}
    assert "'bad'" in caplog.text and "1 skipped" in caplog.text
    _check_video(ds[2], "ok2")  # known-bad video is not retried
    assert ds.skipped == 1 and [c[0] for c in source.calls].count("bad") == 1


def test_train_gives_up_after_bounded_retries(tok):
    pairs = [ann.TrainPair(f"bad{i}", ("x",)) for i in range(20)] + [ann.TrainPair("ok", ("x",))]
    source = FakeSource(broken=tuple(f"bad{i}" for i in range(20)))
    ds = RetrievalTrainDataset(pairs, source, fake_transform, tok, L, max_retries=5)
    with pytest.raises(DataError, match="5 unreadable in a row"):
        ds[0]
    assert ds.skipped == 5 and len(source.calls) == 5


# ----------------------------------------------------------------------------------------------- evaluation


def test_eval_set_multi_caption_mapping(tok):
    evaluation = ann.eval_from_captions({"va": ["a one", "a two", "a three"], "vb": ["b one"], "vc": ["c1", "c2"]})
    eval_set = RetrievalEvalSet.from_annotations(evaluation, FakeSource(), fake_transform, tok, L)
    assert eval_set.text_to_video == [0, 0, 0, 1, 2, 2]
    videos, texts = eval_set.video_dataset(), eval_set.text_dataset()
    assert len(videos) == 3 and len(texts) == 6
    for index, video_id in enumerate(eval_set.video_ids):
        item = videos[index]
        assert set(item) == {"video", "video_mask", "video_index"} and int(item["video_index"]) == index
        _check_video(item, video_id)
    for index, text in enumerate(eval_set.texts):
        item = texts[index]
        assert set(item) == {"text_ids", "text_mask", "text_index"} and int(item["text_index"]) == index
        _check_text(item, tok, text)
    reduced = eval_set.without_videos(["va"])
    assert reduced.video_ids == ["vb", "vc"] and reduced.texts == ["b one", "c1", "c2"]
    assert reduced.text_to_video == [0, 1, 1]


def test_eval_reraises_and_passes_clips(tok):
    source = FakeSource(broken=("bad",))
    evaluation = ann.RetrievalEvalAnnotations(["ok", "bad"], ["t1", "t2"], [0, 1], {"ok": (0.0, 30.0)})
    videos = RetrievalEvalSet.from_annotations(evaluation, source, fake_transform, tok, L).video_dataset()
    videos[0]
    assert source.calls == [("ok", 0.0, 30.0)]
    with pytest.raises(DataError, match="bad"):
        videos[1]


def test_eval_set_rejects_inconsistent_mapping(tok):
    with pytest.raises(ValueError, match="no caption"):
        RetrievalEvalSet(["a", "b"], ["t"], [0], None, FakeSource(), fake_transform, tok, L)
    with pytest.raises(ValueError, match="outside"):
        RetrievalEvalSet(["a"], ["t"], [1], None, FakeSource(), fake_transform, tok, L)


# ----------------------------------------------------------------------------------------------- captioning / QA


def test_caption_dataset_train_and_eval(tok):
    references = {"v1": ["r one", "r two"], "v2": ["s"]}
    train = CaptionDataset(references, FakeSource(), fake_transform, tok, L, train=True)
    assert len(train) == 3
    item = train[1]
    _check_video(item, "v1")
    _check_text(item, tok, "r two")
    assert int(item["video_index"]) == 0
    evaluation = CaptionDataset(references, FakeSource(broken=("v2",)), fake_transform, tok, L, train=False)
    assert len(evaluation) == 2 and evaluation.references == references
    item = evaluation[0]
    assert set(item) == {"video", "video_mask", "video_index"}
    assert evaluation.references[evaluation.video_ids[int(item["video_index"])]] == ["r one", "r two"]
    with pytest.raises(DataError):
        evaluation[1]


def test_qa_dataset_items_and_oov(tok):
    rows = [
        ann.QARow("v1", "what is a man doing?", "sing", "what"),
        ann.QARow("v2", "who is singing?", "woman", "who"),
        ann.QARow("v1", "what does he play?", "guitar", "what"),
    ]
    ans2label = ann.build_answer_vocab(rows[:1] + rows[2:])
    ds = QADataset(rows, ans2label, FakeSource(), fake_transform, tok, L)
    assert ds.num_out_of_vocabulary == 1
    expected_keys = {
        "video",
        "video_mask",
        "question_ids",
        "question_mask",
        "answer_label",
        "answer_first_token",
        "video_index",
        "question_index",
    }
    labels = []
    for index, row in enumerate(rows):
        item = ds[index]
        assert set(item) == expected_keys
        _check_video(item, row.video_id)
        _check_text(item, tok, row.question, "question")
        assert int(item["answer_first_token"]) == tok.tokenize_words(row.answer)[0]
        assert int(item["question_index"]) == index and ds.video_ids[int(item["video_index"])] == row.video_id
        labels.append(int(item["answer_label"]))
    assert labels == [ans2label["sing"], -1, ans2label["guitar"]]
    broken = FakeSource(broken=("v1",))
    with pytest.raises(DataError):
        QADataset(rows, ans2label, broken, fake_transform, tok, L, train=False)[0]
    train = QADataset(rows, ans2label, broken, fake_transform, tok, L, train=True)
    assert int(train[0]["question_index"]) == 1 and train.skipped == 1


# ----------------------------------------------------------------------------------------------- registry


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_registry_keys():
    assert set(DATASETS) == {
        "webvid",
        "msrvtt",
        "msvd",
        "vatex",
        "vatex_zh",
        "lsmdc",
        "didemo",
        "msrvtt_qa",
        "msvd_qa",
        "msrvtt_caption",
        "msvd_caption",
    }


def test_build_webvid_and_msrvtt(tmp_path, tok):
    webvid = _write(tmp_path / "frozen_train_labels.json", json.dumps([{"video_id": "11", "caption": "sky"}]))
    ds = DATASETS["webvid"]("train", DataPaths(train_csv=str(webvid)), FakeSource(), fake_transform, tok, L)
    assert isinstance(ds, RetrievalTrainDataset) and ds.pairs == [ann.TrainPair("11", ("sky",))]
    data = {
        "videos": [{"video_id": f"video{i}", "split": "train"} for i in range(3)],
        "sentences": [{"video_id": f"video{i % 3}", "caption": f"c{i}", "sen_id": i} for i in range(6)],
    }
    paths = DataPaths(
        train_csv=str(_write(tmp_path / "MSRVTT_train.9k.csv", "video_id\nvideo0\nvideo2\n")),
        val_csv=str(_write(tmp_path / "MSRVTT_JSFUSION_test.csv", JSFUSION_HEADER + "ret0,msr1,video1,s\n")),
        data_path=str(_write(tmp_path / "MSRVTT_data.json", json.dumps(data))),
    )
    args = (paths, FakeSource(), fake_transform, tok, L)
    assert len(DATASETS["msrvtt"]("train", *args, expand_sentences=True)) == 4
    per_video = DATASETS["msrvtt"]("train", *args)
    assert per_video.pairs == [ann.TrainPair("video0", ("c0", "c3")), ann.TrainPair("video2", ("c2", "c5"))]
    evaluation = DATASETS["msrvtt"]("test", *args)
    assert isinstance(evaluation, RetrievalEvalSet) and evaluation.video_ids == ["video1"]
    captions = DATASETS["msrvtt_caption"]("train", *args)
    assert isinstance(captions, CaptionDataset) and captions.train and len(captions) == 6
    with pytest.raises(ConfigError, match="--val_csv"):
        DATASETS["msrvtt"]("test", DataPaths(), FakeSource(), fake_transform, tok, L)
    with pytest.raises(ConfigError, match="splits"):
        DATASETS["msrvtt"]("dev", *args)


def test_build_msvd_with_walked_keys(tmp_path, tok):
    data = tmp_path / "msvd"
    data.mkdir()
    (data / "raw-captions.pkl").write_bytes(pickle.dumps({"vidA": [["a", "b"], ["c"]], "vidB": [["d"]]}, protocol=2))
    _write(data / "test_list.txt", "vidA\nvidB\n")
    _write(tmp_path / "videos" / "vidA.avi", "")
    source = FakeSource()
    paths = DataPaths(data_path=str(data), features_path=str(tmp_path / "videos"))
    evaluation = DATASETS["msvd"]("test", paths, source, fake_transform, tok, L)
    assert evaluation.texts == ["a b", "c", "d"] and evaluation.text_to_video == [0, 0, 1]
    videos = evaluation.video_dataset()
    videos[0], videos[1]
    assert [c[0] for c in source.calls] == ["vidA", "vidB"]  # found file: its stem; not found: the id itself
    caption_eval = DATASETS["msvd_caption"]("test", paths, source, fake_transform, tok, L)
    assert caption_eval.references == {"vidA": ["a b", "c"], "vidB": ["d"]} and not caption_eval.train


def test_build_lsmdc_and_didemo_keys(tmp_path, tok):
    clip = "1004_Juno_00.00.32.849-00.00.35.458"
    data = tmp_path / "data"
    _write(data / ann.LSMDC_FILES["val"], f"{clip}\t1\t2\t1\t2\tSomeone sits.\n{clip}\t1\t2\t1\t2\tShe stands.\n")
    _write(tmp_path / "clips" / "1004_Juno" / f"{clip}.avi", "")
    source = FakeSource()
    paths = DataPaths(data_path=str(data), features_path=str(tmp_path / "clips"))
    evaluation = DATASETS["lsmdc"]("val", paths, source, fake_transform, tok, L)
    assert evaluation.video_ids == [clip] and evaluation.text_to_video == [0, 0]
    evaluation.video_dataset()[0]
    assert source.calls[-1] == (f"1004_Juno/{clip}", None, None)

    entries = [{"video": "a@N01_1_x.mov", "description": d, "times": [[0, 1]]} for d in ("one", "two")]
    entries.append({"video": "b.avi", "description": "three", "times": [[0, 1]]})
    _write(data / "train_data.json", json.dumps(entries))
    _write(data / "train_list.txt", "a@N01_1_x.mov\n")
    _write(tmp_path / "clips" / "sub" / "a@N01_1_x.mov", "")
    train = DATASETS["didemo"]("train", paths, source, fake_transform, tok, L)
    assert train.pairs == [ann.TrainPair("a@N01_1_x.mov", ("one two",), 0.0, 30.0)]
    train[0]
    assert source.calls[-1] == ("sub/a@N01_1_x.mov", 0.0, 30.0)


def test_build_qa(tmp_path, tok):
    def jsonl(name, answers):
        lines = [
            json.dumps({"video_id": f"v{i}", "question": "q?", "answer": a, "answer_type": "what"})
            for i, a in enumerate(answers)
        ]
        return str(_write(tmp_path / name, "\n".join(lines) + "\n"))

    paths = DataPaths(
        msrvtt_qa_train_json=jsonl("train.jsonl", ["x", "y", "y", "z"]),
        msrvtt_qa_test_json=jsonl("test.jsonl", ["y", "w"]),
    )
    test = DATASETS["msrvtt_qa"]("test", paths, FakeSource(), fake_transform, tok, L, num_answers=2)
    assert test.ans2label == {"y": 0, "x": 1} and not test.train
    assert [int(test[i]["answer_label"]) for i in range(2)] == [0, -1] and test.num_out_of_vocabulary == 1
    labels = _write(tmp_path / "train_ans2label.json", json.dumps({"w": 0, "y": 1}))
    with_file = DataPaths(**{**paths.__dict__, "msrvtt_qa_anslabel_json": str(labels)})
    test = DATASETS["msvd_qa"]("test", with_file, FakeSource(), fake_transform, tok, L)
    assert [int(test[i]["answer_label"]) for i in range(2)] == [1, 0]
    assert DATASETS["msvd_qa"]("train", with_file, FakeSource(), fake_transform, tok, L).train


# ----------------------------------------------------------------------------------------------- real decoding


def test_real_file_source_and_transform(tmp_path, tok):
    video_io = pytest.importorskip("dataloaders.video_io")
    transforms = pytest.importorskip("dataloaders.transforms")
    av = pytest.importorskip("av")
    clip = "1004_Juno_00.00.01.000-00.00.03.000"
    path = tmp_path / "clips" / "1004_Juno" / f"{clip}.mp4"
    path.parent.mkdir(parents=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(12):
            frame = np.full((32, 32, 3), (20 * i, 100, 200 - 10 * i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = tmp_path / "data"
    _write(data / ann.LSMDC_FILES["test"], f"{clip}\t1\t3\t1\t3\tSomeone runs.\n")
    source = video_io.FileVideoSource(tmp_path / "clips", max_frames=T, feature_framerate=1.0, pad_mode="zero")
    paths = DataPaths(data_path=str(data), features_path=str(tmp_path / "clips"))
    evaluation = DATASETS["lsmdc"]("test", paths, source, transforms.ClipTransform(SIZE * 2), tok, L)
    item = evaluation.video_dataset()[0]
    assert item["video"].shape == (T, 3, SIZE * 2, SIZE * 2) and item["video"].dtype == torch.float32
    assert item["video_mask"].tolist() == [1, 1, 1, 0]  # 3 s at 1 fps, zero-padded to T
    assert torch.all(item["video"][3] == 0) and item["video"][:3].abs().sum() > 0
