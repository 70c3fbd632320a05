"""The main job in one command: the whole MemBridge pipeline with a tiny model from scratch on the embedded data.

Stages, each entry script in its own process (a crash stays contained, its memory is returned), one thread each::

    generate    python -m dataloaders.synthetic --output_dir DATA          (skipped when DATA already holds a set)
    shards      python frozen_tfrecord.py --verify DATA/webvid/tfrecord/path.index
    stage1      main_task_clip.py                           contrastive CLIP on the WebVid-style shards
    stage2      main_task_fusion.py                         bridge/memory fusion (VTM + MLM + PLM), CLIP frozen
    retrieval   video_text_retrieval/main_task_retrieval.py MSR-VTT fine-tuning + top-k VTM re-ranking
    captioning  video_captioning/main_task_caption.py       prefix-LM fine-tuning, greedy decoding, COCO metrics
    captioning_untrained  the same script, --do_eval of an untrained model (the captioning baseline)
    qa          video_qa/main_task_qa.py                    MSRVTT-QA answer classifier
    stage1_mcq       main_task_clip.py --stage1_objective mcq   MCQ's BridgeFormer (the generator's noun/verb phrases)
    stage1_hmmc      main_task_clip.py --stage1_objective hmmc  HMMC's momentum queues (queue = 2 batches)
    stage1_t2vlp     main_task_clip.py --method t2vlp           T2VLP's own stage 1 (tube tokens + alignment)
    stage2_t2vlp     main_task_fusion.py --method t2vlp         from stage1_t2vlp
    retrieval_t2vlp  retrieval fine-tuning of stage2_t2vlp, re-ranked with its fusion
    stage2_stoa      main_task_fusion.py --method stoa          from the membridge/clip stage1 (STOA has no stage 1)
    retrieval_stoa   retrieval fine-tuning of stage2_stoa, re-ranked with its fusion
    report      scripts/report.py                           OUTPUT_DIR/report.html, one self-contained page

The seven comparison stages run on the same generated data as the main ones, after them; ``--stage1_objectives``
(clip,mcq,hmmc) and ``--methods`` (membridge,t2vlp,stoa) choose which (default: all; clip and membridge are the main
stages, which ``--stages`` selects as before). Every stage-1 objective is scored by the same zero-shot MSR-VTT-layout
retrieval (``--val_csv``) and every method by the same retrieval fine-tuning and re-ranking. Each comparison stage
uses the recipe of its clip/membridge counterpart (epochs, batch, learning rates) except: stage2_t2vlp and
stage2_stoa train 8 epochs in the full run, not 15, because they cannot use ``--cache_visual_features`` (the frozen
CLIP re-encodes every frame each step) and the whole demo must stay under 25 minutes; in ``--quick`` every comparison
stage trains one epoch of at most 10 steps (the test suite runs the quick demo). The report and results.json hold two
side-by-side tables: stage-1 objectives and methods.

Outputs in ``--output_dir`` (default ``demo_output/``): one run folder per stage (``config.json``, ``log.txt``,
``scalars.jsonl``, ``eval_results.json``, ``ckpt/``), ``results.json`` (every stage's metrics, the chance and majority
baselines, wall and CPU seconds per stage and their sum, what was skipped or failed) and ``report.html``; the metric
table is printed at the end. A stage whose script is missing, or whose input checkpoint is, is skipped with a banner
saying so; a failed stage is reported and the stages that do not depend on it still run (exit code 1).

Command lines::

    python scripts/demo.py                                  # full run (about 18 min on 2 idle CPU cores, 38 when busy)
    python scripts/demo.py --quick --output_dir /tmp/demo   # reduced: the --small synthetic set, few epochs
    python scripts/demo.py --reuse --stages captioning,qa   # re-run two stages, keep the other finished ones
    python scripts/demo.py --methods membridge --stage1_objectives clip   # the main stages only, no comparison
    bash scripts/demo.sh [FLAGS]                            # pip install -r requirements.txt, then this script

Real data and weights: ``--data_dir DIR`` holding the same layout (``webvid/frozen_train_labels.json``,
``webvid/tfrecord/path.index``, ``msrvtt/MSRVTT_data.json``, ``msrvtt/MSRVTT_train.9k.csv``,
``msrvtt/MSRVTT_JSFUSION_test.csv``, ``msrvtt_qa/{train,val,test}.jsonl``, ``msrvtt_qa/train_ans2label.json``,
``videos/``; symlinks are fine) is used as it is; ``--visual_pretrain_path CLIP-modules/ViT-B-16.pt`` starts stage 1
from OpenAI's weights (with ``--clip_config`` unset and ``--cross_config_path CLIP-modules``), and ``--max_frames``,
``--max_words``, ``--batch_size``, ``--torch_threads``, ``--num_thread_reader`` reach every stage. The recipes (epochs
and learning rates per stage) are the constants FULL_RECIPE and QUICK_RECIPE below.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: the repository root and this folder are importable
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import (  # noqa: E402
    METHOD_STAGES,
    OBJECTIVE_STAGES,
    REPORT_FILE,
    RESULTS_FILE,
    comparison_tables,
    compute_baselines,
    format_table,
    latest_checkpoint,
    load_json,
)

from dataloaders.errors import ConfigError  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRecipe:
    """Training settings of one stage (``lr``/``fusion_lr`` None: the script's default is kept)."""

    epochs: int
    lr: float | None = None
    fusion_lr: float | None = None
    coef_lr: float = 1.0
    batch_size: int = 32
    warmup_proportion: float = 0.05
    max_steps: int = 0  # stop after this many optimizer steps (0: the whole epochs)


# ---- recipes: epochs and learning rates per stage (the tiny model, trained from scratch) ---------------------------
FULL_RECIPE: dict[str, StageRecipe] = {
    "stage1": StageRecipe(epochs=25, lr=2e-3),
    "stage2": StageRecipe(epochs=15, fusion_lr=5e-3),
    "retrieval": StageRecipe(epochs=2, lr=1e-3, fusion_lr=1e-3),
    "captioning": StageRecipe(epochs=3, lr=3e-3),
    "qa": StageRecipe(epochs=12, lr=1e-3, fusion_lr=1e-3),
}
QUICK_RECIPE: dict[str, StageRecipe] = {
    "stage1": StageRecipe(epochs=12, lr=2e-3, batch_size=8),
    "stage2": StageRecipe(epochs=2, fusion_lr=5e-3, batch_size=8),
    "retrieval": StageRecipe(epochs=2, lr=1e-3, fusion_lr=1e-3, batch_size=8),
    "captioning": StageRecipe(epochs=1, lr=3e-3, batch_size=16),
    "qa": StageRecipe(epochs=4, lr=2e-3, fusion_lr=2e-3, batch_size=8),
}
# the comparison stages: the recipe of their clip/membridge counterpart (see the module docstring for the exceptions)
FULL_RECIPE |= {
    "stage1_mcq": FULL_RECIPE["stage1"],
    "stage1_hmmc": FULL_RECIPE["stage1"],
    "stage1_t2vlp": FULL_RECIPE["stage1"],
    "stage2_t2vlp": StageRecipe(epochs=8, fusion_lr=5e-3),  # no visual-feature cache: 8 epochs, not 15 (time)
    "retrieval_t2vlp": FULL_RECIPE["retrieval"],
    "stage2_stoa": StageRecipe(epochs=8, fusion_lr=5e-3),
    "retrieval_stoa": FULL_RECIPE["retrieval"],
}
QUICK_COMPARISON_EPOCHS = 1  # the quick demo runs in the test suite: the comparison adds at most ~1 minute
QUICK_COMPARISON_MAX_STEPS = 10  # a quick retrieval epoch is 40 steps (the stage-1/2 epochs are 3)
QUICK_RECIPE |= {
    name: StageRecipe(**{**asdict(QUICK_RECIPE[counterpart]), "epochs": QUICK_COMPARISON_EPOCHS,
                         "max_steps": QUICK_COMPARISON_MAX_STEPS})
    for name, counterpart in (
        ("stage1_mcq", "stage1"), ("stage1_hmmc", "stage1"), ("stage1_t2vlp", "stage1"), ("stage2_t2vlp", "stage2"),
        ("retrieval_t2vlp", "retrieval"), ("stage2_stoa", "stage2"), ("retrieval_stoa", "retrieval"),
    )
}  # fmt: skip
FULL_RERANK_TOPK = 32  # candidates re-ranked per query (the published default)
QUICK_RERANK_TOPK = 8  # the --small test set has 12 videos
MAX_FRAMES = 6
MAX_WORDS = 16
BATCH_SIZE_VAL = 64
TORCH_THREADS = 1  # one torch thread per process: 5-10x faster than two for the tiny model on a 2-core machine
NUM_THREAD_READER = 1
N_DISPLAY = 10
DEFAULT_OUTPUT_DIR = "demo_output"
TINY_CLIP_CONFIG = "CLIP-modules/tiny.json"
TINY_FUSION_CONFIG = "CLIP-modules/fusion-tiny.json"
# the generator's files for the comparison stages (dataloaders.synthetic's names; not imported: it loads torch)
PHRASE_FILE_NAME = "noun_verb.tsv"  # under webvid/: MCQ's --phrase_file
TAG_FILE_NAME = "noun_verb_tags.json"  # under webvid/: STOA's --tag_file
LABEL_MAP_FILE_NAME = "object_label_map.json"  # STOA's --labelmap_path; the detections under objects/
NUM_TUBES = 4  # T2VLP tube tokens of the tiny model (tests/test_t2vlp.py's setting)
STOA_OBJECT_COUNT = 3  # STOA boxes per frame (the synthetic detections: tests/test_stoa.py's setting)
HMMC_QUEUE_BATCHES = 2  # HMMC feature-queue size in global batches (the set has 340 training videos, HMMC's 1024 would
HMMC_PROJ_DIMS = 256  # repeat each one); projector width for the 64-wide tiny model (HMMC: 4096 for ViT-B)
HMMC_MOMENTUM = 0.9  # momentum-encoder EMA for a few hundred steps (tests/test_hmmc.py's setting)
OBJECTIVES = ("clip", "mcq", "hmmc")  # --stage1_objectives choices; clip is the main stage1
METHODS = ("membridge", "t2vlp", "stoa")  # --methods choices; membridge is the main stage2 -> retrieval
# comparison stage -> (the --methods or --stage1_objectives entry that selects it)
COMPARISON_OF: dict[str, str] = {stage: name for name, stage in OBJECTIVE_STAGES.items() if name != "clip"}
for _method, _stages in METHOD_STAGES.items():
    if _method != "membridge":
        COMPARISON_OF |= {stage: _method for stage in _stages if stage != "stage1"}
MAIN_STAGE_DIRS = ("stage1", "stage2", "retrieval", "captioning", "captioning_untrained", "qa")
COMPARISON_STAGES = ("stage1_mcq", "stage1_hmmc", "stage1_t2vlp", "stage2_t2vlp", "retrieval_t2vlp", "stage2_stoa",
                     "retrieval_stoa")  # fmt: skip
STAGE_DIRS = (*MAIN_STAGE_DIRS, *COMPARISON_STAGES)
EVAL_STAGES = ("stage1", "stage2", "retrieval", "captioning", "qa", *COMPARISON_STAGES)  # hold eval_results.json
ALL_STAGES = ("generate", "shards", *STAGE_DIRS, "report")
BANNER_WIDTH = 100


@dataclass(frozen=True)
class DataLayout:
    """Where each input lives under ``--data_dir`` (the synthetic generator's layout, also the real datasets')."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def webvid_json(self) -> Path:
        return self.root / "webvid" / "frozen_train_labels.json"

    @property
    def shard_index(self) -> Path:
        return self.root / "webvid" / "tfrecord" / "path.index"

    @property
    def msrvtt(self) -> Path:
        return self.root / "msrvtt"

    @property
    def qa(self) -> Path:
        return self.root / "msrvtt_qa"

    @property
    def videos(self) -> Path:
        return self.root / "videos"

    def required(self) -> list[Path]:
        """The files every stage reads (generation makes them all)."""
        return [
            self.webvid_json,
            self.shard_index,
            self.msrvtt / "MSRVTT_data.json",
            self.msrvtt / "MSRVTT_train.9k.csv",
            self.msrvtt / "MSRVTT_JSFUSION_test.csv",
            self.qa / "train.jsonl",
            self.qa / "test.jsonl",
            self.qa / "train_ans2label.json",
        ]


@dataclass
class StageOutcome:
    """What happened to one stage: done / reused / skipped / failed, with seconds and a one-line note."""

    status: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class Stage:
    """One pipeline step: a title for its banner, the script it runs, the argv builder and what it needs first."""

    name: str
    title: str
    script: Path
    build_argv: Callable[[], list[str]]
    needs_checkpoint_of: str | None = None
    run_dir: bool = True  # writes a run folder OUTPUT_DIR/<name> (cleared before a fresh run)
    module: str | None = None  # run as ``python -m module`` instead of the script file


@dataclass
class Pipeline:
    """The demo run: flags, data layout, recipe, and what each stage did."""

    args: argparse.Namespace
    layout: DataLayout
    out: Path
    recipe: dict[str, StageRecipe]
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)

    # ---- flags shared by the entry scripts ----------------------------------------------------------------------
    def model_flags(self, fusion: bool) -> list[str]:
        flags: list[str] = ["--max_frames", str(self.args.max_frames), "--max_words", str(self.args.max_words)]
        flags += ["--torch_threads", str(self.args.torch_threads)]
        flags += ["--num_thread_reader", str(self.args.num_thread_reader)]
        flags += ["--batch_size_val", str(BATCH_SIZE_VAL), "--n_display", str(N_DISPLAY)]
        flags += ["--seed", str(self.args.seed)]
        if self.args.visual_pretrain_path:
            flags += ["--visual_pretrain_path", self.args.visual_pretrain_path]
        if self.args.clip_config:
            flags += ["--clip_config", self.args.clip_config]
        if fusion:
            flags += ["--cross_config_path", self.args.cross_config_path]
        return flags

    def batch_size(self, name: str) -> int:
        return self.args.batch_size or self.recipe[name].batch_size

    def recipe_flags(self, name: str) -> list[str]:
        r = self.recipe[name]
        flags = ["--epochs", str(r.epochs), "--batch_size", str(self.batch_size(name))]
        flags += ["--warmup_proportion", str(r.warmup_proportion)]
        if not name.startswith("stage2"):  # stage 2 freezes CLIP: --coef_lr has no effect there (and warns)
            flags += ["--coef_lr", str(r.coef_lr)]
        if r.lr is not None:
            flags += ["--lr", str(r.lr)]
        if r.fusion_lr is not None:
            flags += ["--fusion_lr", str(r.fusion_lr)]
        if r.max_steps:
            flags += ["--max_steps", str(r.max_steps)]
        return flags

    def run_dir(self, name: str) -> Path:
        return self.out / name

    def init_model(self, name: str) -> str:
        path = latest_checkpoint(self.run_dir(name))
        if path is None:
            raise ConfigError(f"no checkpoint under {self.run_dir(name)}/ckpt: run the {name} stage first")
        return str(path)

    def pretrain_data_flags(self) -> list[str]:
        lay = self.layout
        return [
            "--train_csv", str(lay.webvid_json), "--webvid_tfrecord", str(lay.shard_index.parent),
            "--val_csv", str(lay.msrvtt / "MSRVTT_JSFUSION_test.csv"), "--features_path", str(lay.videos),
        ]  # fmt: skip

    def msrvtt_flags(self) -> list[str]:
        return [
            "--datatype", "msrvtt", "--data_path", str(self.layout.msrvtt / "MSRVTT_data.json"),
            "--features_path", str(self.layout.videos),
        ]  # fmt: skip

    def qa_flags(self) -> list[str]:
        qa = self.layout.qa
        return [
            "--msrvtt_qa_train_json", str(qa / "train.jsonl"), "--msrvtt_qa_val_json", str(qa / "val.jsonl"),
            "--msrvtt_qa_test_json", str(qa / "test.jsonl"), "--msrvtt_qa_anslabel_json",
            str(qa / "train_ans2label.json"), "--msrvtt_features_path", str(self.layout.videos),
        ]  # fmt: skip

    def stoa_flags(self, with_tags: bool) -> list[str]:
        """STOA's detections and label map from the synthetic set (stage 2 also reads the noun/verb tag file)."""
        root = self.layout.root
        flags = ["--method", "stoa", "--object_count", str(STOA_OBJECT_COUNT), "--objects_dir", str(root / "objects"),
                 "--labelmap_path", str(root / LABEL_MAP_FILE_NAME)]  # fmt: skip
        return flags + (["--tag_file", str(self.layout.webvid_json.parent / TAG_FILE_NAME)] if with_tags else [])

    def objective_flags(self, objective: str) -> list[str]:
        """The flags a stage-1 objective needs on the synthetic set."""
        if objective == "mcq":
            phrases = self.layout.webvid_json.parent / PHRASE_FILE_NAME
            return ["--stage1_objective", "mcq", "--phrase_file", str(phrases)]
        queue = HMMC_QUEUE_BATCHES * self.batch_size("stage1_hmmc")
        return ["--stage1_objective", "hmmc", "--contrast_num_negative", str(queue), "--hmmc_proj_dims",
                str(HMMC_PROJ_DIMS), "--contrast_momentum", str(HMMC_MOMENTUM)]  # fmt: skip

    def comparison_stages(self, rerank: int) -> list[Stage]:
        """The stage-1 objectives (mcq, hmmc) and methods (t2vlp, stoa) beside clip / membridge, same data."""
        out = self.out
        t2vlp = ["--method", "t2vlp", "--num_tubes", str(NUM_TUBES)]

        def stage1_objective(objective: str) -> Callable[[], list[str]]:
            name = f"stage1_{objective}"
            return lambda: ["--do_train", "--output_dir", str(out / name), *self.pretrain_data_flags(),
                            *self.objective_flags(objective), *self.model_flags(fusion=False),
                            *self.recipe_flags(name)]  # fmt: skip

        def stage1_t2vlp() -> list[str]:
            return ["--do_train", "--output_dir", str(out / "stage1_t2vlp"), *self.pretrain_data_flags(), *t2vlp,
                    *self.model_flags(fusion=False), *self.recipe_flags("stage1_t2vlp")]  # fmt: skip

        def stage2(name: str, init: str, method_flags: Callable[[], list[str]]) -> Callable[[], list[str]]:
            return lambda: ["--do_train", "--output_dir", str(out / name), "--init_model", self.init_model(init),
                            "--rerank_topk", str(rerank), *method_flags(), *self.pretrain_data_flags(),
                            *self.model_flags(fusion=True), *self.recipe_flags(name)]  # fmt: skip

        def retrieval(name: str, init: str, method_flags: Callable[[], list[str]]) -> Callable[[], list[str]]:
            msrvtt = self.layout.msrvtt
            return lambda: ["--do_train", "--output_dir", str(out / name), "--init_model", self.init_model(init),
                            "--train_csv", str(msrvtt / "MSRVTT_train.9k.csv"),
                            "--val_csv", str(msrvtt / "MSRVTT_JSFUSION_test.csv"), "--expand_msrvtt_sentences",
                            "--rerank_topk", str(rerank), *method_flags(), *self.msrvtt_flags(),
                            *self.model_flags(fusion=True), *self.recipe_flags(name)]  # fmt: skip

        clip_script, fusion_script = REPO / "main_task_clip.py", REPO / "main_task_fusion.py"
        retrieval_script, retrieval_module = (REPO / "video_text_retrieval" / "main_task_retrieval.py",
                                              "video_text_retrieval.main_task_retrieval")  # fmt: skip
        return [
            Stage("stage1_mcq", "stage-1 objective mcq: MCQ's BridgeFormer + contrastive", clip_script,
                  stage1_objective("mcq")),
            Stage("stage1_hmmc", "stage-1 objective hmmc: HMMC's momentum queues", clip_script,
                  stage1_objective("hmmc")),
            Stage("stage1_t2vlp", "method t2vlp: its stage 1 (tube tokens)", clip_script, stage1_t2vlp),
            Stage("stage2_t2vlp", "method t2vlp: stage 2", fusion_script, stage2("stage2_t2vlp", "stage1_t2vlp",
                  lambda: t2vlp), needs_checkpoint_of="stage1_t2vlp"),
            Stage("retrieval_t2vlp", "method t2vlp: retrieval fine-tuning + re-ranking", retrieval_script,
                  retrieval("retrieval_t2vlp", "stage2_t2vlp", lambda: t2vlp), needs_checkpoint_of="stage2_t2vlp",
                  module=retrieval_module),
            Stage("stage2_stoa", "method stoa: stage 2 from the clip stage-1 checkpoint", fusion_script,
                  stage2("stage2_stoa", "stage1", lambda: self.stoa_flags(with_tags=True)),
                  needs_checkpoint_of="stage1"),
            Stage("retrieval_stoa", "method stoa: retrieval fine-tuning + re-ranking", retrieval_script,
                  retrieval("retrieval_stoa", "stage2_stoa", lambda: self.stoa_flags(with_tags=False)),
                  needs_checkpoint_of="stage2_stoa", module=retrieval_module),
        ]  # fmt: skip

    # ---- the stages ---------------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        out = self.out
        rerank = FULL_RERANK_TOPK if not self.args.quick else QUICK_RERANK_TOPK

        def generate() -> list[str]:
            return ["--output_dir", str(self.layout.root)] + (["--small"] if self.args.quick else [])

        def stage1() -> list[str]:
            return ["--do_train", "--output_dir", str(out / "stage1"), *self.pretrain_data_flags(),
                    *self.model_flags(fusion=False), *self.recipe_flags("stage1")]  # fmt: skip

        def stage2() -> list[str]:
            return ["--do_train", "--output_dir", str(out / "stage2"), "--init_model", self.init_model("stage1"),
                    "--cache_visual_features", "--rerank_topk", str(rerank), *self.pretrain_data_flags(),
                    *self.model_flags(fusion=True), *self.recipe_flags("stage2")]  # fmt: skip

        def retrieval() -> list[str]:
            msrvtt = self.layout.msrvtt
            return ["--do_train", "--output_dir", str(out / "retrieval"), "--init_model", self.init_model("stage2"),
                    "--train_csv", str(msrvtt / "MSRVTT_train.9k.csv"),
                    "--val_csv", str(msrvtt / "MSRVTT_JSFUSION_test.csv"), "--expand_msrvtt_sentences",
                    "--rerank_topk", str(rerank), *self.msrvtt_flags(), *self.model_flags(fusion=True),
                    *self.recipe_flags("retrieval")]  # fmt: skip

        def captioning() -> list[str]:
            return ["--do_train", "--output_dir", str(out / "captioning"), "--init_model", self.init_model("stage2"),
                    *self.msrvtt_flags(), *self.model_flags(fusion=True), *self.recipe_flags("captioning")]  # fmt: skip

        def captioning_untrained() -> list[str]:
            return ["--do_eval", "--output_dir", str(out / "captioning_untrained"), *self.msrvtt_flags(),
                    *self.model_flags(fusion=True)]  # fmt: skip

        def qa() -> list[str]:
            return ["--do_train", "--output_dir", str(out / "qa"), "--init_model", self.init_model("stage2"),
                    *self.qa_flags(), *self.model_flags(fusion=True), *self.recipe_flags("qa")]  # fmt: skip

        def report() -> list[str]:
            return ["--output_dir", str(out), "--data_dir", str(self.layout.root)]

        caption_script = REPO / "video_captioning" / "main_task_caption.py"
        caption_module = "video_captioning.main_task_caption"
        return [
            Stage("generate", "generate the synthetic dataset", REPO / "dataloaders" / "synthetic.py", generate,
                  run_dir=False, module="dataloaders.synthetic"),
            Stage("shards", "verify the WebVid shards", REPO / "frozen_tfrecord.py",
                  lambda: ["--verify", str(self.layout.shard_index)], run_dir=False),
            Stage("stage1", "stage 1: contrastive CLIP pre-training", REPO / "main_task_clip.py", stage1),
            Stage("stage2", "stage 2: bridge/memory fusion pre-training", REPO / "main_task_fusion.py", stage2,
                  needs_checkpoint_of="stage1"),
            Stage("retrieval", "text-video retrieval fine-tuning (MSR-VTT layout)",
                  REPO / "video_text_retrieval" / "main_task_retrieval.py", retrieval, needs_checkpoint_of="stage2",
                  module="video_text_retrieval.main_task_retrieval"),
            Stage("captioning", "video captioning fine-tuning", caption_script, captioning,
                  needs_checkpoint_of="stage2", module=caption_module),
            Stage("captioning_untrained", "captioning baseline: an untrained model", caption_script,
                  captioning_untrained, module=caption_module),
            Stage("qa", "video question answering fine-tuning", REPO / "video_qa" / "main_task_qa.py", qa,
                  needs_checkpoint_of="stage2", module="video_qa.main_task_qa"),
            *self.comparison_stages(rerank),
            Stage("report", "report.html", REPO / "scripts" / "report.py", report, run_dir=False),
        ]  # fmt: skip

    # ---- running ------------------------------------------------------------------------------------------------
    def skip_reason(self, stage: Stage) -> str | None:
        """Why ``stage`` cannot or need not run now (None: run it)."""
        if not stage.script.is_file():
            return f"{stage.script.relative_to(REPO)} is not in this checkout; no numbers for this stage"
        if stage.name == "generate":
            if self.layout.manifest.is_file():
                return f"{self.layout.manifest} exists: reusing that dataset"
            if all(p.exists() for p in self.layout.required()):
                return f"{self.layout.root} already holds the dataset layout (no manifest.json: prepared data)"
        dep = stage.needs_checkpoint_of
        if dep is not None:
            if self.outcomes.get(dep, StageOutcome("")).status == "failed":
                return f"the {dep} stage failed"
            if latest_checkpoint(self.run_dir(dep)) is None:
                return f"no {dep} checkpoint under {self.run_dir(dep)}/ckpt"
        if stage.run_dir and self.args.reuse and (self.run_dir(stage.name) / "eval_results.json").is_file():
            return "reuse"
        return None

    def prepare_run_dir(self, stage: Stage) -> None:
        """A fresh run folder: an earlier run of this stage (it holds config.json) is removed; anything else stops."""
        path = self.run_dir(stage.name)
        if not path.exists():
            return
        if (path / "config.json").is_file() or not any(path.iterdir()):
            shutil.rmtree(path)
            return
        raise ConfigError(
            f"{path} exists and is not a run folder of this demo (no config.json): move it away or pick another "
            "--output_dir"
        )

    def command(self, stage: Stage) -> list[str]:
        head = [sys.executable, "-m", stage.module] if stage.module else [sys.executable, str(stage.script)]
        return head + stage.build_argv()

    def run_stage(self, stage: Stage) -> StageOutcome:
        banner(stage.title)
        reason = self.skip_reason(stage)
        if reason == "reuse":
            logger.info("reused: %s/eval_results.json exists (--reuse)", self.run_dir(stage.name))
            return StageOutcome("reused", note="--reuse: earlier results kept")
        if reason is not None:
            logger.info("SKIPPED: %s", reason)
            return StageOutcome("skipped", note=reason)
        if stage.run_dir:
            self.prepare_run_dir(stage)
        cmd = self.command(stage)
        logger.info("$ %s", " ".join(cmd))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        cpu_before = children_cpu_seconds()
        started = time.perf_counter()
        capture = stage.name == "shards"
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE if capture else None, text=True)
        wall = time.perf_counter() - started
        cpu = children_cpu_seconds() - cpu_before
        note = ""
        if capture:
            sys.stdout.write(proc.stdout)
            note = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        status = "done" if proc.returncode == 0 else "failed"
        if status == "failed":
            log = f"; log: {self.run_dir(stage.name)}/log.txt" if stage.run_dir else ""
            note = f"exit code {proc.returncode}{log}"
            logger.error("FAILED: %s (%s)", stage.title, note)
        logger.info("%s: %s in %.1f s wall, %.1f s CPU", stage.name, status, wall, cpu)
        return StageOutcome(status, round(wall, 2), round(cpu, 2), note)

    def selected(self) -> list[Stage]:
        wanted = set(self.args.stages.split(",")) if self.args.stages else set(ALL_STAGES)
        unknown = wanted - set(ALL_STAGES)
        if unknown:
            raise ConfigError(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(ALL_STAGES)}")
        chosen = set(parse_choices(self.args.methods, METHODS, "--methods"))
        chosen |= set(parse_choices(self.args.stage1_objectives, OBJECTIVES, "--stage1_objectives"))
        return [s for s in self.stages() if s.name in wanted and COMPARISON_OF.get(s.name, "main") in chosen | {"main"}]

    def run(self) -> dict[str, Any]:
        for stage in self.selected():
            if stage.name == "report":  # the report reads results.json
                self.write_results()
            self.outcomes[stage.name] = self.run_stage(stage)
        return self.write_results()

    def stage_records(self) -> dict[str, dict[str, Any]]:
        """Per stage: status, seconds and note. A stage that this call did not run (not selected, skipped, reused)
        keeps the record of the earlier run in results.json, whose outputs the results still come from."""
        path = self.out / RESULTS_FILE
        records: dict[str, dict[str, Any]] = dict(load_json(path).get("stages", {})) if path.is_file() else {}
        for name, outcome in self.outcomes.items():
            earlier = records.get(name)
            if earlier is None or outcome.status in ("done", "failed"):
                records[name] = asdict(outcome)
            elif outcome.status == "reused":
                records[name] = {**earlier, "status": "reused", "note": outcome.note}
        return {name: records[name] for name in ALL_STAGES if name in records}

    def write_results(self) -> dict[str, Any]:
        """results.json from the run folders (also the stages reused from an earlier run)."""
        results: dict[str, Any] = {}
        for name in EVAL_STAGES:
            path = self.run_dir(name) / "eval_results.json"
            if path.is_file():
                results[name] = load_json(path)
        baselines = compute_baselines(self.layout.root)
        untrained = self.run_dir("captioning_untrained") / "eval_results.json"
        if untrained.is_file():
            baselines["captioning_untrained"] = load_json(untrained)
        results["baselines"] = baselines
        records = self.stage_records()
        timed = {name: r for name, r in records.items() if r["wall_s"] > 0}
        for key, field_name in (("timings_s", "wall_s"), ("cpu_s", "cpu_s")):
            results[key] = {name: r[field_name] for name, r in timed.items()}
            results[key]["total"] = round(sum(results[key].values()), 2)
        results["stages"] = records
        results["comparison"] = comparison_tables(results)
        results["config"] = {
            "quick": self.args.quick,
            "data_dir": str(self.layout.root),
            "recipe": {k: asdict(v) for k, v in self.recipe.items()},
            "max_frames": self.args.max_frames,
            "max_words": self.args.max_words,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (RESULTS_FILE + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(self.out / RESULTS_FILE)
        return results


def parse_choices(value: str, choices: Sequence[str], flag: str) -> list[str]:
    """A comma list of ``choices`` (empty entries ignored); anything else stops with the valid names."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(names) - set(choices))
    if unknown:
        raise ConfigError(f"{flag}: unknown {unknown}; choose from {','.join(choices)}")
    return names


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process (and their waited-for descendants)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def banner(title: str) -> None:
    logger.info("\n%s\n==== %s\n%s", "=" * BANNER_WIDTH, title, "=" * BANNER_WIDTH)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="run folders, results.json, report.html")
    parser.add_argument(
        "--data_dir",
        default=None,
        help="dataset folder (synthetic or real, same layout), generated when empty; None: OUTPUT_DIR/data "
        "(OUTPUT_DIR/data_small with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="reduced run: the --small synthetic set, few epochs")
    parser.add_argument("--reuse", action="store_true", help="keep stages whose eval_results.json already exists")
    parser.add_argument(
        "--stages", default=None, help=f"comma list of stages to run; None: all of {','.join(ALL_STAGES)}"
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma list of the methods compared on the same data (membridge is the main pipeline; t2vlp and stoa "
        "add their stages)",
    )
    parser.add_argument(
        "--stage1_objectives",
        default=",".join(OBJECTIVES),
        help="comma list of the stage-1 objectives compared on the same data (clip is the main stage1; mcq and hmmc "
        "add a stage-1 run each)",
    )
    g = parser.add_argument_group("model and data (passed to every stage)")
    g.add_argument(
        "--visual_pretrain_path",
        default=None,
        help="OpenAI CLIP weights (e.g. CLIP-modules/ViT-B-16.pt) that stage 1 starts from",
    )
    g.add_argument(
        "--clip_config", default=None, help=f"CLIP config JSON; None: {TINY_CLIP_CONFIG} unless --visual_pretrain_path"
    )
    g.add_argument("--cross_config_path", default=TINY_FUSION_CONFIG, help="fusion config JSON or folder")
    g.add_argument("--max_frames", type=int, default=MAX_FRAMES, help="frames T per video")
    g.add_argument("--max_words", type=int, default=MAX_WORDS, help="text length L in tokens")
    g.add_argument(
        "--batch_size", type=int, default=None, help="global training batch of every stage; None: the recipe's"
    )
    g.add_argument("--seed", type=int, default=42, help="random seed of every stage")
    g.add_argument("--torch_threads", type=int, default=TORCH_THREADS, help="torch CPU threads per process")
    g.add_argument("--num_thread_reader", type=int, default=NUM_THREAD_READER, help="DataLoader workers per stage")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.clip_config is None and args.visual_pretrain_path is None:
        args.clip_config = TINY_CLIP_CONFIG
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    out = Path(args.output_dir).resolve()
    data = Path(args.data_dir).resolve() if args.data_dir else out / ("data_small" if args.quick else "data")
    pipeline = Pipeline(args, DataLayout(data), out, QUICK_RECIPE if args.quick else FULL_RECIPE)
    results = pipeline.run()
    banner("results (chance / majority / untrained baselines beside each metric)")
    print(format_table(results), flush=True)
    failed = [k for k, v in pipeline.outcomes.items() if v.status == "failed"]
    skipped = [k for k, v in pipeline.outcomes.items() if v.status == "skipped" and k != "generate"]
    print(f"\nresults: {out / RESULTS_FILE}\nreport:  {out / REPORT_FILE}", flush=True)
    if skipped:
        print(f"skipped: {', '.join(skipped)}", flush=True)
    if failed:
        print(f"FAILED: {', '.join(failed)}", flush=True)
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
