"""Caption metrics (video_captioning/metrics.py) against pycocoevalcap called directly and hand-computed values.

METEOR's Java process takes seconds to start, so the module shares one CaptionScorer; only the one-shot
``caption_scores`` test starts a second one.
"""

from collections.abc import Iterator

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from dataloaders.errors import DataError
from video_captioning import metrics
from video_captioning.metrics import METRIC_KEYS, CaptionScorer, caption_scores, ptb_tokenize

REFERENCES = {
    "video7010": ["A man is playing a guitar.", "Someone plays the guitar on stage!", "a guy performs a song"],
    "video7011": ["A woman is slicing an onion in the kitchen.", "A cook cuts vegetables."],
    "video7012": ["Two dogs are running across a field.", "dogs run on the grass", "Two puppies play outside."],
    "video7013": ["A car drives down a busy road at night.", "Traffic moves along a city street."],
}
RIGHT = {
    "video7010": "a man plays the guitar on stage",
    "video7011": "a woman is cutting an onion",
    "video7012": "two dogs run across the grass",
    "video7013": "a car drives down the street at night",
}
WRONG = {
    "video7010": "a woman is cooking pasta",
    "video7011": "two cars race on a track",
    "video7012": "a man sings into a microphone",
    "video7013": "dogs play in the snow",
}


@pytest.fixture(scope="module")
def scorer() -> Iterator[CaptionScorer]:
    with CaptionScorer() as shared:
        yield shared


def test_identical_captions_score_top(scorer: CaptionScorer) -> None:
    references = {video: [captions[0]] for video, captions in REFERENCES.items()}
    predictions = {video: captions[0] for video, captions in references.items()}
    scores = scorer(predictions, references)
    assert set(scores) == set(METRIC_KEYS)
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    assert scores["CIDEr"] == pytest.approx(10.0, rel=1e-6)  # pycocoevalcap's CIDEr-D carries a factor 10
    assert scores["METEOR"] > 0.9


def test_wrapper_equals_direct_pycocoevalcap(scorer: CaptionScorer) -> None:
    scores = scorer(RIGHT, REFERENCES)
    # COCOEvalCap.evaluate's recipe: tokenise references and results separately, score with every metric.
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({video: [{"caption": c} for c in captions] for video, captions in REFERENCES.items()})
    res = tokenizer.tokenize({video: [{"caption": caption}] for video, caption in RIGHT.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    # the unmodified pycocoevalcap Meteor object (sharing it avoids a second seconds-long Java start)
    meteor, _ = scorer.meteor.compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    expected = dict(zip(("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"), bleu, strict=True))
    expected.update(METEOR=meteor, ROUGE_L=rouge, CIDEr=cider)
    assert scores == pytest.approx(expected, rel=1e-12)
    assert 0.0 < scores["Bleu_4"] < 1.0 and 0.0 < scores["CIDEr"]


def test_wrong_captions_score_lower(scorer: CaptionScorer) -> None:
    right = scorer(RIGHT, REFERENCES)
    wrong = scorer(WRONG, REFERENCES)
    for key in METRIC_KEYS:
        assert right[key] > wrong[key], key


def test_known_small_case_and_meteor_process_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Meteor] = []

    class RecordingMeteor(Meteor):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    monkeypatch.setattr(metrics, "Meteor", RecordingMeteor)
    scores = caption_scores({"v": "a man is playing a guitar"}, {"v": ["A man is playing the guitar."]})
    # hypothesis/reference: 6 tokens each; clipped n-gram matches 5/6, 3/5, 2/4, 1/3; brevity penalty 1
    assert scores["Bleu_1"] == pytest.approx(5 / 6, rel=1e-6)
    assert scores["Bleu_2"] == pytest.approx((5 / 6 * 3 / 5) ** (1 / 2), rel=1e-6)
    assert scores["Bleu_4"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4), rel=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(5 / 6)  # LCS 5 of 6 both ways
    assert scores["CIDEr"] == 0.0  # one video: every n-gram has document frequency 1 of 1, IDF 0
    assert 0.0 < scores["METEOR"] < 1.0
    assert len(started) == 1
    assert started[0].meteor_p.poll() is not None, "METEOR's Java process is still running"


def test_closed_scorer_refuses() -> None:
    scorer = CaptionScorer()
    scorer.close()
    assert scorer.closed
    with pytest.raises(RuntimeError, match="closed"):
        scorer(RIGHT, REFERENCES)


def test_tokenisation_keeps_line_breaks_aligned() -> None:
    predictions = {"a": "A man,\rplaying.", "b": "Dogs\u2028RUN!"}
    references = {"a": ["a man\nis playing"], "b": ["dogs run", "The dogs are running."]}
    gts, res = ptb_tokenize(predictions, references)
    assert res == {"a": ["a man playing"], "b": ["dogs run"]}
    assert gts == {"a": ["a man is playing"], "b": ["dogs run", "the dogs are running"]}


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ({}, {}, "no predictions"),
        ({"v1": "a cat", "v2": "a dog"}, {"v1": ["a cat"]}, "have no references .*'v2'"),
        ({"v1": "a cat"}, {"v1": ["a cat"], "v2": ["a dog"]}, "no prediction .*'v2'"),
        ({"v1": "a cat"}, {"v1": []}, "empty reference list"),
        ({"v1": "a cat"}, {"v1": "a cat"}, "list of strings"),
        ({"v1": ["a cat"]}, {"v1": ["a cat"]}, "not a string"),
    ],
)
def test_bad_inputs_raise_data_error(predictions: dict, references: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        caption_scores(predictions, references)
