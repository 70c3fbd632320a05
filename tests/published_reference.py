"""A plain transcription of the published MemBridge stage-2 forward and re-ranking (jahhaoyang/MemBridge,
``Pretrain_fusion_memory/modules/modeling.py`` and ``main_task_retrieval.py``), written with explicit loops and the
published index arithmetic, used as the reference of ``official_quirks=True``.

``quirks=False`` switches the three defects off (DESIGN §2.6b), giving a plain reference of the default behaviour.
Every tensor is fp32 (the published code runs the fusion in fp16; precision is not part of the quirks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modules.fusion import MemBridgeFusion

NEG_INF = float("-inf")


def masked_mean(frames: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    """``v_sep``: ``sum(frames * mask) / max(sum(mask), 1)``."""
    m = video_mask.float().unsqueeze(-1)
    total = m.sum(1)
    total[total == 0] = 1.0
    return (frames * m).sum(1) / total


def memory_read(fusion: MemBridgeFusion, v_sep: torch.Tensor, t_sep: torch.Tensor) -> torch.Tensor:
    """Bridge tokens pair by pair and token by token: ``softmax(ln([v; t]) @ query[k] @ memory^T) @ memory``."""
    ln = fusion.ln
    out = []
    for b in range(v_sep.shape[0]):
        q0 = F.layer_norm(torch.cat([v_sep[b].detach(), t_sep[b].detach()]), ln.normalized_shape, ln.weight, ln.bias)
        tokens = []
        for k in range(fusion.query.shape[0]):
            logits = (q0 @ fusion.query[k]) @ fusion.memory.t()
            weights = torch.exp(logits - logits.max())
            tokens.append((weights / weights.sum()) @ fusion.memory)
        out.append(torch.stack(tokens))
    return torch.stack(out)


def column_labels(video_mask: torch.Tensor, text_mask: torch.Tensor, k: int) -> torch.Tensor:
    """The published ``fusion_labels``: ``cat(vm[:, 0:1], vm, vm[:, 0:K], text_mask)`` (1 valid, 0 padding)."""
    return torch.cat([video_mask[:, 0:1], video_mask, video_mask[:, 0:k], text_mask], dim=1).long()


def padding_mask(labels: torch.Tensor) -> torch.Tensor:
    """The published ``vtm_mask`` ``[B, N, N]``: every row hides the padded columns."""
    mask = torch.zeros(labels.shape)
    mask[labels == 0] = NEG_INF
    return mask.unsqueeze(1).repeat(1, labels.shape[1], 1)


def bidirectional_mask(labels: torch.Tensor, t: int, k: int) -> torch.Tensor:
    """Published VTM / MLM / eval mask ``[B, N, N]``: padded columns, video x text and text x video hidden."""
    mask = padding_mask(labels)
    mask[:, : t + 1, t + 1 + k :] = NEG_INF
    mask[:, t + 1 + k :, : t + 1] = NEG_INF
    return mask


def vtm_scores(fusion: MemBridgeFusion, v: torch.Tensor, t: torch.Tensor, quirks: bool) -> torch.Tensor:
    """``[unmatch, match]`` as the diagonal of ``v_n @ M @ t_n^T`` (Q2: ``t.T / t.T.norm(dim=-1)``)."""
    vn = v / v.norm(dim=-1, keepdim=True)
    tn = t.t() / t.t().norm(dim=-1, keepdim=True) if quirks else (t / t.norm(dim=-1, keepdim=True)).t()
    match = torch.diagonal(vn @ fusion.match_matrix @ tn).reshape(-1, 1)
    unmatch = torch.diagonal(vn @ fusion.unmatch_matrix @ tn).reshape(-1, 1)
    return torch.cat([unmatch, match], dim=1)


def vtm_rows(
    fusion: MemBridgeFusion,
    frame_feats: torch.Tensor,
    video_mask: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    t_sep: torch.Tensor,
    quirks: bool,
) -> dict[str, torch.Tensor]:
    """The published VTM / evaluation fusion of ``R`` (video, text) rows (one Q2 group)."""
    t, k = frame_feats.shape[1], fusion.query.shape[0]
    v_sep = masked_mean(frame_feats, video_mask)
    bridges = memory_read(fusion, v_sep, t_sep)
    fusion_input = torch.cat([frame_feats, v_sep.unsqueeze(1), bridges, text_tokens], dim=1)
    labels = column_labels(video_mask, text_mask, k)
    mask = bidirectional_mask(labels, t, k)
    if quirks:  # sep_idx from the label sums of row 0: 1 + T valid video columns -> the first bridge (Q1)
        sep0 = labels[:, : t + 1].sum(1)
    else:
        sep0 = torch.full((labels.shape[0],), t)
    sep1 = t + labels[:, t + 1 :].sum(1)
    x = fusion_input + fusion.positional_embedding[: fusion_input.shape[1]]
    x = x.clone()
    for i in range(x.shape[0]):
        x[i, sep0[i]] = fusion_input[i, sep0[i]]
        x[i, sep1[i]] = fusion_input[i, sep1[i]]
    out = fusion.transformer(x, mask.unsqueeze(1))
    v_out = out[:, t]
    vtm_mask = padding_mask(labels)  # the text EOT output: the last visible column of row 0 of vtm_mask
    t_out = torch.stack([out[i][vtm_mask[i][0] == 0][-1] for i in range(out.shape[0])])
    return {"bridges": bridges, "hidden": out, "logits": vtm_scores(fusion, v_out, t_out, quirks)}


def mlm(
    fusion: MemBridgeFusion,
    clip: torch.nn.Module,
    frame_feats: torch.Tensor,
    video_mask: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    mlm_labels: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The published MLM branch; ``mlm_labels`` (-100 = not masked) mark the masked text positions."""
    t, k = frame_feats.shape[1], fusion.query.shape[0]
    masked_text = mlm_labels != -100
    labels = column_labels(video_mask, text_mask, k)
    labels[:, t + 1 + k :][masked_text] = -1
    mlm_ids = text_ids.clone()
    mlm_ids[labels[:, t + 1 + k :] == -1] = 0
    with torch.no_grad():
        text_tokens = clip.encode_text_tokens(mlm_ids)
    sep0 = video_mask.sum(1)
    sep1 = t + k + text_mask.sum(1)
    v_sep = masked_mean(frame_feats, video_mask)
    t_sep = torch.stack([text_tokens[i, sep1[i] - t - 1 - k] for i in range(text_tokens.shape[0])])
    bridges = memory_read(fusion, v_sep, t_sep)
    video_tokens = torch.cat([frame_feats, v_sep.unsqueeze(1)], dim=1)
    fusion_input = torch.cat([video_tokens, bridges, text_tokens], dim=1)
    fusion_input[labels == -1] = 0.0
    mask = torch.zeros(labels.shape)
    mask[labels == 0] = NEG_INF
    mask = mask.unsqueeze(1).repeat(1, labels.shape[1], 1)
    mask[:, : t + 1, t + 1 + k :] = NEG_INF
    mask[:, t + 1 + k :, : t + 1] = NEG_INF
    x = fusion_input + fusion.positional_embedding[: fusion_input.shape[1]]
    for i in range(x.shape[0]):
        x[i, sep0[i]] = video_tokens[i, sep0[i]]
        x[i, sep1[i]] = text_tokens[i, sep1[i] - t - 1 - k]
    out = fusion.transformer(x, mask.unsqueeze(1))
    predicted = out[labels == -1]
    logits = predicted @ (fusion.vocab_proj @ clip.token_embedding.weight.t()) + fusion.vocab_bias
    targets = text_ids[labels[:, t + 1 + k :] == -1]
    return {"bridges": bridges, "hidden": out, "logits": logits, "loss": F.cross_entropy(logits, targets)}


