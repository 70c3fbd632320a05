"""MemBridge fusion encoder: memory-generated bridge tokens, heads and the stage-2 objectives (DESIGN §2.3-2.7).

Sequence layout (``N = T + 1 + K + L``)::

    [ T frame tokens | v_sep | K bridge tokens | L text tokens ]

Every fusion pass (stage-2 VTM / MLM / PLM, retrieval re-ranking, caption decoding, QA) goes through
:meth:`MemBridgeFusion.fuse` with one :class:`FusionInputs` bundle; ``fuse`` is the one place that builds the
sequence, its positional rule and its attention mask. QA adds one answer slot after the question
(``[frames | v_sep | bridges | question | answer slot]``, mode ``qa``). The plain loop references that tests and
benches compare against live in :mod:`modules.reference`.

Frame tokens are the per-frame CLIP embeddings, ``v_sep`` their masked mean, text tokens the CLIP text encoder
output of every position. Video rows see video and bridge columns, text rows see text and bridge columns, bridge
rows see everything; padded columns are hidden. Bridge tokens are read from a memory bank per (video, text) pair
with a query built from the detached ``v_sep`` and text EOT features.

``FusionConfig.official_quirks`` reproduces the three defects of the published stage-2 code (DESIGN §2.6b):

- Q1 (VTM / evaluation): ``v_sep`` keeps its positional embedding and the first bridge token loses it;
- Q2 (VTM): the text feature of the bilinear head is normalised over the row axis of its group;
- Q3 (PLM): the video tokens are detached together with their positional embedding.

The published code assumes every frame is valid (MemBridge pads short videos by repeating frames); the quirk
positions are reproduced for that case.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dataloaders.errors import ConfigError
from modules.clip_blocks import LayerNorm, ResidualAttentionBlock, Transformer, default_heads

logger = logging.getLogger(__name__)

FUSION_CONFIG_FILE = "fusion.json"
BRIDGE_SOURCES = ("memory", "learned", "none", "tube", "object")
# extra tokens computed from the video alone (T2VLP tubes, STOA objects/actions), given with FusionInputs.extra_tokens
VIDEO_TOKEN_SOURCES = ("tube", "object")
FUSION_ATTENTIONS = ("bridge", "joint")
FUSION_POSITIONALS = ("except_sep", "all")
PLM_MODES = ("prefix", "single_pass")
FUSION_MODES = ("vtm", "eval", "mlm", "plm", "qa", "lm")
FusionMode = Literal["vtm", "eval", "mlm", "plm", "qa", "lm"]

DEFAULT_EOT_TOKEN_ID = 49407  # CLIP's <|endoftext|>
MLM_MASK_ID = 0  # id fed to the CLIP text encoder at a masked position (the published choice)
DEFAULT_MLM_PROB = 0.15
DEFAULT_HEAD_DROPOUT = 0.5
POSITIONAL_INIT_STD = 0.01  # CLIP's init of a text positional table (overwritten by ``init_from_clip``)
IGNORE_INDEX = -100  # label of positions without a target (``F.cross_entropy``'s default)
RERANK_SCALE = 1000.0  # S_top <- softmax(S_top) * RERANK_SCALE * p_match + RERANK_OFFSET (published constants)
RERANK_OFFSET = 1000.0
DEFAULT_RERANK_QUERY_CHUNK = 64  # queries whose candidate groups are fused in one pass
ANSWER_SLOTS = 1  # positions the QA sequence adds after the question


@dataclass
class FusionConfig:
    """Sizes and switches of the fusion encoder; the published sizes are in ``CLIP-modules/fusion.json``."""

    width: int = 512
    layers: int = 6
    heads: int | None = None  # None: width // 64 (OpenAI's rule)
    num_bridge_tokens: int = 8
    memory_size: int = 8192
    max_frames: int = 12
    max_words: int = 32
    vocab_size: int = 49408
    context_length: int = 77  # rows of the positional table (the published table is CLIP's text table)
    eot_token_id: int = DEFAULT_EOT_TOKEN_ID
    bridge_source: str = "memory"
    official_quirks: bool = False
    dropout: float = DEFAULT_HEAD_DROPOUT
    mlm_prob: float = DEFAULT_MLM_PROB
    # layout switches set by the --method preset (modules/methods.py); the defaults are MemBridge's
    attention: str = "bridge"  # bridge: DESIGN 2.3 modality separation; joint: padding columns only
    positional: str = "except_sep"  # except_sep: no positional embedding at v_sep / EOT; all: everywhere
    vsep_first: bool = False  # [v_sep | frames | ...] instead of [frames | v_sep | ...]
    plm_mode: str = "prefix"  # prefix: MemBridge's per-prefix rows; single_pass: one teacher-forced causal pass

    def __post_init__(self) -> None:
        problems = []
        if self.bridge_source not in BRIDGE_SOURCES:
            problems.append(f"bridge_source {self.bridge_source!r} is not one of {BRIDGE_SOURCES}")
        for name, allowed in (
            ("attention", FUSION_ATTENTIONS),
            ("positional", FUSION_POSITIONALS),
            ("plm_mode", PLM_MODES),
        ):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} {getattr(self, name)!r} is not one of {allowed}")
        if self.plm_mode == "single_pass" and self.attention != "joint":
            problems.append(
                "plm_mode single_pass needs attention joint (the bridge layout's PLM reads the prefix through the "
                "bridge rows): use --plm_mode prefix or --fusion_attention joint"
            )
        for name in ("width", "layers", "max_frames", "max_words", "vocab_size", "memory_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.num_bridge_tokens < 1 and self.bridge_source != "none":
            problems.append(f"num_bridge_tokens must be >= 1 with bridge_source {self.bridge_source!r}")
        if self.max_words < 2:
            problems.append(f"max_words must hold at least SOT and EOT (got {self.max_words})")
        if self.width % self.num_heads:
            problems.append(f"width {self.width} is not divisible by {self.num_heads} heads")
        if self.seq_len > self.context_length:
            problems.append(
                f"the fusion sequence T+1+K+L = {self.seq_len} is longer than context_length {self.context_length}"
            )
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.mlm_prob <= 1.0:
            problems.append(f"dropout {self.dropout} must be in [0, 1) and mlm_prob {self.mlm_prob} in [0, 1]")
        if problems:
            raise ConfigError("invalid fusion configuration: " + "; ".join(problems) + "; fix the JSON or the flags")

    @property
    def num_heads(self) -> int:
        return self.heads if self.heads else default_heads(self.width)

    @property
    def num_bridges(self) -> int:
        """K as it appears in the sequence (0 when ``bridge_source == 'none'``)."""
        return 0 if self.bridge_source == "none" else self.num_bridge_tokens

    @property
    def seq_len(self) -> int:
        return self.max_frames + 1 + self.num_bridges + self.max_words

    @classmethod
    def from_json(cls, path: str | Path, **overrides: object) -> FusionConfig:
        """Read ``path`` (a JSON file, or a folder holding ``fusion.json``); ``None`` overrides are ignored."""
        path = Path(path)
        if path.is_dir():
            path = path / FUSION_CONFIG_FILE
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: fusion config not found; pass --cross_config_path CLIP-modules") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON at line {err.lineno} ({err.msg}); fix the file") from err
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown fusion config keys {unknown}; known keys are {sorted(known)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown fusion config overrides {unknown}; known keys are {sorted(known)}")
        return cls(**values)


class TextEncoder(Protocol):
    """The part of ``modules.clip_model.CLIP`` the fusion uses."""

    token_embedding: nn.Embedding

    def encode_text_tokens(
        self,
        text_ids: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers: pooling, masks, random draws
# ----------------------------------------------------------------------------------------------------------------


def video_sep_token(frame_feats: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    """``v_sep [B, D]``: the mean of the valid frame features (all-padding videos give zeros)."""
    weights = video_mask.to(frame_feats.dtype).unsqueeze(-1)
    return (frame_feats * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def eot_positions(text_mask: torch.Tensor) -> torch.Tensor:
    """Index of the EOT token of every text ``[B]`` (texts are ``SOT .. EOT`` followed by padding)."""
    return text_mask.long().sum(1) - 1


def _additive(visible: torch.Tensor) -> torch.Tensor:
    return torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, float("-inf"))


def fusion_attention_mask(
    video_mask: torch.Tensor,
    text_mask: torch.Tensor,
    num_bridges: int,
    causal_text: bool,
    plm_prefix: int | torch.Tensor | None = None,
    attention: str = "bridge",
    vsep_first: bool = False,
    extra_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive attention mask ``[B, 1, N, N]`` of the fusion sequence (0 visible, ``-inf`` hidden).

    ``extra_mask [B, K]`` (nonzero = real token; None: all real) hides the empty extra tokens as key-padding columns
    in every layout, like padded frames and text (STOA's ``[id_list != 0, 1, 1, 1, 1]``, spec B.6).

    ``attention == "joint"`` (T2VLP): every row sees every non-padded column; with ``causal_text`` the video and
    extra rows do not see text and the text x text block is causal (``plm_prefix`` is not used). ``vsep_first``:
    the video block is ``[v_sep | frames]`` instead of ``[frames | v_sep]``. The rest describes ``bridge``:

    Video rows (frames + ``v_sep``) see video and bridge columns, text rows see text and bridge columns, bridge
    rows see every column; padded frame/text columns are hidden from all rows. With ``causal_text`` the
    text x text block is causal and ignores padding. ``plm_prefix`` (an int, or ``[B]`` per row) restricts the
    bridge rows to text slots ``0 .. i+1`` (padding included), as in the published PLM.

    Without bridges (``num_bridges == 0``, the ``none`` ablation) video and text attend to each other directly;
    in PLM the video rows then take the bridge rows' rule for text columns.
    """
    b, t = video_mask.shape
    length = text_mask.shape[1]
    n = t + 1 + num_bridges + length
    video = slice(0, t + 1)
    bridges = slice(t + 1, t + 1 + num_bridges)
    text = slice(t + 1 + num_bridges, n)
    ones = torch.ones(b, 1 + num_bridges, dtype=torch.bool, device=video_mask.device)
    if extra_mask is not None:
        if tuple(extra_mask.shape) != (b, num_bridges):
            raise ValueError(f"extra_mask has shape {tuple(extra_mask.shape)}; expected {(b, num_bridges)}")
        ones[:, 1:] = extra_mask.bool()
    if vsep_first:
        columns = torch.cat([ones[:, :1], video_mask.bool(), ones[:, 1:], text_mask.bool()], dim=1)
    else:
        columns = torch.cat([video_mask.bool(), ones, text_mask.bool()], dim=1)
    visible = columns.unsqueeze(1).expand(b, n, n).clone()
    if attention == "joint":
        if causal_text:
            visible[:, : t + 1 + num_bridges, text] = False
            visible[:, text, text] = torch.ones(length, length, dtype=torch.bool, device=video_mask.device).tril()
        return _additive(visible).unsqueeze(1)
    if attention != "bridge":
        raise ValueError(f"attention must be one of {FUSION_ATTENTIONS}, got {attention!r}")
    if num_bridges:
        visible[:, video, text] = False
        visible[:, text, video] = False
    if causal_text:
        visible[:, text, text] = torch.ones(length, length, dtype=torch.bool, device=video_mask.device).tril()
    if plm_prefix is not None:
        prefix = torch.as_tensor(plm_prefix, device=video_mask.device).expand(b)
        sees = torch.arange(length, device=video_mask.device).unsqueeze(0) <= (prefix.unsqueeze(1) + 1)
        readers = bridges if num_bridges else video
        visible[:, readers, text] = sees.unsqueeze(1)
    return _additive(visible).unsqueeze(1)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draws from ``generator`` (on its own device), moved to ``device``."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def mlm_mask(
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    generator: torch.Generator | None = None,
    prob: float = DEFAULT_MLM_PROB,
    uniforms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask inner tokens for MLM: ``(masked_ids, labels)``. ``uniforms`` (two ``[B, L]`` draws in [0, 1), e.g. the
    per-sample :data:`STAGE2_DRAWS_KEY` of the batch) replace the two draws from ``generator``.

    Each token strictly between SOT and EOT is masked with probability ``prob``; a text with no draw gets one
    inner token masked uniformly at random. Masked ids become ``MLM_MASK_ID`` (0); ``labels`` hold the original
    id there and ``IGNORE_INDEX`` elsewhere. A text without inner tokens (``[SOT, EOT]``) is left unmasked.
    """
    b, length = text_ids.shape
    positions = torch.arange(length, device=text_ids.device).unsqueeze(0)
    inner = (positions >= 1) & (positions < eot_positions(text_mask).unsqueeze(1))
    first, second = uniforms or (_uniform((b, length), generator, text_ids.device), None)
    chosen = (first < prob) & inner
    second = _uniform((b, length), generator, text_ids.device) if second is None else second
    fallback_scores = second.masked_fill(~inner, -1.0)
    fallback = F.one_hot(fallback_scores.argmax(1), length).bool() & inner
    needs_one = ~chosen.any(1, keepdim=True)
    chosen = chosen | (fallback & needs_one)
    masked_ids = text_ids.masked_fill(chosen, MLM_MASK_ID)
    labels = text_ids.masked_fill(~chosen, IGNORE_INDEX)
    return masked_ids, labels


def draw_plm_starts(
    text_mask: torch.Tensor, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """Per text, the first scored position of PLM, uniform in ``[1, eot]`` (``eot`` = index of EOT) ``[B]``
    (``uniform [B]``: given draws in [0, 1) instead of ``generator``'s)."""
    eot = eot_positions(text_mask)
    if bool((eot < 1).any()):
        raise ValueError("every text needs at least SOT and EOT (text_mask.sum() >= 2) for PLM")
    draws = _uniform((text_mask.shape[0],), generator, text_mask.device) if uniform is None else uniform
    return (1 + (draws * eot).floor().long()).clamp(max=eot)


def plm_targets(
    text_ids: torch.Tensor, text_mask: torch.Tensor, starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (sample, prefix) rows that carry PLM loss: ``(rows [R], prefixes [R], targets [R])``.

    Text ``b`` scores the tokens ``starts[b] .. eot[b]``; the token at ``j`` is predicted from the prefix
    ``0 .. j-1`` (prefix index ``i = j - 1``). Rows are ordered sample-major, as in the published loss.
    """
    positions = torch.arange(text_ids.shape[1], device=text_ids.device).unsqueeze(0)
    scored = (positions >= starts.unsqueeze(1)) & (positions <= eot_positions(text_mask).unsqueeze(1))
    rows, cols = scored.nonzero(as_tuple=True)
    return rows, cols - 1, text_ids[rows, cols]


def prefix_probe_mask(length: int, prefixes: torch.Tensor) -> torch.Tensor:
    """Additive ``[L+P, L+P]`` mask of a causal text pass with ``P`` probe positions appended.

    Tokens attend causally among themselves and never to probes; probe ``p`` sees tokens ``0 .. prefixes[p]``
    and itself, so at position id ``prefixes[p] + 1`` it computes the EOT feature of ``[SOT, w1 .. wi, EOT]``.
    """
    p = prefixes.shape[0]
    device = prefixes.device
    visible = torch.zeros(length + p, length + p, dtype=torch.bool, device=device)
    visible[:length, :length] = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    visible[length:, :length] = torch.arange(length, device=device).unsqueeze(0) <= prefixes.unsqueeze(1)
    visible[length:, length:] = torch.eye(p, dtype=torch.bool, device=device)
    return _additive(visible)


def encode_text_with_probes(
    text_encoder: TextEncoder, text_ids: torch.Tensor, prefixes: torch.Tensor, eot_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One causal text pass giving every token feature and the EOT-after-prefix features.

    Returns ``(token_feats [B, L, D], probe_feats [B, P, D])``; ``probe_feats[:, p]`` equals position
    ``i+1`` of encoding ``[SOT, w1 .. wi, EOT]`` with ``i = prefixes[p]``.
    """
    b, length = text_ids.shape
    probes = torch.full((b, prefixes.shape[0]), eot_token_id, dtype=text_ids.dtype, device=text_ids.device)
    ids = torch.cat([text_ids, probes], dim=1)
    position_ids = torch.cat([torch.arange(length, device=text_ids.device), prefixes + 1])
    out = text_encoder.encode_text_tokens(ids, attn_mask=prefix_probe_mask(length, prefixes), position_ids=position_ids)
    return out[:, :length], out[:, length:]


def sample_hard_negatives(
    sim_global: torch.Tensor,
    local_offset: int,
    local_size: int,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per local positive, in both directions, as global indices.

    With ``uniforms [b, 2]`` (this rank's per-sample draws in [0, 1): text->video, video->text) and ``order [Bg]``
    (a per-sample key of every pair of the global batch, distinct) the draw is an inverse-CDF lookup over the
    candidates sorted by ``order``: the same distribution as ``multinomial``, and the same negative whatever the
    split of the global batch over ranks and its row order (a 2-rank run equals a 1-process run).

    ``sim_global [Bg, Bg]`` holds text (rows) x video (columns) similarities of the gathered batch; this rank's
    pairs are rows/columns ``local_offset .. local_offset + local_size - 1``. Negatives are drawn by
    ``multinomial`` from ``softmax(sim)`` with the positive's probability zeroed, as published; the positive is
    removed from the logits (``-inf``), which gives the same distribution after multinomial's renormalisation and
    cannot underflow to an all-zero row. Returns ``(neg_video_for_text [b], neg_text_for_video [b])``.
    """
    total = sim_global.shape[0]
    if total < 2:
        raise ConfigError("VTM hard negatives need at least 2 pairs in the global batch; raise --batch_size")
    rows = torch.arange(local_offset, local_offset + local_size, device=sim_global.device)
    positive = F.one_hot(rows, total).bool()
    draws = []
    for direction, logits in enumerate((sim_global[rows], sim_global.t()[rows])):
        probs = logits.float().masked_fill(positive, float("-inf")).softmax(-1)
        if uniforms is not None:
            if order is None:
                raise ValueError("sample_hard_negatives: give the pairs' order keys with the uniforms")
            canonical = order.argsort()
            cdf = probs[:, canonical].double().cumsum(-1)
            target = uniforms[:, direction].to(cdf).unsqueeze(1) * cdf[:, -1:]
            pick = torch.searchsorted(cdf, target, right=True).clamp(max=total - 1).squeeze(1)
            draws.append(canonical[pick].to(sim_global.device))
            continue
        if generator is not None:
            probs = probs.to(generator.device)
        draws.append(torch.multinomial(probs, 1, generator=generator).squeeze(1).to(sim_global.device))
    return draws[0], draws[1]


def cross_entropy_sum_and_correct(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(summed cross-entropy, number of correct argmaxes, number of targets)`` (float scalars; the sum keeps the
    graph): the parts of a mean that is taken over several ranks."""
    count = logits.new_tensor(float(targets.numel()), dtype=torch.float32)
    if targets.numel() == 0:
        return logits.sum().float() * 0.0, count * 0.0, count
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    return total, (logits.argmax(-1) == targets).float().sum(), count


def cross_entropy_and_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy; with no targets both are 0 (the loss keeps the graph)."""
    if targets.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    loss = F.cross_entropy(logits.float(), targets)
    accuracy = (logits.argmax(-1) == targets).float().mean()
    return loss, accuracy


def rerank_queries(
    scores: torch.Tensor,
    match_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    topk: int,
    queries: torch.Tensor,
    transposed: bool,
    query_chunk: int = DEFAULT_RERANK_QUERY_CHUNK,
) -> torch.Tensor:
    """Re-ranked rows ``[len(queries), N_candidates]`` of ``scores`` (query rows) for the given query indices.

    ``transposed`` says the rows are videos (v2t): ``match_prob`` is then called with (candidate texts, query
    videos). Each query's top-``topk`` candidates get ``softmax(S_top) * RERANK_SCALE * p_match + RERANK_OFFSET``
    (softmax over that query's candidates); the other candidates keep their score. Queries can be split freely
    (e.g. across ranks): a row depends only on its own query.
    """
    k = min(topk, scores.shape[1])
    out = scores[queries].clone()
    for start in range(0, len(queries), query_chunk):
        chunk = queries[start : start + query_chunk]
        candidates = scores[chunk].topk(k, dim=1).indices
        query_idx = chunk.unsqueeze(1).expand_as(candidates)
        text_idx, video_idx = (candidates, query_idx) if transposed else (query_idx, candidates)
        p_match = match_prob(text_idx, video_idx).to(scores.dtype)
        top = scores[chunk].gather(1, candidates).softmax(-1)
        rows = torch.arange(start, start + len(chunk), device=scores.device).unsqueeze(1)
        out[rows, candidates] = top * RERANK_SCALE * p_match + RERANK_OFFSET
    return out


def rerank(
    sim: torch.Tensor,
    match_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    topk: int,
    query_chunk: int = DEFAULT_RERANK_QUERY_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank the top-``topk`` candidates of every query in both directions with the VTM match probability.

    ``sim [Nt, Nv]`` (text rows). For each query the candidates' scores become
    ``softmax(S_top) * RERANK_SCALE * p_match + RERANK_OFFSET`` (softmax over that query's candidates), so they
    rank above every non-candidate. ``match_prob(text_idx [Q, k], video_idx [Q, k]) -> [Q, k]`` scores
    ``Q`` queries' candidate groups; a group is the unit of the official Q2 normalisation. Returns
    ``(t2v [Nt, Nv], v2t [Nv, Nt])``; ``topk <= 0`` returns ``(sim, sim.T)`` unchanged.
    """
    if topk <= 0:
        return sim.clone(), sim.t().clone()
    check_rerank_range(sim)
    results = []
    for transposed, scores in ((False, sim), (True, sim.t())):
        queries = torch.arange(scores.shape[0], device=sim.device)
        results.append(rerank_queries(scores, match_prob, topk, queries, transposed, query_chunk))
    return results[0], results[1]


def check_rerank_range(sim: torch.Tensor) -> None:
    """Re-ranked candidates are lifted by RERANK_OFFSET: every similarity must stay below it."""
    if bool((sim >= RERANK_OFFSET).any()):
        raise ValueError(f"similarities must stay below {RERANK_OFFSET} for re-ranked candidates to rank first")


def _as_slice(index: torch.Tensor) -> torch.Tensor | slice:
    """``index`` (long ``[R]``, increasing) as a slice when it is a run of consecutive positions (a view, no copy)."""
    first, last = int(index[0]), int(index[-1])
    return slice(first, last + 1) if last - first + 1 == index.numel() else index


def _block_rows(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    mask: torch.Tensor,
    out_rows: torch.Tensor | slice,
    cols: torch.Tensor | slice,
) -> torch.Tensor:
    """One pre-LN block on ``x [B, S, D]`` computed only for the positions ``out_rows`` (local indices into S), which
    attend to the positions ``cols`` with ``mask [B|1, 1, |out_rows|, |cols|]``; returns ``[B, |out_rows|, D]``.
    Equals ``block(x, full_mask)[:, out_rows]`` when ``cols`` hold every position ``out_rows`` see."""
    attn = block.attn
    b, _, width = x.shape
    heads, dim = attn.heads, width // attn.heads
    h = block.ln_1(x)
    q = F.linear(h[:, out_rows], attn.in_proj_weight[:width], attn.in_proj_bias[:width])
    k, v = F.linear(h[:, cols], attn.in_proj_weight[width:], attn.in_proj_bias[width:]).chunk(2, dim=-1)
    q, k, v = (t.reshape(b, t.shape[1], heads, dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    y = x[:, out_rows] + attn.out_proj(out.transpose(1, 2).reshape(b, q.shape[2], width))
    return y + block.mlp(block.ln_2(y))


def readout_plan(mask: torch.Tensor, rows: torch.Tensor, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (first to last) ``(out, cols)``, bool ``[N]`` each: the positions whose output that layer must
    compute and the columns (keys/values) those positions see, for the hidden states at ``rows`` after ``layers``
    layers under the additive ``mask [B|1, 1, N, N]``.

    Going back from the last layer (``out`` = ``rows``), layer ``l`` must compute what layer ``l+1`` reads: its own
    ``out`` (the residual) and its ``cols`` (seen in any batch row).
    """
    visible = (mask[:, 0] == 0).any(dim=0)  # [N, N]: row sees column in some batch row
    needed = torch.zeros(mask.shape[-1], dtype=torch.bool, device=mask.device)
    needed[rows] = True
    plan = []
    for _ in range(layers):
        cols = visible[needed].any(dim=0)
        plan.append((needed, cols))
        needed = needed | cols
    return plan[::-1]


def transformer_rows(transformer: Transformer, x: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``transformer(x, mask)[:, rows]`` computing each layer only where the result depends on it
    (:func:`readout_plan`): every other query, attention row and MLP row is skipped.

    ``x [B, N, D]``, additive ``mask [B|1, 1, N, N]`` (0 visible, ``-inf`` hidden), ``rows`` long ``[R]``. In the
    prefix LM with bridges (read-out at one text slot) the last layer runs one query over the keys/values of bridges
    + text, the one before skips the video rows' queries and MLPs, the others run in full. Equal to the full pass to
    float tolerance (the same arithmetic per position, on matrices of other shapes).
    """
    plan = readout_plan(mask, rows, len(transformer.resblocks))
    available = plan[0][0] | plan[0][1]
    if not bool(available.all()):
        x = x[:, available]
    for block, (out, cols) in zip(transformer.resblocks, plan, strict=True):
        if bool(available.all() & out.all()):  # a full layer: the plain block
            x = block(x, mask)
            continue
        local = available.long().cumsum(0) - 1  # position -> index into the current x
        out_idx, col_idx = out.nonzero().squeeze(1), cols.nonzero().squeeze(1)
        sub_mask = mask[:, :, out_idx][:, :, :, col_idx]
        x = _block_rows(block, x, sub_mask, _as_slice(local[out_idx]), _as_slice(local[col_idx]))
        available = out
    local = available.long().cumsum(0) - 1
    return x[:, local[rows]]


# ----------------------------------------------------------------------------------------------------------------
# The inputs of one fusion pass
# ----------------------------------------------------------------------------------------------------------------


def with_answer_slot(
    question_feats: torch.Tensor, question_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text slots of the QA sequence: ``(text_feats [B, L+1, D], text_mask [B, L+1], slot [B])``.

    One zero column is appended so that a question filling all ``L`` slots still has its answer slot; ``slot`` is
    the index right after each question's EOT, where the mask is set to 1 and the features are zero.
    """
    b, _, d = question_feats.shape
    slot = eot_positions(question_mask) + 1
    rows = torch.arange(b, device=question_feats.device)
    text_feats = torch.cat([question_feats, question_feats.new_zeros(b, ANSWER_SLOTS, d)], dim=1)
    text_feats[rows, slot] = 0.0
    text_mask = torch.cat([question_mask, question_mask.new_zeros(b, ANSWER_SLOTS)], dim=1)
    text_mask[rows, slot] = 1
    return text_feats, text_mask, slot


@dataclass(frozen=True)
class FusionInputs:
    """Everything one fusion pass reads; :meth:`MemBridgeFusion.fuse` turns it into the sequence.

    ``frame_feats [B, T, D]`` and ``video_mask [B, T]``: the videos' CLIP frame features; ``text_feats [B, L, D]`` /
    ``text_mask [B, L]``: the text slots, taken as given (MLM zeroes the masked slots, PLM the slots after the
    prefix, QA appends the answer slot); ``t_eot [B, D]``: the text feature of the memory query. ``mode`` (one of
    :data:`FUSION_MODES`) selects the attention and positional rules:

    - ``vtm`` / ``eval`` / ``mlm``: bidirectional text; no positional embedding at ``v_sep`` and the text's EOT
      (under ``official_quirks``, Q1: ``vtm`` / ``eval`` move the first exemption from ``v_sep`` to bridge 0);
    - ``plm``: causal text, bridge rows see text slots ``0 .. plm_prefix+1`` (``plm_prefix``: an int or ``[B]``),
      only ``v_sep`` exempt; under ``official_quirks`` (Q3) the video tokens are detached;
    - ``qa``: the text slots are a question followed by one answer slot (the last valid slot, see
      :meth:`for_question`); bidirectional; no positional embedding at ``v_sep`` and the question's EOT (the slot
      before the answer slot); ``official_quirks`` does not apply (there is no published QA code);
    - ``lm``: one teacher-forced causal pass (``plm_mode single_pass``, T2VLP): causal text, video and extra rows do
      not see text, text slot ``j`` predicts token ``j+1`` (joint attention only).

    ``extra_tokens [B, K, D]``: the video-only tokens between video and text (T2VLP tubes, ``bridge_source tube``;
    STOA trajectories + actions, ``object``); None for memory / learned bridges, which the fusion computes itself.
    ``extra_mask [B, K]`` (nonzero = real; None = all real): the extra tokens to hide as key padding in every mode
    (STOA's empty trajectory slots); it travels with the video like ``extra_tokens``. Under
    ``positional == "all"`` every slot gets its positional embedding (no exemption).
    """

    frame_feats: torch.Tensor
    video_mask: torch.Tensor
    text_feats: torch.Tensor
    text_mask: torch.Tensor
    t_eot: torch.Tensor
    mode: FusionMode = "vtm"
    plm_prefix: int | torch.Tensor | None = None
    extra_tokens: torch.Tensor | None = None
    extra_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {self.mode!r}; expected one of {FUSION_MODES}")
        if (self.mode == "plm") != (self.plm_prefix is not None):
            raise ValueError("plm_prefix is required in mode 'plm' and only there")
        b, t = self.video_mask.shape
        expected = {
            "frame_feats": (b, t),
            "text_feats": (b, self.text_mask.shape[1]),
            "text_mask": (b,),
            "t_eot": (b,),
        }
        if self.extra_tokens is not None:
            expected["extra_tokens"] = (b,)
        if self.extra_mask is not None:
            if self.extra_tokens is None:
                raise ValueError("FusionInputs.extra_mask is given without extra_tokens")
            expected["extra_mask"] = tuple(self.extra_tokens.shape[:2])
        for name, lead in expected.items():
            shape = tuple(getattr(self, name).shape)
            if shape[: len(lead)] != lead:
                raise ValueError(f"FusionInputs.{name} has shape {shape}; expected it to start with {lead}")

    @classmethod
    def prefix_lm(
        cls,
        frame_feats: torch.Tensor,
        video_mask: torch.Tensor,
        token_feats: torch.Tensor,
        text_mask: torch.Tensor,
        prefix: torch.Tensor,
        probe: torch.Tensor,
        extra_tokens: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> FusionInputs:
        """Rows of the prefix LM: text slots ``0 .. prefix[r]`` hold ``token_feats``, later slots only their
        positional embedding (zero features), ``probe [R, D]`` (the EOT feature of ``[SOT, w1 .. wi, EOT]``) is the
        memory query; slot ``prefix[r] + 1`` predicts the next token (DESIGN 2.6)."""
        slots = torch.arange(token_feats.shape[1], device=token_feats.device).unsqueeze(0)
        text_in = token_feats.masked_fill((slots > prefix.unsqueeze(1)).unsqueeze(-1), 0.0)
        return cls(
            frame_feats, video_mask, text_in, text_mask, probe, mode="plm", plm_prefix=prefix,
            extra_tokens=extra_tokens, extra_mask=extra_mask,
        )  # fmt: skip

    @classmethod
    def for_question(
        cls,
        frame_feats: torch.Tensor,
        video_mask: torch.Tensor,
        question_feats: torch.Tensor,
        question_mask: torch.Tensor,
        question_eot: torch.Tensor,
        extra_tokens: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> FusionInputs:
        """The QA pass ``[frames | v_sep | bridges | question | answer slot]`` (:func:`with_answer_slot`)."""
        text_feats, text_mask, _ = with_answer_slot(question_feats, question_mask)
        return cls(
            frame_feats, video_mask, text_feats, text_mask, question_eot, mode="qa", extra_tokens=extra_tokens,
            extra_mask=extra_mask,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The fusion encoder
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ObjectiveOutput:
    """Logits of one stage-2 objective, its targets and the details of its fusion pass (:meth:`fuse`)."""

    logits: torch.Tensor  # [R, C]
    targets: torch.Tensor  # [R]
    details: dict[str, torch.Tensor]

    def loss_and_accuracy(self) -> tuple[torch.Tensor, torch.Tensor]:
        return cross_entropy_and_accuracy(self.logits, self.targets)


class MemBridgeFusion(nn.Module):
    """Fusion transformer with bridge tokens, the memory bank, the tied vocabulary head and the VTM head."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.config = config
        d, k = config.width, config.num_bridge_tokens
        scale = d**-0.5
        self.transformer = Transformer(d, config.layers, config.num_heads)
        self.positional_embedding = nn.Parameter(torch.randn(config.context_length, d) * POSITIONAL_INIT_STD)
        if config.bridge_source == "memory":
            self.memory = nn.Parameter(torch.randn(config.memory_size, d) * scale)  # [S, D]
            self.query = nn.Parameter(torch.randn(k, 2 * d, d) * scale)  # [K, 2D, D]
            self.ln = LayerNorm(2 * d)
        elif config.bridge_source == "learned":
            self.learned_bridges = nn.Parameter(torch.randn(k, d) * scale)  # [K, D]
        # bridge_source "tube": the tokens come with the inputs (FusionInputs.extra_tokens), no parameters here
        self.vocab_proj = nn.Parameter(torch.randn(d, d) * scale)  # P
        self.vocab_bias = nn.Parameter(torch.zeros(config.vocab_size))  # b [V]
        self.match_matrix = nn.Parameter(torch.randn(d, d) * scale)  # M
        self.unmatch_matrix = nn.Parameter(torch.randn(d, d) * scale)  # U
        self.head_dropout = nn.Dropout(config.dropout)

    @property
    def num_bridges(self) -> int:
        return self.config.num_bridges

    def text_offset(self, num_frames: int) -> int:
        """Sequence index of text slot 0 for ``num_frames`` frames."""
        return num_frames + 1 + self.num_bridges

    def vsep_index(self, num_frames: int) -> int:
        """Sequence index of ``v_sep``: 0 with ``vsep_first`` (T2VLP), else right after the frames."""
        return 0 if self.config.vsep_first else num_frames

    @property
    def video_token_source(self) -> bool:
        """True when the extra tokens come with the inputs (``FusionInputs.extra_tokens``), e.g. T2VLP tubes."""
        return self.config.bridge_source in VIDEO_TOKEN_SOURCES

    @torch.no_grad()
    def init_from_clip(self, clip: nn.Module) -> None:
        """Copy CLIP text blocks ``0 .. layers-1`` and the text positional embedding (the published init)."""
        check_fusion_matches_clip(self.config, clip)
        for block, source in zip(self.transformer.resblocks, clip.transformer.resblocks, strict=False):
            block.load_state_dict(source.state_dict())
        rows = min(self.positional_embedding.shape[0], clip.positional_embedding.shape[0])
        self.positional_embedding[:rows].copy_(clip.positional_embedding[:rows])
        if rows < self.config.seq_len:
            logger.warning("CLIP has %d text positions; fusion positions %d.. keep their random init", rows, rows)

    # -- bridge tokens --------------------------------------------------------------------------------------------

    def memory_read(self, v_sep: torch.Tensor, t_eot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bridge tokens ``[B, K, D]`` and, with the memory bank, the read attention ``[B, K, S]`` (else None).

        ``q0 = ln([v_sep ; t_eot])`` (detached inputs), ``q_k = q0 @ query[k]``,
        ``attention_k = softmax(q_k @ memory^T)``, ``bridge_k = attention_k @ memory``.
        """
        b = v_sep.shape[0]
        if self.config.bridge_source == "none":
            return v_sep.new_zeros(b, 0, v_sep.shape[-1]), None
        if self.video_token_source:
            raise ValueError(f"bridge_source {self.config.bridge_source!r} tokens come with FusionInputs.extra_tokens")
        if self.config.bridge_source == "learned":
            return self.learned_bridges.unsqueeze(0).expand(b, -1, -1), None
        q0 = self.ln(torch.cat([v_sep.detach(), t_eot.detach()], dim=-1)).to(self.query.dtype)  # [B, 2D]
        queries = torch.einsum("bc,kcd->bkd", q0, self.query)  # [B, K, D]
        weights = (queries @ self.memory.t()).softmax(-1)  # [B, K, S]
        return weights @ self.memory, weights

    def bridge_tokens(self, v_sep: torch.Tensor, t_eot: torch.Tensor) -> torch.Tensor:
        """Bridge tokens ``[B, K, D]`` of each (video, text) pair (:meth:`memory_read` without the attention)."""
        return self.memory_read(v_sep, t_eot)[0]

    # -- the fusion pass ------------------------------------------------------------------------------------------

    def _positional_keep(self, inputs: FusionInputs) -> torch.Tensor:
        """``[B, N]``: 1 where the positional embedding is added, 0 at the exempt positions of ``inputs.mode``."""
        video_mask, text_mask, mode = inputs.video_mask, inputs.text_mask, inputs.mode
        b, t = video_mask.shape
        n = self.text_offset(t) + text_mask.shape[1]
        keep = torch.ones(b, n, device=video_mask.device)
        if self.config.positional == "all":
            return keep
        quirk_q1 = self.config.official_quirks and mode in ("vtm", "eval") and not self.config.vsep_first
        keep[:, t + 1 if quirk_q1 else self.vsep_index(t)] = 0.0
        if mode not in ("plm", "lm"):
            eot = self.text_offset(t) + eot_positions(text_mask) - (1 if mode == "qa" else 0)
            keep[torch.arange(b, device=keep.device), eot] = 0.0
        return keep

    def fuse(
        self, inputs: FusionInputs, return_details: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Build the fusion sequence of ``inputs`` and run the transformer; returns hidden states ``[B, N, D]``.

        This is the one place the sequence ``[frames | v_sep | bridges | text slots]``, its positional rule and its
        attention mask are built (see :class:`FusionInputs` for the modes). With ``return_details`` it returns
        ``(hidden, details)`` with the keys

        - ``fusion_inputs [B, N, D]``: the sequence entering the transformer (positional embedding added);
        - ``attention_mask [B, 1, N, N]``: its additive mask (0 visible, ``-inf`` hidden);
        - ``memory_attention [B, K, S]``: the memory-read attention of the bridge tokens (memory bridges only).
        """
        hidden, details = self._fuse(inputs)
        return (hidden, details) if return_details else hidden

    def _fuse(self, inputs: FusionInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`fuse` with its details."""
        x, mask, details = self._sequence(inputs)
        return self.transformer(x, mask), details

    def _sequence(self, inputs: FusionInputs) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The transformer's input ``x [B, N, D]``, its additive mask ``[B, 1, N, N]`` and the details of
        :meth:`fuse` (everything :meth:`fuse` does before the transformer)."""
        t = inputs.frame_feats.shape[1]
        frame_feats = inputs.frame_feats
        if inputs.mode == "lm" and self.config.attention != "joint":
            raise ValueError("the single-pass 'lm' mode needs attention 'joint' (FusionConfig.attention)")
        v_sep = video_sep_token(frame_feats, inputs.video_mask)
        if self.video_token_source:
            if inputs.extra_tokens is None or inputs.extra_tokens.shape[1] != self.num_bridges:
                got = None if inputs.extra_tokens is None else tuple(inputs.extra_tokens.shape)
                raise ValueError(
                    f"bridge_source {self.config.bridge_source!r} needs FusionInputs.extra_tokens [B, "
                    f"{self.num_bridges}, D] (the video's tokens); got {got}"
                )
            bridges, memory_attention = inputs.extra_tokens, None
        else:
            bridges, memory_attention = self.memory_read(v_sep, inputs.t_eot)
        text_feats = inputs.text_feats.to(frame_feats.dtype)
        video = [v_sep.unsqueeze(1), frame_feats] if self.config.vsep_first else [frame_feats, v_sep.unsqueeze(1)]
        x = torch.cat([*video, bridges.to(frame_feats.dtype), text_feats], dim=1)
        keep = self._positional_keep(inputs).to(x.dtype)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype) * keep.unsqueeze(-1)
        if inputs.mode == "plm" and self.config.official_quirks:
            x = torch.cat([x[:, : t + 1].detach(), x[:, t + 1 :]], dim=1)
        mask = fusion_attention_mask(
            inputs.video_mask, inputs.text_mask, self.num_bridges, inputs.mode in ("plm", "lm"), inputs.plm_prefix,
            self.config.attention, self.config.vsep_first, inputs.extra_mask,
        ).to(x.dtype)  # fmt: skip
        details = {"fusion_inputs": x, "attention_mask": mask}
        if memory_attention is not None:
            details["memory_attention"] = memory_attention
        return x, mask, details

    # -- heads ----------------------------------------------------------------------------------------------------

    def vocab_weight(self, token_embedding: torch.Tensor) -> torch.Tensor:
        """``P @ E_tok^T [D, V]`` of the tied vocabulary head (compute once per batch or decode)."""
        return self.vocab_proj @ token_embedding.t().to(self.vocab_proj.dtype)

    def vocab_logits(
        self, hidden: torch.Tensor, token_embedding: torch.Tensor | None = None, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tied vocabulary head ``dropout(h) @ (P @ E_tok^T) + b`` ``[..., V]``; give ``token_embedding`` (then
        ``P @ E_tok^T`` is computed once for this call) or a precomputed :meth:`vocab_weight`."""
        if (token_embedding is None) == (weight is None):
            raise ValueError("vocab_logits needs exactly one of token_embedding and weight")
        weight = self.vocab_weight(token_embedding) if weight is None else weight
        return self.head_dropout(hidden) @ weight.to(hidden.dtype) + self.vocab_bias.to(hidden.dtype)

    def vtm_logits(
        self,
        h_vsep: torch.Tensor,
        h_eot: torch.Tensor,
        group_size: int | None = None,
        intended_norm: bool = False,
    ) -> torch.Tensor:
        """Bilinear matching logits ``[R, 2]`` = ``[unmatch, match]`` from the fused ``v_sep`` / EOT ``[R, D]``.

        Both inputs are L2-normalised (under ``official_quirks`` the text over the row axis of each group of
        ``group_size`` consecutive rows, default all rows: Q2; ``intended_norm=True`` normalises every text vector
        by itself whatever ``official_quirks`` says); each bilinear form draws its own dropout masks.
        """
        v = h_vsep / h_vsep.norm(dim=-1, keepdim=True)
        if self.config.official_quirks and not intended_norm:
            rows, d = h_eot.shape
            grouped = h_eot.reshape(-1, group_size or rows, d)
            t = (grouped / grouped.norm(dim=1, keepdim=True)).reshape(rows, d)
        else:
            t = h_eot / h_eot.norm(dim=-1, keepdim=True)
        drop = self.head_dropout
        match = ((drop(v) @ self.match_matrix.to(v.dtype)) * drop(t)).sum(-1)
        unmatch = ((drop(v) @ self.unmatch_matrix.to(v.dtype)) * drop(t)).sum(-1)
        return torch.stack([unmatch, match], dim=-1)

    def _match(
        self, inputs: FusionInputs, group_size: int | None, intended_norm: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden, details = self._fuse(inputs)
        t = inputs.frame_feats.shape[1]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h_eot = hidden[rows, self.text_offset(t) + eot_positions(inputs.text_mask)]
        return self.vtm_logits(hidden[:, self.vsep_index(t)], h_eot, group_size, intended_norm), details

    def match_logits(
        self,
        frame_feats: torch.Tensor,
        video_mask: torch.Tensor,
        text_feats: torch.Tensor,
        text_mask: torch.Tensor,
        t_eot: torch.Tensor,
        group_size: int | None = None,
        intended_norm: bool = False,
        return_details: bool = False,
        extra_tokens: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """VTM logits ``[R, 2]`` of ``R`` (video, text) pairs (the VTM / evaluation fusion path; ``group_size`` and
        ``intended_norm`` as in :meth:`vtm_logits`); ``return_details`` adds the details of :meth:`fuse`;
        ``extra_tokens [R, K, D]`` / ``extra_mask [R, K]``: the videos' own tokens (T2VLP tubes, STOA objects)."""
        inputs = FusionInputs(
            frame_feats, video_mask, text_feats, text_mask, t_eot, mode="vtm", extra_tokens=extra_tokens,
            extra_mask=extra_mask,
        )  # fmt: skip
        logits, details = self._match(inputs, group_size, intended_norm)
        return (logits, details) if return_details else logits

    def pair_match_fn(
        self,
        frame_feats: torch.Tensor,
        video_mask: torch.Tensor,
        text_feats: torch.Tensor,
        text_mask: torch.Tensor,
        t_eot: torch.Tensor,
        extra_tokens: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``match_prob(text_idx [Q, k], video_idx [Q, k]) -> p_match [Q, k]`` over cached features, for
        :func:`rerank` (videos: ``frame_feats [Nv, T, D]``, ``video_mask``, ``extra_tokens [Nv, K, D]`` for a
        video-token source, with ``extra_mask [Nv, K]`` when some are empty; texts: ``text_feats [Nt, L, D]``,
        ``text_mask``, ``t_eot [Nt, D]``)."""

        def match_prob(text_idx: torch.Tensor, video_idx: torch.Tensor) -> torch.Tensor:
            ti, vi = text_idx.reshape(-1), video_idx.reshape(-1)
            extra = None if extra_tokens is None else extra_tokens[vi]
            extra_visible = None if extra_mask is None else extra_mask[vi]
            logits = self.match_logits(
                frame_feats[vi], video_mask[vi], text_feats[ti], text_mask[ti], t_eot[ti], group_size=text_idx.shape[1],
                extra_tokens=extra, extra_mask=extra_visible,
            )  # fmt: skip
            return logits.float().softmax(-1)[:, 1].reshape(text_idx.shape)

        return match_prob

    def next_token_logits(
        self, inputs: FusionInputs, weight: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Prefix-LM readout of a ``plm`` pass: vocabulary logits ``[R, V]`` at text slot ``plm_prefix + 1`` of each
        row (``weight``: :meth:`vocab_weight`), and the details of the pass. Training (:meth:`plm_objective`) and
        caption decoding both score tokens through it."""
        if inputs.mode != "plm":
            raise ValueError(f"next_token_logits needs a 'plm' pass, got mode {inputs.mode!r}")
        hidden, details = self._fuse(inputs)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        prefix = torch.as_tensor(inputs.plm_prefix, device=hidden.device).expand(hidden.shape[0])
        out = hidden[rows, self.text_offset(inputs.frame_feats.shape[1]) + prefix + 1]
        return self.vocab_logits(out, weight=weight), details

    def vocab_logits_factored(self, hidden: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        """:meth:`vocab_logits` as ``(dropout(h) @ P) @ E_tok^T + b``, without forming ``P @ E_tok^T`` (``D x D x V``
        multiply-adds): cheaper whenever fewer than ``V`` rows are scored with one weight, as in a decode (steps x
        beams x videos rows). Equal to float tolerance."""
        h = self.head_dropout(hidden) @ self.vocab_proj.to(hidden.dtype)
        return h @ token_embedding.t().to(hidden.dtype) + self.vocab_bias.to(hidden.dtype)

    def next_token_logits_pruned(self, inputs: FusionInputs, token_embedding: torch.Tensor) -> torch.Tensor:
        """:meth:`next_token_logits` (logits ``[R, V]`` only) through :func:`transformer_rows` (the layers run only
        where the read-out slots depend on them) and :meth:`vocab_logits_factored`: caption decoding's fast path,
        equal to float tolerance."""
        if inputs.mode != "plm":
            raise ValueError(f"next_token_logits_pruned needs a 'plm' pass, got mode {inputs.mode!r}")
        x, mask, _ = self._sequence(inputs)
        prefix = torch.as_tensor(inputs.plm_prefix, device=x.device).expand(x.shape[0])
        slots = self.text_offset(inputs.frame_feats.shape[1]) + prefix + 1
        unique, which = slots.unique(return_inverse=True)
        hidden = transformer_rows(self.transformer, x, mask, unique)
        out = hidden[torch.arange(x.shape[0], device=x.device), which]
        return self.vocab_logits_factored(out, token_embedding)

    # -- objectives -----------------------------------------------------------------------------------------------

    def vtm_objective(
        self,
        frame_feats: torch.Tensor,
        video_mask: torch.Tensor,
        text_feats: torch.Tensor,
        text_mask: torch.Tensor,
        t_eot: torch.Tensor,
        local_index: torch.Tensor,
        neg_video: torch.Tensor,
        neg_text: torch.Tensor,
        extra_tokens: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """Video-text matching over ``3b`` pairs: positives, text->video and video->text hard negatives.

        Features are those of the (gathered) pool; ``local_index [b]`` are this rank's pairs and
        ``neg_video`` / ``neg_text [b]`` the sampled negatives (pool indices). Logits ``[3b, 2]``, targets 1 for
        the ``b`` positives (first) and 0 for the negatives; the details add ``video_index`` / ``text_index
        [3b]`` (the pool rows of each pair).
        """
        video_idx = torch.cat([local_index, neg_video, local_index])
        text_idx = torch.cat([local_index, local_index, neg_text])
        extra = None if extra_tokens is None else extra_tokens[video_idx]  # video-only tokens travel with the video,
        extra_visible = None if extra_mask is None else extra_mask[video_idx]  # and so does their mask
        inputs = FusionInputs(
            frame_feats[video_idx], video_mask[video_idx], text_feats[text_idx], text_mask[text_idx], t_eot[text_idx],
            extra_tokens=extra, extra_mask=extra_visible,
        )  # fmt: skip
        logits, details = self._match(inputs, group_size=None, intended_norm=False)
        targets = torch.zeros(video_idx.shape[0], dtype=torch.long, device=logits.device)
        targets[: local_index.shape[0]] = 1
        return ObjectiveOutput(logits, targets, {**details, "video_index": video_idx, "text_index": text_idx})

    def vtm_loss(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, accuracy)`` of :meth:`vtm_objective` (same arguments)."""
        return self.vtm_objective(*args).loss_and_accuracy()

    def mlm_objective(
        self,
        frame_feats: torch.Tensor,
        video_mask: torch.Tensor,
        masked_text_feats: torch.Tensor,
        text_mask: torch.Tensor,
        masked_t_eot: torch.Tensor,
        labels: torch.Tensor,
        token_embedding: torch.Tensor,
        extra_tokens: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """Masked language modelling; ``masked_text_feats`` / ``masked_t_eot`` encode the masked ids.

        The masked fusion slots hold a zero vector (plus their positional embedding). Logits ``[M, V]`` of the
        ``M`` masked positions (row-major), targets their labels.
        """
        masked = labels != IGNORE_INDEX
        text_in = masked_text_feats.masked_fill(masked.unsqueeze(-1), 0.0)
        inputs = FusionInputs(
            frame_feats, video_mask, text_in, text_mask, masked_t_eot, mode="mlm", extra_tokens=extra_tokens,
            extra_mask=extra_mask,
        )  # fmt: skip
        hidden, details = self._fuse(inputs)
        h_text = hidden[:, self.text_offset(frame_feats.shape[1]) :]
        return ObjectiveOutput(self.vocab_logits(h_text[masked], token_embedding), labels[masked], details)

    def mlm_loss(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, accuracy)`` of :meth:`mlm_objective` (same arguments)."""
        return self.mlm_objective(*args).loss_and_accuracy()

    def plm_objective(
        self,
        frame_feats: torch.Tensor,
        video_mask: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        starts: torch.Tensor,
        token_feats: torch.Tensor,
        probe_feats: torch.Tensor,
        prefixes: torch.Tensor,
        token_embedding: torch.Tensor,
        extra_tokens: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """Prefix LM in one batched fusion pass over the ``R`` (sample, prefix) rows that carry loss.

        ``token_feats [B, L, D]`` / ``probe_feats [B, P, D]`` come from :func:`encode_text_with_probes` with the
        sorted ``prefixes [P]`` of :func:`plm_targets`. Row (b, i) holds the prefix features in text slots
        ``0 .. i``, only positional embeddings after, the EOT-after-prefix feature as memory query, and predicts
        token ``i+1`` at slot ``i+1`` (:meth:`FusionInputs.prefix_lm`, :meth:`next_token_logits`). Equals the
        per-prefix loop of :func:`modules.reference.plm_loss_loop`. Logits ``[R, V]``; the details add ``rows``
        and ``prefix [R]``.
        """
        rows, prefix, targets = plm_targets(text_ids, text_mask, starts)
        t_eot = probe_feats[rows, torch.searchsorted(prefixes, prefix)]
        extra = None if extra_tokens is None else extra_tokens[rows]
        extra_visible = None if extra_mask is None else extra_mask[rows]
        inputs = FusionInputs.prefix_lm(
            frame_feats[rows], video_mask[rows], token_feats[rows], text_mask[rows], prefix, t_eot, extra, extra_visible
        )
        logits, details = self.next_token_logits(inputs, self.vocab_weight(token_embedding))
        return ObjectiveOutput(logits, targets, {**details, "rows": rows, "prefix": prefix})

    def single_pass_lm_objective(
        self,
        frame_feats: torch.Tensor,
        video_mask: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        starts: torch.Tensor,
        token_feats: torch.Tensor,
        t_eot: torch.Tensor,
        token_embedding: torch.Tensor,
        extra_tokens: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """Prefix LM as one teacher-forced causal pass per text (``plm_mode single_pass``, T2VLP's PLM).

        ``token_feats [B, L, D]``: the unmasked causal text features (slot ``j`` depends on tokens ``<= j``); text
        slot ``j`` predicts token ``j+1`` for the scored tokens ``starts[b] .. eot[b]`` (:func:`plm_targets`).
        Logits ``[R, V]``; the details add ``rows`` and ``prefix [R]`` (the reading slot = target position - 1).
        """
        rows, prefix, targets = plm_targets(text_ids, text_mask, starts)
        inputs = FusionInputs(
            frame_feats, video_mask, token_feats, text_mask, t_eot, mode="lm", extra_tokens=extra_tokens,
            extra_mask=extra_mask,
        )  # fmt: skip
        hidden, details = self._fuse(inputs)
        out = hidden[rows, self.text_offset(frame_feats.shape[1]) + prefix]
        logits = self.vocab_logits(out, weight=self.vocab_weight(token_embedding))
        return ObjectiveOutput(logits, targets, {**details, "rows": rows, "prefix": prefix})

    def plm_loss(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, accuracy)`` of :meth:`plm_objective` (same arguments)."""
        return self.plm_objective(*args).loss_and_accuracy()


def check_fusion_matches_clip(config: FusionConfig, clip: nn.Module) -> None:
    """The fusion runs on CLIP text-encoder outputs at the text width: embed dim == text width == fusion width."""
    text_width = clip.transformer.width
    embed_dim = clip.text_projection.shape[1]
    vocab = clip.token_embedding.weight.shape[0]
    problems = []
    if not config.width == text_width == embed_dim:
        problems.append(
            f"fusion width {config.width}, CLIP text width {text_width} and embed dim {embed_dim} must be equal "
            "(the fusion blocks are CLIP text blocks fed with projected features)"
        )
    if config.layers > len(clip.transformer.resblocks):
        problems.append(f"fusion layers {config.layers} > CLIP text layers {len(clip.transformer.resblocks)}")
    if config.vocab_size != vocab:
        problems.append(f"fusion vocab_size {config.vocab_size} != CLIP vocabulary {vocab}")
    if problems:
        raise ConfigError("fusion config does not match CLIP: " + "; ".join(problems) + "; fix the fusion JSON")
