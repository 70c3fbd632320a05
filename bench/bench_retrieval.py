"""Retrieval evaluation cost: dual-encoder similarity and top-k bridge re-ranking (printed as JSON).

    python bench/bench_retrieval.py                         # 1000 videos x 1000 captions, top-32, tiny + ViT-B/16
    python bench/bench_retrieval.py --videos 200 --captions 200 --skip_vitb16_video

The similarity and re-ranking stages run on random feature tensors of the evaluation shapes (``[Nv, T, D]`` frame
features, ``[Nt, L, D]`` text features) through the real code (video_text_retrieval/task.py), at the tiny config
with and without re-ranking. Video encoding is timed per video on its own (tiny, and one ViT-B/16 video unless
``--skip_vitb16_video``). For ViT-B/16 the fusion's re-rank pass is timed per (video, text) pair at the published
fusion size (CLIP-modules/fusion.json, random weights) and extrapolated to the ``(Nt + Nv) * topk`` pairs of a full
evaluation. Peak memory: resident set size of the process after each stage (CUDA: peak allocated).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.distributed import DistInfo  # noqa: E402
from modules.clip_model import load_clip  # noqa: E402
from modules.fusion import FusionConfig, MemBridgeFusion  # noqa: E402
from modules.membridge import MemBridgeModel  # noqa: E402
from modules.video_clip import VideoCLIP  # noqa: E402
from video_text_retrieval.task import EncodedEvalSet, dual_similarity, rerank_similarity  # noqa: E402

CONFIGS = {
    "tiny": ("CLIP-modules/tiny.json", "CLIP-modules/fusion-tiny.json"),
    "vitb16": ("CLIP-modules/ViT-B-16.json", "CLIP-modules/fusion.json"),
}
EOT_ID = 49407
MIN_TEXT_LEN = 4  # SOT, two words, EOT
TINY_VIDEO_BATCH = 16
KIB_PER_MIB = 1024


def build_model(name: str, frames: int, words: int) -> MemBridgeModel:
    """A randomly initialised dual encoder + fusion of one of :data:`CONFIGS`, in eval mode."""
    clip_json, fusion_json = CONFIGS[name]
    clip = load_clip(config=str(REPO / clip_json))
    fusion = MemBridgeFusion(FusionConfig.from_json(REPO / fusion_json, max_frames=frames, max_words=words))
    return MemBridgeModel(VideoCLIP(clip, max_frames=frames), fusion).eval()


def random_features(n_videos: int, n_texts: int, frames: int, words: int, dim: int, seed: int) -> EncodedEvalSet:
    """Encoded-set tensors of the right shapes: random features, captions of random length ending in EOT."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(MIN_TEXT_LEN, words + 1, (n_texts,), generator=g)
    positions = torch.arange(words)
    text_mask = (positions[None, :] < lengths[:, None]).long()
    text_ids = torch.randint(1, EOT_ID - 1, (n_texts, words), generator=g) * text_mask
    text_ids[torch.arange(n_texts), lengths - 1] = EOT_ID
    text_tokens = torch.randn(n_texts, words, dim, generator=g)
    return EncodedEvalSet(
        frame_feats=torch.randn(n_videos, frames, dim, generator=g),
        video_mask=torch.ones(n_videos, frames, dtype=torch.long),
        text_tokens=text_tokens,
        text_feats=text_tokens[torch.arange(n_texts), lengths - 1],
        text_ids=text_ids,
        text_mask=text_mask,
        video_ok=torch.ones(n_videos, dtype=torch.long),
    )


def to_device(enc: EncodedEvalSet, device: torch.device) -> EncodedEvalSet:
    return EncodedEvalSet(**{k: v.to(device) for k, v in vars(enc).items()})


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls (after one warm-up call) and the last result."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best, result


