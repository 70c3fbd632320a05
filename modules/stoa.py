"""STOA-VLP object-trajectory and action tokens: ``2 O + N_act`` video-only tokens from the ViT and the boxes.

Per video (spec ``T2VLP_STOA.md`` B.3-B.5), from the per-frame tokens entering the last two ViT blocks
(``tap10 [B, T, 1+P, W]``: block 10 of ViT-B/16; ``tap11``: block 11, the output of joint block 10) and the boxes
(``boxes [B, T, O, 4]`` normalised ``[x1, y1, x2, y2]``, padding ``-1``; ``classes [B, T, O]``, padding 0;
``traj_ids [B, 2 O]``, padding 0; see :mod:`dataloaders.detections`):

1. **Object tokens** (:class:`ObjectEncoder`): the patch grid ``G_t = tap11_t[1:]`` (``g x g``) is RoIAligned
   (``torchvision.ops.roi_align``, output ``g x g``, ``sampling_ratio -1``, ``aligned=True``) to every box scaled to
   the grid; each sample point goes through ``patch_to_d`` (Linear W->W/2 -> ReLU -> Linear W/2->W -> ReLU, no
   biases), max over the points, ``+ box_categories[t, o]`` (zeros at init) ``+ coord_to_feature(box)`` (same MLP
   shape on the 4 coordinates).
2. **Trajectory tokens**: ``O_hat = objects + frame_pos[t]``; trajectory ``j`` = every box slot whose class equals
   ``traj_ids[j]`` over all frames (S9: grouping by class, no tracking); sequence ``[cls ; O_hat]`` with the other
   slots hidden; the 2-block trajectory transformer (initialised from ViT blocks 10/11; under ``official_quirks``
   only block 0 runs, S3); ``tau_j = ln_post(out[0]) @ proj``. Valid: ``traj_ids != 0``.
3. **Action tokens**: ``N_act`` queries attend per frame over the (detached) patch tokens of ``tap10`` and the
   frame's object tokens ``O_hat_t`` (padding objects hidden); head = the valid-frame mean of ``tap10``'s CLS;
   sequence ``[head, a_{n,1..T}]`` through the 2-block action transformer (padded frames hidden);
   ``alpha_n = ln_post(out[0]) @ proj``.

The fusion receives ``[tau_1 .. tau_2O, alpha_1 .. alpha_Nact]`` as its extra tokens (``bridge_source object``).
Parameter names: ``encoder.*`` (``patch_to_d``, ``box_categories``, ``coord_to_feature``), ``frame_pos``,
``cls_embedding``, ``trajectory.*`` (``blocks``, ``ln_post``, ``proj``), ``action_queries``, ``action.*``
(published: ``clip.visual.transformer.object_encoder.*``, ``clip.object_frame_pos_emb``,
``clip.object_cls_embedding``, ``clip.object_fusion.*``, ``clip.object_action``, ``clip.object_act_fusion.*``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import roi_align

from modules.clip_blocks import LayerNorm, Transformer, default_heads

logger = logging.getLogger(__name__)

DEFAULT_OBJECT_COUNT = 10  # O (--object_count)
DEFAULT_NUM_ACTIONS = 4  # N_act
OBJECT_BLOCKS = 2  # trajectory / action transformer depth (copied from the last two ViT blocks)
FRAME_POS_STD = 0.01


def _mlp(inputs: int, width: int) -> nn.Sequential:
    """Linear(inputs, W/2) -> ReLU -> Linear(W/2, W) -> ReLU, no biases (``patch_to_d``, ``c_coord_to_feature``)."""
    return nn.Sequential(
        nn.Linear(inputs, width // 2, bias=False), nn.ReLU(), nn.Linear(width // 2, width, bias=False), nn.ReLU()
    )


def grid_side(num_patches: int) -> int:
    """Side ``g`` of a square patch grid of ``num_patches`` tokens (ValueError when not square)."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    return side


