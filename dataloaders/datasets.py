"""One Dataset per task behind one batch contract (docs/ARCHITECTURE.md), and the benchmark registry.

Items are dicts of tensors only (the default collate stacks them):

- train retrieval / captioning: ``video`` float [T, 3, H, W], ``video_mask`` long [T], ``text_ids`` long [L],
  ``text_mask`` long [L], ``video_index`` long scalar (into the dataset's ``video_ids``); with MCQ's questions
  (``extra_items``, dataloaders/mcq_questions.py) also ``mcq_question_ids/mask`` and ``mcq_answer_ids/mask`` long [L];
- eval retrieval: ``.video_dataset()`` items ``video, video_mask, video_index``; ``.text_dataset()`` items
  ``text_ids, text_mask, text_index``;
- eval captioning: ``video, video_mask, video_index`` (references in ``.references``);
- QA: ``video, video_mask, question_ids, question_mask, answer_label, answer_first_token, video_index,
  question_index``;
- with ``video_extras`` set (``--method stoa``, engine/builders.py ``attach_object_inputs``), every item holding a
  video also carries its ``object_boxes``, ``object_classes`` and ``trajectory_ids``.

Datasets take a video source (``load(video_id, start, end, rng) -> (frames uint8 [T, H, W, 3], mask [T])``) and a
transform (``(frames, mask) -> float [T, 3, H, W]``) as arguments. A training dataset skips a video the source
cannot read (``DataError``) with a counted warning and returns the next readable sample; evaluation datasets
re-raise, since evaluation never substitutes a different video.
"""

from __future__ import annotations

import abc
import logging
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from dataloaders import annotations as ann
from dataloaders.errors import ConfigError, DataError
from dataloaders.tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

MAX_LOAD_RETRIES = 10  # unreadable training videos tried in a row before giving up
EVAL_SEED = 0  # frame-order randomness of evaluation items is seeded by this and the item index

Item = dict[str, torch.Tensor]


