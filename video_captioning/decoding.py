"""Model-independent caption decoding (DESIGN 2.7): batched greedy search and beam search over a step callback.

The model is reached through two callables, so any scorer (the fusion encoder in PLM mode, a toy table) plugs in:

- ``step_fn(tokens, state) -> (logprobs, new_state)``: ``tokens`` long ``[N, t]`` holds each live hypothesis
  (row) from the BOS column on; ``logprobs`` float ``[N, V]`` are the log-probabilities of the next token (<= 0,
  e.g. a log-softmax; beam search's early stop relies on it). ``state`` is an opaque per-row cache (a KV cache,
  the video features...) that ``step_fn`` may read and extend; a model without a cache ignores it and reads
  ``tokens``.
- ``reorder_fn(state, index) -> state``: gather rows ``index`` (long ``[N']``, may repeat rows) of a state, like
  ``tensor[index]``. The decoders call it to drop finished rows, to expand videos into beams and to follow the
  surviving beams, so ``state`` row i always belongs to ``tokens`` row i.

Both decoders return generated tokens only (no BOS), EOS included where it was produced, padded with
``PAD_ID`` after it; the width is that of the longest output (<= ``max_len``). A hypothesis stops at EOS or
after ``max_len`` new tokens.

Beam search convention (length normalisation, as in fairseq): a finished hypothesis with summed log-probability
``s`` over ``n`` generated tokens (EOS included) scores ``s / n ** length_penalty``; 0 ranks by the plain sum,
1 by the mean log-probability. At each step the ``2 * beam_size`` best extensions (by summed log-probability) of
a video's live beams are ranked; an EOS extension among the first ``beam_size`` of them finishes a hypothesis,
and the first ``beam_size`` non-EOS extensions become the next live beams. A video is done when it has
``beam_size`` finished hypotheses, or when no live beam can still beat its best finished score (log-probabilities
being <= 0, this bound never changes the result); at ``max_len`` its live beams count as finished. A hypothesis
of score ``-inf`` (a token the scorer forbids) is never returned unless nothing else exists. With
``beam_size=1`` this is exactly greedy search.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TypeVar

import torch

from dataloaders.errors import ConfigError

logger = logging.getLogger(__name__)

SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0
DEFAULT_MAX_LEN = 32  # --max_words
DEFAULT_LENGTH_PENALTY = 1.0
CANDIDATES_PER_BEAM = 2  # extensions ranked per live beam: enough that beam_size of them are not EOS

State = TypeVar("State")
StepFn = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]
ReorderFn = Callable[[State, torch.Tensor], State]


def _check_settings(batch_size: int, max_len: int, beam_size: int = 1) -> None:
    """Raise ConfigError for sizes that leave nothing to decode."""
    for name, value in (("batch_size", batch_size), ("max_len", max_len), ("beam_size", beam_size)):
        if value < 1:
            raise ConfigError(f"caption decoding: {name} must be >= 1, got {value} (see --max_words / --beam_size)")


def _step(step_fn: StepFn[State], tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    """Call ``step_fn``, check it returned one row of next-token log-probabilities per hypothesis, and bring
    half-precision scores to float32 (float64 stays)."""
    logprobs, state = step_fn(tokens, state)
    if logprobs.dim() != 2 or logprobs.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"step_fn must return log-probabilities [N, V] for the N={tokens.shape[0]} rows of tokens "
            f"{tuple(tokens.shape)}, got {tuple(logprobs.shape)}"
        )
    return logprobs.to(torch.promote_types(logprobs.dtype, torch.float32)), state


def _pad(sequences: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack 1-D token tensors into ``[len(sequences), longest]`` padded with PAD_ID."""
    width = max(int(seq.numel()) for seq in sequences)
    out = torch.full((len(sequences), width), PAD_ID, dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        out[row, : seq.numel()] = seq
    return out


def greedy_decode(
    step_fn: StepFn[State],
    reorder_fn: ReorderFn[State],
    init_state: State,
    batch_size: int,
    bos: int = SOT_ID,
    eos: int = EOT_ID,
    max_len: int = DEFAULT_MAX_LEN,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Arg-max decoding of ``batch_size`` videos at once; returns tokens long ``[B, <= max_len]``.

    ``init_state`` holds one row per video. Rows that produced EOS leave the batch (``reorder_fn`` with the
    indices of the unfinished rows), so later steps only compute the unfinished ones.
    """
    _check_settings(batch_size, max_len)
    device = torch.device(device)
    out = torch.full((batch_size, max_len), PAD_ID, dtype=torch.long, device=device)
    rows = torch.arange(batch_size, device=device)  # video of each live row
    tokens = torch.full((batch_size, 1), bos, dtype=torch.long, device=device)
    state = init_state
    for position in range(max_len):
        logprobs, state = _step(step_fn, tokens, state)
        chosen = logprobs.argmax(dim=-1)
        out[rows, position] = chosen
        unfinished = (chosen != eos).nonzero().squeeze(1)
        if unfinished.numel() == 0 or position + 1 == max_len:
            break
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        if unfinished.numel() < rows.numel():
            rows, tokens = rows[unfinished], tokens[unfinished]
            state = reorder_fn(state, unfinished)
    logger.debug("greedy decoding of %d videos took %d steps", batch_size, position + 1)
    return out[:, : position + 1]


def _bound(best_live_sum: float, length: int, max_len: int, length_penalty: float) -> float:
    """Best normalised score a live beam with summed log-probability ``best_live_sum`` over ``length`` tokens can
    still reach: its sum only falls, and ``s / n ** p`` is monotonic in n, so one end of [length + 1, max_len]
    gives the maximum."""
    return max(best_live_sum / (length + 1) ** length_penalty, best_live_sum / max_len**length_penalty)


def beam_search(
    step_fn: StepFn[State],
    reorder_fn: ReorderFn[State],
    init_state: State,
    batch_size: int,
    beam_size: int,
    bos: int = SOT_ID,
    eos: int = EOT_ID,
    max_len: int = DEFAULT_MAX_LEN,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search of ``batch_size`` videos at once (``batch_size * beam_size`` rows; see the module docstring).

    ``init_state`` holds one row per video. The first step scores it as it is (every beam of a video holds the
    same ``[BOS]``), then ``reorder_fn`` expands the scores' state to the beams. Videos that are done leave the
    batch. Returns the best hypothesis per video, tokens long ``[B, <= max_len]``, and its normalised score
    float ``[B]``.
    """
    _check_settings(batch_size, max_len, beam_size)
    device = torch.device(device)
    k = beam_size
    videos = list(range(batch_size))  # video of each live group of k rows
    state = init_state
    tokens = torch.full((batch_size * k, 1), bos, dtype=torch.long, device=device)
    # Only beam 0 of each video is real at the start; the others (-inf) would duplicate it.
    sums = torch.full((batch_size, k), -math.inf, device=device)
    sums[:, 0] = 0.0
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch_size)]
    for length in range(1, max_len + 1):
        if length == 1:  # all beams of a video hold [BOS]: score one row per video, then expand to the beams
            logprobs, state = _step(step_fn, tokens[::k], state)
            expand = torch.arange(batch_size, device=device).repeat_interleave(k)
            logprobs, state = logprobs[expand], reorder_fn(state, expand)
        else:
            logprobs, state = _step(step_fn, tokens, state)
        vocab = logprobs.shape[1]
        candidates = (sums[:, :, None] + logprobs.view(-1, k, vocab)).view(-1, k * vocab)
        top_sums, top_index = candidates.topk(min(CANDIDATES_PER_BEAM * k, k * vocab), dim=1)
        top_beam, top_token = top_index // vocab, top_index % vocab
        is_eos = top_token == eos
        # EOS among a video's first k extensions finishes a hypothesis (one of -inf score is no hypothesis).
        hit_sums, hit_beams = top_sums[:, :k].tolist(), top_beam[:, :k].tolist()
        for group, rank in (is_eos[:, :k] & torch.isfinite(top_sums[:, :k])).nonzero().tolist():
            prefix = tokens[group * k + hit_beams[group][rank], 1:]
            ended = torch.cat([prefix, prefix.new_tensor([eos])])
            finished[videos[group]].append((hit_sums[group][rank] / length**length_penalty, ended))
        # The first k non-EOS extensions become the live beams (2k candidates hold at least k of them).
        keep = is_eos.int().argsort(dim=1, stable=True)[:, :k]
        sums = top_sums.gather(1, keep)
        parents = (torch.arange(len(videos), device=device)[:, None] * k + top_beam.gather(1, keep)).view(-1)
        tokens = torch.cat([tokens[parents], top_token.gather(1, keep).view(-1, 1)], dim=1)
        if length == max_len:
            for group, video in enumerate(videos):
                finished[video].extend(
                    (live_sum / max_len**length_penalty, tokens[group * k + beam, 1:])
                    for beam, live_sum in enumerate(sums[group].tolist())
                )
            break
        live_best = sums.max(dim=1).values.tolist()
        remaining = []
        for group, video in enumerate(videos):
            hyps = finished[video]
            done = len(hyps) >= k or (
                bool(hyps)
                and max(score for score, _ in hyps) >= _bound(live_best[group], length, max_len, length_penalty)
            )
            remaining.append(not done)
        if not any(remaining):
            break
        if not all(remaining):
            keep_groups = torch.tensor(remaining, device=device)
            keep_rows = keep_groups.repeat_interleave(k)
            parents, tokens, sums = parents[keep_rows], tokens[keep_rows], sums[keep_groups]
            videos = [video for video, live in zip(videos, remaining, strict=True) if live]
        state = reorder_fn(state, parents)
    logger.debug("beam search (beam %d) of %d videos took %d steps", k, batch_size, length)
    best = [max(hyps, key=lambda hyp: hyp[0]) for hyps in finished]
    scores = torch.tensor([score for score, _ in best], dtype=torch.float32, device=device)
    return _pad([seq for _, seq in best], device), scores
