"""MCQ's multiple-choice questions: noun / verb phrases per caption, question and answer ids (spec §A.2-A.3, §C.3).

A phrase is erased from the caption (the **question**); the phrase, after ``prompt`` mask tokens, is the **answer**.
Phrases come from an MCQ-format phrase file (``--phrase_file``): tab-separated, one header row, columns read by
position: 0 caption, 1 video path (WebVid: without ``.mp4``; matched against the video id, then its last path part),
2 nouns, 3 verbs; the phrase columns are Python list literals (``['old woman', 'green grass']``, empty ``[]``).
The synthetic generator writes such a file with the exact phrases of its templates (``webvid/noun_verb.tsv``).

Questions are built in id space: kept words are CLIP-BPE encoded, an erased word becomes ``k`` copies of
``mask_id`` where ``k`` is its number of BPE pieces (MCQ's rule with CLIP's tokenizer instead of DistilBERT's), so the
string ``[MASK]`` is never round-tripped through BPE. All draws use the sample's seeded generator (deterministic per
``--seed``, epoch and sample).

Defaults are the intended behaviour; ``official_quirks`` selects MCQ's literal one where it changes outputs (§A.15):

========================  ====================================================  ====================================
what                      default                                               ``official_quirks``
========================  ====================================================  ====================================
phrase columns            ``ast.literal_eval`` (a bad cell is a DataError)        strip ``[ ]``, split on ``,``; nouns
                                                                                  lose ``'``, verbs keep their quotes
erased words              the first contiguous occurrence of the phrase           every occurrence of every phrase
                          (case and surrounding punctuation ignored; if none,     word, matched after removing commas
                          every occurrence of every phrase word)                  in lower or ``capitalize()`` case
punctuation of an erased  kept around the mask tokens                             commas dropped, other punctuation
word                                                                              blocks the match
apostrophes               kept                                                    removed from the question
no noun / verb phrase     a random caption word (what MCQ's line 30 intended)     the same (MCQ indexes the string
                                                                                  ``"[]"`` and may crash: not copied)
========================  ====================================================  ====================================
"""

from __future__ import annotations

import ast
import csv
import logging
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataloaders.errors import DataError
from dataloaders.tokenizer import EOT_ID, PAD_ID, SOT_ID, ClipTokenizer

logger = logging.getLogger(__name__)

QUESTION_KINDS = ("noun", "verb", "mixed")
DEFAULT_ANSWER_PROMPT = 3
DEFAULT_MASK_ID = 0
PUNCTUATION = string.punctuation
PHRASE_FILE_COLUMNS = 4


@dataclass(frozen=True)
class Phrases:
    """Noun and verb phrases of one caption."""

    nouns: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------- phrase file


def _parse_list(cell: str, path: Path, row: int, column: str, quirks: bool, strip_quotes: bool) -> tuple[str, ...]:
    cell = cell.strip()
    if quirks:  # MCQ's base_dataset.py: strip the brackets, split on ',' (nouns also lose their quotes)
        if cell == "[]":
            return ()
        parts = cell.strip("[]").split(",")
        parts = [p.replace("'", "").strip() if strip_quotes else p.strip() for p in parts]
        return tuple(p for p in parts if p)
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError) as exc:
        raise DataError(
            f"{path}: row {row}: the {column} column {cell!r} is not a list literal like ['red circle'] ({exc}); "
            "fix or remove the row"
        ) from exc
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise DataError(
            f"{path}: row {row}: the {column} column {cell!r} must be a list of strings, e.g. ['red circle']"
        )
    return tuple(v.strip() for v in value if v.strip())


