"""Faults: SIGKILL of a 2-rank torchrun job and ``--resume``; elastic restarts (``torchrun --max-restarts``) resuming
automatically; torn temp checkpoints; non-finite losses / gradients; unreadable training samples counted over
DataLoader workers. Disk-full while saving is tested in tests/test_checkpoint.py.

The multi-process tests run stage 1 (main_task_clip.py) with the tiny config on the small synthetic set: 24 videos,
global batch 4 over 2 gloo ranks = 6 steps, a checkpoint every 2 steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import main_task_clip
from dataloaders import annotations as ann
from dataloaders.datasets import RetrievalTrainDataset
from dataloaders.errors import ConfigError, DataError
from dataloaders.tokenizer import ClipTokenizer
from engine import checkpoint as ckpt
from engine.distributed import DistInfo
from engine.flags import build_parser
from engine.run_logging import claim_output_dir, write_config
from engine.trainer import FAULT_ENV, NonFiniteLossError, fit
from tests.conftest import REPO
from tests.test_stage1 import losses, stage1_flags

STEPS = 6  # 24 synthetic videos / global batch 4
SAVE_EVERY = 2
RUN_FLAGS = ("--epochs", "1", "--save_steps", str(SAVE_EVERY))
LAUNCH_TIMEOUT = 300
KILL_AFTER_STEPS = (3, 4, 5)  # the SIGKILL lands after one of these logged steps, drawn at random
LOSS_TOLERANCE = {"rel": 1e-6, "abs": 1e-7}


def torchrun(out: Path, *launcher: str, extra_env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """Start main_task_clip.py under ``torchrun --standalone --nproc_per_node 2`` on the synthetic set."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *launcher]
    return subprocess.Popen([*cmd, str(REPO / "main_task_clip.py"), *popen.pop("flags")], cwd=REPO, env=env, **popen)


def finish(proc: subprocess.Popen) -> str:
    """Wait for a launched run; its stderr; fails the test on a non-zero exit."""
    _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, stderr[-4000:]
    return stderr


