"""Retrieval metrics against plain Python loops (ties, several captions per video: the group and caption video->text
protocols, CLIP4Clip's multi_sentence code re-derived) and the chunked similarity."""

import numpy as np
import pytest
import torch

from engine.metrics import (
    caption_groups,
    chunked_similarity,
    format_metrics_table,
    group_scores,
    retrieval_metrics,
)


def loop_metrics(entries: list[list[int]], prefix: str) -> dict[str, float]:
    """Statistics over a flat list of 0-based ranks (one list of entries per query)."""
    ranks = [r for per_query in entries for r in per_query]
    out = {f"{prefix}_R{k}": 100.0 * sum(r < k for r in ranks) / len(ranks) for k in (1, 5, 10)}
    out[f"{prefix}_MdR"] = float(np.median(ranks)) + 1.0
    out[f"{prefix}_MnR"] = sum(ranks) / len(ranks) + 1.0
    return out


def loop_entries(scores: list[float], truth: float, others_equal: int, ties: str) -> list[int]:
    """Optimistic: one rank = #strictly higher. clip4clip: one entry per tied position."""
    higher = sum(s > truth for s in scores)
    return [higher] if ties == "optimistic" else list(range(higher, higher + others_equal + 1))


def reference(sim: np.ndarray, owner: list[int], ties: str, v2t_protocol: str = "group") -> dict[str, float]:
    n_text, n_video = sim.shape
    t2v = []
    for i in range(n_text):
        truth = sim[i, owner[i]]
        equal = sum(sim[i, j] == truth for j in range(n_video) if j != owner[i])
        t2v.append(loop_entries(list(sim[i]), truth, equal, ties))
    v2t = []
    for j in range(n_video):
        captions = [i for i in range(n_text) if owner[i] == j]
        best = max(sim[i, j] for i in captions)
        if v2t_protocol == "caption":
            scores = [sim[i, j] for i in range(n_text)]
            equal = sum(sim[i, j] == best for i in range(n_text) if owner[i] != j)
        else:
            scores = [max(sim[i, j] for i in range(n_text) if owner[i] == g) for g in range(n_video)]
            equal = sum(scores[g] == best for g in range(n_video) if g != j)
        v2t.append(loop_entries(scores, best, equal, ties))
    return {**loop_metrics(t2v, "t2v"), **loop_metrics(v2t, "v2t")}


def clip4clip_compute_metrics(x: np.ndarray) -> dict[str, float]:
    """CLIP4Clip's sort-based rule, re-derived: positions where the sorted row equals the diagonal value."""
    sx = np.sort(-x, axis=1)
    d = np.diag(-x)[:, None]
    ind = np.where(sx - d == 0)[1]
    return {"R1": 100.0 * np.sum(ind == 0) / len(ind), "R5": 100.0 * np.sum(ind < 5) / len(ind),
            "R10": 100.0 * np.sum(ind < 10) / len(ind), "MdR": np.median(ind) + 1, "MnR": np.mean(ind) + 1}  # fmt: skip


def assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("ties", ["optimistic", "clip4clip"])
def test_square_with_ties_matches_loop(ties: str) -> None:
    rng = np.random.default_rng(0)
    sim = rng.integers(0, 4, size=(23, 23)).astype(np.float64)  # few distinct values: many ties
    got = retrieval_metrics(sim, ties=ties)
    assert_same(got, reference(sim, list(range(23)), ties))


def test_clip4clip_rule_equals_published_sort_logic() -> None:
    rng = np.random.default_rng(1)
    sim = rng.integers(0, 3, size=(15, 15)).astype(np.float32)
    got = retrieval_metrics(sim, ties="clip4clip")
    for direction, matrix in (("t2v", sim), ("v2t", sim.T)):
        published = clip4clip_compute_metrics(matrix)
        for name, value in published.items():
            assert got[f"{direction}_{name}"] == pytest.approx(value)


