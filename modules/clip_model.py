"""OpenAI CLIP (ViT image encoder + causal text encoder) with OpenAI's exact state-dict keys, and its loader.

``load_clip`` reads OpenAI's released files (TorchScript archives such as ``ViT-B-16.pt``), plain state dicts and
safetensors, and infers the architecture from tensor shapes the way OpenAI's ``build_model`` does, so ViT-B/16,
ViT-B/32 and ViT-L/14 files all load. Nothing is ever unpickled without ``weights_only=True``: training checkpoints
that also pickle Python objects (MCQ-CLIP's ``{'state_dict', 'config': ConfigParser, ...}``) load with those objects
dropped unexecuted (``dataloaders.safe_pickle.safe_torch_load``); ``state_dict`` and ``module.`` wrappers are removed.

Shapes: images ``[B, 3, S, S]``, text ids ``[B, N]``; ``W`` ViT width, ``P`` patches per image, ``D`` embed dim.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dataloaders.errors import CheckpointError, ConfigError
from dataloaders.safe_pickle import safe_torch_load
from modules.clip_blocks import LayerNorm, ResidualAttentionBlock, Transformer, causal_mask, default_heads

logger = logging.getLogger(__name__)

INIT_LOGIT_SCALE = math.log(1 / 0.07)
"""OpenAI's initial temperature: ``exp(logit_scale) = 1 / 0.07``."""
TOKEN_EMBEDDING_STD = 0.02
TEXT_POSITION_STD = 0.01
TEMPORAL_PATCH_FRAMES = 3
"""Time extent of the ``--linear_patch 3d`` kernel (CLIP4Clip's Conv3d ``(3, p, p)``)."""
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")
"""Integer entries of OpenAI's TorchScript state dicts that are not weights."""
CHECKPOINT_HINT = "use OpenAI's released ViT-*.pt, or a state dict / safetensors file with the same keys"
CONVERT_HINT = (
    "convert it once to safetensors in a trusted environment with the code that wrote it: "
    "safetensors.torch.save_file(checkpoint['state_dict'], 'weights.safetensors')"
)
SAFETENSORS_HEADER_BYTES = 8


@dataclass
class CLIPConfig:
    """Architecture of a ViT CLIP; the defaults are ViT-B/16. Heads left as ``None`` become ``width // 64``."""

    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 16
    vision_heads: int | None = None
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int | None = None
    transformer_layers: int = 12

    def __post_init__(self) -> None:
        if self.vision_heads is None:
            self.vision_heads = default_heads(self.vision_width)
        if self.transformer_heads is None:
            self.transformer_heads = default_heads(self.transformer_width)
        if self.image_resolution % self.vision_patch_size:
            raise ConfigError(
                f"CLIP image_resolution {self.image_resolution} is not a multiple of vision_patch_size "
                f"{self.vision_patch_size}: fix the model config"
            )
        for name, width, heads in (
            ("vision", self.vision_width, self.vision_heads),
            ("transformer", self.transformer_width, self.transformer_heads),
        ):
            if width % heads:
                raise ConfigError(f"CLIP {name}_width {width} is not divisible by {name}_heads {heads}: fix the config")

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_resolution // self.vision_patch_size

    @classmethod
    def from_json(cls, path: str | Path) -> CLIPConfig:
        """Read a config JSON (the files in ``CLIP-modules/``); unknown keys are an error."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: CLIP config file not found; see CLIP-modules/README.md") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON (line {err.lineno}): fix or regenerate the file") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a CLIP config must be a JSON object of architecture fields")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown CLIP config keys {unknown}; allowed keys are {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable), heads resolved."""
        return dataclasses.asdict(self)


