"""The one flags module: every entry script builds its parser here, then validates once.

Flags keep the published names and meanings (CLIP4Clip / MemBridge command lines run unchanged with only the
launcher replaced). ``--batch_size`` is the *global* batch over all ranks. Published integer codes
(``--slice_framepos 2``, ``--train_frame_order 0``) stay accepted and are normalised to strings.

Published flags that mean nothing in this code base (``--loose_type``: the similarity path follows ``--sim_header``;
QA's MSR-VTT retrieval / WebVid paths) sit in one group, "published flags without effect here": they parse, so
published command lines run unchanged, and :func:`validate` logs one warning naming those given. Our own launch
scripts do not pass them. Stage 2 (task ``fusion``) trains only the fusion: at ``--fusion_lr`` when given, else at
``--lr`` (default 1e-5, the published stage-2 rate); ``--coef_lr`` has no effect there (CLIP is frozen) and warns.
Every numeric flag is checked by :func:`validate` before anything runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

from dataloaders.errors import ConfigError
from engine.host_malloc import CHOICES as HOST_MALLOC_CHOICES
from modules.fusion import BRIDGE_SOURCES, FUSION_ATTENTIONS, FUSION_POSITIONALS, PLM_MODES
from modules.methods import DEFAULT_METHOD, METHODS
from modules.t2vlp import DEFAULT_NUM_TUBES

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP_MODULES = REPO_ROOT / "CLIP-modules"

SLICE_FRAMEPOS = {"0": "head", "1": "tail", "2": "uniform"}
FRAME_ORDER = {"0": "keep", "1": "reverse", "2": "shuffle"}
FRAME_SAMPLINGS = ("fps", "segment_middle", "segment_random")  # dataloaders.video_io.FRAME_SAMPLINGS
PRECISIONS = ("fp32", "amp_bf16", "amp_fp16", "fp16")
SIM_HEADERS = ("meanP", "seqLSTM", "seqTransf", "tightTransf")
DEFAULT_CLIP_CONFIG = "ViT-B-16.json"
DEFAULT_CLIP_CONFIG_PATH = str(CLIP_MODULES / DEFAULT_CLIP_CONFIG)

# Task names -> which flag groups the entry script exposes.
TASKS = ("clip", "fusion", "retrieval", "caption", "qa")
PRETRAIN_TASKS = ("clip", "fusion")  # train on WebVid (the --webvid_* flags)
RETRIEVAL_EVAL_TASKS = ("clip", "fusion", "retrieval")  # evaluate retrieval (--v2t_protocol)
V2T_PROTOCOLS = ("group", "caption")  # engine.metrics.V2T_PROTOCOLS (not imported: keeps --help free of torch)
PUBLISHED_ONLY_GROUP = "published flags without effect here"
IGNORED_FLAGS = "ignored_flags"  # namespace attribute: the flags given that have no effect (config.json shows them)
STAGE2_COEF_LR = "stage 2 trains only the fusion; CLIP is frozen"
STAGE2_LR = 1e-5  # the published stage-2 --lr, which trains the fusion
MAX_SEED = 2**32  # exclusive; the loader seed is seed * 1_000_003 + epoch and must fit torch's 64-bit seed
# Stage-1 objectives (video_text_retrieval/stage1.py STAGE1_OBJECTIVES; literals here keep --help free of torch).
STAGE1_OBJECTIVES = ("clip", "mcq", "hmmc")
MCQ_QUESTION_KINDS = ("noun", "verb", "mixed")  # dataloaders.mcq_questions.QUESTION_KINDS
VT_LOSSES = ("clip", "normsoftmax")
BRIDGE_LAYER_MAPS = ("half", "same")  # modules.bridgeformer.LAYER_MAPS
BRIDGE_GLOBAL_QUERIES = ("eot", "first")  # modules.bridgeformer.GLOBAL_QUERIES


def _coded_choice(mapping: dict[str, str], name: str):
    """An argparse type accepting either the published integer code or the string name."""
    names = set(mapping.values())

    def parse(value: str) -> str:
        if value in mapping:
            return mapping[value]
        if value in names:
            return value
        raise argparse.ArgumentTypeError(
            f"{name}: expected one of {sorted(names)} or the published codes {sorted(mapping)}, got {value!r}"
        )

    return parse


def _add_data_flags(p: argparse.ArgumentParser, task: str) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--datatype", default="msrvtt", help="dataset of the evaluation / downstream set (registry key)")
    g.add_argument("--train_csv", default=None, help="training annotation file (pre-training: the WebVid caption JSON)")
    g.add_argument("--val_csv", default=None, help="evaluation annotation file (MSR-VTT: MSRVTT_JSFUSION_test.csv)")
    g.add_argument("--data_path", default=None, help="annotation json or folder (MSRVTT_data.json, MSVD folder, ...)")
    g.add_argument("--features_path", default=None, help="folder of video files of the evaluation/downstream set")
    g.add_argument(
        "--lmdb_path",
        default=None,
        help="HMMC's LMDB frame store (dataloaders/lmdb_frames.py): read the --features_path videos from it instead",
    )
    g.add_argument("--lmdb_frames", type=int, default=30, help="frames stored per video in --lmdb_path (HMMC: 30)")
    g.add_argument(
        "--frame_sample",
        choices=("uniform", "random", "uniform_random"),
        default="uniform",
        help="training frames taken from --lmdb_path (evaluation: uniform), HMMC's --frame_sample",
    )
    if task in PRETRAIN_TASKS:
        g.add_argument(
            "--webvid_tfrecord",
            default="WebVid_TFRecord",
            help="folder holding the WebVid shards and path.index (or the index file itself)",
        )
        g.add_argument(
            "--webvid_video_dir", default=None, help="pre-train from a folder of WebVid videos instead of shards"
        )
        g.add_argument(
            "--webvid_train_json",
            default=None,
            help="WebVid caption JSON (frozen_train_labels.json; default --train_csv)",
        )
    g.add_argument("--max_words", type=int, default=32, help="text length L in tokens, SOT and EOT included")
    g.add_argument("--max_frames", type=int, default=12, help="frames T per video")
    g.add_argument("--feature_framerate", type=float, default=1.0, help="frames sampled per second of video")
    g.add_argument(
        "--transform",
        choices=("tensor", "pil"),
        default="tensor",
        help="frame transform: tensor (batched, within 3/255 of PIL) or pil (the published pipeline, bit-exact)",
    )
    g.add_argument(
        "--slice_framepos",
        type=_coded_choice(SLICE_FRAMEPOS, "--slice_framepos"),
        default="uniform",
        help="which frames to keep when a video has more than max_frames: head|tail|uniform (0|1|2)",
    )
    g.add_argument(
        "--frame_sampling",
        choices=FRAME_SAMPLINGS,
        default="fps",
        help="video files: fps (--feature_framerate frames a second, then --slice_framepos), or one frame per each of "
        "max_frames equal segments of all frames (MCQ/Frozen): its middle (segment_middle), or a random one in "
        "training and the middle in evaluation (segment_random); WebVid shards keep the frames they store",
    )
    g.add_argument(
        "--train_frame_order",
        type=_coded_choice(FRAME_ORDER, "--train_frame_order"),
        default="keep",
        help="frame order in training: keep|reverse|shuffle (0|1|2)",
    )
    g.add_argument(
        "--eval_frame_order",
        type=_coded_choice(FRAME_ORDER, "--eval_frame_order"),
        default="keep",
        help="frame order in evaluation: keep|reverse|shuffle (0|1|2)",
    )
    g.add_argument(
        "--pad_frames",
        choices=("repeat", "zero"),
        default="repeat",
        help="short videos: repeat frames so all T are valid (MemBridge) or pad zero frames with mask 0 (CLIP4Clip)",
    )
    if task not in ("caption", "qa"):
        g.add_argument(
            "--expand_msrvtt_sentences", action="store_true", help="MSR-VTT training: one sample per caption"
        )
    g.add_argument(
        "--num_thread_reader", type=int, default=1, help="DataLoader worker processes per rank (0: load in-process)"
    )
    g.add_argument(
        "--allow_missing_eval_videos",
        action="store_true",
        help="evaluate without test videos that are missing or unreadable, and report exactly which were dropped",
    )


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--visual_pretrain_path",
        default=None,
        help="OpenAI CLIP weights (ViT-B-16.pt TorchScript archive, state dict or safetensors); sizes are inferred",
    )
    g.add_argument(
        "--clip_config",
        default=None,
        help="CLIP config JSON (default CLIP-modules/ViT-B-16.json). With --visual_pretrain_path or --init_model the "
        "sizes come from those weights and this file only sets the head counts (checked against the weights)",
    )
    g.add_argument(
        "--cross_config_path",
        default=str(CLIP_MODULES),
        help="folder (or JSON file) with the fusion configuration fusion.json",
    )
    g.add_argument("--init_model", default=None, help="weights of a previous stage (ours or the published key layout)")
    g.add_argument(
        "--method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help="membridge: memory bridge tokens; t2vlp: Focus-and-Align tube tokens + local alignment; stoa: STOA-VLP "
        "object-trajectory and action tokens + matching loss (modules/methods)",
    )
    g.add_argument("--num_tubes", type=int, default=DEFAULT_NUM_TUBES, help="T2VLP tube tokens (--method t2vlp only)")
    g.add_argument(
        "--w_align", type=float, default=1.0, help="weight of T2VLP's local alignment loss (--method t2vlp only)"
    )
    g.add_argument("--object_count", type=int, default=10, help="STOA boxes per frame O (--method stoa only)")
    g.add_argument("--objects_dir", default=None, help="STOA: folder of per-video detection JSON files")
    g.add_argument("--labelmap_path", default=None, help="STOA: label map JSON {'label_to_idx': {class: id}}")
    g.add_argument("--tag_file", default=None, help="STOA: noun/verb tag JSON of the training captions (stage 2)")
    g.add_argument("--w_match", type=float, default=1.0, help="weight of STOA's object/action matching loss")
    g.add_argument("--joint_layers", type=int, default=2, help="last ViT blocks that attend jointly over all frames")
    g.add_argument("--linear_patch", choices=("2d", "3d"), default="2d", help="patch embedding: per frame or Conv3d")
    g.add_argument("--sim_header", choices=SIM_HEADERS, default="meanP", help="video-text similarity head")
    g.add_argument(
        "--temporal_init",
        choices=("clip_text", "random"),
        default="clip_text",
        help="seqTransf temporal module: copies of CLIP's text positions/blocks (CLIP4Clip) or random (HMMC)",
    )
    g.add_argument(
        "--temporal_ln_eps", type=float, default=1e-5, help="LayerNorm eps of the seqTransf blocks (HMMC: 1e-12)"
    )
    g.add_argument(
        "--freeze_logit_scale", action="store_true", help="keep CLIP's logit scale fixed (HMMC: its value, 100)"
    )
    g.add_argument(
        "--freeze_layer_num",
        type=int,
        default=0,
        help="freeze CLIP embeddings and resblocks below N; -1 freezes nothing",
    )


class _WithoutEffect(argparse.Action):
    """Stores the value (``nargs=0``: ``const``, as ``store_true``) and records the flag in ``IGNORED_FLAGS`` of the
    namespace: the flag was given but has no effect in this task."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        given = getattr(namespace, IGNORED_FLAGS, ())
        if self.dest not in given:
            setattr(namespace, IGNORED_FLAGS, (*given, self.dest))