class VideoSource(Protocol):
    """What datasets need from ``FileVideoSource`` / ``ShardVideoSource``."""

    def load(
        self,
        video_id: str,
        start: float | None = None,
        end: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...


Transform = Callable[[np.ndarray, np.ndarray], torch.Tensor | np.ndarray]


class _VideoReader:
    """Loads and transforms one video: the part every dataset shares. Items hold its output under ``output_key``
    (a cached-feature reader, engine/feature_cache.py, swaps in ``frame_feats``)."""

    output_key = "video"

    def __init__(self, source: VideoSource, transform: Transform, video_keys: Mapping[str, str] | None) -> None:
        self.source = source
        self.transform = transform
        self.video_keys = dict(video_keys or {})

    def __call__(
        self, video_id: str, clip: tuple[float, float] | None, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``video`` float [T, 3, H, W] and ``video_mask`` long [T]."""
        start, end = clip if clip is not None else (None, None)
        frames, mask = self.source.load(self.video_keys.get(video_id, video_id), start=start, end=end, rng=rng)
        video = torch.as_tensor(self.transform(frames, mask), dtype=torch.float32)
        return video, torch.as_tensor(mask, dtype=torch.long)


def _text_item(tokenizer: ClipTokenizer, text: str, max_words: int, prefix: str) -> Item:
    ids, mask = tokenizer.encode(text, max_words)
    return {f"{prefix}_ids": torch.from_numpy(ids), f"{prefix}_mask": torch.from_numpy(mask)}


def _unique(ids: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def _scalar(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.long)


class _SkippingTrainDataset(Dataset, abc.ABC):
    """Training bookkeeping: per-(seed, epoch, index) randomness and skipping of unreadable videos.

    ``skipped`` counts the unreadable videos met by this process (each DataLoader worker has its own count and
    logs a warning naming the video); ``bad_video_ids`` holds them so no later sample retries them.
    ``samples_skipped`` counts the samples passed over for an unreadable video (known-bad ones included) in this
    process **and its DataLoader workers** (a counter in shared memory, inherited by forked or spawned workers), so
    the trainer can report the epoch's total; it does not depend on the number of workers.
    """

    def __init__(self, video_of_sample: Sequence[str], rng_seed: int, max_retries: int) -> None:
        self._video_of_sample = list(video_of_sample)
        self.rng_seed = rng_seed
        self.max_retries = max_retries
        self.epoch = 0
        self.skipped = 0
        self.bad_video_ids: set[str] = set()
        self._samples_skipped = multiprocessing.Value("q", 0)

    @property
    def samples_skipped(self) -> int:
        """Samples replaced by a later one because their video is unreadable, over this process and its workers."""
        return int(self._samples_skipped.value)

    def _count_skipped_sample(self) -> None:
        with self._samples_skipped.get_lock():
            self._samples_skipped.value += 1

    def set_epoch(self, epoch: int) -> None:
        """Change the caption / frame-order draws of every sample for a new epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._video_of_sample)

    @abc.abstractmethod
    def _sample(self, index: int, rng: np.random.Generator) -> Item:
        """Sample ``index`` drawn with ``rng``; raises ``DataError`` when its video cannot be read."""

    def __getitem__(self, index: int) -> Item:
        failures = []
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            video_id = self._video_of_sample[candidate]
            if video_id in self.bad_video_ids:
                self._count_skipped_sample()
                continue
            try:
                return self._sample(candidate, np.random.default_rng([self.rng_seed, self.epoch, candidate]))
            except DataError as exc:
                self.bad_video_ids.add(video_id)
                self.skipped += 1
                self._count_skipped_sample()
                failures.append(str(exc))
                logger.warning(
                    "skipping unreadable training video %r (%s); %d skipped so far in this process",
                    video_id,
                    exc,
                    self.skipped,
                )
                if len(failures) >= self.max_retries:
                    break
        raise DataError(
            f"no readable training video found from sample {index} on ({len(failures)} unreadable in a row, "
            f"last: {failures[-1] if failures else 'all videos already known unreadable'}); check --features_path"
        )


class RetrievalTrainDataset(_SkippingTrainDataset):
    """Video-text training pairs (WebVid, MSR-VTT, MSVD, LSMDC, DiDeMo train splits).

    A pair with several captions draws one per access from the sample's seeded generator.
    """

    def __init__(
        self,
        pairs: Sequence[ann.TrainPair],
        source: VideoSource,
        transform: Transform,
        tokenizer: ClipTokenizer,
        max_words: int,
        rng_seed: int = 0,
        video_keys: Mapping[str, str] | None = None,
        max_retries: int = MAX_LOAD_RETRIES,
    ) -> None:
        self.pairs = list(pairs)
        if not self.pairs:
            raise DataError("the training annotations hold no (video, caption) pair; check --train_csv/--data_path")
        super().__init__([p.video_id for p in self.pairs], rng_seed, max_retries)
        self.video_ids = _unique([p.video_id for p in self.pairs])
        self._video_index = {v: i for i, v in enumerate(self.video_ids)}
        self.read_video = _VideoReader(source, transform, video_keys)
        self.tokenizer = tokenizer
        self.max_words = max_words
        # Optional per-sample extras ``(video_id, caption, rng) -> Item`` drawn after the caption and the frames,
        # e.g. MCQ's questions and answers (dataloaders/mcq_questions.py); None adds nothing.
        self.extra_items: Callable[[str, str, np.random.Generator], Item] | None = None
        # Optional per-video extras ``(video_id, video_mask) -> Item``, e.g. STOA's boxes (dataloaders/detections.py).
        self.video_extras: Callable[[str, torch.Tensor], Item] | None = None

    def _sample(self, index: int, rng: np.random.Generator) -> Item:
        pair = self.pairs[index]
        caption = pair.captions[int(rng.integers(len(pair.captions)))] if len(pair.captions) > 1 else pair.captions[0]
        clip = None if pair.start is None and pair.end is None else (pair.start, pair.end)
        video, video_mask = self.read_video(pair.video_id, clip, rng)
        item = {self.read_video.output_key: video, "video_mask": video_mask}
        item.update(_text_item(self.tokenizer, caption, self.max_words, "text"))
        item["video_index"] = _scalar(self._video_index[pair.video_id])
        if self.extra_items is not None:
            item.update(self.extra_items(pair.video_id, caption, rng))
        if self.video_extras is not None:
            item.update(self.video_extras(pair.video_id, video_mask))
        return item


class _EvalVideos(Dataset):
    """One item per video of an evaluation set; unreadable videos raise."""

    def __init__(
        self, video_ids: Sequence[str], clips: Mapping[str, tuple[float, float]] | None, read_video: _VideoReader
    ) -> None:
        self.video_ids = list(video_ids)
        self.video_extras: Callable[[str, torch.Tensor], Item] | None = None
        self.clips = dict(clips or {})
        self.read_video = read_video

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, index: int) -> Item:
        video_id = self.video_ids[index]
        rng = np.random.default_rng([EVAL_SEED, index])
        video, video_mask = self.read_video(video_id, self.clips.get(video_id), rng)
        item = {"video": video, "video_mask": video_mask, "video_index": _scalar(index)}
        if self.video_extras is not None:
            item.update(self.video_extras(video_id, video_mask))
        return item


