"""Build the pieces every entry script needs from the flags: tokenizer, video sources, transform, datasets, the
video/text encoder (optionally with the fusion) and ``--init_model`` weights."""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dataloaders.bert_tokenizer import BertTextTokenizer
from dataloaders.datasets import DATASETS, DataPaths
from dataloaders.detections import DetectionReader, TagReader
from dataloaders.errors import CheckpointError, ConfigError
from dataloaders.lmdb_frames import LmdbVideoSource
from dataloaders.tfrecord_io import ShardVideoSource
from dataloaders.tokenizer import ClipTokenizer
from dataloaders.transforms import ClipTransform
from dataloaders.video_io import FileVideoSource
from engine import checkpoint as ckpt
from engine.checkpoint import load_weights
from engine.feature_cache import attach_visual_cache
from engine.flags import DEFAULT_CLIP_CONFIG_PATH, check_text_length, resolve_clip_config
from engine.host_malloc import configure_host_malloc
from engine.run_logging import claim_output_dir, setup_logging, write_config
from modules.clip_blocks import MultiheadSelfAttention
from modules.clip_model import CLIP, CLIPConfig, check_clip_config, clip_state_dict, infer_config, load_clip
from modules.fusion import FusionConfig
from modules.hf_text import load_hf_text_encoder
from modules.membridge import MemBridgeModel
from modules.methods import DEFAULT_METHOD, fusion_overrides, method_preset
from modules.model_config import ModelConfig, build_membridge, read_model_config
from modules.published_keys import (
    convert_hmmc_state_dict,
    convert_published_state_dict,
    is_hmmc_layout,
    is_openai_clip_layout,
    is_published_layout,
    openai_clip_to_ours,
)
from modules.stoa import DEFAULT_NUM_ACTIONS
from modules.video_clip import DEFAULT_TEMPORAL_LN_EPS

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


def file_source(args: argparse.Namespace, video_dir: str | None, train: bool) -> FileVideoSource | LmdbVideoSource:
    if getattr(args, "lmdb_path", None):  # HMMC's frame store (MCQ_HMMC.md B.9)
        sample = args.frame_sample if train else "uniform"
        quirks = getattr(args, "official_quirks", False)
        return LmdbVideoSource(args.lmdb_path, args.max_frames, args.lmdb_frames, sample, quirks)
    if not video_dir:
        raise ConfigError("--features_path (the folder of video files) is required for this dataset")
    return FileVideoSource(
        video_dir,
        max_frames=args.max_frames,
        feature_framerate=args.feature_framerate,
        slice_framepos=args.slice_framepos,
        frame_order=args.train_frame_order if train else args.eval_frame_order,
        pad_mode=args.pad_frames,
        frame_sampling=segment_sampling(getattr(args, "frame_sampling", "fps"), train),
    )


def segment_sampling(frame_sampling: str, train: bool) -> str:
    """``--frame_sampling`` for a training or evaluation set: ``segment_random`` draws in training only (MCQ's
    'rand' for training, 'uniform' = segment middles for evaluation)."""
    return "segment_middle" if frame_sampling == "segment_random" and not train else frame_sampling


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


def build_pretrain_set(args: argparse.Namespace, image_size: int, dist=None, frozen_encoder: nn.Module | None = None):
    """The pre-training set: WebVid (shards at ``--webvid_tfrecord`` or ``--webvid_video_dir``) or the retrieval
    dataset ``--train_datatype``; with ``--cache_visual_features`` (stage 2) the frame features of
    ``frozen_encoder`` are attached (see :func:`cache_visual_features`)."""
    source = webvid_source(args) if args.train_datatype == "webvid" else None
    dataset = build_dataset(args, args.train_datatype, "train", image_size, source=source)
    if getattr(args, "cache_visual_features", False):
        cache_visual_features(args, dataset, frozen_encoder, dist, image_size)
    return dataset