def _add_train_flags(p: argparse.ArgumentParser, task: str) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--do_train", action="store_true", help="train")
    g.add_argument("--do_eval", action="store_true", help="evaluate (alone: evaluate --init_model / --resume)")
    g.add_argument("--epochs", type=int, default=5, help="training epochs")
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: no limit)")
    g.add_argument("--batch_size", type=int, default=32, help="GLOBAL training batch over all ranks")
    g.add_argument("--batch_size_val", type=int, default=32, help="GLOBAL evaluation batch over all ranks")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate of the non-CLIP parameters")
    if task == "fusion":  # stage 2 trains only the fusion
        g.add_argument(
            "--coef_lr", type=float, default=None, action=_WithoutEffect, help=f"no effect: {STAGE2_COEF_LR}"
        )
    else:
        g.add_argument("--coef_lr", type=float, default=1e-3, help="CLIP parameters train at lr * coef_lr")
        g.add_argument(
            "--text_lr",
            type=float,
            default=None,
            help="learning rate of the text tower (CLIP's, or --language chinese's BERT); None: CLIP's text tower "
            "trains at lr * coef_lr like the visual one (HMMC: 1e-5 pre-training, 1e-7 fine-tuning)",
        )
    g.add_argument("--warmup_proportion", type=float, default=0.1, help="share of steps in linear warm-up")
    g.add_argument("--weight_decay", type=float, default=0.2, help="decoupled weight decay (not on bias/LayerNorm)")
    g.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0 or negative: no clipping)"
    )
    g.add_argument(
        "--optimizer",
        choices=("bertadam", "adamw"),
        default="bertadam",
        help="bertadam: the published optimizer (no bias correction); adamw: torch AdamW + warmup-cosine",
    )
    g.add_argument("--precision", choices=PRECISIONS, default="fp32", help="numeric precision")
    g.add_argument("--seed", type=int, default=42, help=f"random seed in [0, {MAX_SEED})")
    g.add_argument(
        "--torch_threads",
        type=int,
        default=0,
        help="CPU threads per process for torch ops (0: torch's default); 1 is fastest for tiny models on few cores",
    )
    g.add_argument(
        "--host_malloc",
        choices=HOST_MALLOC_CHOICES,
        default="auto",
        help="keep: glibc keeps freed memory for reuse instead of returning it to the kernel (ViT-B/16 CPU training "
        "steps 2.3x (fp32) to 4x (bf16) faster, peak RSS +7-35%%; bench/bench_train.py); auto: keep when no CUDA "
        "device is visible; system: glibc's defaults",
    )
    g.add_argument("--n_display", type=int, default=100, help="log every N optimizer steps")
    g.add_argument("--save_steps", type=int, default=0, help="also checkpoint every N optimizer steps (0: per epoch)")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    g.add_argument("--eval_every_epoch", action="store_true", help="evaluate after every epoch, not only at the end")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue a killed run exactly: a checkpoint dir, or no value for the latest in --output_dir",
    )
    g.add_argument(
        "--max_bad_steps",
        type=int,
        default=10,
        help="stop after this many consecutive steps with a non-finite loss or gradient (each one is skipped)",
    )
    g.add_argument("--output_dir", required=True, help="where config, logs, metrics and checkpoints go")
    g.add_argument("--log_tensorboard", action=argparse.BooleanOptionalAction, default=True, help="TensorBoard")


