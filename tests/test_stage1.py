"""Stage 1 end to end on the small synthetic set: 2 gloo ranks == 1 process, exact resume after SIGKILL, gradients
reach exactly the trainable parameters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

TINY = str(REPO / "CLIP-modules" / "tiny.json")
KILL_DEADLINE_S = 240  # seconds a stage-1 run may take to write its first checkpoint


def stage1_flags(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--do_train",
        "--clip_config", TINY,
        "--output_dir", str(out),
        "--train_csv", str(data / "webvid" / "frozen_train_labels.json"),
        "--webvid_tfrecord", str(data / "webvid" / "tfrecord"),
        "--max_frames", "4", "--max_words", "12",
        "--batch_size", "4", "--lr", "1e-3", "--coef_lr", "1", "--n_display", "1",
        "--loose_type", "--no-log_tensorboard", "--seed", "7",
        *extra,
    ]  # fmt: skip


def run_script(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "main_task_clip.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += [str(REPO / "main_task_clip.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(out: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run re-logs the steps it redoes)."""
    rows = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def latest_weights(out: Path) -> dict[str, torch.Tensor]:
    latest = (out / "ckpt" / "latest").read_text().strip()
    return load_file(str(out / "ckpt" / latest / "model.safetensors"))


def kill_after_first_checkpoint(argv: list[str], out: Path, script: str = "main_task_clip.py") -> int:
    """Run ``script`` (stage 1 by default) with ``argv`` in a fresh process, SIGKILL it as soon as ``out`` holds a
    checkpoint, and return the step of that checkpoint (the exact-resume tests of every objective and method)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / script), *argv]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + KILL_DEADLINE_S
    while not (out / "ckpt" / "latest").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return int((out / "ckpt" / "latest").read_text().strip().split("-")[1])


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(synthetic_small, tmp_path):
    flags = ("--max_steps", "3", "--epochs", "1")
    run_script(stage1_flags(synthetic_small, tmp_path / "one", *flags), nproc=1)
    run_script(stage1_flags(synthetic_small, tmp_path / "two", *flags), nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-5, abs=1e-6)
    w1, w2 = latest_weights(tmp_path / "one"), latest_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    initial = None
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-5, msg=name)
    # the weights did move (the comparison is not between two untrained models)
    init_dir = tmp_path / "init"
    run_script(stage1_flags(synthetic_small, init_dir, "--max_steps", "1", "--epochs", "1", "--lr", "0"), nproc=1)
    initial = latest_weights(init_dir)
    moved = [n for n in w1 if not torch.equal(w1[n], initial[n])]
    assert len(moved) > len(w1) // 2


@pytest.mark.slow
def test_resume_after_sigkill_continues_exactly(synthetic_small, tmp_path):
    flags = ("--epochs", "2", "--save_steps", "2")
    full = tmp_path / "full"
    run_script(stage1_flags(synthetic_small, full, *flags))
    reference = losses(full)
    assert len(reference) == 12  # 24 videos / batch 4 = 6 steps per epoch

    killed = tmp_path / "killed"
    interrupted_at = kill_after_first_checkpoint(stage1_flags(synthetic_small, killed, *flags), killed)
    assert interrupted_at < 12

    run_script(stage1_flags(synthetic_small, killed, *flags, "--resume"))
    resumed = losses(killed)
    assert sorted(resumed) == sorted(reference)
    for step in range(interrupted_at + 1, 13):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
