"""Load pickles that hold only built-in data (MSVD's ``raw-captions.pkl``) without running any code.

``pickle.load`` can execute arbitrary code through ``__reduce__``. The unpickler here refuses every global
look-up (``find_class``), so only what the pickle opcodes build directly can load: dict, list, tuple, str, int,
float, bool and None at every protocol, plus bytes (protocol 3+), set/frozenset (4+) and bytearray (5), which
older protocols spell as global calls. Anything else (objects, numpy arrays, ``os.system`` calls) raises
``DataError`` before it is created.

Sizes are bounded too. The file is read whole first, so a length field promising more bytes than the file holds
fails instead of allocating them. Memo references (``GET``/``DUP``) let a few bytes name the same container many
times ("billion laughs": ten references to a list of ten references to ...), so the loaded object would expand
enormously when walked (joined, compared, converted to JSON). After loading, the object graph is walked once,
counting every reference as a visit: more than ``EXPANSION_FACTOR`` x the file size (plus ``EXPANSION_SLACK``)
elements or string characters, or nesting deeper than ``MAX_NESTING``, is a ``DataError`` naming the file.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any, NoReturn

from dataloaders.errors import DataError
from dataloaders.textio import MAX_NESTING

EXPANSION_FACTOR = 64  # a plain pickle spends at least one byte per element it holds; memo references much less
EXPANSION_SLACK = 1 << 16
_CONTAINERS = (dict, list, tuple, set, frozenset)
_SIZED = (str, bytes, bytearray)


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    """An unpickler whose global look-up always fails, naming the file."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> NoReturn:
        raise DataError(
            f"{self._path}: contains objects other than built-in containers and strings (wants {module}.{name}); "
            "refusing to unpickle it. Convert it to JSON in a trusted environment, e.g. "
            "json.dump(pickle.load(open(path, 'rb')), open(path.replace('.pkl', '.json'), 'w')), and use the .json"
        )

    def persistent_load(self, pid: Any) -> NoReturn:
        raise DataError(f"{self._path}: uses persistent ids ({pid!r}); only plain built-in data can be loaded")


def _check_expansion(data: Any, path: Path, size: int, budget: int) -> None:
    """Walk ``data`` (iteratively, shared parts once per reference); ``DataError`` when it holds more than ``budget``
    elements or string characters, or nests deeper than ``MAX_NESTING``."""
    elements = characters = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        elements += 1
        if isinstance(value, _SIZED):
            characters += len(value)
        elif isinstance(value, _CONTAINERS):
            if depth >= MAX_NESTING:
                raise DataError(
                    f"{path}: nested deeper than {MAX_NESTING} levels (captions need 3); this is not a caption file, "
                    "or it is damaged: use the original file"
                )
            children = [x for item in value.items() for x in item] if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
        if elements > budget or characters > budget:
            raise DataError(
                f"{path}: expands to more than {budget} elements or characters from {size} bytes "
                "(repeated references to shared parts, a 'billion laughs' pickle); refusing it: use the original "
                "file, or convert a trusted copy to JSON"
            )


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` allowing only built-in containers, strings, bytes, numbers, bool and None, whose walked size
    is at most ``EXPANSION_FACTOR`` x the file size + ``EXPANSION_SLACK`` elements and characters."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = _BuiltinsOnlyUnpickler(io.BytesIO(raw), path).load()
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found; check the --data_path flag") from exc
    except Exception as exc:  # no code runs here (every global is refused): any other failure is malformed bytes
        # (the C unpickler raises UnpicklingError, EOFError, ValueError, AttributeError, MemoryError for a huge
        # length field, ...), so it is reported as a bad file.
        raise DataError(
            f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); re-create or re-download the file"
        ) from exc
    _check_expansion(data, path, len(raw), EXPANSION_FACTOR * len(raw) + EXPANSION_SLACK)
    return data


def pickle_to_json(pickle_path: str | Path, json_path: str | Path) -> None:
    """Convert a built-ins-only pickle to JSON (tuples become lists), loading it with ``safe_load_pickle``."""
    data = safe_load_pickle(pickle_path)
    try:
        text = json.dumps(data, ensure_ascii=False)
    except TypeError as exc:
        raise DataError(f"{pickle_path}: holds data JSON cannot store ({exc}); keep using the pickle") from exc
    Path(json_path).write_text(text, encoding="utf-8")
