"""Tiny MemBridge models and batches shared by the fusion / PLM / published-key tests."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from modules.clip_model import CLIPConfig, load_clip
from modules.fusion import FusionConfig, MemBridgeFusion
from modules.membridge import MemBridgeModel
from modules.video_clip import VideoCLIP

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = REPO / "CLIP-modules" / "tiny.json"
TINY_FUSION = REPO / "CLIP-modules" / "fusion-tiny.json"
TEST_VOCAB = 1000  # a small vocabulary keeps the vocabulary head cheap; EOT stays the largest id (CLIP's rule)
SOT, EOT = TEST_VOCAB - 2, TEST_VOCAB - 1
WORD_ID_RANGE = (1, SOT)
FRAMES, WORDS, IMAGE = 4, 12, 32


def tiny_config(**overrides: object) -> FusionConfig:
    """The tiny fusion config with dropout off (exact comparisons), plus ``overrides``."""
    config = FusionConfig.from_json(TINY_FUSION, dropout=0.0, vocab_size=TEST_VOCAB, eot_token_id=EOT)
    return replace(config, **overrides)


def tiny_model(seed: int = 0, **overrides: object) -> MemBridgeModel:
    """A frozen-encoder stage-2 model on the tiny CLIP; fusion initialised from CLIP as published."""
    torch.manual_seed(seed)
    clip = load_clip(config=replace(CLIPConfig.from_json(TINY_CLIP), vocab_size=TEST_VOCAB))
    fusion = MemBridgeFusion(tiny_config(**overrides))
    fusion.init_from_clip(clip)
    model = MemBridgeModel(VideoCLIP(clip, joint_layers=1, max_frames=FRAMES), fusion)
    model.freeze_encoder()
    return model


def text_batch(lengths: list[int], words: int = WORDS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_ids, text_mask)`` of texts ``[SOT, w.., EOT]`` with ``lengths`` tokens each, padded with 0."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), words, dtype=torch.long)
    mask = torch.zeros(len(lengths), words, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, n - 1] = SOT, EOT
        ids[row, 1 : n - 1] = torch.randint(*WORD_ID_RANGE, (n - 2,), generator=gen)
        mask[row, :n] = 1
    return ids, mask


def stage2_batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of the batch contract with every frame valid (MemBridge's repeat padding)."""
    gen = torch.Generator().manual_seed(seed + 1)
    ids, mask = text_batch(lengths, seed=seed)
    b = len(lengths)
    return {
        "video": torch.randn(b, FRAMES, 3, IMAGE, IMAGE, generator=gen),
        "video_mask": torch.ones(b, FRAMES, dtype=torch.long),
        "text_ids": ids,
        "text_mask": mask,
    }