class _EvalTexts(Dataset):
    """One item per caption of an evaluation set."""

    def __init__(self, texts: Sequence[str], tokenizer: ClipTokenizer, max_words: int) -> None:
        self.texts = list(texts)
        self.tokenizer = tokenizer
        self.max_words = max_words

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> Item:
        item = _text_item(self.tokenizer, self.texts[index], self.max_words, "text")
        item["text_index"] = _scalar(index)
        return item


class RetrievalEvalSet:
    """A retrieval test set: caption ``i`` belongs to video ``video_ids[text_to_video[i]]``.

    Each video is encoded once (``video_dataset()``), whatever its number of captions (``text_dataset()``).
    ``video_clips`` optionally clips videos to ``(start, end)`` seconds (DiDeMo: the first 30 s).
    """

    def __init__(
        self,
        video_ids: Sequence[str],
        texts: Sequence[str],
        text_to_video: Sequence[int],
        video_clips: Mapping[str, tuple[float, float]] | None,
        source: VideoSource,
        transform: Transform,
        tokenizer: ClipTokenizer,
        max_words: int,
        video_keys: Mapping[str, str] | None = None,
    ) -> None:
        self.video_ids = list(video_ids)
        self.texts = list(texts)
        self.text_to_video = [int(v) for v in text_to_video]
        self.video_clips = dict(video_clips) if video_clips is not None else None
        if len(self.texts) != len(self.text_to_video):
            raise ValueError(f"{len(self.texts)} texts but {len(self.text_to_video)} text_to_video entries")
        if len(set(self.video_ids)) != len(self.video_ids):
            raise ValueError("video_ids of an evaluation set must be unique")
        if any(not 0 <= v < len(self.video_ids) for v in self.text_to_video):
            raise ValueError(f"text_to_video holds indices outside [0, {len(self.video_ids)})")
        without_text = sorted(set(range(len(self.video_ids))) - set(self.text_to_video))
        if without_text:
            raise ValueError(f"{len(without_text)} video(s) have no caption, e.g. {self.video_ids[without_text[0]]!r}")
        self._read_video = _VideoReader(source, transform, video_keys)
        self.tokenizer = tokenizer
        self.max_words = max_words

    @classmethod
    def from_annotations(
        cls,
        annotations: ann.RetrievalEvalAnnotations,
        source: VideoSource,
        transform: Transform,
        tokenizer: ClipTokenizer,
        max_words: int,
        video_keys: Mapping[str, str] | None = None,
    ) -> RetrievalEvalSet:
        """Build from a parser's result."""
        return cls(
            annotations.video_ids,
            annotations.texts,
            annotations.text_to_video,
            annotations.video_clips,
            source,
            transform,
            tokenizer,
            max_words,
            video_keys,
        )

    def video_dataset(self) -> Dataset:
        """Items ``video, video_mask, video_index`` in ``video_ids`` order."""
        videos = _EvalVideos(self.video_ids, self.video_clips, self._read_video)
        videos.video_extras = getattr(self, "video_extras", None)  # STOA's boxes (dataloaders/detections.py)
        return videos

    def text_dataset(self) -> Dataset:
        """Items ``text_ids, text_mask, text_index`` in ``texts`` order."""
        return _EvalTexts(self.texts, self.tokenizer, self.max_words)

    def without_videos(self, dropped: Sequence[str]) -> RetrievalEvalSet:
        """A copy without the given videos and their captions (for an explicitly allowed reduced test set)."""
        drop = set(dropped)
        keep = [v for v in self.video_ids if v not in drop]
        new_index = {v: i for i, v in enumerate(keep)}
        texts = [(t, self.video_ids[v]) for t, v in zip(self.texts, self.text_to_video, strict=True)]
        texts = [(t, v) for t, v in texts if v not in drop]
        reader = self._read_video
        return RetrievalEvalSet(
            keep,
            [t for t, _ in texts],
            [new_index[v] for _, v in texts],
            self.video_clips,
            reader.source,
            reader.transform,
            self.tokenizer,
            self.max_words,
            reader.video_keys,
        )