def roi_features(grid: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """RoIAlign every box of every frame onto a full grid: ``grid [N, g*g, W]`` (patch tokens, row-major),
    ``boxes [N, O, 4]`` normalised -> sample points ``[N, O, g*g, W]`` (``aligned=True``, adaptive sampling)."""
    n, p, w = grid.shape
    g = grid_side(p)
    fmap = grid.transpose(1, 2).reshape(n, w, g, g)
    o = boxes.shape[1]
    index = torch.arange(n, device=grid.device, dtype=grid.dtype).repeat_interleave(o).unsqueeze(1)
    rois = torch.cat([index, boxes.reshape(n * o, 4).to(grid.dtype) * g], dim=1)
    out = roi_align(fmap, rois, output_size=(g, g), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out.reshape(n, o, w, g * g).transpose(2, 3)


class ObjectEncoder(nn.Module):
    """Object tokens from the patch grid and the boxes (B.3)."""

    def __init__(self, width: int, max_frames: int, object_count: int):
        super().__init__()
        self.patch_to_d = _mlp(width, width)
        self.box_categories = nn.Parameter(torch.zeros(max_frames, object_count, width))
        self.coord_to_feature = _mlp(4, width)

    def forward(self, tap: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``tap [B, T, 1+P, W]``, ``boxes [B, T, O, 4]`` -> object tokens ``[B, T, O, W]``."""
        b, t, _, w = tap.shape
        o = boxes.shape[2]
        points = roi_features(tap[:, :, 1:].reshape(b * t, -1, w), boxes.reshape(b * t, o, 4))
        pooled = self.patch_to_d(points).amax(dim=2).reshape(b, t, o, w)
        coords = self.coord_to_feature(boxes.to(pooled.dtype))
        return pooled + self.box_categories[:t, :o].to(pooled.dtype) + coords


class _Head(nn.Module):
    """A 2-block transformer with ``ln_post`` and ``proj`` (the published ``object_fusion`` / ``object_act_fusion``)."""

    def __init__(self, width: int, embed_dim: int, heads: int):
        super().__init__()
        self.blocks = Transformer(width, OBJECT_BLOCKS, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, depth: int | None = None) -> torch.Tensor:
        """``ln_post(out[:, 0]) @ proj`` after the first ``depth`` blocks (all by default)."""
        for block in list(self.blocks.resblocks)[:depth]:
            x = block(x, mask)
        return self.ln_post(x[:, 0]) @ self.proj.to(x.dtype)


@dataclass
class ObjectActionOutput:
    """The extra tokens of a batch of videos and their parts."""

    trajectories: torch.Tensor  # [B, 2O, E]
    actions: torch.Tensor  # [B, N_act, E]
    trajectory_valid: torch.Tensor  # [B, 2O] bool

    @property
    def tokens(self) -> torch.Tensor:
        """``[B, 2O + N_act, E]``: what the fusion receives."""
        return torch.cat([self.trajectories, self.actions], dim=1)

    @property
    def token_mask(self) -> torch.Tensor:
        """``[B, 2O + N_act]`` bool, ``[id_list != 0, 1 .. 1]`` (spec B.6): the fusion hides the empty trajectory
        slots as key padding (``FusionInputs.extra_mask``)."""
        ones = torch.ones(self.actions.shape[:2], dtype=torch.bool, device=self.actions.device)
        return torch.cat([self.trajectory_valid.bool(), ones], dim=1)


def _additive(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill(hidden, float("-inf"))


class ObjectActionTokens(nn.Module):
    """Object encoder, trajectory encoder and action tokens of STOA-VLP (module docstring)."""

    def __init__(
        self,
        width: int,
        embed_dim: int,
        max_frames: int,
        object_count: int = DEFAULT_OBJECT_COUNT,
        num_actions: int = DEFAULT_NUM_ACTIONS,
        heads: int | None = None,
        official_quirks: bool = False,
    ):
        super().__init__()
        heads = heads or default_heads(width)
        self.object_count = object_count
        self.num_actions = num_actions
        self.official_quirks = official_quirks
        self.encoder = ObjectEncoder(width, max_frames, object_count)
        self.frame_pos = nn.Parameter(torch.randn(max_frames, width) * FRAME_POS_STD)
        self.cls_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.trajectory = _Head(width, embed_dim, heads)
        self.action_queries = nn.Parameter(torch.randn(num_actions, width) * width**-0.5)
        self.action = _Head(width, embed_dim, heads)

    @property
    def num_tokens(self) -> int:
        return 2 * self.object_count + self.num_actions

    @torch.no_grad()
    def init_from_visual(self, visual: nn.Module) -> None:
        """Trajectory / action blocks <- the last two ViT blocks; ``ln_post`` / ``proj`` <- the ViT's."""
        source = list(visual.blocks)[-OBJECT_BLOCKS:]
        for head in (self.trajectory, self.action):
            for target, block in zip(head.blocks.resblocks, source, strict=False):
                target.load_state_dict(block.state_dict())
            head.ln_post.load_state_dict(visual.ln_post.state_dict())
            head.proj.copy_(visual.proj)

    def object_tokens(self, tap11: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``O_hat [B, T, O, W]``: object tokens plus the frame positional embedding."""
        objects = self.encoder(tap11, boxes)
        return objects + self.frame_pos[: objects.shape[1], None].to(objects.dtype)

    def trajectories(self, objects: torch.Tensor, classes: torch.Tensor, traj_ids: torch.Tensor) -> torch.Tensor:
        """``tau [B, 2O, E]`` from ``O_hat [B, T, O, W]`` grouped by class."""
        b, t, o, w = objects.shape
        j = traj_ids.shape[1]
        slots = objects.reshape(b, 1, t * o, w).expand(b, j, t * o, w)
        cls = self.cls_embedding.to(objects.dtype).expand(b, j, 1, w)
        seq = torch.cat([cls, slots], dim=2).reshape(b * j, 1 + t * o, w)
        hidden = classes.reshape(b, 1, t * o) != traj_ids.unsqueeze(-1)  # [B, 2O, T*O]
        hidden = torch.cat([torch.zeros_like(hidden[..., :1]), hidden], dim=-1).reshape(b * j, 1, 1, 1 + t * o)
        depth = 1 if self.official_quirks else None  # S3: the published key-padding path runs block 0 only
        return self.trajectory(seq, _additive(hidden, seq.dtype), depth).reshape(b, j, -1)

    def actions(
        self, tap10: torch.Tensor, objects: torch.Tensor, classes: torch.Tensor, video_mask: torch.Tensor
    ) -> torch.Tensor:
        """``alpha [B, N_act, E]``: queries over each frame's (detached) patches and its object tokens."""
        b, t, _, w = tap10.shape
        patches = tap10[:, :, 1:].detach()
        keys = torch.cat([patches, objects.to(patches.dtype)], dim=2)  # [B, T, P+O, W]
        scores = torch.einsum("nw,btkw->btnk", self.action_queries.to(keys.dtype), keys)
        always = torch.zeros(b, t, patches.shape[2], dtype=torch.bool, device=classes.device)
        hidden = torch.cat([always, classes == 0], dim=-1)  # patches are always keys; padding objects are not
        scores = scores.masked_fill(hidden.unsqueeze(2), float("-inf"))
        pooled = scores.softmax(-1) @ keys  # [B, T, N, W]
        valid = (video_mask > 0).to(tap10.dtype)
        head = (tap10[:, :, 0] * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp(min=1.0)
        n = self.num_actions
        seq = torch.cat([head[:, None, None].expand(b, n, 1, w), pooled.transpose(1, 2)], dim=2)
        frame_hidden = torch.cat([torch.zeros_like(video_mask[:, :1]), video_mask], dim=1) == 0  # [B, 1+T]
        mask = _additive(frame_hidden, seq.dtype).repeat_interleave(n, dim=0)[:, None, None, :]
        return self.action(seq.reshape(b * n, 1 + t, w), mask).reshape(b, n, -1)

    def forward(
        self,
        tap10: torch.Tensor,
        tap11: torch.Tensor,
        boxes: torch.Tensor,
        classes: torch.Tensor,
        traj_ids: torch.Tensor,
        video_mask: torch.Tensor,
    ) -> ObjectActionOutput:
        """Trajectory and action tokens of a batch of videos (shapes in the module docstring)."""
        objects = self.object_tokens(tap11, boxes)
        return ObjectActionOutput(
            self.trajectories(objects, classes, traj_ids),
            self.actions(tap10, objects, classes, video_mask),
            traj_ids != 0,
        )
