"""Text-to-video and video-to-text search with a trained checkpoint, over a folder of videos or a shard index.

Text query: every video of ``--videos DIR`` (files with a video extension, sub-folders included) or of the shard index
``--shards INDEX`` is ranked by the dual-encoder similarity; when the checkpoint holds fusion weights the top
``--rerank_topk`` candidates are re-ranked with the bridge fusion's VTM match probability (DESIGN 2.7:
``softmax(S_top) * 1000 * p_match + 1000``). Video query: the captions of ``--captions FILE`` (text, one per line, or
a JSON list) are ranked for ``--query_video PATH`` the same way.

Per-video frame features are cached on disk (``DIR/.membridge_cache/`` or ``.membridge_cache/`` beside the index,
or ``--cache_dir``) with engine/feature_cache.py, keyed by the encoder weights and the frame-sampling settings and,
per video, by file path + size + mtime (shards: record location + shard size + mtime): a second query decodes
nothing and runs no ViT. The architecture (CLIP config, fusion config, frames, words, joint layers, patch, similarity
head) and the frame sampling come from the run's ``config.json`` when the checkpoint sits in a run output directory;
``--clip_config --cross_config_path --max_frames --max_words`` override them. Errors print one line and exit with 2.

Command lines (the tiny model on the synthetic data, ``python -m dataloaders.synthetic --output_dir data/synth``)::

    python -m video_text_retrieval.search --checkpoint runs/ret_msvd/ckpt/step-20 --videos data/synth/videos \\
        --query "two red circles moving to the left" --topk 5
    python -m video_text_retrieval.search --checkpoint runs/stage1 --shards data/synth/webvid/tfrecord/path.index \\
        --query "a blue square gets bigger" --json
    python -m video_text_retrieval.search --checkpoint runs/stage2/ckpt/step-50 \\
        --query_video data/synth/videos/video3.mp4 --captions captions.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from dataloaders.datasets import EVAL_SEED
from dataloaders.errors import CheckpointError, ConfigError, DataError, MemBridgeError
from dataloaders.textio import load_json, read_text_lines
from dataloaders.tfrecord_io import ShardVideoSource, resolve_index_path
from dataloaders.tokenizer import ClipTokenizer
from dataloaders.transforms import ClipTransform
from dataloaders.video_io import DEFAULT_EXTENSIONS, FileVideoSource
from engine import checkpoint as ckpt
from engine.builders import build_model, load_init_model
from engine.distributed import DistInfo
from engine.feature_cache import (
    FEATURES_FILE,
    MASKS_FILE,
    UNREADABLE_ROW,
    CacheReport,
    attach_visual_cache,
    encoder_fingerprint,
)
from engine.flags import REPO_ROOT, build_parser
from engine.run_logging import setup_logging
from modules.clip_model import read_state_dict
from modules.fusion import check_rerank_range, eot_positions, rerank_queries
from modules.membridge import MemBridgeModel
from modules.model_config import build_membridge, read_model_config
from modules.published_keys import PUBLISHED_MARKERS

logger = logging.getLogger(__name__)

MatchFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (text_idx [Q, k], video_idx [Q, k]) -> p_match

CACHE_DIRNAME = ".membridge_cache"
RUN_CONFIG_FILE = "config.json"
RUN_CONFIG_DEPTH = 3  # OUTPUT/config.json is three levels above OUTPUT/ckpt/step-N/model.safetensors
FUSION_PREFIX = "fusion."
DEFAULT_TOPK = 5
DEFAULT_BATCH_SIZE = 32
EXIT_ERROR = 2
CAPTION_KEY = "caption"
# The run flags that decide the architecture and the evaluation frame sampling (read from config.json).
ARCHITECTURE_FLAGS = (
    "visual_pretrain_path", "clip_config", "cross_config_path", "joint_layers", "linear_patch", "sim_header",
    "max_frames", "max_words", "fusion_layers", "num_bridge_tokens", "memory_size", "bridge_source", "official_quirks",
    "rerank_topk", "method", "num_tubes", "fusion_attention", "fusion_pos", "plm_mode",
)  # fmt: skip
SAMPLING_FLAGS = ("feature_framerate", "slice_framepos", "eval_frame_order", "pad_frames")
FINGERPRINT_MEMO = "encoder_fingerprints.json"  # weights file -> encoder fingerprint
OVERRIDE_FLAGS = ("clip_config", "cross_config_path", "max_frames", "max_words", "rerank_topk")
ARCHITECTURE_OVERRIDES = ("clip_config", "cross_config_path", "max_frames")  # these rebuild from the run's flags


# ------------------------------------------------------------------------------------------------------ the model


@dataclass
class SearchModel:
    """The model in eval mode plus what encoding needs: the resolved flags, tokenizer and frame transform."""

    model: MemBridgeModel
    flags: argparse.Namespace
    weights: Path
    tokenizer: ClipTokenizer
    transform: ClipTransform

    @property
    def has_fusion(self) -> bool:
        return self.model.fusion is not None


def resolve_weights(checkpoint: str | os.PathLike) -> Path:
    """The weights file of a ``ckpt/step-N`` directory, of a run output directory (its newest checkpoint), or a
    weights file itself (safetensors, state dict, TorchScript)."""
    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(
            f"--checkpoint {path} does not exist: pass a ckpt/step-N directory, a run output directory or a weights "
            "file (.safetensors / .bin / .pt)"
        )
    if path.is_file():
        return path
    if (path / ckpt.WEIGHTS_FILENAME).is_file():
        return path / ckpt.WEIGHTS_FILENAME
    latest = ckpt.find_latest(path, clean=False)
    if latest is None:
        raise CheckpointError(
            f"--checkpoint {path} holds neither {ckpt.WEIGHTS_FILENAME} nor a complete {ckpt.CKPT_DIRNAME}/step-N "
            "checkpoint: pass the checkpoint directory or the weights file"
        )
    return latest / ckpt.WEIGHTS_FILENAME


def find_run_flags(weights: Path) -> tuple[dict[str, Any], Path] | None:
    """The flags of the run that wrote ``weights`` (``OUTPUT/config.json`` ``{"flags": ...}``), and that file."""
    for folder in weights.resolve().parents[:RUN_CONFIG_DEPTH]:
        path = folder / RUN_CONFIG_FILE
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{path} cannot be read as the run's config ({exc}): fix or remove it, or pass the architecture flags"
            ) from exc
        if isinstance(config, dict) and isinstance(config.get("flags"), dict):
            return config["flags"], path
    return None


def weight_names(weights: Path) -> list[str]:
    """Tensor names stored in a weights file (safetensors headers only; other formats are read)."""
    if weights.suffix == ".safetensors":
        try:
            with safe_open(weights, framework="pt") as handle:
                return list(handle.keys())
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(
                f"{weights} is not a readable safetensors file ({' '.join(str(exc).split())}): it is truncated or "
                "corrupt; re-create or re-download it"
            ) from exc
    return list(read_state_dict(weights))


def holds_fusion(names: list[str]) -> bool:
    """True when the weights carry a fusion encoder (ours or the published ``clip.fusion_*`` layout)."""
    return any(n.startswith(FUSION_PREFIX) or n.startswith(PUBLISHED_MARKERS) for n in names)


def _existing_path(value: str, flag: str, origin: str) -> str:
    """``value`` as given, else relative to the repository root (runs store the paths they were given)."""
    for candidate in (Path(value), REPO_ROOT / value):
        if candidate.exists():
            return str(candidate)
    raise ConfigError(f"{flag} {value} ({origin}) does not exist: pass --{flag.lstrip('-')} with the file to use")


def model_flags(weights: Path, overrides: argparse.Namespace) -> argparse.Namespace:
    """The flags ``engine.builders.build_model`` needs: engine defaults < the run's config.json < command line.

    The CLIP sizes come from --clip_config, else from the run's --clip_config, else (the run loaded OpenAI weights, or
    no config.json is found) from the checkpoint's own tensors (head counts ``width // 64``, OpenAI's rule).
    """
    parser = build_parser("retrieval")
    names = (*ARCHITECTURE_FLAGS, *SAMPLING_FLAGS)
    flags = {name: parser.get_default(name) for name in names}
    found = find_run_flags(weights)
    run_flags, origin = ({}, "the engine default") if found is None else (found[0], f"from {found[1]}")
    if found is None:
        logger.info("no %s beside %s: using the engine defaults and the command line", RUN_CONFIG_FILE, weights)
    flags.update({name: run_flags[name] for name in names if name in run_flags})
    for name in OVERRIDE_FLAGS:
        if getattr(overrides, name, None) is not None:
            flags[name] = getattr(overrides, name)
    if overrides.clip_config is not None:
        flags["clip_config"] = _existing_path(overrides.clip_config, "--clip_config", "command line")
        flags["visual_pretrain_path"] = None
    elif found is not None and not run_flags.get("visual_pretrain_path"):
        if flags["clip_config"] is not None:
            flags["clip_config"] = _existing_path(flags["clip_config"], "--clip_config", origin)
    else:
        logger.info("CLIP sizes inferred from %s (heads = width // 64; pass --clip_config otherwise)", weights)
        flags["visual_pretrain_path"] = str(weights)
    flags["cross_config_path"] = _existing_path(flags["cross_config_path"], "--cross_config_path", origin)
    flags["init_model"] = None
    return argparse.Namespace(**flags)


def stored_model(weights: Path, overrides: argparse.Namespace) -> tuple[MemBridgeModel, argparse.Namespace] | None:
    """The model rebuilt from the ModelConfig stored with ``weights`` (checkpoints written by this project), every
    tensor loaded; the frame-sampling flags still come from the run's config.json / the engine defaults. None when
    the file records no config or the command line overrides the architecture."""
    config = read_model_config(weights)
    if config is None or any(getattr(overrides, name, None) is not None for name in ARCHITECTURE_OVERRIDES):
        return None
    model = build_membridge(dataclasses.replace(config, head=None))
    ckpt.load_weights(weights, model, strict=True)
    parser = build_parser("retrieval")
    flags = {name: parser.get_default(name) for name in (*SAMPLING_FLAGS, "rerank_topk", "max_words")}
    found = find_run_flags(weights)
    flags.update({name: found[0][name] for name in flags if found is not None and name in found[0]})
    if overrides.rerank_topk is not None:
        flags["rerank_topk"] = overrides.rerank_topk
    if config.fusion is not None:
        flags["max_words"] = config.fusion.max_words
    flags.update(max_frames=config.max_frames, max_words=overrides.max_words or flags["max_words"])
    return model, argparse.Namespace(**flags)


def load_search_model(checkpoint: str | os.PathLike, overrides: argparse.Namespace) -> SearchModel:
    """Build the model of ``checkpoint`` (with its fusion when the weights hold one) and load every tensor: from the
    model config stored with the weights, else from the run's flags (:func:`model_flags`)."""
    weights = resolve_weights(checkpoint)
    rebuilt = stored_model(weights, overrides)
    if rebuilt is not None:
        model, flags = rebuilt
        model.eval()
        logger.info("search model from %s, built from its stored model config", weights)
        clip = model.encoder.clip
        return SearchModel(model, flags, weights, ClipTokenizer(), ClipTransform(clip.config.image_resolution))
    flags = model_flags(weights, overrides)
    with_fusion = holds_fusion(weight_names(weights))
    model = build_model(flags, with_fusion=with_fusion)
    flags.init_model = str(weights)
    report = load_init_model(flags, model)
    if report.missing:
        raise CheckpointError(
            f"{weights} lacks {len(report.missing)} tensors of the model it should build (e.g. {report.missing[:3]}): "
            "pass the architecture flags of the run that wrote it (--clip_config, --cross_config_path, --max_frames)"
        )
    clip = model.encoder.clip
    model.eval()
    logger.info("search model from %s (fusion: %s)", weights, with_fusion)
    return SearchModel(model, flags, weights, ClipTokenizer(), ClipTransform(clip.config.image_resolution))


