"""Pure parsers of every benchmark's annotation files (DESIGN §3.3), returning plain lists and dataclasses.

Every malformed input raises ``DataError`` naming the file, the row (1-based line for text files, 0-based entry
for JSON lists) and what to do. Nothing here decodes video or tokenizes text. Files are read through
``dataloaders/textio.py``: UTF-8 with an optional BOM, split on real line endings only (never on U+2028 and the other
``str.splitlines`` separators), JSON nesting bounded.

Video-id conventions follow CLIP4Clip: MSR-VTT/MSVD/LSMDC ids are file names without extension (LSMDC clips are
nested by movie folder, found by walking ``features_path``); DiDeMo ids are the ``video`` field verbatim, which
is the full file name.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from dataloaders import textio
from dataloaders.errors import DataError
from dataloaders.safe_pickle import safe_load_pickle

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LSMDC_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
LSMDC_COLUMNS = ("clip_id", "start_aligned", "end_aligned", "start_extracted", "end_extracted", "sentence")
MSRVTT_JSON_SPLITS = {"train": "train", "val": "validate", "test": "test"}
MSRVTT_NUM_VIDEOS = 10000
MSRVTT_STANDARD_SPLITS = {"train": range(0, 6513), "validate": range(6513, 7010), "test": range(7010, 10000)}
MSVD_CAPTION_JSON = "raw-captions.json"
MSVD_CAPTION_PICKLE = "raw-captions.pkl"
DIDEMO_CLIP = (0.0, 30.0)  # seconds; DiDeMo videos were truncated to 30 s for annotation
CHECK_IDS_SHOWN = 5  # unknown ids listed in a check_ids message
ANSWER_INDEX_FACTOR, ANSWER_INDEX_SLACK = 4, 1024  # answer indices lie below FACTOR * answers + SLACK


class VideoCaption(NamedTuple):
    """One (video, caption) annotation."""

    video_id: str
    caption: str


class TrainPair(NamedTuple):
    """One training sample: a video (optionally a clip of it) and its caption(s).

    With several captions one is drawn uniformly at each access (CLIP4Clip's MSR-VTT sampling without
    ``--expand_msrvtt_sentences``); usually there is exactly one.
    """

    video_id: str
    captions: tuple[str, ...]
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class RetrievalEvalAnnotations:
    """A retrieval test set: caption ``i`` belongs to video ``video_ids[text_to_video[i]]``."""

    video_ids: list[str]
    texts: list[str]
    text_to_video: list[int]
    video_clips: dict[str, tuple[float, float]] | None = None

    @classmethod
    def from_pairs(
        cls, pairs: Iterable[VideoCaption], video_clips: dict[str, tuple[float, float]] | None = None
    ) -> RetrievalEvalAnnotations:
        """Group captions by video, videos in order of first appearance, captions in input order."""
        index: dict[str, int] = {}
        texts: list[str] = []
        text_to_video: list[int] = []
        for video_id, caption in pairs:
            texts.append(caption)
            text_to_video.append(index.setdefault(video_id, len(index)))
        return cls(list(index), texts, text_to_video, video_clips)


@dataclass(frozen=True)
class MSRVTTData:
    """``MSRVTT_data.json``: the split of every video and all sentences in file order."""

    video_split: dict[str, str]
    sentences: list[VideoCaption]

    def captions_by_video(self) -> dict[str, list[str]]:
        """All captions of each video, in file order."""
        grouped: dict[str, list[str]] = defaultdict(list)
        for video_id, caption in self.sentences:
            grouped[video_id].append(caption)
        return dict(grouped)


class LSMDCRow(NamedTuple):
    """One LSMDC annotation line (times kept as written; the clip files are already cut)."""

    clip_id: str
    start_aligned: str
    end_aligned: str
    start_extracted: str
    end_extracted: str
    sentence: str


class QARow(NamedTuple):
    """One video-QA question."""

    video_id: str
    question: str
    answer: str
    answer_type: str


# ----------------------------------------------------------------------------------------------- helpers


def _fail(path: str | Path, where: str, what: str, todo: str) -> DataError:
    return DataError(f"{path}: {where}: {what}; {todo}")


_PATH_HINT = "check --data_path / --train_csv / --val_csv"


def _read_text(path: str | Path) -> str:
    return textio.read_text(path, _PATH_HINT)


def _read_lines(path: str | Path) -> list[str]:
    return textio.read_text_lines(path, _PATH_HINT)


def _load_json(path: str | Path) -> Any:
    return textio.load_json(path, _PATH_HINT)


def _field(path: str | Path, where: str, entry: Any, key: str, kinds: type | tuple[type, ...] = str) -> Any:
    """``entry[key]``, checked to be a mapping with that key of the given type (a non-empty text for str)."""
    if not isinstance(entry, dict):
        raise _fail(path, where, f"expected an object, got {type(entry).__name__}", "fix the entry")
    if key not in entry:
        raise _fail(path, where, f"missing key {key!r}", "fix the entry or use the original annotation file")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _fail(path, where, f"{key!r} has type {type(value).__name__}", "fix the entry")
    if isinstance(value, str) and not value.strip():
        raise _fail(path, where, f"empty {key!r}", "remove the entry or fill it in")
    return value


def _video_id(path: str | Path, where: str, entry: Any, key: str = "video_id") -> str:
    """A video id given as a string or an integer (WebVid ids are numbers), returned as a string."""
    return str(_field(path, where, entry, key, (str, int)))


def _read_csv(path: str | Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a headed CSV as ``(line number, row)``, checking the header has ``columns``."""
    # csv reads the real lines itself (newline=""): a quoted field may hold a line break or U+2028.
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows = []
    try:
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise _fail(path, "line 1", f"header {header} lacks column(s) {missing}", "use the original file")
        for row in reader:
            line = reader.line_num
            if None in row or any(row[c] is None for c in columns):
                raise _fail(path, f"line {line}", "wrong number of fields", "fix the row (quote fields holding commas)")
            rows.append((line, row))
    except csv.Error as exc:  # a field over csv.field_size_limit(), a NUL byte, a quote inside an unquoted field
        line = reader.reader.line_num  # DictReader's own count is only updated after a row is read
        raise _fail(path, f"line {line}", f"unreadable CSV ({exc})", "fix the row") from exc
    return rows


