"""Stage-2 (fusion pre-training) step time and peak memory, batched PLM vs the per-prefix loop reference
(``modules/reference.py``), re-ranking cost.

    python bench/bench_fusion.py                         # tiny + ViT-B/16 sizes (random weights; minutes on CPU)
    python bench/bench_fusion.py --models tiny --steps 3

Printed as one JSON object. Each measurement runs in its own child process so its peak resident memory is its own.

- ``step``: one real stage-2 training step (VTM + MLM + PLM, backward, BertAdam) on ``--videos`` videos x
  ``--frames`` frames and ``--words`` tokens, with the frozen CLIP either running the ViT on the frames
  (``cache=false``) or reading cached frame features (``cache=true``, ``--cache_visual_features``).
- ``plm``: the PLM loss + backward alone, batched (constant number of passes) vs the plain per-prefix loop.
- ``rerank``: fusion VTM scoring of candidate pairs at evaluation, seconds per video-text pair.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    "tiny": ("CLIP-modules/tiny.json", "CLIP-modules/fusion-tiny.json"),
    "vitb16": ("CLIP-modules/ViT-B-16.json", "CLIP-modules/fusion.json"),
}
RERANK_PAIRS = 64


def _build(model: str, frames: int, words: int):
    from modules.clip_model import load_clip
    from modules.fusion import FusionConfig, MemBridgeFusion
    from modules.membridge import MemBridgeModel
    from modules.video_clip import VideoCLIP

    clip_cfg, fusion_cfg = MODELS[model]
    clip = load_clip(config=str(REPO / clip_cfg))
    fusion = MemBridgeFusion(FusionConfig.from_json(REPO / fusion_cfg, max_frames=frames, max_words=words))
    fusion.init_from_clip(clip)
    model_ = MemBridgeModel(VideoCLIP(clip, joint_layers=2, max_frames=frames), fusion)
    model_.freeze_encoder()
    return model_


def _batch(model, videos: int, frames: int, words: int, cached: bool) -> dict:
    size = model.encoder.clip.config.image_resolution
    text = torch.randint(1, 49405, (videos, words))
    text[:, 0] = 49406
    text[:, -1] = 49407
    batch = {
        "video_mask": torch.ones(videos, frames, dtype=torch.long),
        "text_ids": text,
        "text_mask": torch.ones(videos, words, dtype=torch.long),
    }
    if cached:
        batch["frame_feats"] = torch.randn(videos, frames, model.encoder.clip.config.embed_dim)
    else:
        batch["video"] = torch.randn(videos, frames, 3, size, size)
    return batch


def _time(fn, steps: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def child_step(model_name: str, cached: bool, steps: int, videos: int, frames: int, words: int) -> dict:
    from engine.optim import build_optimizer
    from modules.membridge import Stage2Weights
    from pretraining.fusion_task import FusionPretrainTask

    torch.manual_seed(0)
    model = _build(model_name, frames, words)
    task = FusionPretrainTask(model, Stage2Weights())
    optimizer, _, _ = build_optimizer(
        task, optimizer="bertadam", lr=1e-5, coef_lr=1e-3, fusion_lr=1e-5, weight_decay=0.2,
        warmup_proportion=0.1, total_steps=1000, max_grad_norm=1.0,
    )  # fmt: skip
    batch = _batch(model, videos, frames, words, cached)

    def step() -> None:
        out = task(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = _time(step, steps)
    return {"step_s_min": round(min(times), 3), "step_s_mean": round(sum(times) / len(times), 3)}


def child_plm(model_name: str, steps: int, videos: int, frames: int, words: int) -> dict:
    from modules.fusion import draw_plm_starts, encode_text_with_probes, plm_targets
    from modules.reference import plm_loss_loop

    torch.manual_seed(0)
    model = _build(model_name, frames, words)
    fusion, clip = model.fusion, model.encoder.clip
    batch = _batch(model, videos, frames, words, cached=True)
    ids, mask, feats, vmask = batch["text_ids"], batch["text_mask"], batch["frame_feats"], batch["video_mask"]
    emb = clip.token_embedding.weight
    all_prefixes = torch.ones(videos, dtype=torch.long)  # every prefix carries loss: the most expensive draw
    generator = torch.Generator().manual_seed(0)
    random_suffix = draw_plm_starts(mask, generator)  # the published draw: a random suffix per caption
    starts = all_prefixes

    def batched() -> None:
        prefixes = plm_targets(ids, mask, starts)[1].unique()
        with torch.no_grad():
            text_feats, probes = encode_text_with_probes(clip, ids, prefixes, fusion.config.eot_token_id)
        loss, _ = fusion.plm_loss(feats, vmask, ids, mask, starts, text_feats, probes, prefixes, emb)
        loss.backward()

    def loop() -> None:
        loss, _ = plm_loss_loop(fusion, clip, feats, vmask, ids, mask, starts)
        loss.backward()

    b = _time(batched, steps)
    lp = _time(loop, max(1, steps // 2))
    starts = random_suffix
    b_random = _time(batched, steps)
    # the published loop encodes and fuses every prefix whatever the suffix draw: its cost does not change
    return {
        "plm_batched_all_prefixes_s": round(min(b), 3),
        "plm_batched_random_suffix_s": round(min(b_random), 3),
        "random_suffix_rows": int(plm_targets(ids, mask, random_suffix)[0].numel()),
        "plm_loop_s": round(min(lp), 3),
        "plm_speedup_all_prefixes": round(min(lp) / min(b), 2),
        "plm_speedup_random_suffix": round(min(lp) / min(b_random), 2),
    }


@torch.no_grad()
def child_rerank(model_name: str, steps: int, frames: int, words: int) -> dict:
    torch.manual_seed(0)
    model = _build(model_name, frames, words)
    model.eval()
    batch = _batch(model, RERANK_PAIRS, frames, words, cached=True)
    text_feats, t_eot = model.text_features(batch["text_ids"], batch["text_mask"])
    match = model.fusion.pair_match_fn(batch["frame_feats"], batch["video_mask"], text_feats, batch["text_mask"], t_eot)
    idx = torch.arange(RERANK_PAIRS).reshape(2, -1)
    times = _time(lambda: match(idx, idx.flip(1)), steps)
    return {"rerank_pairs": RERANK_PAIRS, "rerank_s_per_pair": round(min(times) / RERANK_PAIRS, 6)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,vitb16", help="comma list of tiny, vitb16")
    p.add_argument("--steps", type=int, default=3, help="timed repetitions after one warm-up")
    p.add_argument("--videos", type=int, default=2, help="videos (video-text pairs) per step")
    p.add_argument("--frames", type=int, default=12, help="frames per video")
    p.add_argument("--words", type=int, default=32, help="tokens per caption")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, model = args.child[0], args.child[1]
        if kind == "step":
            out = child_step(model, args.child[2] == "cached", args.steps, args.videos, args.frames, args.words)
        elif kind == "plm":
            out = child_plm(model, args.steps, args.videos, args.frames, args.words)
        else:
            out = child_rerank(model, args.steps, args.frames, args.words)
        out["peak_rss_MB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(out))
        return
    results = {}
    common = ["--steps", str(args.steps), "--videos", str(args.videos), "--frames", str(args.frames)]
    common += ["--words", str(args.words)]
    for model in args.models.split(","):
        row = {}
        for child in (["step", model, "uncached"], ["step", model, "cached"], ["plm", model], ["rerank", model]):
            cmd = [sys.executable, __file__, *common, "--child", *child]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            row["_".join(child[:1] + child[2:])] = json.loads(out)
        results[model] = row
    targets = {}
    if "vitb16" in results:
        r = results["vitb16"]
        targets = {
            "plm_at_least_10x_faster_than_loop": r["plm"]["plm_speedup_random_suffix"] >= 10,
            "cached_full_size_step_at_most_2.5s": r["step_cached"]["step_s_min"] <= 2.5,
        }
    print(
        json.dumps(
            {
                "bench": "fusion_stage2",
                "threads": torch.get_num_threads(),
                "videos": args.videos,
                "frames": args.frames,
                "words": args.words,
                "results": results,
                "targets": targets,
            }
        )
    )


if __name__ == "__main__":
    main()
