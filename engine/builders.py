"""Build the pieces every entry script needs from the flags: tokenizer, video sources, transform, datasets, the
video/text encoder (optionally with the fusion) and ``--init_model`` weights."""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dataloaders.datasets import DATASETS, DataPaths
from dataloaders.errors import ConfigError
from dataloaders.tfrecord_io import ShardVideoSource
from dataloaders.tokenizer import ClipTokenizer
from dataloaders.transforms import ClipTransform
from dataloaders.video_io import FileVideoSource
from engine.checkpoint import load_weights
from engine.flags import check_text_length, resolve_clip_config
from engine.run_logging import claim_output_dir, setup_logging, write_config
from modules.clip_blocks import MultiheadSelfAttention
from modules.clip_model import load_clip
from modules.fusion import FusionConfig, MemBridgeFusion
from modules.membridge import MemBridgeModel
from modules.published_keys import convert_published_state_dict, is_published_layout
from modules.video_clip import VideoCLIP

logger = logging.getLogger(__name__)

SHARD_INDEX_NAME = "path.index"


def shard_index_path(webvid_tfrecord: str) -> Path:
    """``--webvid_tfrecord`` may name the index file or the folder holding ``path.index``."""
    path = Path(webvid_tfrecord)
    if path.is_dir():
        path = path / SHARD_INDEX_NAME
    if not path.is_file():
        raise ConfigError(
            f"no shard index at {path}: build the shards with `python frozen_tfrecord.py --video_dir VIDEOS "
            f"--output_dir {webvid_tfrecord}` or point --webvid_tfrecord at the folder holding {SHARD_INDEX_NAME}"
        )
    return path


def file_source(args: argparse.Namespace, video_dir: str | None, train: bool) -> FileVideoSource:
    if not video_dir:
        raise ConfigError("--features_path (the folder of video files) is required for this dataset")
    return FileVideoSource(
        video_dir,
        max_frames=args.max_frames,
        feature_framerate=args.feature_framerate,
        slice_framepos=args.slice_framepos,
        frame_order=args.train_frame_order if train else args.eval_frame_order,
        pad_mode=args.pad_frames,
    )


def webvid_source(args: argparse.Namespace):
    """Pre-training videos: the shards at ``--webvid_tfrecord`` or a folder ``--webvid_video_dir``."""
    if args.webvid_video_dir:
        return file_source(args, args.webvid_video_dir, train=True)
    return ShardVideoSource(
        shard_index_path(args.webvid_tfrecord),
        max_frames=args.max_frames,
        slice_framepos=args.slice_framepos,
        frame_order=args.train_frame_order,
        pad_mode=args.pad_frames,
    )


def build_dataset(
    args: argparse.Namespace,
    datatype: str,
    split: str,
    image_size: int,
    source=None,
    paths: DataPaths | None = None,
    tokenizer: ClipTokenizer | None = None,
):
    """One dataset (or retrieval eval set) of the registry, with its video source built from the flags."""
    if datatype not in DATASETS:
        raise ConfigError(f"--datatype {datatype!r} is unknown; choose one of {sorted(DATASETS)}")
    paths = paths or DataPaths.from_namespace(args)
    if source is None:
        source = file_source(args, paths.features_path, train=split == "train")
    return DATASETS[datatype](
        split,
        paths,
        source,
        ClipTransform(image_size),
        tokenizer or ClipTokenizer(),
        args.max_words,
        expand_sentences=args.expand_msrvtt_sentences,
        rng_seed=args.seed,
    )


def build_video_clip(args: argparse.Namespace) -> VideoCLIP:
    """The CLIP video/text dual encoder: OpenAI weights from --visual_pretrain_path or a config JSON. ``--max_words``
    is checked against the text positional table of what was built (every entry script and search build here)."""
    config = resolve_clip_config(args)
    clip = load_clip(path=args.visual_pretrain_path, config=config)
    check_text_length(args.max_words, clip.config.context_length, args.visual_pretrain_path or config)
    return VideoCLIP(
        clip,
        joint_layers=args.joint_layers,
        linear_patch=args.linear_patch,
        sim_header=args.sim_header,
        max_frames=args.max_frames,
    )


