"""CLIP backbone: OpenAI key layout, loading of every released format, equality with open_clip's reference CLIP."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file
from torch import nn

from dataloaders.errors import CheckpointError, ConfigError
from modules.clip_blocks import causal_mask
from modules.clip_model import (
    CLIP,
    CLIPConfig,
    clip_state_dict,
    infer_config,
    load_clip,
    read_state_dict,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "CLIP-modules"
SOT, EOT = 49406, 49407
ATOL = 1e-5
OPENAI_EXTRA_ENTRIES = {"input_resolution": 32, "context_length": 77, "vocab_size": 49408}


def reference_clip(width: int = 128, head_width: int = 64, seed: int = 0) -> nn.Module:
    """A small open_clip CLIP with OpenAI's numerics (QuickGELU), every parameter perturbed so no key can hide."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        64,
        vision_cfg=CLIPVisionCfg(layers=2, width=width, head_width=head_width, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=width // head_width, layers=2),
        quick_gelu=True,
    )
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def save_torchscript(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` as a TorchScript archive whose ``state_dict()`` has exactly these keys (as OpenAI's files)."""
    root = nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value.detach().clone()))
        else:
            module.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(root).save(str(path))


def write_checkpoint(model: nn.Module, fmt: str, folder: Path) -> Path:
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    if fmt == "torchscript":
        extras = {key: torch.tensor(value) for key, value in OPENAI_EXTRA_ENTRIES.items()}
        path = folder / "ViT-tiny.pt"
        save_torchscript({**state, **extras}, path)
    elif fmt == "state_dict":
        path = folder / "clip_state.pth"
        torch.save(state, path)
    else:
        path = folder / "clip.safetensors"
        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


def pad_to_context(text: torch.Tensor, context: int = 77) -> torch.Tensor:
    """open_clip needs the full context; padding after EOT leaves causal EOT features unchanged."""
    return torch.nn.functional.pad(text, (0, context - text.shape[1]))


def sample_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    text = torch.zeros(3, 12, dtype=torch.long)
    for row, length in enumerate((5, 12, 8)):
        text[row, 0] = SOT
        text[row, 1 : length - 1] = torch.randint(1, 49000, (length - 2,), generator=gen)
        text[row, length - 1] = EOT
    return images, text


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    return reference_clip()


@pytest.mark.parametrize("fmt", ["torchscript", "state_dict", "safetensors"])
def test_load_matches_open_clip(
    fmt: str, reference: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    jit_load, plain_load = torch.jit.load, torch.load

    def spy_jit_load(*args, **kwargs):
        calls.append("jit")
        return jit_load(*args, **kwargs)

    def spy_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "checkpoints must be read with weights_only=True"
        calls.append("torch.load")
        return plain_load(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", spy_jit_load)
    monkeypatch.setattr(torch, "load", spy_load)
    path = write_checkpoint(reference, fmt, tmp_path)
    model = load_clip(path).eval()
    expected_calls = {"torchscript": ["jit"], "state_dict": ["torch.load"], "safetensors": []}[fmt]
    assert calls == expected_calls

    assert model.config == CLIPConfig(
        embed_dim=64,
        image_resolution=32,
        vision_layers=2,
        vision_width=128,
        vision_patch_size=8,
        context_length=77,
        vocab_size=49408,
        transformer_width=128,
        transformer_layers=2,
    )
    assert all(param.dtype == torch.float32 and param.device.type == "cpu" for param in model.parameters())
    images, text = sample_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), atol=ATOL, rtol=0)
        torch.testing.assert_close(
            model.encode_text(text), reference.encode_text(pad_to_context(text)), atol=ATOL, rtol=0
        )
        torch.testing.assert_close(model.logit_scale, reference.logit_scale)


def test_key_layout_equals_openai(reference: nn.Module) -> None:
    ours = CLIP(infer_config(reference.state_dict()))
    theirs = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in ours.state_dict().items()} == theirs


def test_head_override_via_config(tmp_path: Path) -> None:
    reference = reference_clip(width=64, head_width=32, seed=3)
    path = write_checkpoint(reference, "state_dict", tmp_path)
    images, text = sample_inputs(seed=4)
    inferred = load_clip(path)  # width // 64 = 1 head: same shapes, different numerics
    assert inferred.config.vision_heads == 1 and inferred.config.transformer_heads == 1
    config = CLIPConfig(**{**inferred.config.to_dict(), "vision_heads": 2, "transformer_heads": 2})
    model = load_clip(path, config=config).eval()
    with torch.no_grad():
        assert not torch.allclose(inferred.encode_text(text), reference.encode_text(pad_to_context(text)), atol=1e-3)
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), atol=ATOL, rtol=0)
        torch.testing.assert_close(
            model.encode_text(text), reference.encode_text(pad_to_context(text)), atol=ATOL, rtol=0
        )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "ViT-B-16",
            dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16),
        ),
        (
            "ViT-B-32",
            dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32),
        ),
        (
            "ViT-L-14",
            dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14),
        ),
    ],
)
def test_infer_config_released_architectures(name: str, expected: dict[str, int]) -> None:
    with warnings.catch_warnings(), torch.device("meta"):  # shapes only: no weights are allocated
        warnings.simplefilter("ignore")
        reference = open_clip.create_model(f"{name}-quickgelu", pretrained=None, device="meta")
    shapes = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    config = infer_config(shapes, name)
    text_width = 768 if name == "ViT-L-14" else 512
    assert config == CLIPConfig(
        **expected, context_length=77, vocab_size=49408, transformer_width=text_width, transformer_layers=12
    )
    assert config.vision_heads == expected["vision_width"] // 64 and config.transformer_heads == text_width // 64
    with torch.device("meta"):
        ours = CLIP(config)
    assert {key: tuple(value.shape) for key, value in ours.state_dict().items()} == shapes
    if name == "ViT-B-16":
        assert CLIPConfig.from_json(CONFIGS / "ViT-B-16.json") == config


def test_text_token_api() -> None:
    torch.manual_seed(0)
    model = load_clip(config=CONFIGS / "tiny.json").eval()
    _, text = sample_inputs()
    n = text.shape[1]
    with torch.no_grad():
        tokens = model.encode_text_tokens(text)
        assert tokens.shape == (3, n, model.config.embed_dim)
        torch.testing.assert_close(model.encode_text(text), tokens[torch.arange(3), text.argmax(-1)])
        # defaults: positions arange(N) and the causal mask, given explicitly or per sample
        explicit = model.encode_text_tokens(text, attn_mask=causal_mask(n), position_ids=torch.arange(n))
        torch.testing.assert_close(explicit, tokens)
        per_sample = causal_mask(n).expand(3, 1, n, n)
        torch.testing.assert_close(model.encode_text_tokens(text, attn_mask=per_sample), tokens)
        # causal: a prefix gives the same features; a bidirectional mask changes early positions
        torch.testing.assert_close(model.encode_text_tokens(text[:, :5]), tokens[:, :5])
        bidirectional = model.encode_text_tokens(text, attn_mask=torch.zeros(n, n))
        assert not torch.allclose(bidirectional[:, 0], tokens[:, 0], atol=1e-4)
        # shifted positions read the shifted rows of the positional table
        shifted = torch.arange(n) + 3
        manual = model.token_embedding(text) + model.positional_embedding[shifted]
        manual = model.ln_final(model.transformer(manual, causal_mask(n))) @ model.text_projection
        torch.testing.assert_close(model.encode_text_tokens(text, position_ids=shifted), manual)
    with pytest.raises(ConfigError, match="max_words"):
        model.encode_text_tokens(torch.ones(1, 78, dtype=torch.long))


def test_image_api_pieces() -> None:
    torch.manual_seed(0)
    model = load_clip(config=CONFIGS / "tiny.json").eval()
    images, _ = sample_inputs()
    visual = model.visual
    with torch.no_grad():
        tokens = visual.embed(images)
        assert tokens.shape == (3, 1 + 16, 64)
        for block in visual.blocks:
            tokens = block(tokens)
        torch.testing.assert_close(visual.head(tokens[:, 0]), model.encode_image(images))
    with pytest.raises(ConfigError, match="32 px"):
        model.encode_image(torch.zeros(1, 3, 48, 48))


def test_openai_initialisation() -> None:
    torch.manual_seed(0)
    config = CLIPConfig(
        embed_dim=64, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8,
        transformer_width=256, transformer_layers=8,
    )  # fmt: skip
    model = CLIP(config)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.05)
    assert model.text_projection.std().item() == pytest.approx(256**-0.5, rel=0.05)
    block = model.transformer.resblocks[0]
    assert block.attn.in_proj_weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(256**-0.5 / 4, rel=0.05)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(512**-0.5, rel=0.05)
    assert model.visual.class_embedding.shape == (64,) and model.visual.proj.shape == (64, 64)


def test_config_json_round_trip(tmp_path: Path) -> None:
    for path in (CONFIGS / "ViT-B-16.json", CONFIGS / "tiny.json"):
        config = CLIPConfig.from_json(path)
        copy = tmp_path / path.name
        copy.write_text(json.dumps(config.to_dict()))
        assert CLIPConfig.from_json(copy) == config
    tiny = CLIPConfig.from_json(CONFIGS / "tiny.json")
    assert tiny.context_length == 77 and tiny.vision_heads == 2 and tiny.transformer_heads == 2
    assert CLIPConfig(vision_width=128, transformer_width=256).vision_heads == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8, "layers": 2}))
    with pytest.raises(ConfigError, match=r"bad\.json.*'layers'"):
        CLIPConfig.from_json(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json.*line 1"):
        CLIPConfig.from_json(bad)
    with pytest.raises(ConfigError, match="divisible"):
        CLIPConfig(vision_width=96, vision_heads=5)
    with pytest.raises(ConfigError, match="multiple"):
        CLIPConfig(image_resolution=100, vision_patch_size=16)


def test_prefixed_and_wrapped_state_dicts(reference: nn.Module, tmp_path: Path) -> None:
    state = reference.state_dict()
    wrapped = {
        "state_dict": {f"clip.{key}": value for key, value in state.items()} | {"clip.fusion_proj": torch.ones(2)}
    }
    path = tmp_path / "clip4clip.bin"
    torch.save(wrapped, path)
    loaded = read_state_dict(path)
    assert set(clip_state_dict(loaded)) == set(state) | {"fusion_proj"}
    model = load_clip(path)  # the extra key is reported and ignored
    torch.testing.assert_close(model.state_dict()["visual.proj"], state["visual.proj"])
    with_extras = {**state, **{key: torch.tensor(value) for key, value in OPENAI_EXTRA_ENTRIES.items()}}
    assert set(clip_state_dict(with_extras)) == set(state)


def test_checkpoint_errors(reference: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"absent\.pt.*not found.*README"):
        load_clip(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pt: cannot read"):
        load_clip(garbage)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"visual.proj": torch.zeros(2), "payload": nn.Linear(2, 2)}, unsafe)
    # the pickled module is dropped unexecuted (MCQ-CLIP files pickle their config); what is left is no CLIP
    with pytest.raises(CheckpointError, match=r"unsafe\.pt: not a CLIP checkpoint"):
        load_clip(unsafe)
    state = dict(reference.state_dict())
    missing = tmp_path / "missing.pth"
    torch.save({key: value for key, value in state.items() if key != "ln_final.bias"}, missing)
    with pytest.raises(CheckpointError, match=r"missing\.pth: missing CLIP weights \['ln_final.bias'\]"):
        load_clip(missing)
    no_text = tmp_path / "no_text.pth"
    torch.save({key: value for key, value in state.items() if key != "text_projection"}, no_text)
    with pytest.raises(CheckpointError, match=r"no_text\.pth: not a CLIP checkpoint.*text_projection"):
        load_clip(no_text)
    resnet = tmp_path / "resnet.pth"
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1)}, resnet)
    with pytest.raises(CheckpointError, match="ResNet"):
        load_clip(resnet)
    wrong = tmp_path / "wrong.pth"
    torch.save({**state, "ln_final.bias": torch.zeros(7)}, wrong)
    with pytest.raises(CheckpointError, match=r"wrong\.pth: CLIP weights of the wrong shape.*ln_final.bias"):
        load_clip(wrong)
    good = write_checkpoint(reference, "state_dict", tmp_path)
    with pytest.raises(CheckpointError, match="vision_width: config 64 vs checkpoint 128"):
        load_clip(good, config=CONFIGS / "tiny.json")
    with pytest.raises(ConfigError, match="visual_pretrain_path"):
        load_clip()


def _plain_attention(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Self-attention written out in float64 from the block's own weights (the reference)."""
    b, n, c = x.shape
    heads = block.heads
    qkv = torch.nn.functional.linear(x.double(), block.in_proj_weight.double(), block.in_proj_bias.double())
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    scores = q @ k.transpose(-2, -1) / math.sqrt(c // heads)
    if mask is not None:
        scores = scores + mask.double()
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    return torch.nn.functional.linear(out, block.out_proj.weight.double(), block.out_proj.bias.double())


@pytest.mark.parametrize("mask_kind", ["none", "causal", "per_sample"])
def test_attention_paths_match_a_plain_reference(mask_kind: str) -> None:
    """fp32 (SDPA) to 1e-5; bf16 training on CPU (explicit matmuls) and bf16 SDPA to bf16 rounding of the same."""
    from modules.clip_blocks import MultiheadSelfAttention, explicit_attention

    torch.manual_seed(0)
    block = MultiheadSelfAttention(64, 4)
    x = torch.randn(3, 10, 64)
    mask = None
    if mask_kind == "causal":
        mask = causal_mask(10)
    elif mask_kind == "per_sample":  # [B, 1, N, N] as the fusion builds it: sample 1 hides its last 4 tokens
        mask = torch.zeros(3, 1, 10, 10)
        mask[1, :, :, 6:] = float("-inf")
    reference = _plain_attention(block, x, mask).float()
    with torch.no_grad():
        torch.testing.assert_close(block(x, mask), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block(x, mask), reference, atol=1e-5, rtol=1e-5)  # grad enabled: still SDPA in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = block(x, mask)  # grad enabled: the explicit path
        with torch.no_grad():
            inferred = block(x, mask)  # SDPA
    assert trained.dtype == torch.bfloat16
    bf16_gap = (inferred.float() - reference).abs().max()
    assert (trained.float() - reference).abs().max() <= max(4 * bf16_gap, 0.05)
    trained.float().sum().backward()
    assert block.in_proj_weight.grad is not None and torch.isfinite(block.in_proj_weight.grad).all()
    # the explicit function itself equals SDPA in fp32
    q, k, v = (torch.randn(3, 4, 10, 16) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(explicit_attention(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)