class CaptionDataset(_SkippingTrainDataset):
    """Video captioning. ``train``: one item per (video, reference) with ``text_ids/text_mask``, unreadable videos
    skipped. Eval: one item per video (``video, video_mask, video_index``); its references are
    ``references[video_ids[video_index]]``; unreadable videos raise."""

    def __init__(
        self,
        references: Mapping[str, Sequence[str]],
        source: VideoSource,
        transform: Transform,
        tokenizer: ClipTokenizer,
        max_words: int,
        train: bool,
        rng_seed: int = 0,
        video_keys: Mapping[str, str] | None = None,
        max_retries: int = MAX_LOAD_RETRIES,
    ) -> None:
        self.references = {v: list(refs) for v, refs in references.items()}
        if not self.references or any(not refs for refs in self.references.values()):
            raise DataError("captioning annotations need at least one video, each with a reference caption")
        self.pairs = [(v, ref) for v, refs in self.references.items() for ref in refs]
        super().__init__([v for v, _ in self.pairs], rng_seed, max_retries)
        self.train = train
        self.video_ids = list(self.references)
        self._video_index = {v: i for i, v in enumerate(self.video_ids)}
        self.read_video = _VideoReader(source, transform, video_keys)
        self.tokenizer = tokenizer
        self.max_words = max_words
        # Optional per-video extras ``(video_id, video_mask) -> Item``, e.g. STOA's boxes (dataloaders/detections.py).
        self.video_extras: Callable[[str, torch.Tensor], Item] | None = None

    def __len__(self) -> int:
        return len(self.pairs) if self.train else len(self.video_ids)

    def _sample(self, index: int, rng: np.random.Generator) -> Item:
        video_id, reference = self.pairs[index]
        video, video_mask = self.read_video(video_id, None, rng)
        item = {"video": video, "video_mask": video_mask}
        item.update(_text_item(self.tokenizer, reference, self.max_words, "text"))
        item["video_index"] = _scalar(self._video_index[video_id])
        if self.video_extras is not None:
            item.update(self.video_extras(video_id, video_mask))
        return item

    def __getitem__(self, index: int) -> Item:
        if self.train:
            return super().__getitem__(index)
        video_id = self.video_ids[index]
        video, video_mask = self.read_video(video_id, None, np.random.default_rng([EVAL_SEED, index]))
        item = {"video": video, "video_mask": video_mask, "video_index": _scalar(index)}
        if self.video_extras is not None:
            item.update(self.video_extras(video_id, video_mask))
        return item