class VisionTransformer(nn.Module):
    """CLIP's ViT (``visual.*`` keys) split into ``embed`` / ``blocks`` / ``head`` for the video encoder."""

    def __init__(self, resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = resolution // patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size**2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.register_module("conv2", None)

    @property
    def blocks(self) -> nn.ModuleList:
        """The ViT blocks ``visual.transformer.resblocks``."""
        return self.transformer.resblocks

    def enable_3d_patch(self) -> None:
        """Add ``conv2``, a Conv3d patch embedding (kernel ``(3, p, p)``) set to ``[0, conv1, 0]`` so it equals 2d."""
        width = self.conv1.out_channels
        p = self.patch_size
        conv2 = nn.Conv3d(
            3,
            width,
            kernel_size=(TEMPORAL_PATCH_FRAMES, p, p),
            stride=(1, p, p),
            padding=(TEMPORAL_PATCH_FRAMES // 2, 0, 0),
            bias=False,
        ).to(device=self.conv1.weight.device, dtype=self.conv1.weight.dtype)
        with torch.no_grad():
            conv2.weight.zero_()
            conv2.weight[:, :, TEMPORAL_PATCH_FRAMES // 2] = self.conv1.weight
        self.conv2 = conv2

    def _sequence(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch grid ``[N, W, g, g]`` -> ``[N, 1+P, W]``: class token, positional embedding, ``ln_pre``."""
        n, width, gh, gw = patches.shape
        if gh * gw + 1 != self.positional_embedding.shape[0]:
            side = self.grid_size * self.patch_size
            raise ConfigError(
                f"images give a {gh}x{gw} patch grid but the model expects {self.grid_size}x{self.grid_size} "
                f"(image size {side}): resize frames to {side} px"
            )
        x = patches.reshape(n, width, gh * gw).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(n, 1, width)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> tokens ``[B, 1+P, W]`` (conv1 + class + positions + ln_pre)."""
        return self._sequence(self.conv1(images.to(self.conv1.weight.dtype)))

    def embed_video(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, S, S]`` -> tokens ``[B*T, 1+P, W]``; uses the 3d patch conv (over time) when enabled."""
        if self.conv2 is None:
            return self.embed(video.flatten(0, 1))
        x = self.conv2(video.to(self.conv2.weight.dtype).transpose(1, 2))  # [B, W, T, g, g]
        return self._sequence(x.transpose(1, 2).flatten(0, 1))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., W]`` -> ``[..., D]``: ``ln_post(x) @ proj``."""
        return self.ln_post(x) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> CLS features ``[B, D]``."""
        return self.head(self.transformer(self.embed(images))[:, 0])


class CLIP(nn.Module):
    """OpenAI CLIP with OpenAI's parameter names and initialisation."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(
            config.image_resolution,
            config.vision_patch_size,
            config.vision_width,
            config.vision_layers,
            config.vision_heads,
            config.embed_dim,
        )
        width = config.transformer_width
        self.transformer = Transformer(width, config.transformer_layers, config.transformer_heads)
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.full([], INIT_LOGIT_SCALE))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's ``initialize_parameters``: normal stds scaled by width and depth for the text transformer."""
        nn.init.normal_(self.token_embedding.weight, std=TOKEN_EMBEDDING_STD)
        nn.init.normal_(self.positional_embedding, std=TEXT_POSITION_STD)
        width, layers = self.transformer.width, self.transformer.layers
        attn_std = width**-0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        block: ResidualAttentionBlock
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=attn_std)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> ``[B, D]``: CLS token after ``ln_post @ proj``."""
        return self.visual(images)

    def encode_text_tokens(
        self,
        text_ids: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-position text features ``[B, N, D]`` (after ``ln_final @ text_projection``).

        ``position_ids`` (``[N]`` or ``[B, N]``, default ``arange(N)``) index the positional table; ``attn_mask`` is an
        additive ``[N, N]`` or ``[B, 1, N, N]`` mask that replaces the default causal mask.
        """
        n = text_ids.shape[1]
        if position_ids is None:
            if n > self.config.context_length:
                raise ConfigError(
                    f"text of {n} tokens exceeds the CLIP context length {self.config.context_length}: "
                    "lower --max_words"
                )
            position_ids = torch.arange(n, device=text_ids.device)
        if attn_mask is None:
            attn_mask = causal_mask(n, device=text_ids.device)
        x = self.token_embedding(text_ids).to(self.dtype) + self.positional_embedding[position_ids].to(self.dtype)
        x = self.transformer(x, attn_mask)
        return self.ln_final(x) @ self.text_projection

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` -> ``[B, D]``: the feature at the EOT position (the largest id, OpenAI's rule)."""
        tokens = self.encode_text_tokens(text_ids)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), text_ids.argmax(dim=-1)]


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _layer_count(keys: list[str], prefix: str) -> int:
    return len({key[len(prefix) :].split(".")[0] for key in keys if key.startswith(prefix)})


def infer_config(state: Mapping[str, Any], source: str = "<state dict>") -> CLIPConfig:
    """Architecture from tensor shapes (OpenAI's ``build_model`` rules); values may be tensors or shapes.

    Head counts cannot be read from shapes: they follow OpenAI's ``width // 64``.
    """
    keys = list(state)
    if "visual.proj" not in state and any(key.startswith("visual.layer1.") for key in keys):
        raise CheckpointError(
            f"{source}: a ResNet CLIP checkpoint; only ViT CLIP models are supported ({CHECKPOINT_HINT})"
        )
    required = (
        "visual.conv1.weight",
        "visual.positional_embedding",
        "visual.proj",
        "text_projection",
        "positional_embedding",
        "token_embedding.weight",
        "ln_final.weight",
    )
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{source}: not a CLIP checkpoint, missing keys {missing} ({CHECKPOINT_HINT})")
    vision_width, _, patch_size, _ = _shape(state["visual.conv1.weight"])
    n_positions = _shape(state["visual.positional_embedding"])[0]
    grid = round((n_positions - 1) ** 0.5)
    if grid * grid + 1 != n_positions:
        raise CheckpointError(
            f"{source}: visual.positional_embedding has {n_positions} rows, not 1 + a square grid ({CHECKPOINT_HINT})"
        )
    embed_dim = _shape(state["text_projection"])[1]
    if _shape(state["visual.proj"])[1] != embed_dim:
        raise CheckpointError(
            f"{source}: visual.proj {_shape(state['visual.proj'])} and text_projection "
            f"{_shape(state['text_projection'])} disagree on the embed dim: the file is corrupt or not CLIP"
        )
    return CLIPConfig(
        embed_dim=embed_dim,
        image_resolution=patch_size * grid,
        vision_layers=_layer_count(keys, "visual.transformer.resblocks."),
        vision_width=vision_width,
        vision_patch_size=patch_size,
        context_length=_shape(state["positional_embedding"])[0],
        vocab_size=_shape(state["token_embedding.weight"])[0],
        transformer_width=_shape(state["ln_final.weight"])[0],
        transformer_layers=_layer_count(keys, "transformer.resblocks."),
    )


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def _is_safetensors(path: Path) -> bool:
    """Safetensors files open with a little-endian uint64 header length followed by a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(SAFETENSORS_HEADER_BYTES + 1)
    if len(head) <= SAFETENSORS_HEADER_BYTES or head[-1:] != b"{":
        return False
    return int.from_bytes(head[:SAFETENSORS_HEADER_BYTES], "little") < path.stat().st_size


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a TorchScript archive (``torch.jit.load``), a safetensors file or a weights-only state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: CLIP checkpoint not found; put OpenAI's ViT-B-16.pt in CLIP-modules/ "
            "(see CLIP-modules/README.md) or pass its path with --visual_pretrain_path"
        )
    try:
        if zipfile.is_zipfile(path) and _is_torchscript(path):
            with warnings.catch_warnings():  # the deprecation of torch.jit is not actionable: OpenAI ships TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        elif _is_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:  # weights only: a training checkpoint's pickled config objects (MCQ's ConfigParser) are dropped
            state, _ = safe_torch_load(path, CONVERT_HINT)
    except CheckpointError:
        raise
    except Exception as err:  # torch, pickle and safetensors raise unrelated types for a bad file
        detail = " ".join(str(err).split()) or type(err).__name__  # one line: torch's messages span several
        raise CheckpointError(f"{path}: cannot read the checkpoint ({detail}); {CHECKPOINT_HINT}") from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors; {CHECKPOINT_HINT}")
    return dict(state)


def clip_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP weights of ``state``: drops OpenAI's non-weight entries and a wrapper prefix such as ``clip.``."""
    if "visual.proj" not in state:
        prefixes = sorted((key[: -len("visual.proj")] for key in state if key.endswith(".visual.proj")), key=len)
        if prefixes:
            prefix = prefixes[0]
            state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return {key: value for key, value in state.items() if key not in NON_WEIGHT_KEYS}


def check_clip_config(config: CLIPConfig, inferred: CLIPConfig, source: str) -> None:
    """CheckpointError unless ``config`` has the shapes inferred from the weights of ``source`` (heads may differ)."""
    shape_fields = [field.name for field in dataclasses.fields(CLIPConfig) if not field.name.endswith("_heads")]
    diffs = [
        f"{name}: config {getattr(config, name)} vs checkpoint {getattr(inferred, name)}"
        for name in shape_fields
        if getattr(config, name) != getattr(inferred, name)
    ]
    if diffs:
        raise CheckpointError(f"{source}: checkpoint shapes do not match the given CLIP config ({'; '.join(diffs)})")


def _as_config(config: CLIPConfig | str | Path) -> CLIPConfig:
    return config if isinstance(config, CLIPConfig) else CLIPConfig.from_json(config)


def load_clip(path: str | Path | None = None, config: CLIPConfig | str | Path | None = None) -> CLIP:
    """A float32 CLIP: from a checkpoint (architecture inferred, or checked against ``config``) or randomly initialised.

    ``config`` (a ``CLIPConfig`` or a JSON path) is needed without ``path``; with ``path`` it is only useful to set
    head counts that differ from ``width // 64``. Keys in the file that CLIP does not have are logged and ignored.
    """
    if path is None:
        if config is None:
            raise ConfigError("load_clip needs a checkpoint path (--visual_pretrain_path) or a CLIP config JSON")
        return CLIP(_as_config(config))
    source = str(path)
    state = clip_state_dict(read_state_dict(path))
    inferred = infer_config(state, source)
    if config is None:
        config = inferred
    else:
        config = _as_config(config)
        check_clip_config(config, inferred, source)
    with torch.device("meta"):
        model = CLIP(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"{source}: missing CLIP weights {missing[:8]} ({len(missing)} in all); {CHECKPOINT_HINT}"
        )
    wrong = [
        f"{key} {tuple(state[key].shape)} != {shape}" for key, shape in expected.items() if state[key].shape != shape
    ]
    if wrong:
        raise CheckpointError(f"{source}: CLIP weights of the wrong shape: {wrong[:8]} ({len(wrong)} in all)")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        logger.warning("%s: ignoring %d keys that CLIP does not have, e.g. %s", source, len(unexpected), unexpected[:8])
    weights = {key: state[key].detach().to(torch.float32, copy=True) for key in expected}
    non_finite = [key for key, value in weights.items() if not bool(torch.isfinite(value).all())]
    if non_finite:
        raise CheckpointError(
            f"{source}: NaN or infinite values in {non_finite[:8]} ({len(non_finite)} tensors): the weights are "
            "damaged or from a diverged run; use another checkpoint"
        )
    model.load_state_dict(weights, assign=True)
    logger.info("loaded CLIP from %s: %s", source, config.to_dict())
    return model
