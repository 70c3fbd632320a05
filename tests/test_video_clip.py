"""VideoCLIP: joint-attention video encoder, 2d/3d patches, CLIP4Clip similarity heads, freezing, contrastive loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dataloaders.errors import ConfigError
from modules.clip_model import CLIP, load_clip
from modules.losses import contrastive_loss
from modules.video_clip import SIM_HEADERS, VideoCLIP, masked_mean

TINY = Path(__file__).resolve().parents[1] / "CLIP-modules" / "tiny.json"
SOT, EOT = 49406, 49407
ATOL = 1e-5


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return load_clip(config=TINY)


def make_video(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def make_text(b: int, length: int = 8, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    text = torch.zeros(b, length, dtype=torch.long)
    for row in range(b):
        n = 3 + row % (length - 2)
        text[row, 0], text[row, n - 1] = SOT, EOT
        text[row, 1 : n - 1] = torch.randint(1, 49000, (n - 2,), generator=gen)
    return text


@pytest.mark.parametrize("t", [1, 3, 5])
@pytest.mark.parametrize("joint", [0, 2])
def test_video_shapes(t: int, joint: int) -> None:
    model = VideoCLIP(tiny_clip(), joint_layers=joint).eval()
    video, mask = make_video(2, t), torch.ones(2, t, dtype=torch.long)
    with torch.no_grad():
        frames = model.encode_video(video, mask)
        assert frames.shape == (2, t, 64)
        emb = model.video_embedding(frames, mask)
        assert emb.shape == (2, 64)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
        assert model(make_text(3), video, mask).shape == (3, 2)


def test_no_joint_layers_is_per_frame_clip() -> None:
    model = VideoCLIP(tiny_clip(), joint_layers=0).eval()
    video = make_video(2, 3)
    with torch.no_grad():
        frames = model.encode_video(video, torch.ones(2, 3))
        per_frame = model.clip.encode_image(video.flatten(0, 1)).reshape(2, 3, -1)
    torch.testing.assert_close(frames, per_frame, atol=ATOL, rtol=0)


def test_joint_layers_match_plain_reference() -> None:
    """J joint blocks == the same blocks run on the concatenated tokens of a video (all frames real: no mask)."""
    model = VideoCLIP(tiny_clip(), joint_layers=2).eval()
    video = make_video(2, 3)
    visual = model.clip.visual
    with torch.no_grad():
        x = visual.embed(video.flatten(0, 1))
        x = visual.blocks[0](x)
        x = x.reshape(2, 3 * 17, 64)
        x = visual.blocks[2](visual.blocks[1](x)).reshape(6, 17, 64)
        expected = visual.head(x[:, 0]).reshape(2, 3, -1)
        torch.testing.assert_close(model.encode_video(video, torch.ones(2, 3)), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("joint", [0, 1, 2])
def test_frames_interact_only_in_joint_layers(joint: int) -> None:
    model = VideoCLIP(tiny_clip(), joint_layers=joint).eval()
    video, mask = make_video(1, 3), torch.ones(1, 3)
    changed = video.clone()
    changed[:, 2] = torch.randn(3, 32, 32)
    with torch.no_grad():
        before, after = model.encode_video(video, mask), model.encode_video(changed, mask)
    assert not torch.allclose(before[:, 2], after[:, 2])
    assert torch.allclose(before[:, 0], after[:, 0], atol=ATOL) == (joint == 0)


@pytest.mark.parametrize("sim_header", ["meanP", "seqLSTM", "seqTransf"])
def test_masked_frames_do_not_influence_valid_ones(sim_header: str) -> None:
    model = VideoCLIP(tiny_clip(), joint_layers=2, sim_header=sim_header).eval()
    video = make_video(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    changed = video.clone()
    changed[0, 2:] = torch.randn(2, 3, 32, 32)
    changed[1, 3] = 0.0
    with torch.no_grad():
        before, after = model.encode_video(video, mask), model.encode_video(changed, mask)
        torch.testing.assert_close(before[0, :2], after[0, :2], atol=ATOL, rtol=0)
        torch.testing.assert_close(before[1, :3], after[1, :3], atol=ATOL, rtol=0)
        torch.testing.assert_close(
            model.video_embedding(before, mask), model.video_embedding(after, mask), atol=ATOL, rtol=0
        )


def test_3d_patch_equals_2d_at_init() -> None:
    clip = tiny_clip()
    model_2d = VideoCLIP(tiny_clip(), joint_layers=2).eval()
    model_3d = VideoCLIP(clip, joint_layers=2, linear_patch="3d").eval()
    conv2 = clip.visual.conv2
    assert conv2.weight.shape == (64, 3, 3, 8, 8)
    assert conv2.stride == (1, 8, 8) and conv2.padding == (1, 0, 0) and conv2.bias is None
    torch.testing.assert_close(conv2.weight[:, :, 1], clip.visual.conv1.weight)
    assert conv2.weight[:, :, [0, 2]].abs().sum() == 0
    video, mask = make_video(2, 3), torch.ones(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(
            model_3d.encode_video(video, mask), model_2d.encode_video(video, mask), atol=ATOL, rtol=0
        )
        conv2.weight[:, :, 0].normal_()  # once trained, neighbouring frames contribute
        assert not torch.allclose(model_3d.encode_video(video, mask), model_2d.encode_video(video, mask), atol=1e-3)


@pytest.mark.parametrize("linear_patch", ["2d", "3d"])
@pytest.mark.parametrize("sim_header", SIM_HEADERS)
def test_every_header_forward_backward(sim_header: str, linear_patch: str) -> None:
    model = VideoCLIP(tiny_clip(), joint_layers=2, linear_patch=linear_patch, sim_header=sim_header, max_frames=3)
    model.train()
    video, mask, text = make_video(3, 3), torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]), make_text(3)
    logits = model(text, video, mask)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    loss = contrastive_loss(logits)
    loss.backward()
    unused = {"clip.visual.conv1.weight"} if linear_patch == "3d" else set()
    if sim_header == "tightTransf":
        unused.add("clip.logit_scale")  # the cross encoder scores pairs with a linear layer, not a temperature
    no_grad = {name for name, param in model.named_parameters() if param.grad is None}
    assert no_grad == unused
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), name
    assert model.loose_type == (sim_header != "tightTransf")


def test_similarity_is_scaled_cosine() -> None:
    model = VideoCLIP(tiny_clip(), joint_layers=1).eval()
    video, mask, text = make_video(2, 3), torch.tensor([[1, 1, 1], [1, 1, 0]]), make_text(3)
    with torch.no_grad():
        frames = model.encode_video(video, mask)
        text_feats = model.text_features(text)
        logits = model(text, video, mask)
        for i in range(3):
            for j in range(2):
                n = int(mask[j].sum())
                video_vec = F.normalize(frames[j, :n], dim=-1).mean(0)
                cos = F.cosine_similarity(text_feats[i], video_vec, dim=0)
                assert logits[i, j].item() == pytest.approx(math.exp(model.logit_scale.item()) * cos.item(), abs=1e-4)
        torch.testing.assert_close(model.text_embedding(text), F.normalize(text_feats, dim=-1))


def test_seq_lstm_matches_per_video_reference() -> None:
    model = VideoCLIP(tiny_clip(), sim_header="seqLSTM").eval()
    frames = torch.randn(3, 4, 64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    with torch.no_grad():
        got = model.video_embedding(frames, mask)
        for i in range(3):
            n = int(mask[i].sum())
            valid = frames[i : i + 1, :n]
            out = model.lstm_visual(valid)[0] + valid
            expected = F.normalize(F.normalize(out[0], dim=-1).mean(0), dim=0)
            torch.testing.assert_close(got[i], expected, atol=ATOL, rtol=0)


def test_seq_transf_init_and_reference() -> None:
    clip = tiny_clip()
    model = VideoCLIP(clip, sim_header="seqTransf", temporal_layers=2).eval()
    torch.testing.assert_close(model.frame_position_embeddings.weight, clip.positional_embedding)
    for source, target in zip(clip.transformer.resblocks[:2], model.transformerClip.resblocks, strict=True):
        for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, msg=name)
    frames = torch.randn(2, 3, 64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        got = model.temporal(frames, mask)
        # sample 2 with its padding dropped must give the same valid outputs
        alone = model.temporal(frames[1:, :2], mask[1:, :2])
        torch.testing.assert_close(got[1, :2], alone[0], atol=ATOL, rtol=0)
        positions = model.frame_position_embeddings.weight[:3]
        expected = model.transformerClip(frames[:1] + positions) + frames[:1]
        torch.testing.assert_close(got[:1], expected, atol=ATOL, rtol=0)


def test_tight_transf_matches_pairwise_loop() -> None:
    clip = tiny_clip()
    model = VideoCLIP(clip, sim_header="tightTransf", temporal_layers=2).eval()
    torch.testing.assert_close(model.cross.embeddings.position_embeddings.weight, clip.positional_embedding)
    text_feats, frames = torch.randn(3, 64), torch.randn(2, 4, 64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        got = model.similarity_logits(text_feats, frames, mask)
        assert got.shape == (3, 2)
        for i in range(3):
            for j in range(2):
                n = int(mask[j].sum())
                tokens = torch.cat([text_feats[i : i + 1], frames[j, :n]])[None]
                pooled = model.cross(tokens, torch.ones(1, n + 1))
                torch.testing.assert_close(got[i, j], model.similarity_dense(pooled)[0, 0], atol=ATOL, rtol=0)


def test_checkpoint_key_names() -> None:
    keys = set()
    for sim_header in SIM_HEADERS:
        keys |= set(VideoCLIP(tiny_clip(), linear_patch="3d", sim_header=sim_header).state_dict())
    expected = {
        "clip.visual.conv1.weight",
        "clip.visual.conv2.weight",
        "clip.visual.proj",
        "clip.transformer.resblocks.0.attn.in_proj_weight",
        "clip.logit_scale",
        "frame_position_embeddings.weight",
        "transformerClip.resblocks.3.mlp.c_proj.weight",
        "lstm_visual.weight_ih_l0",
        "lstm_visual.bias_hh_l0",
        "cross.embeddings.position_embeddings.weight",
        "cross.transformer.resblocks.0.ln_1.weight",
        "cross.pooler.ln_pool.weight",
        "cross.pooler.dense.weight",
        "similarity_dense.weight",
        "similarity_dense.bias",
    }
    assert expected <= keys
    assert set(VideoCLIP(tiny_clip()).state_dict()) == {f"clip.{key}" for key in tiny_clip().state_dict()}


@pytest.mark.parametrize("n", [-1, 0, 2])
@pytest.mark.parametrize("linear_patch", ["2d", "3d"])
def test_freeze_layers(n: int, linear_patch: str) -> None:
    model = VideoCLIP(tiny_clip(), joint_layers=2, linear_patch=linear_patch)
    frozen = model.freeze_layers(n)
    embeddings = {
        "clip.token_embedding.weight",
        "clip.positional_embedding",
        "clip.visual.conv1.weight",
        "clip.visual.class_embedding",
        "clip.visual.positional_embedding",
        "clip.visual.ln_pre.weight",
        "clip.visual.ln_pre.bias",
    }
    blocks = {
        name
        for name, _ in model.named_parameters()
        for prefix in ("clip.visual.transformer.resblocks.", "clip.transformer.resblocks.")
        if name.startswith(prefix) and int(name[len(prefix) :].split(".")[0]) < n
    }
    expected = set() if n < 0 else embeddings | blocks
    assert set(frozen) == expected and len(frozen) == len(expected)
    assert {name for name, param in model.named_parameters() if not param.requires_grad} == expected
    loss = contrastive_loss(model(make_text(2), make_video(2, 2), torch.ones(2, 2)))
    loss.backward()
    unused = {"clip.visual.conv1.weight"} if linear_patch == "3d" else set()
    assert {name for name, param in model.named_parameters() if param.grad is None} == expected | unused
    if n == 2:
        assert "clip.visual.transformer.resblocks.2.attn.in_proj_weight" not in frozen
        assert "clip.transformer.resblocks.1.mlp.c_fc.bias" in frozen
    with pytest.raises(ConfigError, match="freeze_layer_num"):
        model.freeze_layers(5)


def test_clamp_logit_scale() -> None:
    model = VideoCLIP(tiny_clip())
    with torch.no_grad():
        model.clip.logit_scale.fill_(6.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.clip.logit_scale.fill_(2.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 2.0


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match="joint_layers"):
        VideoCLIP(tiny_clip(), joint_layers=4)
    with pytest.raises(ConfigError, match="sim_header"):
        VideoCLIP(tiny_clip(), sim_header="meanQ")
    with pytest.raises(ConfigError, match="linear_patch"):
        VideoCLIP(tiny_clip(), linear_patch="4d")
    with_3d = VideoCLIP(tiny_clip(), linear_patch="3d").clip
    with pytest.raises(ConfigError, match="linear_patch 3d"):
        VideoCLIP(with_3d, linear_patch="2d")
    with pytest.raises(ConfigError, match="max_frames 77"):
        VideoCLIP(tiny_clip(), sim_header="tightTransf", max_frames=77)
    model = VideoCLIP(tiny_clip(), sim_header="seqTransf")
    with pytest.raises(ConfigError, match="max_frames"):
        model.temporal(torch.randn(1, 78, 64), torch.ones(1, 78))


def test_masked_mean() -> None:
    x = torch.arange(12.0).reshape(2, 3, 2)
    x[1, 2] = float("nan")  # a masked frame never leaks, even as NaN
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    torch.testing.assert_close(masked_mean(x[:1], torch.zeros(1, 3)), torch.zeros(1, 2))


def test_contrastive_loss_matches_loop() -> None:
    sim = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) * 4
    rows = [-(sim[i, i] - torch.logsumexp(sim[i], 0)) for i in range(5)]
    cols = [-(sim[i, i] - torch.logsumexp(sim[:, i], 0)) for i in range(5)]
    expected = (sum(rows) / 5 + sum(cols) / 5) / 2
    assert contrastive_loss(sim).item() == pytest.approx(expected.item(), abs=1e-6)
    assert contrastive_loss(torch.eye(4) * 50).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.zeros(2, 3))