def test_optimistic_tie_rank_hand_example() -> None:
    sim = torch.tensor([[1.0, 1.0, 2.0], [0.0, 5.0, 0.0], [3.0, 3.0, 3.0]])
    got = retrieval_metrics(sim)
    # t2v ranks: row0 truth 1.0 has one higher (2.0) -> 1; row1 -> 0; row2 all tied -> 0.
    assert got["t2v_R1"] == pytest.approx(200.0 / 3)
    assert got["t2v_MnR"] == pytest.approx(1 + 1 / 3)
    expanded = retrieval_metrics(sim, ties="clip4clip")
    # row0 ties with col0 -> entries {1, 2}; row1 -> {0}; row2 -> {0, 1, 2}: 6 entries, two at rank 0.
    assert expanded["t2v_R1"] == pytest.approx(100.0 * 2 / 6)
    assert expanded["t2v_MnR"] == pytest.approx(1 + (1 + 2 + 0 + 0 + 1 + 2) / 6)


@pytest.mark.parametrize("v2t_protocol", ["caption", "group"])
@pytest.mark.parametrize("ties", ["optimistic", "clip4clip"])
def test_multi_caption_matches_loop(ties: str, v2t_protocol: str) -> None:
    rng = np.random.default_rng(2)
    n_video = 9
    owner = [v for v in range(n_video) for _ in range(int(rng.integers(1, 5)))]
    rng.shuffle(owner)
    sim = rng.integers(0, 6, size=(len(owner), n_video)).astype(np.float64)
    got = retrieval_metrics(sim, owner, ties=ties, v2t_protocol=v2t_protocol)
    assert_same(got, reference(sim, owner, ties, v2t_protocol))


# 3 videos with 1 / 2 / 3 captions: caption 0 -> video 0, captions 1-2 -> video 1, captions 3-5 -> video 2.
HAND_OWNER = [0, 1, 1, 2, 2, 2]
HAND_SIM = torch.tensor(
    [
        [0.50, 0.10, 0.20],
        [0.60, 0.80, 0.50],
        [0.70, 0.20, 0.96],
        [0.52, 0.90, 0.30],
        [0.55, 0.85, 0.95],
        [0.51, 0.00, 0.10],
    ]
)


def test_hand_built_multi_caption_case_gives_each_protocol_its_known_ranks() -> None:
    """Video 0's own caption (0.50) is beaten by all 5 other captions, which form 2 groups: caption rank 5, group
    rank 2. Video 1's best caption (0.80) is beaten by captions 3 and 4 (one group): ranks 2 / 1. Video 2's best
    (0.95) is beaten by caption 2 (group 1): ranks 1 / 1. (R@1 never differs: a video's group ranks first exactly
    when its best caption does.) Text->video is the same under both: caption ranks 0, 0, 2, 2, 0, 1."""
    caption = retrieval_metrics(HAND_SIM, HAND_OWNER, v2t_protocol="caption")
    group = retrieval_metrics(HAND_SIM, HAND_OWNER, v2t_protocol="group")
    assert retrieval_metrics(HAND_SIM, HAND_OWNER) == group  # group is the default
    want_caption = {"v2t_R1": 0.0, "v2t_R5": 200.0 / 3, "v2t_R10": 100.0, "v2t_MdR": 3.0, "v2t_MnR": 8 / 3 + 1}
    want_group = {"v2t_R1": 0.0, "v2t_R5": 100.0, "v2t_R10": 100.0, "v2t_MdR": 2.0, "v2t_MnR": 4 / 3 + 1}
    want_t2v = {"t2v_R1": 50.0, "t2v_R5": 100.0, "t2v_R10": 100.0, "t2v_MdR": 1.5, "t2v_MnR": 5 / 6 + 1}
    assert_same(caption, {**want_caption, **want_t2v})
    assert_same(group, {**want_group, **want_t2v})


def test_group_scores_and_caption_groups_hand_case() -> None:
    scores = group_scores(HAND_SIM.double(), torch.tensor(HAND_OWNER))
    want = [[0.50, 0.70, 0.55], [0.10, 0.80, 0.90], [0.20, 0.96, 0.95]]  # [video query, caption group]
    torch.testing.assert_close(scores, torch.tensor(want, dtype=torch.float64))
    assert caption_groups(HAND_OWNER, 3).tolist() == [[0, 0, 0], [1, 2, 1], [3, 4, 5]]
    assert caption_groups([2, 0, 1, 2, 2, 1], 3).tolist() == [[1, 1, 1], [2, 5, 2], [0, 3, 4]]
    with pytest.raises(ValueError, match="no caption"):
        caption_groups([0, 0], 2)


