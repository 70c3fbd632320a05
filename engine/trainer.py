"""The shared training loop. It knows no model: a *task* is an ``nn.Module`` whose ``forward(batch)`` returns a
dict of scalar tensors with at least ``loss``; optional hooks:

- ``task.after_optimizer_step()`` (e.g. clamp CLIP's logit scale),
- ``task.describe_batch(batch) -> str`` (names the videos of a batch in error messages; default: the training
  set's ``video_ids`` at the batch's ``video_index``),
- ``task.model``: the module whose weights checkpoints hold (default: the task itself), so checkpoint keys are the
  model's (``encoder.clip.*``, ``fusion.*``) whatever task trained it.

The loop owns distribution (DDP over the torchrun world), precision, gradient accumulation, the optimizer and its
schedule, non-finite-step detection, checkpoints with exact resume, logging and the final evaluation.

Faults: a run restarted by ``torchrun --max-restarts N`` (``TORCHELASTIC_RESTART_COUNT > 0``) resumes from the last
checkpoint in ``--output_dir`` as if given ``--resume``. Test hook: ``MEMBRIDGE_FAULT_AT_STEP=k`` makes every rank
raise :class:`InjectedFault` right after optimizer step ``k`` of the first attempt (never after an elastic restart);
it is inert unless set (tests/test_reliability.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dataloaders.errors import MemBridgeError
from engine import checkpoint as ckpt
from engine.data import batches_per_epoch, build_train_loader
from engine.distributed import DistInfo, all_reduce_mean, elastic_restart_count
from engine.metrics import format_metrics_table
from engine.optim import build_optimizer, current_lr
from engine.run_logging import ScalarWriter, write_json_atomic

logger = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], dict]

FAULT_ENV = "MEMBRIDGE_FAULT_AT_STEP"
MAX_DESCRIBED_VIDEOS = 16  # video ids named per batch in non-finite-step messages


class NonFiniteLossError(MemBridgeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient."""


class InjectedFault(RuntimeError):
    """The deliberate crash of the ``MEMBRIDGE_FAULT_AT_STEP`` test hook."""


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint so ``--resume`` continues exactly."""

    epoch: int = 0
    batches_done: int = 0  # micro-batches of the current epoch already consumed on this rank
    step: int = 0  # optimizer steps taken
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    skipped_samples: int = 0  # training samples replaced because their video was unreadable (all ranks)


def autocast_context(precision: str, device: torch.device):
    """The autocast context of ``--precision`` (fp32 and fp16-weights need none)."""
    if precision == "amp_bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "amp_fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def move_to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def resume_target(args: argparse.Namespace) -> str | None:
    """``--resume``, or ``auto`` when torchrun restarted this run after a failure (elastic restart)."""
    restarts = elastic_restart_count()
    if args.resume or restarts == 0:
        return args.resume
    logger.warning("torchrun elastic restart %d: resuming from the last checkpoint in %s", restarts, args.output_dir)
    return "auto"


def injected_fault_step() -> int | None:
    """The ``MEMBRIDGE_FAULT_AT_STEP`` test hook's step, on the first attempt only (None: no fault)."""
    value = os.environ.get(FAULT_ENV)
    if not value or elastic_restart_count() > 0:
        return None
    return int(value)


def batch_video_describer(dataset: torch.utils.data.Dataset) -> Callable[[dict], str] | None:
    """Names the videos of a batch from ``dataset.video_ids`` and ``batch['video_index']`` (None without them)."""
    video_ids = getattr(dataset, "video_ids", None)
    if video_ids is None:
        return None

    def describe(batch: dict) -> str:
        index = batch.get("video_index")
        if index is None:
            return ""
        ids = [video_ids[i] for i in index.flatten().tolist()]
        more = f" ... ({len(ids) - MAX_DESCRIBED_VIDEOS} more)" if len(ids) > MAX_DESCRIBED_VIDEOS else ""
        return f"videos {', '.join(ids[:MAX_DESCRIBED_VIDEOS])}{more}"

    return describe


def _samples_skipped(dataset: torch.utils.data.Dataset) -> int:
    """Training samples the dataset (all its DataLoader workers) replaced because their video was unreadable."""
    return int(getattr(dataset, "samples_skipped", 0))


def _grads_finite(params: list[nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.detach().float().norm() for g in grads])).all())


