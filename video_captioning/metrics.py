"""Captioning metrics (DESIGN 3.3): BLEU-1..4, METEOR, ROUGE-L and CIDEr through pycocoevalcap 1.2.

Every caption (prediction and reference) goes through pycocoevalcap's PTB tokenizer (Stanford CoreNLP, a Java
subprocess: lower-cased, punctuation removed), then each prediction is scored against **all** references of its
video, exactly as ``COCOEvalCap.evaluate`` does. SPICE is never built: it downloads Stanford models at run time.

Scale: the values are what pycocoevalcap returns, not x100. BLEU, METEOR and ROUGE-L lie in [0, 1]; CIDEr is
pycocoevalcap's CIDEr-D, which carries a factor 10 (so it lies in [0, 10]; papers print it x100 like the rest).
CIDEr's IDF comes from the references of the evaluated videos, so a corpus of one video scores CIDEr 0.

METEOR runs a long-lived Java process that takes seconds to start; :class:`CaptionScorer` keeps one across calls
and shuts it down on ``close()`` (pycocoevalcap 1.2's ``Meteor`` has no ``close``, only a ``__del__``).
:func:`caption_scores` is the one-shot form.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Hashable, Mapping, Sequence
from types import TracebackType

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from dataloaders.errors import DataError

logger = logging.getLogger(__name__)

BLEU_ORDER = 4
BLEU_KEYS = tuple(f"Bleu_{n}" for n in range(1, BLEU_ORDER + 1))
METRIC_KEYS = (*BLEU_KEYS, "METEOR", "ROUGE_L", "CIDEr")
METEOR_EXIT_TIMEOUT_S = 10.0

_PREDICTION = "prediction"
_REFERENCE = "reference"


def _one_line(caption: str) -> str:
    """Collapse every whitespace run (``\\r``, ``\\u2028``... included) to one space.

    The PTB tokenizer runs with ``-preserveLines`` and splits lines on more than ``\\n``; an unexpected line break
    would shift every later caption onto the wrong video without any error.
    """
    return " ".join(caption.split())


def _check_inputs(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> None:
    """Raise DataError unless every predicted video has a caption and >= 1 reference caption, and vice versa."""
    if not predictions:
        raise DataError("caption metrics: no predictions were given; decode at least one video before scoring")
    missing = [video for video in predictions if video not in references]
    if missing:
        raise DataError(
            f"caption metrics: {len(missing)} predicted video(s) have no references (first: {missing[0]!r}); "
            "pass the reference captions of every decoded video"
        )
    unpredicted = [video for video in references if video not in predictions]
    if unpredicted:
        raise DataError(
            f"caption metrics: {len(unpredicted)} video(s) have references but no prediction "
            f"(first: {unpredicted[0]!r}); decode every evaluated video or pass only the references of decoded ones"
        )
    for video, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise DataError(
                f"caption metrics: the prediction for video {video!r} is a {type(prediction).__name__}, "
                "not a string; pass one decoded caption per video"
            )
    for video, captions in references.items():
        if isinstance(captions, str) or not all(isinstance(caption, str) for caption in captions):
            raise DataError(
                f"caption metrics: the references of video {video!r} must be a list of strings, "
                f"got {type(captions).__name__}; wrap a single caption in a list"
            )
        if len(captions) == 0:
            raise DataError(
                f"caption metrics: video {video!r} has an empty reference list; "
                "every evaluated video needs at least one reference caption"
            )


def ptb_tokenize(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
    """PTB-tokenise predictions and references in one Java run.

    Returns ``(gts, res)`` in pycocoevalcap's layout: video -> list of tokenised references, and video -> a
    one-element list with the tokenised prediction, both keyed in the order of ``predictions``.
    """
    _check_inputs(predictions, references)
    tagged: dict[tuple[str, Hashable], list[dict[str, str]]] = {}
    for video, prediction in predictions.items():
        tagged[(_PREDICTION, video)] = [{"caption": _one_line(prediction)}]
        tagged[(_REFERENCE, video)] = [{"caption": _one_line(caption)} for caption in references[video]]
    tokenised = PTBTokenizer().tokenize(tagged)
    gts = {video: tokenised[(_REFERENCE, video)] for video in predictions}
    res = {video: tokenised[(_PREDICTION, video)] for video in predictions}
    return gts, res


def _close_meteor(meteor: Meteor) -> None:
    """End METEOR's Java process: EOF on its stdin lets it exit; kill it if it does not within the timeout.

    A ``compute_score`` that raised leaves ``meteor.lock`` held, and pycocoevalcap's ``__del__`` would then block
    forever on it at garbage collection, so the lock is released here too.
    """
    process = meteor.meteor_p
    process.stdin.close()
    try:
        process.wait(timeout=METEOR_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning("METEOR's Java process did not exit within %.0f s; killing it", METEOR_EXIT_TIMEOUT_S)
        process.kill()
        process.wait()
    process.stdout.close()
    process.stderr.close()
    if meteor.lock.locked():
        meteor.lock.release()


class CaptionScorer:
    """pycocoevalcap's BLEU/METEOR/ROUGE-L/CIDEr with one METEOR process kept across calls.

    METEOR starts on first use. Use as a context manager (or call :meth:`close`) so the Java process ends with it.
    """

    def __init__(self) -> None:
        self._meteor: Meteor | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called; a closed scorer refuses to score."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("CaptionScorer is closed; create a new one to score more captions")

    @property
    def meteor(self) -> Meteor:
        """The pycocoevalcap ``Meteor`` instance (its Java process starts on first access)."""
        self._check_open()
        if self._meteor is None:
            self._meteor = Meteor()
        return self._meteor

    def score_tokenized(self, gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]]) -> dict[str, float]:
        """Corpus scores of already PTB-tokenised captions (layout of :func:`ptb_tokenize`), keyed by METRIC_KEYS."""
        bleu, _ = Bleu(BLEU_ORDER).compute_score(gts, res, verbose=0)
        meteor, _ = self.meteor.compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        scores = dict(zip(BLEU_KEYS, bleu, strict=True))
        scores.update(METEOR=meteor, ROUGE_L=rouge, CIDEr=cider)
        return {key: float(scores[key]) for key in METRIC_KEYS}

    def __call__(
        self, predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
    ) -> dict[str, float]:
        """Corpus scores of one caption per video against all of that video's references (see module docstring)."""
        self._check_open()
        gts, res = ptb_tokenize(predictions, references)
        scores = self.score_tokenized(gts, res)
        logger.info("caption metrics over %d videos: %s", len(res), {k: round(v, 4) for k, v in scores.items()})
        return scores

    def close(self) -> None:
        """End the METEOR Java process (if started); later calls raise. Closing twice is a no-op."""
        if self._meteor is not None:
            _close_meteor(self._meteor)
            self._meteor = None
        self._closed = True

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def caption_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of ``predictions`` (video -> caption) against ``references``
    (video -> all its reference captions); keys ``Bleu_1..Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr``.

    Both mappings must cover the same videos (DataError, raised before any Java starts). Starts and ends one
    METEOR process; use
    :class:`CaptionScorer` to score several corpora with one.
    """
    with CaptionScorer() as scorer:
        return scorer(predictions, references)
