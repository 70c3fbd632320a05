"""The shared readers of annotation text: UTF-8 (with or without a BOM), real lines, bounded JSON nesting.

Every annotation parser (dataloaders/annotations.py) reads its file through these helpers, so they all behave the
same on hostile or odd input:

- ``read_text``: UTF-8 only; a leading byte-order mark (spreadsheet exports) is dropped; other bytes give a
  ``DataError`` naming the file, the line and byte offset, and how to convert the file;
- ``split_lines``: the file's real lines, ended by ``\\n``, ``\\r\\n`` or ``\\r`` only (as ``open()`` reads them).
  ``str.splitlines`` would also split on U+2028/U+2029/U+0085, ``\\x0b``, ``\\x0c`` and ``\\x1c``-``\\x1e``,
  breaking a valid row holding one of them and shifting every reported line number after it;
- ``parse_json`` / ``load_json``: JSON whose nesting is at most ``MAX_NESTING`` levels, checked on the text before
  it is parsed (Python's parser raises ``RecursionError`` on a few thousand ``[``), and numbers within Python's
  integer-digit limit; every failure is a ``DataError`` naming the file and the line.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from dataloaders.errors import DataError

MAX_NESTING = 64  # JSON / pickle nesting levels; the annotation formats need at most 4
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_OPENERS = np.frombuffer(b"[{", dtype=np.uint8)


def read_text(path: str | Path, missing_hint: str = "check the path flags") -> str:
    """The UTF-8 text of ``path`` without a leading byte-order mark.

    ``DataError`` when the file is missing or unreadable (``missing_hint`` says which flag to check), or is not
    UTF-8 (naming the line and byte of the first bad byte).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found; {missing_hint}") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc}); re-create or re-download the file") from exc
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{path}: line {line} (byte {offset}): not UTF-8 text (byte 0x{data[offset]:02x}: {exc.reason}); "
            "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8 (or re-download it)"
        ) from exc


def split_lines(text: str) -> list[str]:
    """The lines of ``text`` without their endings, split on ``\\n``, ``\\r\\n`` and ``\\r`` only.

    A final line ending does not start another (empty) line; line ``i`` of the file is ``result[i - 1]``.
    """
    lines = _LINE_BREAK.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_text_lines(path: str | Path, missing_hint: str = "check the path flags") -> list[str]:
    """``split_lines(read_text(path))``: the file's real lines, 1-based line ``i`` at index ``i - 1``."""
    return split_lines(read_text(path, missing_hint))


def _too_deep_at(text: str) -> int | None:
    """Index in ``text`` of the first bracket opening level ``MAX_NESTING + 1`` outside strings, else None.

    The fast check (regular expressions and numpy, no Python loop over characters) finds whether any bracket is too
    deep; only then is the text walked token by token to place it.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if len(brackets) <= MAX_NESTING:
        return None
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    depth = np.cumsum(np.where(np.isin(codes, _OPENERS), 1, -1))
    if int(depth.max()) <= MAX_NESTING:
        return None
    level = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            level += 1
            if level > MAX_NESTING:
                return match.start()
        elif token in "]}":
            level -= 1
    return 0  # unreachable for the same text; kept as a safe answer


def parse_json(text: str, path: str | Path, first_line: int = 1, todo: str = "fix or re-download the file") -> Any:
    """``json.loads(text)`` for the text of ``path`` starting at line ``first_line``; ``DataError`` on invalid JSON,
    nesting deeper than ``MAX_NESTING`` or a number too long to convert, naming the line and saying ``todo``."""
    deep = _too_deep_at(text)
    if deep is not None:
        line = first_line + text.count("\n", 0, deep)
        raise DataError(
            f"{path}: line {line}: JSON nested deeper than {MAX_NESTING} levels (the annotation formats need at most "
            "4); this is not an annotation file, or it is damaged: use the original file"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {first_line + exc.lineno - 1}: invalid JSON ({exc.msg}); {todo}") from exc
    except (ValueError, RecursionError) as exc:  # an integer beyond Python's digit limit; nesting is pre-checked
        where = f"line {first_line}: " if "\n" not in text.rstrip("\n") else ""
        raise DataError(f"{path}: {where}JSON that cannot be read ({exc}); {todo}") from exc


def load_json(path: str | Path, missing_hint: str = "check the path flags") -> Any:
    """The JSON document of ``path`` (UTF-8, optional BOM), with the checks of ``parse_json``."""
    return parse_json(read_text(path, missing_hint), path)
