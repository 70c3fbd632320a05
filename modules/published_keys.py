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

The STOA-VLP release (spec ``T2VLP_STOA.md`` B.3-B.5, C.2.6) adds ``clip.visual.transformer.object_encoder.*``
(``patch_to_d``, ``box_categories``, ``c_coord_to_feature``), ``clip.object_fusion`` / ``clip.object_act_fusion``
(trajectory / action heads: blocks, ``ln_post``, ``proj``; their ViT embeddings are unused),
``clip.object_frame_pos_emb``, ``clip.object_cls_embedding`` ``[1, W]`` and ``clip.object_action`` ``[1, 1, 4, W]``;
``clip.object_alignment_proj``, ``clip.object_logit_bias``, ``clip.obj_ln``, ``clip.obj_proj`` are unused. Its
fusion positional table has ``90 + 12 O`` rows: set ``context_length`` in ``fusion.json`` to load it.

HMMC's released checkpoints (``visual_encoder.*``, ``text_encoder.*`` and training-only parts) map through
:func:`convert_hmmc_state_dict`. A bare OpenAI-layout CLIP (MCQ's ``MCQ_CLIP.pth``: ``visual.*``, ``transformer.*``,
``text_projection``, ...) maps under ``encoder.clip.`` (:func:`openai_clip_to_ours`).

Optional converter (the loaders read such files directly; a safetensors copy loads without any unpickling)::

    python -m modules.published_keys --to_safetensors MCQ_CLIP.pth MCQ_CLIP.safetensors

reads a ``torch.save`` file weights-only (pickled config objects dropped unexecuted), unwraps ``state_dict`` and a
DDP ``module.`` prefix, and writes the tensors as safetensors.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataloaders.errors import DataError, MemBridgeError
from dataloaders.safe_pickle import safe_torch_load

logger = logging.getLogger(__name__)

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
    # STOA-VLP (spec B.3-B.5, C.2.6)
    ("clip.visual.transformer.object_encoder.patch_to_d.", "encoder.objects.encoder.patch_to_d."),
    ("clip.visual.transformer.object_encoder.box_categories", "encoder.objects.encoder.box_categories"),
    ("clip.visual.transformer.object_encoder.c_coord_to_feature.", "encoder.objects.encoder.coord_to_feature."),
    ("clip.object_frame_pos_emb", "encoder.objects.frame_pos"),
    ("clip.object_cls_embedding", "encoder.objects.cls_embedding"),
    ("clip.object_action", "encoder.objects.action_queries"),
    ("clip.object_fusion.transformer.", "encoder.objects.trajectory.blocks."),
    ("clip.object_fusion.ln_post.", "encoder.objects.trajectory.ln_post."),
    ("clip.object_fusion.proj", "encoder.objects.trajectory.proj"),
    ("clip.object_fusion.", DROPPED),
    ("clip.object_act_fusion.transformer.", "encoder.objects.action.blocks."),
    ("clip.object_act_fusion.ln_post.", "encoder.objects.action.ln_post."),
    ("clip.object_act_fusion.proj", "encoder.objects.action.proj"),
    ("clip.object_act_fusion.", DROPPED),
    ("clip.object_alignment_proj", DROPPED),
    ("clip.object_logit_bias", DROPPED),
    ("clip.obj_ln.", DROPPED),
    ("clip.obj_proj", DROPPED),
    ("clip.", "encoder.clip."),
    ("frame_position_embeddings.", "encoder.frame_position_embeddings."),
    ("transformerClip.", "encoder.transformerClip."),
    ("lstm_visual.", "encoder.lstm_visual."),
    ("cross.", "encoder.cross."),
    ("similarity_dense.", "encoder.similarity_dense."),
)
PUBLISHED_MARKERS = (
    "clip.fusion_memory", "clip.fusion_transformer.", "clip.fusion_center", "clip.local_visual.", "clip.object_fusion."
)  # fmt: skip
RESHAPED = ("clip.fusion_center", "clip.object_action", "clip.object_cls_embedding")  # published [1, (1,) K, W]
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
        elif key == "clip.object_cls_embedding":  # published [1, W], ours [W]
            converted[target] = value.reshape(-1)
        elif key in RESHAPED:  # published [1, 1, K, W], ours [K, W]
            converted[target] = value.reshape(-1, value.shape[-1])
        else:
            converted[target] = value
    return converted, sorted(unmapped)


# ----------------------------------------------------------------------------------------------- HMMC

