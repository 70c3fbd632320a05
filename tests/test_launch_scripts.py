"""Every start_*.sh launch script hands torchrun the node settings from the environment (scripts/torchrun.sh), its
entry script and the extra flags given on its command line. The recipes of the caption and QA scripts are checked
flag by flag in tests/test_captioning.py and tests/test_qa.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = sorted(p.name for p in REPO.glob("start_*.sh"))
NODE_FLAGS = ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8", "--master_addr", "host0",
              "--master_port", "2345"]  # fmt: skip
DEFAULT_NODE_FLAGS = ["--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                      "--master_port", "29500"]  # fmt: skip


def launch(tmp_path: Path, script: str, **variables: str) -> list[str]:
    """The argv the script passes to torchrun (a stand-in on PATH records it); run from another folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "torchrun").write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$ARGS_FILE"\n')
    (bin_dir / "torchrun").chmod(0o755)
    names = ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", ARGS_FILE=str(tmp_path / "args"), DATA_PATH="/data",
               INIT_MODEL="/ckpt", **variables)  # fmt: skip
    proc = subprocess.run(
        ["bash", str(REPO / script), "--seed", "11"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / "args").read_text().splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_passes_node_settings_entry_script_and_extra_flags(tmp_path, script):
    argv = launch(tmp_path, script, NNODES="2", NODE_RANK="1", NPROC_PER_NODE="8", MASTER_ADDR="host0",
                  MASTER_PORT="2345")  # fmt: skip
    assert argv[: len(NODE_FLAGS)] == NODE_FLAGS
    entry, _ = split_entry(argv[len(NODE_FLAGS) :])
    if entry.endswith(".py"):  # the root scripts of the two pre-training stages
        assert (REPO / entry).is_file()
    else:  # the task packages' entry points run as modules
        assert importlib.util.find_spec(entry) is not None
    assert argv[-2:] == ["--seed", "11"]


def split_entry(argv: list[str]) -> tuple[str, list[str]]:
    """``(entry, flags)`` of what follows the node settings: ``SCRIPT.py FLAGS`` or ``-m MODULE FLAGS``."""
    if argv[0] == "-m":
        return argv[1], argv[2:]
    return argv[0], argv[1:]


def test_node_settings_default_to_one_local_process(tmp_path):
    assert launch(tmp_path, "start_clip.sh")[: len(DEFAULT_NODE_FLAGS)] == DEFAULT_NODE_FLAGS


def test_the_glob_finds_every_launch_script():  # an empty glob would make the tests above vacuous
    assert len(SCRIPTS) == 17


def entry_parser(entry: str):
    """The argument parser of an entry script."""
    from engine.flags import build_parser

    if entry == "main_task_clip.py":
        return build_parser("clip")
    if entry == "main_task_fusion.py":
        return build_parser("fusion")
    if entry == "video_text_retrieval.main_task_retrieval":
        from video_text_retrieval.settings import build_retrieval_parser

        return build_retrieval_parser()
    if entry == "video_captioning.main_task_caption":
        from video_captioning.task import build_caption_parser

        return build_caption_parser()
    from video_qa.task import build_qa_parser

    assert entry == "video_qa.main_task_qa", entry
    return build_qa_parser()


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_passes_no_flag_without_effect(tmp_path, script):
    from engine.flags import flags_without_effect

    argv = launch(tmp_path, script)
    entry, flags = split_entry(argv[len(DEFAULT_NODE_FLAGS) :])
    args = entry_parser(entry).parse_args(flags)
    assert flags_without_effect(args) == []
    assert "--loose_type" not in argv
    # stage 2: --lr is the fusion's rate, no --coef_lr
    if script in ("start_fusion.sh", "start_fusion_t2vlp.sh", "start_fusion_stoa.sh"):
        assert "--coef_lr" not in argv and args.lr == 1e-5 and args.fusion_lr is None