def cache_visual_features(args: argparse.Namespace, train_set, encoder: nn.Module, dist, image_size: int) -> None:
    """``--cache_visual_features``: per-video frame features of the frozen encoder, computed once and kept under
    ``--visual_cache_dir`` (default ``OUTPUT_DIR/visual_cache``), keyed by the frame-sampling settings. With T2VLP
    tubes / STOA objects (trained in stage 2) the ViT taps they read are cached too, keyed by the method as well
    (ViT-B/16, 12 frames: 7.3 MB per video for T2VLP, 14.5 MB for STOA; see engine/feature_cache.py)."""
    settings = {
        "max_frames": args.max_frames,
        "slice_framepos": args.slice_framepos,
        "pad_frames": args.pad_frames,
        "feature_framerate": args.feature_framerate,
        "image_size": image_size,
        "transform": args.transform,
        "train_datatype": args.train_datatype,
    }
    taps = getattr(encoder, "num_visual_taps", 0)
    if taps:  # MemBridge's settings (and so its cache key) stay as they were
        settings.update(method=args.method, visual_taps=taps)
    cache_root = Path(args.visual_cache_dir or Path(args.output_dir) / "visual_cache")
    attach_visual_cache(
        train_set, encoder, cache_root, settings, dist, args.batch_size_val, args.num_thread_reader, visual_taps=taps
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
    dataset = DATASETS[datatype](
        split,
        paths,
        source,
        ClipTransform(image_size, args.transform),
        tokenizer or text_tokenizer(args),
        args.max_words,
        expand_sentences=args.expand_msrvtt_sentences,
        rng_seed=args.seed,
    )
    if getattr(args, "method", None) == "stoa":
        attach_object_inputs(args, dataset, datatype, split)
    return dataset


def attach_object_inputs(args: argparse.Namespace, dataset, datatype: str, split: str) -> None:
    """``--method stoa``: every item carries its video's boxes (``video_extras``, dataloaders/detections.py) and,
    for WebVid training captions with ``--tag_file``, the noun/verb masks of the matching loss."""
    if not hasattr(dataset, "video_extras") and not hasattr(dataset, "video_dataset"):
        raise ConfigError(f"--method stoa has no object inputs for the {datatype} {split} dataset yet")
    reader = DetectionReader(args.objects_dir, args.labelmap_path, args.object_count)
    dataset.video_extras = reader.items
    if args.tag_file and split == "train" and datatype == "webvid":
        entries = json.loads(Path(args.train_csv).read_text())
        tags = TagReader(args.tag_file, [e["caption"] for e in entries], dataset.tokenizer, args.max_words)
        if dataset.extra_items is not None:
            raise ConfigError("--tag_file cannot be combined with another per-caption input (e.g. MCQ)")
        dataset.extra_items = lambda video_id, caption, rng: tags.items(caption)


def text_tokenizer(args: argparse.Namespace) -> ClipTokenizer | BertTextTokenizer:
    """CLIP's BPE, or with ``--language chinese`` the WordPiece vocabulary of ``--text_pretrain_path``."""
    if getattr(args, "language", "english") == "chinese":
        return BertTextTokenizer(args.text_pretrain_path)
    return ClipTokenizer()


def clip_architecture(args: argparse.Namespace) -> CLIPConfig | None:
    """The CLIP sizes to build, from the weights being loaded where there are any.

    ``--visual_pretrain_path``: inferred from that file by ``load_clip`` (None here; an explicit ``--clip_config``
    sets the head counts and is checked against the file). ``--init_model``: the model config stored with the
    checkpoint, else the shapes of its CLIP tensors (heads ``width // 64`` unless ``--clip_config`` gives them, which
    is then checked against the shapes). Otherwise ``--clip_config`` (default ``CLIP-modules/ViT-B-16.json``).
    """
    explicit = CLIPConfig.from_json(args.clip_config) if args.clip_config else None
    if args.visual_pretrain_path:
        return explicit
    if args.init_model:
        stored = read_model_config(args.init_model)
        try:
            inferred = stored.clip if stored is not None else infer_clip_config(args.init_model)
        except CheckpointError:
            if explicit is None:
                raise
            inferred = None  # inconsistent shapes: build --clip_config and let the loader list the wrong tensors
        if inferred is not None:
            if explicit is None:
                logger.info("CLIP sizes from --init_model %s: %s", args.init_model, inferred.to_dict())
                return inferred
            check_clip_config(explicit, inferred, args.init_model)
            return explicit
    return explicit or CLIPConfig.from_json(resolve_clip_config(args) or DEFAULT_CLIP_CONFIG_PATH)


def infer_clip_config(path: str) -> CLIPConfig | None:
    """CLIP sizes from the CLIP tensors of a weights file (ours or the published layout); None when it has none."""
    shapes = ckpt.read_weight_shapes(path)
    state = clip_state_dict(shapes)
    if "visual.proj" not in state:
        return None
    return infer_config(state, str(path))


def clip_image_size(args: argparse.Namespace) -> int:
    """The input resolution of the CLIP the flags build, without building it (datasets need it first)."""
    config = clip_architecture(args) or infer_clip_config(args.visual_pretrain_path)
    if config is None:
        raise ConfigError(f"--visual_pretrain_path {args.visual_pretrain_path} holds no CLIP weights")
    return config.image_resolution


def model_config(args: argparse.Namespace, clip_config: CLIPConfig, with_fusion: bool) -> ModelConfig:
    """The ModelConfig the flags describe, for a CLIP of ``clip_config``."""
    return ModelConfig(
        clip=clip_config,
        joint_layers=args.joint_layers,
        linear_patch=args.linear_patch,
        sim_header=args.sim_header,
        max_frames=args.max_frames,
        temporal_ln_eps=getattr(args, "temporal_ln_eps", DEFAULT_TEMPORAL_LN_EPS),
        fusion=build_fusion_config(args) if with_fusion else None,
        method=args.method,
        num_tubes=num_tubes(args),
        object_count=object_count(args),
    )


def object_count(args: argparse.Namespace) -> int:
    """STOA boxes per frame of the flags (0 unless the method makes object tokens)."""
    return args.object_count if method_preset(args.method).video_tokens == "object" else 0


def num_tubes(args: argparse.Namespace) -> int:
    """T2VLP tube tokens of the flags (0 unless the method makes tubes)."""
    return args.num_tubes if method_preset(args.method).video_tokens == "tube" else 0


def build_clip(args: argparse.Namespace) -> CLIP:
    """CLIP with OpenAI weights from ``--visual_pretrain_path``, or randomly initialised at the sizes of
    :func:`clip_architecture`. ``--max_words`` is checked against the text positional table of what was built."""
    clip = load_clip(path=args.visual_pretrain_path, config=clip_architecture(args))
    check_text_length(args.max_words, clip.config.context_length, args.visual_pretrain_path or args.clip_config)
    return clip


def build_fusion_config(args: argparse.Namespace) -> FusionConfig:
    """The fusion sizes: ``fusion.json`` under --cross_config_path, overridden by the explicit fusion flags; the
    layout switches come from the ``--method`` preset unless given (``modules/methods.py``)."""
    layout = fusion_overrides(args.method, args.bridge_source, args.fusion_attention, args.fusion_pos, args.plm_mode)
    if getattr(args, "head_dropout", None) is not None:
        layout["dropout"] = args.head_dropout
    objects = object_count(args)
    tubes = num_tubes(args) or (2 * objects + DEFAULT_NUM_ACTIONS if objects else 0)  # video-only extra tokens
    return FusionConfig.from_json(
        args.cross_config_path,
        layers=args.fusion_layers,
        num_bridge_tokens=tubes or args.num_bridge_tokens,
        memory_size=args.memory_size,
        official_quirks=args.official_quirks or None,  # the flag turns the quirks on; so does the JSON
        max_frames=args.max_frames,
        max_words=args.max_words,
        **layout,
    )


def build_model(args: argparse.Namespace, with_fusion: bool) -> MemBridgeModel:
    """Dual encoder (+ fusion initialised from the CLIP text blocks), then ``--init_model`` weights. The model
    carries its ``ModelConfig`` (``model.model_config``), which every checkpoint stores with the weights.

    When the loaded weights carry no fusion (a stage-1 checkpoint), the fusion is initialised from the *loaded*
    CLIP text blocks and positional embedding, as stage 2 starts from the stage-1 CLIP.
    """
    stored = read_model_config(args.init_model) if args.init_model else None
    if args.method == "stoa" and not with_fusion:
        raise ConfigError(
            "--method stoa has no stage 1 of its own: train stage 1 with --method membridge and pass that checkpoint "
            "as --init_model of main_task_fusion.py --method stoa"
        )
    stoa_from_stage1 = args.method == "stoa" and stored is not None and stored.method == DEFAULT_METHOD
    if stoa_from_stage1 and stored.fusion is not None:
        raise ConfigError(
            f"--init_model {args.init_model} is a membridge model with a fusion; --method stoa starts from a "
            "stage-1 (dual encoder) checkpoint"
        )
    if stored is not None and stored.method != args.method and not stoa_from_stage1:
        raise ConfigError(
            f"--init_model {args.init_model} is a --method {stored.method} model; pass --method {stored.method}"
        )
    clip = build_clip(args)
    model = build_membridge(model_config(args, clip.config, with_fusion), clip)
    if getattr(args, "language", "english") == "chinese":  # HMMC's Chinese text encoder replaces CLIP's text tower
        pad_id = BertTextTokenizer(args.text_pretrain_path).pad_id
        model.encoder.text_hf = load_hf_text_encoder(args.text_pretrain_path, clip.config.embed_dim, pad_id)
    if getattr(args, "temporal_init", "clip_text") == "random":
        model.encoder.init_temporal_random()  # HMMC's init; --init_model weights still replace it
    report = load_init_model(args, model)
    if model.fusion is not None and report is not None and any(k.startswith("fusion.") for k in report.missing):
        logger.info("--init_model has no fusion weights: initialising the fusion from its CLIP text encoder")
        model.fusion.init_from_clip(model.encoder.clip)
    objects = model.encoder.objects
    if objects is not None and report is not None and any(k.startswith("encoder.objects.") for k in report.missing):
        logger.info("--init_model has no STOA object module: initialising its blocks from the loaded ViT")
        objects.init_from_visual(model.encoder.clip.visual)
    return model


def load_init_model(args: argparse.Namespace, model: nn.Module):
    """``--init_model``: weights only (ours or the published key layout), with a report of missing / unexpected
    keys; wrong shapes are errors. Returns the LoadReport (None without --init_model)."""
    if not args.init_model:
        return None
    fusion = getattr(model, "fusion", None)
    fusion_layers = fusion.config.layers if fusion is not None else 0

    def key_map(state: dict) -> dict:
        if is_hmmc_layout(state):  # HMMC's released checkpoints (MCQ_HMMC.md C.4)
            conversion = convert_hmmc_state_dict(state, strict=True)
            logger.info("%s", conversion.report())
            return conversion.state_dict
        if is_openai_clip_layout(state):  # a bare OpenAI-layout CLIP, e.g. MCQ's MCQ_CLIP.pth (MCQ_HMMC.md C.3)
            logger.info("--init_model holds an OpenAI-layout CLIP: loading it as encoder.clip")
            return openai_clip_to_ours(state)
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
    """Process-wide settings from the flags: the host allocator (--host_malloc), torch CPU threads
    (--torch_threads) and the seeds (--seed)."""
    configure_host_malloc(getattr(args, "host_malloc", "auto"), cuda=torch.cuda.is_available())
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    seed_everything(args.seed)
