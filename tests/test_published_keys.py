"""The published key layout converts and loads strictly into ``MemBridgeModel``."""

from __future__ import annotations

import pytest
import torch

from modules.published_keys import convert_published_state_dict, is_published_layout, published_to_ours
from tests.fusion_fixtures import tiny_model

PUBLISHED_FUSION_BLOCKS = 12  # the published fusion_transformer has as many blocks as CLIP's text encoder


def _published_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A synthetic checkpoint in the published layout with random values (fp16 where the published is fp16)."""
    fusion = model.fusion
    gen = torch.Generator().manual_seed(0)
    rand = lambda t: torch.randn(t.shape, generator=gen)  # noqa: E731
    sd = {f"clip.{k}": rand(v) for k, v in model.encoder.clip.state_dict().items()}
    sd["clip.text_projection"] = sd["clip.text_projection"].half()
    block = fusion.transformer.resblocks[0].state_dict()
    for i in range(PUBLISHED_FUSION_BLOCKS):
        sd.update({f"clip.fusion_transformer.resblocks.{i}.{k}": rand(v) for k, v in block.items()})
    names = {
        "fusion_positional_embedding": fusion.positional_embedding,
        "fusion_memory": fusion.memory,
        "fusion_query": fusion.query,
        "fusion_ln.weight": fusion.ln.weight,
        "fusion_ln.bias": fusion.ln.bias,
        "fusion_proj": fusion.vocab_proj,
        "fusion_logit_bias": fusion.vocab_bias,
        "fusion_match_matrix": fusion.match_matrix,
        "fusion_unmatch_matrix": fusion.unmatch_matrix,
    }
    sd.update({f"clip.{k}": rand(v) for k, v in names.items()})
    width = fusion.config.width
    sd["clip.lm_head.weight"], sd["clip.lm_head.bias"] = torch.randn(width, width), torch.randn(width)
    return sd


def test_published_state_dict_converts_and_loads_strictly():
    model = tiny_model()
    layers = model.fusion.config.layers
    sd = _published_state_dict(model)
    assert is_published_layout(sd) and not is_published_layout(model.state_dict())
    converted, unmapped = convert_published_state_dict(sd, fusion_layers=layers)
    expected_unmapped = {k for k in sd if k.startswith("clip.lm_head.")} | {
        k for k in sd if k.startswith("clip.fusion_transformer.resblocks.") and int(k.split(".")[3]) >= layers
    }
    assert set(unmapped) == expected_unmapped
    model.load_state_dict(converted, strict=True)
    state = model.state_dict()
    assert torch.equal(state["fusion.memory"], sd["clip.fusion_memory"])
    assert torch.equal(state["fusion.vocab_proj"], sd["clip.fusion_proj"])
    assert torch.equal(state["fusion.vocab_bias"], sd["clip.fusion_logit_bias"])
    assert torch.equal(
        state["fusion.transformer.resblocks.1.attn.in_proj_weight"],
        sd["clip.fusion_transformer.resblocks.1.attn.in_proj_weight"],
    )
    assert torch.equal(state["encoder.clip.token_embedding.weight"], sd["clip.token_embedding.weight"])
    assert torch.equal(state["encoder.clip.text_projection"], sd["clip.text_projection"].float())


@pytest.mark.parametrize(
    "published,ours",
    [
        ("clip.fusion_ln.weight", "fusion.ln.weight"),
        ("clip.fusion_match_matrix", "fusion.match_matrix"),
        ("clip.visual.conv1.weight", "encoder.clip.visual.conv1.weight"),
        ("frame_position_embeddings.weight", "encoder.frame_position_embeddings.weight"),
        ("transformerClip.resblocks.0.ln_1.bias", "encoder.transformerClip.resblocks.0.ln_1.bias"),
        ("clip.lm_head.weight", None),
        ("similarity_weight", None),
    ],
)
def test_single_key_rules(published, ours):
    assert published_to_ours(published) == ours
