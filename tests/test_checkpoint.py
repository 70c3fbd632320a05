"""Checkpoints: exact resume, atomic layout, disk-full handling, and --init_model weight loading."""

import ast
import errno
import os
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

import engine.checkpoint as ckpt
from dataloaders.errors import CheckpointError
from engine.optim import BertAdam

REPO = Path(__file__).resolve().parents[1]
DEAD_PID = 2**22 + 17  # above Linux's largest pid_max: never a live process


class Net(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Dropout(0.3))
        self.out = nn.Linear(4, 6, bias=False)
        self.register_buffer("counter", torch.zeros(1))
        if tied:
            self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.emb(ids)))


def train_steps(model: Net, optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    """Steps whose data order and dropout depend on python, numpy and torch RNGs; returns the draws seen."""
    draws = []
    for _ in range(steps):
        draws += [random.random(), float(np.random.rand())]
        ids = torch.randint(0, 6, (5, 3))
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(1).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        model.counter += 1
    return draws


def make_run(seed: int = 0) -> tuple[Net, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_resume_gives_identical_next_steps(tmp_path: Path) -> None:
    seed_all(0)
    model, optimizer, scheduler = make_run()
    train_steps(model, optimizer, scheduler, 3)
    path = ckpt.save_checkpoint(tmp_path, 3, model, optimizer, scheduler, extra={"train_state": {"step": 3, "pos": 7}})
    draws = train_steps(model, optimizer, scheduler, 3)

    seed_all(123)
    resumed, resumed_opt, resumed_sched = make_run(seed=99)
    extra = ckpt.load_checkpoint(path, resumed, resumed_opt, resumed_sched)
    assert extra == {"train_state": {"step": 3, "pos": 7}}
    assert resumed.counter.item() == 3.0
    assert train_steps(resumed, resumed_opt, resumed_sched, 3) == draws
    for (name, p), q in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert resumed_sched.get_last_lr() == scheduler.get_last_lr()


def test_bertadam_state_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = BertAdam(model.parameters(), lr=1e-2, warmup=0.1, t_total=10)
    train_steps(model, optimizer, None, 2)
    ckpt.save_checkpoint(tmp_path, 2, model, optimizer)
    train_steps(model, optimizer, None, 2)
    resumed = Net()
    resumed_opt = BertAdam(resumed.parameters(), lr=1e-2, warmup=0.1, t_total=10)
    ckpt.load_checkpoint(tmp_path, resumed, resumed_opt)  # an output dir resolves to its newest checkpoint
    train_steps(resumed, resumed_opt, None, 2)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_layout_latest_and_pruning(tmp_path: Path) -> None:
    model, optimizer, scheduler = make_run()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, scheduler, keep=2)
    root = tmp_path / "ckpt"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-3"]
    assert (root / "latest").read_text().strip() == "step-3"
    assert sorted(p.name for p in (root / "step-3").iterdir()) == ["COMPLETE", "model.safetensors", "state.pt"]
    torch.load(root / "step-3" / "state.pt", weights_only=True)
    assert ckpt.find_latest(tmp_path) == root / "step-3"
    ckpt.save_checkpoint(tmp_path, 3, model, optimizer, scheduler, keep=2)  # re-saving a step replaces it
    assert ckpt.find_latest(tmp_path) == root / "step-3"


def test_find_latest_ignores_and_cleans_torn_temp_dirs(tmp_path: Path) -> None:
    model, optimizer, _ = make_run()
    assert ckpt.find_latest(tmp_path) is None
    ckpt.save_checkpoint(tmp_path, 5, model, optimizer)
    root = tmp_path / "ckpt"
    torn = root / f".tmp-step-9-{DEAD_PID}"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    live = root / f".tmp-step-8-{os.getpid()}"
    live.mkdir()
    incomplete = root / "step-7"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"x")
    assert ckpt.find_latest(tmp_path) == root / "step-5"
    assert not torn.exists() and live.exists()


class SimulatedKill(BaseException):
    """Raised by the save hook: like SIGKILL, it bypasses every ``except Exception`` clean-up."""


def weights_marker(model: nn.Module) -> float:
    return float(model.body[0].weight.detach().sum())


