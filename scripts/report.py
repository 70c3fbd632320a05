"""The demo's results: baselines, the metric table, and ``report.html`` built from the run folders.

``report.html`` is one self-contained page (inline CSS and SVG, images as ``data:`` URIs, nothing fetched): the metric
table with every metric beside its chance / majority / untrained baseline, two side-by-side comparison tables on the
same data (stage-1 objectives clip / mcq / hmmc by zero-shot retrieval; methods membridge / t2vlp / stoa by stage-2
held-out metrics and re-ranked fine-tuned retrieval; both with wall seconds and the chance row; ``results.json``
holds them as ``comparison``), the training-loss curves of every stage
(from each run's ``scalars.jsonl``), retrieval examples (a test caption and its top-5 videos under the fine-tuned
model, re-ranked when the model has a fusion; the correct video marked), generated captions beside their references,
and QA answers. Thumbnails are frames decoded with ``dataloaders.video_io``.

Command line (scripts/demo.py runs it as its last stage)::

    python scripts/report.py --output_dir demo_output --data_dir demo_output/data
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import logging
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: make the repository root importable
    sys.path.insert(0, str(REPO))

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
RECALL_KS = (1, 5, 10)
# Stage-2 held-out VTM (pretraining/fusion_task.held_out_accuracies): 1 positive + 2 hard negatives per pair, so always
# answering "no match" scores 2/3; the pair accuracy compares a caption's own video with a random one (chance 1/2).
VTM_MAJORITY = 100.0 * 2 / 3
VTM_PAIR_CHANCE = 50.0
CAPTION_METRICS = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
QA_TYPES_ORDER = ("color", "shape", "motion", "count")
LOSS_STAGES = ("stage1", "stage2", "retrieval", "captioning", "qa")
SKIPPED_SCALARS = ("lr", "sec_per_step")  # train/* scalars that are not losses
NUM_RETRIEVAL_QUERIES = 4
TOP_K_SHOWN = 5
NUM_CAPTION_EXAMPLES = 6
NUM_REFERENCES_SHOWN = 3
QA_EXAMPLES_PER_TYPE = 2
THUMB_FRAMES = 3  # frames per thumbnail strip (first, middle, last)
THUMB_SIZE = 56  # pixels per frame in a strip
THUMB_GAP = 2
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov")
CHART_WIDTH, CHART_HEIGHT = 580, 250
CHART_MARGIN = {"left": 56, "right": 116, "top": 14, "bottom": 34}  # the legend sits in the right margin
CHART_TICKS = 5
CHART_MARKER_MAX_POINTS = 40  # draw point markers when a series has at most this many points
# the comparison tables: which run folders (results.json keys) hold each stage-1 objective and each method
OBJECTIVE_STAGES: dict[str, str] = {"clip": "stage1", "mcq": "stage1_mcq", "hmmc": "stage1_hmmc"}
METHOD_STAGES: dict[str, tuple[str, str, str]] = {  # method -> (its stage-1 run, stage-2 run, retrieval run)
    "membridge": ("stage1", "stage2", "retrieval"),
    "t2vlp": ("stage1_t2vlp", "stage2_t2vlp", "retrieval_t2vlp"),
    "stoa": ("stage1", "stage2_stoa", "retrieval_stoa"),  # STOA has no stage 1: the clip stage-1 checkpoint
}
# (column key, results key in the run's eval_results.json, chance key in results["baselines"])
OBJECTIVE_COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    ("t2v_R1", "t2v_R1", "retrieval_R1"),
    ("t2v_R5", "t2v_R5", "retrieval_R5"),
    ("t2v_R10", "t2v_R10", "retrieval_R10"),
    ("v2t_R1", "v2t_R1", "retrieval_R1"),
    ("t2v_MdR", "t2v_MdR", "retrieval_MdR"),
)
METHOD_STAGE2_COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    ("stage2_vtm_acc", "heldout_vtm_acc", "stage2_vtm_majority"),
    ("stage2_pair_acc", "heldout_vtm_pair_acc", "vtm_pair_chance"),
    ("stage2_rerank_R1", "rerank_t2v_R1", "retrieval_R1"),
)
METHOD_RETRIEVAL_COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    ("rerank_t2v_R1", "rerank_t2v_R1", "retrieval_R1"),
    ("rerank_t2v_R5", "rerank_t2v_R5", "retrieval_R5"),
    ("rerank_t2v_R10", "rerank_t2v_R10", "retrieval_R10"),
    ("rerank_v2t_R1", "rerank_v2t_R1", "retrieval_R1"),
    ("t2v_R1", "t2v_R1", "retrieval_R1"),
)
SERIES_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")


# ---- small readers ------------------------------------------------------------------------------------------------
def load_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """``RUN/ckpt/<name in ckpt/latest>`` when that checkpoint exists, else None."""
    ckpt = Path(run_dir) / "ckpt"
    pointer = ckpt / "latest"
    if not pointer.is_file():
        return None
    path = ckpt / pointer.read_text().strip()
    return path if path.is_dir() else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- baselines ----------------------------------------------------------------------------------------------------
def majority_accuracy(train: list[dict[str, Any]], test: list[dict[str, Any]]) -> float:
    """Test accuracy (%) of always answering the most frequent training answer."""
    if not train or not test:
        return float("nan")
    majority = Counter(q["answer"] for q in train).most_common(1)[0][0]
    return 100.0 * sum(q["answer"] == majority for q in test) / len(test)


def compute_baselines(data_dir: str | Path) -> dict[str, Any]:
    """Chance and majority levels from the annotation files (on the synthetic set: its manifest's ``chance``).

    Retrieval: a random ranking of N test videos puts the right one in the top k with probability k/N, median rank
    (N+1)/2. QA: the most frequent training answer for every question, overall and per answer type.
    """
    data = Path(data_dir)
    out: dict[str, Any] = {}
    test_csv = data / "msrvtt" / "MSRVTT_JSFUSION_test.csv"
    if test_csv.is_file():
        with test_csv.open(newline="") as f:
            n = len({row["video_id"] for row in csv.DictReader(f)})
        if n:
            out.update({f"retrieval_R{k}": min(100.0, 100.0 * k / n) for k in RECALL_KS})
            out["retrieval_MdR"] = (n + 1) / 2
    qa_train, qa_test = data / "msrvtt_qa" / "train.jsonl", data / "msrvtt_qa" / "test.jsonl"
    if qa_train.is_file() and qa_test.is_file():
        train, test = read_jsonl(qa_train), read_jsonl(qa_test)
        out["qa_majority"] = majority_accuracy(train, test)
        by_type_train, by_type_test = defaultdict(list), defaultdict(list)
        for q in train:
            by_type_train[q.get("answer_type")].append(q)
        for q in test:
            by_type_test[q.get("answer_type")].append(q)
        hits = 0.0
        for answer_type, questions in by_type_test.items():
            acc = majority_accuracy(by_type_train.get(answer_type, []), questions)
            if answer_type is not None:
                out[f"qa_majority_{answer_type}"] = acc
            hits += 0.0 if math.isnan(acc) else acc * len(questions) / 100.0
        out["qa_per_type_majority"] = 100.0 * hits / len(test) if test else float("nan")
    out["stage2_vtm_majority"] = VTM_MAJORITY
    out["vtm_pair_chance"] = VTM_PAIR_CHANCE
    return out


# ---- the metric table ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricRow:
    """One metric of one stage beside its baseline (None: no meaningful baseline)."""

    stage: str
    metric: str
    value: float
    baseline: float | None
    baseline_kind: str


def _retrieval_specs(prefixes: Sequence[str]) -> list[tuple[str, str, str]]:
    specs = []
    for prefix in prefixes:
        for direction in ("t2v", "v2t"):
            specs += [(f"{prefix}{direction}_R{k}", f"retrieval_R{k}", "chance") for k in RECALL_KS]
            specs.append((f"{prefix}{direction}_MdR", "retrieval_MdR", "chance"))
    return specs


# (metric key in the stage's eval_results.json, baseline key in results["baselines"], baseline kind)
TABLE_SPEC: dict[str, list[tuple[str, str | None, str]]] = {
    "stage1": _retrieval_specs([""]),
    "stage2": [
        *[(f"{d}_R1", "retrieval_R1", "chance") for d in ("t2v", "v2t", "rerank_t2v", "rerank_v2t")],
        ("heldout_vtm_acc", "stage2_vtm_majority", "majority"),
        ("heldout_vtm_pair_acc", "vtm_pair_chance", "chance"),
        ("heldout_vtm_random_acc", "vtm_pair_chance", "chance"),
        ("heldout_mlm_acc", None, ""),
        ("heldout_plm_acc", None, ""),
    ],
    "retrieval": _retrieval_specs(["", "rerank_"]),
    "captioning": [(m, f"captioning_untrained.{m}", "untrained") for m in CAPTION_METRICS],
    "qa": [
        ("accuracy", "qa_majority", "majority"),
        *[(f"accuracy_{t}", f"qa_majority_{t}", "type majority") for t in QA_TYPES_ORDER],
        ("in_vocabulary", None, ""),
    ],
}


def _baseline(baselines: dict[str, Any], key: str | None) -> float | None:
    if key is None:
        return None
    value: Any = baselines
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value)


def metric_rows(results: dict[str, Any]) -> list[MetricRow]:
    """Every tabled metric present in ``results`` with its baseline, stage by stage."""
    baselines = results.get("baselines", {})
    rows = []
    for stage, specs in TABLE_SPEC.items():
        metrics = results.get(stage) or {}
        for metric, base_key, kind in specs:
            if isinstance(metrics.get(metric), int | float):
                base = _baseline(baselines, base_key)
                rows.append(MetricRow(stage, metric, float(metrics[metric]), base, kind if base is not None else ""))
    return rows


def _number(metrics: Any, key: str) -> float | None:
    value = metrics.get(key) if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def comparison_tables(results: dict[str, Any]) -> dict[str, Any]:
    """The two side-by-side tables of the demo (results.json ``comparison``), from the runs' eval_results.

    ``stage1_objectives``: per objective that ran, the zero-shot MSR-VTT-layout retrieval of its stage-1 run and its
    wall seconds. ``methods``: per method whose retrieval or stage 2 ran, the stage-2 held-out metrics, the fine-tuned
    retrieval (re-ranked with the method's fusion; ``t2v_R1`` is the dual encoder alone) and the wall seconds of its
    stage 1 and of its stage 2 + retrieval. ``chance``: the baseline of each column (None: none).
    """
    timings = results.get("timings_s", {})
    baselines = results.get("baselines", {})
    objectives: dict[str, dict[str, Any]] = {}
    for objective, stage in OBJECTIVE_STAGES.items():
        metrics = results.get(stage)
        if not isinstance(metrics, dict):
            continue
        row: dict[str, Any] = {"stage": stage}
        row |= {column: _number(metrics, key) for column, key, _ in OBJECTIVE_COLUMNS}
        row["wall_s"] = _number(timings, stage)
        objectives[objective] = row
    methods: dict[str, dict[str, Any]] = {}
    for method, (stage1, stage2, retrieval) in METHOD_STAGES.items():
        s2, ret = results.get(stage2), results.get(retrieval)
        if not isinstance(s2, dict) and not isinstance(ret, dict):
            continue
        row = {"stages": [stage1, stage2, retrieval]}
        row |= {column: _number(s2, key) for column, key, _ in METHOD_STAGE2_COLUMNS}
        row |= {column: _number(ret, key) for column, key, _ in METHOD_RETRIEVAL_COLUMNS}
        row["stage1_wall_s"] = _number(timings, stage1)
        s2_s, ret_s = _number(timings, stage2), _number(timings, retrieval)
        row["wall_s"] = None if s2_s is None or ret_s is None else round(s2_s + ret_s, 2)
        methods[method] = row
    chance = {
        "stage1_objectives": {column: _baseline(baselines, base) for column, _, base in OBJECTIVE_COLUMNS},
        "methods": {
            column: _baseline(baselines, base)
            for column, _, base in (*METHOD_STAGE2_COLUMNS, *METHOD_RETRIEVAL_COLUMNS)
        },
    }
    return {"stage1_objectives": objectives, "methods": methods, "chance": chance}


COMPARISON_TITLES = {
    "stage1_objectives": "stage-1 objectives (zero-shot retrieval of the stage-1 run, same data)",
    "methods": "methods (stage 2, then retrieval fine-tuning re-ranked with the fusion, same data)",
}


def comparison_columns(table: str) -> list[str]:
    if table == "stage1_objectives":
        return [column for column, _, _ in OBJECTIVE_COLUMNS] + ["wall_s"]
    return [c for c, _, _ in (*METHOD_STAGE2_COLUMNS, *METHOD_RETRIEVAL_COLUMNS)] + ["stage1_wall_s", "wall_s"]


def format_comparison(comparison: dict[str, Any]) -> str:
    """The two comparison tables as plain text (one row per objective / method, then the chance row)."""
    lines = []
    for table, title in COMPARISON_TITLES.items():
        rows = comparison.get(table) or {}
        if not rows:
            continue
        columns = comparison_columns(table)
        widths = [max(len(c), 7) + 1 for c in columns]
        lines += ["", title, f"{'':<10}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))]
        chance = comparison.get("chance", {}).get(table, {})
        for name, row in [*rows.items(), ("chance", chance)]:
            cells = (f"{format_value(row.get(c), c):>{w}}" for c, w in zip(columns, widths, strict=True))
            lines.append(f"{name:<10}" + "".join(cells))
    return "\n".join(lines)


def format_value(value: float | None, metric: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.4f}" if metric in CAPTION_METRICS else f"{value:.2f}"


def format_table(results: dict[str, Any]) -> str:
    """The plain-text metric table (stage, metric, result, baseline, kind of baseline), with stage notes."""
    header = f"{'stage':<12}{'metric':<22}{'result':>10}{'baseline':>10}  kind"
    lines = [header, "-" * len(header)]
    for row in metric_rows(results):
        lines.append(
            f"{row.stage:<12}{row.metric:<22}{format_value(row.value, row.metric):>10}"
            f"{format_value(row.baseline, row.metric):>10}  {row.baseline_kind}"
        )
    for name, outcome in results.get("stages", {}).items():
        if outcome["status"] in ("skipped", "failed") and name != "generate":
            lines.append(f"{name}: {outcome['status'].upper()} ({outcome['note']})")
    comparison = format_comparison(results.get("comparison") or comparison_tables(results))
    return "\n".join(lines) + (f"\n{comparison}" if comparison else "")


# ---- loss curves (inline SVG) -------------------------------------------------------------------------------------
def loss_series(scalars: Path) -> dict[str, list[tuple[float, float]]]:
    """``train/<loss>`` series (step, value) from a run's scalars.jsonl, one point per step (the last one logged)."""
    series: dict[str, dict[float, float]] = defaultdict(dict)
    for record in read_jsonl(scalars):
        step = record.get("step")
        for key, value in record.items():
            if not key.startswith("train/") or not isinstance(value, int | float) or step is None:
                continue
            name = key.removeprefix("train/")
            if name in SKIPPED_SCALARS or "acc" in name:
                continue
            series[name][float(step)] = float(value)
    return {name: sorted(points.items()) for name, points in series.items() if points}


def nice_ticks(lo: float, hi: float, count: int = CHART_TICKS) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        if value >= lo - step * 1e-9:
            ticks.append(round(value, 10))
        value += step
    return ticks


def svg_chart(title: str, series: dict[str, list[tuple[float, float]]]) -> str:
    """A line chart of ``series`` (name -> [(x, y)]) as an inline <svg> element with axes, ticks and a legend."""
    m = CHART_MARGIN
    w, h = CHART_WIDTH - m["left"] - m["right"], CHART_HEIGHT - m["top"] - m["bottom"]
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts if math.isfinite(y)]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    pad = 0.05 * (y_hi - y_lo or abs(y_hi) or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1

    def px(x: float) -> float:
        return m["left"] + (x - x_lo) / (x_hi - x_lo) * w

    def py(y: float) -> float:
        return m["top"] + (1 - (y - y_lo) / (y_hi - y_lo)) * h

    parts = [
        f'<svg width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" aria-label="{html.escape(title)}">',
        f'<rect x="{m["left"]}" y="{m["top"]}" width="{w}" height="{h}" fill="#fff" stroke="#999"/>',
    ]
    for t in nice_ticks(y_lo, y_hi):
        y = py(t)
        parts.append(f'<line x1="{m["left"]}" x2="{m["left"] + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{m["left"] - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{t:g}</text>')
    for t in nice_ticks(x_lo, x_hi):
        x = px(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{m["top"] + h}" y2="{m["top"] + h + 4}" stroke="#666"/>')
        parts.append(f'<text x="{x:.1f}" y="{m["top"] + h + 16}" text-anchor="middle" class="tick">{t:g}</text>')
    parts.append(
        f'<text x="{m["left"] + w / 2}" y="{CHART_HEIGHT - 4}" text-anchor="middle" class="axis">optimizer step</text>'
    )
    for i, (name, pts) in enumerate(series.items()):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        finite = [(x, y) for x, y in pts if math.isfinite(y)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in finite)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if len(finite) <= CHART_MARKER_MAX_POINTS:
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in finite]
        ly = m["top"] + 10 + 16 * i
        lx = m["left"] + w + 10
        parts.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="3"/>')
        parts.append(f'<text x="{lx + 24}" y="{ly}" class="legend">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# ---- thumbnails ---------------------------------------------------------------------------------------------------
def find_video(videos: Path, video_id: str) -> Path | None:
    for ext in ("", *VIDEO_EXTENSIONS):
        path = videos / f"{video_id}{ext}"
        if path.is_file():
            return path
    return None


def thumbnail_uri(videos: Path, video_id: str, cache: dict[str, str | None]) -> str | None:
    """A ``data:image/png;base64`` strip of THUMB_FRAMES frames (first, middle, last) of a video, None if unreadable."""
    if video_id in cache:
        return cache[video_id]
    import numpy as np
    from PIL import Image

    from dataloaders.errors import DataError
    from dataloaders.video_io import decode_frames, probe_video

    path = find_video(videos, video_id)
    uri = None
    if path is not None:
        try:
            n = probe_video(path).num_frames
            frames = decode_frames(path, np.linspace(0, max(0, n - 1), THUMB_FRAMES).round().astype(int))
        except DataError as exc:
            logger.warning("no thumbnail for %s: %s", video_id, exc)
        else:
            strip = Image.new("RGB", (THUMB_FRAMES * (THUMB_SIZE + THUMB_GAP) - THUMB_GAP, THUMB_SIZE), "white")
            for i, frame in enumerate(frames):
                tile = Image.fromarray(frame).resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.NEAREST)
                strip.paste(tile, (i * (THUMB_SIZE + THUMB_GAP), 0))
            buffer = io.BytesIO()
            strip.save(buffer, format="PNG", optimize=True)
            uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    cache[video_id] = uri
    return uri


def thumb_html(videos: Path, video_id: str, cache: dict[str, str | None], css: str = "") -> str:
    uri = thumbnail_uri(videos, video_id, cache)
    label = html.escape(video_id)
    if uri is None:
        return f'<div class="nothumb {css}">{label}<br>(no video)</div>'
    return f'<img class="thumb {css}" src="{uri}" alt="{label}" title="{label}">'


# ---- retrieval examples -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrievalExample:
    query: str
    target: str
    rank: int  # 1-based rank of the correct video
    top: list[tuple[str, float]]  # (video id, score) best first
    reranked: bool


def retrieval_examples(run_dir: Path, num_queries: int = NUM_RETRIEVAL_QUERIES) -> list[RetrievalExample]:
    """Rank the test videos for a few test captions with the retrieval run's final weights (re-ranked with VTM
    when the model has a fusion and the run re-ranked), in a single CPU process."""
    import numpy as np
    import torch

    from engine.builders import build_dataset, build_model
    from engine.distributed import DistInfo
    from video_text_retrieval.task import dual_similarity, encode_eval_set, rerank_similarity

    ckpt = latest_checkpoint(run_dir)
    config = run_dir / "config.json"
    if ckpt is None or not config.is_file():
        return []
    args = argparse.Namespace(**load_json(config)["flags"])
    args.init_model, args.num_thread_reader = str(ckpt), 0
    torch.set_num_threads(max(1, args.torch_threads))
    rerank = args.rerank_topk > 0
    model = build_model(args, with_fusion=rerank).eval()
    eval_set = build_dataset(args, args.datatype, "test", model.encoder.clip.config.image_resolution)
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    enc = encode_eval_set(model, eval_set, args.batch_size_val, 0, dist)
    sim = dual_similarity(model, enc).cpu()
    if rerank:
        keep_t = torch.ones(sim.shape[0], dtype=torch.bool)
        keep_v = torch.ones(sim.shape[1], dtype=torch.bool)
        with torch.no_grad():
            sim, _ = rerank_similarity(model, enc, sim, keep_t, keep_v, min(args.rerank_topk, sim.shape[1]), dist)
    queries = np.linspace(0, sim.shape[0] - 1, min(num_queries, sim.shape[0])).round().astype(int)
    examples = []
    for q in queries.tolist():
        order = torch.argsort(sim[q], descending=True).tolist()
        target = eval_set.text_to_video[q]
        examples.append(
            RetrievalExample(
                query=eval_set.texts[q],
                target=eval_set.video_ids[target],
                rank=order.index(target) + 1,
                top=[(eval_set.video_ids[v], float(sim[q, v])) for v in order[:TOP_K_SHOWN]],
                reranked=rerank,
            )
        )
    return examples


# ---- html sections ------------------------------------------------------------------------------------------------
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222;
       max-width: 1220px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0; }
td.query { width: 230px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; font-size: 14px; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.better td.num.result { color: #0a7a2a; font-weight: 600; }
tr.worse td.num.result { color: #b00020; font-weight: 600; }
.muted { color: #666; font-size: 13px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.chart { border: 1px solid #ddd; padding: 6px; }
.chart h3 { margin: 2px 0 4px 4px; font-size: 15px; }
svg .tick { font-size: 11px; fill: #444; } svg .axis { font-size: 12px; fill: #444; }
svg .legend { font-size: 12px; fill: #222; }
img.thumb { image-rendering: pixelated; border: 3px solid transparent; display: block; }
img.thumb.correct { border-color: #0a9a3a; }
.nothumb { width: 120px; height: 60px; border: 1px dashed #aaa; font-size: 12px; padding: 4px; }
.cand { display: inline-block; margin: 0 6px 4px 0; text-align: center; font-size: 12px; vertical-align: top; }
.ok { color: #0a7a2a; font-weight: 600; } .bad { color: #b00020; font-weight: 600; }
"""


SAME_AS_BASELINE = 1e-4  # metrics are in % or 0-10 scales: smaller differences are float noise


def section_metrics(results: dict[str, Any]) -> str:
    rows = ["<table><tr><th>stage</th><th>metric</th><th>result</th><th>baseline</th><th>baseline is</th></tr>"]
    for row in metric_rows(results):
        lower_better = row.metric.endswith(("MdR", "MnR"))
        css = ""
        if row.baseline is not None:
            # a metric equal to its baseline up to float32 noise (e.g. 66.67 vs 66.666...) is not "better"
            margin = (row.baseline - row.value if lower_better else row.value - row.baseline) - SAME_AS_BASELINE
            css = "better" if margin > 0 else "worse"
        rows.append(
            f'<tr class="{css}"><td>{html.escape(row.stage)}</td><td>{html.escape(row.metric)}</td>'
            f'<td class="num result">{format_value(row.value, row.metric)}</td>'
            f'<td class="num">{format_value(row.baseline, row.metric)}</td>'
            f"<td>{html.escape(row.baseline_kind)}</td></tr>"
        )
    rows.append("</table>")
    notes = [
        f"<li><b>{html.escape(name)}</b>: {html.escape(o['status'])} ({html.escape(o['note'])})</li>"
        for name, o in results.get("stages", {}).items()
        if o["status"] in ("skipped", "failed") and name != "generate"
    ]
    legend = (
        '<p class="muted">R@k and accuracies in %, MdR = median rank (lower is better); captioning metrics as '
        "pycocoevalcap reports them (0-1, CIDEr 0-10). Green: better than the baseline, red: not.</p>"
    )
    return "<h2>Metrics</h2>" + legend + "\n".join(rows) + (f"<ul>{''.join(notes)}</ul>" if notes else "")


COMPARISON_LOWER_BETTER = ("MdR", "wall_s")


def comparison_table_html(table: str, comparison: dict[str, Any]) -> str:
    """One comparison table: a row per objective / method that ran, then the chance row; the best value of each
    metric column in bold."""
    rows = comparison.get(table) or {}
    columns = comparison_columns(table)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    parts = [f'<div class="chart"><h3>{html.escape(COMPARISON_TITLES[table])}</h3>']
    if not rows:
        return parts[0] + "<p>None of these stages ran.</p></div>"
    best: dict[str, float] = {}
    for column in columns:
        values = [v for r in rows.values() if (v := r.get(column)) is not None and math.isfinite(v)]
        if values and not column.endswith("wall_s"):
            best[column] = min(values) if column.endswith(COMPARISON_LOWER_BETTER) else max(values)
    parts.append(f'<table class="comparison" id="{table}"><tr><th></th>{head}</tr>')
    for name, row in rows.items():
        cells = []
        for column in columns:
            value = row.get(column)
            text = format_value(value, column)
            cells.append(
                f'<td class="num">{f"<b>{text}</b>" if value is not None and value == best.get(column) else text}</td>'
            )
        parts.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    chance = comparison.get("chance", {}).get(table, {})
    cells = "".join(f'<td class="num">{format_value(chance.get(c), c)}</td>' for c in columns)
    parts.append(f'<tr class="muted"><th>chance</th>{cells}</tr></table></div>')
    return "".join(parts)


def section_comparison(results: dict[str, Any]) -> str:
    comparison = results.get("comparison") or comparison_tables(results)
    legend = (
        '<p class="muted">The same generated data for every row. Stage-1 objectives: the zero-shot MSR-VTT-layout '
        "retrieval each stage-1 run reports on the test split (R@k in %, MdR median rank). Methods: stage-2 held-out "
        "VTM accuracy (1 positive + 2 hard negatives; majority 66.67) and pair accuracy, then retrieval fine-tuning "
        "re-ranked with the method's fusion (rerank_*; t2v_R1: the dual encoder alone); wall_s: stage 2 + retrieval "
        "seconds (stage1_wall_s: the stage-1 run it starts from; STOA has no stage 1 and starts from clip's). Best "
        "value per column in bold.</p>"
    )
    tables = "".join(comparison_table_html(table, comparison) for table in COMPARISON_TITLES)
    return "<h2>Comparison: stage-1 objectives and methods</h2>" + legend + f'<div class="charts">{tables}</div>'


def section_summary(results: dict[str, Any], out: Path) -> str:
    cfg = results.get("config", {})
    commit = "unknown"
    for name in LOSS_STAGES:
        config = out / name / "config.json"
        if config.is_file():
            commit = load_json(config).get("git_commit", commit)
            break
    rows = ["<table><tr><th>stage</th><th>status</th><th>wall s</th><th>CPU s</th><th>note</th></tr>"]
    timings, cpu = results.get("timings_s", {}), results.get("cpu_s", {})
    for name, outcome in results.get("stages", {}).items():
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(outcome['status'])}</td>"
            f'<td class="num">{timings.get(name, "")}</td><td class="num">{cpu.get(name, "")}</td>'
            f"<td>{html.escape(outcome.get('note', ''))}</td></tr>"
        )
    rows.append(
        f'<tr><th>total</th><th></th><th class="num">{timings.get("total", "")}</th>'
        f'<th class="num">{cpu.get("total", "")}</th><th></th></tr></table>'
    )
    mode = "quick (--small data, few epochs)" if cfg.get("quick") else "full"
    return (
        "<h1>MemBridge demo report</h1>"
        f'<p class="muted">mode: {html.escape(mode)} &middot; data: {html.escape(str(cfg.get("data_dir", "")))} '
        f"&middot; commit: {html.escape(str(commit))} &middot; T={cfg.get('max_frames', '')} frames, "
        f"L={cfg.get('max_words', '')} tokens</p>"
        "<h2>Stages</h2>" + "\n".join(rows)
    )


def section_losses(out: Path) -> str:
    charts = []
    for name in LOSS_STAGES:
        scalars = out / name / "scalars.jsonl"
        if not scalars.is_file():
            continue
        series = loss_series(scalars)
        if series:
            charts.append(f'<div class="chart"><h3>{html.escape(name)}</h3>{svg_chart(name + " losses", series)}</div>')
    body = f'<div class="charts">{"".join(charts)}</div>' if charts else "<p>No training scalars found.</p>"
    return '<h2>Training losses</h2><p class="muted">train/* losses as logged every --n_display steps.</p>' + body


def section_retrieval(out: Path, videos: Path, cache: dict[str, str | None]) -> str:
    head = "<h2>Retrieval examples</h2>"
    run_dir = out / "retrieval"
    if not (run_dir / "eval_results.json").is_file():
        return head + "<p>The retrieval stage did not run.</p>"
    examples = retrieval_examples(run_dir)
    if not examples:
        return head + "<p>No retrieval checkpoint to rank with.</p>"
    how = "dual-encoder similarity" + (", re-ranked with the fusion's VTM" if examples[0].reranked else "")
    rows = [
        head + f'<p class="muted">Test captions and their top-{TOP_K_SHOWN} test videos ({how}) under the '
        "fine-tuned model; the correct video has a green frame. Each strip shows the first, middle and last frame.</p>"
        "<table><tr><th>query</th><th>top videos</th></tr>"
    ]
    for ex in examples:
        cands = []
        for i, (vid, score) in enumerate(ex.top, 1):
            hit = vid == ex.target
            cands.append(
                f'<div class="cand">{thumb_html(videos, vid, cache, "correct" if hit else "")}'
                f"#{i} {html.escape(vid)}{' &#10003;' if hit else ''}<br>score {score:.1f}</div>"
            )
        verdict = f'<span class="{"ok" if ex.rank == 1 else "bad"}">correct video at rank {ex.rank}</span>'
        rows.append(f'<tr><td class="query">{html.escape(ex.query)}<br>{verdict}</td><td>{"".join(cands)}</td></tr>')
    rows.append("</table>")
    return "\n".join(rows)


def msrvtt_references(data: Path) -> dict[str, list[str]]:
    path = data / "msrvtt" / "MSRVTT_data.json"
    refs: dict[str, list[str]] = defaultdict(list)
    if path.is_file():
        for sentence in load_json(path)["sentences"]:
            refs[sentence["video_id"]].append(sentence["caption"])
    return refs


def section_captions(out: Path, data: Path, videos: Path, cache: dict[str, str | None]) -> str:
    head = "<h2>Captioning examples</h2>"
    path = out / "captioning" / "captions_test.json"
    if not path.is_file():
        return head + "<p>The captioning stage did not run.</p>"
    captions = load_json(path)
    untrained_path = out / "captioning_untrained" / "captions_test.json"
    untrained = load_json(untrained_path) if untrained_path.is_file() else {}
    refs = msrvtt_references(data)
    rows = [
        head + '<p class="muted">Greedy decoding of the fine-tuned model on test videos, beside '
        f"{NUM_REFERENCES_SHOWN} of the reference captions"
        + (" and the caption of the untrained model" if untrained else "")
        + ".</p><table><tr><th>video</th><th>generated</th>"
        + ("<th>untrained model</th>" if untrained else "")
        + "<th>references</th></tr>"
    ]
    for vid in list(captions)[:NUM_CAPTION_EXAMPLES]:
        ref_list = "<br>".join(html.escape(r) for r in refs.get(vid, [])[:NUM_REFERENCES_SHOWN])
        generated = html.escape(captions[vid]) or '<span class="muted">(empty)</span>'
        base = f"<td>{html.escape(untrained.get(vid, ''))}</td>" if untrained else ""
        rows.append(
            f"<tr><td>{thumb_html(videos, vid, cache)}{html.escape(vid)}</td><td><b>{generated}</b></td>{base}"
            f"<td>{ref_list}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def pick_qa_examples(predictions: list[dict[str, Any]], per_type: int = QA_EXAMPLES_PER_TYPE) -> list[dict[str, Any]]:
    """Per answer type, the first correct and the first wrong prediction (then more of either), ``per_type`` each."""
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in predictions:
        by_type[str(p.get("answer_type", ""))].append(p)
    picked = []
    for answer_type in sorted(by_type, key=lambda t: (QA_TYPES_ORDER + (t,)).index(t)):
        items = by_type[answer_type]
        right = [p for p in items if p.get("correct")]
        wrong = [p for p in items if not p.get("correct")]
        interleaved = [p for pair in zip(right, wrong, strict=False) for p in pair] + right + wrong
        seen: list[dict[str, Any]] = []
        for p in interleaved:
            if p not in seen:
                seen.append(p)
            if len(seen) == per_type:
                break
        picked += seen
    return picked


def section_qa(out: Path, videos: Path, cache: dict[str, str | None]) -> str:
    head = "<h2>Question answering examples</h2>"
    path = out / "qa" / "predictions_test.jsonl"
    if not path.is_file():
        return head + "<p>The QA stage did not run.</p>"
    rows = [
        head + '<p class="muted">Test questions, per answer type one answered right and one wrong where both exist.</p>'
        "<table><tr><th>video</th><th>type</th><th>question</th><th>prediction</th><th>answer</th></tr>"
    ]
    for p in pick_qa_examples(read_jsonl(path)):
        mark = '<span class="ok">&#10003;</span>' if p.get("correct") else '<span class="bad">&#10007;</span>'
        rows.append(
            f"<tr><td>{thumb_html(videos, p['video_id'], cache)}{html.escape(p['video_id'])}</td>"
            f"<td>{html.escape(str(p.get('answer_type', '')))}</td><td>{html.escape(p['question'])}</td>"
            f"<td>{html.escape(str(p.get('prediction', '')))} {mark}</td><td>{html.escape(str(p['answer']))}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def build_report(output_dir: str | Path, data_dir: str | Path) -> Path:
    """Write OUTPUT_DIR/report.html from results.json and the run folders; returns its path."""
    out, data = Path(output_dir), Path(data_dir)
    results_path = out / RESULTS_FILE
    results = load_json(results_path) if results_path.is_file() else {}
    videos = data / "videos"
    cache: dict[str, str | None] = {}
    body = [
        section_summary(results, out),
        section_metrics(results),
        section_comparison(results),
        section_losses(out),
        section_retrieval(out, videos, cache),
        section_captions(out, data, videos, cache),
        section_qa(out, videos, cache),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>MemBridge demo report</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = out / REPORT_FILE
    tmp = out / (REPORT_FILE + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="the demo's output folder (results.json, run folders)")
    parser.add_argument("--data_dir", required=True, help="the dataset folder the demo ran on (videos/, msrvtt/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = build_report(args.output_dir, args.data_dir)
    print(path, flush=True)
    return path


if __name__ == "__main__":
    main()
