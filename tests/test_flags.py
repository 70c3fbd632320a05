"""engine/flags.py: every numeric flag is checked before anything runs (NaN / infinity included), published flags
without effect warn once, and stage 2 trains the fusion at --lr unless --fusion_lr is given."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from dataloaders.errors import ConfigError
from engine.flags import build_parser, flags_without_effect, validate
from engine.optim import build_optimizer
from modules.membridge import Stage2Weights
from pretraining.fusion_task import FusionPretrainTask
from tests.conftest import REPO
from tests.fusion_fixtures import stage2_batch, tiny_model

TINY = str(REPO / "CLIP-modules" / "tiny.json")


def parsed(task: str, *flags: str):
    return build_parser(task).parse_args(["--do_train", "--output_dir", "unused", "--clip_config", TINY, *flags])


BAD_VALUES = [
    ("clip", "lr", ["nan", "inf", "-inf", "-1e-4"]),
    ("clip", "coef_lr", ["nan", "inf", "-1"]),
    ("retrieval", "fusion_lr", ["nan", "inf", "-1e-5"]),
    ("clip", "text_lr", ["nan", "-1e-5"]),
    ("fusion", "extra_lr", ["inf", "-1e-8"]),
    ("fusion", "lr", ["nan", "-1"]),
    ("clip", "weight_decay", ["nan", "inf", "-0.1"]),
    ("clip", "max_grad_norm", ["nan", "inf"]),
    ("clip", "warmup_proportion", ["nan", "1", "-0.1"]),
    ("clip", "feature_framerate", ["nan", "inf", "0"]),
    ("clip", "n_display", ["0", "-1"]),
    ("clip", "gradient_accumulation_steps", ["0"]),
    ("clip", "keep_checkpoints", ["0"]),
    ("clip", "max_bad_steps", ["0"]),
    ("clip", "seed", ["-1", str(2**32), str(2**63)]),
    ("clip", "num_thread_reader", ["-1"]),
    ("clip", "save_steps", ["-1"]),
    ("clip", "max_steps", ["-1"]),
    ("clip", "torch_threads", ["-1"]),
    ("clip", "freeze_layer_num", ["-2"]),
    ("clip", "epochs", ["0"]),
    ("retrieval", "rerank_topk", ["-1"]),
    ("retrieval", "memory_size", ["0"]),
    ("fusion", "w_vtm", ["nan", "-1"]),
    ("fusion", "vtm_negative_scale", ["inf", "-1"]),
]
CASES = [(task, name, value) for task, name, values in BAD_VALUES for value in values]


@pytest.mark.parametrize(("task", "name", "value"), CASES)
def test_validate_rejects_each_bad_numeric_value_naming_the_flag(task, name, value):
    args = parsed(task, f"--{name}={value}")
    with pytest.raises(ConfigError, match=rf"--{name} must be [^\n]*\(got "):
        validate(args)


@pytest.mark.parametrize(
    ("task", "flags"),
    [
        ("clip", ["--seed", "0", "--max_grad_norm", "0", "--weight_decay", "0", "--coef_lr", "0", "--save_steps", "0"]),
        ("clip", ["--seed", str(2**32 - 1), "--max_grad_norm", "-1", "--num_thread_reader", "0"]),
        ("fusion", ["--lr", "1e-3", "--fusion_lr", "1e-4", "--w_mlm", "0"]),
    ],
)
def test_validate_accepts_the_edges(task, flags):
    validate(parsed(task, *flags))


def test_stage2_with_every_loss_weight_zero_is_rejected():
    with pytest.raises(ConfigError, match="all 0"):
        validate(parsed("fusion", "--w_vtm", "0", "--w_mlm", "0", "--w_plm", "0"))


def test_non_finite_lr_on_the_command_line_exits_with_the_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "main_task_clip.py", "--do_train", "--output_dir", str(tmp_path / "run"),
         "--clip_config", TINY, "--lr", "nan"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--lr must be a finite number >= 0" in proc.stderr and "(got nan)" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing ran


def test_published_flags_without_effect_warn_once_listing_those_given(caplog):
    args = parsed("qa", "--loose_type", "--msrvtt_train_csv", "a.csv", "--expand_msrvtt_sentences", "--loose_type")
    assert args.loose_type and args.msrvtt_train_csv == "a.csv"  # still parsed as published
    with caplog.at_level(logging.WARNING, logger="engine.flags"):
        validate(args)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for flag in ("--loose_type", "--msrvtt_train_csv", "--expand_msrvtt_sentences"):
        assert warnings[0].count(flag) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.flags"):
        validate(parsed("qa"))
        validate(parsed("clip", "--expand_msrvtt_sentences", "--coef_lr", "1"))  # both take effect in stage 1
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_published_only_flags_form_one_help_group_and_need_no_value_beyond_the_published_one():
    help_text = build_parser("qa").format_help()
    group = help_text.split("published flags without effect here:", 1)[1]
    for flag in ("--loose_type", "--msrvtt_train_csv", "--msrvtt_val_csv", "--msrvtt_train_json", "--webvid_tfrecord"):
        assert flag in group
    assert "--loose_type" in build_parser("clip").format_help().split("published flags without effect here:", 1)[1]
    assert flags_without_effect(parsed("clip", "--loose_type")) == [
        "--loose_type (the dual-encoder (cosine) path is chosen by --sim_header: every header but tightTransf)"
    ]


def test_stage2_coef_lr_warns_and_defaults_follow_the_published_recipe(caplog):
    defaults = parsed("fusion")
    assert (defaults.lr, defaults.fusion_lr, defaults.coef_lr) == (1e-5, None, None)
    with caplog.at_level(logging.WARNING, logger="engine.flags"):
        validate(parsed("fusion", "--coef_lr", "1e-3"))
    assert any("--coef_lr" in r.getMessage() and "CLIP is frozen" in r.getMessage() for r in caplog.records)


def fusion_after_one_step(*flags: str) -> dict[str, torch.Tensor]:
    """The fusion weights after one stage-2 BertAdam step built from the stage-2 flags (same model, same batch)."""
    args = parsed("fusion", "--warmup_proportion", "0", *flags)
    validate(args)
    task = FusionPretrainTask(tiny_model(seed=0), Stage2Weights(1.0, 1.0, 1.0, 1.0))
    optimizer, _, _ = build_optimizer(
        task, optimizer=args.optimizer, lr=args.lr, coef_lr=args.coef_lr, fusion_lr=args.fusion_lr,
        weight_decay=args.weight_decay, warmup_proportion=args.warmup_proportion, total_steps=10,
        max_grad_norm=args.max_grad_norm,
    )  # fmt: skip
    torch.manual_seed(1)
    task.train()
    task(stage2_batch([5, 7, 9, 6], seed=2))["loss"].backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in task.model.fusion.state_dict().items()}


def test_stage2_lr_sets_the_fusion_step_and_equals_fusion_lr_of_the_same_value():
    initial = {k: v.detach().clone() for k, v in tiny_model(seed=0).fusion.state_dict().items()}
    slow, fast = fusion_after_one_step("--lr", "1e-4"), fusion_after_one_step("--lr", "1e-2")
    same = fusion_after_one_step("--fusion_lr", "1e-2", "--lr", "1")  # --fusion_lr wins over --lr
    moved = [k for k in initial if not torch.equal(slow[k], initial[k])]
    assert moved  # the step trains the fusion
    for key in moved:
        torch.testing.assert_close(fast[key] - initial[key], 100 * (slow[key] - initial[key]), rtol=1e-2, atol=1e-6)
        torch.testing.assert_close(same[key], fast[key], rtol=0, atol=0)
