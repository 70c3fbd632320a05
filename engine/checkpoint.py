"""Checkpoints: atomic save, exact resume, and ``--init_model`` weight loading (DESIGN 4).

Layout under ``--output_dir``::

    ckpt/step-{N}/model.safetensors   weights (tied tensors stored once; their aliases in the metadata)
    ckpt/step-{N}/state.pt            optimizer, scheduler, RNG states, step, epoch, extra (sampler position ...)
    ckpt/step-{N}/COMPLETE            completion marker, written last: {"step": N, "time_ns": ...}
    ckpt/latest                       the name of the newest complete checkpoint (informational)

Save sequence (main rank): write ``ckpt/.tmp-step-{N}-{pid}-{nonce}`` (weights, state, then the marker, each
fsync'ed); if ``step-N`` already exists (a step saved twice, e.g. by ``--save_steps`` and the end of the epoch),
rename it to ``.old-step-{N}-{pid}-{nonce}``; rename the temp directory to ``step-N``; delete the old one; update
``latest``; prune. A directory counts as a checkpoint once its marker is there (``step-N`` directories written
before markers existed count when they hold both files), whatever its name, and ``find_latest`` returns the newest
complete one (highest step, then the latest marker time). So at every instant of the sequence a complete copy of
the newest checkpoint exists and is the one found: a kill between the two renames leaves the new copy in the temp
directory, which is found and loaded as it is. Only incomplete temp directories of dead processes, and complete
ones superseded by a newer copy of the same step, are ever deleted. ``state.pt`` holds only tensors, containers and
primitives and is read with ``torch.load(weights_only=True)``; nothing here ever unpickles arbitrary objects.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from dataloaders.errors import CheckpointError
from dataloaders.safe_pickle import safe_torch_load
from engine import distributed
from modules.model_config import model_config_metadata

logger = logging.getLogger(__name__)

CKPT_DIRNAME = "ckpt"
LATEST_FILENAME = "latest"
WEIGHTS_FILENAME = "model.safetensors"
STATE_FILENAME = "state.pt"
MARKER_FILENAME = "COMPLETE"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"
OLD_PREFIX = ".old-step-"
DEFAULT_KEEP = 2
FORMAT_VERSION = 1
ALIASES_METADATA_KEY = "aliases"
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
CONVERT_HINT = (
    "it may be truncated or corrupt; otherwise "
    "convert it once to safetensors in a trusted environment with the code that wrote it: "
    "safetensors.torch.save_file(checkpoint['state_dict'], 'weights.safetensors')"
)
DDP_PREFIX = "module."
MAX_LISTED_KEYS = 20
STEP_DIR_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")
TEMP_DIR_RE = re.compile(rf"^(?:{re.escape(TMP_PREFIX)}|{re.escape(OLD_PREFIX)})(\d+)-(\d+)(?:-[0-9a-f]+)?$")
SAFE_LEAVES = (torch.Tensor, str, int, float, bool, type(None))
TRAINING_ONLY_PREFIX = "stage1_aux."
"""Training-only parts of a stage-1 objective (MCQ's BridgeFormer, ...; video_text_retrieval/stage1.py). A model
without any of them (stage 2, retrieval, search) does not load them: one info line, not a missing/unexpected report."""

StateDict = dict[str, torch.Tensor]
KeyMap = Callable[[StateDict], StateDict]


@dataclass
class LoadReport:
    """Outcome of :func:`load_weights`: names the model expected but the file lacked, names the model does not
    have, and the number of tensors copied."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded: int = 0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (the model itself otherwise)."""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    return model


# ----------------------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy (legacy global), torch and every CUDA device as plain lists and numbers
    (JSON-serialisable, so ranks can exchange them with ``distributed.all_gather_object``)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state().tolist(),
        "cuda": cuda,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        ("MT19937", np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            logger.warning(
                "checkpoint has RNG states of %d CUDA devices, %d visible: restoring the common ones",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(cuda_state, dtype=torch.uint8), device=index)


def collect_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng_state`, in rank order (a collective: call on all ranks)."""
    return distributed.all_gather_object(capture_rng_state())


# ---------------------------------------------------------------------------------------------------------- save
def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.untyped_storage().data_ptr())


def _dedupe(state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, dict[str, str]]:
    """Store each tied tensor once: returns the tensors to write and ``{alias: stored name}``.

    Tensors that are the same view of one storage are aliases; tensors that only overlap another one are copied,
    since safetensors refuses shared memory.
    """
    tensors: StateDict = {}
    aliases: dict[str, str] = {}
    views: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[Any, ...]] = set()
    for name, t in state_dict.items():
        view = (*_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        shared = _storage_key(t) in storages
        storages.add(_storage_key(t))
        t = t.detach()
        tensors[name] = t.clone().cpu() if shared else t.cpu().contiguous()
    return tensors, aliases


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_weights(tensors: StateDict, path: Path, metadata: dict[str, str]) -> None:
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    _fsync(path)


def _write_state(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)
    _fsync(path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def _check_loadable(obj: Any, where: str) -> None:
    """Raise TypeError for anything ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, str | int):
                raise TypeError(f"checkpoint entry {where} has a key of type {type(key).__name__}")
            _check_loadable(value, f"{where}.{key}")
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            _check_loadable(value, f"{where}[{index}]")
    elif not isinstance(obj, SAFE_LEAVES):
        raise TypeError(
            f"checkpoint entry {where} is a {type(obj).__name__}: store only tensors, containers and primitives"
        )


@dataclass(frozen=True, order=True)
class _Candidate:
    """A complete checkpoint directory; candidates sort oldest first (step, then the time its marker was written)."""

    step: int
    written_ns: int
    path: Path = field(compare=False)
    temp_pid: int | None = field(compare=False, default=None)  # the writer's pid for a temp / old directory


def _marker_time(directory: Path, step: int) -> int | None:
    """The marker's write time (ns), or None when ``directory`` lacks the marker or it names another step."""
    try:
        marker = json.loads((directory / MARKER_FILENAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("step") != step or not isinstance(marker.get("time_ns"), int):
        return None
    return marker["time_ns"]


def _has_files(directory: Path) -> bool:
    return (directory / WEIGHTS_FILENAME).is_file() and (directory / STATE_FILENAME).is_file()


def _candidates(root: Path) -> list[_Candidate]:
    """Every complete checkpoint under ``root``, oldest first: ``step-N`` directories (with the marker, or legacy
    ones holding both files) and temp / old directories whose marker was written (a save killed between renames)."""
    found = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        step_match, temp_match = STEP_DIR_RE.match(child.name), TEMP_DIR_RE.match(child.name)
        if step_match:
            step = int(step_match.group(1))
            if _has_files(child):
                written = _marker_time(child, step)
                found.append(_Candidate(step, 0 if written is None else written, child))
        elif temp_match:
            step = int(temp_match.group(1))
            written = _marker_time(child, step)
            if written is not None and _has_files(child):
                found.append(_Candidate(step, written, child, int(temp_match.group(2))))
    return sorted(found)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, directory)``, oldest first."""
    return [(c.step, c.path) for c in _candidates(root)]


def _write_marker(directory: Path, step: int, after_ns: int) -> None:
    """The completion marker; its time is later than ``after_ns`` (the newest copy of the step) even if the clock
    went back, so the copy written last is the one found."""
    written = max(time.time_ns(), after_ns + 1)
    _write_text_atomic(directory / MARKER_FILENAME, json.dumps({"step": step, "time_ns": written}) + "\n")


def _save_hook(point: str) -> None:
    """Called at each point of the save sequence (tests replace it to simulate a kill there)."""


SAVE_POINTS = (
    "tmp_created",
    "weights_written",
    "state_written",
    "marker_written",
    "final_moved_aside",
    "tmp_renamed",
    "old_removed",
    "latest_written",
)


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    keep: int | None = DEFAULT_KEEP,
    is_main: bool | None = None,
) -> Path:
    """Write ``ckpt/step-{step}`` atomically, point ``ckpt/latest`` at it and keep the newest ``keep`` checkpoints.

    Call on **every** rank: the RNG states of all ranks are gathered, the main rank (``is_main``, default global
    rank 0) writes, and a failure is raised on every rank. ``extra`` holds the loop's own state (sampler epoch and
    position, step counters ...) made of tensors, containers and primitives. A failed write (e.g. disk full) raises
    CheckpointError and leaves the previous checkpoints untouched. Returns the checkpoint directory.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 (or None to keep all), got {keep}")
    is_main = distributed.is_main() if is_main is None else is_main
    rng_states = collect_rng_states()
    root = Path(output_dir) / CKPT_DIRNAME
    final = root / f"{STEP_PREFIX}{step}"
    error = None
    if is_main:
        try:
            _write_checkpoint(root, final, step, model, optimizer, scheduler, extra, rng_states, keep)
        except CheckpointError as exc:
            error = str(exc)
    if distributed.get_world_size() > 1:
        error = distributed.broadcast_object(error)
    if error is not None:
        raise CheckpointError(error)
    return final


def _write_checkpoint(
    root: Path,
    final: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    extra: Mapping[str, Any] | None,
    rng_states: list[dict[str, Any]],
    keep: int | None,
) -> None:
    """The main rank's part of :func:`save_checkpoint` (the sequence is described in the module docstring)."""
    suffix = f"{step}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp, old = root / f"{TMP_PREFIX}{suffix}", root / f"{OLD_PREFIX}{suffix}"
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_states,
        "extra": dict(extra or {}),
    }
    _check_loadable(state, "state")
    tensors, aliases = _dedupe(unwrap_model(model).state_dict())
    previous = _candidates(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        _save_hook("tmp_created")
        metadata = {ALIASES_METADATA_KEY: json.dumps(aliases), **model_config_metadata(unwrap_model(model))}
        _write_weights(tensors, tmp / WEIGHTS_FILENAME, metadata)
        _save_hook("weights_written")
        _write_state(state, tmp / STATE_FILENAME)
        _save_hook("state_written")
        _write_marker(tmp, step, max((c.written_ns for c in previous if c.step == step), default=0))
        _fsync(tmp)
        _save_hook("marker_written")
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save and safetensors wrap I/O errors in these
        shutil.rmtree(tmp, ignore_errors=True)
        kept = previous[-1].path if previous else "none"
        raise CheckpointError(
            f"cannot write checkpoint {final}: {_write_failure(exc, root)}. Previous checkpoint kept: {kept}"
        ) from exc
    try:
        # From here on a complete copy of this step always exists: tmp, then tmp + old, then final (+ old).
        if final.exists():
            os.replace(final, old)
        _save_hook("final_moved_aside")
        os.replace(tmp, final)
        _fsync(root)
        _save_hook("tmp_renamed")
        if old.exists():
            (old / MARKER_FILENAME).unlink(missing_ok=True)  # unmarked first, so a half-deleted copy is never used
            shutil.rmtree(old, ignore_errors=True)
        _save_hook("old_removed")
        _write_text_atomic(root / LATEST_FILENAME, final.name + "\n")
        _save_hook("latest_written")
    except OSError as exc:
        newest = _candidates(root)
        raise CheckpointError(
            f"cannot move checkpoint {tmp} into place as {final}: {_write_failure(exc, root)}. "
            f"Newest complete checkpoint: {newest[-1].path if newest else 'none'}"
        ) from exc
    _prune(root, final, keep)
    logger.info("saved checkpoint %s", final)


def _write_failure(exc: BaseException, root: Path) -> str:
    """What went wrong writing under ``root`` and what to do, for an OSError or a library's wrapped I/O error."""
    text = _one_line(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "StorageFull" in text:
        return f"{text}; the disk is full: free disk space under {root} (or point --output_dir elsewhere)"
    return f"{text}; check that {root} is writable and has free disk space"


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (torch and safetensors messages span several)."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _prune(root: Path, final: Path, keep: int | None) -> None:
    """Delete older copies of a step saved twice and, with ``keep``, all but the newest ``keep`` steps (never
    ``final``, never a directory another live process is writing)."""
    newest: dict[int, _Candidate] = {}
    doomed = []
    for candidate in _candidates(root):  # oldest first: a later copy of a step supersedes the earlier one
        if candidate.step in newest:
            doomed.append(newest[candidate.step])
        newest[candidate.step] = candidate
    steps = sorted(newest)
    if keep is not None:
        doomed += [newest[step] for step in steps[: max(len(steps) - keep, 0)]]
    for candidate in doomed:
        live_writer = (
            candidate.temp_pid is not None and candidate.temp_pid != os.getpid() and _pid_alive(candidate.temp_pid)
        )
        if candidate.path != final and not live_writer:
            (candidate.path / MARKER_FILENAME).unlink(missing_ok=True)
            shutil.rmtree(candidate.path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- find and load
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_latest(output_dir: str | os.PathLike[str], clean: bool = True) -> Path | None:
    """The newest complete checkpoint under ``output_dir/ckpt`` (highest step, then the newest copy of it), or None.

    Usually ``ckpt/step-N``; after a save killed between its two renames, the complete temp directory holding the new
    copy. Incomplete temp directories are never returned; with ``clean`` those left by processes that no longer run
    are removed, and so are complete ones that a newer copy of the same step supersedes. The newest complete
    checkpoint is never deleted or moved here, so ranks that call this concurrently all get the same answer.
    """
    root = Path(output_dir) / CKPT_DIRNAME
    if not root.is_dir():
        return None
    found = _candidates(root)
    if clean:
        kept = {c.path for c in found}
        newest_of_step = {c.step: c.path for c in found}  # oldest first: the last copy of each step wins
        for child in root.iterdir():
            match = TEMP_DIR_RE.match(child.name)
            if not match or int(match.group(2)) == os.getpid() or _pid_alive(int(match.group(2))):
                continue
            if child not in kept:
                logger.warning("removing the torn checkpoint directory %s of an interrupted save", child)
            elif newest_of_step[int(match.group(1))] != child:
                logger.warning("removing %s: a newer copy of step %s exists", child, match.group(1))
            else:
                continue
            (child / MARKER_FILENAME).unlink(missing_ok=True)
            shutil.rmtree(child, ignore_errors=True)
        found = [c for c in found if c.path.exists()]
    if not found:
        return None
    latest = found[-1].path
    latest_file = root / LATEST_FILENAME
    if latest_file.is_file() and latest_file.read_text().strip() != latest.name:
        logger.warning("%s names %s but %s is newer: using it", latest_file, latest_file.read_text().strip(), latest)
    return latest


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step of a checkpoint directory found by :func:`find_latest` (``step-N``, or a complete temp copy)."""
    name = Path(path).name
    match = STEP_DIR_RE.match(name) or TEMP_DIR_RE.match(name)
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (step-N): pass one written by this code")
    return int(match.group(1))


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _read_weights(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw mapping stored in ``path`` and the tied-name aliases recorded with it."""
    if path.is_dir():
        path = path / WEIGHTS_FILENAME
        if not path.is_file():
            raise CheckpointError(f"{path.parent} holds no {WEIGHTS_FILENAME}: pass a checkpoint directory or file")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: check the path given to --init_model / --resume")
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as handle:
                aliases = json.loads((handle.metadata() or {}).get(ALIASES_METADATA_KEY, "{}"))
            return safetensors.torch.load_file(path), aliases
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({_one_line(exc)}): it is truncated or corrupt; "
                "re-create or re-download it"
            ) from exc
    if _is_torchscript(path):
        try:
            return torch.jit.load(path, map_location="cpu").state_dict(), {}
        except Exception as exc:  # the TorchScript reader raises RuntimeError for unknown globals and bad archives
            raise CheckpointError(
                f"{path} is not a readable TorchScript archive ({_one_line(exc)}): re-export it, or save the weights "
                "as a plain state dict (tensors only) or as safetensors"
            ) from exc
    # weights only; pickled Python objects beside the tensors (a training checkpoint's config) are dropped unexecuted
    return safe_torch_load(path, CONVERT_HINT)[0], {}


def _as_state_dict(raw: Any, path: Path) -> tuple[StateDict, list[str]]:
    """Unwrap ``{'state_dict'|'model_state_dict'|'model': ...}`` containers and a DDP ``module.`` prefix.

    Returns the tensors and the names of non-tensor entries (reported as unexpected).
    """
    while isinstance(raw, Mapping):
        inner = next((raw[k] for k in WRAPPER_KEYS if isinstance(raw.get(k), Mapping)), None)
        if inner is None:
            break
        raw = inner
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a state dict: pass a weights file")
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    others = sorted(str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor))
    if tensors and all(k.startswith(DDP_PREFIX) for k in tensors):
        tensors = {k[len(DDP_PREFIX) :]: v for k, v in tensors.items()}
    return tensors, others


def _model_aliases(model: nn.Module) -> dict[str, list[str]]:
    """For each state-dict name of ``model``, the other names that are the same tensor (tied weights)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, t in model.state_dict().items():
        view = (*_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride())
        groups.setdefault(view, []).append(name)
    return {name: [other for other in names if other != name] for names in groups.values() for name in names}


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED_KEYS])
    return shown + (f" ... ({len(names) - MAX_LISTED_KEYS} more)" if len(names) > MAX_LISTED_KEYS else "")


def check_finite(tensors: Mapping[str, torch.Tensor], source: str | os.PathLike[str]) -> None:
    """CheckpointError naming ``source`` and the tensors holding NaN or infinite values (floating tensors only)."""
    bad = [
        f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
        for name, t in tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} tensors hold NaN or infinite values: {_listing(bad)}. These weights come from a "
            "diverged or damaged run: use an earlier checkpoint"
        )


def load_weights(
    path: str | os.PathLike[str],
    model: nn.Module,
    key_map: KeyMap | None = None,
    strict: bool = False,
) -> LoadReport:
    """Load weights only (``--init_model``) from safetensors, a checkpoint directory, or a ``.bin``/``.pt`` state dict
    (``torch.load(weights_only=True)``; ``state_dict``/``model_state_dict``/``model`` wrappers are unwrapped;
    TorchScript archives go through ``torch.jit.load``).

    ``key_map`` renames the loaded state dict first (e.g. from the published layout). Tensors whose shape differs
    from the model's raise CheckpointError listing them; nothing is loaded in that case. Missing and unexpected
    names are logged and returned, and raise CheckpointError when ``strict``.
    """
    path = Path(path)
    if path.is_dir() and (path / WEIGHTS_FILENAME).is_file():
        path = path / WEIGHTS_FILENAME  # messages name the file
    raw, saved_aliases = _read_weights(path)
    loaded, unexpected = _as_state_dict(raw, path)
    for alias, stored in saved_aliases.items():
        if stored in loaded and alias not in loaded:
            loaded[alias] = loaded[stored]
    if key_map is not None:
        loaded = key_map(loaded)
    target = unwrap_model(model)
    expected = target.state_dict()
    loaded = _drop_training_only(loaded, expected, path)
    mismatched = [
        f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(expected[name].shape)}"
        for name, t in loaded.items()
        if name in expected and t.shape != expected[name].shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{path}: {len(mismatched)} tensors have the wrong shape for this model: {_listing(mismatched)}. "
            "Build the model with the flags it was trained with (e.g. --max_frames, --linear_patch, layer counts), "
            "or convert the file's key layout"
        )
    aliases = _model_aliases(target)
    present = set(loaded)
    missing = [n for n in expected if n not in present and not any(a in present for a in aliases.get(n, []))]
    unexpected = sorted(unexpected + [n for n in loaded if n not in expected])
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not match the model: missing {_listing(missing)}; unexpected {_listing(unexpected)}. "
            "Resume only with the flags of the run that wrote it"
        )
    used = {n: t for n, t in loaded.items() if n in expected}
    if expected and not used:
        raise CheckpointError(
            f"{path}: none of its {len(loaded)} tensors has a name of this model (e.g. {_listing(sorted(loaded)[:3])}; "
            f"the model expects e.g. {_listing(list(expected)[:3])}): pass weights written for this model, or convert "
            "the file's key layout"
        )
    check_finite(used, path)
    target.load_state_dict(used, strict=False)
    report = LoadReport(missing=missing, unexpected=unexpected, loaded=len(present & set(expected)))
    logger.info("loaded %d tensors from %s", report.loaded, path)
    if missing:
        logger.warning(
            "%d model tensors were not in %s (kept their initial values): %s", len(missing), path, _listing(missing)
        )
    if unexpected:
        logger.warning("%d entries of %s are not used by the model: %s", len(unexpected), path, _listing(unexpected))
    return report


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a ``save_checkpoint`` directory (or the newest one under an output directory) strictly: weights,
    optimizer, scheduler and this rank's RNG state. Returns the ``extra`` dict saved with it."""
    path = Path(path)
    if not (path / WEIGHTS_FILENAME).is_file() and (path / CKPT_DIRNAME).is_dir():
        latest = find_latest(path, clean=False)
        if latest is None:
            raise CheckpointError(f"{path / CKPT_DIRNAME} holds no complete checkpoint: start without --resume")
        path = latest
    state_file = path / STATE_FILENAME
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} does not exist: pass a ckpt/step-N directory written by this code")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{state_file} cannot be read ({_one_line(exc)}): the checkpoint is damaged; use an older one"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file} holds a {type(state).__name__}, not checkpoint state: use an older one")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_file} has format version {state.get('format_version')}, this code reads {FORMAT_VERSION}"
        )
    load_weights(path, model, strict=True)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if state[name] is None:
            raise CheckpointError(f"{state_file} has no {name} state: resume with the same training setup")
        try:
            obj.load_state_dict(state[name])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"{state_file}: the {name} state does not fit ({exc}); resume with the flags of the run that wrote it"
            ) from exc
    if restore_rng:
        rng = state["rng"]
        rank = distributed.get_rank()
        if len(rng) != distributed.get_world_size():
            logger.warning(
                "%s holds RNG states of %d ranks, running %d: rank %d restores state %d",
                state_file,
                len(rng),
                distributed.get_world_size(),
                rank,
                min(rank, len(rng) - 1),
            )
        restore_rng_state(rng[min(rank, len(rng) - 1)])
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state["extra"]


def _drop_training_only(loaded: dict, expected: dict, path: Path) -> dict:
    """Without :data:`TRAINING_ONLY_PREFIX` tensors in the model, drop those of the file (with one info line)."""
    if any(name.startswith(TRAINING_ONLY_PREFIX) for name in expected):
        return loaded
    dropped = [name for name in loaded if name.startswith(TRAINING_ONLY_PREFIX)]
    if not dropped:
        return loaded
    parts = sorted({name[len(TRAINING_ONLY_PREFIX) :].split(".")[0] for name in dropped})
    logger.info(
        "%s: %d training-only tensors of a stage-1 objective (%s%s) not loaded: this model does not use them",
        path, len(dropped), TRAINING_ONLY_PREFIX, "/".join(parts),
    )  # fmt: skip
    return {name: t for name, t in loaded.items() if not name.startswith(TRAINING_ONLY_PREFIX)}


def read_weight_shapes(path: str | os.PathLike[str]) -> dict[str, torch.Size]:
    """Tensor name -> shape of a weights file or checkpoint directory (safetensors: from the header alone; other
    formats are read as :func:`load_weights` reads them)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILENAME
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(path, framework="pt") as handle:
                return {name: torch.Size(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({exc}): it is truncated or corrupt; re-create it"
            ) from exc
    raw, _ = _read_weights(path)
    tensors, _ = _as_state_dict(raw, path)
    return {name: tensor.shape for name, tensor in tensors.items()}