def _add_stage1_objective_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stage-1 objective (MCQ_HMMC.md C.2-C.3)")
    g.add_argument(
        "--stage1_objective",
        choices=STAGE1_OBJECTIVES,
        default="clip",
        help="clip: symmetric InfoNCE (the published stage 1); mcq: + MCQ's BridgeFormer answer-bridge loss; "
        "hmmc: HMMC's momentum-queue FAM/VTM/FTM + MLM",
    )
    g.add_argument("--phrase_file", default=None, help="mcq: MCQ noun/verb TSV (caption, path, nouns, verbs)")
    g.add_argument("--mcq_question", choices=MCQ_QUESTION_KINDS, default="noun", help="mcq: phrase kind erased")
    g.add_argument("--mcq_weight", type=float, default=1.0, help="mcq: weight of the answer-bridge loss")
    g.add_argument("--mcq_temperature", type=float, default=0.05, help="mcq: NormSoftmax temperature (MCQ: 0.05)")
    g.add_argument(
        "--vt_loss",
        choices=VT_LOSSES,
        default="clip",
        help="mcq: text-video loss: clip (InfoNCE, learnable logit scale) or normsoftmax (MCQ: fixed T, summed)",
    )
    g.add_argument("--mcq_answer_prompt", type=int, default=3, help="mcq: mask tokens before the answer phrase")
    g.add_argument("--mcq_mask_id", type=int, default=0, help="mcq: token id of erased words and the prompt")
    g.add_argument(
        "--bridge_text_layer_map",
        choices=BRIDGE_LAYER_MAPS,
        default="half",
        help="mcq: question state of bridge block l: text layer l//2 (MCQ) or l",
    )
    g.add_argument(
        "--bridge_global_query",
        choices=BRIDGE_GLOBAL_QUERIES,
        default="eot",
        help="mcq: the bridge's global query: the question's EOT state (CLIP is causal) or position 0 (MCQ)",
    )
    g.add_argument(
        "--official_quirks",
        action="store_true",
        help="mcq: MCQ's literal question building and phrase-file parsing (MCQ_HMMC.md A.15 items 2-3); hmmc: "
        "pad-scoring MLM with full-vocabulary random ids, queue size a multiple of the global batch (B.14 2-3, 6)",
    )
    add_language_flags(g)
    g.add_argument("--contrast_num_negative", type=int, default=4096, help="hmmc: queue size K (HMMC recipe: 1024)")
    g.add_argument("--contrast_momentum", type=float, default=0.99, help="hmmc: momentum-encoder EMA momentum")
    g.add_argument("--contrast_temperature", type=float, default=0.07, help="hmmc: MoCo InfoNCE temperature")
    g.add_argument("--w_fam", type=float, default=0.05, help="hmmc: weight of frame-adjacency matching (FAM)")
    g.add_argument("--w_vtm", type=float, default=0.45, help="hmmc: weight of video-level text matching (VTM)")
    g.add_argument("--w_ftm", type=float, default=0.45, help="hmmc: weight of frame-level text matching (FTM)")
    g.add_argument("--w_mlm", type=float, default=0.05, help="hmmc: weight of masked language modelling (MLM)")
    g.add_argument("--hmmc_proj_dims", type=int, default=4096, help="hmmc: hidden width of projector/predictor")
    g.add_argument(
        "--hmmc_mask_id", type=int, default=None, help="hmmc: MLM's [MASK] id (default 0; --official_quirks: 49394)"
    )
    g.add_argument("--use_temp", action="store_true", help="hmmc: HMMC's temporal module (= --sim_header seqTransf)")