class QADataset(_SkippingTrainDataset):
    """Open-ended video QA (MSRVTT-QA, MSVD-QA). One item per question.

    ``answer_label`` is the class index in ``ans2label`` (-1 out of vocabulary: counted wrong by the classifier
    protocol); ``answer_first_token`` is the first BPE token of the answer (first-token head). ``rows`` keeps the
    questions for per-``answer_type`` accounting. ``train`` skips unreadable videos; otherwise they raise.
    """

    def __init__(
        self,
        rows: Sequence[ann.QARow],
        ans2label: Mapping[str, int],
        source: VideoSource,
        transform: Transform,
        tokenizer: ClipTokenizer,
        max_words: int,
        train: bool = False,
        rng_seed: int = 0,
        video_keys: Mapping[str, str] | None = None,
        max_retries: int = MAX_LOAD_RETRIES,
    ) -> None:
        self.rows = list(rows)
        if not self.rows:
            raise DataError("the QA annotations hold no question; check the QA json flags")
        super().__init__([r.video_id for r in self.rows], rng_seed, max_retries)
        self.ans2label = dict(ans2label)
        self.train = train
        self.video_ids = _unique([r.video_id for r in self.rows])
        self._video_index = {v: i for i, v in enumerate(self.video_ids)}
        self.read_video = _VideoReader(source, transform, video_keys)
        self.tokenizer = tokenizer
        self.max_words = max_words
        # Optional per-video extras ``(video_id, video_mask) -> Item``, e.g. STOA's boxes (dataloaders/detections.py).
        self.video_extras: Callable[[str, torch.Tensor], Item] | None = None

    @property
    def num_out_of_vocabulary(self) -> int:
        """Questions whose answer is not in ``ans2label``."""
        return sum(ann.answer_label(r.answer, self.ans2label) < 0 for r in self.rows)

    def _sample(self, index: int, rng: np.random.Generator) -> Item:
        row = self.rows[index]
        video, video_mask = self.read_video(row.video_id, None, rng)
        item = {"video": video, "video_mask": video_mask}
        item.update(_text_item(self.tokenizer, row.question, self.max_words, "question"))
        item["answer_label"] = _scalar(ann.answer_label(row.answer, self.ans2label))
        item["answer_first_token"] = _scalar(self.tokenizer.tokenize_words(row.answer)[0])
        item["video_index"] = _scalar(self._video_index[row.video_id])
        item["question_index"] = _scalar(index)
        if self.video_extras is not None:
            item.update(self.video_extras(row.video_id, video_mask))
        return item

    def __getitem__(self, index: int) -> Item:
        if self.train:
            return super().__getitem__(index)
        return self._sample(index, np.random.default_rng([EVAL_SEED, index]))


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DataPaths:
    """The published path flags. MSVD-QA uses the same ``msrvtt_qa_*`` flags for its files."""

    train_csv: str | None = None
    val_csv: str | None = None
    data_path: str | None = None
    features_path: str | None = None
    webvid_train_json: str | None = None
    msrvtt_qa_train_json: str | None = None
    msrvtt_qa_val_json: str | None = None
    msrvtt_qa_test_json: str | None = None
    msrvtt_qa_anslabel_json: str | None = None

    @classmethod
    def from_namespace(cls, namespace: Any) -> DataPaths:
        """Pick the fields from parsed flags (absent flags stay ``None``)."""
        return cls(**{f.name: getattr(namespace, f.name, None) for f in fields(cls)})

    def require(self, name: str, dataset: str) -> Path:
        """The path held by flag ``name``, which ``dataset`` needs."""
        value = getattr(self, name)
        if not value:
            raise ConfigError(f"--{name} is required for the {dataset} data")
        return Path(value)