def read_phrase_file(path: str | Path, quirks: bool = False) -> dict[str, Phrases]:
    """Video key -> phrases of an MCQ-format TSV (see the module docstring). Keys are the path column and its last
    path part. Rows are numbered from 1 (the header) as in a spreadsheet."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--phrase_file {path} does not exist: pass an MCQ noun/verb TSV (caption, path, nouns, verbs)")
    phrases: dict[str, Phrases] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for row, cells in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if row == 1:
                continue  # header (MCQ reads the files with pandas.read_csv)
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) < PHRASE_FILE_COLUMNS:
                raise DataError(
                    f"{path}: row {row} has {len(cells)} tab-separated columns, expected {PHRASE_FILE_COLUMNS} "
                    "(caption, path, nouns, verbs); fix or remove the row"
                )
            key = cells[1].strip()
            if not key:
                raise DataError(f"{path}: row {row} has an empty path column; fix or remove the row")
            entry = Phrases(
                _parse_list(cells[2], path, row, "nouns", quirks, strip_quotes=True),
                _parse_list(cells[3], path, row, "verbs", quirks, strip_quotes=not quirks),
            )
            phrases[key] = entry
            phrases.setdefault(Path(key).name, entry)
    if not phrases:
        raise DataError(f"{path} holds no phrase rows (after the header): pass an MCQ noun/verb TSV")
    return phrases


def format_phrase_row(caption: str, video_path: str, nouns: list[str], verbs: list[str]) -> str:
    """One MCQ-format TSV line (without newline); phrases as Python list literals."""
    for text in (caption, video_path, *nouns, *verbs):
        if "\t" in text or "\n" in text:
            raise ValueError(f"phrase file fields may not hold tabs or newlines: {text!r}")
    return "\t".join([caption, video_path, repr(list(nouns)), repr(list(verbs))])


# ----------------------------------------------------------------------------------------------- questions


def sample_phrase(phrases: Phrases, caption: str, kind: str, rng: np.random.Generator) -> str:
    """MCQ's ``sample_phrase``: a verb question takes a verb phrase (else a noun phrase), a noun question a noun
    phrase; ``mixed`` draws the kind with p = 0.5. Without any phrase: a random word of the caption."""
    if kind not in QUESTION_KINDS:
        raise ValueError(f"question kind {kind!r} must be one of {QUESTION_KINDS}")
    if kind == "mixed":
        kind = "verb" if rng.random() < 0.5 else "noun"
    if kind == "verb" and phrases.verbs:
        return phrases.verbs[int(rng.integers(len(phrases.verbs)))]
    if phrases.nouns:
        return phrases.nouns[int(rng.integers(len(phrases.nouns)))]
    words = caption.split()
    return words[int(rng.integers(len(words)))] if words else ""


def _core(word: str) -> str:
    return word.strip(PUNCTUATION).lower()


def erased_words(caption_words: list[str], phrase: str, quirks: bool) -> list[bool]:
    """Which caption words the phrase erases (see the module docstring's table)."""
    phrase_words = phrase.split()
    if quirks:
        forms = {w for p in phrase_words for w in (p, p.capitalize())}
        return [w.replace(",", "") in forms for w in caption_words]
    cores = [_core(w) for w in caption_words]
    target = [_core(w) for w in phrase_words if _core(w)]
    n = len(target)
    if n:
        for start in range(len(cores) - n + 1):
            if cores[start : start + n] == target:
                return [start <= i < start + n for i in range(len(cores))]
    wanted = set(target)
    return [c in wanted and bool(c) for c in cores]


def question_tokens(
    caption: str, phrase: str, tokenizer: ClipTokenizer, mask_id: int = DEFAULT_MASK_ID, quirks: bool = False
) -> list[int]:
    """BPE ids of the question (no SOT/EOT): kept words encoded, each erased word replaced by as many ``mask_id`` as
    it has BPE pieces."""
    words = caption.split(" ") if quirks else caption.split()
    erased = erased_words(words, phrase, quirks)
    ids: list[int] = []
    for word, erase in zip(words, erased, strict=True):
        if quirks:
            if erase:
                ids += [mask_id] * len(tokenizer.tokenize_words(word.replace(",", "")))
            else:
                ids += tokenizer.tokenize_words(word.replace("'", ""))
            continue
        if not erase:
            ids += tokenizer.tokenize_words(word)
            continue
        core = word.strip(PUNCTUATION)
        lead = word[: len(word) - len(word.lstrip(PUNCTUATION))]
        trail = word[len(word.rstrip(PUNCTUATION)) :] if core else ""
        ids += tokenizer.tokenize_words(lead) if lead else []
        ids += [mask_id] * len(tokenizer.tokenize_words(core))
        ids += tokenizer.tokenize_words(trail) if trail else []
    return ids


def answer_tokens(
    phrase: str, tokenizer: ClipTokenizer, mask_id: int = DEFAULT_MASK_ID, prompt: int = DEFAULT_ANSWER_PROMPT
) -> list[int]:
    """BPE ids of the answer (no SOT/EOT): ``prompt`` mask tokens, then the phrase (MCQ's ``"[MASK] [MASK] [MASK] " +
    phrase``; the prompt is the paper's Table 9)."""
    return [mask_id] * prompt + tokenizer.tokenize_words(phrase.strip())


def pack(tokens: list[int], max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[SOT] + tokens[:L-2] + [EOT]`` padded with 0 to ``max_words``; ``(ids, mask)`` long ``[L]``."""
    seq = [SOT_ID, *tokens[: max_words - 2], EOT_ID]
    ids = torch.full((max_words,), PAD_ID, dtype=torch.long)
    mask = torch.zeros(max_words, dtype=torch.long)
    ids[: len(seq)] = torch.tensor(seq, dtype=torch.long)
    mask[: len(seq)] = 1
    return ids, mask


class MCQQuestions:
    """The per-sample extras of ``--stage1_objective mcq`` (``RetrievalTrainDataset.extra_items``):
    ``mcq_question_ids/mask`` and ``mcq_answer_ids/mask``, long ``[L]`` each (``L = max_words``)."""

    def __init__(
        self,
        phrases: Mapping[str, Phrases],
        tokenizer: ClipTokenizer,
        max_words: int,
        kind: str = "noun",
        mask_id: int = DEFAULT_MASK_ID,
        prompt: int = DEFAULT_ANSWER_PROMPT,
        quirks: bool = False,
    ) -> None:
        if kind not in QUESTION_KINDS:
            raise ValueError(f"--mcq_question {kind!r} must be one of {QUESTION_KINDS}")
        self.phrases = dict(phrases)
        self.tokenizer = tokenizer
        self.max_words = max_words
        self.kind = kind
        self.mask_id = mask_id
        self.prompt = prompt
        self.quirks = quirks

    def phrases_of(self, video_id: str) -> Phrases:
        return self.phrases.get(video_id) or self.phrases.get(Path(video_id).name) or Phrases()

    def coverage(self, video_ids: list[str]) -> int:
        """How many of ``video_ids`` have an entry in the phrase table."""
        return sum(1 for v in video_ids if v in self.phrases or Path(v).name in self.phrases)

    def __call__(self, video_id: str, caption: str, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        phrase = sample_phrase(self.phrases_of(video_id), caption, self.kind, rng)
        q_ids, q_mask = pack(
            question_tokens(caption, phrase, self.tokenizer, self.mask_id, self.quirks), self.max_words
        )
        a_ids, a_mask = pack(answer_tokens(phrase, self.tokenizer, self.mask_id, self.prompt), self.max_words)
        return {
            "mcq_question_ids": q_ids,
            "mcq_question_mask": q_mask,
            "mcq_answer_ids": a_ids,
            "mcq_answer_mask": a_mask,
        }