def peak_memory_mib(device: torch.device) -> float:
    """Peak resident memory of this process (CUDA: peak allocated device memory), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB


@torch.no_grad()
def bench_tiny(args: argparse.Namespace, device: torch.device, dist: DistInfo) -> dict:
    model = build_model("tiny", args.frames, args.words).to(device)
    dim = model.encoder.clip.config.embed_dim
    enc = to_device(random_features(args.videos, args.captions, args.frames, args.words, dim, args.seed), device)
    sim_s, sim = timed(lambda: dual_similarity(model, enc), device, args.repeats)
    keep_t = torch.ones(args.captions, dtype=torch.bool)
    keep_v = torch.ones(args.videos, dtype=torch.bool)
    sim = sim.cpu()
    rerank_s, _ = timed(
        lambda: rerank_similarity(model, enc, sim, keep_t, keep_v, args.topk, dist), device, args.repeats
    )
    size = model.encoder.clip.config.image_resolution
    video = torch.randn(TINY_VIDEO_BATCH, args.frames, 3, size, size, device=device)
    mask = torch.ones(TINY_VIDEO_BATCH, args.frames, dtype=torch.long, device=device)
    encode_s, _ = timed(lambda: model.encoder.encode_video(video, mask), device, args.repeats)
    pairs = (args.captions + args.videos) * min(args.topk, args.videos, args.captions)
    return {
        "similarity_s": sim_s,
        "rerank_s": rerank_s,
        "eval_without_rerank_s": sim_s,
        "eval_with_rerank_s": sim_s + rerank_s,
        "rerank_pairs": pairs,
        "rerank_per_pair_ms": 1e3 * rerank_s / pairs,
        "video_encode_per_video_ms": 1e3 * encode_s / TINY_VIDEO_BATCH,
        "peak_memory_mib": peak_memory_mib(device),
    }


@torch.no_grad()
def bench_vitb16(args: argparse.Namespace, device: torch.device) -> dict:
    model = build_model("vitb16", args.frames, args.words).to(device)
    dim = model.encoder.clip.config.embed_dim
    enc = to_device(random_features(args.videos, args.captions, args.frames, args.words, dim, args.seed), device)
    sim_s, _ = timed(lambda: dual_similarity(model, enc), device, args.repeats)
    # One fusion pass over ``pairs_per_pass`` pairs: query groups of ``topk`` candidates, as the re-ranking runs them.
    n = args.pairs_per_pass
    text_idx = torch.arange(n, device=device) % args.captions
    video_idx = torch.arange(n, device=device) % args.videos
    group = min(args.topk, n)

    def fusion_pass() -> torch.Tensor:
        return model.fusion.match_logits(
            enc.frame_feats[video_idx], enc.video_mask[video_idx], enc.text_tokens[text_idx],
            enc.text_mask[text_idx], enc.text_feats[text_idx], group_size=group,
        )  # fmt: skip

    pass_s, _ = timed(fusion_pass, device, args.repeats)
    per_pair = pass_s / n
    pairs = (args.captions + args.videos) * min(args.topk, args.videos, args.captions)
    out = {
        "similarity_s": sim_s,
        "rerank_per_pair_ms": 1e3 * per_pair,
        "rerank_pairs": pairs,
        "rerank_s_extrapolated": per_pair * pairs,
        "eval_with_rerank_s_extrapolated_without_encoding": sim_s + per_pair * pairs,
    }
    if not args.skip_vitb16_video:
        size = model.encoder.clip.config.image_resolution
        video = torch.randn(1, args.frames, 3, size, size, device=device)
        mask = torch.ones(1, args.frames, dtype=torch.long, device=device)
        encode_s, _ = timed(lambda: model.encoder.encode_video(video, mask), device, 1)
        out["video_encode_per_video_s"] = encode_s
        out["video_encoding_s_extrapolated"] = encode_s * args.videos
    out["peak_memory_mib"] = peak_memory_mib(device)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=1000, help="videos in the evaluation set")
    parser.add_argument("--captions", type=int, default=1000, help="captions in the evaluation set")
    parser.add_argument("--topk", type=int, default=32, help="re-ranked candidates per query (--rerank_topk)")
    parser.add_argument("--frames", type=int, default=12, help="frames T per video (--max_frames)")
    parser.add_argument("--words", type=int, default=32, help="caption length L (--max_words)")
    parser.add_argument("--pairs_per_pass", type=int, default=64, help="ViT-B/16: pairs in one timed fusion pass")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions (the best is reported)")
    parser.add_argument("--skip_vitb16", action="store_true", help="only the tiny config")
    parser.add_argument("--skip_vitb16_video", action="store_true", help="do not time a ViT-B/16 video encoding")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    report = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "videos": args.videos,
        "captions": args.captions,
        "topk": args.topk,
        "frames": args.frames,
        "words": args.words,
        "tiny": bench_tiny(args, device, dist),
    }
    if not args.skip_vitb16:
        report["vitb16"] = bench_vitb16(args, device)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