def _check_split(split: str, dataset: str, allowed: Sequence[str] = ann.SPLITS) -> None:
    if split not in allowed:
        raise ConfigError(f"{dataset} has splits {list(allowed)}, got {split!r}")


def _walked_keys(paths: DataPaths, video_ids: Sequence[str], keep_extension: bool) -> dict[str, str]:
    """Id -> source key of each video file found under ``--features_path`` (CLIP4Clip's os.walk).

    The key is the file's path relative to ``--features_path``: without its extension for ids that are file stems
    (``FileVideoSource`` adds it back), with it for ids that are full file names (DiDeMo). Empty without the flag.
    """
    if not paths.features_path:
        return {}
    root = Path(paths.features_path)
    found = ann.index_video_files(root, video_ids, keep_extension)
    return {v: str(p.relative_to(root).parent / v) for v, p in found.items()}


@dataclass(frozen=True)
class BuildInputs:
    """What every dataset builder receives (``DATASETS[name](split, paths, source, transform, tokenizer, max_words,
    expand_sentences=..., num_answers=..., rng_seed=...)``); options a benchmark has no use for (``expand_sentences``
    outside MSR-VTT, ``num_answers`` outside QA) are ignored."""

    split: str
    paths: DataPaths
    source: VideoSource
    transform: Transform
    tokenizer: ClipTokenizer
    max_words: int
    expand_sentences: bool = False
    num_answers: int | None = None
    rng_seed: int = 0

    @property
    def train(self) -> bool:
        return self.split == "train"

    def retrieval_train(
        self, pairs: Sequence[ann.TrainPair], video_keys: Mapping[str, str] | None = None
    ) -> RetrievalTrainDataset:
        return RetrievalTrainDataset(
            pairs, self.source, self.transform, self.tokenizer, self.max_words, self.rng_seed, video_keys
        )

    def retrieval_eval(self, annotations: Any, video_keys: Mapping[str, str] | None = None) -> RetrievalEvalSet:
        return RetrievalEvalSet.from_annotations(
            annotations, self.source, self.transform, self.tokenizer, self.max_words, video_keys
        )

    def captions(self, references: Mapping[str, list[str]], video_keys: Mapping[str, str] | None = None):
        return CaptionDataset(
            references, self.source, self.transform, self.tokenizer, self.max_words, self.train, self.rng_seed,
            video_keys,
        )  # fmt: skip


def build_webvid(b: BuildInputs) -> RetrievalTrainDataset:
    """WebVid pre-training pairs from ``--webvid_train_json`` (or ``--train_csv``, as the published commands)."""
    _check_split(b.split, "webvid", ("train",))
    path = Path(b.paths.webvid_train_json) if b.paths.webvid_train_json else b.paths.require("train_csv", "webvid")
    return b.retrieval_train([ann.TrainPair(v, (c,)) for v, c in ann.read_webvid_captions(path)])


def build_msrvtt(b: BuildInputs) -> RetrievalTrainDataset | RetrievalEvalSet:
    """MSR-VTT: train from ``--train_csv`` + ``--data_path`` (MSRVTT_data.json); val/test = 1k-A ``--val_csv``."""
    _check_split(b.split, "msrvtt")
    if b.train:
        train_csv = b.paths.require("train_csv", "msrvtt")
        data = ann.read_msrvtt_data(b.paths.require("data_path", "msrvtt"))
        return b.retrieval_train(
            ann.msrvtt_train_pairs(ann.read_video_id_csv(train_csv), data, b.expand_sentences, train_csv)
        )
    return b.retrieval_eval(ann.read_msrvtt_jsfusion(b.paths.require("val_csv", "msrvtt")))


