"""scripts/demo.py end to end (``--quick``: the --small synthetic set, few epochs) and the report helpers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import demo  # noqa: E402
import report  # noqa: E402

from dataloaders.errors import ConfigError  # noqa: E402

DEMO_TIMEOUT_S = 600
EVAL_STAGES = ("stage1", "stage2", "retrieval", "captioning", "qa")
REQUIRED_METRICS = {
    "stage1": ("t2v_R1", "t2v_R5", "t2v_R10", "v2t_R1"),
    "stage2": ("t2v_R1", "rerank_t2v_R1", "heldout_vtm_acc", "heldout_mlm_acc", "heldout_plm_acc"),
    "retrieval": ("t2v_R1", "t2v_R5", "t2v_R10", "t2v_MdR", "v2t_R1", "rerank_t2v_R1", "rerank_v2t_R1"),
    "captioning": ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"),
    "qa": ("accuracy", "in_vocabulary", "accuracy_color", "accuracy_count"),
}
COMPARISON_ROWS = {"stage1_objectives": ("clip", "mcq", "hmmc"), "methods": ("membridge", "t2vlp", "stoa")}
TODAYS_STAGES = ("generate", "shards", "stage1", "stage2", "retrieval", "captioning", "captioning_untrained", "qa",
                 "report")  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``scripts/demo.py --quick`` run (it generates its own --small data): output folder and stdout."""
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "demo.py"), "--quick", "--output_dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"out": out, "stdout": proc.stdout, "results": json.loads((out / "results.json").read_text())}


class _ResourceCollector(HTMLParser):
    """Every tag, and every URL-bearing attribute (src, href, srcset, poster, data, xlink:href) of the page."""

    URL_ATTRS = ("src", "href", "srcset", "poster", "data", "xlink:href", "action")

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[tuple[str, str, str]] = []
        self.img_srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in self.URL_ATTRS and value is not None:
                self.urls.append((tag, name, value))
                if tag == "img" and name == "src":
                    self.img_srcs.append(value)