def add_language_flags(g: argparse._ArgumentGroup) -> None:
    """``--language`` / ``--text_pretrain_path`` (HMMC's Chinese text encoder): stage 1 and retrieval."""
    g.add_argument(
        "--language",
        choices=("english", "chinese"),
        default="english",
        help="english: CLIP's text tower; chinese: the Hugging Face BERT of --text_pretrain_path + Linear (HMMC)",
    )
    g.add_argument("--text_pretrain_path", default=None, help="--language chinese: local Hugging Face model folder")


def _add_fusion_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fusion (stage 2 and downstream)")
    g.add_argument("--fusion_lr", type=float, default=1e-5, help="learning rate of the fusion parameters")
    g.add_argument(
        "--extra_lr",
        type=float,
        default=None,
        help="learning rate of the method's new encoder modules (--method t2vlp: the tube module, stoa: the object "
        "module); None: the fusion's rate. The published stage-2 code trains them at lr * coef_lr (1e-8)",
    )
    g.add_argument("--fusion_layers", type=int, default=None, help="fusion blocks (default: from fusion.json, 6)")
    g.add_argument("--num_bridge_tokens", type=int, default=None, help="bridge tokens K (default: fusion.json, 8)")
    g.add_argument("--memory_size", type=int, default=None, help="memory slots S (default: fusion.json, 8192)")
    g.add_argument(
        "--bridge_source",
        choices=BRIDGE_SOURCES,
        default=None,
        help="bridge tokens read from the memory (default), K static learned tokens, or none (ablations); tube: "
        "T2VLP's tube tokens (--method t2vlp sets it)",
    )
    g.add_argument(
        "--fusion_attention",
        choices=FUSION_ATTENTIONS,
        default=None,
        help="bridge: modality-separating mask (DESIGN 2.3); joint: padding only (default: from --method)",
    )
    g.add_argument(
        "--fusion_pos",
        choices=FUSION_POSITIONALS,
        default=None,
        help="positional embedding on every slot but v_sep/EOT (except_sep) or on all (default: from --method)",
    )
    g.add_argument(
        "--plm_mode",
        choices=PLM_MODES,
        default=None,
        help="prefix LM as per-prefix rows (prefix) or one teacher-forced pass (single_pass; default: from --method)",
    )
    g.add_argument(
        "--official_quirks",
        action="store_true",
        help="reproduce the three defects of the published stage-2 code (DESIGN 2.6b) for published checkpoints",
    )
    g.add_argument(
        "--head_dropout",
        type=float,
        default=None,
        help="dropout of the vocabulary / VTM heads (default: the --method preset's, else the fusion JSON's); "
        "0 makes a multi-rank stage-2 run equal a one-process run exactly (dropout masks are drawn per rank)",
    )
    g.add_argument("--rerank_topk", type=int, default=32, help="re-rank the top-k candidates with VTM (0: off)")


