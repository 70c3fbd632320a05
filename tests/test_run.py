"""The run skeleton (engine/run.py), the model config stored with checkpoints, CLIP sizes from the weights being
loaded, and the flags that act on a built model (fp16 in stage 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import main_task_fusion
from dataloaders.errors import CheckpointError, ConfigError
from engine import checkpoint as ckpt
from engine import run as engine_run
from engine.builders import build_clip, build_model
from engine.distributed import DistInfo
from engine.flags import build_parser
from engine.run import Job, execute
from modules.clip_model import CLIPConfig
from modules.model_config import ModelConfig, build_membridge, read_model_config
from tests.conftest import REPO

TINY = str(REPO / "CLIP-modules" / "tiny.json")
FUSION_TINY = str(REPO / "CLIP-modules" / "fusion-tiny.json")
DIST = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def fusion_args(tmp_path: Path, *extra: str):
    argv = ["--do_train", "--output_dir", str(tmp_path / "out"), "--cross_config_path", FUSION_TINY]
    argv += ["--max_frames", "4", "--max_words", "12", *extra]
    return build_parser("fusion").parse_args(argv)


def save_stage1(tmp_path: Path, seed: int = 0) -> Path:
    """A tiny stage-1 checkpoint written by the engine (its model config in the weights' metadata)."""
    torch.manual_seed(seed)
    model = build_model(fusion_args(tmp_path, "--clip_config", TINY), with_fusion=False)
    ckpt.save_checkpoint(tmp_path / "stage1", 1, model, is_main=True)
    return tmp_path / "stage1" / "ckpt" / "step-1"


# ------------------------------------------------------------------------------------------------ model config


def test_model_config_travels_with_the_checkpoint_and_rebuilds_the_model(tmp_path):
    model = build_model(fusion_args(tmp_path, "--clip_config", TINY, "--num_bridge_tokens", "3"), with_fusion=True)
    path = ckpt.save_checkpoint(tmp_path / "run", 7, model, is_main=True)
    config = read_model_config(path)
    assert config == model.model_config
    assert (config.clip.vision_width, config.fusion.num_bridge_tokens, config.max_frames) == (64, 3, 4)
    rebuilt = build_membridge(config)
    ckpt.load_weights(path, rebuilt, strict=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    assert ModelConfig.from_dict(json.loads(config.to_json())) == config
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    assert read_model_config(plain) is None  # foreign weights record nothing


def test_stage2_takes_the_clip_sizes_from_init_model(tmp_path):
    stage1 = save_stage1(tmp_path)
    tiny = CLIPConfig.from_json(TINY)
    # no --clip_config: the default would be ViT-B/16; the stored config says tiny
    model = build_model(fusion_args(tmp_path, "--init_model", str(stage1)), with_fusion=True)
    assert model.encoder.clip.config == tiny
    assert model.fusion.config.width == tiny.embed_dim
    # a plain state dict (no stored config): sizes from the tensor shapes, heads width // 64
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("encoder.")}, str(plain))
    inferred = build_model(fusion_args(tmp_path, "--init_model", str(plain)), with_fusion=True).encoder.clip.config
    assert (inferred.vision_width, inferred.vision_layers, inferred.transformer_layers) == (64, 3, 4)
    assert inferred.vision_heads == 1 and inferred.transformer_heads == 1
    # --clip_config with the same shapes sets the heads; with other shapes it is refused, naming the checkpoint
    heads = build_model(fusion_args(tmp_path, "--init_model", str(plain), "--clip_config", TINY), with_fusion=True)
    assert heads.encoder.clip.config.vision_heads == 2
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**tiny.to_dict(), "vision_layers": 2}))
    with pytest.raises(CheckpointError, match="plain.safetensors.*vision_layers"):
        build_model(fusion_args(tmp_path, "--init_model", str(plain), "--clip_config", str(other)), with_fusion=True)