class _ComparisonTables(HTMLParser):
    """The cell texts of every ``<table class="comparison" id=...>``, row by row (header row first)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self.table: str | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "table" and attr.get("class") == "comparison":
            self.table = str(attr["id"])
            self.rows[self.table] = []
        elif self.table and tag == "tr":
            self.rows[self.table].append([])
        elif self.table and tag in ("td", "th"):
            self.cell = []

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.table = None
        elif self.table and tag in ("td", "th") and self.cell is not None:
            self.rows[self.table][-1].append("".join(self.cell).strip())
            self.cell = None


@pytest.mark.slow
def test_demo_results_cover_every_stage_above_baselines(demo_run: dict[str, Any]) -> None:
    results = demo_run["results"]
    for stage in EVAL_STAGES:
        assert stage in results, f"{stage} missing from results.json"
        for metric in REQUIRED_METRICS[stage]:
            assert isinstance(results[stage][metric], int | float), (stage, metric)
    assert all(outcome["status"] in ("done", "skipped") for outcome in results["stages"].values())
    assert results["stages"]["generate"]["status"] == "done"
    baselines = results["baselines"]
    assert results["retrieval"]["t2v_R1"] > baselines["retrieval_R1"]
    assert results["qa"]["accuracy"] > baselines["qa_majority"]
    assert set(baselines["captioning_untrained"]) >= set(REQUIRED_METRICS["captioning"])
    for stage in ("stage1", "stage2", "retrieval", "captioning", "qa", *demo.COMPARISON_STAGES, "total"):
        assert results["timings_s"][stage] > 0 and results["cpu_s"][stage] > 0


@pytest.mark.slow
def test_demo_compares_objectives_and_methods_on_the_same_data(demo_run: dict[str, Any]) -> None:
    results = demo_run["results"]
    comparison = results["comparison"]
    for table, names in COMPARISON_ROWS.items():
        assert tuple(comparison[table]) == names
        columns = report.comparison_columns(table)
        for name in names:
            row = comparison[table][name]
            assert all(isinstance(row[c], float) and math.isfinite(row[c]) for c in columns), (table, name, row)
            assert row["wall_s"] > 0
    objectives, methods = comparison["stage1_objectives"], comparison["methods"]
    # each row is read from its own run folder (the same data: one test split, one chance level)
    for objective, stage in report.OBJECTIVE_STAGES.items():
        assert objectives[objective]["t2v_R1"] == results[stage]["t2v_R1"]
        assert objectives[objective]["wall_s"] == results["timings_s"][stage]
    for method, (stage1, stage2, retrieval) in report.METHOD_STAGES.items():
        assert methods[method]["rerank_t2v_R1"] == results[retrieval]["rerank_t2v_R1"]
        assert methods[method]["stage2_vtm_acc"] == results[stage2]["heldout_vtm_acc"]
        assert methods[method]["wall_s"] == pytest.approx(
            results["timings_s"][stage2] + results["timings_s"][retrieval], abs=0.02
        )
        assert methods[method]["stage1_wall_s"] == results["timings_s"][stage1]
    assert comparison["chance"]["stage1_objectives"]["t2v_R1"] == results["baselines"]["retrieval_R1"]
    assert comparison["chance"]["methods"]["rerank_t2v_R1"] == results["baselines"]["retrieval_R1"]
    # each comparison run did what its flags say: its own objective / method in its checkpoint and config
    configs = {
        s: json.loads((demo_run["out"] / s / "config.json").read_text())["flags"] for s in demo.COMPARISON_STAGES
    }
    assert configs["stage1_mcq"]["stage1_objective"] == "mcq" and configs["stage1_hmmc"]["stage1_objective"] == "hmmc"
    assert all(configs[s]["method"] == "t2vlp" for s in ("stage1_t2vlp", "stage2_t2vlp", "retrieval_t2vlp"))
    assert all(configs[s]["method"] == "stoa" for s in ("stage2_stoa", "retrieval_stoa"))
    assert configs["stage2_stoa"]["init_model"].startswith(str(demo_run["out"] / "stage1" / "ckpt"))
    stdout = demo_run["stdout"]
    for title in report.COMPARISON_TITLES.values():
        assert f"\n{title}\n" in stdout
    line = next(row for row in stdout.splitlines() if row.startswith("hmmc "))
    assert line.split()[1] == f"{objectives['hmmc']['t2v_R1']:.2f}"


@pytest.mark.slow
def test_demo_baselines_match_the_generator_manifest(demo_run: dict[str, Any]) -> None:
    chance = json.loads((demo_run["out"] / "data_small" / "manifest.json").read_text())["chance"]
    baselines = demo_run["results"]["baselines"]
    for k in (1, 5, 10):
        assert baselines[f"retrieval_R{k}"] == pytest.approx(chance[f"retrieval_R{k}"])
    assert baselines["qa_majority"] == pytest.approx(chance["qa_majority_answer_accuracy"])
    assert baselines["qa_per_type_majority"] == pytest.approx(chance["qa_per_type_majority_accuracy"])


@pytest.mark.slow
def test_demo_prints_the_metric_table(demo_run: dict[str, Any]) -> None:
    stdout = demo_run["stdout"]
    args = demo.build_parser().parse_args(["--output_dir", str(demo_run["out"])])
    for stage in demo.Pipeline(args, demo.DataLayout(demo_run["out"]), demo_run["out"], demo.QUICK_RECIPE).stages():
        assert f"==== {stage.title}\n" in stdout  # every stage's banner
    table = stdout[stdout.index("stage       metric") :]
    r1 = demo_run["results"]["retrieval"]["t2v_R1"]
    line = next(row for row in table.splitlines() if row.startswith("retrieval   t2v_R1 "))
    assert line.split()[2:4] == [f"{r1:.2f}", f"{demo_run['results']['baselines']['retrieval_R1']:.2f}"]


@pytest.mark.slow
def test_demo_report_is_self_contained(demo_run: dict[str, Any]) -> None:
    page = (demo_run["out"] / "report.html").read_text(encoding="utf-8")
    parser = _ResourceCollector()
    parser.feed(page)
    parser.close()
    assert parser.tags[:2] == ["html", "head"] and "body" in parser.tags
    assert parser.tags.count("svg") == len(EVAL_STAGES)  # one loss chart per trained main stage
    assert parser.tags.count("polyline") >= len(EVAL_STAGES)
    # thumbnails: retrieval (4 queries x top-5, repeats cached but each <img> embeds its URI), captions, QA
    assert len(parser.img_srcs) >= report.NUM_RETRIEVAL_QUERIES * report.TOP_K_SHOWN
    assert all(src.startswith("data:image/png;base64,") for src in parser.img_srcs)
    assert all(value.startswith("data:") for _, _, value in parser.urls), parser.urls
    assert "link" not in parser.tags and "script" not in parser.tags and "iframe" not in parser.tags
    assert "http://" not in page and "https://" not in page and "url(" not in page and "@import" not in page
    assert "correct video at rank" in page and "Captioning examples" in page and "Question answering" in page
    tables = _ComparisonTables()
    tables.feed(page)
    comparison = demo_run["results"]["comparison"]
    for table, names in COMPARISON_ROWS.items():
        rows = tables.rows[table]
        assert rows[0][1:] == report.comparison_columns(table)  # header
        assert [r[0] for r in rows[1:]] == [*names, "chance"]
        for name, cells in zip(names, rows[1:], strict=False):
            for column, cell in zip(report.comparison_columns(table), cells[1:], strict=True):
                assert math.isfinite(float(cell)), (table, name, column, cell)
                assert float(cell) == pytest.approx(comparison[table][name][column], abs=0.006)


@pytest.mark.slow
def test_demo_reuse_skips_finished_stages(demo_run: dict[str, Any]) -> None:
    """A second call with --reuse keeps every finished stage and only rebuilds results.json and the report."""
    out = demo_run["out"]
    before = (out / "stage1" / "eval_results.json").read_text()
    results = demo.main(["--quick", "--output_dir", str(out), "--reuse", "--stages", "generate,stage1,qa"])
    assert results["stages"]["stage1"]["status"] == "reused"
    assert results["stages"]["qa"]["status"] == "reused"
    assert results["stages"]["generate"]["status"] == "done"  # this call skipped it: the earlier record stays
    assert (out / "stage1" / "eval_results.json").read_text() == before
    assert results["retrieval"] == demo_run["results"]["retrieval"]  # still read from its run folder
    assert results["timings_s"] == demo_run["results"]["timings_s"]  # earlier seconds kept, total = their sum
    assert results["timings_s"]["total"] == pytest.approx(
        sum(v for k, v in results["timings_s"].items() if k != "total"), abs=0.05
    )


# ---- fast unit tests of the helpers --------------------------------------------------------------------------------
def test_missing_script_and_checkpoint_are_skipped_with_reasons(tmp_path: Path) -> None:
    args = demo.build_parser().parse_args(["--output_dir", str(tmp_path)])
    pipeline = demo.Pipeline(args, demo.DataLayout(tmp_path / "data"), tmp_path, demo.QUICK_RECIPE)
    absent = demo.Stage("captioning", "captioning", REPO / "video_captioning" / "absent_script.py", list)
    assert "absent_script.py is not in this checkout" in pipeline.skip_reason(absent)
    needs = demo.Stage("qa", "qa", REPO / "video_qa" / "main_task_qa.py", list, needs_checkpoint_of="stage2")
    assert "no stage2 checkpoint" in pipeline.skip_reason(needs)
    pipeline.outcomes["stage2"] = demo.StageOutcome("failed")
    assert pipeline.skip_reason(needs) == "the stage2 stage failed"
    outcome = pipeline.run_stage(absent)
    assert outcome.status == "skipped" and outcome.wall_s == 0.0


def test_stage_command_lines_follow_the_recipe(tmp_path: Path) -> None:
    args = demo.build_parser().parse_args(["--output_dir", str(tmp_path), "--max_frames", "4"])
    args.clip_config = demo.TINY_CLIP_CONFIG
    pipeline = demo.Pipeline(args, demo.DataLayout(tmp_path / "data"), tmp_path, demo.FULL_RECIPE)
    ckpt = tmp_path / "stage1" / "ckpt" / "step-7"
    ckpt.mkdir(parents=True)
    (ckpt.parent / "latest").write_text("step-7\n")
    stage2 = next(s for s in pipeline.stages() if s.name == "stage2")
    argv = pipeline.command(stage2)
    assert argv[:2] == [sys.executable, str(REPO / "main_task_fusion.py")]
    flags = dict(zip(argv[2::1], argv[3::1], strict=False))
    assert flags["--init_model"] == str(ckpt)
    assert flags["--epochs"] == str(demo.FULL_RECIPE["stage2"].epochs)
    assert flags["--fusion_lr"] == str(demo.FULL_RECIPE["stage2"].fusion_lr)
    assert flags["--max_frames"] == "4" and flags["--torch_threads"] == "1" and flags["--num_thread_reader"] == "1"
    assert "--cache_visual_features" in argv and "--lr" not in argv
    with pytest.raises(ConfigError, match="unknown"):
        demo.Pipeline(
            demo.build_parser().parse_args(["--stages", "stage1,nope"]), pipeline.layout, tmp_path, demo.QUICK_RECIPE
        ).selected()


def test_comparison_stages_follow_the_choices_and_their_flags(tmp_path: Path) -> None:
    def pipeline(*flags: str) -> demo.Pipeline:
        args = demo.build_parser().parse_args(["--quick", "--output_dir", str(tmp_path), *flags])
        args.clip_config = demo.TINY_CLIP_CONFIG
        return demo.Pipeline(args, demo.DataLayout(tmp_path / "data"), tmp_path, demo.QUICK_RECIPE)

    assert tuple(s.name for s in pipeline("--methods", "membridge", "--stage1_objectives", "clip").selected()) == (
        TODAYS_STAGES
    )
    assert [s.name for s in pipeline().selected()] == list(demo.ALL_STAGES)  # default: every comparison
    names = [s.name for s in pipeline("--methods", "stoa", "--stage1_objectives", "hmmc").selected()]
    assert names == [*TODAYS_STAGES[:-1], "stage1_hmmc", "stage2_stoa", "retrieval_stoa", "report"]
    with pytest.raises(ConfigError, match=r"--methods: unknown \['clip'\]"):
        pipeline("--methods", "membridge,clip").selected()
    with pytest.raises(ConfigError, match="--stage1_objectives: unknown"):
        pipeline("--stage1_objectives", "stoa").selected()

    p = pipeline()
    for run in ("stage1", "stage1_t2vlp", "stage2_stoa", "stage2_t2vlp"):
        (tmp_path / run / "ckpt" / "step-3").mkdir(parents=True)
        (tmp_path / run / "ckpt" / "latest").write_text("step-3\n")
    argv = {s.name: p.command(s) for s in p.stages() if s.name in demo.COMPARISON_STAGES}

    def flag(stage: str, name: str) -> str:
        return argv[stage][argv[stage].index(name) + 1]

    data = tmp_path / "data"
    assert flag("stage1_mcq", "--phrase_file") == str(data / "webvid" / "noun_verb.tsv")
    assert flag("stage1_hmmc", "--contrast_num_negative") == str(2 * demo.QUICK_RECIPE["stage1"].batch_size)
    for stage in demo.COMPARISON_STAGES:  # the counterpart's batch and learning rates, one epoch in --quick
        counterpart = stage.split("_")[0]
        assert flag(stage, "--epochs") == "1" and flag(stage, "--max_steps") == "10"
        assert flag(stage, "--output_dir") == str(tmp_path / stage)
        assert flag(stage, "--batch_size") == str(demo.QUICK_RECIPE[counterpart].batch_size)
        assert "--cache_visual_features" not in argv[stage]
    assert all(flag(s, "--method") == "t2vlp" for s in ("stage1_t2vlp", "stage2_t2vlp", "retrieval_t2vlp"))
    assert flag("stage2_t2vlp", "--init_model") == str(tmp_path / "stage1_t2vlp" / "ckpt" / "step-3")
    assert flag("stage2_stoa", "--init_model") == str(tmp_path / "stage1" / "ckpt" / "step-3")
    assert flag("retrieval_stoa", "--init_model") == str(tmp_path / "stage2_stoa" / "ckpt" / "step-3")
    assert flag("stage2_stoa", "--objects_dir") == flag("retrieval_stoa", "--objects_dir") == str(data / "objects")
    assert flag("stage2_stoa", "--tag_file") == str(data / "webvid" / "noun_verb_tags.json")
    assert "--tag_file" not in argv["retrieval_stoa"] and flag("retrieval_stoa", "--rerank_topk") == "8"
    from dataloaders import synthetic

    assert (demo.PHRASE_FILE_NAME, demo.TAG_FILE_NAME, demo.LABEL_MAP_FILE_NAME) == (
        synthetic.PHRASE_FILE_NAME, synthetic.TAG_FILE_NAME, synthetic.LABEL_MAP_FILE_NAME)  # fmt: skip
    assert flag("stage2_stoa", "--labelmap_path") == str(data / "object_label_map.json")
    assert demo.FULL_RECIPE["stage1_hmmc"] == demo.FULL_RECIPE["stage1"]
    assert demo.FULL_RECIPE["retrieval_stoa"] == demo.FULL_RECIPE["retrieval"]


def test_comparison_tables_by_hand() -> None:
    results = {
        "stage1": {"t2v_R1": 20.0, "t2v_R5": 50.0, "t2v_R10": 70.0, "v2t_R1": 18.0, "t2v_MdR": 5.0},
        "stage1_hmmc": {"t2v_R1": 10.0, "t2v_R5": 40.0, "t2v_R10": 60.0, "v2t_R1": 9.0, "t2v_MdR": 8.0},
        "stage2": {"heldout_vtm_acc": 70.0, "heldout_vtm_pair_acc": 60.0, "rerank_t2v_R1": 21.0},
        "retrieval": {
            "rerank_t2v_R1": 40.0,
            "rerank_t2v_R5": 80.0,
            "rerank_t2v_R10": 90.0,
            "rerank_v2t_R1": 35.0,
            "t2v_R1": 38.0,
        },  # fmt: skip
        "retrieval_stoa": {"rerank_t2v_R1": 30.0},
        "timings_s": {"stage1": 70.0, "stage1_hmmc": 90.5, "stage2": 75.25, "retrieval": 170.0},
        "baselines": {
            "retrieval_R1": 0.5,
            "retrieval_R5": 2.5,
            "retrieval_R10": 5.0,
            "retrieval_MdR": 100.5,
            "stage2_vtm_majority": 200 / 3,
            "vtm_pair_chance": 50.0,
        },  # fmt: skip
    }
    table = report.comparison_tables(results)
    assert list(table["stage1_objectives"]) == ["clip", "hmmc"]  # mcq did not run: no row
    assert table["stage1_objectives"]["hmmc"] == {
        "stage": "stage1_hmmc", "t2v_R1": 10.0, "t2v_R5": 40.0, "t2v_R10": 60.0, "v2t_R1": 9.0, "t2v_MdR": 8.0,
        "wall_s": 90.5,
    }  # fmt: skip
    membridge = table["methods"]["membridge"]
    assert membridge["wall_s"] == 245.25 and membridge["stage1_wall_s"] == 70.0
    assert (membridge["stage2_vtm_acc"], membridge["rerank_t2v_R10"], membridge["t2v_R1"]) == (70.0, 90.0, 38.0)
    stoa = table["methods"]["stoa"]  # its stage 2 is missing and its retrieval has one metric: the rest is None
    assert stoa["rerank_t2v_R1"] == 30.0 and stoa["rerank_t2v_R5"] is None and stoa["wall_s"] is None
    assert "t2vlp" not in table["methods"]
    assert table["chance"]["stage1_objectives"]["t2v_MdR"] == 100.5
    assert table["chance"]["methods"]["stage2_vtm_acc"] == pytest.approx(66.667, abs=1e-3)
    text = report.format_comparison(table)
    hmmc_line = next(line for line in text.splitlines() if line.startswith("hmmc"))
    assert hmmc_line.split() == ["hmmc", "10.00", "40.00", "60.00", "9.00", "8.00", "90.50"]
    stoa_line = next(line for line in text.splitlines() if line.startswith("stoa"))
    assert stoa_line.split()[:5] == ["stoa", "-", "-", "-", "30.00"]


def test_nice_ticks_are_round_and_cover_the_range() -> None:
    assert report.nice_ticks(0.0, 10.0) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert report.nice_ticks(0.83, 3.1) == [1.0, 1.5, 2.0, 2.5, 3.0]
    ticks = report.nice_ticks(10.0, 250.0)
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert steps == {50.0} and ticks[0] >= 10.0 and ticks[-1] <= 250.0


def test_loss_series_keeps_losses_and_the_last_value_per_step(tmp_path: Path) -> None:
    rows = [
        {"step": 10, "train/loss": 3.0, "train/vtm": 1.0, "train/lr": 0.1, "train/vtm_acc": 0.5},
        {"step": 20, "train/loss": 2.0, "train/vtm": 0.8, "train/sec_per_step": 0.2},
        {"step": 20, "train/loss": 2.0, "train/vtm": 0.8},
        {"step": 20, "eval/t2v_R1": 12.0},
    ]
    path = tmp_path / "scalars.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert report.loss_series(path) == {"loss": [(10.0, 3.0), (20.0, 2.0)], "vtm": [(10.0, 1.0), (20.0, 0.8)]}
    svg = report.svg_chart("t", report.loss_series(path))
    assert svg.count("<polyline") == 2 and "http" not in svg


def test_metric_rows_pair_metrics_with_their_baselines() -> None:
    results = {
        "retrieval": {"t2v_R1": 30.0, "t2v_MdR": 2.0, "tag": "final"},
        "qa": {"accuracy": 40.0, "accuracy_color": 50.0},
        "captioning": {"CIDEr": 0.5},
        "baselines": {
            "retrieval_R1": 1.0,
            "retrieval_MdR": 60.5,
            "qa_majority": 8.0,
            "captioning_untrained": {"CIDEr": 0.01},
        },
    }
    rows = {(r.stage, r.metric): r for r in report.metric_rows(results)}
    assert set(rows) == {
        ("retrieval", "t2v_R1"),
        ("retrieval", "t2v_MdR"),
        ("qa", "accuracy"),
        ("qa", "accuracy_color"),
        ("captioning", "CIDEr"),
    }
    assert (rows["retrieval", "t2v_R1"].baseline, rows["retrieval", "t2v_R1"].baseline_kind) == (1.0, "chance")
    assert rows["retrieval", "t2v_MdR"].baseline == 60.5
    assert rows["qa", "accuracy_color"].baseline is None and rows["qa", "accuracy_color"].baseline_kind == ""
    assert rows["captioning", "CIDEr"].baseline == 0.01
    assert "0.5000" in report.format_table(results)


def test_majority_baselines_match_a_direct_count() -> None:
    train = [{"answer": a} for a in ("one", "one", "red", "two")]
    test = [{"answer": a} for a in ("one", "red", "red", "two", "one")]
    assert report.majority_accuracy(train, test) == pytest.approx(100.0 * 2 / 5)
    assert math.isnan(report.majority_accuracy([], test))


def test_qa_examples_mix_right_and_wrong_per_type() -> None:
    preds = [
        {"answer_type": "count", "correct": True, "i": 0},
        {"answer_type": "color", "correct": True, "i": 1},
        {"answer_type": "color", "correct": True, "i": 2},
        {"answer_type": "color", "correct": False, "i": 3},
    ]
    picked = report.pick_qa_examples(preds, per_type=2)
    assert [p["i"] for p in picked] == [1, 3, 0]  # colour first (QA_TYPES_ORDER), one right + one wrong
