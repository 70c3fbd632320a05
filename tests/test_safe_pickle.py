"""The restricted unpickler: built-in data loads, anything that needs a global is refused before it runs."""

import json
import os
import pickle

import numpy as np
import pytest

from dataloaders.errors import DataError
from dataloaders.safe_pickle import pickle_to_json, safe_load_pickle

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
