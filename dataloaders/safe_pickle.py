"""Load pickles that hold only built-in data (MSVD's ``raw-captions.pkl``) without running any code.

``pickle.load`` can execute arbitrary code through ``__reduce__``. The unpickler here refuses every global
look-up (``find_class``), so only what the pickle opcodes build directly can load: dict, list, tuple, str, int,
float, bool and None at every protocol, plus bytes (protocol 3+), set/frozenset (4+) and bytearray (5), which
older protocols spell as global calls. Anything else (objects, numpy arrays, ``os.system`` calls) raises
``DataError`` before it is created.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, NoReturn

from dataloaders.errors import DataError


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


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` allowing only built-in containers, strings, bytes, numbers, bool and None."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return _BuiltinsOnlyUnpickler(handle, path).load()
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


def pickle_to_json(pickle_path: str | Path, json_path: str | Path) -> None:
    """Convert a built-ins-only pickle to JSON (tuples become lists), loading it with ``safe_load_pickle``."""
    data = safe_load_pickle(pickle_path)
    try:
        text = json.dumps(data, ensure_ascii=False)
    except TypeError as exc:
        raise DataError(f"{pickle_path}: holds data JSON cannot store ({exc}); keep using the pickle") from exc
    Path(json_path).write_text(text, encoding="utf-8")
