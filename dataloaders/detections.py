"""STOA-VLP's object inputs: per-video detection files, box selection, trajectory ids and noun/verb tags.

Detection file (spec ``T2VLP_STOA.md`` B.2 / C.3; one JSON per video, ``{objects_dir}/{video_id}.json``): a list with
one entry per frame, spread uniformly over the clip, each ``{"objects": [{"class": str, "rect": [x1, y1, x2, y2],
"conf": float, "attributes": [str, ...], "attr_scores": [float, ...]}, ...]}``. Unlike the published files (224-px
absolute coordinates, quirk S11's README confusion aside) ``rect`` is in **normalised [0, 1] frame coordinates**, so
frames of any size share the files (:func:`boxes_from_absolute` converts the published convention). When the file
holds N entries and the video gives T valid frames, frame ``i`` reads entry ``round(i (N-1) / (T-1))`` (N == T:
one to one). ``attributes`` / ``attr_scores`` are optional here (unused by the published recipe).

Per frame (:func:`select_objects`, ``utils_object_tractor.py:140-227``), in detection order: an object of a class
already kept is dropped if its IoU with a kept box of that class is >= 0.2, an object of a new class if its IoU with
any kept box is >= 0.5; the scan stops after ``2 O`` kept objects (S10); then the kept objects are sorted by
``conf`` (descending), and the ``O`` largest boxes are kept, largest first. Padding: boxes ``[-1, -1, -1, -1]``,
class 0. Trajectory ids (:func:`trajectory_ids`): the first ``2 O`` classes in order of first appearance over the
frames (S9: not sorted by confidence), padded with 0.

Class names map to ids through a label map (``{"label_to_idx": {name: id}}``, ids >= 1; VinVL's ``label_map.json`` or
the synthetic one). A video without a detection file gets all-padding boxes and a counted warning
(:attr:`DetectionReader.missing`).

Noun/verb tags (spec C.3): a JSON ``{caption_index: [tag per CLIP-BPE token of the caption]}`` (Universal POS
strings; only ``NOUN`` and ``VERB`` are used), ``caption_index`` being the caption's row in the training annotation
file. :func:`tag_masks` turns a tag list into ``noun_mask`` / ``verb_mask [L]`` aligned with ``text_ids``
(``[SOT] + tokens[:L-2] + [EOT]``; SOT, EOT and padding are 0).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataloaders.errors import DataError

logger = logging.getLogger(__name__)

SAME_CLASS_IOU = 0.2  # a same-class box overlapping a kept one this much is a duplicate
OTHER_CLASS_IOU = 0.5  # a new-class box overlapping any kept one this much is dropped
PAD_BOX = -1.0
PAD_CLASS = 0
DEFAULT_OBJECT_COUNT = 10  # O, --object_count
DETECTION_SUFFIX = ".json"
NOUN_TAG, VERB_TAG = "NOUN", "VERB"


@dataclass(frozen=True)
class DetectedObject:
    """One detection of a frame (normalised box)."""

    label: int
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in [0, 1]
    conf: float

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (0 when both are empty)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def boxes_from_absolute(rect: Sequence[float], frame_size: float = 224.0) -> list[float]:
    """A published ``[x1, y1, x2, y2]`` box in ``frame_size``-px coordinates as normalised coordinates."""
    return [float(v) / frame_size for v in rect]


def select_objects(objects: Sequence[DetectedObject], object_count: int) -> list[DetectedObject]:
    """The published per-frame selection (module docstring): at most ``object_count`` objects, largest first."""
    kept: list[DetectedObject] = []
    for obj in objects:
        if len(kept) >= 2 * object_count:
            break
        same = [k for k in kept if k.label == obj.label]
        if same:
            if any(box_iou(obj.box, k.box) >= SAME_CLASS_IOU for k in same):
                continue
        elif any(box_iou(obj.box, k.box) >= OTHER_CLASS_IOU for k in kept):
            continue
        kept.append(obj)
    kept = sorted(kept, key=lambda o: -o.conf)[: 2 * object_count]
    return sorted(kept, key=lambda o: -o.area)[:object_count]


def trajectory_ids(classes: np.ndarray, object_count: int) -> np.ndarray:
    """``[2 O]`` int64: the first ``2 O`` distinct non-zero classes of ``classes [T, O]`` in order of first
    appearance (frame by frame, slot by slot), padded with 0."""
    seen: list[int] = []
    for value in classes.reshape(-1).tolist():
        if value != PAD_CLASS and value not in seen:
            seen.append(int(value))
    ids = np.zeros(2 * object_count, dtype=np.int64)
    ids[: min(len(seen), 2 * object_count)] = seen[: 2 * object_count]
    return ids


def read_label_map(path: str | Path) -> dict[str, int]:
    """``label_to_idx`` of a VinVL-style label map JSON (ids >= 1; 0 is padding)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the label map ({exc}); give a JSON with 'label_to_idx'") from exc
    table = data.get("label_to_idx") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise DataError(f"{path}: no 'label_to_idx' object; a label map is {{\"label_to_idx\": {{name: id}}}}")
    bad = [name for name, idx in table.items() if not isinstance(idx, int) or idx < 1]
    if bad:
        raise DataError(f"{path}: class ids must be integers >= 1 (0 is padding); bad entries e.g. {bad[:3]}")
    return dict(table)


