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
    assert len(SCRIPTS) == 22


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


# STOA-VLP's published downstream commands (spec T2VLP_STOA.md B.9; global batch = per-GPU batch x 8 GPUs):
# script -> (entry, datatype, epochs, batch, lr, coef_lr, max_words)
STOA_RECIPES = {
    "start_fusion_stoa.sh": ("main_task_fusion.py", "msrvtt", 10, 64, 1e-5, None, 32),
    "start_retrieval_msrvtt_stoa.sh": ("video_text_retrieval.main_task_retrieval", "msrvtt", 5, 64, 1e-4, 1e-3, 32),
    "start_caption_msrvtt_stoa.sh": ("video_captioning.main_task_caption", "msrvtt", 5, 32, 1e-4, 1e-3, 32),
    "start_caption_msvd_stoa.sh": ("video_captioning.main_task_caption", "msvd", 10, 48, 1e-4, 1e-3, 32),
    "start_qa_msrvtt_stoa.sh": ("video_qa.main_task_qa", "msrvtt_qa", 5, 48, 1e-4, 1.0, 20),
    "start_qa_msvd_stoa.sh": ("video_qa.main_task_qa", "msvd_qa", 5, 64, 1e-4, 1.0, 20),
}


def test_every_stoa_launcher_has_a_recipe():
    assert sorted(s for s in SCRIPTS if s.endswith("_stoa.sh")) == sorted(STOA_RECIPES)


@pytest.mark.parametrize("script", sorted(STOA_RECIPES))
def test_stoa_launcher_holds_the_published_recipe(tmp_path, script):
    entry_name, datatype, epochs, batch, lr, coef_lr, max_words = STOA_RECIPES[script]
    argv = launch(tmp_path, script, OBJECTS_DIR="/objects", LABELMAP="/labels.json")
    entry, flags = split_entry(argv[len(DEFAULT_NODE_FLAGS) :])
    assert entry == entry_name
    args = entry_parser(entry).parse_args(flags)
    assert (args.method, args.object_count, args.objects_dir, args.labelmap_path) == ("stoa", 10, "/objects",
                                                                                      "/labels.json")  # fmt: skip
    assert (args.datatype, args.epochs, args.batch_size, args.lr, args.max_words) == (datatype, epochs, batch, lr,
                                                                                      max_words)  # fmt: skip
    assert (args.max_frames, args.feature_framerate, args.sim_header, args.init_model) == (12, 1.0, "meanP", "/ckpt")
    if coef_lr is not None:  # downstream: the fusion group at the published hard-coded 1e-5 (B.7)
        assert args.coef_lr == coef_lr and args.fusion_lr == 1e-5
    if entry == "video_qa.main_task_qa":
        assert args.qa_head == "first_token"  # the family's first-BPE-token label over the tied head
