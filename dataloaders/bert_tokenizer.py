"""Chinese (and any WordPiece) captions for ``--language chinese`` (HMMC, MCQ_HMMC.md §B.8, §C.4): a ``BertTokenizer``
read from the local model folder (``--text_pretrain_path``, holding ``vocab.txt``; nothing is downloaded), with the
same ``encode(text, max_words) -> (ids, mask)`` contract as :class:`dataloaders.tokenizer.ClipTokenizer`:
``[CLS] + wordpieces[:L-2] + [SEP]``, padded with the tokenizer's pad id (HMMC's CHVTT loader; its VATEX loader's CLIP
strings, which BERT reads as ``[UNK]``, are B.14 item 16). ``transformers`` is imported when one is built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dataloaders.errors import ConfigError

VOCAB_FILE = "vocab.txt"


class BertTextTokenizer:
    """WordPiece tokenizer of a local Hugging Face model folder, producing fixed-length id/mask arrays."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        vocab = folder / VOCAB_FILE
        if not vocab.is_file():
            raise ConfigError(
                f"--text_pretrain_path {folder}: no {VOCAB_FILE} there; point it at a local Hugging Face BERT folder "
                "(e.g. a download of hfl/chinese-roberta-wwm-ext with config.json, vocab.txt and the weights)"
            )
        try:
            from transformers import BertTokenizer
        except ImportError as exc:  # pragma: no cover - transformers is a pinned requirement
            raise ConfigError("--language chinese needs the transformers package: pip install transformers") from exc
        self._tok = BertTokenizer(str(vocab))

    @property
    def sot_id(self) -> int:
        return int(self._tok.cls_token_id)

    @property
    def eot_id(self) -> int:
        return int(self._tok.sep_token_id)

    @property
    def pad_id(self) -> int:
        return int(self._tok.pad_token_id)

    @property
    def mask_id(self) -> int:
        return int(self._tok.mask_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def tokenize_words(self, text: str) -> list[int]:
        """WordPiece ids of ``text`` without ``[CLS]`` / ``[SEP]``."""
        return self._tok.convert_tokens_to_ids(self._tok.tokenize(text))

    def encode(self, text: str, max_words: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``, both int64 ``[L]`` with ``L = max_words``; mask is 1 on ``[CLS]..[SEP]``."""
        if max_words < 2:
            raise ValueError(f"max_words must be at least 2 (room for [CLS] and [SEP]), got {max_words}")
        tokens = [self.sot_id, *self.tokenize_words(text)[: max_words - 2], self.eot_id]
        ids = np.full(max_words, self.pad_id, dtype=np.int64)
        mask = np.zeros(max_words, dtype=np.int64)
        ids[: len(tokens)] = tokens
        mask[: len(tokens)] = 1
        return ids, mask