def _parse_object(raw: Any, labels: Mapping[str, int], where: str) -> DetectedObject:
    if not isinstance(raw, dict) or "class" not in raw or "rect" not in raw:
        raise DataError(f"{where}: an object needs 'class' and 'rect' (got {str(raw)[:80]}); fix the detection file")
    name = raw["class"]
    if name not in labels:
        raise DataError(f"{where}: class {name!r} is not in the label map; add it there or drop the object")
    rect = raw["rect"]
    if not isinstance(rect, list) or len(rect) != 4 or not all(isinstance(v, (int, float)) for v in rect):
        raise DataError(f"{where}: 'rect' must be [x1, y1, x2, y2] numbers (got {rect!r})")
    x1, y1, x2, y2 = (float(v) for v in rect)
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)) or x2 < x1 or y2 < y1:
        raise DataError(
            f"{where}: 'rect' {rect} is not a normalised box (0 <= x1 <= x2 <= 1, 0 <= y1 <= y2 <= 1); "
            "divide published 224-px boxes by the frame size (dataloaders.detections.boxes_from_absolute)"
        )
    conf = raw.get("conf", 1.0)
    if not isinstance(conf, (int, float)) or not math.isfinite(conf):
        raise DataError(f"{where}: 'conf' must be a number (got {conf!r})")
    return DetectedObject(labels[name], (x1, y1, x2, y2), float(conf))


