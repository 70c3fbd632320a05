"""Stage-1 training step time, peak memory and achieved FLOP/s (printed as JSON).

    python bench/bench_train.py                      # tiny + ViT-B/16, fp32 + bf16 (ViT-B/16 takes minutes on CPU)
    python bench/bench_train.py --models tiny --steps 5

Each (model, precision) runs in its own child process so that its peak resident memory is its own. A step is the
real training step: VideoCLIP forward on ``--videos`` videos x ``--frames`` frames + text, gathered symmetric InfoNCE,
backward, BertAdam update. FLOPs are counted with ``torch.utils.flop_counter`` on one step; the machine's peak is a
measured fp32 (bf16 for ``amp_bf16``) 2048^2 matmul rate, taken in the same child right before every timed step, so
the step and its peak see the same machine load (2 cores shared with other work here). ``fraction_of_peak`` is the
median over steps of (FLOPs / step time) / (adjacent peak); ``fwd_bwd_fraction_of_peak`` leaves out the optimiser
step (timed on its own: a memory-bound pass over ~150M parameters that no matmul unit speeds up). The JSON records
the core count, torch version and the load average at start and end.

The host allocator is set as the training entry scripts set it (``--host_malloc``, default ``keep``: on a CPU run
glibc keeps freed memory, engine/host_malloc.py); ``--host_malloc keep,system`` times both side by side. With memory
kept, the first steps still grow the heap (each fresh page faults in), so ``--warmup`` untimed steps come first and
``page_faults_per_step`` shows that the timed steps reuse memory (0 in the steady state); with glibc's default every
step faults in ~2 GB of activations again (ViT-B/16: ~0.5M faults per step).

What bounds the fractions here (2 cores shared with other jobs): the bf16 peak is an AMX matmul ~4-7x the fp32 one,
but the step's other work does not speed up with it -- LayerNorm (fp32 by design), the autocast casts of weights and
activations, GELU, softmax, residual adds, and the fp32 BertAdam pass over 150M parameters -- so by Amdahl the bf16
fraction stays far below the fp32 one. Under load every parallel region can wait for a busy core, which hits the
many small memory-bound ops (the optimizer) hardest; compare fractions from one run, not across runs.

To make that bound a number, one extra forward + backward runs under ``torch.profiler``: ``fwd_bwd_profile_s``
splits its self CPU time into GEMMs, fused attention, the patch-embedding convolution and everything else, and
``fraction_bound_non_matmul_as_now`` is the fraction the step would reach if every counted FLOP ran at the matmul
peak while the other work (profile ``other`` + the optimiser step) stayed as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {"tiny": "CLIP-modules/tiny.json", "vitb16": "CLIP-modules/ViT-B-16.json"}
MATMUL_SIZE = 2048
PEAK_REPEATS = 5


class MatmulPeak:
    """Measured FLOP/s of a square matmul on this machine (best of ``repeats``), on operands and an output allocated
    once: a measurement between two training steps must not change the heap the steps reuse (with freed memory kept,
    ``--host_malloc keep``, fresh 2048^2 matrices between steps cost the next step ~60k page faults)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.a = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
        self.b = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
        self.out = torch.empty(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype)
        torch.matmul(self.a, self.b, out=self.out)

    def __call__(self, repeats: int = 10) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(self.a, self.b, out=self.out)
            best = min(best, time.perf_counter() - t0)
        return 2 * MATMUL_SIZE**3 / best


# aten ops whose time counts as matrix-unit work (the matmul peak applies to them); everything else is "other"
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")
ATTENTION_OPS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)
CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward")


