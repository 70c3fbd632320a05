"""Clips per second for one (T, 3, 224, 224) video tensor with the published 1-fps sampling, per backend.

    python bench/bench_decode.py                                   # the real mmaction2 test clip
    python bench/bench_decode.py --video some.mp4 --repeats 20 --max_frames 12

Prints one JSON object: decode-only and decode+transform clips/s for each decoder (pyav, decord) and
transform (pil, tensor) backend, single process, with torch limited to --torch_threads threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dataloaders.transforms import TRANSFORM_BACKENDS, ClipTransform  # noqa: E402
from dataloaders.video_io import load_video  # noqa: E402

DEFAULT_VIDEO = REPO.parent / "shared" / "realdata" / "mmaction2-testdata" / "tests_data_test.mp4"
DECODERS = ("pyav", "decord")


def clips_per_second(fn: Callable[[], object], repeats: int) -> float:
    """Calls of ``fn`` per second over ``repeats`` timed calls after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="video file to decode")
    parser.add_argument("--max_frames", type=int, default=12, help="frames per clip (T)")
    parser.add_argument("--image_size", type=int, default=224, help="output side (S)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per configuration")
    parser.add_argument("--torch_threads", type=int, default=1, help="torch intra-op threads for the transform")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)

    result: dict[str, object] = {}
    for decoder in DECODERS:
        result[f"decode_{decoder}_clips_per_s"] = clips_per_second(
            lambda decoder=decoder: load_video(args.video, args.max_frames, backend=decoder), args.repeats
        )
    frames, mask = load_video(args.video, args.max_frames)
    for name in TRANSFORM_BACKENDS:
        transform = ClipTransform(args.image_size, backend=name)
        result[f"transform_{name}_clips_per_s"] = clips_per_second(lambda t=transform: t(frames, mask), args.repeats)
        for decoder in DECODERS:

            def clip(decoder: str = decoder, transform: ClipTransform = transform) -> torch.Tensor:
                return transform(*load_video(args.video, args.max_frames, backend=decoder))

            result[f"{decoder}+{name}_clips_per_s"] = clips_per_second(clip, args.repeats)
    pil = ClipTransform(args.image_size, backend="pil")(frames, mask)
    fast = ClipTransform(args.image_size, backend="tensor")(frames, mask)
    result["tensor_vs_pil_max_abs_diff"] = float((fast - pil).abs().max())
    result["tensor_vs_pil_mean_abs_diff"] = float((fast - pil).abs().mean())
    result = {key: round(value, 6) for key, value in result.items()}
    result["clip_shape"] = list(fast.shape)
    result["video"] = str(args.video)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
