"""Method presets: ``--method membridge|t2vlp`` chooses what sits between the video and the text in the fusion.

Each method is one row of :data:`METHOD_PRESETS`: the extra-token source (``bridge_source``), the fusion layout
(``attention``: ``bridge`` = DESIGN 2.3 modality separation, ``joint`` = padding only; ``positional``: ``except_sep``
exempts ``v_sep`` / EOT from the positional embedding, ``all`` adds it everywhere; ``vsep_first``: ``v_sep`` before
the frames), the head dropout, the prefix-LM scheme (``plm_mode``: ``prefix`` = MemBridge's per-prefix rows,
``single_pass`` = one teacher-forced causal pass) and the auxiliary loss (``aux_loss``). A further method (e.g.
STOA-VLP's ``stoa`` with ``bridge_source object``, modules/stoa.py) is one more row plus its token source.

The fusion-layout fields may be overridden one by one (``--fusion_attention``, ``--fusion_pos``, ``--plm_mode``);
``bridge_source`` is tied to the method's token source: a contradictory choice is a :class:`ConfigError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dataloaders.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_METHOD = "membridge"


@dataclass(frozen=True)
class MethodPreset:
    """The switches one method sets (FusionConfig field names, plus the model-level token source and aux loss)."""

    bridge_sources: tuple[str, ...]  # accepted sources; the first is the preset's default
    attention: str
    positional: str
    vsep_first: bool
    plm_mode: str
    aux_loss: str  # "none" | "align" | "match"
    video_tokens: str | None  # model-level video-only token module: None | "tube" | "object"
    head_dropout: float | None = None  # dropout of the vocabulary / VTM heads (None: the fusion JSON's)


METHOD_PRESETS: dict[str, MethodPreset] = {
    "membridge": MethodPreset(("memory", "learned", "none"), "bridge", "except_sep", False, "prefix", "none", None),
    "t2vlp": MethodPreset(("tube",), "joint", "all", True, "single_pass", "align", "tube", head_dropout=0.2),
    "stoa": MethodPreset(("object",), "joint", "except_sep", False, "prefix", "match", "object", head_dropout=0.5),
}
METHODS = tuple(METHOD_PRESETS)


def method_preset(method: str) -> MethodPreset:
    """The preset of ``method``; an unknown name is a ConfigError listing the known ones."""
    if method not in METHOD_PRESETS:
        raise ConfigError(f"--method {method!r} is unknown; choose one of {METHODS}")
    return METHOD_PRESETS[method]


def fusion_overrides(
    method: str,
    bridge_source: str | None = None,
    attention: str | None = None,
    positional: str | None = None,
    plm_mode: str | None = None,
) -> dict[str, object]:
    """FusionConfig overrides of ``method`` with the explicitly given switches (None: the preset's value).

    ``bridge_source`` must be one the method accepts (``tube`` only with ``t2vlp``, ``memory|learned|none`` only
    with ``membridge``). ``bridge_source`` None keeps a membridge fusion JSON's own source (returned as None).
    """
    preset = method_preset(method)
    if bridge_source is not None and bridge_source not in preset.bridge_sources:
        owner = [name for name, p in METHOD_PRESETS.items() if bridge_source in p.bridge_sources]
        uses = "|".join(preset.bridge_sources)
        raise ConfigError(
            f"--bridge_source {bridge_source} contradicts --method {method} (which uses {uses})"
            f"; use --method {owner[0] if owner else DEFAULT_METHOD} or drop --bridge_source"
        )
    source = bridge_source
    if source is None and preset.video_tokens is not None:
        source = preset.bridge_sources[0]
    return {
        "dropout": preset.head_dropout,  # None keeps the fusion JSON's (T2VLP: 0.2 in pre-training, quirk T6)
        "bridge_source": source,
        "attention": attention or preset.attention,
        "positional": positional or preset.positional,
        "vsep_first": preset.vsep_first,
        "plm_mode": plm_mode or preset.plm_mode,
    }


def refuse_unsupported(method: str, what: str, supported: tuple[str, ...] = (DEFAULT_METHOD,)) -> None:
    """ConfigError when ``what`` (a task) has no implementation for ``method`` yet, rather than silently running
    another method's layout."""
    if method not in supported:
        raise ConfigError(
            f"{what} is not implemented for --method {method} yet (supported: {', '.join(supported)}); "
            "choose a supported --method for this task"
        )
