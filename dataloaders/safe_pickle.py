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

``safe_torch_load`` reads ``torch.save`` files weights-only; objects of classes torch's weights-only unpickler does
not allow (a training checkpoint's pickled config) are replaced by an inert stand-in and dropped, never constructed.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any, NoReturn

from dataloaders.errors import CheckpointError, DataError
from dataloaders.textio import MAX_NESTING

logger = logging.getLogger(__name__)

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


class DroppedObject:
    """Inert stand-in for a pickled object of a class that is not allowed (``weights_only``), e.g. the
    ``ConfigParser`` MCQ stores under ``checkpoint['config']``. Its constructor, ``__setstate__`` and item/append
    methods accept anything and keep nothing, so the pickle's own code (``__reduce__`` callables, ``__setstate__``,
    class constructors) never runs: the weights-only unpickler calls this class in place of every such global."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "DroppedObject()"


def _without_dropped(value: Any) -> Any:
    """``value`` with every ``DroppedObject`` (and container entry holding one) removed from dicts and lists."""
    if isinstance(value, dict):
        kept = {k: _without_dropped(v) for k, v in value.items() if not isinstance(v, DroppedObject)}
        return type(value)(kept) if type(value) is not dict else kept
    if isinstance(value, list):
        return [_without_dropped(v) for v in value if not isinstance(v, DroppedObject)]
    return value


def _torch_load_reason(error: Exception) -> str:
    """The one-line core of a ``torch.load`` error (torch's advice to retry with ``weights_only=False`` left out)."""
    text = " ".join(str(error).split()) or type(error).__name__
    match = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    return match.group(1) if match else text


def safe_torch_load(path: str | Path, convert_hint: str) -> tuple[Any, list[str]]:
    """``torch.load(path, weights_only=True)``; when the file also pickles objects of classes that are not allowed
    (a training checkpoint's config, paths, argparse namespaces), those objects are dropped instead: the globals the
    pickle names (found by disassembling it, nothing executed) are each mapped to :class:`DroppedObject`, the file is
    read again by torch's weights-only unpickler, and every ``DroppedObject`` is removed from the result's dicts and
    lists. Returns ``(data, dropped_globals)``.

    Raises ``CheckpointError`` (one line naming the file and ``convert_hint``) when the file cannot be read even so:
    not a ``torch.save`` zip archive, damaged, or its objects cannot be skipped safely (e.g. items written into one).
    """
    import torch  # here: the caption-pickle readers above stay free of torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except Exception as first:  # torch raises UnpicklingError, RuntimeError, ... for unknown globals and bad files
        reason = _torch_load_reason(first)
        try:
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as scan_error:  # not a zip archive written by torch.save, or not a pickle
            raise CheckpointError(
                f"{path}: cannot read the file with torch.load(weights_only=True) ({reason}); {convert_hint}"
            ) from scan_error
        if not names:
            raise CheckpointError(f"{path}: cannot read the file ({reason}); {convert_hint}") from first
    try:
        with torch.serialization.safe_globals([(DroppedObject, name) for name in names]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as second:
        raise CheckpointError(
            f"{path}: cannot read the file: it holds pickled objects of {len(names)} classes "
            f"({', '.join(names[:12])}) that cannot be skipped safely ({_torch_load_reason(second)}); "
            f"{convert_hint}"
        ) from second
    logger.info("%s: dropped pickled non-tensor objects of %d disallowed classes: %s", path, len(names), names[:8])
    return _without_dropped(data), names