def _msvd_split_captions(split: str, paths: DataPaths) -> dict[str, list[str]]:
    folder = paths.require("data_path", "msvd")
    list_file = folder / f"{split}_list.txt"
    return ann.msvd_captions_for(ann.read_video_list(list_file), ann.read_msvd_captions(folder), list_file)


def _captions_dataset(
    b: BuildInputs, captions: Mapping[str, list[str]], video_keys: Mapping[str, str]
) -> RetrievalTrainDataset | RetrievalEvalSet:
    """Video -> captions of one split: every caption a training pair, or a many-captions-per-video eval set."""
    if b.train:
        return b.retrieval_train(ann.expand_train_pairs(captions), video_keys)
    return b.retrieval_eval(ann.eval_from_captions(captions), video_keys)


def build_msvd(b: BuildInputs) -> RetrievalTrainDataset | RetrievalEvalSet:
    """MSVD from ``--data_path`` (split lists + raw-captions); train on every caption, test on every caption."""
    _check_split(b.split, "msvd")
    captions = _msvd_split_captions(b.split, b.paths)
    return _captions_dataset(b, captions, _walked_keys(b.paths, list(captions), keep_extension=False))


def _build_vatex(b: BuildInputs, language: str) -> RetrievalTrainDataset | RetrievalEvalSet:
    folder = b.paths.require("data_path", f"vatex ({language})")
    list_file = folder / f"{b.split}_list.txt"
    captions = ann.read_vatex_captions(folder / ann.VATEX_DATA_JSON, language)
    captions = ann.msvd_captions_for(ann.read_video_list(list_file), captions, list_file)
    return _captions_dataset(b, captions, _walked_keys(b.paths, list(captions), keep_extension=False))


def build_vatex(b: BuildInputs) -> RetrievalTrainDataset | RetrievalEvalSet:
    """VATEX as HMMC reads it, English captions: ``--data_path`` holds ``vatex_data.json`` (``enCap``) and
    ``{train,val,test}_list.txt``; train on every caption, test with every caption a query (multi-caption)."""
    _check_split(b.split, "vatex")
    return _build_vatex(b, "en")


def build_vatex_zh(b: BuildInputs) -> RetrievalTrainDataset | RetrievalEvalSet:
    """VATEX with its Chinese captions (``chCap``; pair with ``--language chinese``), else as :func:`build_vatex`."""
    _check_split(b.split, "vatex_zh")
    return _build_vatex(b, "zh")


def build_lsmdc(b: BuildInputs) -> RetrievalTrainDataset | RetrievalEvalSet:
    """LSMDC from ``--data_path`` (the three LSMDC16 csv files); clips found under ``--features_path``."""
    _check_split(b.split, "lsmdc")
    csv = b.paths.require("data_path", "lsmdc") / ann.LSMDC_FILES[b.split]
    captions = ann.lsmdc_captions(ann.read_lsmdc(csv))
    return _captions_dataset(b, captions, _walked_keys(b.paths, list(captions), keep_extension=False))


def build_didemo(b: BuildInputs) -> RetrievalTrainDataset | RetrievalEvalSet:
    """DiDeMo paragraphs from ``--data_path`` (``{split}_data.json``, filtered by ``{split}_list.txt`` if present)."""
    _check_split(b.split, "didemo")
    folder = b.paths.require("data_path", "didemo")
    list_file = folder / f"{b.split}_list.txt"
    video_ids = ann.read_video_list(list_file) if list_file.is_file() else None
    paragraphs = ann.read_didemo_paragraphs(folder / f"{b.split}_data.json", video_ids)
    keys = _walked_keys(b.paths, list(paragraphs), keep_extension=True)
    if b.train:
        return b.retrieval_train(ann.didemo_train_pairs(paragraphs), keys)
    return b.retrieval_eval(ann.didemo_eval(paragraphs), keys)


