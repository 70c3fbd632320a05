"""MCQ-CLIP checkpoints (MCQ_HMMC.md C.3): ``{'arch', 'epoch', 'state_dict', 'optimizer', 'monitor_best', 'config'}``
with a pickled config object and an OpenAI-layout CLIP under ``module.``, read weights-only with the objects dropped
and nothing from the pickle executed."""

from __future__ import annotations

import argparse
import configparser
import copy
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dataloaders.errors import CheckpointError
from dataloaders.safe_pickle import safe_torch_load
from engine.builders import load_init_model
from engine.checkpoint import load_weights
from modules import published_keys
from modules.clip_model import load_clip
from tests.fusion_fixtures import tiny_model


def touch_marker(path: str) -> None:
    """What the malicious ``__reduce__`` below would run."""
    Path(path).write_text("code from the pickle ran")


class ExperimentConfig:
    """Stands for MCQ's ``parse_config.ConfigParser``: plain attributes plus an object whose unpickling runs code."""

    def __init__(self, marker: Path) -> None:
        self.config = {"arch": {"type": "CLIP"}, "optimizer": {"lr": 1e-5}}
        self.save_dir = Path("/exp/models")
        self.args = argparse.Namespace(device="0")
        self.payload = Payload(str(marker))


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (touch_marker, (self.marker,))


class ItemsConfig(dict):
    """A dict subclass: pickled as the class plus items written into it, which cannot be skipped safely."""


def clip_weights() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_model(seed=3).encoder.clip.state_dict().items()}


def write_mcq_checkpoint(path: Path, state: dict[str, torch.Tensor], marker: Path, config: object = None) -> Path:
    parser = configparser.ConfigParser()
    parser["trainer"] = {"epochs": "10", "save_dir": "/exp"}
    wrapped = {f"module.{k}": v for k, v in state.items()}
    wrapped["module.mcq_head.weight"] = torch.ones(2, 3)  # a tensor the CLIP does not have
    torch.save(
        {
            "arch": "CLIP",
            "epoch": 9,
            "state_dict": wrapped,
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-5, "params": [0]}]},
            "monitor_best": 0.33,
            "config": ExperimentConfig(marker) if config is None else config,
            "parser": parser,
        },
        path,
    )
    return path


@pytest.fixture
def mcq_file(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    marker = tmp_path / "marker"
    state = clip_weights()
    return write_mcq_checkpoint(tmp_path / "MCQ_CLIP.pth", state, marker), marker, state


def test_plain_weights_only_load_refuses_the_file(mcq_file) -> None:
    path, marker, _ = mcq_file
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(path, weights_only=True)
    assert any(name.endswith("touch_marker") for name in torch.serialization.get_unsafe_globals_in_checkpoint(path))
    assert not marker.exists()


def test_visual_pretrain_path_loads_the_same_tensors_and_runs_no_pickled_code(mcq_file, caplog) -> None:
    path, marker, state = mcq_file
    with caplog.at_level(logging.WARNING, logger="modules.clip_model"):
        clip = load_clip(path)
    loaded = clip.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value.float()), key
    assert not marker.exists()  # the __reduce__ callable was never called
    assert any("mcq_head.weight" in r.getMessage() for r in caplog.records)  # the extra tensor is reported
    copy.deepcopy(ExperimentConfig(marker))  # control: reconstructing the object the usual way does run the code
    assert marker.exists()


def test_dropped_objects_and_kept_entries(mcq_file) -> None:
    path, marker, _ = mcq_file
    data, dropped = safe_torch_load(path, "convert it")
    assert set(data) == {"arch", "epoch", "state_dict", "optimizer", "monitor_best"}  # config and parser dropped
    assert (data["arch"], data["epoch"], data["monitor_best"]) == ("CLIP", 9, 0.33)
    assert data["optimizer"]["param_groups"] == [{"lr": 1e-5, "params": [0]}]
    assert any(name.endswith("ExperimentConfig") for name in dropped) and "argparse.Namespace" in dropped
    assert not marker.exists()


def test_init_model_reports_missing_and_unexpected_and_strict_refuses(mcq_file) -> None:
    path, marker, state = mcq_file
    model = tiny_model(seed=0)
    report = load_init_model(argparse.Namespace(init_model=str(path)), model)
    assert report.unexpected == ["encoder.clip.mcq_head.weight"]
    clip_keys = {f"encoder.clip.{k}" for k in state}
    expected_missing = sorted(k for k in model.state_dict() if k not in clip_keys)
    assert sorted(report.missing) == expected_missing and expected_missing  # the fusion etc. are not in the file
    assert report.loaded == len(state)
    for key, value in state.items():
        assert torch.equal(model.encoder.clip.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match=r"missing .*fusion.*; unexpected encoder\.clip\.mcq_head\.weight"):
        load_weights(path, tiny_model(seed=0), key_map=published_keys.openai_clip_to_ours, strict=True)
    assert not marker.exists()


def test_objects_that_cannot_be_skipped_give_one_line_error(tmp_path: Path) -> None:
    config = ItemsConfig(lr=1.0)
    path = write_mcq_checkpoint(tmp_path / "items.pth", clip_weights(), tmp_path / "marker", config=config)
    with pytest.raises(CheckpointError) as info:
        load_clip(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "ItemsConfig" in message and "safetensors" in message
    assert "SETITEM" in message and "weights_only` set to `False`" not in message


def test_converter_cli_writes_the_state_dict_as_safetensors(mcq_file, tmp_path: Path, capsys) -> None:
    path, marker, state = mcq_file
    out = tmp_path / "MCQ_CLIP.safetensors"
    assert published_keys.main(["--to_safetensors", str(path), str(out)]) == 0
    converted = load_file(str(out))
    assert set(converted) == set(state) | {"mcq_head.weight"}  # module. stripped
    for key, value in state.items():
        assert torch.equal(converted[key], value), key
    from_safetensors, from_pickle = load_clip(out).state_dict(), load_clip(path).state_dict()
    assert all(torch.equal(from_safetensors[k], from_pickle[k]) for k in from_pickle)
    assert published_keys.main(["--to_safetensors", str(tmp_path / "absent.pth"), str(out)]) == 1
    assert "absent.pth" in capsys.readouterr().err
    assert not marker.exists()
