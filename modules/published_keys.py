"""Map state dicts saved by the published MemBridge code (``CLIP4Clip`` module names) onto ``MemBridgeModel``.

The published model keeps everything under ``clip.``: the OpenAI CLIP weights, a 12-block
``fusion_transformer`` of which the fusion runs blocks 0..5 only, the memory bank (``fusion_memory``,
``fusion_query``, ``fusion_ln``), the tied vocabulary head (``fusion_proj``, ``fusion_logit_bias``), the VTM head
(``fusion_match_matrix``, ``fusion_unmatch_matrix``), ``fusion_positional_embedding`` and an unused ``lm_head``.
CLIP4Clip's similarity heads live at the top level (``frame_position_embeddings``, ``transformerClip``, ...).

The T2VLP (Focus-and-Align) release uses the same skeleton (spec ``T2VLP_STOA.md`` A.1/A.2): its tube module is
``clip.fusion_center`` (shape ``[1, 1, K, W]``, ours ``[K, W]``), ``clip.fusion_proj_center``, and
``clip.local_visual`` of which only the two blocks, ``ln_post`` and ``proj`` run (its copies of ``conv1``,
``class_embedding``, ``positional_embedding``, ``ln_pre`` are unused, as is ``clip.visual_linear``); its vocabulary
projection is ``clip.fusion_proj_embedding``. There is no memory bank.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

DEFAULT_FUSION_LAYERS = 6
DROPPED = None  # target of published weights that the published forward never uses

# (published name, our name): exact names, or prefixes when both end with "."; the first match wins.
PUBLISHED_KEY_MAP: tuple[tuple[str, str | None], ...] = (
    ("clip.fusion_transformer.", "fusion.transformer."),
    ("clip.fusion_positional_embedding", "fusion.positional_embedding"),
    ("clip.fusion_memory", "fusion.memory"),
    ("clip.fusion_query", "fusion.query"),
    ("clip.fusion_ln.", "fusion.ln."),
    ("clip.fusion_proj", "fusion.vocab_proj"),
    ("clip.fusion_logit_bias", "fusion.vocab_bias"),
    ("clip.fusion_match_matrix", "fusion.match_matrix"),
    ("clip.fusion_unmatch_matrix", "fusion.unmatch_matrix"),
    ("clip.lm_head.", DROPPED),
    # T2VLP
    ("clip.fusion_proj_embedding", "fusion.vocab_proj"),
    ("clip.fusion_center", "encoder.tubes.centres"),
    ("clip.fusion_proj_center.", "encoder.tubes.proj_center."),
    ("clip.local_visual.transformer.", "encoder.tubes.blocks."),
    ("clip.local_visual.ln_post.", "encoder.tubes.ln_post."),
    ("clip.local_visual.proj", "encoder.tubes.proj"),
    ("clip.local_visual.", DROPPED),
    ("clip.visual_linear.", DROPPED),
    ("clip.", "encoder.clip."),
    ("frame_position_embeddings.", "encoder.frame_position_embeddings."),
    ("transformerClip.", "encoder.transformerClip."),
    ("lstm_visual.", "encoder.lstm_visual."),
    ("cross.", "encoder.cross."),
    ("similarity_dense.", "encoder.similarity_dense."),
)
PUBLISHED_MARKERS = ("clip.fusion_memory", "clip.fusion_transformer.", "clip.fusion_center", "clip.local_visual.")
_FUSION_BLOCK = re.compile(r"^clip\.fusion_transformer\.resblocks\.(\d+)\.")


def is_published_layout(state_dict: Mapping[str, object]) -> bool:
    """True for a state dict in the published layout (top-level ``clip.`` with ``clip.fusion_*`` weights)."""
    return any(key.startswith(marker) for key in state_dict for marker in PUBLISHED_MARKERS)


def published_to_ours(key: str) -> str | None:
    """Our name of one published key; ``None`` when the table has no rule or the weight is unused."""
    for published, ours in PUBLISHED_KEY_MAP:
        if published.endswith("."):
            if key.startswith(published):
                return None if ours is DROPPED else ours + key[len(published) :]
        elif key == published:
            return ours
    return None


def convert_published_state_dict(
    state_dict: Mapping[str, torch.Tensor], fusion_layers: int = DEFAULT_FUSION_LAYERS
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a published state dict to our layout: ``(new_state_dict, unmapped_keys)``.

    Fusion blocks ``>= fusion_layers`` (never run by the published fusion), the unused ``lm_head`` and keys the
    table does not know are returned in ``unmapped_keys`` (sorted) instead of being renamed.
    """
    converted: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        block = _FUSION_BLOCK.match(key)
        target = published_to_ours(key)
        if target is None or (block is not None and int(block.group(1)) >= fusion_layers):
            unmapped.append(key)
        elif key == "clip.fusion_center":  # published [1, 1, K, W]
            converted[target] = value.reshape(-1, value.shape[-1])
        else:
            converted[target] = value
    return converted, sorted(unmapped)
