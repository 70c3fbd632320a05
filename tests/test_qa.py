"""Video QA: answer vocabulary and out-of-vocabulary accounting, the answer-slot sequence against a per-sample
reference, gradients, --init_model handling, training on the synthetic set far above the majority baseline, sharded
evaluation on 2 gloo ranks == 1 process, and the published command line."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dataloaders.annotations import QARow
from dataloaders.errors import ConfigError
from dataloaders.tokenizer import ClipTokenizer
from modules.clip_model import CLIPConfig, load_clip
from modules.fusion import MemBridgeFusion, with_answer_slot
from modules.membridge import MemBridgeModel
from modules.video_clip import VideoCLIP
from tests.conftest import REPO
from tests.fusion_fixtures import FRAMES, IMAGE, TEST_VOCAB, TINY_CLIP, TINY_FUSION, text_batch, tiny_config
from video_qa.model import MemBridgeQAModel
from video_qa.task import (
    PREDICTIONS_FILE,
    QAPrediction,
    QATask,
    build_qa_dataset,
    build_qa_parser,
    init_qa_weights,
    num_answer_classes,
    qa_data_paths,
    qa_metrics,
    score_predictions,
    validate_qa_flags,
)

NUM_ANSWERS = 7
ENTRY_MODULE = "video_qa.main_task_qa"


# ---------------------------------------------------------------------------------------------------- helpers


def tiny_qa_model(head: str = "classifier", seed: int = 0, **overrides: object) -> MemBridgeQAModel:
    """QA model on the tiny CLIP (small vocabulary, head dropout off); fusion initialised from CLIP."""
    torch.manual_seed(seed)
    clip = load_clip(config=replace(CLIPConfig.from_json(TINY_CLIP), vocab_size=TEST_VOCAB))
    fusion = MemBridgeFusion(tiny_config(**overrides))
    fusion.init_from_clip(clip)
    return MemBridgeQAModel(VideoCLIP(clip, joint_layers=1, max_frames=FRAMES), fusion, head, NUM_ANSWERS)


def qa_batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    ids, mask = text_batch(lengths, seed=seed)
    b = len(lengths)
    return {
        "video": torch.randn(b, FRAMES, 3, IMAGE, IMAGE, generator=gen),
        "video_mask": torch.ones(b, FRAMES, dtype=torch.long),
        "question_ids": ids,
        "question_mask": mask,
        "answer_label": torch.tensor([i % NUM_ANSWERS for i in range(b)]),
        "answer_first_token": torch.randint(1, TEST_VOCAB - 2, (b,), generator=gen),
    }


def qa_flags(data: Path, out: Path, *extra: str) -> list[str]:
    qa = data / "msrvtt_qa"
    return [
        "--clip_config", str(TINY_CLIP), "--cross_config_path", str(TINY_FUSION),
        "--output_dir", str(out),
        "--msrvtt_qa_train_json", str(qa / "train.jsonl"),
        "--msrvtt_qa_val_json", str(qa / "val.jsonl"),
        "--msrvtt_qa_test_json", str(qa / "test.jsonl"),
        "--msrvtt_qa_anslabel_json", str(qa / "train_ans2label.json"),
        "--msrvtt_features_path", str(data / "videos"),
        "--max_frames", "4", "--max_words", "12", "--num_thread_reader", "0",
        "--loose_type", "--no-log_tensorboard", "--seed", "3",
        *extra,
    ]  # fmt: skip


def run_entry(args: list[str], nproc: int = 1) -> None:
    """The entry module in a fresh process, or under torchrun with ``nproc`` gloo ranks."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", ENTRY_MODULE]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    proc = subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ vocabulary, metrics


