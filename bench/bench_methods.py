"""Training step time of every stage-1 objective and every stage-2 method on one batch (printed as JSON).

    python bench/bench_methods.py --models tiny --steps 3          # seconds
    python bench/bench_methods.py --models vitb16 --steps 3        # ViT-B/16 sizes (stage 2 alone: seconds a step)
    python bench/bench_methods.py --models tiny --steps 1 --variants clip,membridge

Variants (each (model, variant) runs in its own child process, so its peak resident memory is its own):

- stage 1 (``main_task_clip.py``): ``clip``, ``mcq``, ``hmmc`` (``--stage1_objective``, the registry of
  video_text_retrieval/stage1.py) and ``t2vlp_s1`` (``--method t2vlp``: tube tokens + local alignment in
  :class:`ContrastiveTask`); ``ratio_vs_baseline`` is against ``clip``.
- stage 2 (``main_task_fusion.py``): ``membridge``, ``t2vlp_s2`` and ``stoa`` (``--method``, modules/methods.py) in
  :class:`FusionPretrainTask`; ``ratio_vs_baseline`` is against ``membridge``.

The task is built as the entry scripts build it: the flags through ``engine.flags.build_parser`` (plus the stage-1
flag rules of ``check_stage1_flags``), the model through ``engine.builders.build_model`` and
``engine.run.prepare_model``, the stage-1 task through the objective registry and the stage-2 task as
``FusionPretrainTask`` with the flags' ``Stage2Weights``; the optimizer is ``engine.optim.build_optimizer`` with the
flags' settings. Weights are random (``--clip_config`` + ``--cross_config_path``: CLIP-modules/tiny.json +
fusion-tiny.json, or ViT-B-16.json + fusion.json). A step is what the trainer does per batch: forward, backward,
gradient clipping, optimizer and scheduler step, ``after_optimizer_step``. Every variant of one model sees the same
videos, captions and frames (seed 0); MCQ adds question/answer ids derived from the captions, HMMC its MLM draws and
STOA synthetic boxes, classes, trajectory ids and noun/verb masks (the batch-contract keys of docs/ARCHITECTURE.md).
``step_s_median`` is the median over ``--steps`` timed steps after one warm-up step. The JSON records the core count,
torch version, threads and the load average at start and end (ratios are steadier than times on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    "tiny": ("CLIP-modules/tiny.json", "CLIP-modules/fusion-tiny.json"),
    "vitb16": ("CLIP-modules/ViT-B-16.json", "CLIP-modules/fusion.json"),
}
STAGE1 = {"clip": [], "mcq": ["--stage1_objective", "mcq"], "hmmc": ["--stage1_objective", "hmmc"],
          "t2vlp_s1": ["--method", "t2vlp"]}  # fmt: skip
STAGE2 = {"membridge": [], "t2vlp_s2": ["--method", "t2vlp"], "stoa": ["--method", "stoa"]}
VARIANTS = (*STAGE1, *STAGE2)
BASELINES = {"stage1": "clip", "stage2": "membridge"}
SOT, EOT = 49406, 49407
NUM_CLASSES = 20  # synthetic STOA label-map ids 1..NUM_CLASSES-1 (0 is padding)


def stage_of(variant: str) -> str:
    return "stage1" if variant in STAGE1 else "stage2"


def parse_variant_flags(
    model: str, variant: str, videos: int, frames: int, words: int, out_dir: str, threads: int = 0
) -> argparse.Namespace:
    """The entry script's parsed flags for ``variant`` (stage 1: main_task_clip.py's parser, stage 2: fusion's)."""
    from engine.flags import build_parser

    clip_config, fusion_config = MODELS[model]
    stage = stage_of(variant)
    argv = [
        "--do_train", "--output_dir", out_dir, "--clip_config", str(REPO / clip_config),
        "--max_frames", str(frames), "--max_words", str(words), "--batch_size", str(videos), "--seed", "0",
        "--torch_threads", str(threads), "--no-log_tensorboard",
    ]  # fmt: skip
    if stage == "stage1":
        argv += ["--loose_type", *STAGE1[variant]]
        if variant == "mcq":  # read only by the training set, which the bench replaces by a synthetic batch
            argv += ["--phrase_file", out_dir]
    else:
        argv += ["--loose_type", "--cross_config_path", str(REPO / fusion_config), *STAGE2[variant]]
        if variant == "stoa":  # paths only read by the dataset, which the bench replaces by a synthetic batch
            argv += ["--objects_dir", out_dir, "--labelmap_path", out_dir]
    return build_parser("clip" if stage == "stage1" else "fusion").parse_args(argv)


