"""Greedy and beam search (video_captioning/decoding.py) on toy scorers against plain per-video references."""

import itertools
import math

import pytest
import torch

from dataloaders.errors import ConfigError
from video_captioning.decoding import PAD_ID, ReorderFn, StepFn, beam_search, greedy_decode

MAX_LEN = 7


class ToyRNN:
    """A tiny random RNN language model: state h [N, H]; h <- tanh(h W + E[last token]); logprobs = log_softmax(h U).

    Tokens 0..vocab-1 are output tokens, EOS is the last of them, BOS = vocab lies outside (like CLIP's SOT).
    Each video starts from its own h0, so videos decode differently. ``prefix_logprobs`` recomputes from scratch
    (no cache, no batching): the plain reference the batched decoders are checked against.
    """

    def __init__(self, n_videos: int, vocab: int = 6, hidden: int = 8, seed: int = 0, sharpness: float = 3.0):
        self.vocab, self.eos, self.bos = vocab, vocab - 1, vocab
        gen = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(vocab + 1, hidden, generator=gen, dtype=torch.float64)
        self.w = torch.randn(hidden, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden)
        self.u = torch.randn(hidden, vocab, generator=gen, dtype=torch.float64) * sharpness / math.sqrt(hidden)
        self.h0 = torch.randn(n_videos, hidden, generator=gen, dtype=torch.float64)

    def step(self, tokens: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(h @ self.w + self.embed[tokens[:, -1]])
        return torch.log_softmax(h @ self.u, dim=-1), h

    @staticmethod
    def reorder(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return h[index]

    def prefix_logprobs(self, video: int, prefix: list[int]) -> list[float]:
        h = self.h0[video : video + 1]
        for token in [self.bos, *prefix]:
            logprobs, h = self.step(torch.tensor([[token]]), h)
        return logprobs[0].tolist()

    def greedy(self, **kwargs: float) -> torch.Tensor:
        return greedy_decode(self.step, self.reorder, self.h0, len(self.h0), self.bos, self.eos, **kwargs)

    def beam(self, beam_size: int, **kwargs: float) -> tuple[torch.Tensor, torch.Tensor]:
        return beam_search(self.step, self.reorder, self.h0, len(self.h0), beam_size, self.bos, self.eos, **kwargs)


def reference_greedy(rnn: ToyRNN, video: int, max_len: int) -> list[int]:
    seq: list[int] = []
    while len(seq) < max_len and (not seq or seq[-1] != rnn.eos):
        logprobs = rnn.prefix_logprobs(video, seq)
        seq.append(max(range(rnn.vocab), key=logprobs.__getitem__))
    return seq


def reference_beam(rnn: ToyRNN, video: int, k: int, max_len: int, alpha: float) -> tuple[float, list[int]]:
    """Plain beam search with the module's convention: rank the best 2k extensions, EOS in the first k finishes,
    the first k non-EOS live on; stop at k finished or max_len (live beams then count as finished)."""
    live: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for length in range(1, max_len + 1):
        candidates = []
        for total, seq in live:
            for token, logprob in enumerate(rnn.prefix_logprobs(video, seq)):
                candidates.append((total + logprob, [*seq, token]))
        candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * k]
        finished += [(total / length**alpha, seq) for total, seq in candidates[:k] if seq[-1] == rnn.eos]
        live = [(total, seq) for total, seq in candidates if seq[-1] != rnn.eos][:k]
        if length == max_len:
            finished += [(total / max_len**alpha, seq) for total, seq in live]
        if len(finished) >= k:
            break
    return max(finished, key=lambda hyp: hyp[0])


def exhaustive_best(rnn: ToyRNN, video: int, max_len: int, alpha: float) -> tuple[float, list[int]]:
    """Best of every complete sequence: up to max_len - 1 non-EOS tokens then EOS, or max_len non-EOS tokens."""
    words = [t for t in range(rnn.vocab) if t != rnn.eos]
    sequences = [[*body, rnn.eos] for n in range(max_len) for body in itertools.product(words, repeat=n)]
    sequences += [list(body) for body in itertools.product(words, repeat=max_len)]
    scored = []
    for seq in sequences:
        total = sum(rnn.prefix_logprobs(video, seq[:i])[token] for i, token in enumerate(seq))
        scored.append((total / len(seq) ** alpha, seq))
    return max(scored, key=lambda hyp: hyp[0])


def rows(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    """Decoder output -> one token list per video, cut after EOS (checking the padding is all PAD_ID)."""
    out = []
    for row in tokens.tolist():
        end = row.index(eos) + 1 if eos in row else len(row)
        assert all(t == PAD_ID for t in row[end:]), row
        out.append(row[:end])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_reference_and_beam_of_one(seed: int) -> None:
    rnn = ToyRNN(n_videos=5, seed=seed)
    greedy = rnn.greedy(max_len=MAX_LEN)
    assert rows(greedy, rnn.eos) == [reference_greedy(rnn, v, MAX_LEN) for v in range(5)]
    for alpha in (0.0, 1.0):
        beam, _ = rnn.beam(1, max_len=MAX_LEN, length_penalty=alpha)
        assert torch.equal(beam, greedy)


@pytest.mark.parametrize(
    ("seed", "beam_size", "alpha"), [(0, 2, 0.0), (1, 3, 1.0), (2, 3, 0.6), (5, 4, 1.0), (6, 3, -0.5)]
)
def test_beam_matches_plain_reference(seed: int, beam_size: int, alpha: float) -> None:
    rnn = ToyRNN(n_videos=4, seed=seed, sharpness=1.5)
    tokens, scores = rnn.beam(beam_size, max_len=MAX_LEN, length_penalty=alpha)
    found = rows(tokens, rnn.eos)
    for video, (seq, score) in enumerate(zip(found, scores.tolist(), strict=True)):
        ref_score, ref_seq = reference_beam(rnn, video, beam_size, MAX_LEN, alpha)
        assert seq == ref_seq
        assert score == pytest.approx(ref_score, rel=1e-6)
    assert found != rows(rnn.greedy(max_len=MAX_LEN), rnn.eos), "toy case too easy: beam search agrees with greedy"


@pytest.mark.parametrize(("seed", "alpha"), [(0, 0.0), (1, 0.0), (0, 1.0), (1, 1.0)])
def test_wide_beam_equals_exhaustive_search(seed: int, alpha: float) -> None:
    vocab, max_len = 4, 3
    rnn = ToyRNN(n_videos=6, vocab=vocab, seed=seed, sharpness=1.0)
    beam = (vocab - 1) ** (max_len - 1) * vocab  # every candidate of the last step fits in the beam
    tokens, scores = rnn.beam(beam, max_len=max_len, length_penalty=alpha)
    found = rows(tokens, rnn.eos)
    for video, (seq, score) in enumerate(zip(found, scores.tolist(), strict=True)):
        best_score, best_seq = exhaustive_best(rnn, video, max_len, alpha)
        assert seq == best_seq
        assert score == pytest.approx(best_score, rel=1e-6)
    assert found != rows(rnn.greedy(max_len=max_len), rnn.eos), "toy case too easy: beam search agrees with greedy"


# Hand-built Markov scorer (next token depends on the last one): A=0, B=1, C=2, EOS=3, BOS=4.
# Greedy takes A (0.6) but everything after A is poor; after B, EOS is near certain.
TABLE = torch.tensor(
    [
        [0.34, 0.33, 0.03, 0.30],  # after A
        [0.004, 0.003, 0.003, 0.99],  # after B
        [0.25, 0.25, 0.25, 0.25],  # after C
        [0.25, 0.25, 0.25, 0.25],  # after EOS (never reached)
        [0.59, 0.40, 0.005, 0.005],  # after BOS
    ]
).log()


def markov_step(tokens: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
    return TABLE[tokens[:, -1]], state


def test_beam_finds_what_greedy_misses() -> None:
    greedy = greedy_decode(markov_step, lambda s, i: s, None, 1, bos=4, eos=3, max_len=2)
    assert greedy.tolist() == [[0, 0]]  # A A: probability 0.59 * 0.34
    for alpha in (0.0, 1.0):
        tokens, scores = beam_search(markov_step, lambda s, i: s, None, 1, 2, 4, 3, max_len=2, length_penalty=alpha)
        assert tokens.tolist() == [[1, 3]]  # B EOS: probability 0.40 * 0.99
        assert scores.item() == pytest.approx(math.log(0.40 * 0.99) / 2**alpha, rel=1e-6)


# A=0, B=1, EOS=2, BOS=3. Stopping at once scores log 0.55; A costs log 0.29 but then nearly nothing, so with
# mean log-probability (length_penalty 1) the longest run of A wins: early stopping must not cut it.
LONG_WINNER = torch.tensor(
    [
        [0.999, 0.0001, 0.0009],  # after A
        [0.5, 0.3, 0.2],  # after B
        [1 / 3, 1 / 3, 1 / 3],  # after EOS (never reached)
        [0.29, 0.16, 0.55],  # after BOS
    ]
).log()


def test_early_stop_keeps_a_longer_winner() -> None:
    def step(tokens: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
        return LONG_WINNER[tokens[:, -1]], state

    max_len = 6
    assert greedy_decode(step, lambda s, i: s, None, 1, bos=3, eos=2, max_len=max_len).tolist() == [[2]]
    tokens, scores = beam_search(step, lambda s, i: s, None, 1, 3, 3, 2, max_len=max_len, length_penalty=1.0)
    assert tokens.tolist() == [[0] * max_len]
    assert scores.item() == pytest.approx((math.log(0.29) + (max_len - 1) * math.log(0.999)) / max_len, rel=1e-6)


class HistoryChecked:
    """Wraps a scorer: its state also carries each row's token history, which must match the tokens passed in
    (so a wrong reorder index fails at once); records the rows of every step and every reorder index."""

    def __init__(self, step: StepFn, reorder: ReorderFn) -> None:
        self.inner_step, self.inner_reorder = step, reorder
        self.rows_per_step: list[int] = []
        self.reorders: list[list[int]] = []

    def init(self, inner_state: object, n: int) -> tuple[object, torch.Tensor]:
        return inner_state, torch.empty(n, 0, dtype=torch.long)

    def step(self, tokens: torch.Tensor, state: tuple[object, torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        inner, history = state
        assert torch.equal(history, tokens[:, :-1]), "state rows drifted from their token rows"
        self.rows_per_step.append(tokens.shape[0])
        logprobs, inner = self.inner_step(tokens, inner)
        return logprobs, (inner, tokens)

    def reorder(self, state: tuple[object, torch.Tensor], index: torch.Tensor) -> tuple[object, torch.Tensor]:
        self.reorders.append(index.tolist())
        inner, history = state
        return self.inner_reorder(inner, index), history[index]


def scripted(scripts: list[list[int]], vocab: int = 6, eos: int = 5, chosen: float = 0.9) -> HistoryChecked:
    """Video v emits ``scripts[v]`` (then EOS forever) with probability ``chosen`` per step; state = video ids."""

    def step(tokens: torch.Tensor, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        position = tokens.shape[1] - 1
        logprobs = torch.full((tokens.shape[0], vocab), math.log((1 - chosen) / (vocab - 1)))
        for row, video in enumerate(videos.tolist()):
            script = scripts[video]
            logprobs[row, script[position] if position < len(script) else eos] = math.log(chosen)
        return logprobs, videos

    return HistoryChecked(step, lambda videos, index: videos[index])


def test_greedy_eos_padding_and_shrinking_batch() -> None:
    scorer = scripted([[5], [1, 2, 5], [3, 5]])
    init = scorer.init(torch.arange(3), 3)
    tokens = greedy_decode(scorer.step, scorer.reorder, init, 3, bos=6, eos=5, max_len=MAX_LEN)
    assert tokens.tolist() == [[5, 0, 0], [1, 2, 5], [3, 5, 0]]
    assert scorer.rows_per_step == [3, 2, 1]  # finished rows leave the computation
    assert scorer.reorders == [[1, 2], [0]]


def test_max_len_truncates_without_eos() -> None:
    scorer = scripted([[1, 2, 3, 4, 1, 5], [2, 5]])
    init = scorer.init(torch.arange(2), 2)
    greedy = greedy_decode(scorer.step, scorer.reorder, init, 2, bos=6, eos=5, max_len=4)
    assert greedy.tolist() == [[1, 2, 3, 4], [2, 5, 0, 0]]
    tokens, scores = beam_search(scorer.step, scorer.reorder, init, 2, 3, 6, 5, max_len=4)
    assert torch.equal(tokens, greedy)
    assert scores.tolist() == pytest.approx([math.log(0.9), math.log(0.9)], rel=1e-6)  # mean logprob (alpha 1)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_beam_state_follows_beams(beam_size: int) -> None:
    rnn = ToyRNN(n_videos=3, seed=4, sharpness=1.5)
    scorer = HistoryChecked(rnn.step, rnn.reorder)
    tokens, scores = beam_search(
        scorer.step, scorer.reorder, scorer.init(rnn.h0, 3), 3, beam_size, rnn.bos, rnn.eos, max_len=MAX_LEN
    )
    plain_tokens, plain_scores = rnn.beam(beam_size, max_len=MAX_LEN)
    assert torch.equal(tokens, plain_tokens) and torch.equal(scores, plain_scores)
    assert scorer.reorders[0] == torch.arange(3).repeat_interleave(beam_size).tolist()  # videos expanded to beams
    rows_seen = scorer.rows_per_step
    assert rows_seen[0] == 3  # the first step scores [BOS] once per video, not once per beam
    assert all(n % beam_size == 0 for n in rows_seen[1:]) and rows_seen[1] == 3 * beam_size


def test_bad_settings_and_bad_scorer_raise() -> None:
    rnn = ToyRNN(n_videos=2)
    with pytest.raises(ConfigError, match="beam_size"):
        rnn.beam(0)
    with pytest.raises(ConfigError, match="max_len"):
        rnn.greedy(max_len=0)
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        greedy_decode(lambda t, s: (torch.zeros(t.shape[0], 1, 6), s), rnn.reorder, rnn.h0, 2, 6, 5)