def _nonempty(path: str | Path, where: str, name: str, value: str) -> str:
    if not value.strip():
        raise _fail(path, where, f"empty {name}", "remove the row or fill it in")
    return value


def check_ids(annotation_ids: Iterable[str], available_ids: Collection[str], file: str | Path) -> None:
    """Raise ``DataError`` if annotations of ``file`` name videos that are not available."""
    available = available_ids if isinstance(available_ids, set | frozenset | dict) else set(available_ids)
    unknown = sorted({i for i in annotation_ids if i not in available})
    if unknown:
        raise DataError(
            f"{file}: {len(unknown)} video id(s) have no video, e.g. {unknown[:CHECK_IDS_SHOWN]}; check "
            "--features_path / --webvid_tfrecord, or remove those rows"
        )


def index_video_files(root: str | Path, video_ids: Collection[str], keep_extension: bool) -> dict[str, Path]:
    """Walk ``root`` (any depth) and map each wanted id to its file, as CLIP4Clip's loaders do.

    The id is the file name without its last extension (LSMDC, MSVD), or the full file name
    (``keep_extension``: DiDeMo). Ids without a file are absent from the result.
    """
    wanted = set(video_ids)
    found: dict[str, Path] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            video_id = name if keep_extension else os.path.splitext(name)[0]
            if video_id in wanted:
                found[video_id] = Path(folder) / name
    return found


def read_video_list(path: str | Path) -> list[str]:
    """One video id per line (``{train,val,test}_list.txt``); blank lines are skipped."""
    ids = [line.strip() for line in _read_lines(path) if line.strip()]
    if not ids:
        raise DataError(f"{path}: lists no video ids; use the original split file")
    return ids


def read_video_id_csv(path: str | Path) -> list[str]:
    """The ``video_id`` column of a CSV (``MSRVTT_train.9k.csv`` / ``.7k.csv``), in file order."""
    ids = [_nonempty(path, f"line {line}", "video_id", row["video_id"]) for line, row in _read_csv(path, ["video_id"])]
    if not ids:
        raise DataError(f"{path}: has a header but no rows; use the original split file")
    return ids


# ----------------------------------------------------------------------------------------------- WebVid


