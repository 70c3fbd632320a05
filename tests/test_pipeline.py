"""Learnability of the two pre-training stages on the default synthetic set (500 videos, 120 test videos), from
scratch with the tiny model: stage 1 retrieval far above chance; stage 2 MLM / PLM far above the untrained fusion, VTM
far above chance on held-out balanced pairs, and re-ranking with its VTM head keeps retrieval. One module-scoped run
(a few minutes on 2 CPU cores) serves every assertion.

Stage 2 here draws VTM negatives uniformly from the batch (``--vtm_negative_scale 0``). With the published hard
negatives (scale 1) the tiny VTM does not generalise on this data: every split holds unseen (colour, shape, motion,
count) combinations, the hardest negative differs from the positive in one attribute, and the tiny fusion memorises
the training pairs instead (held-out VTM stays at its prior, balanced accuracy 50%; measured in the issue-4 note).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

STAGE1_EPOCHS, STAGE2_EPOCHS = 14, 10


def _run(script: str, args: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = next(a for a in zip(args, args[1:], strict=False) if a[0] == "--output_dir")[1]
    return json.loads((Path(out) / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    from dataloaders.synthetic import generate

    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    manifest = generate(data, seed=0)
    common = [
        "--clip_config", str(REPO / "CLIP-modules" / "tiny.json"),
        "--train_csv", str(data / "webvid" / "frozen_train_labels.json"),
        "--webvid_tfrecord", str(data / "webvid" / "tfrecord"),
        "--val_csv", str(data / "msrvtt" / "MSRVTT_JSFUSION_test.csv"),
        "--features_path", str(data / "videos"),
        "--max_frames", "6", "--max_words", "16", "--batch_size", "32", "--batch_size_val", "64",
        "--warmup_proportion", "0.05", "--loose_type", "--n_display", "20", "--num_thread_reader", "1",
        "--torch_threads", "1", "--no-log_tensorboard",
    ]  # fmt: skip
    stage1 = _run(
        "main_task_clip.py",
        ["--do_train", *common, "--output_dir", str(root / "s1"), "--epochs", str(STAGE1_EPOCHS), "--lr", "2e-3",
         "--coef_lr", "1"],
    )  # fmt: skip
    ckpt = root / "s1" / "ckpt" / (root / "s1" / "ckpt" / "latest").read_text().strip()
    fusion_config = str(REPO / "CLIP-modules" / "fusion-tiny.json")
    fusion = [*common, "--cross_config_path", fusion_config, "--init_model", str(ckpt)]
    untrained = _run("main_task_fusion.py", ["--do_eval", *fusion, "--output_dir", str(root / "s2u")])
    stage2 = _run(
        "main_task_fusion.py",
        ["--do_train", *fusion, "--output_dir", str(root / "s2"), "--epochs", str(STAGE2_EPOCHS), "--fusion_lr",
         "5e-3", "--cache_visual_features", "--vtm_negative_scale", "0"],
    )  # fmt: skip
    return {"manifest": manifest, "stage1": stage1, "untrained": untrained, "stage2": stage2}


def test_stage1_retrieval_far_above_chance(pipeline):
    chance = pipeline["manifest"]["chance"]["retrieval_R1"]
    assert chance < 1.0
    assert pipeline["stage1"]["t2v_R1"] >= 8 * chance
    assert pipeline["stage1"]["v2t_R1"] >= 8 * chance
    assert pipeline["stage1"]["t2v_R5"] >= 30.0  # chance 4.2%


def test_stage2_language_modelling_far_above_the_untrained_fusion(pipeline):
    untrained, trained = pipeline["untrained"], pipeline["stage2"]
    assert untrained["heldout_mlm_acc"] < 1.0 and untrained["heldout_plm_acc"] < 1.0
    assert trained["heldout_mlm_acc"] >= 4.0
    assert trained["heldout_plm_acc"] >= 12.0


def test_reranking_keeps_retrieval(pipeline):
    s2 = pipeline["stage2"]
    assert s2["rerank_t2v_R1"] >= 0.8 * s2["t2v_R1"]
    assert s2["rerank_t2v_R5"] >= 30.0


def test_stage2_vtm_far_above_chance_on_held_out_pairs(pipeline):
    untrained, trained = pipeline["untrained"], pipeline["stage2"]
    # each held-out caption with its own video and one random other video: a constant answer scores 50%
    assert trained["heldout_vtm_random_acc"] >= 70.0
    assert trained["heldout_vtm_random_acc"] >= untrained["heldout_vtm_random_acc"] + 15.0
