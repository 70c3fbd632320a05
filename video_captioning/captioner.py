"""Caption generation through the MemBridge fusion in prefix-LM mode (DESIGN 2.6-2.7).

At step ``i`` a hypothesis holds the prefix ``[SOT, w1 .. wi]``. The fusion sequence is
``[frames | v_sep | bridges | text slots 0 .. i+1]``: slots ``0 .. i`` hold the CLIP text features of the prefix,
slot ``i+1`` only its positional embedding, and the hidden state there, through the tied vocabulary head, scores
token ``i+1``. The bridge tokens are read from the memory with ``v_sep`` and the EOT feature of
``[SOT, w1 .. wi, EOT]``. This is exactly the row ``(b, i)`` of the training objective ``MemBridgeFusion.plm_loss``:
the text block is causal, bridge rows see text slots ``0 .. i+1`` only and video rows no text, so the slots after
``i+1`` that training carries change nothing and are left out.

What is reused, and what cannot be: the frame features are encoded once per video, and beam search scores
``[SOT]`` once per video before expanding to the beams; videos x beams run as one batch. With ``use_cache`` (the
default) the CLIP text encoder keeps the per-layer keys/values of the prefix (:mod:`modules.incremental_text`), so a
step encodes only the new token and the EOT probe. The fusion cannot be cached across steps: the bridge tokens are
read with the probe, so they change every step, and every row downstream of them does too (video rows see bridge
columns from layer 1 on, text rows from layer 0). What the cached path still saves in the fusion is what the scored
slot never reads (:meth:`MemBridgeFusion.next_token_logits_pruned`: the last layer runs one query over bridge + text
keys, the one before skips the video rows' outputs), and it never forms ``P @ E_tok^T [D, V]``: the head is applied
factored (``D x D x V`` multiply-adds saved per decode). ``use_cache=False`` re-encodes ``[SOT, w1 .. wi]`` and
``[SOT, w1 .. wi, EOT]`` with ``encode_text_tokens`` at every step and runs the full training read-out
(:meth:`MemBridgeFusion.next_token_logits`): the plain reference the fast path is tested against (same tokens, logits
to float tolerance).

The methods' video-only tokens (T2VLP tubes, STOA trajectory + action tokens: ``video_tokens [B, K, D]``) depend on
the video alone: they are computed once per video before decoding and every step and beam indexes them by its row's
video (``video_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modules.fusion import FusionInputs, MemBridgeFusion
from modules.incremental_text import TextKVCache, extend_text_cache
from modules.membridge import MemBridgeModel
from video_captioning.decoding import DEFAULT_LENGTH_PENALTY, SOT_ID, beam_search, greedy_decode


@dataclass(frozen=True)
class CaptionState:
    """Decoder state, one row per hypothesis (``N`` = videos x beams).

    ``video_rows [N]``: the video of each row (index into the captioner's frame features); ``token_feats
    [N, t, D]``: CLIP text features of the prefix; ``cache``: the text encoder's keys/values of the prefix (None on
    the uncached path, which re-encodes from the tokens).
    """

    video_rows: torch.Tensor
    token_feats: torch.Tensor
    cache: TextKVCache | None

    def index_select(self, index: torch.Tensor) -> CaptionState:
        """Rows ``index`` (``reorder_fn`` of :mod:`video_captioning.decoding`)."""
        cache = None if self.cache is None else self.cache.index_select(index)
        return CaptionState(self.video_rows[index], self.token_feats[index], cache)


def reorder_state(state: CaptionState, index: torch.Tensor) -> CaptionState:
    """``reorder_fn`` of the decoders: follow beams, drop finished rows."""
    return state.index_select(index)


class FusionCaptioner:
    """``step_fn`` / ``reorder_fn`` / ``initial_state`` of the decoders for one batch of videos.

    ``frame_feats [B, T, D]`` and ``video_mask [B, T]`` are the videos' CLIP frame features. The model should be in
    eval mode (the vocabulary head's dropout is applied as the module says).
    """

    def __init__(
        self,
        model: MemBridgeModel,
        frame_feats: torch.Tensor,
        video_mask: torch.Tensor,
        use_cache: bool = True,
        video_tokens: torch.Tensor | None = None,
        video_token_mask: torch.Tensor | None = None,
    ) -> None:
        if model.fusion is None:
            raise ValueError("captioning needs a MemBridgeModel with a fusion encoder")
        self.fusion: MemBridgeFusion = model.fusion
        self.clip = model.encoder.clip
        self.frame_feats = frame_feats
        self.video_mask = video_mask
        self.video_tokens = video_tokens  # [B, K, D] T2VLP tubes / STOA objects, None otherwise
        self.video_token_mask = video_token_mask  # [B, K] STOA: False at empty trajectory slots; None: all real
        self.use_cache = use_cache
        self.eot_id = self.fusion.config.eot_token_id
        # The plain path reads out as training does (P @ E_tok^T [D, V], once per decode); the cached path never
        # forms it (vocab_logits_factored: a decode scores far fewer than V rows).
        self.vocab_weight = None if use_cache else self.fusion.vocab_weight(self.clip.token_embedding.weight)

    @property
    def batch_size(self) -> int:
        return self.frame_feats.shape[0]

    def initial_state(self) -> CaptionState:
        """One row per video, empty prefix (the decoders feed SOT as the first token)."""
        b, d = self.batch_size, self.frame_feats.shape[-1]
        device = self.frame_feats.device
        cache = TextKVCache.empty(self.clip, b, device) if self.use_cache else None
        feats = torch.zeros(b, 0, d, dtype=self.clip.dtype, device=device)
        return CaptionState(torch.arange(b, device=device), feats, cache)

    def step(self, tokens: torch.Tensor, state: CaptionState) -> tuple[torch.Tensor, CaptionState]:
        """``step_fn``: next-token log-probabilities ``[N, V]`` of the prefixes ``tokens [N, t]``."""
        if state.cache is None:
            eot = torch.full_like(tokens[:, :1], self.eot_id)
            token_feats = self.clip.encode_text_tokens(tokens)
            probe = self.clip.encode_text_tokens(torch.cat([tokens, eot], dim=1))[:, -1]
            cache = None
        else:
            if state.cache.length + 1 != tokens.shape[1]:
                raise ValueError(
                    f"the text cache holds {state.cache.length} positions but the prefix has {tokens.shape[1]} "
                    "tokens: step_fn must be called once per appended token"
                )
            feat, probe, cache = extend_text_cache(self.clip, state.cache, tokens[:, -1], self.eot_id)
            token_feats = torch.cat([state.token_feats, feat.unsqueeze(1)], dim=1)
        logits = self.next_token_logits(state.video_rows, token_feats, probe, pruned=state.cache is not None)
        return F.log_softmax(logits.float(), dim=-1), CaptionState(state.video_rows, token_feats, cache)

    def next_token_logits(
        self, video_rows: torch.Tensor, token_feats: torch.Tensor, eot_probe: torch.Tensor, pruned: bool = False
    ) -> torch.Tensor:
        """Vocabulary logits ``[N, V]`` of slot ``i+1`` given the prefix features ``[N, i+1, D]``: the rows of
        :meth:`MemBridgeFusion.plm_objective`, through the same :meth:`FusionInputs.prefix_lm` and
        :meth:`MemBridgeFusion.next_token_logits`. Under ``plm_mode single_pass`` (T2VLP) the prefix goes through
        one causal ``lm`` pass and its last slot predicts the next token, as in the single-pass training."""
        rows, prefix_len, d = token_feats.shape
        extra = None if self.video_tokens is None else self.video_tokens[video_rows]
        extra_mask = None if self.video_token_mask is None else self.video_token_mask[video_rows]
        if self.fusion.config.plm_mode == "single_pass":
            frames, vmask = self.frame_feats[video_rows], self.video_mask[video_rows]
            text_mask = torch.ones(rows, prefix_len, dtype=torch.long, device=token_feats.device)
            inputs = FusionInputs(
                frames, vmask, token_feats, text_mask, eot_probe, mode="lm", extra_tokens=extra, extra_mask=extra_mask
            )
            hidden = self.fusion.fuse(inputs)
            out = hidden[:, self.fusion.text_offset(frames.shape[1]) + prefix_len - 1]
            if self.vocab_weight is None:  # the cached path never forms P @ E_tok^T
                return self.fusion.vocab_logits_factored(out, self.clip.token_embedding.weight)
            return self.fusion.vocab_logits(out, weight=self.vocab_weight)
        text_in = torch.cat([token_feats, token_feats.new_zeros(rows, 1, d)], dim=1)  # slot i+1: position only
        text_mask = torch.ones(rows, prefix_len + 1, dtype=torch.long, device=token_feats.device)
        prefix = torch.full((rows,), prefix_len - 1, dtype=torch.long, device=token_feats.device)
        frames = self.frame_feats[video_rows]
        inputs = FusionInputs.prefix_lm(
            frames, self.video_mask[video_rows], text_in, text_mask, prefix, eot_probe, extra, extra_mask
        )
        if pruned:
            return self.fusion.next_token_logits_pruned(inputs, self.clip.token_embedding.weight)
        weight = self.vocab_weight
        if weight is None:
            weight = self.vocab_weight = self.fusion.vocab_weight(self.clip.token_embedding.weight)
        return self.fusion.next_token_logits(inputs, weight)[0]


@torch.no_grad()
def generate_captions(
    model: MemBridgeModel,
    frame_feats: torch.Tensor,
    video_mask: torch.Tensor,
    max_len: int,
    beam_size: int = 1,
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
    bos: int = SOT_ID,
    use_cache: bool = True,
    video_tokens: torch.Tensor | None = None,
    video_token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Caption tokens ``[B, <= max_len]`` (EOT included where produced, padded with 0) of ``B`` videos
    (``video_tokens [B, K, D]``: their T2VLP tubes or STOA trajectory + action tokens, computed once per video;
    ``video_token_mask [B, K]``: False at STOA's empty trajectory slots, hidden from the fusion).

    ``beam_size == 1`` is greedy search (the family default), otherwise beam search with ``length_penalty``.
    """
    captioner = FusionCaptioner(
        model, frame_feats, video_mask, use_cache, video_tokens=video_tokens, video_token_mask=video_token_mask
    )
    common = {
        "batch_size": captioner.batch_size,
        "bos": bos,
        "eos": captioner.eot_id,
        "max_len": max_len,
        "device": frame_feats.device,
    }
    if beam_size == 1:
        return greedy_decode(captioner.step, reorder_state, captioner.initial_state(), **common)
    tokens, _ = beam_search(
        captioner.step,
        reorder_state,
        captioner.initial_state(),
        beam_size=beam_size,
        length_penalty=length_penalty,
        **common,
    )
    return tokens
