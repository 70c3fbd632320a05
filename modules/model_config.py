"""The model configuration: one dataclass that builds the model and travels with its weights.

``ModelConfig`` holds everything that decides the architecture: the CLIP sizes (``CLIPConfig``), the video encoder
settings (joint layers, patch embedding, similarity head, frames), the fusion sizes (``FusionConfig``, absent in a
stage-1 model) and, for a task head on top, its settings (``head``: e.g. ``{"kind": "qa", "qa_head": "classifier",
"num_answers": 1000}``). Every checkpoint stores it in the safetensors metadata of its weights file
(:data:`MODEL_CONFIG_METADATA_KEY`), so a weights file alone rebuilds its model: :func:`read_model_config`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from dataloaders.errors import CheckpointError, ConfigError
from modules.clip_model import CLIP, CLIPConfig
from modules.fusion import FusionConfig, MemBridgeFusion
from modules.membridge import MemBridgeModel
from modules.methods import DEFAULT_METHOD, method_preset
from modules.stoa import DEFAULT_NUM_ACTIONS
from modules.video_clip import DEFAULT_TEMPORAL_LN_EPS, VideoCLIP

MODEL_CONFIG_METADATA_KEY = "membridge_model_config"
CONFIG_FORMAT_VERSION = 1


@dataclass
class ModelConfig:
    """Architecture of a MemBridge model (dual encoder, optional fusion, optional task head)."""

    clip: CLIPConfig = field(default_factory=CLIPConfig)
    joint_layers: int = 2
    linear_patch: str = "2d"
    sim_header: str = "meanP"
    max_frames: int = 12
    temporal_ln_eps: float = DEFAULT_TEMPORAL_LN_EPS  # LayerNorm eps of seqTransf's temporal blocks (HMMC: 1e-12)
    fusion: FusionConfig | None = None
    head: dict[str, Any] | None = None  # task head settings (QA), built by the task package
    method: str = DEFAULT_METHOD  # --method (modules/methods.py): membridge | t2vlp
    num_tubes: int = 0  # T2VLP tube tokens K (0 without --method t2vlp)
    object_count: int = 0  # STOA boxes per frame O (0 without --method stoa); 2 O + 4 extra tokens

    def __post_init__(self) -> None:
        preset = method_preset(self.method)
        tubes = preset.video_tokens == "tube"
        if tubes != (self.num_tubes > 0):
            raise ConfigError(
                f"--method {self.method} with num_tubes {self.num_tubes}: tube tokens belong to --method t2vlp "
                "(num_tubes >= 1) and to it only"
            )
        if self.fusion is not None and self.fusion.bridge_source not in preset.bridge_sources:
            raise ConfigError(
                f"the fusion's bridge_source {self.fusion.bridge_source!r} contradicts --method {self.method}"
            )
        objects = preset.video_tokens == "object"
        if objects != (self.object_count > 0):
            raise ConfigError(
                f"--method {self.method} with object_count {self.object_count}: object tokens belong to --method stoa "
                "(object_count >= 1) and to it only"
            )
        if objects and self.fusion is not None and self.fusion.num_bridge_tokens != self.num_object_tokens:
            raise ConfigError(
                f"the fusion holds {self.fusion.num_bridge_tokens} extra tokens but the model makes "
                f"{self.num_object_tokens} (2 O + {DEFAULT_NUM_ACTIONS}): set --object_count only"
            )
        if tubes and self.fusion is not None and self.fusion.num_bridge_tokens != self.num_tubes:
            raise ConfigError(
                f"the fusion holds {self.fusion.num_bridge_tokens} extra tokens but the model makes {self.num_tubes} "
                "tubes: set --num_tubes only"
            )

    @property
    def num_object_tokens(self) -> int:
        """STOA's extra tokens ``2 O + N_act`` (0 without objects)."""
        return 2 * self.object_count + DEFAULT_NUM_ACTIONS if self.object_count else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (nested configs as dicts)."""
        out = asdict(self)
        out["format_version"] = CONFIG_FORMAT_VERSION
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "<model config>") -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming ``source``."""
        values = dict(values)
        values.pop("format_version", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown model config keys {unknown}; it was written by a newer version")
        try:
            clip = CLIPConfig(**values.pop("clip", {}))
            fusion = values.pop("fusion", None)
            return cls(clip=clip, fusion=FusionConfig(**fusion) if fusion is not None else None, **values)
        except TypeError as exc:
            raise CheckpointError(f"{source}: malformed model config ({exc}); re-save the checkpoint") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def build_video_encoder(config: ModelConfig, clip: CLIP | None = None) -> VideoCLIP:
    """The dual encoder of ``config`` (randomly initialised CLIP unless ``clip`` is given)."""
    return VideoCLIP(
        clip if clip is not None else CLIP(config.clip),
        joint_layers=config.joint_layers,
        linear_patch=config.linear_patch,
        sim_header=config.sim_header,
        max_frames=config.max_frames,
        num_tubes=config.num_tubes,
        object_count=config.object_count,
        official_quirks=bool(config.fusion is not None and config.fusion.official_quirks),
        temporal_ln_eps=config.temporal_ln_eps,
    )


def build_membridge(config: ModelConfig, clip: CLIP | None = None) -> MemBridgeModel:
    """Dual encoder + fusion (when ``config.fusion``); the fusion starts as a copy of the CLIP text blocks."""
    encoder = build_video_encoder(config, clip)
    fusion = MemBridgeFusion(config.fusion) if config.fusion is not None else None
    if fusion is not None:
        fusion.init_from_clip(encoder.clip)
    model = MemBridgeModel(encoder, fusion)
    model.model_config = config
    return model


def model_config_metadata(model: Any) -> dict[str, str]:
    """The safetensors metadata entry that records ``model.model_config`` (empty for models without one)."""
    config = getattr(model, "model_config", None)
    return {MODEL_CONFIG_METADATA_KEY: config.to_json()} if isinstance(config, ModelConfig) else {}


def read_model_config(path: str | Path) -> ModelConfig | None:
    """The ModelConfig stored with a weights file (a ``.safetensors`` file or a checkpoint directory holding
    ``model.safetensors``), or None when the file records none (older runs, foreign weights)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            text = (handle.metadata() or {}).get(MODEL_CONFIG_METADATA_KEY)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}): it is truncated or corrupt; re-create it"
        ) from exc
    if text is None:
        return None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: its model config metadata is not valid JSON ({exc}); re-save it") from exc
    return ModelConfig.from_dict(values, str(path))