def test_answer_vocabulary_and_oov_accounting(tmp_path):
    def row(video: str, answer: str, kind: str) -> dict:
        return {"video_id": video, "question": f"what is in {video}?", "answer": answer, "answer_type": kind}

    train = [row("v0", "cat", "what"), row("v1", "cat", "what"), row("v2", "cat", "what"), row("v3", "dog", "what")]
    train += [row("v4", "dog", "who"), row("v5", "fish", "who")]
    test = [row("v6", "cat", "what"), row("v7", "dog", "what"), row("v8", "bird", "who"), row("v9", "fish", "who")]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    (tmp_path / "ans2label.json").write_text(json.dumps({"cat": 0, "dog": 1, "fish": 5}))
    base = ["--do_eval", "--output_dir", str(tmp_path / "out"), "--msrvtt_features_path", str(tmp_path)]
    base += ["--msrvtt_qa_train_json", str(tmp_path / "train.jsonl")]
    base += ["--msrvtt_qa_test_json", str(tmp_path / "test.jsonl")]
    tokenizer = ClipTokenizer()

    # top --num_answers training answers: cat (3), dog (2); fish and bird are out of the vocabulary
    args = build_qa_parser().parse_args([*base, "--num_answers", "2"])
    validate_qa_flags(args)
    test_set = build_qa_dataset(args, "test", IMAGE, qa_data_paths(args), tokenizer)
    assert test_set.ans2label == {"cat": 0, "dog": 1}
    assert test_set.num_out_of_vocabulary == 2
    labels = [test_set.ans2label.get(r.answer, -1) for r in test_set.rows]
    assert labels == [0, 1, -1, -1]
    # a perfect classifier is right on every in-vocabulary question and wrong on every other one
    scored = score_predictions(test_set.rows, [0, 1, 0, 1], "classifier", test_set.ans2label, tokenizer)
    assert [p.correct for p in scored] == [True, True, False, False]
    assert [p.prediction for p in scored] == ["cat", "dog", "cat", "dog"]
    metrics = qa_metrics(scored, test_set.ans2label)
    assert metrics == {
        "accuracy": 50.0,
        "in_vocabulary": 50.0,
        "num_questions": 4,
        "accuracy_what": 100.0,
        "accuracy_who": 0.0,
    }

    # the ans2label file: indices need not be contiguous; bird stays out of the vocabulary
    args = build_qa_parser().parse_args([*base, "--msrvtt_qa_anslabel_json", str(tmp_path / "ans2label.json")])
    test_set = build_qa_dataset(args, "test", IMAGE, qa_data_paths(args), tokenizer)
    assert num_answer_classes(test_set.ans2label) == 6
    assert test_set.num_out_of_vocabulary == 1
    scored = score_predictions(test_set.rows, [0, 1, 3, 5], "classifier", test_set.ans2label, tokenizer)
    assert [p.correct for p in scored] == [True, True, False, True]
    assert scored[2].prediction == ""  # index 3 names no answer
    assert qa_metrics(scored, test_set.ans2label)["in_vocabulary"] == 75.0

    # both vocabulary sources at once is a contradiction
    args = build_qa_parser().parse_args(
        [*base, "--num_answers", "2", "--msrvtt_qa_anslabel_json", str(tmp_path / "ans2label.json")]
    )
    with pytest.raises(ConfigError, match="only one"):
        validate_qa_flags(args)


def test_first_token_scoring_and_per_type_accuracy():
    tokenizer = ClipTokenizer()
    rows = [QARow("v0", "q", "basketball", "sport"), QARow("v1", "q", "red", "color"), QARow("v2", "q", "man", "who")]
    firsts = [tokenizer.tokenize_words(r.answer)[0] for r in rows]
    predicted = [firsts[0], firsts[1], firsts[0]]
    scored = score_predictions(rows, predicted, "first_token", {"red": 0}, tokenizer)
    assert [p.correct for p in scored] == [True, True, False]
    assert scored[1].prediction == "red"
    metrics = qa_metrics(scored, {"red": 0})
    assert metrics["accuracy"] == pytest.approx(200 / 3)
    assert (metrics["accuracy_sport"], metrics["accuracy_color"], metrics["accuracy_who"]) == (100.0, 100.0, 0.0)
    assert metrics["in_vocabulary"] == pytest.approx(100 / 3)
    assert isinstance(scored[0], QAPrediction)