@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "same-step-resaved"])
@pytest.mark.parametrize("point", ckpt.SAVE_POINTS)
def test_a_kill_at_any_point_of_a_save_leaves_a_complete_newest_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, resave: bool
) -> None:
    """Kill the save of step 4 (a re-save of step 4 with other weights, or the first save of step 4 after step 2)
    at each point of the sequence: find_latest (and a resume) gets a complete checkpoint holding either the old or
    the new weights of the right step, and once the new copy is complete it is the one found."""
    torch.manual_seed(0)
    model = Net()
    ckpt.save_checkpoint(tmp_path, 2, model, extra={"tag": "two"})
    if resave:
        ckpt.save_checkpoint(tmp_path, 4, model, extra={"tag": "old"})
    old_sum = weights_marker(model)
    with torch.no_grad():
        model.body[0].weight.add_(1.0)
    new_sum = weights_marker(model)

    def hook(at: str) -> None:
        if at == point:
            raise SimulatedKill(at)

    monkeypatch.setattr(ckpt, "_save_hook", hook)
    with pytest.raises(SimulatedKill):
        ckpt.save_checkpoint(tmp_path, 4, model, extra={"tag": "new"})
    monkeypatch.undo()

    new_complete = ckpt.SAVE_POINTS.index(point) >= ckpt.SAVE_POINTS.index("marker_written")
    for clean in (False, True):
        latest = ckpt.find_latest(tmp_path, clean=clean)
        fresh = Net()
        extra = ckpt.load_checkpoint(latest, fresh)
        state = torch.load(latest / ckpt.STATE_FILENAME, weights_only=True)
        assert ckpt.checkpoint_step(latest) == state["step"]
        if new_complete:
            assert (state["step"], extra, weights_marker(fresh)) == (4, {"tag": "new"}, pytest.approx(new_sum))
        elif resave:
            assert (state["step"], extra, weights_marker(fresh)) == (4, {"tag": "old"}, pytest.approx(old_sum))
        else:
            assert (state["step"], extra, weights_marker(fresh)) == (2, {"tag": "two"}, pytest.approx(old_sum))

    # the next save cleans up what the killed one left behind
    final = ckpt.save_checkpoint(tmp_path, 6, model, keep=2)
    kept = ckpt._step_dirs(tmp_path / "ckpt")
    assert [step for step, _ in kept] == [4 if new_complete or resave else 2, 6] and kept[-1][1] == final
    assert not any(p.name.startswith(ckpt.OLD_PREFIX) for p in (tmp_path / "ckpt").iterdir())


def test_a_complete_temp_copy_of_a_dead_process_is_found_not_deleted(tmp_path: Path) -> None:
    """A save killed between its two renames, by a process that is gone: the new copy sits in a temp directory of a
    dead pid next to the old copy; find_latest with clean (the resume path) returns the new one and deletes only the
    superseded old copy."""
    torch.manual_seed(0)
    model = Net()
    root = tmp_path / "ckpt"
    ckpt.save_checkpoint(tmp_path, 3, model, extra={"copy": "old"})
    os.replace(root / "step-3", root / f"{ckpt.OLD_PREFIX}3-{DEAD_PID}-ab12")
    ckpt.save_checkpoint(tmp_path, 3, model, extra={"copy": "new"})
    os.replace(root / "step-3", root / f"{ckpt.TMP_PREFIX}3-{DEAD_PID}-cd34")
    latest = ckpt.find_latest(tmp_path)
    assert latest == root / f"{ckpt.TMP_PREFIX}3-{DEAD_PID}-cd34"
    assert ckpt.load_checkpoint(latest, Net()) == {"copy": "new"}
    assert sorted(p.name for p in root.iterdir()) == [f"{ckpt.TMP_PREFIX}3-{DEAD_PID}-cd34", "latest"]
    ckpt.save_checkpoint(tmp_path, 5, model, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-5"]


def test_disk_full_raises_and_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, scheduler = make_run()
    good = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    before = (good / "model.safetensors").read_bytes()
    real_save = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(ckpt.safetensors.torch, "save_file", full_disk)
    with torch.no_grad():
        model.body[0].weight.add_(1.0)
    with pytest.raises(CheckpointError, match=r"disk is full.*step-1"):
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer, scheduler)
    root = tmp_path / "ckpt"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1"]
    assert (root / "latest").read_text().strip() == "step-1"
    assert (good / "model.safetensors").read_bytes() == before
    monkeypatch.setattr(ckpt.safetensors.torch, "save_file", real_save)
    assert ckpt.save_checkpoint(tmp_path, 2, model, optimizer, scheduler) == root / "step-2"


STORAGE_FULL = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)
WRITE_FAILURES = {  # what each library raises when the disk fills up under it
    "safetensors OSError": ("safetensors", OSError(errno.ENOSPC, "No space left on device"), "disk is full"),
    "safetensors SafetensorError": ("safetensors", SafetensorError(STORAGE_FULL), "disk is full"),
    "torch.save RuntimeError": (
        "torch",
        RuntimeError("[enforce fail at inline_container.cc:603] .\nPytorchStreamWriter failed writing file data/0"),
        "writable",
    ),
}


@pytest.mark.parametrize("case", sorted(WRITE_FAILURES))
def test_write_failures_of_either_library_are_checkpoint_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    writer, exc, advice = WRITE_FAILURES[case]
    model, optimizer, _ = make_run()
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer)

    def fail(obj, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise exc

    if writer == "safetensors":
        monkeypatch.setattr(ckpt.safetensors.torch, "save_file", fail)
    else:
        monkeypatch.setattr(ckpt.torch, "save", fail)
    with pytest.raises(CheckpointError) as info:
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer)
    message = str(info.value)
    assert "\n" not in message and advice in message and "free disk space" in message
    assert f"cannot write checkpoint {tmp_path / 'ckpt' / 'step-2'}" in message and message.endswith("step-1")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step-1"]  # the temp dir is gone
    monkeypatch.undo()
    assert ckpt.find_latest(tmp_path) == tmp_path / "ckpt" / "step-1"


