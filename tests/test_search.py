"""``python -m video_text_retrieval.search`` on a tiny model trained briefly on the small synthetic set: text queries
find their videos far above chance, the embedding cache is reused and invalidated by weights and file changes, a
video query ranks captions, the bridge re-ranking equals a plain reference, and bad input exits with code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import main_task_clip
import main_task_fusion
from dataloaders.datasets import EVAL_SEED
from dataloaders.video_io import FileVideoSource
from tests.conftest import REPO
from video_text_retrieval import search

TINY = str(REPO / "CLIP-modules" / "tiny.json")
FUSION_TINY = str(REPO / "CLIP-modules" / "fusion-tiny.json")
STAGE1_STEPS = "30"  # 10 epochs of the 24 synthetic WebVid videos: 23/24 captions find their video in the top 5
STAGE2_STEPS = "3"
MIN_TOP5 = 16  # of 24 queries; an untrained model puts ~5 in its top 5 (chance 5/24), P(>= 16 by chance) = 1.6e-6
NUM_FOLDER_VIDEOS = 6
RERANK_K = 4


def train_flags(data: Path, out: Path, steps: str) -> list[str]:
    return [
        "--do_train", "--clip_config", TINY, "--cross_config_path", FUSION_TINY, "--output_dir", str(out),
        "--train_csv", str(data / "webvid" / "frozen_train_labels.json"),
        "--webvid_tfrecord", str(data / "webvid" / "tfrecord"),
        "--max_frames", "4", "--max_words", "12", "--batch_size", "8", "--epochs", "100", "--max_steps", steps,
        "--warmup_proportion", "0", "--loose_type", "--no-log_tensorboard", "--seed", "7", "--torch_threads", "1",
        "--n_display", "10", "--keep_checkpoints", "2",
    ]  # fmt: skip


def step_dirs(out: Path) -> list[Path]:
    return sorted((out / "ckpt").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


@pytest.fixture(scope="module")
def runs(synthetic_small, tmp_path_factory) -> dict[str, Path]:
    """Stage 1 (CLIP) for STAGE1_STEPS steps, then a few stage-2 (fusion, frozen CLIP) steps on top."""
    root = tmp_path_factory.mktemp("search_runs")
    main_task_clip.main([*train_flags(synthetic_small, root / "s1", STAGE1_STEPS), "--lr", "1e-3", "--coef_lr", "1"])
    s1 = step_dirs(root / "s1")[-1]
    main_task_fusion.main(
        [*train_flags(synthetic_small, root / "s2", STAGE2_STEPS), "--fusion_lr", "1e-3", "--init_model", str(s1),
         "--cache_visual_features"]
    )  # fmt: skip
    return {"s1": root / "s1", "s2": root / "s2"}


def overrides(**flags: object) -> argparse.Namespace:
    """The command-line namespace of the search script (only the model overrides matter here)."""
    return search.build_search_parser().parse_args(["--checkpoint", "unused", "--query", "unused", *_argv(flags)])


def _argv(flags: dict[str, object]) -> list[str]:
    return [item for name, value in flags.items() for item in (f"--{name}", str(value))]


def webvid_captions(data: Path) -> list[dict[str, str]]:
    return json.loads((data / "webvid" / "frozen_train_labels.json").read_text())


@pytest.fixture(scope="module")
def stage1(runs) -> search.SearchModel:
    return search.load_search_model(runs["s1"], overrides())


def test_text_queries_find_their_videos(synthetic_small, stage1, tmp_path):
    shards = str(synthetic_small / "webvid" / "tfrecord" / "path.index")
    corpus = search.index_corpus(stage1, shards=shards, cache_dir=str(tmp_path / "cache"))
    assert not stage1.has_fusion and stage1.flags.max_frames == 4 and stage1.flags.max_words == 12  # from config.json
    assert corpus.cache.computed == 24 and corpus.frame_feats.shape == (24, 4, 64)
    ranks = []
    for row in webvid_captions(synthetic_small):
        hits = search.search_videos(stage1, corpus, row["caption"], topk=24, rerank_topk=0)
        assert [h.rank for h in hits] == list(range(1, 25))
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
        ranks.append([h.item for h in hits].index(row["video_id"]))
    assert sum(r < 5 for r in ranks) >= MIN_TOP5, ranks

    # the dual-encoder score is exp(logit_scale) * cos of the query and the cached video embedding
    query = webvid_captions(synthetic_small)[3]["caption"]
    encoder = stage1.model.encoder
    with torch.no_grad():
        ids, _ = stage1.tokenizer.encode(query, 12)
        text = torch.nn.functional.normalize(encoder.clip.encode_text(torch.from_numpy(ids)[None]), dim=-1)
        video = encoder.video_embedding(corpus.frame_feats, corpus.video_mask)
        expected = (encoder.clip.logit_scale.exp() * text @ video.t())[0]
    top = search.search_videos(stage1, corpus, query, topk=3, rerank_topk=0)
    for hit in top:
        i = corpus.video_ids.index(hit.item)
        assert hit.score == pytest.approx(float(expected[i]), rel=1e-5)
        assert hit.path.endswith(".tfrecord") and hit.offset is not None


def _folder(data: Path, root: Path) -> Path:
    folder = root / "videos"
    folder.mkdir()
    for i in range(NUM_FOLDER_VIDEOS):
        shutil.copy(data / "videos" / f"video{i}.mp4", folder / f"video{i}.mp4")
    return folder


def test_cache_is_reused_and_invalidated(synthetic_small, runs, stage1, tmp_path):
    folder = _folder(synthetic_small, tmp_path)
    first = search.index_corpus(stage1, videos=str(folder))
    assert (first.cache.reused, first.cache.computed) == (0, NUM_FOLDER_VIDEOS)
    assert first.cache.directory.parent == folder / search.CACHE_DIRNAME

    # cached features are the encoder's output on the decoded video (plain reference)
    source = FileVideoSource(folder, 4)
    frames, mask = source.load("video2.mp4", rng=np.random.default_rng(EVAL_SEED))
    with torch.no_grad():
        direct = stage1.model.encoder.encode_video(stage1.transform(frames, mask)[None], torch.from_numpy(mask)[None])
    torch.testing.assert_close(first.frame_feats[first.video_ids.index("video2.mp4")], direct[0], rtol=1e-4, atol=1e-5)

    second = search.index_corpus(stage1, videos=str(folder))  # no decoding, no ViT
    assert (second.cache.reused, second.cache.computed) == (NUM_FOLDER_VIDEOS, 0)
    assert torch.equal(second.frame_feats, first.frame_feats)

    # a changed file is re-encoded, the others are reused
    shutil.copy(folder / "video5.mp4", folder / "video1.mp4")
    changed = search.index_corpus(stage1, videos=str(folder))
    assert (changed.cache.reused, changed.cache.computed) == (NUM_FOLDER_VIDEOS - 1, 1)
    row = {vid: i for i, vid in enumerate(changed.video_ids)}
    torch.testing.assert_close(changed.frame_feats[row["video1.mp4"]], changed.frame_feats[row["video5.mp4"]])

    # other weights (the previous stage-1 checkpoint) give another cache; stage 2 keeps CLIP frozen and reuses it
    older = search.load_search_model(step_dirs(runs["s1"])[0], overrides())
    other = search.index_corpus(older, videos=str(folder))
    assert other.cache.computed == NUM_FOLDER_VIDEOS and other.cache.directory != first.cache.directory
    fused = search.load_search_model(runs["s2"], overrides())
    assert fused.has_fusion
    assert search.index_corpus(fused, videos=str(folder)).cache.computed == 0


def test_repeated_queries_do_not_hash_the_encoder_again(synthetic_small, runs, tmp_path, monkeypatch):
    folder = _folder(synthetic_small, tmp_path)
    weights_dir = tmp_path / "weights"
    shutil.copytree(step_dirs(runs["s1"])[-1], weights_dir)
    model = search.load_search_model(weights_dir, overrides())
    first = search.index_corpus(model, videos=str(folder))
    memo = json.loads((folder / search.CACHE_DIRNAME / search.FINGERPRINT_MEMO).read_text())
    assert list(memo.values()) == [search.encoder_fingerprint(model.model.encoder)]

    calls = []
    real = search.encoder_fingerprint
    monkeypatch.setattr(search, "encoder_fingerprint", lambda encoder: calls.append(1) or real(encoder))
    again = search.index_corpus(model, videos=str(folder))
    assert calls == [] and (again.cache.computed, again.cache.directory) == (0, first.cache.directory)

    weights = model.weights
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten weights
    rehashed = search.index_corpus(model, videos=str(folder))
    assert calls == [1] and rehashed.cache.directory == first.cache.directory  # same tensors, same features
    (folder / search.CACHE_DIRNAME / search.FINGERPRINT_MEMO).write_text("{not json")  # a damaged memo is rebuilt
    assert search.index_corpus(model, videos=str(folder)).cache.computed == 0 and calls == [1, 1]


def test_unreadable_videos_are_left_out_of_the_search(synthetic_small, stage1, tmp_path, caplog):
    folder = _folder(synthetic_small, tmp_path)
    (folder / "video3.mp4").write_bytes(os.urandom(4096))
    with caplog.at_level(logging.WARNING):
        corpus = search.index_corpus(stage1, videos=str(folder))
    assert "video3.mp4" not in corpus.video_ids and len(corpus.video_ids) == NUM_FOLDER_VIDEOS - 1
    assert corpus.frame_feats.shape[0] == len(corpus.paths) == NUM_FOLDER_VIDEOS - 1
    assert "1 videos could not be read and are left out of the search" in caplog.text
    again = search.index_corpus(stage1, videos=str(folder))  # remembered as unreadable: nothing decoded
    assert again.cache.computed == 0 and again.video_ids == corpus.video_ids


def test_cli_prints_a_table_or_json(synthetic_small, runs, tmp_path, capsys):
    folder = _folder(synthetic_small, tmp_path)
    caption = next(r["caption"] for r in webvid_captions(synthetic_small) if r["video_id"] == "video0")
    argv = ["--checkpoint", str(runs["s1"]), "--videos", str(folder), "--query", caption, "--topk", "3"]
    assert search.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "similarity", "item", "path"] and len(lines) == 4
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]
    assert search.main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert all(Path(r["path"]).parent == folder and r["item"] == Path(r["path"]).name for r in rows)


def test_video_query_ranks_captions(synthetic_small, stage1, tmp_path):
    rows = webvid_captions(synthetic_small)
    captions = [r["caption"] for r in rows]
    text_file, json_file = tmp_path / "captions.txt", tmp_path / "captions.json"
    text_file.write_text("\n".join(captions) + "\n\n")
    json_file.write_text(json.dumps([{"caption": c} for c in captions]))
    assert search.read_captions(text_file) == search.read_captions(json_file) == captions
    ranks = []
    for row in rows:
        video = synthetic_small / "videos" / f"{row['video_id']}.mp4"
        hits = search.rank_captions(stage1, video, captions, topk=len(captions), rerank_topk=0)
        assert sorted(h.item for h in hits) == sorted(captions)
        ranks.append([h.item for h in hits].index(row["caption"]))
    assert sum(r < 5 for r in ranks) >= MIN_TOP5, ranks


def test_fusion_checkpoint_reranks_with_the_bridge_formula(synthetic_small, runs, tmp_path):
    fused = search.load_search_model(runs["s2"], overrides(rerank_topk=RERANK_K))
    corpus = search.index_corpus(fused, videos=str(_folder(synthetic_small, tmp_path)))
    query = webvid_captions(synthetic_small)[0]["caption"]
    hits = search.search_videos(fused, corpus, query, topk=NUM_FOLDER_VIDEOS, rerank_topk=RERANK_K)
    plain = search.search_videos(fused, corpus, query, topk=NUM_FOLDER_VIDEOS, rerank_topk=0)

    # plain reference: softmax over the dual-encoder top-k, times 1000 * p_match, plus 1000
    sim = {h.item: h.similarity for h in plain}
    top = [h.item for h in plain[:RERANK_K]]
    rows = [corpus.video_ids.index(v) for v in top]
    tokens, mask, eot = search.encode_texts(fused, [query])
    with torch.no_grad():
        logits = fused.model.fusion.match_logits(
            corpus.frame_feats[rows], corpus.video_mask[rows], tokens.expand(RERANK_K, -1, -1),
            mask.expand(RERANK_K, -1), eot.expand(RERANK_K, -1),
        )  # fmt: skip
    p_match = logits.softmax(-1)[:, 1]
    expected = torch.tensor([sim[v] for v in top]).softmax(-1) * 1000 * p_match + 1000
    scores = {h.item: h.score for h in hits}
    for video, value in zip(top, expected.tolist(), strict=True):
        assert scores[video] == pytest.approx(value, rel=1e-5)
    assert {h.item for h in hits[:RERANK_K]} == set(top)  # re-ranking reorders the candidates only
    assert all(scores[h.item] == pytest.approx(h.similarity) for h in hits[RERANK_K:])

    # video query: the candidate captions are re-ranked the same way (transposed)
    captions = [r["caption"] for r in webvid_captions(synthetic_small)]
    video = synthetic_small / "videos" / "video0.mp4"
    reranked = search.rank_captions(fused, video, captions, topk=len(captions), rerank_topk=RERANK_K)
    dual = search.rank_captions(fused, video, captions, topk=len(captions), rerank_topk=0)
    assert {h.item for h in reranked[:RERANK_K]} == {h.item for h in dual[:RERANK_K]}
    assert all(h.score > 1000 for h in reranked[:RERANK_K]) and all(h.score < 1000 for h in reranked[RERANK_K:])


def test_bad_input_is_one_message_and_exit_code_2(synthetic_small, runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    ckpt = str(runs["s1"])
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), "--videos", str(empty), "--query", "a"], "missing"),
        (["--checkpoint", ckpt, "--videos", str(empty), "--query", "a"], str(empty)),
        (["--checkpoint", ckpt, "--shards", str(tmp_path / "none.index"), "--query", "a"], "none.index"),
        (["--checkpoint", ckpt, "--query", "a"], "--videos"),
        (["--checkpoint", ckpt, "--videos", str(empty), "--query", "a", "--captions", "c.txt"], "--captions"),
        (["--checkpoint", ckpt, "--query_video", str(tmp_path / "clip.mp4"), "--captions", "x.txt"], "x.txt"),
    ]
    for argv, named in cases:
        assert search.main(argv) == search.EXIT_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and named in err[-1], err


def _cli_json(argv: list[str], capsys) -> list[dict]:
    assert search.main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _cache_dir(folder: Path) -> Path:
    (directory,) = [p for p in (folder / search.CACHE_DIRNAME).iterdir() if p.is_dir()]
    return directory


def test_a_blank_query_is_an_error_not_a_ranking(synthetic_small, runs, tmp_path, capsys):
    folder = _folder(synthetic_small, tmp_path)
    for query in ("", "   ", "\t\n"):
        assert search.main(["--checkpoint", str(runs["s1"]), "--videos", str(folder), "--query", query]) == 2
        err = capsys.readouterr()
        assert err.out == "" and err.err.strip().splitlines()[-1].startswith("error: --query is empty")
    assert not (folder / search.CACHE_DIRNAME).exists()  # refused before any video was encoded


def test_nan_features_in_the_cache_are_encoded_again(synthetic_small, runs, tmp_path, capsys, caplog):
    folder = _folder(synthetic_small, tmp_path)
    caption = webvid_captions(synthetic_small)[2]["caption"]
    argv = ["--checkpoint", str(runs["s1"]), "--videos", str(folder), "--query", caption, "--topk", "6"]
    expected = _cli_json(argv, capsys)
    directory = _cache_dir(folder)
    index = json.loads((directory / "index.json").read_text())["videos"]
    row = index["video4.mp4"][0]
    feats = np.load(directory / "features.npy", mmap_mode="r+")
    good = np.array(feats[row])
    feats[row, 1, 3] = np.nan
    feats.flush()
    del feats
    with caplog.at_level(logging.WARNING):
        assert _cli_json(argv, capsys) == expected  # no NaN score, same ranking
    assert "1 videos have NaN or infinite features, encoding them again: ['video4.mp4']" in caplog.text
    rebuilt = np.load(_cache_dir(folder) / "features.npy")
    new_row = json.loads((_cache_dir(folder) / "index.json").read_text())["videos"]["video4.mp4"][0]
    np.testing.assert_allclose(rebuilt[new_row], good, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "damage", ["index not json", "index of the wrong shape", "features truncated", "features garbage", "masks missing"]
)
def test_a_damaged_cache_is_rebuilt(synthetic_small, runs, tmp_path, capsys, caplog, damage):
    folder = _folder(synthetic_small, tmp_path)
    caption = webvid_captions(synthetic_small)[0]["caption"]
    argv = ["--checkpoint", str(runs["s1"]), "--videos", str(folder), "--query", caption, "--topk", "6"]
    expected = _cli_json(argv, capsys)
    directory = _cache_dir(folder)
    features = directory / "features.npy"
    if damage == "index not json":
        (directory / "index.json").write_text('{"videos": {"video0.mp4": [0, "x"')
    elif damage == "index of the wrong shape":
        (directory / "index.json").write_text('{"videos": {"video0.mp4": "row 0"}}')
    elif damage == "features truncated":
        features.write_bytes(features.read_bytes()[: features.stat().st_size // 2])
    elif damage == "features garbage":
        features.write_bytes(os.urandom(4096))
    else:
        (directory / "masks.npy").unlink()
    with caplog.at_level(logging.WARNING):
        assert _cli_json(argv, capsys) == expected
    assert f"visual feature cache {directory} is damaged" in caplog.text and "rebuilding it" in caplog.text
    assert _cli_json(argv, capsys) == expected  # and the rebuilt cache is used as it is


@pytest.mark.parametrize("damage", ["truncated", "garbage bytes", "nan tensor", "no matching names"])
def test_damaged_weights_are_one_error_line_naming_the_file(synthetic_small, runs, tmp_path, capsys, damage):
    folder = _folder(synthetic_small, tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(runs["s1"] / "config.json", run / "config.json")
    step = run / "ckpt" / "step-1"
    shutil.copytree(step_dirs(runs["s1"])[-1], step)
    weights = step / "model.safetensors"
    state = safetensors.torch.load_file(weights)
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage bytes":
        weights.write_bytes(os.urandom(4096))
    elif damage == "nan tensor":
        name = "encoder.clip.visual.proj"
        safetensors.torch.save_file({**state, name: torch.full_like(state[name], float("nan"))}, weights)
    else:
        safetensors.torch.save_file({f"other/{k}": v for k, v in state.items()}, weights)
    argv = ["--checkpoint", str(run), "--videos", str(folder), "--query", "a red circle"]
    assert search.main(argv) == search.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(weights) in err[-1], err
    expected = {"nan tensor": "NaN or infinite", "no matching names": "none of its"}.get(damage, "truncated or corrupt")
    assert expected in err[-1], err
