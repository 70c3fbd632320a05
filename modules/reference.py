"""Plain loop references of the fusion's fast paths, for tests and benches only (STYLE rule 8).

Nothing in training, evaluation or decoding imports this module: each function here is the slow, obviously
correct transcription of DESIGN.md that a batched production path (in :mod:`modules.fusion`) is tested and
benchmarked against.
"""

from __future__ import annotations

import torch

from modules.fusion import FusionInputs, MemBridgeFusion, TextEncoder, cross_entropy_and_accuracy, eot_positions


def plm_loss_loop(
    fusion: MemBridgeFusion,
    text_encoder: TextEncoder,
    frame_feats: torch.Tensor,
    video_mask: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    starts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference prefix LM: the plain per-prefix loop of DESIGN §2.6 (one text and one fusion pass per prefix).

    For every prefix ``i`` it encodes ``[SOT, w1 .. wi, EOT]``, fuses all samples and scores slot ``i+1``
    (recomputing ``P @ E_tok^T`` each time, as published); the suffix from ``starts`` is then scored. Equals
    :meth:`MemBridgeFusion.plm_loss` (loss, accuracy and gradients). Returns ``(loss, accuracy)``.
    """
    b, length = text_ids.shape
    d = frame_feats.shape[-1]
    token_embedding = text_encoder.token_embedding.weight
    eot_id = torch.full((b, 1), fusion.config.eot_token_id, dtype=text_ids.dtype, device=text_ids.device)
    scores = []
    for i in range(length - 1):
        with torch.no_grad():
            feats = text_encoder.encode_text_tokens(torch.cat([text_ids[:, : i + 1], eot_id], dim=1))
        text_in = feats.new_zeros(b, length, d)
        text_in[:, : i + 1] = feats[:, : i + 1]
        inputs = FusionInputs(frame_feats, video_mask, text_in, text_mask, feats[:, i + 1], mode="plm", plm_prefix=i)
        hidden = fusion.fuse(inputs)
        scores.append(fusion.vocab_logits(hidden[:, fusion.text_offset(frame_feats.shape[1]) + i + 1], token_embedding))
    scores = torch.stack(scores, dim=1)  # [B, L-1, V]: scores[:, i] predicts token i+1
    eot = eot_positions(text_mask)
    picked = [scores[row, starts[row] - 1 : eot[row]] for row in range(b)]
    targets = [text_ids[row, starts[row] : eot[row] + 1] for row in range(b)]
    return cross_entropy_and_accuracy(torch.cat(picked), torch.cat(targets))
