"""The video/text dual encoder: CLIP's ViT over frames with joint attention in its last layers, CLIP4Clip's heads.

Video: ViT blocks ``0..N-1-J`` run per frame; the last ``J`` blocks attend jointly over the tokens of all frames of a
video (masked frames are hidden as keys); each frame's CLS goes through ``ln_post @ proj``. Similarity heads follow
CLIP4Clip: ``meanP`` (parameter-free), ``seqLSTM`` / ``seqTransf`` (a residual temporal module over frame features,
then meanP) and ``tightTransf`` (a cross transformer over ``[text; frames]`` with a linear scorer).

Parameter names follow CLIP4Clip / MemBridge (``clip.*``, ``clip.visual.conv2``, ``frame_position_embeddings``,
``transformerClip``, ``lstm_visual``, ``cross.*``, ``similarity_dense``) so their checkpoints load unchanged.
Shapes: ``video [B, T, 3, S, S]``, ``video_mask [B, T]`` (1 = real frame), ``text_ids [B, L]``, features ``D``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dataloaders.errors import ConfigError
from modules.clip_blocks import LayerNorm, QuickGELU, Transformer
from modules.clip_model import CLIP
from modules.stoa import ObjectActionOutput, ObjectActionTokens
from modules.t2vlp import TUBE_BLOCKS, TubeTokens

SIM_HEADERS = ("meanP", "seqLSTM", "seqTransf", "tightTransf")
LINEAR_PATCHES = ("2d", "3d")
DEFAULT_JOINT_LAYERS = 2
DEFAULT_MAX_FRAMES = 12
DEFAULT_TEMPORAL_LAYERS = 4
DEFAULT_TEMPORAL_LN_EPS = 1e-5  # our LayerNorm; CLIP4Clip's / HMMC's temporal blocks use 1e-12 (--temporal_ln_eps)
"""Blocks of the seqTransf / tightTransf transformers (CLIP4Clip's ``--cross_num_hidden_layers``)."""
CROSS_DROPOUT = 0.1
"""Embedding dropout of the tightTransf cross encoder (CLIP4Clip's cross-base ``hidden_dropout_prob``)."""
INIT_RANGE = 0.02
"""Std of the normal init of the new linear layers (CLIP4Clip's ``initializer_range``)."""
MAX_LOGIT_SCALE = math.log(100)
TRAINED_WHEN_FROZEN = ("ln_final.", "text_projection", "logit_scale", "visual.ln_post.", "visual.proj", "visual.conv2.")
"""CLIP parameters that ``--freeze_layer_num`` never freezes (CLIP4Clip's list, plus the 3d patch conv)."""


def additive_key_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, N]`` 1/0 -> additive ``[B, 1, 1, N]`` mask hiding the 0 positions as keys."""
    hidden = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask == 0, torch.finfo(dtype).min)
    return hidden[:, None, None, :]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, T, D]`` over the frames where ``mask [B, T]`` is 1 (all-masked rows give 0)."""
    keep = (mask > 0).unsqueeze(-1)
    total = torch.where(keep, x, torch.zeros_like(x)).sum(dim=1)
    return total / keep.sum(dim=1).clamp(min=1).to(x.dtype)


def _linear(width_in: int, width_out: int) -> nn.Linear:
    layer = nn.Linear(width_in, width_out)
    nn.init.normal_(layer.weight, std=INIT_RANGE)
    nn.init.zeros_(layer.bias)
    return layer


class CrossEmbeddings(nn.Module):
    """Learned positions plus dropout (CLIP4Clip's ``cross.embeddings``)."""

    def __init__(self, positions: int, width: int, dropout: float):
        super().__init__()
        self.position_embeddings = nn.Embedding(positions, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.position_embeddings.weight[: x.shape[1]].to(x.dtype))


