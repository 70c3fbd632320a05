"""Run outputs: ``config.json``, ``log.txt``, TensorBoard scalars and ``scalars.jsonl``. Rank 0 writes; others log
warnings only to the console."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    write_json_atomic(Path(output_dir) / "config.json", config)
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