def read_webvid_captions(path: str | Path) -> list[VideoCaption]:
    """``frozen_train_labels.json``: a JSON list of ``{"video_id", "caption"}``."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{'video_id', 'caption'}} objects")
    return [
        VideoCaption(_video_id(path, f"entry {i}", entry), _field(path, f"entry {i}", entry, "caption"))
        for i, entry in enumerate(data)
    ]


# ----------------------------------------------------------------------------------------------- MSR-VTT


def read_msrvtt_data(path: str | Path) -> MSRVTTData:
    """``MSRVTT_data.json``: ``{"videos": [{"video_id", "split", ...}], "sentences": [{"video_id", "caption"}]}``."""
    data = _load_json(path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("videos"), list)
        or not isinstance(data.get("sentences"), list)
    ):
        raise DataError(f"{path}: expected an object with 'videos' and 'sentences' lists; use the original file")
    video_split = {}
    for i, entry in enumerate(data["videos"]):
        where = f"videos entry {i}"
        video_split[_video_id(path, where, entry)] = _field(path, where, entry, "split")
    sentences = []
    for i, entry in enumerate(data["sentences"]):
        where = f"sentences entry {i}"
        sentences.append(VideoCaption(_video_id(path, where, entry), _field(path, where, entry, "caption")))
    check_ids((s.video_id for s in sentences), video_split, path)
    return MSRVTTData(video_split, sentences)


def msrvtt_train_pairs(
    train_ids: Sequence[str], data: MSRVTTData, expand_sentences: bool, train_file: str | Path
) -> list[TrainPair]:
    """MSR-VTT training samples, as CLIP4Clip samples them.

    ``expand_sentences``: one sample per sentence of a train video (json order). Otherwise one sample per
    train-csv row, whose caption is drawn at random from all sentences of that video at each access.
    """
    captions = data.captions_by_video()
    check_ids(train_ids, captions, train_file)
    if expand_sentences:
        wanted = set(train_ids)
        return [TrainPair(v, (c,)) for v, c in data.sentences if v in wanted]
    return [TrainPair(v, tuple(captions[v])) for v in train_ids]


def read_msrvtt_jsfusion(path: str | Path) -> RetrievalEvalAnnotations:
    """``MSRVTT_JSFUSION_test.csv`` (header ``key,vid_key,video_id,sentence``): one caption per row."""
    pairs = [
        VideoCaption(
            _nonempty(path, f"line {line}", "video_id", row["video_id"]),
            _nonempty(path, f"line {line}", "sentence", row["sentence"]),
        )
        for line, row in _read_csv(path, ["key", "vid_key", "video_id", "sentence"])
    ]
    if not pairs:
        raise DataError(f"{path}: has a header but no rows; use the original test file")
    return RetrievalEvalAnnotations.from_pairs(pairs)


def msrvtt_caption_split(data: MSRVTTData, split: str, data_file: str | Path) -> dict[str, list[str]]:
    """All references of every video of a split (``train``/``val``/``test``), from the json's ``split`` field.

    When the json holds the full 10,000 videos, the split field is checked against the standard boundaries
    (train video0..6512, validate 6513..7009, test 7010..9999).
    """
    if split not in MSRVTT_JSON_SPLITS:
        raise DataError(f"{data_file}: unknown split {split!r}; use one of {sorted(MSRVTT_JSON_SPLITS)}")
    if len(data.video_split) == MSRVTT_NUM_VIDEOS:
        for video_id, name in data.video_split.items():
            number = re.fullmatch(r"video(\d+)", video_id)
            expected = MSRVTT_STANDARD_SPLITS.get(name)
            if number is None or expected is None or int(number.group(1)) not in expected:
                raise DataError(
                    f"{data_file}: video {video_id!r} has split {name!r}, which differs from the standard MSR-VTT "
                    "split (train video0..6512, validate 6513..7009, test 7010..9999); use the original file"
                )
    captions = data.captions_by_video()
    refs = {}
    for video_id, name in data.video_split.items():
        if name != MSRVTT_JSON_SPLITS[split]:
            continue
        if video_id not in captions:
            raise DataError(f"{data_file}: video {video_id!r} of split {name!r} has no sentence; use the original file")
        refs[video_id] = captions[video_id]
    if not refs:
        raise DataError(f"{data_file}: no video has split {MSRVTT_JSON_SPLITS[split]!r}; use the original file")
    return refs


# ----------------------------------------------------------------------------------------------- MSVD


def _msvd_caption_file(data_path: str | Path) -> Path:
    json_path = Path(data_path) / MSVD_CAPTION_JSON
    return json_path if json_path.is_file() else Path(data_path) / MSVD_CAPTION_PICKLE


def read_msvd_captions(data_path: str | Path) -> dict[str, list[str]]:
    """MSVD captions (video id -> list of token lists), each joined with spaces.

    Reads ``raw-captions.json`` when present, else ``raw-captions.pkl`` through the restricted unpickler.
    """
    path = _msvd_caption_file(data_path)
    data = _load_json(path) if path.suffix == ".json" else safe_load_pickle(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping video id -> list of token lists, got {type(data).__name__}")
    captions: dict[str, list[str]] = {}
    for video_id, token_lists in data.items():
        where = f"video {video_id!r}"
        if not isinstance(video_id, str) or not isinstance(token_lists, list | tuple) or not token_lists:
            raise _fail(path, where, "expected a string id with a non-empty list of captions", "use the original")
        joined = []
        for n, tokens in enumerate(token_lists):
            if not isinstance(tokens, list | tuple) or not all(isinstance(t, str) for t in tokens):
                raise _fail(path, f"{where} caption {n}", "expected a list of word strings", "use the original")
            joined.append(_nonempty(path, f"{where} caption {n}", "caption", " ".join(tokens)))
        captions[video_id] = joined
    return captions


def msvd_captions_for(
    video_ids: Sequence[str], captions: dict[str, list[str]], list_file: str | Path
) -> dict[str, list[str]]:
    """``{video_id: captions}`` for the ids of a split list, in list order; every id must have captions."""
    check_ids(video_ids, captions, list_file)
    return {v: captions[v] for v in video_ids}


VATEX_DATA_JSON = "vatex_data.json"
VATEX_LANGUAGES = {"en": "enCap", "zh": "chCap"}


def read_vatex_captions(path: str | Path, language: str) -> dict[str, list[str]]:
    """HMMC's VATEX captions (MCQ_HMMC.md §B.9): ``{video_id: {"enCap": [...], "chCap": [...]}}`` -> the captions of
    ``language`` (``en`` / ``zh``) per video, in file order."""
    key = VATEX_LANGUAGES[language]
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping video id -> {{enCap, chCap}}, got {type(data).__name__}")
    captions: dict[str, list[str]] = {}
    for video_id, entry in data.items():
        where = f"video {video_id!r}"
        caps = _field(path, where, entry, key, list)
        if not caps or not all(isinstance(c, str) for c in caps):
            raise _fail(path, where, f"expected a non-empty list of {key} caption strings", "fix or remove the video")
        captions[video_id] = [_nonempty(path, f"{where} {key}[{n}]", "caption", c) for n, c in enumerate(caps)]
    return captions


def expand_train_pairs(captions: dict[str, list[str]]) -> list[TrainPair]:
    """One training sample per (video, caption), videos and captions in order (MSVD, LSMDC)."""
    return [TrainPair(v, (c,)) for v, caps in captions.items() for c in caps]


def eval_from_captions(captions: dict[str, list[str]], video_clips: dict | None = None) -> RetrievalEvalAnnotations:
    """A retrieval test set where each caption of each video is one text (multi-caption MSVD)."""
    return RetrievalEvalAnnotations.from_pairs(
        (VideoCaption(v, c) for v, caps in captions.items() for c in caps), video_clips
    )


# ----------------------------------------------------------------------------------------------- LSMDC


def read_lsmdc(path: str | Path) -> list[LSMDCRow]:
    """A tab-separated LSMDC file: ``clip_id, start_aligned, end_aligned, start_extracted, end_extracted,
    sentence``. A clip id may repeat with several sentences."""
    rows = []
    for line_no, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split("\t")]
        if len(fields) != len(LSMDC_COLUMNS):
            raise _fail(
                path,
                f"line {line_no}",
                f"{len(fields)} tab-separated fields, expected {len(LSMDC_COLUMNS)} ({', '.join(LSMDC_COLUMNS)})",
                "fix the row",
            )
        _nonempty(path, f"line {line_no}", "clip_id", fields[0])
        _nonempty(path, f"line {line_no}", "sentence", fields[-1])
        rows.append(LSMDCRow(*fields))
    if not rows:
        raise DataError(f"{path}: holds no annotation rows; use the original LSMDC file")
    return rows


def lsmdc_captions(rows: Iterable[LSMDCRow]) -> dict[str, list[str]]:
    """Sentences grouped by clip id, clips in order of first appearance."""
    grouped: dict[str, list[str]] = {}
    for row in rows:
        grouped.setdefault(row.clip_id, []).append(row.sentence)
    return grouped


# ----------------------------------------------------------------------------------------------- DiDeMo


def read_didemo_paragraphs(path: str | Path, video_ids: Collection[str] | None = None) -> dict[str, str]:
    """``{split}_data.json``: each video's descriptions joined (file order, one space) into one paragraph.

    Videos in order of first appearance; ``video_ids`` (the CLIP4Clip split list) keeps only those videos.
    """
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{'video', 'description', 'times', ...}} objects")
    wanted = None if video_ids is None else set(video_ids)
    descriptions: dict[str, list[str]] = {}
    for i, entry in enumerate(data):
        video = _field(path, f"entry {i}", entry, "video")
        description = _field(path, f"entry {i}", entry, "description")
        if wanted is None or video in wanted:
            descriptions.setdefault(video, []).append(description)
    if not descriptions:
        raise DataError(f"{path}: no annotation matches the split's video list; check --data_path")
    return {video: " ".join(texts) for video, texts in descriptions.items()}


def didemo_eval(paragraphs: dict[str, str]) -> RetrievalEvalAnnotations:
    """Paragraph retrieval: one text per video, every video clipped to ``DIDEMO_CLIP``."""
    return RetrievalEvalAnnotations(
        video_ids=list(paragraphs),
        texts=list(paragraphs.values()),
        text_to_video=list(range(len(paragraphs))),
        video_clips=dict.fromkeys(paragraphs, DIDEMO_CLIP),
    )


def didemo_train_pairs(paragraphs: dict[str, str]) -> list[TrainPair]:
    """One training sample per video: its paragraph and the ``DIDEMO_CLIP`` clip."""
    return [TrainPair(v, (p,), *DIDEMO_CLIP) for v, p in paragraphs.items()]


# ----------------------------------------------------------------------------------------------- QA


def read_qa_jsonl(path: str | Path) -> list[QARow]:
    """``{train,val,test}.jsonl``: one ``{"video_id", "question", "answer", "answer_type"}`` object a line.

    ``answer_type`` may be absent (it is then ``""``); it only groups accuracy by question type.
    """
    rows = []
    for line_no, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"line {line_no}"
        entry = textio.parse_json(line, path, line_no, todo="fix the line")
        if not isinstance(entry, dict):
            raise _fail(path, where, f"expected an object, got {type(entry).__name__}", "fix the line")
        answer_type = _field(path, where, entry, "answer_type") if "answer_type" in entry else ""
        rows.append(
            QARow(
                _video_id(path, where, entry),
                _field(path, where, entry, "question"),
                str(_field(path, where, entry, "answer", (str, int))),
                answer_type,
            )
        )
    if not rows:
        raise DataError(f"{path}: holds no questions; use the original QA file")
    return rows


def answer_index_limit(num_answers: int) -> int:
    """Indices of a vocabulary of ``num_answers`` answers lie below this (the classifier has one output per index up
    to the largest, so a sparse numbering must not make it much wider than the vocabulary)."""
    return ANSWER_INDEX_FACTOR * num_answers + ANSWER_INDEX_SLACK


def read_ans2label(path: str | Path) -> dict[str, int]:
    """``train_ans2label.json``: ``{answer: index}`` with distinct non-negative integer indices below
    ``answer_index_limit(len(file))`` (gaps are allowed, a classifier of 10**12 outputs is not)."""
    data = _load_json(path)
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty JSON object {{answer: index}}")
    limit = answer_index_limit(len(data))
    seen: dict[int, str] = {}
    for answer, label in data.items():
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise _fail(path, f"answer {answer!r}", f"index {label!r} is not a non-negative integer", "fix it")
        if label >= limit:
            raise _fail(
                path,
                f"answer {answer!r}",
                f"index {label} is far beyond the file's {len(data)} answers (indices must be below {limit}: the "
                "classifier gets one output per index up to the largest)",
                f"number the answers 0..{len(data) - 1}",
            )
        if label in seen:
            raise _fail(path, f"answer {answer!r}", f"index {label} also used by {seen[label]!r}", "fix it")
        seen[label] = answer
    return dict(data)


def build_answer_vocab(
    train_rows: Sequence[QARow], ans2label: dict[str, int] | None = None, num_answers: int | None = None
) -> dict[str, int]:
    """The answer vocabulary: ``ans2label`` when given, else the ``num_answers`` most frequent training answers
    (all when ``None``), ordered by count then alphabetically, indexed from 0."""
    if ans2label is not None:
        return dict(ans2label)
    counts = Counter(row.answer for row in train_rows)
    ranked = sorted(counts, key=lambda answer: (-counts[answer], answer))
    if num_answers is not None:
        ranked = ranked[:num_answers]
    return {answer: index for index, answer in enumerate(ranked)}


def answer_label(answer: str, ans2label: dict[str, int]) -> int:
    """The class index of ``answer``, -1 when it is out of the vocabulary."""
    return ans2label.get(answer, -1)