class CrossPooler(nn.Module):
    """``QuickGELU(dense(ln_pool(x)[:, 0]))`` (CLIP4Clip's ``cross.pooler``)."""

    def __init__(self, width: int):
        super().__init__()
        self.ln_pool = LayerNorm(width)
        self.dense = _linear(width, width)
        self.activation = QuickGELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(self.ln_pool(x)[:, 0]))


class CrossEncoder(nn.Module):
    """The tightTransf cross transformer over ``[text; frames]`` sequences (keys ``cross.*``)."""

    def __init__(self, positions: int, width: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.embeddings = CrossEmbeddings(positions, width, dropout)
        self.transformer = Transformer(width, layers, heads)
        self.pooler = CrossPooler(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [B, N, D]``, ``mask [B, N]`` -> pooled ``[B, D]``."""
        x = self.transformer(self.embeddings(x), additive_key_mask(mask, x.dtype))
        return self.pooler(x)


class VideoCLIP(nn.Module):
    """CLIP dual encoder for video and text with CLIP4Clip's similarity heads.

    ``loose_type`` (the dual-encoder cosine path) holds for every header but ``tightTransf``. The seq/tight heads are
    initialised from CLIP's text positional embedding and text blocks, as in CLIP4Clip, so build this module after the
    CLIP weights are loaded.
    """

    def __init__(
        self,
        clip: CLIP,
        joint_layers: int = DEFAULT_JOINT_LAYERS,
        linear_patch: str = "2d",
        sim_header: str = "meanP",
        max_frames: int = DEFAULT_MAX_FRAMES,
        temporal_layers: int = DEFAULT_TEMPORAL_LAYERS,
        cross_dropout: float = CROSS_DROPOUT,
        num_tubes: int = 0,
        object_count: int = 0,
        official_quirks: bool = False,
        temporal_ln_eps: float = DEFAULT_TEMPORAL_LN_EPS,
    ):
        super().__init__()
        config = clip.config
        if not 0 <= joint_layers <= config.vision_layers:
            raise ConfigError(f"--joint_layers {joint_layers} must be within 0..{config.vision_layers} (ViT depth)")
        if linear_patch not in LINEAR_PATCHES:
            raise ConfigError(f"--linear_patch {linear_patch!r} must be one of {LINEAR_PATCHES}")
        if sim_header not in SIM_HEADERS:
            raise ConfigError(f"--sim_header {sim_header!r} must be one of {SIM_HEADERS}")
        self.clip = clip
        self.joint_layers = joint_layers
        self.linear_patch = linear_patch
        self.sim_header = sim_header
        self.max_frames = max_frames
        self.tubes: TubeTokens | None = None
        if num_tubes:  # --method t2vlp: video-only tube tokens (modules/t2vlp.py), initialised from the ViT
            self.tubes = TubeTokens(config.vision_width, config.embed_dim, num_tubes, config.vision_heads)
            self.tubes.init_from_visual(clip.visual)
        self.objects: ObjectActionTokens | None = None
        if object_count:  # --method stoa: trajectory + action tokens (modules/stoa.py), initialised from the ViT
            self.objects = ObjectActionTokens(
                config.vision_width, config.embed_dim, max_frames, object_count, heads=config.vision_heads,
                official_quirks=official_quirks,
            )  # fmt: skip
            self.objects.init_from_visual(clip.visual)
        self.text_hf: nn.Module | None = None  # --language chinese: modules/hf_text.py replaces CLIP's text tower
        if linear_patch == "3d" and clip.visual.conv2 is None:
            clip.visual.enable_3d_patch()
        if linear_patch == "2d" and clip.visual.conv2 is not None:
            raise ConfigError("this CLIP already has a 3d patch embedding (visual.conv2): use --linear_patch 3d")
        if sim_header == "meanP":
            return
        width = config.embed_dim
        if config.transformer_width != width:
            raise ConfigError(
                f"--sim_header {sim_header} needs CLIP transformer_width ({config.transformer_width}) == embed_dim "
                f"({width}), as in OpenAI's ViT models: use meanP with this backbone"
            )
        frames_limit = config.context_length - (1 if sim_header == "tightTransf" else 0)
        if max_frames > frames_limit:
            raise ConfigError(
                f"--max_frames {max_frames} exceeds {frames_limit}, the most --sim_header {sim_header} holds"
            )
        heads = config.transformer_heads
        if sim_header == "seqLSTM":
            self.lstm_visual = nn.LSTM(input_size=width, hidden_size=width, batch_first=True, num_layers=1)
        elif sim_header == "seqTransf":
            self.frame_position_embeddings = nn.Embedding(config.context_length, width)
            self.transformerClip = Transformer(width, temporal_layers, heads)
            self._init_from_text(self.frame_position_embeddings.weight, self.transformerClip)
            for module in self.transformerClip.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = temporal_ln_eps  # HMMC / CLIP4Clip's TF-style LayerNorm: 1e-12
        else:
            self.cross = CrossEncoder(config.context_length, width, temporal_layers, heads, cross_dropout)
            self.similarity_dense = _linear(width, 1)
            self._init_from_text(self.cross.embeddings.position_embeddings.weight, self.cross.transformer)

    def _init_from_text(self, positions: torch.Tensor, transformer: Transformer) -> None:
        """CLIP4Clip's trick: copy CLIP's text positional embedding and its first text blocks."""
        with torch.no_grad():
            positions.copy_(self.clip.positional_embedding)
            for source, target in zip(self.clip.transformer.resblocks, transformer.resblocks, strict=False):
                target.load_state_dict(source.state_dict())

    def init_temporal_random(self) -> None:
        """HMMC's init of the seqTransf temporal module (``--temporal_init random``, MCQ_HMMC.md §B.10): frame
        positions ~ N(0, 1) and PyTorch's defaults for the blocks (``nn.MultiheadAttention``: xavier-uniform input
        projection, zero biases; Linear: kaiming-uniform; LayerNorm 1 / 0) instead of copies of CLIP's text parts."""
        if self.sim_header != "seqTransf":
            raise ConfigError(
                f"--temporal_init random re-initialises seqTransf's temporal module, not {self.sim_header}"
            )
        with torch.no_grad():
            nn.init.normal_(self.frame_position_embeddings.weight)
            for block in self.transformerClip.resblocks:
                nn.init.xavier_uniform_(block.attn.in_proj_weight)
                nn.init.zeros_(block.attn.in_proj_bias)
                block.attn.out_proj.reset_parameters()
                nn.init.zeros_(block.attn.out_proj.bias)
                for module in (block.mlp.c_fc, block.mlp.c_proj, block.ln_1, block.ln_2):
                    module.reset_parameters()

    @property
    def loose_type(self) -> bool:
        """True for the dual-encoder (cosine) path, False for tightTransf."""
        return self.sim_header != "tightTransf"

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    # ----- encoders -----

    def encode_video(
        self,
        video: torch.Tensor,
        video_mask: torch.Tensor | None = None,
        return_tap: bool = False,
        return_layer_tokens: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """``[B, T, 3, S, S]`` -> per-frame features ``[B, T, D]``; the last ``J`` ViT blocks attend across frames.

        ``return_tap`` also returns the tokens entering ViT block ``N - TUBE_BLOCKS`` (block 10 of ViT-B/16), per
        frame ``[B, T, 1+P, W]``, with their gradient (the tube tokens' input, :mod:`modules.t2vlp`).
        ``return_layer_tokens`` instead returns the *input* tokens of every ViT block, each ``[B, T, 1+P, W]`` (frame
        CLS first), for MCQ's BridgeFormer (modules/bridgeformer.py).
        """
        if return_tap and return_layer_tokens:
            raise ValueError("encode_video returns either the tube tap or every block's input tokens, not both")
        b, t = video.shape[:2]
        visual = self.clip.visual
        x = visual.embed_video(video)  # [B*T, 1+P, W]
        n_tokens, width = x.shape[1:]
        blocks = list(visual.blocks)
        split = len(blocks) - self.joint_layers
        tap_at = max(0, len(blocks) - TUBE_BLOCKS)
        tap, layers = None, []
        if self.joint_layers:
            if video_mask is None:
                video_mask = torch.ones(b, t, dtype=torch.long, device=video.device)
            key_mask = additive_key_mask(video_mask.repeat_interleave(n_tokens, dim=1), x.dtype)
        for index, block in enumerate(blocks):
            if return_tap and index == tap_at:
                tap = x.reshape(b, t, n_tokens, width)
            if return_layer_tokens:
                layers.append(x.reshape(b, t, n_tokens, width))
            if index == split:
                x = x.reshape(b, t * n_tokens, width)
            x = block(x, key_mask) if index >= split else block(x)
        x = x.reshape(b * t, n_tokens, width)
        if return_tap and tap is None:  # no blocks at all
            tap = x.reshape(b, t, n_tokens, width)
        frames = visual.head(x[:, 0]).reshape(b, t, -1)
        if return_layer_tokens:
            return frames, layers
        return (frames, tap) if return_tap else frames

    def encode_video_objects(
        self, video: torch.Tensor, video_mask: torch.Tensor, batch: dict
    ) -> tuple[torch.Tensor, ObjectActionOutput]:
        """STOA: frame features ``[B, T, D]`` and the trajectory / action tokens from the inputs of the last two ViT
        blocks and the batch's ``object_boxes``, ``object_classes``, ``trajectory_ids`` (dataloaders/detections.py).
        The object tokens keep the gradient of the ViT below the last block (B.3)."""
        missing = [k for k in ("object_boxes", "object_classes", "trajectory_ids") if k not in batch]
        if missing:
            raise ValueError(f"--method stoa needs the batch keys {missing} (DetectionReader, --objects_dir)")
        frames, layers = self.encode_video(video, video_mask, return_layer_tokens=True)
        tap10, tap11 = layers[-TUBE_BLOCKS], layers[-1]
        out = self.objects(
            tap10, tap11, batch["object_boxes"], batch["object_classes"], batch["trajectory_ids"], video_mask
        )
        return frames, out

    @property
    def num_visual_taps(self) -> int:
        """ViT taps the video-token module reads (``--cache_visual_features`` stores them): 1 for T2VLP tubes (the
        block N-2 input), 2 for STOA objects (the block N-2 and N-1 inputs), 0 otherwise."""
        return 2 if self.objects is not None else 1 if self.tubes is not None else 0

    @torch.no_grad()
    def visual_taps(self, video: torch.Tensor, video_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the frozen ViT gives the trainable video-token module: frame features ``[B, T, D]`` and the taps
        ``[B, num_visual_taps, T, 1+P, W]`` (T2VLP: the tokens entering block N-2; STOA: those entering blocks N-2
        and N-1), without gradient. :meth:`tokens_from_taps` turns them into the tokens."""
        if self.objects is not None:
            frames, layers = self.encode_video(video, video_mask, return_layer_tokens=True)
            return frames, torch.stack([layers[-TUBE_BLOCKS], layers[-1]], dim=1)
        if self.tubes is not None:
            frames, tap = self.encode_video(video, video_mask, return_tap=True)
            return frames, tap.unsqueeze(1)
        raise ValueError("visual_taps: this encoder has no tube or object module")

    def tokens_from_taps(
        self, taps: torch.Tensor, video_mask: torch.Tensor, batch: dict | None = None
    ) -> torch.Tensor | ObjectActionOutput:
        """The video-only tokens from cached :meth:`visual_taps`: tubes ``[B, K, D]``, or STOA's
        :class:`ObjectActionOutput` (boxes from ``batch``)."""
        if taps.shape[1] != self.num_visual_taps:
            raise ValueError(f"{taps.shape[1]} cached ViT taps; this encoder reads {self.num_visual_taps}")
        if self.objects is not None:
            batch = batch or {}
            missing = [k for k in ("object_boxes", "object_classes", "trajectory_ids") if k not in batch]
            if missing:
                raise ValueError(f"--method stoa needs the batch keys {missing} (DetectionReader, --objects_dir)")
            return self.objects(
                taps[:, 0], taps[:, 1], batch["object_boxes"], batch["object_classes"], batch["trajectory_ids"],
                video_mask,
            )  # fmt: skip
        return self.tubes(taps[:, 0], video_mask)

    def encode_video_tokens(
        self,
        video: torch.Tensor,
        video_mask: torch.Tensor,
        detach_tap: bool = False,
        batch: dict | None = None,
        return_mask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Frame features ``[B, T, D]`` and the video-only extra tokens of the method (T2VLP tube tokens
        ``[B, K, D]``, STOA trajectory + action tokens ``[B, 2O + 4, D]`` from ``batch``'s boxes; None without).
        ``detach_tap``: the tubes' ViT input carries no gradient (stage 2 and downstream, as published; stage 1
        keeps it). ``return_mask`` adds the tokens' key mask ``[B, K]`` (STOA: empty trajectory slots are False;
        None for tubes, which are all real)."""
        mask = None
        if self.objects is not None:
            frames, out = self.encode_video_objects(video, video_mask, batch or {})
            frames, tokens, mask = frames, out.tokens, out.token_mask
        elif self.tubes is None:
            frames, tokens = self.encode_video(video, video_mask), None
        else:
            frames, tap = self.encode_video(video, video_mask, return_tap=True)
            tokens = self.tubes(tap.detach() if detach_tap else tap, video_mask)
        return (frames, tokens, mask) if return_mask else (frames, tokens)

    def text_features(self, text_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` -> unnormalised EOT features ``[B, D]`` (with ``text_hf``: its pooled feature)."""
        if self.text_hf is not None:
            return self.text_hf(text_ids)[0]
        return self.clip.encode_text(text_ids)

    def text_tokens_and_features(self, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, L]`` -> ``(per-position features [B, L, D], text features [B, D])`` of the text tower in use."""
        if self.text_hf is not None:
            features, tokens = self.text_hf(text_ids)
            return tokens, features
        tokens = self.clip.encode_text_tokens(text_ids)
        return tokens, tokens[torch.arange(tokens.shape[0], device=tokens.device), text_ids.argmax(dim=-1)]

    def text_embedding(self, text_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` -> L2-normalised text embeddings ``[B, D]``."""
        return F.normalize(self.text_features(text_ids), dim=-1)

    # ----- similarity heads -----

    def _check_frames(self, t: int, limit: int) -> None:
        if t > limit:
            raise ConfigError(
                f"{t} frames exceed the {limit} positions of --sim_header {self.sim_header}: lower --max_frames"
            )

    def temporal(self, frame_feats: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """The residual temporal module of seqLSTM / seqTransf (identity otherwise): ``[B, T, D]`` -> ``[B, T, D]``.

        seqLSTM runs over the valid frames, which the batch contract places first (padding at the end).
        """
        if self.sim_header == "seqLSTM":
            lengths = video_mask.sum(dim=-1).clamp(min=1).cpu()
            packed = pack_padded_sequence(frame_feats, lengths, batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(
                self.lstm_visual(packed)[0], batch_first=True, total_length=frame_feats.shape[1]
            )
            return out + frame_feats
        if self.sim_header == "seqTransf":
            t = frame_feats.shape[1]
            self._check_frames(t, self.frame_position_embeddings.num_embeddings)
            x = frame_feats + self.frame_position_embeddings.weight[:t].to(frame_feats.dtype)
            return self.transformerClip(x, additive_key_mask(video_mask, x.dtype)) + frame_feats
        return frame_feats

    def video_embedding(self, frame_feats: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` -> ``[B, D]``: temporal module, normalise frames, masked mean, normalise (meanP)."""
        frames = F.normalize(self.temporal(frame_feats, video_mask), dim=-1)
        return F.normalize(masked_mean(frames, video_mask), dim=-1)

    def similarity(self, text_emb: torch.Tensor, video_emb: torch.Tensor) -> torch.Tensor:
        """Dual-encoder logits ``exp(logit_scale) * cos``: ``[Bt, D] x [Bv, D]`` -> ``[Bt, Bv]``."""
        return self.clip.logit_scale.exp() * text_emb @ video_emb.t()

    def tight_similarity(
        self, text_feats: torch.Tensor, frame_feats: torch.Tensor, video_mask: torch.Tensor
    ) -> torch.Tensor:
        """tightTransf logits: the cross encoder over ``[text; frames]`` for every pair -> ``[Bt, Bv]``."""
        bt, (bv, t, d) = text_feats.shape[0], frame_feats.shape
        self._check_frames(t + 1, self.cross.embeddings.position_embeddings.num_embeddings)
        text = text_feats[:, None, None, :].expand(bt, bv, 1, d)
        frames = frame_feats[None].expand(bt, bv, t, d)
        tokens = torch.cat([text, frames], dim=2).reshape(bt * bv, t + 1, d)
        mask = torch.cat([torch.ones_like(video_mask[:, :1]), video_mask], dim=1)
        mask = mask[None].expand(bt, bv, t + 1).reshape(bt * bv, t + 1)
        return self.similarity_dense(self.cross(tokens, mask)).reshape(bt, bv)

    def similarity_logits(
        self, text_feats: torch.Tensor, frame_feats: torch.Tensor, video_mask: torch.Tensor
    ) -> torch.Tensor:
        """Text-video logits ``[Bt, Bv]`` from unnormalised text features and frame features, for any header."""
        if not self.loose_type:
            return self.tight_similarity(text_feats, frame_feats, video_mask)
        return self.similarity(F.normalize(text_feats, dim=-1), self.video_embedding(frame_feats, video_mask))

    def forward(self, text_ids: torch.Tensor, video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B_text, B_video]`` of every text against every video of the batch."""
        return self.similarity_logits(self.text_features(text_ids), self.encode_video(video, video_mask), video_mask)

    # ----- training helpers -----

    def clamp_logit_scale_(self) -> None:
        """Keep ``exp(logit_scale) <= 100`` (call after each optimizer step)."""
        with torch.no_grad():
            self.clip.logit_scale.clamp_(max=MAX_LOGIT_SCALE)

    def freeze_layers(self, n: int) -> list[str]:
        """CLIP4Clip's ``--freeze_layer_num``: freeze CLIP's embeddings and blocks ``< n`` of both towers.

        The output layers (``ln_final``, ``text_projection``, ``logit_scale``, ``visual.ln_post``, ``visual.proj``),
        the 3d patch conv and blocks ``>= n`` stay trainable; ``-1`` freezes nothing. Returns the frozen names.
        """
        depth = max(self.clip.config.vision_layers, self.clip.config.transformer_layers)
        if not -1 <= n <= depth:
            raise ConfigError(f"--freeze_layer_num {n} must be within -1..{depth} (CLIP depth)")
        if n < 0:
            return []
        frozen = []
        for name, param in self.clip.named_parameters():
            if name.startswith(TRAINED_WHEN_FROZEN):
                continue
            if name.startswith(("visual.transformer.resblocks.", "transformer.resblocks.")):
                if int(name.split(".resblocks.")[1].split(".")[0]) >= n:
                    continue
            param.requires_grad_(False)
            frozen.append(f"clip.{name}")
        return frozen