def test_extra_must_be_loadable_with_weights_only(tmp_path: Path) -> None:
    model, optimizer, _ = make_run()
    with pytest.raises(TypeError, match=r"state\.extra\.when"):
        ckpt.save_checkpoint(tmp_path, 1, model, optimizer, extra={"when": object()})


def test_tied_weights_are_stored_once_and_load_strictly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net(tied=True)
    path = ckpt.save_checkpoint(tmp_path, 1, model)
    stored = safetensors.torch.load_file(path / "model.safetensors")
    assert ("emb.weight" in stored) != ("out.weight" in stored)
    fresh = Net(tied=True)
    report = ckpt.load_weights(path, fresh, strict=True)
    assert report.missing == [] and report.unexpected == []
    torch.testing.assert_close(fresh.out.weight, model.emb.weight)
    untied = Net()  # the stored aliases fill the second name
    assert ckpt.load_weights(path, untied, strict=True).missing == []
    torch.testing.assert_close(untied.out.weight, model.emb.weight)


def test_load_weights_reports_missing_and_unexpected(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Net()
    state = {f"module.{k}": v for k, v in source.state_dict().items() if not k.startswith("out.")}
    state["module.extra.weight"] = torch.zeros(2)
    file = tmp_path / "pytorch_model.bin"
    torch.save({"model_state_dict": state, "global_step": 5}, file)
    target = Net()
    report = ckpt.load_weights(file, target)
    assert report.missing == ["out.weight"]
    assert report.unexpected == ["extra.weight"]
    torch.testing.assert_close(target.body[0].weight, source.body[0].weight)
    with pytest.raises(CheckpointError, match="missing out.weight"):
        ckpt.load_weights(file, Net(), strict=True)


def test_load_weights_key_map_and_formats(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Net()
    published = {f"clip.{k}": v for k, v in source.state_dict().items()}
    safetensors.torch.save_file(published, tmp_path / "w.safetensors")
    torch.save({"state_dict": published}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        target = Net()
        report = ckpt.load_weights(
            tmp_path / name, target, key_map=lambda sd: {k.removeprefix("clip."): v for k, v in sd.items()}
        )
        assert report.missing == [] and report.unexpected == [] and report.loaded == len(published)
        torch.testing.assert_close(target.emb.weight, source.emb.weight)


def test_wrong_shapes_raise_and_load_nothing(tmp_path: Path) -> None:
    state = Net().state_dict()
    state["body.0.weight"] = torch.zeros(4, 5)
    state["emb.weight"] = torch.ones(6, 4)
    file = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(state, file)
    target = Net()
    before = target.emb.weight.clone()
    with pytest.raises(CheckpointError, match=r"body\.0\.weight: checkpoint \(4, 5\) vs model \(4, 4\)"):
        ckpt.load_weights(file, target)
    torch.testing.assert_close(target.emb.weight, before)


def test_pickled_objects_are_dropped_and_weights_load(tmp_path: Path) -> None:
    file = tmp_path / "evil.bin"
    source = Net()
    torch.save({"state_dict": source.state_dict(), "obj": Path("x")}, file)  # a training checkpoint's config object
    target = Net()
    report = ckpt.load_weights(file, target, strict=True)  # the object is dropped unexecuted (MCQ-CLIP files)
    assert report.loaded == len(source.state_dict()) and not report.missing and not report.unexpected
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.bin: cannot read the file with torch.load.weights_only=True"):
        ckpt.load_weights(tmp_path / "garbage.bin", Net())
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_weights(tmp_path / "nope.bin", Net())


def unsafe_calls(source: str) -> list[int]:
    """Line numbers of ``pickle.load(s)(...)`` calls and of ``weights_only=False`` arguments."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if func.value.id == "pickle" and func.attr in ("load", "loads"):
                lines.append(node.lineno)
        for keyword in node.keywords:
            if keyword.arg == "weights_only" and isinstance(keyword.value, ast.Constant) and not keyword.value.value:
                lines.append(node.lineno)
    return lines


def test_no_unrestricted_unpickling_in_the_code() -> None:
    assert unsafe_calls("import pickle, torch\npickle.load(f)\ntorch.load(p, weights_only=False)\n") == [2, 3]
    offenders = [
        f"{path.relative_to(REPO)}:{line}"
        for path in REPO.rglob("*.py")
        if ".venv" not in path.parts
        for line in unsafe_calls(path.read_text(errors="replace"))
    ]
    assert offenders == []


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_loads_through_jit(tmp_path: Path) -> None:
    source = nn.Linear(3, 2)
    torch.jit.save(torch.jit.script(source), tmp_path / "scripted.pt")
    target = nn.Linear(3, 2)
    assert ckpt.load_weights(tmp_path / "scripted.pt", target, strict=True).loaded == 2
    torch.testing.assert_close(target.weight, source.weight)