def read_detection_file(path: str | Path, labels: Mapping[str, int]) -> list[list[DetectedObject]]:
    """The frames of one detection file, each a list of objects in detection order; bad entries raise a
    DataError naming the file and the frame."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the detection file ({exc}); re-run the detector for this video") from exc
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty list with one {{'objects': [...]}} entry per frame")
    frames = []
    for index, entry in enumerate(data):
        where = f"{path} frame {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("objects"), list):
            raise DataError(f"{where}: expected {{'objects': [...]}} (got {str(entry)[:80]}); fix the detection file")
        frames.append([_parse_object(raw, labels, where) for raw in entry["objects"]])
    return frames


def frame_boxes(
    frames: Sequence[Sequence[DetectedObject]], num_frames: int, num_valid: int, object_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """``boxes [T, O, 4]`` float32 (normalised, padding -1) and ``classes [T, O]`` int64 (padding 0) of the
    ``num_valid`` valid frames (entries spread uniformly, module docstring); frames after them are padding."""
    boxes = np.full((num_frames, object_count, 4), PAD_BOX, dtype=np.float32)
    classes = np.full((num_frames, object_count), PAD_CLASS, dtype=np.int64)
    n = len(frames)
    for t in range(min(num_valid, num_frames)):
        entry = t if n == num_valid else (round(t * (n - 1) / (num_valid - 1)) if num_valid > 1 else 0)
        for slot, obj in enumerate(select_objects(frames[entry], object_count)):
            boxes[t, slot] = obj.box
            classes[t, slot] = obj.label
    return boxes, classes


class DetectionReader:
    """Per-video object inputs from a folder of detection files (``{objects_dir}/{video_id}.json``)."""

    def __init__(self, objects_dir: str | Path, label_map: str | Path, object_count: int = DEFAULT_OBJECT_COUNT):
        self.objects_dir = Path(objects_dir)
        if not self.objects_dir.is_dir():
            raise DataError(f"--objects_dir {self.objects_dir} is not a folder of per-video detection JSON files")
        self.labels = read_label_map(label_map)
        self.object_count = object_count
        self.missing = 0  # videos read without a detection file (all-padding boxes)
        self._cache: dict[str, list[list[DetectedObject]] | None] = {}

    def _frames(self, video_id: str) -> list[list[DetectedObject]] | None:
        if video_id not in self._cache:
            path = self.objects_dir / f"{video_id}{DETECTION_SUFFIX}"
            if path.is_file():
                self._cache[video_id] = read_detection_file(path, self.labels)
            else:
                self.missing += 1
                logger.warning(
                    "no detection file %s: video %s gets padding boxes only (%d video(s) without detections so far)",
                    path, video_id, self.missing,
                )  # fmt: skip
                self._cache[video_id] = None
        return self._cache[video_id]

    def items(self, video_id: str, video_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch items ``object_boxes [T, O, 4]``, ``object_classes [T, O]``, ``trajectory_ids [2 O]``."""
        num_frames = int(video_mask.shape[0])
        frames = self._frames(video_id)
        if frames is None:
            frames = [[]]
        boxes, classes = frame_boxes(frames, num_frames, int(video_mask.sum()), self.object_count)
        return {
            "object_boxes": torch.from_numpy(boxes),
            "object_classes": torch.from_numpy(classes),
            "trajectory_ids": torch.from_numpy(trajectory_ids(classes, self.object_count)),
        }


def tag_masks(tags: Sequence[str], max_words: int) -> tuple[np.ndarray, np.ndarray]:
    """``noun_mask`` / ``verb_mask [L]`` int64 aligned with ``[SOT] + tokens[:L-2] + [EOT]`` (SOT/EOT/pad 0)."""
    nouns = np.zeros(max_words, dtype=np.int64)
    verbs = np.zeros(max_words, dtype=np.int64)
    for index, tag in enumerate(list(tags)[: max_words - 2]):
        nouns[index + 1] = tag == NOUN_TAG
        verbs[index + 1] = tag == VERB_TAG
    return nouns, verbs


class TagReader:
    """Noun/verb masks of training captions from a tag file aligned with the annotation file's captions."""

    def __init__(self, path: str | Path, captions: Sequence[str], tokenizer: Any, max_words: int):
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{self.path}: cannot read the noun/verb tag file ({exc})") from exc
        if not isinstance(data, dict):
            raise DataError(f"{self.path}: expected {{caption_index: [tag per CLIP-BPE token]}}")
        self.max_words = max_words
        self._by_caption: dict[str, list[str]] = {}
        for key, tags in data.items():
            if not str(key).isdigit() or int(key) >= len(captions):
                raise DataError(f"{self.path}: key {key!r} is not a caption index below {len(captions)}")
            caption = captions[int(key)]
            expected = len(tokenizer.tokenize_words(caption))
            if not isinstance(tags, list) or len(tags) != expected or not all(isinstance(t, str) for t in tags):
                raise DataError(
                    f"{self.path}: caption {key} ({caption!r}) has {expected} CLIP-BPE tokens but its tags are "
                    f"{str(tags)[:80]}; write one tag string per token"
                )
            self._by_caption[caption] = tags

    def items(self, caption: str) -> dict[str, torch.Tensor]:
        """Batch items ``noun_mask`` / ``verb_mask [L]`` of ``caption``."""
        if caption not in self._by_caption:
            raise DataError(f"{self.path}: no tags for caption {caption!r}; re-run the tagger over the annotations")
        nouns, verbs = tag_masks(self._by_caption[caption], self.max_words)
        return {"noun_mask": torch.from_numpy(nouns), "verb_mask": torch.from_numpy(verbs)}
