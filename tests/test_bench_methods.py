"""bench/bench_methods.py: one JSON line with a positive step time per requested variant, ratios against the stage's
baseline, and one shared batch for every variant of a model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import torch

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "bench_methods.py"
SPEC = importlib.util.spec_from_file_location("bench_methods", SCRIPT)
bench_methods = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_methods)

SMOKE_VARIANTS = ["clip", "membridge", "stoa"]  # both stages' baselines and one method (each is its own process)


def test_tiny_run_reports_every_requested_variant_with_a_positive_time():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--models", "tiny", "--steps", "1", "--torch_threads", "1",
           "--variants", ",".join(SMOKE_VARIANTS)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cpu_count"] == os.cpu_count() and report["torch_version"] == torch.__version__
    assert len(report["load_average_1_5_15min_start"]) == 3 and len(report["load_average_1_5_15min"]) == 3
    by_variant = {r["variant"]: r for r in report["results"]}
    assert sorted(by_variant) == sorted(SMOKE_VARIANTS) and len(report["results"]) == len(SMOKE_VARIANTS)
    for r in report["results"]:
        assert r["model"] == "tiny" and len(r["step_s"]) == 1 and r["step_s_median"] > 0, r
        assert r["peak_rss_MB"] > 0 and r["trainable_params_M"] > 0 and r["threads"] == 1
        base = by_variant["clip" if r["stage"] == "stage1" else "membridge"]
        assert r["ratio_vs_baseline"] == round(r["step_s_median"] / base["step_s_median"], 3)
    assert by_variant["clip"]["ratio_vs_baseline"] == by_variant["membridge"]["ratio_vs_baseline"] == 1.0
    assert by_variant["stoa"]["stage"] == "stage2" and by_variant["clip"]["stage"] == "stage1"


def test_every_variant_parses_with_its_entry_script_flags_and_shares_one_batch(tmp_path):
    shared = None
    for variant in bench_methods.VARIANTS:
        args = bench_methods.parse_variant_flags("tiny", variant, 3, 4, 16, str(tmp_path))
        expected_method = {"t2vlp_s1": "t2vlp", "t2vlp_s2": "t2vlp", "stoa": "stoa"}.get(variant, "membridge")
        assert args.method == expected_method and args.batch_size == 3 and args.max_frames == 4
        if variant in ("clip", "mcq", "hmmc"):
            assert args.stage1_objective == variant
        batch = bench_methods.make_batch(args, 32, variant)
        keys = ("video", "video_mask", "text_ids", "text_mask")
        if shared is None:
            shared = {k: batch[k] for k in keys}
        for k in keys:
            assert torch.equal(batch[k], shared[k]), (variant, k)
        ids = batch["text_ids"]
        assert (ids[:, 0] == bench_methods.SOT).all() and ((ids == bench_methods.EOT).sum(1) == 1).all()
        assert torch.equal(batch["text_mask"], (ids != 0).long())
        if variant == "stoa":  # the batch contract of docs/ARCHITECTURE.md: padding boxes -1 where the class is 0
            classes, boxes = batch["object_classes"], batch["object_boxes"]
            assert boxes.shape == (3, 4, args.object_count, 4) and (boxes[classes == 0] == -1).all()
            real = boxes[classes > 0]
            assert (real[:, 2:] > real[:, :2]).all() and ((real >= 0) & (real <= 1)).all()
            assert batch["trajectory_ids"].shape == (3, 2 * args.object_count)
            assert set(batch["trajectory_ids"][0].tolist()) - {0} == set(classes[0].flatten().tolist()) - {0}
