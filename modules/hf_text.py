"""A Hugging Face text encoder in place of CLIP's text tower (``--language chinese``; HMMC's ``TextEncoder``,
MCQ_HMMC.md §B.4): ``transformers.AutoModel`` (HMMC: ``hfl/chinese-roberta-wwm-ext``, a BERT-base) plus
``text_proj = Linear(hidden, embed_dim)``; the text feature is ``text_proj(pooler_output)`` and the per-position states
(MLM, evaluation tokens) are ``text_proj(last_hidden_state)``. The attention mask is ``ids != pad id``.

Weights come only from a local folder (``load_hf_text_encoder``: ``from_pretrained(path, local_files_only=True)``);
``transformers`` is imported when one is built.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dataloaders.errors import ConfigError


class HFTextEncoder(nn.Module):
    """``backbone`` (a transformers model with a pooler) + ``text_proj``."""

    def __init__(self, backbone: nn.Module, embed_dim: int, pad_id: int = 0):
        super().__init__()
        self.backbone = backbone
        self.text_proj = nn.Linear(backbone.config.hidden_size, embed_dim)
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        return int(self.backbone.config.vocab_size)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids [B, L]`` -> ``(features [B, D], states [B, L, D])``."""
        out = self.backbone(input_ids=ids, attention_mask=(ids != self.pad_id).long())
        if out.pooler_output is None:
            raise ConfigError("the --text_pretrain_path model has no pooler: HMMC's text feature is its pooler output")
        return self.text_proj(out.pooler_output), self.text_proj(out.last_hidden_state)


def load_hf_text_encoder(path: str | Path, embed_dim: int, pad_id: int = 0) -> HFTextEncoder:
    """The model of the local folder ``path`` (``config.json`` + weights); ``ConfigError`` when it is absent."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"--text_pretrain_path {path}: no config.json there; it must be a local Hugging Face model folder "
            "(config.json, the weights, vocab.txt): nothing is downloaded"
        )
    try:
        from transformers import AutoModel
    except ImportError as exc:  # pragma: no cover - transformers is a pinned requirement
        raise ConfigError("--language chinese needs the transformers package: pip install transformers") from exc
    try:
        backbone = AutoModel.from_pretrained(str(path), local_files_only=True)
    except OSError as exc:
        raise ConfigError(f"--text_pretrain_path {path}: the model could not be read ({exc})") from exc
    return HFTextEncoder(backbone, embed_dim, pad_id)