def plm(
    fusion: MemBridgeFusion,
    clip: torch.nn.Module,
    frame_feats: torch.Tensor,
    video_mask: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    starts: torch.Tensor,
    quirks: bool,
) -> dict[str, torch.Tensor]:
    """The published PLM loop (one CLIP text pass and one fusion pass per prefix, cumulative mask edits)."""
    b, t = video_mask.shape
    length, k = text_ids.shape[1], fusion.query.shape[0]
    n = t + 1 + k + length
    labels = column_labels(video_mask, text_mask, k)
    mask = torch.zeros(labels.shape)
    mask[labels == 0] = NEG_INF
    mask = mask.unsqueeze(1).repeat(1, n, 1)
    mask[:, : t + 1, t + 1 + k :] = NEG_INF
    mask[:, t + 1 + k :, : t + 1] = NEG_INF
    cap = torch.triu(torch.ones(length, length), diagonal=1)
    cap[cap == 1] = NEG_INF
    mask[:, t + 1 + k :, t + 1 + k :] = cap
    mask[:, t + 1 : t + 1 + k, t + 2 + k :] = NEG_INF
    pos = fusion.positional_embedding
    text_pos = pos[t + 1 + k : t + 1 + k + length]
    text_input = torch.zeros(b, length, frame_feats.shape[-1]) + text_pos
    v_sep = masked_mean(frame_feats, video_mask)
    video_ori = torch.cat([frame_feats, v_sep.unsqueeze(1)], dim=1)
    video_plm = video_ori + pos[: t + 1]
    sep0 = video_mask.sum(1)
    for i in range(b):
        video_plm[i, sep0[i]] = video_ori[i, sep0[i]]
    if quirks:
        video_plm = video_plm.detach()
    weight = fusion.vocab_proj @ clip.token_embedding.weight.t()
    scores = []
    for i in range(length - 1):
        ids = torch.cat(
            [text_ids[:, : i + 1], torch.full((b, 1), fusion.config.eot_token_id), text_ids[:, i + 2 :]], dim=1
        )
        with torch.no_grad():
            text_tokens = clip.encode_text_tokens(ids)
        mask[:, t + 1 : t + 1 + k, t + 2 + k + i] = 0
        bridges = memory_read(fusion, v_sep, text_tokens[:, i + 1]) + pos[t + 1 : t + 1 + k]
        text_input = text_input.clone()
        text_input[:, : i + 1] = text_tokens[:, : i + 1] + text_pos[: i + 1]
        x = torch.cat([video_plm, bridges, text_input], dim=1)
        out = fusion.transformer(x, mask.clone().unsqueeze(1))  # the published .half() copies the mask
        scores.append(out[:, t + 2 + k + i] @ weight + fusion.vocab_bias)
    scores = torch.stack(scores, dim=1)
    picked, targets = [], []
    for i in range(b):
        text_len = int(labels[i, t + 2 + k :].sum())
        picked.append(scores[i, starts[i] - 1 : text_len])
        targets.append(text_ids[i, starts[i] : text_len + 1])
    logits = torch.cat(picked)
    return {"logits": logits, "loss": F.cross_entropy(logits, torch.cat(targets))}


