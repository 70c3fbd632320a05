"""Run outputs: ``config.json``, ``log.txt``, TensorBoard scalars and ``scalars.jsonl``. Rank 0 writes; others log
warnings only to the console.

One run owns its ``--output_dir`` (:func:`claim_output_dir`): a folder holding a previous run (checkpoints,
``config.json`` or ``scalars.jsonl``) is refused unless the run continues it (``--resume``, a torchrun elastic
restart) or only evaluates (``--do_eval`` without ``--do_train``: it writes ``eval_results.json`` and
``eval_config.json`` beside the trained run and leaves that run's ``config.json`` alone); and rank 0 holds an
exclusive ``fcntl`` lock on ``OUTPUT/.membridge.lock`` for the process's lifetime, so a second run into the same
folder at the same time is refused instead of interleaving checkpoints and logs.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from dataloaders.errors import ConfigError
from engine import distributed

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONFIG_FILE = "config.json"
EVAL_CONFIG_FILE = "eval_config.json"
LOCK_FILE = ".membridge.lock"
RUN_OUTPUTS = ("ckpt", CONFIG_FILE, "scalars.jsonl")  # any of these: the folder holds a previous run

logger = logging.getLogger(__name__)
_held_lock: dict[str, Any] = {}  # the lock file this process holds: {"path": Path, "file": open file}


def release_output_dir() -> None:
    """Release the output-folder lock this process holds (done by the next claim, or at process exit)."""
    held = _held_lock.pop("file", None)
    _held_lock.pop("path", None)
    if held is not None:
        fcntl.lockf(held.fileno(), fcntl.LOCK_UN)
        held.close()


def _lock(output_dir: Path) -> str | None:
    """Take the exclusive lock of ``output_dir`` (keeping it); the reason it cannot be taken, or None."""
    path = output_dir / LOCK_FILE
    if _held_lock.get("path") == path.resolve():
        return None  # this process's previous run in the same folder has ended; keep its lock
    release_output_dir()  # a new run in this process: the previous one has ended
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until the process ends
    try:
        # A POSIX record lock, not flock: it belongs to this process alone, so the DataLoader workers it forks do not
        # inherit it, and a SIGKILLed run frees the folder at once (an flock would live on in its orphaned workers).
        fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        return (
            f"--output_dir {output_dir} is in use by another run (pid {owner}, lock {path}): wait for it to end, or "
            "choose a new --output_dir; two runs in one folder would mix their checkpoints and logs"
        )
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held_lock.update(path=path.resolve(), file=handle)
    return None


def _previous_run(output_dir: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (output_dir / name).exists()]


def claim_output_dir(
    output_dir: str | os.PathLike, resume: str | bool | None, is_main: bool, train: bool = True
) -> None:
    """Make ``output_dir`` this run's, or raise ConfigError (on every rank: call it on all of them).

    Refused: a folder already used by a concurrently running run (lock), and a folder holding a previous run's
    outputs when this run trains without ``resume`` (``--resume``, or a torchrun elastic restart). An evaluation-only
    run (``train=False``) may use a trained run's folder. Rank 0 (``is_main``) decides and keeps the lock.
    """
    error = None
    if is_main:
        out = Path(output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            error = _lock(out)
        except OSError as exc:
            error = f"cannot use --output_dir {out} ({exc.strerror or exc}): check that it is a writable folder"
        continuing = bool(resume) or distributed.elastic_restart_count() > 0
        found = _previous_run(out) if error is None else []
        if found and train and not continuing:
            release_output_dir()
            error = (
                f"--output_dir {out} already holds a run ({', '.join(found)}): pass --resume to continue it or choose "
                "a new --output_dir (a new run there would overwrite its checkpoints and mix the logs)"
            )
    if distributed.get_world_size() > 1:
        error = distributed.broadcast_object(error)
    if error is not None:
        raise ConfigError(error)


def git_commit() -> str:
    """The repository's HEAD commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def setup_logging(output_dir: str | os.PathLike | None, is_main: bool) -> None:
    """Console logging on every rank (warnings only off rank 0) and ``log.txt`` on rank 0."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_membridge", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    console._membridge = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if is_main and output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(Path(output_dir) / "log.txt")
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        file_handler._membridge = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON through a temp file + rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_config(output_dir: str | os.PathLike, args: argparse.Namespace, world_size: int) -> dict:
    """``config.json``: the resolved flags plus the git commit, world size and library versions."""
    config = {
        "flags": vars(args),
        "git_commit": git_commit(),
        "world_size": world_size,
        "torch": torch.__version__,
        "command": sys.argv,
    }
    name = CONFIG_FILE
    if not getattr(args, "do_train", True) and (Path(output_dir) / CONFIG_FILE).is_file():
        name = EVAL_CONFIG_FILE  # evaluating a trained run in its folder: its config.json describes the training
    write_json_atomic(Path(output_dir) / name, config)
    return config


class ScalarWriter:
    """Scalars to TensorBoard and to ``scalars.jsonl`` (one JSON object per step, easy to plot). Rank 0 only."""

    def __init__(self, output_dir: str | os.PathLike | None, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled and output_dir is not None
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out / "scalars.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))

    def add(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
