"""Caption decoding through the fusion, KV-cached fast path vs the plain path, greedy and beam search (JSON).

    python bench/bench_caption.py                                     # tiny + ViT-B/16 sizes, greedy + beam 5
    python bench/bench_caption.py --models vitb16 --beams 5 --max_len 31 --out caption.json
    python bench/bench_caption.py --models tiny --max_len 15 --videos 8 --device cuda

Weights are random (the sizes are what matters), so no caption ends early: every video decodes ``--max_len``
tokens, the worst case. Frame features are random ``[videos, frames, D]``: this measures decoding only (the ViT
pass is the same for both paths). Both paths score [BOS] once per video and batch videos x beams in one pass.

- ``naive`` (``use_cache=False``): each step re-encodes ``[SOT, w1..wi]`` and ``[SOT, w1..wi, EOT]`` with the CLIP
  text encoder and runs the full fusion pass of the training read-out (:meth:`MemBridgeFusion.next_token_logits`
  with ``P @ E_tok^T`` formed once per decode);
- ``cached`` (the default): the text encoder keeps per-layer keys/values and encodes the new token and the EOT
  probe only; the fusion runs each layer only where the scored slot depends on it
  (:meth:`MemBridgeFusion.next_token_logits_pruned`) and the vocabulary head is applied factored.

The two paths are timed side by side in one run: ``--repeats`` interleaved rounds (the order alternates), medians of
wall and CPU time. ``ratio`` = naive / cached (wall medians). ``cached_fusion_seconds`` is the time the cached path
spends in the fusion pass itself (memory read, pruned transformer, head); the bridge tokens depend on the prefix, so
it runs every step, and ``ratio_bound_fusion_only`` = naive / that time is the ratio the cached path would reach if
everything else (text encoder, search, bookkeeping) were free. ``tokens_identical`` checks both decode the same.
Every figure is also given by CPU time of this process (``*_cpu_*``): with ``--torch_threads 1`` on a shared machine
the wall clock also counts waiting for a core, which the two paths do not get in equal shares; CPU time is the work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modules.clip_model import CLIPConfig, load_clip  # noqa: E402
from modules.fusion import FusionConfig, MemBridgeFusion  # noqa: E402
from modules.membridge import MemBridgeModel  # noqa: E402
from modules.video_clip import VideoCLIP  # noqa: E402
from video_captioning.captioner import generate_captions  # noqa: E402

MODELS = {
    "tiny": ("CLIP-modules/tiny.json", "CLIP-modules/fusion-tiny.json"),
    "vitb16": ("CLIP-modules/ViT-B-16.json", "CLIP-modules/fusion.json"),
}
FRAMES = 12
SEED = 0
PATHS = (("cached", True), ("naive", False))


def build(model: str, max_words: int, device: torch.device) -> MemBridgeModel:
    """A random MemBridge model of the given sizes, fusion initialised from CLIP, in eval mode."""
    clip_json, fusion_json = MODELS[model]
    torch.manual_seed(SEED)
    clip = load_clip(config=CLIPConfig.from_json(REPO / clip_json))
    fusion = MemBridgeFusion(FusionConfig.from_json(REPO / fusion_json, max_frames=FRAMES, max_words=max_words))
    fusion.init_from_clip(clip)
    return MemBridgeModel(VideoCLIP(clip, max_frames=FRAMES), fusion).to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def fusion_timer(device: torch.device) -> Iterator[list[float]]:
    """Accumulate the wall and CPU time spent in :meth:`MemBridgeFusion.next_token_logits_pruned` (the cached path's
    fusion pass) into the yielded ``[wall, cpu]`` list."""
    original = MemBridgeFusion.next_token_logits_pruned
    spent = [0.0, 0.0]

    def timed_pass(self: MemBridgeFusion, *args: object) -> torch.Tensor:
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        out = original(self, *args)
        _sync(device)
        spent[0] += time.perf_counter() - start
        spent[1] += time.process_time() - start_cpu
        return out

    MemBridgeFusion.next_token_logits_pruned = timed_pass
    try:
        yield spent
    finally:
        MemBridgeFusion.next_token_logits_pruned = original


def measure(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float, torch.Tensor]:
    """``(wall seconds, CPU seconds of this process, result)`` of one call."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def bench_setting(
    model: MemBridgeModel, frames: torch.Tensor, mask: torch.Tensor, beam: int, args: argparse.Namespace
) -> dict:
    """Cached vs naive decoding of one beam size, ``args.repeats`` interleaved rounds."""
    device = frames.device

    def decode(use_cache: bool, max_len: int = args.max_len) -> torch.Tensor:
        return generate_captions(model, frames, mask, max_len, beam_size=beam, use_cache=use_cache)

    for _, use_cache in PATHS:  # warm-up (allocator, kernels) on a short decode
        decode(use_cache, max_len=2)
    wall: dict[str, list[float]] = {path: [] for path, _ in PATHS}
    cpu: dict[str, list[float]] = {path: [] for path, _ in PATHS}
    fusion: list[float] = []
    fusion_cpu: list[float] = []
    tokens: dict[str, torch.Tensor] = {}
    for rep in range(args.repeats):
        for path, use_cache in PATHS if rep % 2 == 0 else PATHS[::-1]:
            with fusion_timer(device) as spent:
                seconds, cpu_seconds, tokens[path] = measure(lambda use_cache=use_cache: decode(use_cache), device)
            wall[path].append(seconds)
            cpu[path].append(cpu_seconds)
            if use_cache:
                fusion.append(spent[0])
                fusion_cpu.append(spent[1])
    med = {path: statistics.median(values) for path, values in wall.items()}
    med_cpu = {path: statistics.median(values) for path, values in cpu.items()}
    fusion_seconds, fusion_cpu_seconds = statistics.median(fusion), statistics.median(fusion_cpu)
    return {
        "cached_seconds": round(med["cached"], 3),
        "naive_seconds": round(med["naive"], 3),
        "ratio": round(med["naive"] / med["cached"], 2),
        "ratio_per_round": [round(n / c, 2) for n, c in zip(wall["naive"], wall["cached"], strict=True)],
        "cached_cpu_seconds": round(med_cpu["cached"], 3),
        "naive_cpu_seconds": round(med_cpu["naive"], 3),
        "ratio_cpu_time": round(med_cpu["naive"] / med_cpu["cached"], 2),
        "ratio_cpu_time_per_round": [round(n / c, 2) for n, c in zip(cpu["naive"], cpu["cached"], strict=True)],
        "cached_videos_per_s": round(frames.shape[0] / med["cached"], 3),
        "naive_videos_per_s": round(frames.shape[0] / med["naive"], 3),
        "cached_fusion_seconds": round(fusion_seconds, 3),
        "fusion_share_of_cached": round(fusion_seconds / med["cached"], 3),
        "ratio_bound_fusion_only": round(med["naive"] / fusion_seconds, 2),
        "cached_fusion_cpu_seconds": round(fusion_cpu_seconds, 3),
        "fusion_share_of_cached_cpu": round(fusion_cpu_seconds / med_cpu["cached"], 3),
        "ratio_bound_fusion_only_cpu_time": round(med_cpu["naive"] / fusion_cpu_seconds, 2),
        "tokens_identical": bool(torch.equal(tokens["cached"], tokens["naive"])),
        "generated_tokens": int(tokens["cached"].shape[1]),
    }


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    model = build(name, args.max_len + 1, device)
    d = model.encoder.clip.config.embed_dim
    gen = torch.Generator().manual_seed(SEED)
    frames = torch.randn(args.videos, FRAMES, d, generator=gen).to(device)
    mask = torch.ones(args.videos, FRAMES, dtype=torch.long, device=device)
    return {
        "greedy" if beam == 1 else f"beam{beam}": bench_setting(model, frames, mask, beam, args) for beam in args.beams
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "vitb16"], help="sizes")
    parser.add_argument("--beams", nargs="+", type=int, default=[1, 5], help="beam sizes (1 = greedy)")
    parser.add_argument("--videos", type=int, default=4, help="videos decoded together")
    parser.add_argument("--max_len", type=int, default=31, help="generated tokens (--max_words - 1)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds per setting (median kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--torch_threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device(args.device)
    report = {
        "bench": "caption_decoding",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "load_average_1_5_15min_before": [round(load, 2) for load in os.getloadavg()],
        "videos": args.videos,
        "frames": FRAMES,
        "max_len": args.max_len,
        "repeats": args.repeats,
        "results": {},
    }
    with torch.no_grad():
        for name in args.models:
            report["results"][name] = bench_model(name, args, device)
    report["load_average_1_5_15min_after"] = [round(load, 2) for load in os.getloadavg()]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