def loose_similarity(clip: torch.nn.Module, t_sep: torch.Tensor, frames: torch.Tensor, video_mask: torch.Tensor):
    """CLIP4Clip meanP logits: normalise frames, masked sum, normalise; ``exp(logit_scale) * t @ v^T``."""
    v = frames / frames.norm(dim=-1, keepdim=True)
    v = (v * video_mask.float().unsqueeze(-1)).sum(1)
    v = v / v.norm(dim=-1, keepdim=True)
    text = t_sep / t_sep.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp() * text @ v.t()


def rerank(
    fusion: MemBridgeFusion,
    sim: torch.Tensor,
    frame_feats: torch.Tensor,
    video_mask: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    t_sep: torch.Tensor,
    topk: int,
    quirks: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The published evaluation re-ranking, query by query, in both directions."""
    t2v, v2t = sim.clone(), sim.t().clone()
    for tid in range(sim.shape[0]):
        cands = torch.topk(sim[tid], topk).indices
        kk = cands.shape[0]
        rows = vtm_rows(
            fusion,
            frame_feats[cands],
            video_mask[cands],
            text_tokens[tid].expand(kk, -1, -1),
            text_mask[tid].expand(kk, -1),
            t_sep[tid].expand(kk, -1),
            quirks,
        )
        p = torch.softmax(rows["logits"], dim=-1) * 1000.0
        t2v[tid, cands] = torch.softmax(sim[tid, cands], dim=-1) * p[:, 1] + 1000.0
    for vid in range(sim.shape[1]):
        cands = torch.topk(sim.t()[vid], topk).indices
        kk = cands.shape[0]
        rows = vtm_rows(
            fusion,
            frame_feats[vid].expand(kk, -1, -1),
            video_mask[vid].expand(kk, -1),
            text_tokens[cands],
            text_mask[cands],
            t_sep[cands],
            quirks,
        )
        p = torch.softmax(rows["logits"], dim=-1) * 1000.0
        v2t[vid, cands] = torch.softmax(sim.t()[vid, cands], dim=-1) * p[:, 1] + 1000.0
    return t2v, v2t