def clip4clip_multi_sentence_v2t(sim: np.ndarray, owner: list[int]) -> dict[str, float]:
    """CLIP4Clip's multi_sentence video->text, re-derived: regroup ``[Nt, Nv]`` per video into ``[Nv, max_caps, Nv]``
    padded with -inf, ``tensor_video_to_text_sim`` (max over the captions, then .T) and ``compute_metrics``."""
    n_video = sim.shape[1]
    groups = [[i for i in range(len(owner)) if owner[i] == v] for v in range(n_video)]
    width = max(len(g) for g in groups)
    tensor = np.full((n_video, width, n_video), -np.inf)
    for v, members in enumerate(groups):
        tensor[v, : len(members)] = sim[members]
    return clip4clip_compute_metrics(tensor.max(axis=1).T)


@pytest.mark.parametrize("seed", [4, 5])
def test_group_protocol_equals_clip4clip_multi_sentence(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_video = 11
    owner = [v for v in range(n_video) for _ in range(int(rng.integers(1, 6)))]
    rng.shuffle(owner)
    sim = rng.integers(0, 5, size=(len(owner), n_video)).astype(np.float64)  # ties included
    got = retrieval_metrics(sim, owner, ties="clip4clip", v2t_protocol="group")
    for name, value in clip4clip_multi_sentence_v2t(sim, owner).items():
        assert got[f"v2t_{name}"] == pytest.approx(value), name


@pytest.mark.parametrize("ties", ["optimistic", "clip4clip"])
def test_single_caption_sets_are_the_same_under_both_protocols(ties: str) -> None:
    rng = np.random.default_rng(6)
    sim = rng.integers(0, 4, size=(14, 14)).astype(np.float64)
    perm = rng.permutation(14).tolist()
    for owner in (None, perm):
        matrix = sim if owner is None else sim[perm]
        group = retrieval_metrics(matrix, owner, ties=ties, v2t_protocol="group")
        assert group == retrieval_metrics(matrix, owner, ties=ties, v2t_protocol="caption")
        assert_same(group, reference(sim, list(range(14)), ties))


def test_one_caption_per_video_in_shuffled_order_equals_square() -> None:
    rng = np.random.default_rng(3)
    sim = rng.normal(size=(12, 12))
    perm = rng.permutation(12)
    got = retrieval_metrics(sim[perm], text_to_video=perm.tolist())
    assert_same(got, retrieval_metrics(sim))


def test_perfect_and_worst_retrieval() -> None:
    perfect = retrieval_metrics(torch.eye(20))
    assert perfect["t2v_R1"] == perfect["v2t_R1"] == 100.0 and perfect["t2v_MdR"] == 1.0
    worst = retrieval_metrics(-torch.eye(20))
    assert worst["t2v_R10"] == 0.0 and worst["v2t_MnR"] == 20.0


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="text_to_video"):
        retrieval_metrics(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.zeros(3, 3), [0, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="v2t_protocol"):
        retrieval_metrics(torch.eye(3), v2t_protocol="videos")


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_chunked_similarity_equals_full_matrix(chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    text, video = torch.randn(13, 8, generator=gen), torch.randn(6, 8, generator=gen)
    full = 100.0 * torch.nn.functional.normalize(text, dim=-1) @ torch.nn.functional.normalize(video, dim=-1).T
    got = chunked_similarity(text, video, scale=100.0, chunk=chunk)
    assert got.shape == (13, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunked_similarity(text, video, chunk=chunk, normalize=False), text @ video.T)


def test_format_metrics_table() -> None:
    table = format_metrics_table(retrieval_metrics(torch.eye(4)))
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].startswith("t2v") and lines[2].startswith("v2t")
    assert "100.00" in lines[1] and "1.00" in lines[2]
    assert "-" in format_metrics_table({"t2v_R1": 5.0}).splitlines()[2]