def fit(
    args: argparse.Namespace,
    task: nn.Module,
    train_dataset: torch.utils.data.Dataset,
    dist: DistInfo,
    evaluate: EvalFn | None = None,
    collate_fn=None,
) -> dict:
    """Train ``task`` on ``train_dataset`` per the flags; evaluate at the end (and per epoch if asked).

    Returns the last evaluation's metrics (empty without ``evaluate``).
    """
    output_dir = Path(args.output_dir)
    device = dist.device
    is_main = dist.rank == 0
    task.to(device)
    weights = getattr(task, "model", task)
    accum = args.gradient_accumulation_steps
    micro = args.batch_size // (dist.world_size * accum)
    per_epoch_batches = batches_per_epoch(len(train_dataset), micro, dist.world_size)
    steps_per_epoch = per_epoch_batches // accum
    if steps_per_epoch == 0:
        raise MemBridgeError(
            f"the training set has {len(train_dataset)} samples, fewer than one global batch of {args.batch_size}: "
            "lower --batch_size or add data"
        )
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    optimizer, scheduler, clip_norm = build_optimizer(
        task,
        optimizer=args.optimizer,
        lr=args.lr,
        coef_lr=args.coef_lr,
        fusion_lr=getattr(args, "fusion_lr", None),
        text_lr=getattr(args, "text_lr", None),
        extra_lr=getattr(args, "extra_lr", None),
        weight_decay=args.weight_decay,
        warmup_proportion=args.warmup_proportion,
        total_steps=total_steps,
        max_grad_norm=args.max_grad_norm,
    )
    trainable = [p for p in task.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "amp_fp16" and device.type == "cuda")

    state = TrainState()
    resume = resume_target(args)
    if resume:
        path = ckpt.find_latest(output_dir) if resume == "auto" else Path(resume)
        if path is None:
            logger.info("--resume: no checkpoint in %s yet, starting from scratch", output_dir)
        else:
            extra = ckpt.load_checkpoint(path, weights, optimizer, scheduler)
            state = TrainState(**extra["train_state"])
            logger.info("resumed from %s at epoch %d, step %d", path, state.epoch, state.step)

    model: nn.Module = task
    if dist.world_size > 1:
        model = DistributedDataParallel(
            task, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    writer = ScalarWriter(output_dir, enabled=is_main, tensorboard=args.log_tensorboard)
    describe = getattr(task, "describe_batch", None) or batch_video_describer(train_dataset)
    fault_step = injected_fault_step()
    after_step = getattr(task, "after_optimizer_step", None)
    logger.info(
        "training: %d samples, global batch %d (%d per rank x %d ranks x %d accumulation), %d steps/epoch, %d steps",
        len(train_dataset), args.batch_size, micro, dist.world_size, accum, steps_per_epoch, total_steps,
    )  # fmt: skip

    def save(state: TrainState) -> None:
        ckpt.save_checkpoint(
            output_dir,
            state.step,
            weights,
            optimizer,
            scheduler,
            extra={"train_state": asdict(state)},
            keep=args.keep_checkpoints,
            is_main=is_main,
        )

    metrics: dict = {}
    done = state.step >= total_steps
    while not done and state.epoch < args.epochs:
        loader = build_train_loader(
            train_dataset,
            micro,
            args.num_thread_reader,
            dist.rank,
            dist.world_size,
            args.seed,
            epoch=state.epoch,
            start_sample=state.batches_done * micro,
            pin_memory=device.type == "cuda",
            collate_fn=collate_fn,
        )
        # Only whole optimizer steps of this epoch are run; a trailing partial accumulation group is dropped.
        limit = steps_per_epoch * accum
        bar = tqdm(
            total=steps_per_epoch,
            initial=state.batches_done // accum,
            desc=f"epoch {state.epoch + 1}/{args.epochs}",
            disable=not is_main,
            dynamic_ncols=True,
        )
        model.train()
        skipped_before = _samples_skipped(train_dataset)
        window: dict[str, float] = {}
        window_n = 0
        t0 = time.time()
        for batch in loader:
            if state.batches_done >= limit:
                break
            batch = move_to_device(batch, device)
            last_micro = (state.batches_done + 1) % accum == 0
            sync = contextlib.nullcontext() if last_micro or dist.world_size == 1 else model.no_sync()
            with sync:
                with autocast_context(args.precision, device):
                    out = model(batch)
                loss = out["loss"]
                scaler.scale(loss / accum).backward()
            for k, v in out.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            window_n += 1
            state.batches_done += 1
            if not last_micro:
                continue

            scaler.unscale_(optimizer)
            finite = torch.tensor(
                float(math.isfinite(float(loss.detach())) and _grads_finite(trainable)), device=device
            )
            finite = float(all_reduce_mean(finite)) == 1.0
            if not finite:
                state.skipped_steps += 1
                state.bad_in_a_row += 1
                what = describe(batch) if describe else ""
                logger.warning(
                    "step %d: non-finite loss or gradient, step skipped (%d in a row) %s",
                    state.step + 1, state.bad_in_a_row, what,
                )  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                window, window_n = {}, 0  # logged means cover applied steps only
                if state.bad_in_a_row >= args.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{state.bad_in_a_row} consecutive steps had a non-finite loss or gradient (last batch: "
                        f"{what or 'unknown videos'}); check those videos/captions, lower --lr, or use fp32"
                    )
                continue
            state.bad_in_a_row = 0
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, clip_norm)
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            state.step += 1
            bar.update(1)

            if state.step % args.n_display == 0 or state.step == total_steps:
                means = {k: v / window_n for k, v in window.items()}
                means["lr"] = current_lr(optimizer)
                means["sec_per_step"] = (time.time() - t0) / max(1, window_n // accum)
                writer.add(state.step, means)
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                logger.info(
                    "epoch %d step %d/%d %s",
                    state.epoch + 1, state.step, total_steps,
                    " ".join(f"{k}={v:.4g}" for k, v in means.items()),
                )  # fmt: skip
                window, window_n, t0 = {}, 0, time.time()
            if state.step >= total_steps:
                done = True
                break
            if args.save_steps and state.step % args.save_steps == 0:
                save(state)
            if state.step == fault_step:
                raise InjectedFault(f"{FAULT_ENV}={fault_step}: deliberate crash after step {fault_step}")
        bar.close()
        skipped = torch.tensor(float(_samples_skipped(train_dataset) - skipped_before), device=device)
        skipped = round(float(all_reduce_mean(skipped)) * dist.world_size)
        state.skipped_samples += skipped
        if skipped and is_main:
            logger.warning(
                "epoch %d: %d training samples were skipped because their video is unreadable (named in the "
                "warnings above) and replaced by the next readable ones",
                state.epoch + 1, skipped,
            )  # fmt: skip
        if not done or state.batches_done >= limit:
            state.epoch += 1
            state.batches_done = 0
        save(state)
        if evaluate is not None and args.eval_every_epoch and not done:
            metrics = run_evaluation(args, task, evaluate, dist, writer, state.step, tag=f"epoch{state.epoch}")
    if state.skipped_steps:
        logger.warning("%d optimizer steps were skipped for non-finite values", state.skipped_steps)
    if state.skipped_samples:
        logger.warning("%d training samples were skipped for unreadable videos in this run", state.skipped_samples)
    if evaluate is not None:
        metrics = run_evaluation(args, task, evaluate, dist, writer, state.step, tag="final")
    writer.close()
    return metrics


def metrics_report(metrics: dict[str, float]) -> str:
    """Readable evaluation summary: retrieval tables (dual encoder, re-ranked), then the other numbers."""
    parts, shown = [], set()
    for prefix, title in (("", "dual encoder"), ("rerank_", "re-ranked")):
        block = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith((prefix + "t2v_", prefix + "v2t_"))}
        if block:
            parts.append(f"{title}:\n{format_metrics_table(block)}")
            shown.update(prefix + k for k in block)
    rest = [f"  {k:<28} {v:.4f}" for k, v in metrics.items() if k not in shown]
    return "\n".join(parts + rest)


def run_evaluation(
    args: argparse.Namespace,
    task: nn.Module,
    evaluate: EvalFn,
    dist: DistInfo,
    writer: ScalarWriter | None = None,
    step: int = 0,
    tag: str = "final",
) -> dict:
    """Run ``evaluate`` on every rank (it shards the work), log a table and write ``eval_results.json``."""
    is_main = dist.rank == 0
    task.eval()
    with torch.no_grad(), autocast_context(args.precision, dist.device):
        metrics = evaluate(task)
    task.train()
    if is_main:
        numeric = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        table = metrics_report(numeric)
        logger.info("evaluation (%s, step %d):\n%s", tag, step, table)
        if writer is not None:
            writer.add(step, numeric, prefix="eval")
        write_json_atomic(Path(args.output_dir) / "eval_results.json", {**metrics, "step": step, "tag": tag})
    return metrics
