"""CLIP BPE tokenizer wrapper: ``[SOT] + bpe(text)[:L-2] + [EOT]``, padded with 0 (DESIGN §2.1).

The vocabulary is the one shipped with ``open_clip_torch`` (not vendored here). ``encode`` gives the ids of
``open_clip.tokenize(text, context_length=L)``: a longer text keeps its first ``L - 2`` BPE tokens and ends with
EOT (CLIP4Clip's rule, which open_clip's truncation also yields); the mask marks SOT..EOT.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

import numpy as np

_TOKENIZER_MODULE = "membridge_open_clip_tokenizer"


def _simple_tokenizer_class() -> type:
    """open_clip's ``SimpleTokenizer``, loaded from ``open_clip/tokenizer.py`` alone when that is possible.

    ``import open_clip.tokenizer`` first runs the package's ``__init__``, which imports every model family
    (torchvision's model zoo, the Hugging Face CoCa code): ~2.5 s in every process that only needs the BPE. The
    tokenizer file imports nothing from its package, so it is executed on its own; if a future open_clip changes
    that, the normal import is used."""
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"].SimpleTokenizer
    if _TOKENIZER_MODULE in sys.modules:
        return sys.modules[_TOKENIZER_MODULE].SimpleTokenizer
    try:
        package = importlib.util.find_spec("open_clip")
        location = package.submodule_search_locations[0] if package and package.submodule_search_locations else None
        spec = importlib.util.spec_from_file_location(_TOKENIZER_MODULE, f"{location}/tokenizer.py")
        if location is None or spec is None or spec.loader is None:
            raise ImportError("open_clip/tokenizer.py not found")
        module = importlib.util.module_from_spec(spec)
        sys.modules[_TOKENIZER_MODULE] = module
        spec.loader.exec_module(module)
        return module.SimpleTokenizer
    except (ImportError, OSError, AttributeError):
        sys.modules.pop(_TOKENIZER_MODULE, None)
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer


SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0
VOCAB_SIZE = 49408
SPECIAL_TOKENS = 2  # SOT and EOT around the BPE tokens of every encoded text


class ClipTokenizer:
    """CLIP byte-pair tokenizer producing fixed-length id/mask arrays for the batch contract."""

    def __init__(self) -> None:
        self._bpe = _simple_tokenizer_class()()
        if (self._bpe.sot_token_id, self._bpe.eot_token_id, self._bpe.vocab_size) != (SOT_ID, EOT_ID, VOCAB_SIZE):
            raise RuntimeError(
                "open_clip's SimpleTokenizer does not have the CLIP vocabulary "
                f"(sot {self._bpe.sot_token_id}, eot {self._bpe.eot_token_id}, size {self._bpe.vocab_size}); "
                "reinstall open_clip_torch"
            )

    @property
    def sot_id(self) -> int:
        return SOT_ID

    @property
    def eot_id(self) -> int:
        return EOT_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def tokenize_words(self, text: str) -> list[int]:
        """Raw BPE ids of ``text`` (lower-cased, whitespace-cleaned), without SOT/EOT."""
        return self._bpe.encode(text)

    def encode(self, text: str, max_words: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``, both int64 ``[L]`` with ``L = max_words``; mask is 1 on SOT..EOT."""
        if max_words < SPECIAL_TOKENS:
            raise ValueError(f"max_words must be at least {SPECIAL_TOKENS} (room for SOT and EOT), got {max_words}")
        tokens = [SOT_ID, *self.tokenize_words(text)[: max_words - SPECIAL_TOKENS], EOT_ID]
        ids = np.full(max_words, PAD_ID, dtype=np.int64)
        mask = np.zeros(max_words, dtype=np.int64)
        ids[: len(tokens)] = tokens
        mask[: len(tokens)] = 1
        return ids, mask

    def encode_batch(self, texts: Sequence[str], max_words: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``, both int64 ``[N, L]`` for ``N`` texts."""
        ids = np.full((len(texts), max_words), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(texts), max_words), dtype=np.int64)
        for row, text in enumerate(texts):
            ids[row], mask[row] = self.encode(text, max_words)
        return ids, mask

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a generated id sequence: drops a leading SOT, stops at the first EOT.

        Without an EOT, trailing pad ids are dropped (id 0 is also the BPE token "!", so only trailing zeros
        can be told apart from text).
        """
        tokens = [int(t) for t in ids]
        if tokens and tokens[0] == SOT_ID:
            tokens = tokens[1:]
        if EOT_ID in tokens:
            tokens = tokens[: tokens.index(EOT_ID)]
        else:
            while tokens and tokens[-1] == PAD_ID:
                tokens.pop()
        tokens = [t for t in tokens if t != SOT_ID]
        return self._bpe.decode(tokens).strip()
