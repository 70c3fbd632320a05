"""Caption decoding throughput through the fusion (videos/s), greedy and beam search, KV-cached vs naive (JSON).

    python bench/bench_caption.py                                 # tiny + ViT-B/16 sizes, greedy + beam 5
    python bench/bench_caption.py --models tiny --max_len 15 --videos 8 --device cuda

Weights are random (the sizes are what matters), so no caption ends early: every video decodes ``--max_len``
tokens, the worst case. Frame features are random ``[videos, frames, D]``: this measures decoding only (the ViT
pass is the same for both paths). ``cached``: the CLIP text encoder keeps per-layer keys/values and each step
encodes the new token and the EOT probe only; ``naive``: each step re-encodes ``[SOT, w1..wi]`` and
``[SOT, w1..wi, EOT]``. The fusion runs every step on both paths. ``tokens_identical`` checks both decode the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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


def build(model: str, max_words: int, device: torch.device) -> MemBridgeModel:
    """A random MemBridge model of the given sizes, fusion initialised from CLIP, in eval mode."""
    clip_json, fusion_json = MODELS[model]
    torch.manual_seed(SEED)
    clip = load_clip(config=CLIPConfig.from_json(REPO / clip_json))
    fusion = MemBridgeFusion(FusionConfig.from_json(REPO / fusion_json, max_frames=FRAMES, max_words=max_words))
    fusion.init_from_clip(clip)
    return MemBridgeModel(VideoCLIP(clip, max_frames=FRAMES), fusion).to(device).eval()


def timed(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """Best wall time of ``repeats`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    model = build(name, args.max_len + 1, device)
    d = model.encoder.clip.config.embed_dim
    gen = torch.Generator().manual_seed(SEED)
    frames = torch.randn(args.videos, FRAMES, d, generator=gen).to(device)
    mask = torch.ones(args.videos, FRAMES, dtype=torch.long, device=device)
    results = {}
    for beam in args.beams:
        decode = "greedy" if beam == 1 else f"beam{beam}"
        row = {}
        tokens = {}
        for path, use_cache in (("cached", True), ("naive", False)):
            seconds, tokens[path] = timed(
                lambda use_cache=use_cache, beam=beam: generate_captions(
                    model, frames, mask, args.max_len, beam_size=beam, use_cache=use_cache
                ),
                device,
                args.repeats,
            )
            row[f"{path}_videos_per_s"] = round(args.videos / seconds, 3)
            row[f"{path}_seconds"] = round(seconds, 3)
        row["speedup"] = round(row["naive_seconds"] / row["cached_seconds"], 2)
        row["tokens_identical"] = bool(torch.equal(tokens["cached"], tokens["naive"]))
        row["generated_tokens"] = int(tokens["cached"].shape[1])
        results[decode] = row
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "vitb16"], help="sizes")
    parser.add_argument("--beams", nargs="+", type=int, default=[1, 5], help="beam sizes (1 = greedy)")
    parser.add_argument("--videos", type=int, default=4, help="videos decoded together")
    parser.add_argument("--max_len", type=int, default=31, help="generated tokens (--max_words - 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best is kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "videos": args.videos,
        "frames": FRAMES,
        "max_len": args.max_len,
        "results": {},
    }
    with torch.no_grad():
        for name in args.models:
            report["results"][name] = bench_model(name, args, device)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