def _add_pretrain_fusion_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stage-2 objectives")
    g.add_argument("--w_vtm", type=float, default=1.0, help="weight of video-text matching")
    g.add_argument("--w_mlm", type=float, default=1.0, help="weight of masked language modelling")
    g.add_argument("--w_plm", type=float, default=1.0, help="weight of prefix language modelling")
    g.add_argument(
        "--vtm_negative_scale",
        type=float,
        default=1.0,
        help="VTM negatives are drawn from softmax(scale * similarity) of the global batch: 1 = published hard "
        "negatives, 0 = uniform over the other pairs, >1 harder",
    )
    g.add_argument(
        "--cache_visual_features",
        action="store_true",
        help="CLIP is frozen in stage 2: compute per-video frame features once (needs deterministic sampling); with "
        "--method t2vlp / stoa also the ViT tokens their tube / object module reads (ViT-B/16, 12 frames, float32: "
        "7.3 MB per video for t2vlp, 14.5 MB for stoa, vs 25 kB of frame features)",
    )
    g.add_argument(
        "--visual_cache_dir",
        default=None,
        help="where --cache_visual_features keeps its files (default OUTPUT_DIR/visual_cache)",
    )


def _add_qa_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video QA (published names; MSVD-QA reuses them)")
    g.add_argument("--msrvtt_qa_train_json", default=None, help="QA training questions (train.jsonl)")
    g.add_argument("--msrvtt_qa_val_json", default=None, help="QA validation questions (val.jsonl)")
    g.add_argument("--msrvtt_qa_test_json", default=None, help="QA test questions (test.jsonl)")
    g.add_argument("--msrvtt_qa_anslabel_json", default=None, help="answer vocabulary (train_ans2label.json)")
    g.add_argument("--msrvtt_features_path", default=None, help="folder of the QA videos")