def _build_qa(
    b: BuildInputs, dataset: str, rows: list | None = None, video_keys: Mapping[str, str] | None = None
) -> QADataset:
    """A QA split; ``rows``: the split's questions when the caller has already read them."""
    _check_split(b.split, dataset)
    if rows is None:
        rows = ann.read_qa_jsonl(b.paths.require(f"msrvtt_qa_{b.split}_json", dataset))
    if b.paths.msrvtt_qa_anslabel_json:
        ans2label = ann.read_ans2label(b.paths.msrvtt_qa_anslabel_json)
    else:
        train_rows = rows if b.train else ann.read_qa_jsonl(b.paths.require("msrvtt_qa_train_json", dataset))
        ans2label = ann.build_answer_vocab(train_rows, num_answers=b.num_answers)
    return QADataset(rows, ans2label, b.source, b.transform, b.tokenizer, b.max_words, b.train, b.rng_seed, video_keys)


def build_msrvtt_qa(b: BuildInputs) -> QADataset:
    """MSRVTT-QA from the ``--msrvtt_qa_*_json`` flags; vocabulary from the ans2label file or the top answers."""
    return _build_qa(b, "msrvtt_qa")


def build_msvd_qa(b: BuildInputs) -> QADataset:
    """MSVD-QA (same file layout and flags as MSRVTT-QA); videos found under ``--features_path``."""
    _check_split(b.split, "msvd_qa")
    rows = ann.read_qa_jsonl(b.paths.require(f"msrvtt_qa_{b.split}_json", "msvd_qa"))
    keys = _walked_keys(b.paths, _unique([r.video_id for r in rows]), keep_extension=False)
    return _build_qa(b, "msvd_qa", rows, keys)


def build_msrvtt_caption(b: BuildInputs) -> CaptionDataset:
    """MSR-VTT captioning: the json's train/validate/test splits with all references (``--data_path``)."""
    _check_split(b.split, "msrvtt_caption")
    data_file = b.paths.require("data_path", "msrvtt_caption")
    return b.captions(ann.msrvtt_caption_split(ann.read_msrvtt_data(data_file), b.split, data_file))


def build_msvd_caption(b: BuildInputs) -> CaptionDataset:
    """MSVD captioning: the split lists with all references (``--data_path``)."""
    _check_split(b.split, "msvd_caption")
    references = _msvd_split_captions(b.split, b.paths)
    return b.captions(references, _walked_keys(b.paths, list(references), keep_extension=False))


def _registered(
    builder: Callable[[BuildInputs], Dataset | RetrievalEvalSet],
) -> Callable[..., Dataset | RetrievalEvalSet]:
    """The registry's call form of ``builder``: the :class:`BuildInputs` fields as arguments."""

    def build(
        split: str,
        paths: DataPaths,
        source: VideoSource,
        transform: Transform,
        tokenizer: ClipTokenizer,
        max_words: int,
        expand_sentences: bool = False,
        num_answers: int | None = None,
        rng_seed: int = 0,
    ) -> Dataset | RetrievalEvalSet:
        return builder(
            BuildInputs(split, paths, source, transform, tokenizer, max_words, expand_sentences, num_answers, rng_seed)
        )

    build.__doc__, build.__name__ = builder.__doc__, builder.__name__
    return build


# One call form for every benchmark, so callers need no per-benchmark branches.
DATASETS: dict[str, Callable[..., Dataset | RetrievalEvalSet]] = {
    name: _registered(builder)
    for name, builder in {
        "webvid": build_webvid,
        "msrvtt": build_msrvtt,
        "msvd": build_msvd,
        "vatex": build_vatex,
        "vatex_zh": build_vatex_zh,
        "lsmdc": build_lsmdc,
        "didemo": build_didemo,
        "msrvtt_qa": build_msrvtt_qa,
        "msvd_qa": build_msvd_qa,
        "msrvtt_caption": build_msrvtt_caption,
        "msvd_caption": build_msvd_caption,
    }.items()
}
