"""Untrusted files: a pickle whose loading would run code is refused by every loader that accepts a file, before the
code runs; and the project's source never unpickles or evaluates untrusted input.

tests/test_checkpoint.py::test_no_unrestricted_unpickling_in_the_code covers ``pickle.load(s)`` and
``weights_only=False``; the walk here extends it to ``torch.load`` without ``weights_only=True``, aliased pickle
imports, ``eval``/``exec`` and ``marshal``.
"""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from dataloaders.errors import CheckpointError, DataError, MemBridgeError
from dataloaders.safe_pickle import safe_load_pickle
from engine import checkpoint as ckpt
from modules.clip_model import load_clip
from tests.conftest import REPO

UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
UNSAFE_BUILTINS = {"eval", "exec"}


class _WritesMarker:
    """Unpickling this calls ``Path.write_text`` on the marker: code runs if the loader trusts the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _payload(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps({"weight": _WritesMarker(marker)}, protocol=protocol)


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Plain unpickling (in a child process) does run the payload: the refusals below are meaningful."""
    marker, file = tmp_path / "marker", tmp_path / "evil.pkl"
    file.write_bytes(_payload(marker))
    code = "import pickle, sys; pickle.Unpickler(open(sys.argv[1], 'rb')).load()"
    subprocess.run([sys.executable, "-c", code, str(file)], check=True, timeout=60)
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_raw_captions_pickle(tmp_path: Path, protocol: int) -> None:
    marker, file = tmp_path / "marker", tmp_path / "raw-captions.pkl"
    file.write_bytes(_payload(marker, protocol))
    with pytest.raises(DataError, match="refusing to unpickle") as info:
        safe_load_pickle(file)
    assert str(file) in str(info.value)
    assert not marker.exists()


def _torch_saved(tmp_path: Path, marker: Path, name: str) -> Path:
    """A torch.save zip archive whose data.pkl holds the payload next to a real tensor."""
    file = tmp_path / name
    torch.save({"weight": torch.zeros(2, 2), "evil": _WritesMarker(marker)}, file)
    return file


def _legacy_pickle(tmp_path: Path, marker: Path, name: str) -> Path:
    """A bare pickle named like a weights file (the pre-zip torch format)."""
    file = tmp_path / name
    file.write_bytes(_payload(marker))
    return file


def _torchscript_with_payload(tmp_path: Path, marker: Path, name: str, member: str) -> Path:
    """A real TorchScript archive whose ``member`` (constants.pkl / data.pkl) is replaced by the payload."""
    scripted = tmp_path / f"scripted-{name}"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), scripted)
    file = tmp_path / name
    with zipfile.ZipFile(scripted) as source, zipfile.ZipFile(file, "w") as target:
        for entry in source.namelist():
            target.writestr(entry, _payload(marker) if entry.endswith(f"/{member}") else source.read(entry))
    return file