def test_visual_pretrain_path_keeps_the_head_counts_of_clip_config(tmp_path):
    clip = build_clip(fusion_args(tmp_path, "--clip_config", TINY))
    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    inferred = build_clip(fusion_args(tmp_path, "--visual_pretrain_path", str(weights)))
    assert inferred.config.vision_heads == 1  # OpenAI's width // 64 without a config
    given = build_clip(fusion_args(tmp_path, "--visual_pretrain_path", str(weights), "--clip_config", TINY))
    assert (given.config.vision_heads, given.config.transformer_heads) == (2, 2)
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(given.encode_image(images), clip.encode_image(images), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- skeleton


class Constant(torch.nn.Module):
    """A task whose single weight the fake training loop sets; evaluations read it back."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))


def test_execute_selects_on_validation_and_tests_the_best_weights_once(tmp_path, monkeypatch):
    task = Constant()
    val_scores = {1.0: 10.0, 2.0: 30.0, 3.0: 20.0}  # weight after epoch -> validation metric
    tested = []

    def fake_fit(args, task, train_set, dist, evaluate):
        assert args.eval_every_epoch  # selection validates every epoch
        for epoch in (1.0, 2.0, 3.0):
            with torch.no_grad():
                task.weight.fill_(epoch)
            evaluate(task)
        return {}

    monkeypatch.setattr(engine_run, "fit", fake_fit)
    args = build_parser("clip").parse_args(["--do_train", "--output_dir", str(tmp_path)])
    job = Job(
        task,
        train_set=lambda: [],
        test=lambda t: tested.append(float(t.weight)) or {"t2v_R1": 100.0 * float(t.weight)},
        val=lambda t: {"score": val_scores[float(t.weight)]},
        selection_metric="score",
    )
    metrics = execute(args, job, DIST)
    assert tested == [2.0]  # the test split once, with the weights of the best validation run
    assert metrics == {"t2v_R1": 200.0, "best_val_score": 30.0, "best_val_run": 2, "val_score": 30.0}
    written = json.loads((tmp_path / "eval_results.json").read_text())
    assert written["tag"] == "test" and written["best_val_run"] == 2
    with safe_open(tmp_path / "best_model.safetensors", framework="pt") as handle:
        assert float(handle.get_tensor("weight")) == 2.0


def test_evaluation_only_needs_a_test_evaluation(tmp_path):
    args = build_parser("clip").parse_args(["--do_eval", "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="--val_csv"):
        execute(args, Job(Constant()), DIST)


ENTRY_MODULES = (
    "main_task_clip",
    "main_task_fusion",
    "video_text_retrieval.main_task_retrieval",
    "video_captioning.main_task_caption",
    "video_qa.main_task_qa",
)


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_every_entry_script_ends_a_project_error_with_one_line(module, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", module, "--do_train", "--output_dir", str(tmp_path), "--batch_size", "0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == engine_run.EXIT_ERROR
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid flags"), proc.stderr
    assert "--batch_size must be >= 1" in lines[0] and "Traceback" not in proc.stderr
    if module == ENTRY_MODULES[0]:  # MEMBRIDGE_DEBUG lives in the one engine.run.cli all five share: checked once
        debug = subprocess.run(cmd, cwd=REPO, env={**env, "MEMBRIDGE_DEBUG": "1"}, capture_output=True, text=True)
        assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


# ------------------------------------------------------------------------------------------------ fp16 stage 2


def test_stage2_fp16_trains_half_precision_fusion_weights(synthetic_small, tmp_path):
    stage1 = save_stage1(tmp_path)
    out = tmp_path / "fp16"
    main_task_fusion.main([
        "--do_train", "--output_dir", str(out), "--init_model", str(stage1), "--cross_config_path", FUSION_TINY,
        "--train_csv", str(synthetic_small / "webvid" / "frozen_train_labels.json"),
        "--webvid_tfrecord", str(synthetic_small / "webvid" / "tfrecord"), "--max_frames", "4", "--max_words", "12",
        "--batch_size", "4", "--max_steps", "2", "--epochs", "1", "--lr", "1e-3", "--precision", "fp16",
        "--no-log_tensorboard", "--torch_threads", "1", "--n_display", "1",
    ])  # fmt: skip
    path = ckpt.find_latest(out)
    with safe_open(path / ckpt.WEIGHTS_FILENAME, framework="pt") as handle:
        before = handle.get_tensor("fusion.transformer.resblocks.0.attn.in_proj_weight")
        assert before.dtype == torch.float16
        assert handle.get_tensor("fusion.memory").dtype == torch.float32  # the memory stays fp32, as LayerNorm
    rows = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