def logged_steps(out: Path) -> int:
    """Steps rank 0 has logged so far (a line being written is not counted)."""
    path = out / "scalars.jsonl"
    if not path.is_file():
        return 0
    count = 0
    for line in path.read_text().splitlines():
        try:
            count += "train/loss" in json.loads(line)
        except json.JSONDecodeError:
            break
    return count


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in their own sessions, so a process-group kill
    would miss them)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").is_file() else []
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def kill_everything(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and all its workers at once, as a power cut would."""
    victims = [*descendants(proc.pid), proc.pid]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=LAUNCH_TIMEOUT)


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def assert_losses_equal(run: dict[int, float], reference: dict[int, float], steps: range) -> None:
    for step in steps:
        assert run[step] == pytest.approx(reference[step], **LOSS_TOLERANCE), f"step {step}"


@pytest.fixture(scope="module")
def reference(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Losses of an uninterrupted 2-rank run."""
    out = tmp_path_factory.mktemp("reference")
    proc = torchrun(out, flags=stage1_flags(synthetic_small, out, *RUN_FLAGS), stderr=subprocess.PIPE, text=True)
    finish(proc)
    found = losses(out)
    assert sorted(found) == list(range(1, STEPS + 1))
    return found


@pytest.mark.slow
def test_sigkill_two_ranks_then_resume_equals_uninterrupted(synthetic_small, tmp_path, reference):
    out = tmp_path / "killed"
    flags = stage1_flags(synthetic_small, out, *RUN_FLAGS)
    kill_after = random.choice(KILL_AFTER_STEPS)
    proc = torchrun(out, flags=flags, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + LAUNCH_TIMEOUT
    while logged_steps(out) < kill_after:
        assert proc.poll() is None, "the run ended before the kill"
        assert time.time() < deadline
        time.sleep(0.01)
    kill_everything(proc)
    latest = ckpt.find_latest(out, clean=False)
    assert latest is not None, f"killed after step {kill_after} without a checkpoint"
    interrupted_at = ckpt.checkpoint_step(latest)  # step-N, or the complete temp copy of a save killed mid-rename
    assert SAVE_EVERY <= interrupted_at < STEPS, kill_after

    torn = out / ckpt.CKPT_DIRNAME / f"{ckpt.TMP_PREFIX}99-{dead_pid()}"  # a save killed half-way, newer than all
    torn.mkdir()
    (torn / ckpt.WEIGHTS_FILENAME).write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":')
    (torn / ckpt.STATE_FILENAME).write_bytes(b"PK\x03\x04")

    finish(torchrun(out, flags=[*flags, "--resume"], stderr=subprocess.PIPE, text=True))
    assert not torn.exists()
    log = (out / "log.txt").read_text()
    assert f"resumed from {latest} at epoch 0, step {interrupted_at}" in log, f"killed after step {kill_after}"
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert_losses_equal(resumed, reference, range(1, STEPS + 1))


@pytest.mark.slow
def test_elastic_restart_resumes_from_the_last_checkpoint(synthetic_small, tmp_path, reference):
    """A run that crashes once after step 3 (checkpoint at step 2) under ``--max-restarts 1`` finishes, resuming
    from step 2 by itself, and its losses equal the uninterrupted run's.

    One restart must be enough: the restarted workers meet through the agent's store, which still holds the dead
    workers' gloo addresses; engine.distributed namespaces the keys per attempt (without that, this run failed with
    "Connection refused" or hung in gloo's connectFullMesh about one time in four)."""
    out = tmp_path / "elastic"
    crash_at = SAVE_EVERY + 1
    proc = torchrun(
        out, "--max-restarts", "1",
        flags=stage1_flags(synthetic_small, out, *RUN_FLAGS), extra_env={FAULT_ENV: str(crash_at)},
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stderr = finish(proc)
    assert "Connection refused" not in stderr
    assert f"{FAULT_ENV}={crash_at}: deliberate crash after step {crash_at}" in stderr
    log = (out / "log.txt").read_text()
    assert re.search(rf"torchrun elastic restart \d+: resuming from the last checkpoint in {re.escape(str(out))}", log)
    assert f"step-{SAVE_EVERY} at epoch 0, step {SAVE_EVERY}" in log
    rows = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    logged = [row["step"] for row in rows if "train/loss" in row]
    assert logged[: crash_at + STEPS - SAVE_EVERY] == [*range(1, crash_at + 1), *range(SAVE_EVERY + 1, STEPS + 1)]
    assert_losses_equal(losses(out), reference, range(1, STEPS + 1))


# ------------------------------------------------------------------------------------------------ in process

N_TOY = 32
TOY_BATCH = 4
FEATURES = 4


class ToyVideos(Dataset):
    """A regression set whose samples stand for videos ``clip00..clip31`` (``video_index`` into ``video_ids``)."""

    video_ids = [f"clip{i:02d}" for i in range(N_TOY)]

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N_TOY, FEATURES, generator=g)
        self.y = self.x.sum(dim=1)

    def __len__(self) -> int:
        return N_TOY

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index], "video_index": torch.tensor(index)}


class PoisonedTask(nn.Module):
    """Linear regression whose loss is NaN on the calls in ``nan_loss`` and whose gradient (only) is NaN on the calls
    in ``nan_grad``; records the weights and batch of every call."""

    def __init__(self, nan_loss: set[int], nan_grad: set[int]) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, 1)
        self.nan_loss, self.nan_grad = nan_loss, nan_grad
        self.calls: list[tuple[list[int], torch.Tensor]] = []

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        self.calls.append((batch["video_index"].tolist(), self.linear.weight.detach().clone()))
        call = len(self.calls)
        weight = self.linear.weight
        if call in self.nan_grad:
            weight = weight.clone()
            weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        loss = F.mse_loss((batch["x"] @ weight.t()).squeeze(-1) + self.linear.bias, batch["y"])
        if call in self.nan_loss:
            loss = loss * float("nan")
        return {"loss": loss}


def toy_args(out: Path, *extra: str):
    return build_parser("clip").parse_args(
        ["--do_train", "--output_dir", str(out), "--batch_size", str(TOY_BATCH), "--epochs", "1", "--lr", "0.1",
         "--warmup_proportion", "0", "--num_thread_reader", "0", "--no-log_tensorboard", "--n_display", "1", *extra]
    )  # fmt: skip


CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def final_train_state(out: Path) -> dict:
    state = torch.load(ckpt.find_latest(out) / ckpt.STATE_FILENAME, weights_only=True)
    return state["extra"]["train_state"]


def test_non_finite_steps_are_skipped_without_touching_the_weights(tmp_path, caplog):
    task = PoisonedTask(nan_loss={2}, nan_grad={5})
    with caplog.at_level(logging.WARNING, logger="engine.trainer"):
        fit(toy_args(tmp_path), task, ToyVideos(), CPU)
    calls = task.calls
    assert len(calls) == N_TOY // TOY_BATCH
    for bad in (2, 5):  # the call after a skipped one sees the very same weights
        assert torch.equal(calls[bad - 1][1], calls[bad][1]), bad
    for good in (1, 3, 4, 6):  # an applied step moves them
        assert not torch.equal(calls[good - 1][1], calls[good][1]), good
    state = final_train_state(tmp_path)
    assert state["skipped_steps"] == 2 and state["step"] == len(calls) - 2 and state["bad_in_a_row"] == 0
    second = ", ".join(ToyVideos.video_ids[i] for i in calls[1][0])
    assert f"step 2: non-finite loss or gradient, step skipped (1 in a row) videos {second}" in caplog.text
    assert "2 optimizer steps were skipped for non-finite values" in caplog.text
    logged = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["train/loss"]) for row in logged)  # skipped steps do not poison the logged means


def test_too_many_bad_steps_in_a_row_stop_the_run_naming_the_videos(tmp_path):
    task = PoisonedTask(nan_loss=set(range(1, N_TOY)), nan_grad=set())
    with pytest.raises(NonFiniteLossError) as info:
        fit(toy_args(tmp_path, "--max_bad_steps", "3"), task, ToyVideos(), CPU)
    assert len(task.calls) == 3 and all(torch.equal(task.calls[0][1], w) for _, w in task.calls)
    last = ", ".join(ToyVideos.video_ids[i] for i in task.calls[-1][0])
    assert str(info.value) == (
        f"3 consecutive steps had a non-finite loss or gradient (last batch: videos {last}); check those "
        "videos/captions, lower --lr, or use fp32"
    )


class SometimesBroken:
    """A video source whose ids starting with ``bad`` cannot be read."""

    def load(self, video_id, start=None, end=None, rng=None):
        if video_id.startswith("bad"):
            raise DataError(f"{video_id}.mp4: cannot be opened as a video; re-encode it")
        return np.full((2, 2, 2, 3), 7, dtype=np.uint8), np.ones(2, dtype=np.int64)


class VideoMeanTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        assert batch["video"].abs().sum() > 0  # never an all-zero substitute
        return {"loss": (self.scale * batch["video"].mean() - 1.0) ** 2}


def test_unreadable_training_samples_are_counted_over_dataloader_workers(tmp_path, caplog):
    """2 of 16 videos are unreadable: each epoch skips exactly 2 samples, whatever worker met them."""
    ids = [f"bad{i}" if i in (3, 9) else f"ok{i}" for i in range(16)]
    pairs = [ann.TrainPair(v, (f"caption {v}",)) for v in ids]
    dataset = RetrievalTrainDataset(
        pairs, SometimesBroken(), lambda frames, mask: torch.from_numpy(frames).float(), ClipTokenizer(), 8
    )
    args = toy_args(tmp_path, "--epochs", "2", "--num_thread_reader", "2")
    with caplog.at_level(logging.WARNING, logger="engine.trainer"):
        fit(args, VideoMeanTask(), dataset, CPU)
    for epoch in (1, 2):
        assert f"epoch {epoch}: 2 training samples were skipped because their video is unreadable" in caplog.text
    assert "4 training samples were skipped for unreadable videos in this run" in caplog.text
    assert final_train_state(tmp_path)["skipped_samples"] == 4


# ------------------------------------------------------------------------------------------ one run per output dir