FILE_MAKERS = {
    "torch.save .bin": lambda tmp, marker: _torch_saved(tmp, marker, "pytorch_model.bin"),
    "legacy pickle .pt": lambda tmp, marker: _legacy_pickle(tmp, marker, "model.pt"),
    "torchscript constants.pkl": lambda tmp, marker: _torchscript_with_payload(tmp, marker, "a.pt", "constants.pkl"),
    "torchscript data.pkl": lambda tmp, marker: _torchscript_with_payload(tmp, marker, "b.pt", "data.pkl"),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind", sorted(FILE_MAKERS))
def test_init_model_weights(tmp_path: Path, kind: str) -> None:
    """``--init_model`` (engine.checkpoint.load_weights)."""
    marker = tmp_path / "marker"
    file = FILE_MAKERS[kind](tmp_path, marker)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_weights(file, nn.Linear(2, 2))
    assert str(file) in str(info.value)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind", sorted(FILE_MAKERS))
def test_visual_pretrain_path(tmp_path: Path, kind: str) -> None:
    """``--visual_pretrain_path`` (modules.clip_model.load_clip)."""
    marker = tmp_path / "marker"
    file = FILE_MAKERS[kind](tmp_path, marker)
    with pytest.raises(CheckpointError) as info:
        load_clip(path=file)
    assert str(file) in str(info.value)
    assert not marker.exists()


def test_resume_checkpoint_state(tmp_path: Path) -> None:
    """``--resume`` (engine.checkpoint.load_checkpoint): a real checkpoint whose state.pt was swapped for a payload."""
    model = nn.Linear(2, 2)
    step_dir = ckpt.save_checkpoint(tmp_path, 3, model, is_main=True)
    marker = tmp_path / "marker"
    (step_dir / ckpt.STATE_FILENAME).unlink()
    torch.save({"format_version": ckpt.FORMAT_VERSION, "evil": _WritesMarker(marker)}, step_dir / ckpt.STATE_FILENAME)
    with pytest.raises(CheckpointError, match="cannot be read") as info:
        ckpt.load_checkpoint(tmp_path, nn.Linear(2, 2))
    assert str(step_dir / ckpt.STATE_FILENAME) in str(info.value)
    assert not marker.exists()


def test_resume_state_that_is_not_a_dict(tmp_path: Path) -> None:
    step_dir = ckpt.save_checkpoint(tmp_path, 1, nn.Linear(2, 2), is_main=True)
    torch.save([torch.zeros(1)], step_dir / ckpt.STATE_FILENAME)
    with pytest.raises(CheckpointError, match="holds a list, not checkpoint state"):
        ckpt.load_checkpoint(step_dir, nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------- damaged weights


def _damage(file: Path, how: str, state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` to ``file`` as safetensors, then damage it ``how``."""
    if how == "nan tensor":
        first = sorted(state)[0]
        state = {**state, first: state[first].clone().fill_(float("nan"))}
        state[first].view(-1)[0] = float("inf")
    if how == "no matching names":
        state = {f"unrelated/{name}": value for name, value in state.items()}  # not a wrapper prefix either
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, file)
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) * 2 // 3])
    elif how == "garbage bytes":
        file.write_bytes(bytes(range(256)) * 8)
    elif how == "truncated header":
        file.write_bytes(data[:20])


DAMAGES = ["truncated", "truncated header", "garbage bytes", "nan tensor", "no matching names"]


def _assert_one_line_naming(info: pytest.ExceptionInfo, file: Path, how: str) -> None:
    message = str(info.value)
    assert str(file) in message and "\n" not in message, message
    if how == "nan tensor":
        assert "NaN or infinite" in message
    if how == "no matching names":
        assert any(part in message for part in ("none of its", "not a CLIP checkpoint", "missing weight, bias"))


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_init_model_weights(tmp_path: Path, how: str) -> None:
    """``--init_model``: each damage is one CheckpointError line naming the file; the model keeps its weights."""
    torch.manual_seed(0)
    file = tmp_path / "w.safetensors"
    _damage(file, how, nn.Linear(3, 2).state_dict())
    target = nn.Linear(3, 2)
    before = target.weight.detach().clone()
    with pytest.raises(CheckpointError) as info:
        ckpt.load_weights(file, target)
    _assert_one_line_naming(info, file, how)
    assert torch.equal(target.weight.detach(), before)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_resume_checkpoint(tmp_path: Path, how: str) -> None:
    """``--resume``: a real checkpoint whose model.safetensors was damaged."""
    torch.manual_seed(0)
    step_dir = ckpt.save_checkpoint(tmp_path, 2, nn.Linear(3, 2), is_main=True)
    file = step_dir / ckpt.WEIGHTS_FILENAME
    _damage(file, how, nn.Linear(3, 2).state_dict())
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(tmp_path, nn.Linear(3, 2))
    _assert_one_line_naming(info, file, how)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_visual_pretrain_path(tmp_path: Path, how: str) -> None:
    """``--visual_pretrain_path``: a CLIP state dict (the tiny config) damaged the same ways."""
    file = tmp_path / "clip.safetensors"
    _damage(file, how, load_clip(config=REPO / "CLIP-modules" / "tiny.json").state_dict())
    with pytest.raises(CheckpointError) as info:
        load_clip(path=file)
    _assert_one_line_naming(info, file, how)


def test_a_weights_file_with_zero_tensors_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "empty.safetensors"
    safetensors.torch.save_file({}, file)
    with pytest.raises(CheckpointError, match="none of its 0 tensors") as info:
        ckpt.load_weights(file, nn.Linear(3, 2))
    assert str(file) in str(info.value)


# ------------------------------------------------------------------------------------------------ source walk


def forbidden_calls(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` of every call that could run code from a file: ``eval``/``exec``, any load from a pickling
    module (also through ``import pickle as p`` / ``from pickle import load``), and ``torch.load`` without a literal
    ``weights_only=True``."""
    tree = ast.parse(source)
    module_aliases: dict[str, str] = {}
    loader_aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module_aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module in UNPICKLING_MODULES:
            for alias in node.names:
                if alias.name in ("load", "loads", "Unpickler", "open"):
                    loader_aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name):
            if func.id in UNSAFE_BUILTINS:
                found.append((node.lineno, f"{func.id}()"))
            elif func.id in loader_aliases:
                found.append((node.lineno, loader_aliases[func.id]))
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            module = module_aliases.get(func.value.id, func.value.id)
            if module in UNPICKLING_MODULES and func.attr in ("load", "loads", "open"):
                found.append((node.lineno, f"{module}.{func.attr}"))
            if module == "torch" and func.attr == "load":
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    found.append((node.lineno, "torch.load without weights_only=True"))
    return found


def test_forbidden_calls_are_detected() -> None:
    source = (
        "import pickle as p, torch, marshal\nfrom pickle import loads as l\n"
        "p.load(f)\nl(b)\ntorch.load(x)\ntorch.load(x, weights_only=True)\neval('1')\nexec('x=1')\n"
        "marshal.loads(b)\nmodel.eval()\ntorch.jit.load(x)\n"
    )
    assert [line for line, _ in forbidden_calls(source)] == [3, 4, 5, 7, 8, 9]


def test_no_code_running_loads_in_the_project() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{line} {what}"
        for path in sorted(REPO.rglob("*.py"))
        if not {".venv", ".git"} & set(path.parts)
        for line, what in forbidden_calls(path.read_text(errors="replace"))
    ]
    assert offenders == []


def test_errors_share_the_project_base() -> None:
    """The refusals above are the project's own errors (callers catch MemBridgeError)."""
    assert issubclass(CheckpointError, MemBridgeError) and issubclass(DataError, MemBridgeError)