def _add_retrieval_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("retrieval evaluation")
    g.add_argument(
        "--v2t_protocol",
        choices=V2T_PROTOCOLS,
        default="group",
        help="video->text with several captions per video (MSVD): group ranks each video's caption groups (a group "
        "scores its best caption; CLIP4Clip multi_sentence, the published numbers), caption ranks the video's best "
        "caption among all captions; the same with one caption per video",
    )
    g.add_argument(
        "--use_frame_fea",
        action="store_true",
        help="HMMC's evaluation: add the mean of the --top_frames best text-frame cosines to the video score",
    )
    g.add_argument("--top_frames", type=int, default=3, help="frames k of --use_frame_fea's top-k mean (HMMC: 3)")
    g.add_argument("--frame_sim_weight", type=float, default=1.0, help="weight of --use_frame_fea's frame term")


# flag -> (tasks that accept it without using it, why): the published command lines of those tasks pass it.
PUBLISHED_ONLY: dict[str, tuple[tuple[str, ...], str]] = {
    "loose_type": (TASKS, "the dual-encoder (cosine) path is chosen by --sim_header: every header but tightTransf"),
    "msrvtt_train_csv": (("qa",), "QA trains on the --msrvtt_qa_* question files"),
    "msrvtt_val_csv": (("qa",), "QA evaluates on the --msrvtt_qa_* question files"),
    "msrvtt_train_json": (("qa",), "QA has no caption loss here"),
    "webvid_train_json": (("qa",), "QA does not read WebVid"),
    "webvid_tfrecord": (("qa",), "QA does not read WebVid"),
    "expand_msrvtt_sentences": (("caption", "qa"), "captioning trains on every reference; QA reads questions"),
}


def _add_published_only_flags(p: argparse.ArgumentParser, task: str) -> None:
    g = p.add_argument_group(
        PUBLISHED_ONLY_GROUP,
        "accepted so that published command lines run unchanged; each has no effect here and giving one logs a warning",
    )
    for name, (tasks, why) in PUBLISHED_ONLY.items():
        if task not in tasks:
            continue
        help_text = f"no effect here: {why}"
        if name in ("loose_type", "expand_msrvtt_sentences"):
            g.add_argument(f"--{name}", action=_WithoutEffect, nargs=0, const=True, default=False, help=help_text)
        else:
            g.add_argument(f"--{name}", action=_WithoutEffect, default=None, help=help_text)
    p.set_defaults(**{IGNORED_FLAGS: ()})


def _set_help(p: argparse.ArgumentParser, dest: str, text: str) -> None:
    for action in p._actions:
        if action.dest == dest:
            action.help = text


