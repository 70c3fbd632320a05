"""The one run skeleton of every training / evaluation entry script.

An entry script is a recipe: it names its flags (a parser), and a ``build(args, dist) -> Job`` that turns validated
flags into a task (model + loss), the training set and its evaluations. :func:`run_main` does the rest, the same way
for stage 1, stage 2, retrieval, captioning and QA:

1. parse the flags, start the process group (torchrun environment), validate the flags once;
2. start the run: logging, ``config.json``, threads, seeds;
3. ``build`` the job;
4. ``--do_train``: :func:`engine.trainer.fit`. With a validation evaluation (``Job.val``) every epoch is validated,
   the best weights (``Job.selection_metric``) are kept (``best_model.safetensors``, ``best_val.json``), restored
   at the end and the test split is evaluated once with them (tag ``test``; the results add ``best_val_<metric>``,
   ``best_val_run`` and the selected run's validation metrics as ``val_*``); without one the test evaluation runs
   at the end (tag ``final``);
5. ``--do_eval`` alone: the test evaluation of ``--init_model`` or ``--resume [DIR]`` weights (tag ``test``);
6. clean up the process group, whatever happened.

:func:`cli` is the ``__main__`` wrapper: a project error (``MemBridgeError``) ends the process with one line
``error: ...`` on stderr and exit code 2, no traceback (``MEMBRIDGE_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dataloaders.errors import ConfigError, MemBridgeError
from engine import checkpoint as ckpt
from engine.builders import convert_weights_fp16, start_run
from engine.distributed import DistInfo, cleanup, init_distributed
from engine.flags import validate
from engine.selection import BestValidation
from engine.trainer import EvalFn, fit, run_evaluation

logger = logging.getLogger(__name__)

EXIT_ERROR = 2
DEBUG_ENV = "MEMBRIDGE_DEBUG"


@dataclass
class Job:
    """What one run does. ``task.model`` (or the task itself) holds the weights that checkpoints save.

    ``train_set`` is called only with ``--do_train``. ``test`` is the final evaluation; ``val`` (optional) the
    validation evaluation that selects the best weights on ``selection_metric`` (higher is better).
    """

    task: nn.Module
    train_set: Callable[[], torch.utils.data.Dataset] | None = None
    test: EvalFn | None = None
    val: EvalFn | None = None
    selection_metric: str | None = None
    close: Callable[[], None] | None = None  # releases what the job holds (e.g. the caption scorer's Java process)
    missing_test_hint: str = "pass the evaluation annotation file (--val_csv)"


def prepare_model(args: argparse.Namespace, model: nn.Module, freeze: bool = True) -> nn.Module:
    """The flags that act on a built model: ``--freeze_layer_num`` (unless the task freezes CLIP itself),
    ``--freeze_logit_scale`` and ``--precision fp16`` (half-precision weights)."""
    if freeze:
        frozen = model.encoder.freeze_layers(args.freeze_layer_num)
        logger.info("--freeze_layer_num %d: %d CLIP tensors frozen", args.freeze_layer_num, len(frozen))
    if getattr(args, "freeze_logit_scale", False):
        model.encoder.clip.logit_scale.requires_grad_(False)  # HMMC keeps it at its loaded value (B.14 item 1)
    if args.precision == "fp16":
        convert_weights_fp16(model)
    return model


def weights_of(task: nn.Module) -> nn.Module:
    return getattr(task, "model", task)


def load_resume_weights(args: argparse.Namespace, task: nn.Module) -> None:
    """``--do_eval --resume [DIR]`` without training: the weights of that (or the newest) checkpoint."""
    path = ckpt.find_latest(args.output_dir, clean=False) if args.resume == "auto" else Path(args.resume)
    if path is None:
        raise ConfigError(f"--resume: no checkpoint under {args.output_dir}; pass a ckpt/step-N directory")
    ckpt.load_weights(path, weights_of(task), strict=True)


def execute(args: argparse.Namespace, job: Job, dist: DistInfo) -> dict:
    """Steps 4-5 of the module docstring: train (with model selection when there is a validation evaluation) and /
    or evaluate. Returns the last evaluation's metrics."""
    task = job.task
    if not args.do_train:
        if job.test is None:
            raise ConfigError(f"--do_eval without --do_train evaluates a model: {job.missing_test_hint}")
        if args.resume:
            load_resume_weights(args, task)
        task.to(dist.device)
        return run_evaluation(args, task, job.test, dist, tag="test")
    train_set = job.train_set()
    if job.val is None:
        return fit(args, task, train_set, dist, job.test)
    model = weights_of(task)
    selection = BestValidation(args.output_dir, job.selection_metric, is_main=dist.rank == 0)
    if args.resume:
        selection.resume(model)

    def validate_and_select(task: nn.Module) -> dict:
        metrics = job.val(task)
        selection.update(model, metrics)
        return metrics

    # Selection needs a validation run after every epoch (the engine's flag, on for this fit only).
    fit(argparse.Namespace(**{**vars(args), "eval_every_epoch": True}), task, train_set, dist, validate_and_select)
    selection.restore(model)
    task.to(dist.device)
    if job.test is None:
        return selection.summary()
    summary = {**selection.summary(), **{f"val_{name}": value for name, value in selection.metrics.items()}}
    last = ckpt.find_latest(args.output_dir, clean=False)
    step = ckpt.checkpoint_step(last) if last is not None else 0  # the run's last optimizer step
    return run_evaluation(args, task, lambda t: {**job.test(t), **summary}, dist, step=step, tag="test")


def run_main(
    parser: argparse.ArgumentParser,
    build: Callable[[argparse.Namespace, DistInfo], Job],
    argv: Sequence[str] | None = None,
    check: Callable[[argparse.Namespace], None] | None = None,
) -> dict:
    """Parse ``argv``, validate (shared checks, then the task's ``check``), start the run, build the job and
    execute it; the process group is cleaned up whatever happens. Project errors propagate (see :func:`cli`)."""
    args = parser.parse_args(argv)
    dist = init_distributed()
    try:
        validate(args, dist.world_size)
        if check is not None:
            check(args)
        start_run(args, dist.rank, dist.world_size)
        job = build(args, dist)
        try:
            return execute(args, job, dist)
        finally:
            if job.close is not None:
                job.close()
    finally:
        cleanup()


def cli(main: Callable[[], object]) -> None:
    """Run an entry script's ``main()`` as a command: a ``MemBridgeError`` prints ``error: <message>`` (one line)
    and exits with code 2; ``MEMBRIDGE_DEBUG=1`` re-raises it with its traceback."""
    try:
        main()
    except MemBridgeError as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