@pytest.mark.parametrize(("script", "datatype"), [("start_qa_msrvtt.sh", "msrvtt_qa"), ("start_qa_msvd.sh", "msvd_qa")])
def test_launch_scripts_pass_the_published_recipe(tmp_path, script, datatype):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$ARGS_FILE"\n')
    (bin_dir / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGS_FILE": str(tmp_path / "args")}
    env.update({"DATA_PATH": "/data", "OUTPUT_PATH": "/out", "INIT_MODEL": "/ckpt", "NPROC_PER_NODE": "8"})
    proc = subprocess.run(
        ["bash", str(REPO / script), "--qa_head", "first_token"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "args").read_text().splitlines()
    assert argv[argv.index("--nproc_per_node") + 1] == "8"
    args = build_qa_parser().parse_args(argv[argv.index("video_qa.main_task_qa") + 1 :])
    recipe = {"lr": 2e-4, "epochs": 5, "batch_size": 32, "max_words": 32, "max_frames": 12, "coef_lr": 1e-3}
    recipe.update({"feature_framerate": 1.0, "warmup_proportion": 0.1, "slice_framepos": "uniform"})
    assert {name: getattr(args, name) for name in recipe} == recipe
    assert (args.datatype, args.qa_head, args.init_model) == (datatype, "first_token", "/ckpt")
    assert args.do_train and args.eval_every_epoch  # model selection on val after every epoch
    assert args.msrvtt_qa_anslabel_json == "/data/train_ans2label.json"
    env.pop("INIT_MODEL")
    missing = subprocess.run(["bash", str(REPO / script)], cwd=REPO, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "INIT_MODEL" in missing.stderr


def test_msvd_qa_reads_the_same_layout(synthetic_small, tmp_path):
    args = build_qa_parser().parse_args(qa_flags(synthetic_small, tmp_path, "--do_eval", "--datatype", "msvd_qa"))
    validate_qa_flags(args)
    test_set = build_qa_dataset(args, "test", IMAGE, qa_data_paths(args), ClipTokenizer())
    item = test_set[0]
    assert item["video"].shape == (4, 3, IMAGE, IMAGE) and item["question_mask"].sum() > 2
    assert int(item["answer_label"]) == test_set.ans2label.get(test_set.rows[0].answer, -1)


# ---------------------------------------------------------------------------------------------------- model


def reference_answer_state(model: MemBridgeQAModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Plain per-sample reference: the unpadded sequence [frames | v_sep | bridges | question | slot] with a mask
    built entry by entry from the visibility rules of DESIGN 2.3 (without bridges, video and text see each other)."""
    fusion = model.fusion
    frames = model.encoder.encode_video(batch["video"], batch["video_mask"])
    q_feats, q_eot = model.encode_question(batch["question_ids"], batch["question_mask"])
    t, k = frames.shape[1], fusion.num_bridges
    states = []
    for b in range(frames.shape[0]):
        n_q = int(batch["question_mask"][b].sum())
        v_sep = frames[b].mean(0)
        bridges = fusion.bridge_tokens(v_sep[None], q_eot[b][None])[0]
        x = torch.cat([frames[b], v_sep[None], bridges, q_feats[b, :n_q], torch.zeros(1, frames.shape[-1])])
        n = x.shape[0]
        pos = fusion.positional_embedding[:n].clone()
        pos[t] = 0.0  # v_sep
        pos[t + 1 + k + n_q - 1] = 0.0  # the question's EOT
        x = x + pos
        kind = ["video"] * (t + 1) + ["bridge"] * k + ["text"] * (n_q + 1)
        mask = torch.zeros(n, n)
        for i in range(n):
            for j in range(n):
                sees = k == 0 or kind[i] == "bridge" or kind[j] == "bridge" or kind[i] == kind[j]
                mask[i, j] = 0.0 if sees else float("-inf")
        states.append(fusion.transformer(x[None], mask[None, None])[0, -1])
    return torch.stack(states)


@pytest.mark.parametrize("bridge_source", ["memory", "learned", "none"])
def test_answer_state_matches_per_sample_reference(bridge_source):
    model = tiny_qa_model(bridge_source=bridge_source).eval()
    words = tiny_config().max_words
    batch = qa_batch([3, 7, words])  # the last question fills every slot: its answer slot is the appended one
    with torch.no_grad():
        frames = model.encoder.encode_video(batch["video"], batch["video_mask"])
        q_feats, q_eot = model.encode_question(batch["question_ids"], batch["question_mask"])
        state = model.answer_state(frames, batch["video_mask"], q_feats, batch["question_mask"], q_eot)
        reference = reference_answer_state(model, batch)
    torch.testing.assert_close(state, reference, rtol=1e-4, atol=1e-5)
    text_feats, text_mask, slot = with_answer_slot(q_feats, batch["question_mask"])
    assert text_feats.shape == (3, words + 1, q_feats.shape[-1])
    assert slot.tolist() == [3, 7, words]
    assert text_mask.sum(1).tolist() == [4, 8, words + 1]
    assert bool((text_feats[torch.arange(3), slot] == 0).all())


@pytest.mark.parametrize(
    ("head", "contrastive", "without_grad"),
    [
        ("classifier", 0.0, {"fusion.vocab_proj", "fusion.vocab_bias", "encoder.clip.logit_scale"}),
        ("first_token", 1.0, set()),
    ],
)
def test_every_used_parameter_gets_a_gradient(head, contrastive, without_grad):
    model = tiny_qa_model(head)
    task = QATask(model, contrastive_weight=contrastive)
    out = task(qa_batch([4, 6, 9, 12]))
    assert set(out) == {"loss", "qa", "qa_acc"} | ({"contrastive"} if contrastive else set())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    no_grad = {name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)}
    assert no_grad == without_grad | {"fusion.match_matrix", "fusion.unmatch_matrix"}
    logits, _ = model.answer_logits(qa_batch([5]))
    assert logits.shape == (1, NUM_ANSWERS if head == "classifier" else TEST_VOCAB)


def test_out_of_vocabulary_training_answers_are_ignored():
    model = tiny_qa_model().eval()
    batch = qa_batch([4, 6])
    batch["answer_label"] = torch.tensor([-1, -1])
    out = QATask(model)(batch)
    assert out["qa"].item() == 0.0
    out["loss"].backward()  # keeps the graph
    batch["answer_label"] = torch.tensor([2, -1])
    logits, _ = model.answer_logits(batch)
    expected = torch.nn.functional.cross_entropy(logits[:1], torch.tensor([2]))
    torch.testing.assert_close(QATask(model)(batch)["qa"], expected)


def test_sequence_longer_than_positional_table_is_rejected():
    with pytest.raises(ConfigError, match="QA sequence"):
        tiny_qa_model(max_words=77 - FRAMES - 1 - 2)


def test_init_model_stage1_stage2_and_published_layouts(tmp_path):
    source = tiny_qa_model(seed=1)
    stage1 = MemBridgeModel(source.encoder, None)
    save_file({k: v.contiguous() for k, v in stage1.state_dict().items()}, tmp_path / "stage1.safetensors")
    stage2 = {k: v.clone() for k, v in source.state_dict().items() if not k.startswith("qa_head.")}
    stage2["fusion.transformer.resblocks.0.attn.in_proj_weight"] += 1.0  # no longer equal to the CLIP text block
    save_file(stage2, tmp_path / "stage2.safetensors")
    published = {("clip." + k[len("encoder.clip.") :]): v for k, v in stage2.items() if k.startswith("encoder.clip.")}
    published["clip.fusion_memory"] = stage2["fusion.memory"]
    published["clip.fusion_positional_embedding"] = stage2["fusion.positional_embedding"]
    for k, v in stage2.items():
        if k.startswith("fusion.transformer."):
            published["clip.fusion_transformer." + k[len("fusion.transformer.") :]] = v
    save_file(published, tmp_path / "published.safetensors")
    key = "fusion.transformer.resblocks.0.attn.in_proj_weight"
    clip_key = "encoder.clip.transformer.resblocks.0.attn.in_proj_weight"

    # stage 1: CLIP from the file, fusion blocks copied from its text blocks
    model = tiny_qa_model(seed=2)
    report = init_qa_weights(model, str(tmp_path / "stage1.safetensors"))
    state = model.state_dict()
    assert any(name.startswith("fusion.") for name in report.missing)
    torch.testing.assert_close(state[clip_key], source.state_dict()[clip_key], rtol=0, atol=0)
    torch.testing.assert_close(state[key], state[clip_key], rtol=0, atol=0)
    # stage 2 (ours) and the published layout: the fusion comes from the file and is not overwritten
    for name in ("stage2.safetensors", "published.safetensors"):
        model = tiny_qa_model(seed=2)
        init_qa_weights(model, str(tmp_path / name))
        torch.testing.assert_close(model.state_dict()[key], stage2[key], rtol=0, atol=0)
        torch.testing.assert_close(model.state_dict()["fusion.memory"], stage2["fusion.memory"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- end to end

QA_VIDEOS = 160  # synthetic videos of the learning test (109 train / 13 val / 38 test, 4 questions each)
STAGE1_FLAGS = ("--batch_size", "16", "--epochs", "10", "--lr", "1e-3", "--coef_lr", "1")
QA_TRAIN_FLAGS = (
    "--do_train", "--freeze_layer_num", "4", "--batch_size", "16", "--epochs", "8",
    "--lr", "1e-3", "--coef_lr", "1", "--fusion_lr", "1e-3", "--warmup_proportion", "0.05",
    "--num_thread_reader", "1", "--batch_size_val", "64",
)  # fmt: skip
ADAMW = ("--optimizer", "adamw", "--weight_decay", "0")
PUBLISHED_COMMAND = (
    "--do_train --num_thread_reader=4 --epochs=5 --batch_size=32 --n_display=50 --cross_config_path ../CLIP-modules "
    "--msrvtt_train_csv ${DATA_PATH}/MSRVTT_train.9k.csv --msrvtt_val_csv ${DATA_PATH}/MSRVTT_JSFUSION_test.csv "
    "--msrvtt_train_json ${DATA_PATH}/MSRVTT_data.json --msrvtt_qa_train_json ${DATA_PATH}/train.jsonl "
    "--msrvtt_qa_val_json ${DATA_PATH}/val.jsonl --msrvtt_qa_test_json ${DATA_PATH}/test.jsonl "
    "--msrvtt_qa_anslabel_json ${DATA_PATH}/train_ans2label.json --msrvtt_features_path ${DATA_PATH}/MSRVTT_Videos "
    "--webvid_train_json ${DATA_PATH}/frozen_train.json --webvid_tfrecord ${DATA_PATH}/WebVid_TFRecord "
    "--warmup_proportion 0.1 --output_dir ${OUTPUT_PATH} --lr 2e-4 --max_words 32 --max_frames 12 "
    "--batch_size_val 32 --expand_msrvtt_sentences --feature_framerate 1 --coef_lr 1e-3 --freeze_layer_num 0 "
    "--slice_framepos 2 --loose_type --linear_patch 2d --sim_header meanP --init_model ${INIT_MODEL}"
)
# where the synthetic generator puts each file of the published ${DATA_PATH}
SYNTHETIC_LAYOUT = {
    "MSRVTT_train.9k.csv": "msrvtt/MSRVTT_train.9k.csv",
    "MSRVTT_JSFUSION_test.csv": "msrvtt/MSRVTT_JSFUSION_test.csv",
    "MSRVTT_data.json": "msrvtt/MSRVTT_data.json",
    "train.jsonl": "msrvtt_qa/train.jsonl",
    "val.jsonl": "msrvtt_qa/val.jsonl",
    "test.jsonl": "msrvtt_qa/test.jsonl",
    "train_ans2label.json": "msrvtt_qa/train_ans2label.json",
    "MSRVTT_Videos": "videos",
    "frozen_train.json": "webvid/frozen_train_labels.json",
    "WebVid_TFRecord": "webvid/tfrecord",
}


def latest_checkpoint(out: Path) -> Path:
    return out / "ckpt" / (out / "ckpt" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory) -> Path:
    """A synthetic set large enough to learn QA from (32x32 videos of the --small format)."""
    from dataloaders.synthetic import generate

    root = tmp_path_factory.mktemp("qa_synthetic")
    generate(root, num_videos=QA_VIDEOS, seed=0, small=True)
    return root


@pytest.fixture(scope="module")
def stage1_checkpoint(qa_data, tmp_path_factory) -> Path:
    """A short stage-1 run (contrastive CLIP on the WebVid-style shards): QA fine-tunes from pre-trained encoders."""
    out = tmp_path_factory.mktemp("qa_stage1")
    args = ["--do_train", "--clip_config", str(TINY_CLIP), "--output_dir", str(out)]
    args += ["--train_csv", str(qa_data / "webvid" / "frozen_train_labels.json")]
    args += ["--webvid_tfrecord", str(qa_data / "webvid" / "tfrecord"), "--max_frames", "4", "--max_words", "12"]
    args += ["--loose_type", "--no-log_tensorboard", "--num_thread_reader", "0", *STAGE1_FLAGS, *ADAMW]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "main_task_clip.py"), *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return latest_checkpoint(out)


@pytest.fixture(scope="module")
def qa_run(qa_data, stage1_checkpoint, tmp_path_factory) -> Path:
    """QA fine-tuning from the stage-1 checkpoint (its fusion initialised from the CLIP text encoder)."""
    out = tmp_path_factory.mktemp("qa_train")
    run_entry(qa_flags(qa_data, out, *QA_TRAIN_FLAGS, *ADAMW, "--init_model", str(stage1_checkpoint)))
    return out


@pytest.mark.slow
def test_training_beats_the_majority_baseline(qa_data, qa_run):
    manifest = json.loads((qa_data / "manifest.json").read_text())
    chance = manifest["chance"]
    metrics = json.loads((qa_run / "eval_results.json").read_text())
    # an untrained model is near the majority answer (8.6%); answering by question type alone gives 22.4%
    threshold = max(3 * chance["qa_majority_answer_accuracy"], chance["qa_per_type_majority_accuracy"] + 10)
    assert metrics["accuracy"] > threshold, metrics
    assert metrics["num_questions"] == manifest["qa"]["questions"]["test"]
    assert metrics["in_vocabulary"] == pytest.approx(100 * (1 - manifest["qa"]["test_oov_fraction"]))
    assert {f"accuracy_{kind}" for kind in ("color", "shape", "count", "motion")} <= set(metrics)
    assert 1 <= metrics["best_val_run"] <= 8 and metrics["tag"] == "test"  # every epoch validated, the best tested
    assert metrics["best_val_accuracy"] > 2 * chance["qa_majority_answer_accuracy"]
    predictions = [json.loads(line) for line in (qa_run / PREDICTIONS_FILE).read_text().splitlines()]
    assert len(predictions) == metrics["num_questions"]
    assert 100 * sum(p["correct"] for p in predictions) / len(predictions) == pytest.approx(metrics["accuracy"])
    log = (qa_run / "log.txt").read_text()
    assert "fusion initialised from the CLIP text encoder" in log


@pytest.mark.slow
def test_two_gloo_ranks_evaluate_like_one_process(qa_data, qa_run, tmp_path):
    weights = str(latest_checkpoint(qa_run))
    flags = ("--do_eval", "--init_model", weights, "--batch_size_val", "6")
    run_entry(qa_flags(qa_data, tmp_path / "one", *flags))
    run_entry(qa_flags(qa_data, tmp_path / "two", *flags), nproc=2)
    one = json.loads((tmp_path / "one" / "eval_results.json").read_text())
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert one == two
    chance = json.loads((qa_data / "manifest.json").read_text())["chance"]
    assert one["accuracy"] > chance["qa_majority_answer_accuracy"]
    predictions = (tmp_path / "one" / PREDICTIONS_FILE).read_text()
    assert predictions == (tmp_path / "two" / PREDICTIONS_FILE).read_text()
    assert len(predictions.splitlines()) == one["num_questions"]


@pytest.mark.slow
def test_published_command_line_runs_one_step(synthetic_small, stage1_checkpoint, tmp_path):
    command = PUBLISHED_COMMAND
    for name, relative in SYNTHETIC_LAYOUT.items():
        command = command.replace("${DATA_PATH}/" + name, str(synthetic_small / relative))
    command = command.replace("${OUTPUT_PATH}", str(tmp_path / "out")).replace("${INIT_MODEL}", str(stage1_checkpoint))
    argv = shlex.split(command)
    argv += ["--clip_config", str(TINY_CLIP), "--cross_config_path", str(TINY_FUSION), "--max_frames", "4"]
    argv += ["--max_words", "12", "--batch_size", "8", "--epochs", "1", "--max_steps", "1", "--num_thread_reader", "0"]
    argv += ["--no-log_tensorboard"]
    run_entry(argv)
    out = tmp_path / "out"
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["step"] == 1
    assert metrics["num_questions"] == 48 and metrics["val_num_questions"] == 32
    assert latest_checkpoint(out).name == "step-1"
    config = json.loads((out / "config.json").read_text())["flags"]
    assert config["datatype"] == "msrvtt_qa" and config["qa_head"] == "classifier"
    assert len((out / PREDICTIONS_FILE).read_text().splitlines()) == 48