def time_breakdown(forward_backward) -> dict:
    """Self CPU seconds of one profiled forward + backward by kind: ``matmul`` (GEMMs), ``attention`` (fused SDPA
    kernels), ``conv`` (the patch embedding) and ``other`` (LayerNorm, GELU, softmax, casts, adds, copies...).
    The profiler's own overhead inflates the many small ops a little, so ``other`` is an upper estimate."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward_backward()
    spent = {"matmul": 0.0, "attention": 0.0, "conv": 0.0, "other": 0.0}
    for event in prof.key_averages():
        kind = (
            "matmul" if event.key in MATMUL_OPS else "attention" if event.key in ATTENTION_OPS
            else "conv" if event.key in CONV_OPS else "other"
        )  # fmt: skip
        spent[kind] += event.self_cpu_time_total / 1e6
    return {kind: round(seconds, 3) for kind, seconds in spent.items()}


def amdahl_bound(flops: float, peak: float, breakdown: dict, optimizer_s: float) -> dict:
    """The fraction of peak the step would reach if every FLOP ran at the matmul peak and the rest (``other`` of the
    profile plus the optimiser step) took what it takes now: the bound that the non-matmul work sets."""
    at_peak = flops / peak
    rest = breakdown["other"] + optimizer_s
    return {
        "flops_at_peak_s": round(at_peak, 3),
        "non_matmul_s": round(rest, 3),
        "fraction_bound_non_matmul_as_now": round(at_peak / (at_peak + rest), 3),
        "fwd_bwd_fraction_bound_non_matmul_as_now": round(at_peak / (at_peak + breakdown["other"]), 3),
    }


def run_child(
    model: str, precision: str, malloc: str, steps: int, videos: int, frames: int, words: int, warmup: int
) -> dict:
    from engine.host_malloc import configure_host_malloc
    from engine.optim import build_optimizer
    from engine.trainer import autocast_context
    from modules.clip_model import load_clip
    from modules.membridge import MemBridgeModel
    from modules.video_clip import VideoCLIP
    from video_text_retrieval.task import ContrastiveTask

    malloc_applied = configure_host_malloc(malloc, cuda=False)  # as the training CLIs do on CPU (--host_malloc)
    matmul_peak = MatmulPeak(torch.bfloat16 if "bf16" in precision else torch.float32)
    torch.manual_seed(0)
    clip = load_clip(config=str(REPO / MODELS[model]))
    task = ContrastiveTask(MemBridgeModel(VideoCLIP(clip, joint_layers=2, max_frames=frames), None))
    optimizer, _, _ = build_optimizer(
        task, optimizer="bertadam", lr=1e-4, coef_lr=1e-3, fusion_lr=None, weight_decay=0.2,
        warmup_proportion=0.1, total_steps=1000, max_grad_norm=1.0,
    )  # fmt: skip
    size = clip.config.image_resolution
    batch = {
        "video": torch.randn(videos, frames, 3, size, size),
        "video_mask": torch.ones(videos, frames, dtype=torch.long),
        "text_ids": torch.randint(1, 49405, (videos, words)),
        "text_mask": torch.ones(videos, words, dtype=torch.long),
    }
    batch["text_ids"][:, -1] = 49407
    device = torch.device("cpu")

    def forward_backward() -> None:
        with autocast_context(precision, device):
            loss = task(batch)["loss"]
        loss.backward()

    def update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        forward_backward()
        update()

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()  # also the first warm-up step
    for _ in range(warmup - 1):  # kept freed memory reaches its steady state (no new pages) after a few steps
        step()
    flops = counter.get_total_flops()
    times, fwd_bwd_times, peaks, faults = [], [], [], []
    for _ in range(steps):
        peaks.append(matmul_peak(repeats=PEAK_REPEATS))
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        forward_backward()
        t1 = time.perf_counter()
        update()
        times.append(time.perf_counter() - t0)
        fwd_bwd_times.append(t1 - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    breakdown = time_breakdown(forward_backward)
    step_s = min(times)
    fraction = statistics.median(flops / t / peak for t, peak in zip(times, peaks, strict=True))
    fwd_bwd_fraction = statistics.median(flops / t / peak for t, peak in zip(fwd_bwd_times, peaks, strict=True))
    return {
        "model": model,
        "precision": precision,
        "host_malloc": malloc,
        "host_malloc_applied": malloc_applied,
        "videos": videos,
        "frames": frames,
        "words": words,
        "params_M": round(sum(p.numel() for p in task.parameters()) / 1e6, 2),
        "step_s_min": round(step_s, 4),
        "step_s_mean": round(sum(times) / len(times), 4),
        "step_s_all": [round(t, 3) for t in times],
        "warmup_steps": warmup,
        "page_faults_per_step": faults,
        "flops_per_step_G": round(flops / 1e9, 2),
        "achieved_GFLOPs": round(flops / step_s / 1e9, 2),
        "step_s_median": round(statistics.median(times), 4),
        "optimizer_s_median": round(statistics.median(a - b for a, b in zip(times, fwd_bwd_times, strict=True)), 4),
        "matmul_peak_GFLOPs": round(statistics.median(peaks) / 1e9, 2),
        "fraction_of_peak": round(fraction, 3),
        "fwd_bwd_fraction_of_peak": round(fwd_bwd_fraction, 3),
        "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "fwd_bwd_profile_s": breakdown,
        **amdahl_bound(
            flops, statistics.median(peaks), breakdown, statistics.median(times) - statistics.median(fwd_bwd_times)
        ),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,vitb16", help="comma list of tiny, vitb16")
    p.add_argument("--precisions", default="fp32,amp_bf16", help="comma list of fp32, amp_bf16")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up steps")
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps first (the first also counts the FLOPs); a training run's steady state is what is timed",
    )
    p.add_argument("--videos", type=int, default=2, help="videos per step")
    p.add_argument("--frames", type=int, default=12, help="frames per video")
    p.add_argument("--words", type=int, default=32, help="tokens per caption")
    p.add_argument(
        "--host_malloc",
        default="keep",
        help="comma list of keep, system: the training CLIs' --host_malloc (auto = keep on CPU); both side by side "
        "show what glibc's page-faulting large allocations cost",
    )
    p.add_argument("--child", nargs=3, metavar=("MODEL", "PRECISION", "MALLOC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(*args.child, args.steps, args.videos, args.frames, args.words, args.warmup)))
        return
    load_at_start = os.getloadavg()
    results = []
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            for malloc in args.host_malloc.split(","):
                cmd = [sys.executable, __file__, "--child", model, precision, malloc, "--steps", str(args.steps)]
                cmd += ["--videos", str(args.videos), "--frames", str(args.frames), "--words", str(args.words)]
                cmd += ["--warmup", str(args.warmup)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                results.append(json.loads(out))
    report = {
        "bench": "train_stage1",
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "load_average_1_5_15min_start": [round(load, 2) for load in load_at_start],
        "load_average_1_5_15min": [round(load, 2) for load in os.getloadavg()],
        "results": results,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