def build_task(args: argparse.Namespace, variant: str) -> torch.nn.Module:
    """The task ``main_task_clip.build`` / ``main_task_fusion.build`` makes from ``args`` (without data sets)."""
    from engine.builders import build_model, setup_runtime
    from engine.run import prepare_model

    setup_runtime(args)
    if stage_of(variant) == "stage1":
        from video_text_retrieval.stage1 import check_stage1_flags, stage1_objective

        check_stage1_flags(args)
        model = prepare_model(args, build_model(args, with_fusion=False))
        return stage1_objective(args).build_task(args, model)
    from modules.membridge import Stage2Weights
    from pretraining.fusion_task import FusionPretrainTask

    model = prepare_model(args, build_model(args, with_fusion=True), freeze=False)
    weights = Stage2Weights(args.w_vtm, args.w_mlm, args.w_plm, args.vtm_negative_scale, args.w_align, args.w_match)
    return FusionPretrainTask(model, weights)


def make_batch(args: argparse.Namespace, image_size: int, variant: str) -> dict[str, torch.Tensor]:
    """The shared batch (same for every variant of a model: its own generator), plus the variant's extra keys."""
    b, t, words = args.batch_size, args.max_frames, args.max_words
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(words // 2, words - 1, (b,), generator=g)  # caption tokens between SOT and EOT
    ids = torch.zeros(b, words, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0], ids[i, 1 : n + 1], ids[i, n + 1] = SOT, torch.randint(1, 49400, (n,), generator=g), EOT
    mask = (ids != 0).long()
    batch = {
        "video": torch.randn(b, t, 3, image_size, image_size, generator=g),
        "video_mask": torch.ones(b, t, dtype=torch.long),
        "text_ids": ids,
        "text_mask": mask,
    }
    rng = torch.Generator().manual_seed(1)  # extras drawn apart, so the shared keys never depend on the variant
    if variant == "mcq":
        question = ids.clone()
        question[:, 1:3] = args.mcq_mask_id  # the erased phrase
        answer = torch.zeros_like(ids)
        answer[:, 0], answer[:, 1:3], answer[:, 3] = SOT, ids[:, 1:3], EOT
        batch.update(mcq_question_ids=question, mcq_question_mask=mask, mcq_answer_ids=answer,
                     mcq_answer_mask=(answer != 0).long())  # fmt: skip
    if variant == "hmmc" and args.w_mlm > 0:
        from video_text_retrieval.stage1 import HMMC_MLM_KEY

        batch[HMMC_MLM_KEY] = torch.rand(b, 3, words, generator=rng)
    if variant == "stoa":
        o = args.object_count
        corner = torch.rand(b, t, o, 2, generator=rng) * 0.5
        boxes = torch.cat([corner, corner + 0.1 + torch.rand(b, t, o, 2, generator=rng) * 0.4], dim=-1)
        classes = torch.randint(1, NUM_CLASSES, (b, t, o), generator=rng)
        classes[:, :, o // 2 + 1 :] = 0  # some padding objects per frame
        boxes[classes == 0] = -1
        trajectory = torch.zeros(b, 2 * o, dtype=torch.long)
        for i in range(b):
            first = list(dict.fromkeys(c for c in classes[i].flatten().tolist() if c))[: 2 * o]
            trajectory[i, : len(first)] = torch.tensor(first)
        noun = torch.zeros_like(ids)
        verb = torch.zeros_like(ids)
        noun[:, 1], noun[:, 3], verb[:, 2] = 1, 1, 1
        batch.update(object_boxes=boxes, object_classes=classes, trajectory_ids=trajectory, noun_mask=noun,
                     verb_mask=verb)  # fmt: skip
    return batch


def run_child(model: str, variant: str, steps: int, videos: int, frames: int, words: int, threads: int = 0) -> dict:
    """Build ``variant`` at ``model`` size, one warm-up step, then ``steps`` timed training steps."""
    from engine.optim import build_optimizer
    from engine.trainer import autocast_context

    with tempfile.TemporaryDirectory() as out_dir:
        args = parse_variant_flags(model, variant, videos, frames, words, out_dir, threads)
        task = build_task(args, variant)
    task.train()
    optimizer, scheduler, clip_norm = build_optimizer(
        task, optimizer=args.optimizer, lr=args.lr, coef_lr=args.coef_lr, fusion_lr=getattr(args, "fusion_lr", None),
        weight_decay=args.weight_decay, warmup_proportion=args.warmup_proportion, total_steps=1000,
        max_grad_norm=args.max_grad_norm,
    )  # fmt: skip
    trainable = [p for p in task.parameters() if p.requires_grad]
    after_step = getattr(task, "after_optimizer_step", None)
    batch = make_batch(args, task.model.encoder.clip.config.image_resolution, variant)
    device = torch.device("cpu")

    def step() -> float:
        with autocast_context(args.precision, device):
            loss = task(batch)["loss"]
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, clip_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        return float(loss.detach())

    loss = step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {
        "model": model,
        "variant": variant,
        "stage": stage_of(variant),
        "videos": videos,
        "frames": frames,
        "words": words,
        "threads": torch.get_num_threads(),
        "params_M": round(sum(p.numel() for p in task.parameters()) / 1e6, 2),
        "trainable_params_M": round(sum(p.numel() for p in trainable) / 1e6, 2),
        "loss_last": round(loss, 4),
        "step_s": [round(t, 4) for t in times],
        "step_s_median": round(statistics.median(times), 4),
        "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def add_ratios(results: list[dict]) -> None:
    """``ratio_vs_baseline``: step time over the same model's ``clip`` (stage 1) or ``membridge`` (stage 2) step
    time; None when that baseline was not run."""
    medians = {(r["model"], r["variant"]): r["step_s_median"] for r in results}
    for r in results:
        base = medians.get((r["model"], BASELINES[r["stage"]]))
        r["ratio_vs_baseline"] = round(r["step_s_median"] / base, 3) if base else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny", help="comma list of tiny, vitb16")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--videos", type=int, default=4, help="videos (= captions) per step")
    p.add_argument("--frames", type=int, default=8, help="frames per video")
    p.add_argument("--words", type=int, default=32, help="tokens per caption")
    p.add_argument("--torch_threads", type=int, default=0, help="torch CPU threads per child (0: torch's default)")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models, variants = args.models.split(","), args.variants.split(",")
    unknown = [m for m in models if m not in MODELS] + [v for v in variants if v not in VARIANTS]
    if unknown or args.steps < 1 or args.videos < 2:
        p.error(f"unknown {unknown}; choose --models from {list(MODELS)}, --variants from {list(VARIANTS)}, "
                "--steps >= 1 and --videos >= 2 (stage 2 draws hard negatives within the batch)")  # fmt: skip
    if args.child:
        print(json.dumps(run_child(*args.child, args.steps, args.videos, args.frames, args.words, args.torch_threads)))
        return
    load_at_start = os.getloadavg()
    results = []
    for model in models:
        for variant in variants:
            cmd = [sys.executable, __file__, "--child", model, variant, "--steps", str(args.steps)]
            cmd += ["--videos", str(args.videos), "--frames", str(args.frames), "--words", str(args.words)]
            cmd += ["--torch_threads", str(args.torch_threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{model} / {variant} failed:\n{proc.stderr[-4000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    add_ratios(results)
    report = {
        "bench": "train_methods",
        "cpu_count": os.cpu_count(),
        "torch_threads_flag": args.torch_threads,
        "torch_version": torch.__version__,
        "steps": args.steps,
        "baselines": BASELINES,
        "load_average_1_5_15min_start": [round(load, 2) for load in load_at_start],
        "load_average_1_5_15min": [round(load, 2) for load in os.getloadavg()],
        "results": results,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
