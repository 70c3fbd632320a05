"""The restricted unpickler: built-in data loads, anything that needs a global is refused before it runs."""

import json
import os
import pickle
import struct

import numpy as np
import pytest

from dataloaders.errors import DataError
from dataloaders.safe_pickle import EXPANSION_FACTOR, EXPANSION_SLACK, pickle_to_json, safe_load_pickle

RAW_CAPTIONS = {
    "-4wsuPCjDBc_5_15": [["a", "squirrel", "is", "eating", "a", "peanut"], ["a", "chipmunk", "eats"]],
    "vid2": [["someone", "slices", "an", "onion"]],
}


class _SystemCall:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpenCall:
    """Unpickling this opens (creates) the marker file for writing."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload_class", [_SystemCall, _OpenCall])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_before_running(tmp_path, payload_class, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(pickle.dumps({"vid1": [["a"]], "evil": payload_class(marker)}, protocol=protocol))
    with pytest.raises(DataError) as info:
        safe_load_pickle(path)
    assert str(path) in str(info.value) and "built-in containers and strings" in str(info.value)
    assert not marker.exists()


def test_numpy_array_is_refused(tmp_path):
    path = tmp_path / "array.pkl"
    path.write_bytes(pickle.dumps({"vid1": np.zeros(3)}, protocol=4))
    with pytest.raises(DataError, match="numpy"):
        safe_load_pickle(path)


@pytest.mark.parametrize("protocol", [2, 4])
def test_raw_captions_round_trip(tmp_path, protocol):
    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(pickle.dumps(RAW_CAPTIONS, protocol=protocol))
    assert safe_load_pickle(path) == RAW_CAPTIONS


def test_builtin_scalars_load(tmp_path):
    data = {"i": 3, "f": 2.5, "b": True, "n": None, "t": (1, "x"), "bytes": b"\x00\x01", "set": {1, 2}}
    path = tmp_path / "scalars.pkl"
    path.write_bytes(pickle.dumps(data, protocol=4))
    assert safe_load_pickle(path) == data


def test_pickle_to_json(tmp_path):
    source = tmp_path / "raw-captions.pkl"
    source.write_bytes(pickle.dumps(RAW_CAPTIONS, protocol=2))
    target = tmp_path / "raw-captions.json"
    pickle_to_json(source, target)
    assert json.loads(target.read_text()) == RAW_CAPTIONS


def test_corrupt_and_missing_files(tmp_path):
    truncated = tmp_path / "cut.pkl"
    truncated.write_bytes(pickle.dumps(RAW_CAPTIONS, protocol=4)[:-10])
    with pytest.raises(DataError, match="cut.pkl"):
        safe_load_pickle(truncated)
    with pytest.raises(DataError, match="not found"):
        safe_load_pickle(tmp_path / "absent.pkl")


def _laughs(levels: int, width: int = 10) -> list:
    """``width`` references to a list of ``width`` references to ... ``levels`` deep: width**levels leaves."""
    value: list = ["lol"] * width
    for _ in range(levels - 1):
        value = [value] * width
    return value


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_billion_laughs_pickle_is_refused(tmp_path, protocol):
    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(pickle.dumps({"vid": _laughs(10)}, protocol=protocol))  # a few hundred bytes, 10**10 leaves
    assert path.stat().st_size < 1000
    with pytest.raises(DataError) as info:
        safe_load_pickle(path)
    budget = EXPANSION_FACTOR * path.stat().st_size + EXPANSION_SLACK
    assert str(info.value).startswith(f"{path}: expands to more than {budget} elements or characters from ")
    small = {"vid": _laughs(3)}  # 1,000 leaves from shared lists: far inside the budget, loads
    path.write_bytes(pickle.dumps(small, protocol=protocol))
    assert safe_load_pickle(path) == small


def test_shared_long_strings_count_their_characters(tmp_path):
    """One 100,000-character word referenced 10,000 times: few elements, 10**9 characters when joined."""
    word = "w" * 100_000
    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(pickle.dumps({"vid": [[word] * 10_000]}, protocol=4))
    with pytest.raises(DataError, match="expands to more than"):
        safe_load_pickle(path)


def test_self_reference_and_deep_nesting_are_refused(tmp_path):
    loop: list = []
    loop.append(loop)
    path = tmp_path / "loop.pkl"
    path.write_bytes(pickle.dumps(loop, protocol=2))
    with pytest.raises(DataError, match=r"loop.pkl: nested deeper than 64 levels"):
        safe_load_pickle(path)
    deep: list = []
    for _ in range(63):
        deep = [deep]
    path.write_bytes(pickle.dumps(deep, protocol=4))
    assert safe_load_pickle(path) == deep  # 64 nested lists: the bound itself, as for JSON
    path.write_bytes(pickle.dumps([deep], protocol=4))
    with pytest.raises(DataError, match="nested deeper than 64 levels"):
        safe_load_pickle(path)


def test_length_field_beyond_the_file_is_not_allocated(tmp_path):
    """BINUNICODE8 announcing 2**40 bytes in an 14-byte file: read from memory, truncated, nothing allocated."""
    path = tmp_path / "huge.pkl"
    path.write_bytes(b"\x80\x04\x8d" + struct.pack("<Q", 2**40) + b"abc")
    with pytest.raises(DataError, match=r"huge.pkl: not a readable pickle \(UnpicklingError: pickle data was trunc"):
        safe_load_pickle(path)


def test_real_sized_captions_pickle_loads(tmp_path):
    """A raw-captions.pkl the size of MSVD's (80,000 captions) is far inside the expansion budget."""
    captions = {f"vid{i}": [f"a man is doing thing {j} of {i}".split() for j in range(40)] for i in range(2000)}
    path = tmp_path / "raw-captions.pkl"
    path.write_bytes(pickle.dumps(captions, protocol=2))
    assert safe_load_pickle(path) == captions