# HMMC (cheetah003/HMMC, MCQ_HMMC.md §C.4): released checkpoints are full ``BirdModel`` / ``BirdPreTrainedModel``
# state dicts with fp16 CLIP parts. (published prefix, our prefix); the English text tower's parts map onto CLIP's.
HMMC_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("visual_encoder.visual.", "encoder.clip.visual."),
    ("visual_encoder.temporal_transformer.", "encoder.transformerClip."),
    ("visual_encoder.frame_position_embeddings.", "encoder.frame_position_embeddings."),
    ("text_encoder.token_embedding.", "encoder.clip.token_embedding."),
    ("text_encoder.positional_embedding", "encoder.clip.positional_embedding"),
    ("text_encoder.transformer.", "encoder.clip.transformer."),
    ("text_encoder.ln_final.", "encoder.clip.ln_final."),
    ("text_encoder.text_projection", "encoder.clip.text_projection"),
    # --language chinese: the Hugging Face BERT (``TextEncoder.chinese_encoder``) and its Linear to the joint space
    ("text_encoder.chinese_encoder.", "encoder.text_hf.backbone."),
    ("text_encoder.text_proj.", "encoder.text_hf.text_proj."),
)
# Training-only parts of HMMC's pre-training model: momentum twins, projector/predictor MLPs, the MLM head, queues.
HMMC_TRAINING_ONLY = (
    "visual_encoder_k.", "text_encoder_k.", "v_projector.", "v_projector_k.", "v_predictor.", "t_projector.",
    "t_projector_k.", "cls.", "queue_",
)  # fmt: skip
HMMC_MARKERS = ("visual_encoder.visual.", "visual_encoder.temporal_transformer.")
HMMC_LOGIT_SCALE = math.log(100.0)  # HMMC's frozen logit scale (not in its checkpoints, B.14 item 1)


@dataclass
class HMMCConversion:
    """What :func:`convert_hmmc_state_dict` did: keys renamed, training-only keys left out, unknown keys."""

    state_dict: dict[str, torch.Tensor]
    training_only: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def report(self) -> str:
        return (
            f"HMMC checkpoint: {len(self.state_dict)} tensors mapped, {len(self.training_only)} training-only tensors "
            f"of HMMC's pre-training model left out, {len(self.unknown)} unknown: {self.unknown[:10]}"
        )


def is_hmmc_layout(state_dict: Mapping[str, object]) -> bool:
    """True for a state dict saved by HMMC (``visual_encoder.visual.*`` / ``visual_encoder.temporal_transformer.*``)."""
    return any(key.startswith(marker) for key in state_dict for marker in HMMC_MARKERS)


def convert_hmmc_state_dict(state_dict: Mapping[str, torch.Tensor], strict: bool = False) -> HMMCConversion:
    """Rename an HMMC state dict to our layout, floating tensors cast to fp32, with ``encoder.clip.logit_scale``
    ``ln 100`` when absent. ``strict``: a key neither mapped nor known as training-only raises ``DataError``."""
    out = HMMCConversion({})
    for key, value in state_dict.items():
        target = next((ours + key[len(pub) :] for pub, ours in HMMC_KEY_MAP if key.startswith(pub)), None)
        if target is not None:
            out.state_dict[target] = value.float() if value.is_floating_point() else value
        elif key.startswith(HMMC_TRAINING_ONLY):
            out.training_only.append(key)
        else:
            out.unknown.append(key)
    out.training_only.sort()
    out.unknown.sort()
    if strict and out.unknown:
        raise DataError(
            f"HMMC checkpoint: {len(out.unknown)} keys are neither HMMC's encoder nor its training-only parts: "
            f"{out.unknown[:10]}; is this an HMMC (cheetah003/HMMC) state dict?"
        )
    out.state_dict.setdefault("encoder.clip.logit_scale", torch.tensor(HMMC_LOGIT_SCALE))
    return out


OPENAI_CLIP_MARKERS = ("visual.proj", "text_projection")
OURS_CLIP_PREFIX = "encoder.clip."
DDP_PREFIX = "module."
OPENAI_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_openai_clip_layout(state_dict: Mapping[str, object]) -> bool:
    """True for a bare OpenAI-layout CLIP state dict (``visual.proj`` and ``text_projection`` at the top level)."""
    return all(marker in state_dict for marker in OPENAI_CLIP_MARKERS)


def openai_clip_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenAI-layout CLIP state dict renamed under ``encoder.clip.`` (OpenAI's non-weight entries dropped)."""
    return {OURS_CLIP_PREFIX + k: v for k, v in state_dict.items() if k not in OPENAI_NON_WEIGHT_KEYS}


def read_tensor_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save`` file read weights-only (pickled objects dropped unexecuted), with a
    ``state_dict`` wrapper and a DDP ``module.`` prefix (on every key) removed."""
    data, _ = safe_torch_load(path, "the file is not a torch.save archive of tensors")
    while isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise DataError(f"{path}: holds a {type(data).__name__}, not a state dict")
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise DataError(f"{path}: holds no tensors under its top level or its 'state_dict' entry")
    if all(k.startswith(DDP_PREFIX) for k in tensors):
        tensors = {k[len(DDP_PREFIX) :]: v for k, v in tensors.items()}
    return tensors


def to_safetensors(source: str | Path, target: str | Path) -> int:
    """Write the tensors of :func:`read_tensor_state_dict` of ``source`` to the safetensors file ``target``; returns
    how many were written."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in read_tensor_state_dict(source).items()}
    save_file(tensors, str(target))
    return len(tensors)


def main(argv: list[str] | None = None) -> int:
    """``python -m modules.published_keys --to_safetensors IN OUT``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--to_safetensors",
        nargs=2,
        metavar=("IN", "OUT"),
        required=True,
        help="convert a torch.save checkpoint (e.g. MCQ_CLIP.pth) to a safetensors file of its state dict",
    )
    args = parser.parse_args(argv)
    source, target = args.to_safetensors
    try:
        count = to_safetensors(source, target)
    except MemBridgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{target}: {count} tensors written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
