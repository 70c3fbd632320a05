"""ClipTokenizer against open_clip.tokenize and the [SOT] + bpe[:L-2] + [EOT] truncation rule."""

import numpy as np
import open_clip
import pytest

from dataloaders.tokenizer import EOT_ID, PAD_ID, SOT_ID, VOCAB_SIZE, ClipTokenizer

SHORT_TEXTS = ["a man is playing guitar", "Two DOGS run,   on the beach!", "what's 12 + 7?", "café naïve"]


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


def test_special_ids(tok):
    assert (tok.sot_id, tok.eot_id, tok.pad_id, tok.vocab_size) == (49406, 49407, 0, 49408)
    assert (SOT_ID, EOT_ID, PAD_ID, VOCAB_SIZE) == (49406, 49407, 0, 49408)


@pytest.mark.parametrize("max_words", [16, 32, 77])
def test_encode_matches_open_clip_for_short_texts(tok, max_words):
    reference = open_clip.tokenize(SHORT_TEXTS, context_length=max_words).numpy()
    ids, mask = tok.encode_batch(SHORT_TEXTS, max_words)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape == (len(SHORT_TEXTS), max_words)
    np.testing.assert_array_equal(ids, reference)
    np.testing.assert_array_equal(mask, (reference != 0).astype(np.int64))
    for row in range(len(SHORT_TEXTS)):
        single_ids, single_mask = tok.encode(SHORT_TEXTS[row], max_words)
        np.testing.assert_array_equal(single_ids, ids[row])
        np.testing.assert_array_equal(single_mask, mask[row])


def test_truncation_keeps_first_l_minus_2_tokens(tok):
    text = " ".join(f"word{i}" for i in range(40))
    words = tok.tokenize_words(text)
    assert len(words) > 32
    ids, mask = tok.encode(text, 32)
    assert ids.tolist() == [SOT_ID, *words[:30], EOT_ID]
    assert mask.tolist() == [1] * 32
    assert open_clip.tokenize([text], context_length=32)[0].tolist() == ids.tolist()


def test_exact_fit_boundary(tok):
    words = tok.tokenize_words("a b c d e f")
    ids, mask = tok.encode("a b c d e f", len(words) + 2)
    assert ids.tolist() == [SOT_ID, *words, EOT_ID]
    ids, _ = tok.encode("a b c d e f", len(words) + 1)
    assert ids.tolist() == [SOT_ID, *words[:-1], EOT_ID]


def test_empty_text_and_too_short_length(tok):
    ids, mask = tok.encode("", 5)
    assert ids.tolist() == [SOT_ID, EOT_ID, 0, 0, 0] and mask.tolist() == [1, 1, 0, 0, 0]
    with pytest.raises(ValueError):
        tok.encode("x", 1)


def test_decode(tok):
    ids, _ = tok.encode("A man is playing guitar.", 32)
    assert tok.decode(ids) == "a man is playing guitar ."
    assert tok.decode(ids.tolist() + [320, 1929]) == "a man is playing guitar ."  # stops at the first EOT
    words = tok.tokenize_words("a dog")
    assert tok.decode(words + [PAD_ID, PAD_ID]) == "a dog"  # no EOT: trailing pad dropped
    assert tok.decode([SOT_ID, EOT_ID]) == ""
