"""Video question answering through the MemBridge fusion (DESIGN §2.7): the sequence and the two answer heads.

Sequence (``N = T + 1 + K + L + 1``)::

    [ T frame tokens | v_sep | K bridge tokens | L question tokens | answer slot ]

The bridge tokens are read from the memory with ``v_sep`` and the question's EOT feature (the memory query detaches
both, as in every fusion path). The question is bidirectional; as in the fusion's evaluation path the positional
embedding is added everywhere except at ``v_sep`` and the question's EOT. The answer slot is one extra position
right after the question's EOT (padding after it stays hidden) that carries only its positional embedding, like the
prediction slot of PLM; its fused state answers the question. The sequence is built by the fusion's one pass
(``MemBridgeFusion.fuse`` in mode ``qa``, ``FusionInputs.for_question``):

- ``classifier`` (default): :class:`AnswerClassifier` over the answer vocabulary (``train_ans2label.json`` or the
  most frequent training answers);
- ``first_token``: the fusion's tied vocabulary head predicts the first BPE token of the answer (the family
  convention).

There is no published MemBridge QA code, so ``official_quirks`` does not change this path.

With ``--method t2vlp`` the layout is T2VLP's (spec A.6): ``[v_sep | frames | tubes | question | answer slot]``,
joint attention (padding only), the positional embedding on every slot; the tubes come from the video with a
detached ViT input, as in every downstream copy of the published code. There is no alignment loss in QA.

With ``--method stoa`` (spec B.7) the layout is ``[frames | v_sep | trajectories + actions | question | answer slot]``
through the same ``qa`` pass: joint attention, the positional embedding everywhere but ``v_sep`` and the question's
EOT; the ``2 O + 4`` object tokens come from the batch's boxes (``object_boxes``, ``object_classes``,
``trajectory_ids``) and the ViT, and their module trains with the answer loss.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from dataloaders.errors import ConfigError
from modules.clip_blocks import LayerNorm
from modules.fusion import ANSWER_SLOTS, FusionInputs, MemBridgeFusion, eot_positions
from modules.membridge import MemBridgeModel
from modules.video_clip import VideoCLIP

logger = logging.getLogger(__name__)

QA_HEADS = ("classifier", "first_token")
CLASSIFIER_HIDDEN_FACTOR = 2  # hidden width of the answer classifier, in multiples of D


class AnswerClassifier(nn.Module):
    """The VQA answer classifier of UNITER / ClipBERT: ``Linear(D, 2D) - GELU - LayerNorm(2D) - Linear(2D, A)``."""

    def __init__(self, width: int, num_answers: int, hidden_factor: int = CLASSIFIER_HIDDEN_FACTOR):
        super().__init__()
        if num_answers < 1:
            raise ConfigError(f"the answer classifier needs at least one answer (got {num_answers})")
        hidden = hidden_factor * width
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), LayerNorm(hidden), nn.Linear(hidden, num_answers))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """Answer logits ``[B, A]`` of the fused answer-slot states ``[B, D]``."""
        return self.net(state)


class MemBridgeQAModel(MemBridgeModel):
    """``MemBridgeModel`` plus an answer head; checkpoints hold ``encoder.*``, ``fusion.*`` and ``qa_head.*``.

    ``head`` is one of :data:`QA_HEADS`; ``num_answers`` (the classifier's output size) is required for
    ``classifier``. CLIP runs with gradient here (downstream fine-tuning trains it at ``lr * coef_lr``).
    """

    def __init__(
        self, encoder: VideoCLIP, fusion: MemBridgeFusion, head: str = "classifier", num_answers: int | None = None
    ):
        super().__init__(encoder, fusion)
        if head not in QA_HEADS:
            raise ConfigError(f"--qa_head {head!r} is not one of {QA_HEADS}")
        config = fusion.config
        if config.seq_len + ANSWER_SLOTS > config.context_length:
            raise ConfigError(
                f"the QA sequence T+1+K+L+1 = {config.seq_len + ANSWER_SLOTS} is longer than the fusion's "
                f"{config.context_length} positions: lower --max_frames or --max_words"
            )
        self.head = head
        self.qa_head = None
        if head == "classifier":
            if num_answers is None:
                raise ConfigError("--qa_head classifier needs the size of the answer vocabulary")
            self.qa_head = AnswerClassifier(config.width, num_answers)

    def encode_question(
        self, question_ids: torch.Tensor, question_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position CLIP question features ``[B, L, D]`` and the EOT feature ``[B, D]`` (with gradient)."""
        feats = self.encoder.clip.encode_text_tokens(question_ids)
        return feats, feats[torch.arange(feats.shape[0], device=feats.device), eot_positions(question_mask)]

    def answer_state(
        self,
        frame_feats: torch.Tensor,
        video_mask: torch.Tensor,
        question_feats: torch.Tensor,
        question_mask: torch.Tensor,
        question_eot: torch.Tensor,
        video_tokens: torch.Tensor | None = None,
        video_token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused state of the answer slot ``[B, D]``: the ``qa`` pass of the fusion (see the module docstring);
        ``video_tokens [B, K, D]``: the videos' T2VLP tubes or STOA object tokens (``--method t2vlp|stoa``), with
        ``video_token_mask [B, K]`` (False at STOA's empty trajectory slots; None: all real)."""
        inputs = FusionInputs.for_question(
            frame_feats, video_mask, question_feats, question_mask, question_eot, video_tokens, video_token_mask
        )
        hidden = self.fusion.fuse(inputs)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, self.fusion.text_offset(frame_feats.shape[1]) + eot_positions(inputs.text_mask)]

    def answer_logits(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits ``[B, A]`` (classifier) or ``[B, V]`` (first_token) of a QA batch, and the encoder outputs
        (``frame_feats [B, T, D]``, ``question_eot [B, D]``) for auxiliary losses."""
        video_mask, question_mask = batch["video_mask"], batch["question_mask"]
        frame_feats, tubes, token_mask = self.encoder.encode_video_tokens(
            batch["video"], video_mask, detach_tap=True, batch=batch, return_mask=True
        )
        question_feats, question_eot = self.encode_question(batch["question_ids"], question_mask)
        state = self.answer_state(
            frame_feats, video_mask, question_feats, question_mask, question_eot, tubes, token_mask
        )
        if self.qa_head is not None:
            logits = self.qa_head(state)
        else:
            logits = self.fusion.vocab_logits(state, self.encoder.clip.token_embedding.weight)
        return logits, {"frame_feats": frame_feats, "question_eot": question_eot}

    def answer_targets(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Targets ``[B]`` of the head: ``answer_label`` (-1 out of vocabulary) or ``answer_first_token``."""
        return batch["answer_label"] if self.qa_head is not None else batch["answer_first_token"]