HOLD_LOCK = (
    "import sys; from engine.run_logging import claim_output_dir; claim_output_dir(sys.argv[1], None, True); "
    "print('claimed', flush=True); sys.stdin.readline()"
)


def test_an_output_dir_holding_a_run_is_refused_without_resume(tmp_path):
    out = tmp_path / "run"
    claim_output_dir(out, None, is_main=True)  # a fresh folder
    claim_output_dir(tmp_path / "unrelated", None, is_main=True)  # releases the first folder's lock
    (out / "config.json").write_text("{}")
    for previous in ("config.json", "ckpt", "scalars.jsonl"):
        other = tmp_path / f"with-{previous}"
        other.mkdir()
        (other / "notes.txt").write_text("a user's file is not a run")
        claim_output_dir(other, None, is_main=True)
        (other / previous).mkdir() if previous == "ckpt" else (other / previous).write_text("{}")
        with pytest.raises(ConfigError) as info:
            claim_output_dir(other, None, is_main=True)
        assert str(other) in str(info.value) and previous in str(info.value)
        assert "pass --resume to continue it or choose a new --output_dir" in str(info.value)
    claim_output_dir(out, "auto", is_main=True)  # --resume continues it
    claim_output_dir(out, None, is_main=True, train=False)  # evaluating the trained run in its folder
    claim_output_dir(out, None, is_main=False)  # the other ranks follow rank 0's decision (1 process here)


def test_an_elastic_restart_may_continue_its_output_dir(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError):
        claim_output_dir(tmp_path, None, is_main=True)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    claim_output_dir(tmp_path, None, is_main=True)


def test_a_concurrent_run_into_the_same_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        for train in (True, False):  # even an evaluation would interleave its files with the running one's
            with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid}"):
                claim_output_dir(out, "auto", is_main=True, train=train)
    finally:
        holder.communicate("\n", timeout=LAUNCH_TIMEOUT)
    claim_output_dir(out, None, is_main=True)  # the lock dies with its process


HOLD_LOCK_WITH_CHILD = (
    "import os, sys, time; from engine.run_logging import claim_output_dir; claim_output_dir(sys.argv[1], None, True)\n"
    "child = os.fork()  # like a DataLoader worker: it inherits every open file of the run\n"
    "if child == 0:\n    time.sleep(60); os._exit(0)\n"
    "print(child, flush=True); time.sleep(60)"
)


def test_a_killed_run_frees_its_output_dir_even_while_its_forked_workers_live(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_WITH_CHILD, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(ConfigError, match="in use by another run"):
            claim_output_dir(out, "auto", is_main=True)
        holder.kill()  # SIGKILL: the run dies, its forked worker lives on
        holder.wait(timeout=LAUNCH_TIMEOUT)
        os.kill(child, 0)  # still alive
        claim_output_dir(out, "auto", is_main=True)  # a --resume can start at once
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_training_into_a_used_output_dir_stops_before_touching_it(synthetic_small, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"flags": {"seed": 1}}')
    (out / "scalars.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    with pytest.raises(ConfigError, match="pass --resume to continue it or choose a new --output_dir"):
        main_task_clip.main(stage1_flags(synthetic_small, out, "--epochs", "1"))
    assert (out / "config.json").read_text() == '{"flags": {"seed": 1}}'
    assert (out / "scalars.jsonl").read_text() == '{"step": 1, "train/loss": 2.0}\n'
    assert not (out / "log.txt").exists() and not (out / "ckpt").exists()


def test_an_evaluation_in_a_trained_run_folder_keeps_its_config(tmp_path):
    args = build_parser("clip").parse_args(["--do_eval", "--output_dir", str(tmp_path)])
    write_config(tmp_path, args, 1)
    assert json.loads((tmp_path / "config.json").read_text())["flags"]["do_eval"] is True  # a fresh folder
    (tmp_path / "config.json").write_text('{"flags": {"do_train": true}}')  # a trained run's
    write_config(tmp_path, args, 1)
    assert (tmp_path / "config.json").read_text() == '{"flags": {"do_train": true}}'
    assert json.loads((tmp_path / "eval_config.json").read_text())["flags"]["do_eval"] is True