def build_fusion_config(args: argparse.Namespace) -> FusionConfig:
    """The fusion sizes: ``fusion.json`` under --cross_config_path, overridden by the explicit fusion flags."""
    return FusionConfig.from_json(
        args.cross_config_path,
        layers=args.fusion_layers,
        num_bridge_tokens=args.num_bridge_tokens,
        memory_size=args.memory_size,
        bridge_source=args.bridge_source,
        official_quirks=args.official_quirks or None,  # the flag turns the quirks on; so does the JSON
        max_frames=args.max_frames,
        max_words=args.max_words,
    )


def build_model(args: argparse.Namespace, with_fusion: bool) -> MemBridgeModel:
    """Dual encoder (+ fusion initialised from the CLIP text blocks), then ``--init_model`` weights.

    When the loaded weights carry no fusion (a stage-1 checkpoint), the fusion is initialised from the *loaded*
    CLIP text blocks and positional embedding, as stage 2 starts from the stage-1 CLIP.
    """
    encoder = build_video_clip(args)
    fusion = MemBridgeFusion(build_fusion_config(args)) if with_fusion else None
    model = MemBridgeModel(encoder, fusion)
    if fusion is not None:
        fusion.init_from_clip(encoder.clip)
    report = load_init_model(args, model)
    if fusion is not None and report is not None and any(k.startswith("fusion.") for k in report.missing):
        logger.info("--init_model has no fusion weights: initialising the fusion from its CLIP text encoder")
        fusion.init_from_clip(encoder.clip)
    return model


def load_init_model(args: argparse.Namespace, model: nn.Module):
    """``--init_model``: weights only (ours or the published key layout), with a report of missing / unexpected
    keys; wrong shapes are errors. Returns the LoadReport (None without --init_model)."""
    if not args.init_model:
        return None
    fusion = getattr(model, "fusion", None)
    fusion_layers = fusion.config.layers if fusion is not None else 0

    def key_map(state: dict) -> dict:
        if not is_published_layout(state):
            return state
        converted, unmapped = convert_published_state_dict(state, fusion_layers=fusion_layers or 6)
        if unmapped:
            logger.info("published checkpoint: %d keys not used by this model: %s", len(unmapped), unmapped[:10])
        return converted

    report = load_weights(args.init_model, model, key_map=key_map)
    logger.info(
        "--init_model %s: %d tensors loaded, %d missing, %d unexpected",
        args.init_model, report.loaded, len(report.missing), len(report.unexpected),
    )  # fmt: skip
    return report


def convert_weights_fp16(model) -> None:
    """``--precision fp16``: OpenAI's ``convert_weights``: linear/conv/attention weights and the two projections in
    half precision; LayerNorm, embeddings and the memory stay fp32 (our LayerNorm computes in fp32 anyway)."""
    for module in model.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
            module.weight.data = module.weight.data.half()
            if module.bias is not None:
                module.bias.data = module.bias.data.half()
        if isinstance(module, MultiheadSelfAttention):
            module.in_proj_weight.data = module.in_proj_weight.data.half()
            module.in_proj_bias.data = module.in_proj_bias.data.half()
        for name in ("text_projection", "proj"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                param.data = param.data.to(torch.float16)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every rank uses the same seed so models start identical)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_run(args: argparse.Namespace, rank: int, world_size: int) -> None:
    """After the flags are validated: logging (``log.txt`` on rank 0), ``config.json`` (rank 0), threads and seeds."""
    claim_output_dir(args.output_dir, args.resume, rank == 0, train=args.do_train)  # refuse to mix two runs
    setup_logging(args.output_dir, rank == 0)
    if rank == 0:
        write_config(args.output_dir, args, world_size)
    setup_runtime(args)


def setup_runtime(args: argparse.Namespace) -> None:
    """Process-wide settings from the flags: torch CPU threads (--torch_threads) and the seeds (--seed)."""
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    seed_everything(args.seed)