# ----------------------------------------------------------------------------------------------- the video corpus


@dataclass
class VideoCorpus:
    """Cached frame features of every searchable video, in ``video_ids`` order."""

    video_ids: list[str]
    paths: list[str]  # the file of each video (shards: the shard file)
    offsets: list[int | None]  # shard record offset (None for video files)
    frame_feats: torch.Tensor  # [N, T, D]
    video_mask: torch.Tensor  # [N, T]
    cache: CacheReport


@dataclass(frozen=True)
class _Entry:
    """A corpus video as attach_visual_cache reads training pairs (whole videos, no clip bounds)."""

    video_id: str
    start: float | None = None
    end: float | None = None


class _FrameReader:
    """The reader attach_visual_cache expects: ``(video_id, clip, rng) -> (video [T, 3, S, S], mask [T])``."""

    def __init__(self, source: FileVideoSource | ShardVideoSource, transform: ClipTransform):
        self.source = source
        self.transform = transform
        self.video_keys: dict[str, str] = {}

    def __call__(
        self, video_id: str, clip: tuple | None, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        frames, mask = self.source.load(video_id, rng=rng)
        return torch.as_tensor(self.transform(frames, mask), dtype=torch.float32), torch.as_tensor(mask).long()


class _CorpusVideos:
    """The ``pairs`` + ``read_video`` view of the corpus that attach_visual_cache fills with cached features."""

    def __init__(self, video_ids: list[str], reader: _FrameReader):
        self.pairs = [_Entry(vid) for vid in video_ids]
        self.read_video = reader


def list_videos(folder: Path) -> list[str]:
    """Video files under ``folder`` (hidden folders skipped) as ids relative to it, sorted."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.suffix.lower() in DEFAULT_EXTENSIONS and path.is_file():
            if not any(part.startswith(".") for part in relative.parts):
                found.append(relative.as_posix())
    return sorted(found)


def open_corpus(
    search: SearchModel, videos: str | None, shards: str | None, cache_dir: str | None
) -> tuple[FileVideoSource | ShardVideoSource, list[str], Path, dict]:
    """The video source, its video ids, the cache folder and the settings that key the cache."""
    if (videos is None) == (shards is None):
        raise ConfigError("search one corpus: pass either --videos DIR or --shards INDEX")
    f = search.flags
    settings = {
        "max_frames": f.max_frames,
        "slice_framepos": f.slice_framepos,
        "frame_order": f.eval_frame_order,
        "pad_frames": f.pad_frames,
        "image_size": search.transform.image_size,
        "transform": search.transform.backend,
    }
    if videos is not None:
        folder = Path(videos)
        if not folder.is_dir():
            raise DataError(f"--videos {folder} is not a folder: pass the folder that holds the video files")
        video_ids = list_videos(folder)
        if not video_ids:
            raise DataError(
                f"--videos {folder} holds no video files ({', '.join(DEFAULT_EXTENSIONS)}): point it at a folder of "
                "videos, or use --shards INDEX for shards"
            )
        source = FileVideoSource(
            folder, f.max_frames, f.feature_framerate, f.slice_framepos, f.eval_frame_order, f.pad_frames
        )
        settings.update(source="files", feature_framerate=f.feature_framerate)
        return source, video_ids, Path(cache_dir) if cache_dir else folder / CACHE_DIRNAME, settings
    index = resolve_index_path(shards)
    if not index.is_file():
        raise DataError(
            f"--shards {shards}: no shard index at {index}; pass the path.index written by frozen_tfrecord.py (or the "
            "folder holding it)"
        )
    source = ShardVideoSource(index, f.max_frames, f.slice_framepos, f.eval_frame_order, f.pad_frames)
    if not source.video_ids:
        raise DataError(f"--shards {index} lists no videos: rebuild the shards with frozen_tfrecord.py")
    settings.update(source="shards", index=str(index.resolve()))
    return source, source.video_ids, Path(cache_dir) if cache_dir else index.parent / CACHE_DIRNAME, settings


def remembered_encoder_fingerprint(search: SearchModel, cache_root: Path) -> str:
    """The search model's :func:`encoder_fingerprint`, remembered in ``cache_root/encoder_fingerprints.json`` under its
    weights file (resolved path, size, modification time) and resolved flags, so that a repeated query does not hash
    every encoder tensor again (about 1 s at ViT-B/16). Rewriting the weights file changes its size or time and the hash
    is recomputed; other weights with the same encoder tensors (a stage-2 checkpoint of a frozen CLIP) get the same
    fingerprint and share the cached features."""
    st = search.weights.stat()
    flags = json.dumps(vars(search.flags), sort_keys=True, default=str)
    identity = f"{search.weights.resolve()}:{st.st_size}:{st.st_mtime_ns}:{flags}"
    key = hashlib.blake2b(identity.encode(), digest_size=16).hexdigest()
    memo_path = cache_root / FINGERPRINT_MEMO
    try:
        memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        memo = {}  # a damaged memo only costs one hash
    if not isinstance(memo, dict):
        memo = {}
    if isinstance(memo.get(key), str):
        return memo[key]
    memo[key] = fingerprint = encoder_fingerprint(search.model.encoder)
    tmp = memo_path.with_name(f".{memo_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
    os.replace(tmp, memo_path)
    return fingerprint


def index_corpus(
    search: SearchModel,
    videos: str | None = None,
    shards: str | None = None,
    cache_dir: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
) -> VideoCorpus:
    """Frame features of every video of the folder / index: read from the cache, the new or changed ones encoded."""
    source, video_ids, cache_root, settings = open_corpus(search, videos, shards, cache_dir)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the embedding cache {cache_root} ({exc}): pass --cache_dir DIR") from exc
    if not os.access(cache_root, os.W_OK):
        raise DataError(f"the embedding cache {cache_root} is not writable: pass --cache_dir with a writable folder")
    corpus = _CorpusVideos(video_ids, _FrameReader(source, search.transform))
    local = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    report = attach_visual_cache(
        corpus, search.model.encoder, cache_root, settings, local, batch_size, num_workers,
        encoder_key=remembered_encoder_fingerprint(search, cache_root),
    )  # fmt: skip
    logger.info("%d videos: %d from the cache, %d encoded", len(video_ids), report.reused, report.computed)
    unreadable = {vid for vid in video_ids if corpus.read_video.rows[vid] == UNREADABLE_ROW}
    if unreadable:
        logger.warning(
            "%d videos could not be read and are left out of the search (the warnings above say why): %s",
            len(unreadable), sorted(unreadable)[:20],
        )  # fmt: skip
        video_ids = [vid for vid in video_ids if vid not in unreadable]
    rows = [corpus.read_video.rows[vid] for vid in video_ids]
    feats = np.load(report.directory / FEATURES_FILE, mmap_mode="r")[rows]
    masks = np.load(report.directory / MASKS_FILE, mmap_mode="r")[rows]
    if isinstance(source, FileVideoSource):
        paths = [str(source.path_for(vid)) for vid in video_ids]
        offsets: list[int | None] = [None] * len(video_ids)
    else:
        entries = [source.reader.entry(vid) for vid in video_ids]
        paths = [str(source.reader.shard_path(e)) for e in entries]
        offsets = [e.offset for e in entries]
    return VideoCorpus(
        video_ids, paths, offsets, torch.from_numpy(feats), torch.from_numpy(masks.astype(np.int64)), report
    )


# ------------------------------------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class Hit:
    """One ranked result: ``score`` is the final (re-ranked) score, ``similarity`` the dual-encoder logit."""

    rank: int
    score: float
    similarity: float
    item: str  # video id, or caption for a video query
    path: str | None = None
    offset: int | None = None


@torch.no_grad()
def encode_texts(
    search: SearchModel, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position text features ``[N, L, D]``, ``text_mask [N, L]`` and the EOT features ``[N, D]``."""
    ids, mask = (torch.from_numpy(a) for a in search.tokenizer.encode_batch(texts, search.flags.max_words))
    clip = search.model.encoder.clip
    tokens = torch.cat([clip.encode_text_tokens(chunk).float() for chunk in ids.split(batch_size)])
    return tokens, mask, tokens[torch.arange(len(texts)), eot_positions(mask)]


def _final_scores(
    search: SearchModel, sim: torch.Tensor, match_prob: MatchFn | None, rerank_topk: int, transposed: bool
) -> torch.Tensor:
    """The query's row of scores ``[N]``: ``sim [1, N]``, its top-k re-ranked when the model has a fusion."""
    if not search.has_fusion or rerank_topk <= 0:
        return sim[0]
    check_rerank_range(sim)
    return rerank_queries(sim, match_prob, rerank_topk, torch.zeros(1, dtype=torch.long), transposed)[0]


def _hits(
    scores: torch.Tensor,
    sim: torch.Tensor,
    topk: int,
    items: list[str],
    paths: list[str] | None = None,
    offsets: list[int | None] | None = None,
) -> list[Hit]:
    """The ``topk`` best of ``scores [N]`` (ties keep corpus order) as hits."""
    order = scores.argsort(descending=True, stable=True)[: max(0, topk)].tolist()
    return [
        Hit(
            rank + 1,
            float(scores[i]),
            float(sim[i]),
            items[i],
            paths[i] if paths is not None else None,
            offsets[i] if offsets is not None else None,
        )
        for rank, i in enumerate(order)
    ]


@torch.no_grad()
def search_videos(search: SearchModel, corpus: VideoCorpus, query: str, topk: int, rerank_topk: int) -> list[Hit]:
    """The ``topk`` videos of ``corpus`` for a text query (re-ranked top-``rerank_topk`` with a fusion)."""
    encoder = search.model.encoder
    tokens, mask, eot = encode_texts(search, [query])
    sim = encoder.similarity_logits(eot, corpus.frame_feats, corpus.video_mask)  # [1, Nv]
    match_prob = None
    if search.has_fusion:
        match_prob = search.model.fusion.pair_match_fn(corpus.frame_feats, corpus.video_mask, tokens, mask, eot)
    scores = _final_scores(search, sim, match_prob, rerank_topk, transposed=False)
    return _hits(scores, sim[0], topk, corpus.video_ids, corpus.paths, corpus.offsets)


def read_captions(path: str | os.PathLike) -> list[str]:
    """Captions of a text file (one per line, blank lines skipped) or a JSON list (strings or ``{"caption": ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--captions {path} does not exist: pass a text file (one caption per line) or a JSON list")
    if path.suffix.lower() == ".json":
        rows = load_json(path)
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of captions, got a {type(rows).__name__}")
        captions = []
        for i, row in enumerate(rows):
            caption = row.get(CAPTION_KEY) if isinstance(row, dict) else row
            if not isinstance(caption, str):
                raise DataError(f"{path}, entry {i}: expected a string or an object with a {CAPTION_KEY!r} string")
            captions.append(caption)
    else:
        captions = [line.strip() for line in read_text_lines(path) if line.strip()]
    if not captions:
        raise DataError(f"--captions {path} holds no captions: write one caption per line or a JSON list")
    return captions


@torch.no_grad()
def rank_captions(
    search: SearchModel,
    video: str | os.PathLike,
    captions: list[str],
    topk: int,
    rerank_topk: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[Hit]:
    """The ``topk`` captions for one video file (re-ranked top-``rerank_topk`` with a fusion)."""
    path = Path(video)
    if not path.is_file():
        raise DataError(f"--query_video {path} does not exist: pass a video file")
    f = search.flags
    source = FileVideoSource(
        path.parent, f.max_frames, f.feature_framerate, f.slice_framepos, f.eval_frame_order, f.pad_frames
    )
    frames, mask = source.load(path.name, rng=np.random.default_rng(EVAL_SEED))
    video_mask = torch.as_tensor(mask).long()[None]
    encoder = search.model.encoder
    frame_feats = encoder.encode_video(search.transform(frames, mask)[None], video_mask).float()  # [1, T, D]
    tokens, text_mask, eot = encode_texts(search, captions, batch_size)
    sim = encoder.similarity_logits(eot, frame_feats, video_mask).t()  # [1, Nc]
    match_prob = None
    if search.has_fusion:
        match_prob = search.model.fusion.pair_match_fn(frame_feats, video_mask, tokens, text_mask, eot)
    scores = _final_scores(search, sim, match_prob, rerank_topk, transposed=True)
    return _hits(scores, sim[0], topk, captions)


# ----------------------------------------------------------------------------------------------------------- CLI


def build_search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="ckpt/step-N directory, run output directory or weights file")
    corpus = p.add_mutually_exclusive_group()
    corpus.add_argument("--videos", default=None, help="folder of video files to search (sub-folders included)")
    corpus.add_argument("--shards", default=None, help="shard index (path.index, or the folder holding it) to search")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", default=None, help="text query: rank the videos of --videos / --shards")
    query.add_argument("--query_video", default=None, help="video file query: rank the captions of --captions")
    p.add_argument("--captions", default=None, help="captions to rank for --query_video: text lines or a JSON list")
    p.add_argument("--topk", type=int, default=DEFAULT_TOPK, help="how many results to print")
    p.add_argument(
        "--rerank_topk",
        type=int,
        default=None,
        help="candidates re-ranked with the fusion (default: the run's --rerank_topk; 0: dual encoder only)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--cache_dir", default=None, help="embedding cache folder (default: beside the videos / index)")
    p.add_argument("--clip_config", default=None, help="CLIP config JSON (default: the run's, else from the weights)")
    p.add_argument("--cross_config_path", default=None, help="fusion config folder or JSON (default: the run's)")
    p.add_argument("--max_frames", type=int, default=None, help="frames per video (default: the run's)")
    p.add_argument("--max_words", type=int, default=None, help="text length in tokens (default: the run's)")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="videos / captions encoded per batch")
    p.add_argument("--num_thread_reader", type=int, default=0, help="DataLoader workers decoding videos")
    p.add_argument("--torch_threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--verbose", action="store_true", help="log progress (cache use, model loading) on stderr")
    return p


def check_search_flags(args: argparse.Namespace) -> None:
    """ConfigError for a query without what it ranks, or an empty one."""
    if args.query is not None and not args.query.strip():
        raise ConfigError("--query is empty: pass the text to search for, e.g. --query 'a dog catches a ball'")
    if args.query is not None and args.videos is None and args.shards is None:
        raise ConfigError("--query needs the videos to search: pass --videos DIR or --shards INDEX")
    if args.query_video is not None and args.captions is None:
        raise ConfigError("--query_video needs the captions to rank: pass --captions FILE")
    if args.query is not None and args.captions is not None:
        raise ConfigError("--captions is ranked for --query_video only: drop it, or query with --query_video")
    if args.query_video is not None and (args.videos is not None or args.shards is not None):
        raise ConfigError("--query_video ranks the captions of --captions: drop --videos / --shards")
    for name in ("topk", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.rerank_topk is not None and args.rerank_topk < 0:
        raise ConfigError(f"--rerank_topk must be >= 0 (got {args.rerank_topk})")


def run_search(args: argparse.Namespace) -> list[Hit]:
    """Parse-free entry: the ranked hits of the query in ``args``."""
    check_search_flags(args)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    search = load_search_model(args.checkpoint, args)
    rerank_topk = search.flags.rerank_topk
    if args.query_video is not None:
        return rank_captions(search, args.query_video, read_captions(args.captions), args.topk, rerank_topk)
    corpus = index_corpus(search, args.videos, args.shards, args.cache_dir, args.batch_size, args.num_thread_reader)
    return search_videos(search, corpus, args.query, args.topk, rerank_topk)


def format_hits(hits: list[Hit], as_json: bool) -> str:
    """A JSON list, or a table: rank, score, similarity, item (video id or caption) and where the video is."""
    if as_json:
        return json.dumps([{k: v for k, v in asdict(h).items() if v is not None} for h in hits], indent=2)
    located = any(h.path is not None for h in hits)
    lines = [f"{'rank':>4}  {'score':>10}  {'similarity':>10}  item" + ("  path" if located else "")]
    for h in hits:
        where = "" if h.path is None else f"  {h.path}" + ("" if h.offset is None else f"@{h.offset}")
        lines.append(f"{h.rank:>4}  {h.score:>10.4f}  {h.similarity:>10.4f}  {h.item}{where}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one search; print the ranked list (stdout) or one error line (stderr, exit code 2)."""
    args = build_search_parser().parse_args(argv)
    setup_logging(None, is_main=args.verbose)
    try:
        hits = run_search(args)
    except MemBridgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(format_hits(hits, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
