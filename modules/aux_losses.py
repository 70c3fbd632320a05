"""Auxiliary losses of the sibling methods (``--method``): T2VLP's local alignment, STOA's matching loss.

``local_alignment`` (spec A.3): text queries ``Q [K, E]`` attend over every valid text position ``Z [B, L, E]``
(SOT and EOT included, padding hidden), ``text_center_k = softmax_L(Q_k Z^T) Z``, and the loss is the plain mean
squared error between the text centres and the tube tokens ``U [B, K, E]`` (no normalisation, no temperature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def text_centres(queries: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """``[B, K, E]``: each query's softmax-weighted mean of the valid text positions."""
    scores = torch.einsum("ke,ble->bkl", queries.to(text_tokens.dtype), text_tokens)
    scores = scores.masked_fill((text_mask == 0).unsqueeze(1), float("-inf"))
    return scores.softmax(-1) @ text_tokens


def local_alignment(
    queries: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor, tubes: torch.Tensor
) -> torch.Tensor:
    """MSE between :func:`text_centres` and the tube tokens ``tubes [B, K, E]`` (mean over all elements)."""
    return F.mse_loss(text_centres(queries, text_tokens, text_mask).float(), tubes.float())


# ---- STOA-VLP: dynamic object-text alignment + action set prediction (spec B.6.2) -----------------------------


def hungarian(scores: torch.Tensor, maximize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal one-to-one assignment of a ``[R, C]`` score matrix: ``(rows, cols)`` of ``min(R, C)`` pairs, rows
    ascending (``scipy.optimize.linear_sum_assignment``, exact)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(scores.detach().float().cpu().numpy(), maximize=maximize)
    as_long = {"dtype": torch.long, "device": scores.device}
    return torch.as_tensor(rows, **as_long), torch.as_tensor(cols, **as_long)


def matched_pairs(tokens: torch.Tensor, text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hungarian-matched ``(video side, text side)`` rows of one sample: ``S = softmax_text(tokens Z^T)`` (row softmax
    over the text words, S8), assignment maximising ``S`` (no gradient), ``min(n_tokens, n_words)`` pairs."""
    with torch.no_grad():
        scores = (tokens.float() @ text_tokens.float().t()).softmax(-1)
        rows, cols = hungarian(scores)
    return tokens[rows], text_tokens[cols]


def object_action_matching(
    trajectories: torch.Tensor,
    trajectory_valid: torch.Tensor,
    actions: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    noun_mask: torch.Tensor,
    verb_mask: torch.Tensor,
    eot_in_sets: bool = False,
    skip_actions_without_objects: bool = False,
    reduction: str = "mean",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """STOA's matching loss: per sample the valid trajectory tokens ``[2O, E]`` are Hungarian-matched to the noun
    token features and the action tokens ``[N_act, E]`` to the verb token features of ``text_tokens [B, L, E]``
    (detached by the caller); all matched pairs of the batch are stacked and the loss is their plain MSE (mean over
    elements, no normalisation). ``eot_in_sets`` (quirk S6) adds the EOT position to both word sets;
    ``skip_actions_without_objects`` (S7) skips a sample's actions when it has no valid trajectory or no noun.
    A batch without any pair gives a zero loss that keeps the graph. ``reduction="sum"`` returns ``(sum of the
    squared errors, number of elements)`` instead of their mean (a mean over several ranks)."""
    video_side, text_side = [], []
    eot = text_mask.sum(1) - 1
    for i in range(trajectories.shape[0]):
        nouns, verbs = noun_mask[i].bool().clone(), verb_mask[i].bool().clone()
        if eot_in_sets:
            nouns[eot[i]] = True
            verbs[eot[i]] = True
        valid = trajectory_valid[i].bool()
        objects_ok = bool(valid.any()) and bool(nouns.any())
        if objects_ok:
            v, t = matched_pairs(trajectories[i][valid], text_tokens[i][nouns])
            video_side.append(v)
            text_side.append(t)
        if bool(verbs.any()) and (objects_ok or not skip_actions_without_objects):
            v, t = matched_pairs(actions[i], text_tokens[i][verbs])
            video_side.append(v)
            text_side.append(t)
    if not video_side:
        zero = (trajectories.sum() + actions.sum()).float() * 0.0
        return zero if reduction == "mean" else (zero, zero.detach())
    video, text = torch.cat(video_side).float(), torch.cat(text_side).float()
    if reduction == "sum":
        return F.mse_loss(video, text, reduction="sum"), video.new_tensor(float(video.numel()))
    return F.mse_loss(video, text)
