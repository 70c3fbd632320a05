"""Distributed helpers: single-process behaviour, and 2 gloo ranks against one process with the global batch."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from dataloaders.errors import ConfigError
from engine import distributed
from tests import dist_worker_ops as worker

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run the worker on 2 CPU ranks once; the per-rank results."""
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(worker.run, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process_reference() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = worker.make_model()
    text, video = worker.global_batch()
    return worker.gathered_step(model, text, video, reduce_grad=True)


def test_gathered_infonce_equals_single_process(two_ranks: list[dict]) -> None:
    loss, grads = single_process_reference()
    for result in two_ranks:
        torch.testing.assert_close(result["loss_True"], loss)
        assert result["grads_True"].keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(result["grads_True"][name], g, msg=name)


def test_published_allgather_gives_grad_over_world_size(two_ranks: list[dict]) -> None:
    loss, grads = single_process_reference()
    for result in two_ranks:
        torch.testing.assert_close(result["loss_False"], loss)
        for name, g in grads.items():
            torch.testing.assert_close(result["grads_False"][name], g / WORLD, msg=name)


def test_object_collectives_and_mean(two_ranks: list[dict]) -> None:
    for rank, result in enumerate(two_ranks):
        assert result["info"] == [rank, rank, WORLD, "cpu"]
        assert result["objects"] == [{"rank": 0, "text": "xx"}, {"rank": 1, "text": "xxx"}]
        assert result["broadcast"] == {"from": 1}
        torch.testing.assert_close(result["mean"], torch.tensor([1.5]))


def test_sharded_rows_reassemble_in_order(two_ranks: list[dict]) -> None:
    assert [r["shard_7"] for r in two_ranks] == [[0, 1, 2, 3], [4, 5, 6]]
    assert [r["shard_1"] for r in two_ranks] == [[0], []]
    for n in (worker.EVAL_ROWS, 1):
        expected = torch.stack([torch.arange(3.0) + 10 * i for i in range(n)])
        for result in two_ranks:
            torch.testing.assert_close(result[f"rows_{n}"], expected)


def test_checkpoint_on_two_ranks_restores_each_ranks_rng(two_ranks: list[dict]) -> None:
    for result in two_ranks:
        assert result["extra"] == {"rank": 0}  # rank 0 wrote
        torch.testing.assert_close(result["draw_after_load"], result["draw_after_save"], rtol=0, atol=0)
    assert not torch.equal(two_ranks[0]["draw_after_save"], two_ranks[1]["draw_after_save"])


@pytest.mark.parametrize("n,world", [(0, 3), (5, 1), (10, 3), (2, 4), (1000, 7)])
def test_shard_indices_cover_everything_once(n: int, world: int) -> None:
    shards = [distributed.shard_indices(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_single_process_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size) == (0, 1) and not distributed.is_initialized()
    assert distributed.is_main() and distributed.get_world_size() == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x
    assert distributed.all_gather_object({"a": [1]}) == [{"a": [1]}]
    assert distributed.broadcast_object("s") == "s"
    torch.testing.assert_close(distributed.all_reduce_mean(x), x.detach())
    distributed.barrier()
    rows = torch.tensor([[2.0], [0.0], [1.0]])
    torch.testing.assert_close(distributed.gather_eval_rows(rows, [2, 0, 1], 3), torch.tensor([[0.0], [1.0], [2.0]]))
    with pytest.raises(ValueError, match="exactly once"):
        distributed.gather_eval_rows(rows, [0, 0, 1], 3)
    with pytest.raises(ValueError, match="outside"):
        distributed.shard_indices(4, 2, 2)


def test_incomplete_torchrun_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="RANK, LOCAL_RANK"):
        distributed.init_distributed()


def test_video_set_encoding_stops_every_rank_or_flags_the_unreadable_video(two_ranks: list[dict]) -> None:
    expected = torch.arange(float(worker.TOY_VIDEOS)).reshape(-1, 1, 1).expand(-1, 2, 3).clone()
    expected[worker.BAD_VIDEO] = 0
    for result in two_ranks:
        assert (
            result["encode_error"] == f"toy videos stopped on rank 1: video {worker.BAD_VIDEO} is unreadable (a hint)"
        )
        torch.testing.assert_close(result["encode_feats"], expected)
        assert result["encode_ok"].tolist() == [1, 1, 1, 1, 0]
        assert result["encode_masks"].tolist() == [[1, 1]] * 4 + [[0, 0]]