def build_parser(task: str, description: str | None = None) -> argparse.ArgumentParser:
    """The parser of one entry script. ``task`` is one of :data:`TASKS`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_flags(p, task)
    _add_model_flags(p)
    _add_train_flags(p, task)
    if task != "clip":
        _add_fusion_flags(p)
    else:
        _add_stage1_objective_flags(p)
    if task in PRETRAIN_TASKS:
        p.add_argument(
            "--train_datatype",
            default="webvid",
            help="pre-training set: webvid (shards or --webvid_video_dir) or a retrieval dataset key",
        )
    if task in RETRIEVAL_EVAL_TASKS:
        _add_retrieval_eval_flags(p)
    if task == "fusion":
        _add_pretrain_fusion_flags(p)
        # Stage 2 trains only the fusion: at --fusion_lr when given, else at --lr (the published --lr 1e-5).
        p.set_defaults(lr=STAGE2_LR, fusion_lr=None)
        _set_help(p, "lr", "learning rate of the fusion (stage 2 trains only the fusion) unless --fusion_lr is given")
        _set_help(p, "fusion_lr", "learning rate of the fusion parameters (None: --lr)")
    if task == "qa":
        _add_qa_flags(p)
    _add_published_only_flags(p, task)
    return p


def resolve_clip_config(args: argparse.Namespace) -> str | None:
    """The CLIP config JSON the flags name: ``--clip_config``; else the default, unless weights being loaded
    (``--visual_pretrain_path``, ``--init_model``) give the sizes (None; see ``engine.builders.clip_architecture``)."""
    if args.clip_config:
        return args.clip_config
    if args.visual_pretrain_path or args.init_model:
        return None
    return DEFAULT_CLIP_CONFIG_PATH


def _is_stage2(args: argparse.Namespace) -> bool:
    """True for the stage-2 parser (only it has the stage-2 objective flags)."""
    return hasattr(args, "w_plm")


def _numeric_errors(args: argparse.Namespace) -> list[str]:
    """One message per numeric flag out of its range (NaN and infinity included), naming the flag."""
    errors: list[str] = []

    def check(name: str, ok, rule: str) -> None:
        value = getattr(args, name, None)
        if value is None:
            return
        finite = not isinstance(value, float) or math.isfinite(value)
        if not (finite and ok(value)):
            errors.append(f"--{name} must be {rule} (got {value})")

    for name in ("batch_size", "batch_size_val", "max_frames", "epochs", "gradient_accumulation_steps"):
        check(name, lambda v: v >= 1, ">= 1")
    for name in ("n_display", "keep_checkpoints", "max_bad_steps"):
        check(name, lambda v: v >= 1, ">= 1")
    for name in ("fusion_layers", "num_bridge_tokens", "memory_size"):
        check(name, lambda v: v >= 1, ">= 1 when given")
    for name in ("num_thread_reader", "save_steps", "max_steps", "torch_threads", "joint_layers", "rerank_topk"):
        check(name, lambda v: v >= 0, ">= 0")
    check("freeze_layer_num", lambda v: v >= -1, ">= -1 (-1 freezes nothing)")
    check("seed", lambda v: 0 <= v < MAX_SEED, f"in [0, {MAX_SEED})")
    check("lr", lambda v: v >= 0, "a finite number >= 0 (0 freezes the weights, e.g. to write an initial checkpoint)")
    check("fusion_lr", lambda v: v >= 0, "a finite number >= 0")
    check("text_lr", lambda v: v >= 0, "a finite number >= 0")
    check("extra_lr", lambda v: v >= 0, "a finite number >= 0")
    check("coef_lr", lambda v: v >= 0, "a finite number >= 0")
    check("weight_decay", lambda v: v >= 0, "a finite number >= 0")
    check("max_grad_norm", lambda v: True, "a finite number (0 or negative: no clipping)")
    check("warmup_proportion", lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    check("feature_framerate", lambda v: v > 0, "a finite number > 0")
    check("mcq_weight", lambda v: v >= 0, "a finite number >= 0")
    check("mcq_temperature", lambda v: v > 0, "a finite number > 0")
    check("mcq_answer_prompt", lambda v: v >= 0, ">= 0")
    check("mcq_mask_id", lambda v: 0 <= v < 49408, "a CLIP token id in [0, 49408)")
    check("hmmc_mask_id", lambda v: 0 <= v < 49408, "a CLIP token id in [0, 49408)")
    check("contrast_num_negative", lambda v: v >= 1, ">= 1")
    check("contrast_momentum", lambda v: 0 <= v <= 1, "in [0, 1]")
    check("contrast_temperature", lambda v: v > 0, "a finite number > 0")
    check("hmmc_proj_dims", lambda v: v >= 1, ">= 1")
    check("top_frames", lambda v: v >= 1, ">= 1")
    check("frame_sim_weight", lambda v: v >= 0, "a finite number >= 0")
    check("temporal_ln_eps", lambda v: v > 0, "a finite number > 0")
    check("lmdb_frames", lambda v: v >= 1, ">= 1")
    for name in ("w_fam", "w_ftm"):
        check(name, lambda v: v >= 0, "a finite number >= 0")
    check("num_tubes", lambda v: v >= 1, ">= 1")
    for name in ("w_vtm", "w_mlm", "w_plm", "w_align", "vtm_negative_scale"):
        check(name, lambda v: v >= 0, "a finite number >= 0")
    if _is_stage2(args) and not any(getattr(args, w) > 0 for w in ("w_vtm", "w_mlm", "w_plm")):
        errors.append("--w_vtm, --w_mlm and --w_plm are all 0: stage 2 would train on no loss; set one > 0")
    return errors


def flags_without_effect(args: argparse.Namespace) -> list[str]:
    """The flags given on the command line that have no effect in this task, each with why."""
    why = {name: reason for name, (_, reason) in PUBLISHED_ONLY.items()}
    why["coef_lr"] = STAGE2_COEF_LR
    return [f"--{name} ({why[name]})" for name in getattr(args, IGNORED_FLAGS, ())]


def warn_published_only(args: argparse.Namespace) -> list[str]:
    """Log ONE warning (on rank 0, ``RANK`` of torchrun) listing the given flags without effect; returns them."""
    given = flags_without_effect(args)
    if given and os.environ.get("RANK", "0") == "0":
        logger.warning(
            "flags without effect here (accepted for published command lines, ignored): %s", "; ".join(given)
        )
    return given


def validate(args: argparse.Namespace, world_size: int = 1) -> argparse.Namespace:
    """Check the flags once; every problem is reported with what to do, then one warning names the given flags that
    have no effect (:func:`warn_published_only`). Returns ``args`` unchanged."""
    errors: list[str] = []
    if not args.do_train and not args.do_eval:
        errors.append("nothing to do: pass --do_train and/or --do_eval")
    errors += _numeric_errors(args)
    if errors:  # the checks below assume sane numbers
        raise ConfigError("invalid flags:\n  - " + "\n  - ".join(errors))
    if args.max_words < 3:
        errors.append(f"--max_words must be >= 3 to hold SOT, one word and EOT (got {args.max_words})")
    per_step = world_size * args.gradient_accumulation_steps
    if args.do_train and args.batch_size % per_step:
        errors.append(
            f"--batch_size {args.batch_size} is the global batch and must be divisible by world size {world_size} x "
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps}"
        )
    if args.batch_size_val % world_size and args.batch_size_val >= world_size:
        errors.append(f"--batch_size_val {args.batch_size_val} must be divisible by world size {world_size}")
    if args.precision == "fp16" and args.do_train and args.optimizer == "adamw":
        errors.append(
            "--precision fp16 trains half-precision weights: use it with --optimizer bertadam or use amp_fp16"
        )
    if args.visual_pretrain_path and not Path(args.visual_pretrain_path).is_file():
        errors.append(
            f"--visual_pretrain_path {args.visual_pretrain_path} does not exist: download OpenAI's ViT-B-16.pt into "
            "CLIP-modules/ (see CLIP-modules/README.md) or drop the flag to build from --clip_config"
        )
    cfg = resolve_clip_config(args)
    if cfg is not None:
        if not Path(cfg).is_file():
            errors.append(f"--clip_config {cfg} does not exist")
        else:
            context = json.loads(Path(cfg).read_text()).get("context_length")
            if context is not None and args.max_words > context:
                errors.append(
                    f"--max_words {args.max_words} is longer than the text positional table ({context} positions in "
                    f"{cfg}): use --max_words <= {context}"
                )
    if args.method != DEFAULT_METHOD and getattr(args, "num_bridge_tokens", None) is not None:
        errors.append(f"--num_bridge_tokens is MemBridge's; --method {args.method} sets its tokens with --num_tubes")
    if args.method == "stoa" and (not args.objects_dir or not args.labelmap_path):
        errors.append("--method stoa needs --objects_dir (detection JSON per video) and --labelmap_path")
    if args.method == "stoa" and args.object_count < 1:
        errors.append("--object_count must be >= 1")
    if getattr(args, "cache_visual_features", False) and args.train_frame_order == "shuffle":
        errors.append("--cache_visual_features needs deterministic frames: drop --train_frame_order shuffle")
    if errors:
        raise ConfigError("invalid flags:\n  - " + "\n  - ".join(errors))
    warn_published_only(args)
    return args


def check_text_length(max_words: int, context_length: int, weights: str) -> None:
    """ConfigError when ``--max_words`` exceeds the text positional table of the CLIP actually built (its size is
    read from ``--visual_pretrain_path`` / ``--init_model`` weights, so ``validate`` cannot see it)."""
    if max_words > context_length:
        raise ConfigError(
            f"--max_words {max_words} is longer than the text positional table of {weights} ({context_length} "
            f"positions): use --max_words <= {context_length}"
        )


def effective_rerank_topk(rerank_topk: int, num_texts: int, num_videos: int, eval_file: str | None) -> int:
    """``--rerank_topk`` for a test set of ``num_texts`` captions and ``num_videos`` videos.

    The set's size is known only once its annotations are read, so a larger k is clamped with one warning (re-ranking
    every candidate is well defined) rather than refused: returns ``min(k, num_texts, num_videos)``, or 0 when off.
    """
    largest = min(num_texts, num_videos)
    if rerank_topk <= largest:
        return rerank_topk
    logger.warning(
        "--rerank_topk %d is larger than the test set of %s (%d captions, %d videos): re-ranking all %d candidates; "
        "pass --rerank_topk <= %d to silence this",
        rerank_topk, eval_file, num_texts, num_videos, largest, largest,
    )  # fmt: skip
    return largest


def parse_flags(task: str, argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """Parse ``argv`` (None: sys.argv) for ``task``; validation needs the world size and is done by the engine."""
    return build_parser(task, description).parse_args(argv)
