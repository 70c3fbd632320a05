"""Model selection on a validation split (retrieval, captioning and QA): keep the weights of the best validation run,
on disk and in memory.

The best weights are written to ``OUTPUT_DIR/best_model.safetensors`` with their validation metrics in
``OUTPUT_DIR/best_val.json`` (both through a temp file + rename, rank 0 only), so a run continued with ``--resume``
keeps the best of the runs before the interruption. The test split is evaluated once, with the restored weights,
and never takes part in the choice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dataloaders.errors import CheckpointError, ConfigError
from engine.run_logging import write_json_atomic
from modules.model_config import model_config_metadata

logger = logging.getLogger(__name__)

BEST_MODEL_FILE = "best_model.safetensors"
BEST_METRICS_FILE = "best_val.json"


class BestValidation:
    """Tracks the best validation ``metric`` (higher is better) over a run and keeps (on CPU) the weights that
    reached it; a tie keeps the earlier weights."""

    def __init__(self, output_dir: str | Path, metric: str, is_main: bool) -> None:
        self.output_dir = Path(output_dir)
        self.metric = metric
        self.is_main = is_main
        self.best: float | None = None
        self.metrics: dict = {}
        self.evaluations = 0
        self.best_run = 0
        self.state: dict[str, torch.Tensor] | None = None

    @property
    def model_file(self) -> Path:
        return self.output_dir / BEST_MODEL_FILE

    @property
    def metrics_file(self) -> Path:
        return self.output_dir / BEST_METRICS_FILE

    def resume(self, model: nn.Module) -> None:
        """Pick up the best validation run written before an interruption (``--resume``); nothing if none."""
        if not (self.metrics_file.is_file() and self.model_file.is_file()):
            return
        saved = json.loads(self.metrics_file.read_text())
        if saved.get("metric") != self.metric:
            raise CheckpointError(
                f"{self.metrics_file} selected on {saved.get('metric')!r}, this run on {self.metric!r}: resume with "
                "the same --selection_metric or use a new --output_dir"
            )
        state = load_file(str(self.model_file))
        expected = model.state_dict()
        if state.keys() != expected.keys() or any(state[k].shape != expected[k].shape for k in state):
            raise CheckpointError(
                f"{self.model_file} does not fit this model: resume with the flags of the run that wrote it"
            )
        self.best, self.metrics = float(saved["value"]), saved["metrics"]
        self.evaluations = self.best_run = int(saved["best_run"])
        self.state = state
        logger.info("resumed model selection: best validation %s %.4f from %s", self.metric, self.best, self.model_file)

    def update(self, model: nn.Module, metrics: Mapping[str, float]) -> bool:
        """Record one validation run; True when it is strictly the best so far (its weights are then kept)."""
        self.evaluations += 1
        if self.metric not in metrics:
            raise ConfigError(f"the validation metrics hold no {self.metric!r}; they hold {sorted(metrics)}")
        value = float(metrics[self.metric])
        if self.best is not None and value <= self.best:
            logger.info("validation %s %.4f (best so far %.4f)", self.metric, value, self.best)
            return False
        self.best, self.best_run = value, self.evaluations
        self.metrics = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        logger.info("validation %s %.4f is the best so far (validation run %d)", self.metric, value, self.evaluations)
        if self.is_main:
            tmp = self.model_file.with_name(f".{self.model_file.name}.tmp")
            save_file(
                {k: v.contiguous() for k, v in self.state.items()}, str(tmp), metadata=model_config_metadata(model)
            )
            tmp.replace(self.model_file)
            saved = {"metric": self.metric, "value": value, "best_run": self.best_run, "metrics": self.metrics}
            write_json_atomic(self.metrics_file, saved)
        return True

    def restore(self, model: nn.Module) -> None:
        """Load the best weights into ``model`` (nothing to do before any validation run)."""
        if self.state is None:
            logger.warning("no validation run took place: the test split is evaluated with the last weights")
            return
        model.load_state_dict(self.state)
        logger.info("restored the weights of validation run %d (%s %.4f)", self.best_run, self.metric, self.best)

    def summary(self) -> dict[str, float | int]:
        """What the test results record about the choice."""
        if self.best is None:
            return {}
        return {f"best_val_{self.metric}": self.best, "best_val_run": self.best_run}
