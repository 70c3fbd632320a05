"""BertAdam against a plain re-implementation of the published update, parameter groups, and build_optimizer."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from dataloaders.errors import ConfigError
from engine.optim import (
    BertAdam,
    build_optimizer,
    build_param_groups,
    current_lr,
    warmup_constant,
    warmup_cosine,
    warmup_linear,
)


class Tiny(nn.Module):
    """Names like the real model: a CLIP part, a fusion part and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.clip = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5))
        self.fusion = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fusion(self.clip(x))))


def make_loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
    return 50.0 * ((model(x) - y) ** 2).mean()  # large enough that clipping acts


def reference_run(model: nn.Module, groups: list[dict], steps: int, t_total: int, warmup: float, max_norm: float):
    """The published update written out per tensor, on plain tensors."""
    state: dict[int, dict] = {}
    b1, b2, eps = 0.9, 0.98, 1e-6
    for step in range(steps):
        model.zero_grad()
        make_loss(model, step).backward()
        with torch.no_grad():
            for group in groups:
                for p in group["params"]:
                    g = p.grad.clone()
                    g = g * torch.clamp(max_norm / (g.norm() + 1e-6), max=1.0)
                    s = state.setdefault(id(p), {"k": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
                    s["m"] = b1 * s["m"] + (1 - b1) * g
                    s["v"] = b2 * s["v"] + (1 - b2) * g * g
                    update = s["m"] / (s["v"].sqrt() + eps)
                    if group["weight_decay"] > 0:
                        update = update + group["weight_decay"] * p
                    x = s["k"] / t_total
                    factor = x / warmup if x < warmup else 0.5 * (1 + math.cos(math.pi * x))
                    p -= group["lr"] * factor * update
                    s["k"] += 1


def run_bertadam(model: nn.Module, optimizer: BertAdam, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        make_loss(model, step).backward()
        optimizer.step()


def test_schedules_at_chosen_points() -> None:
    assert warmup_cosine(0.0, 0.1) == 0.0
    assert warmup_cosine(0.05, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(0.1, 0.1) == pytest.approx(0.5 * (1 + math.cos(0.1 * math.pi)))  # no restart at warmup end
    assert warmup_cosine(0.5, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert warmup_constant(0.02, 0.1) == pytest.approx(0.2) and warmup_constant(0.7, 0.1) == 1.0
    assert warmup_linear(0.55, 0.1) == pytest.approx(0.5) and warmup_linear(1.2, 0.1) == 0.0


def test_bertadam_matches_reference_loop() -> None:
    torch.manual_seed(0)
    model = Tiny()
    ref = copy.deepcopy(model)
    groups = build_param_groups(model, lr=1e-2, coef_lr=0.1, weight_decay=0.2)
    ref_groups = build_param_groups(ref, lr=1e-2, coef_lr=0.1, weight_decay=0.2)
    assert {g["weight_decay"] for g in groups} == {0.2, 0.0}
    optimizer = BertAdam(groups, lr=1e-2, warmup=0.2, t_total=10, max_grad_norm=0.5)
    before = {name: p.clone() for name, p in model.named_parameters()}
    run_bertadam(model, optimizer, range(1))
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name], p, rtol=0, atol=0)  # first update: warmup factor 0
    run_bertadam(model, optimizer, range(1, 7))
    reference_run(ref, ref_groups, 7, t_total=10, warmup=0.2, max_norm=0.5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    assert not torch.equal(model.head.weight, before["head.weight"])


def test_bertadam_clips_each_tensor_on_its_own() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    optimizer = BertAdam([a, b], lr=1.0, max_grad_norm=1.0, weight_decay=0.0, b1=0.0, b2=0.0, e=0.0)
    a.grad, b.grad = torch.tensor([30.0, 40.0]), torch.tensor([0.3, 0.4])
    optimizer.step()
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8]), atol=1e-6, rtol=0)  # norm 50 -> 1
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # norm 0.5: untouched


def test_parameters_without_grad_keep_their_step_counter() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = BertAdam([a, b], lr=0.1, warmup=0.5, t_total=4)
    a.grad = torch.ones(2)
    optimizer.step()
    assert optimizer.state[a]["step"] == 1 and "step" not in optimizer.state[b]
    torch.testing.assert_close(b, torch.ones(2))
    assert optimizer.current_lrs() == [pytest.approx(0.1 * 0.25 / 0.5)]


def test_state_dict_round_trip_gives_identical_next_steps() -> None:
    torch.manual_seed(1)
    model = Tiny()
    optimizer = BertAdam(build_param_groups(model, 1e-2, 0.5, 0.2), lr=1e-2, warmup=0.1, t_total=8)
    run_bertadam(model, optimizer, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = Tiny()
    resumed.load_state_dict(saved["model"])
    resumed_opt = BertAdam(build_param_groups(resumed, 1e-2, 0.5, 0.2), lr=1e-2, warmup=0.1, t_total=8)
    resumed_opt.load_state_dict(saved["optimizer"])
    run_bertadam(model, optimizer, range(3, 6))
    run_bertadam(resumed, resumed_opt, range(3, 6))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_param_groups_names_lr_and_decay() -> None:
    model = Tiny()
    groups = {g["name"]: g for g in build_param_groups(model, lr=1e-4, coef_lr=1e-3, weight_decay=0.2, fusion_lr=1e-5)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["clip_decay"] == {id(model.clip[0].weight)}
    assert ids["clip_no_decay"] == {id(model.clip[0].bias), id(model.clip[1].weight), id(model.clip[1].bias)}
    assert ids["fusion_decay"] == {id(model.fusion.weight)} and ids["fusion_no_decay"] == {id(model.fusion.bias)}
    assert ids["other_decay"] == {id(model.head.weight)} and ids["other_no_decay"] == {id(model.head.bias)}
    assert groups["clip_decay"]["lr"] == pytest.approx(1e-7) and groups["fusion_decay"]["lr"] == 1e-5
    assert groups["other_decay"]["lr"] == 1e-4 and groups["other_no_decay"]["weight_decay"] == 0.0
    assert all(id(model.frozen) not in s for s in ids.values())
    without_fusion_lr = {g["name"] for g in build_param_groups(model, 1e-4, 1e-3, 0.2)}
    assert without_fusion_lr == {"clip_decay", "clip_no_decay", "other_decay", "other_no_decay"}


OPTIM_ARGS = dict(lr=1e-3, coef_lr=0.1, fusion_lr=None, weight_decay=0.2, warmup_proportion=0.25, max_grad_norm=1.0)


def test_build_optimizer_bertadam_and_adamw_share_the_schedule() -> None:
    torch.manual_seed(2)
    bert_model, adamw_model = Tiny(), Tiny()
    bert, scheduler, clip = build_optimizer(bert_model, optimizer="bertadam", total_steps=8, **OPTIM_ARGS)
    assert isinstance(bert, BertAdam) and scheduler is None and clip is None
    adamw, adamw_scheduler, adamw_clip = build_optimizer(adamw_model, optimizer="adamw", total_steps=8, **OPTIM_ARGS)
    assert isinstance(adamw, torch.optim.AdamW) and adamw_clip == 1.0
    for step in range(8):
        for group in range(len(bert.param_groups)):
            assert current_lr(adamw, group) == pytest.approx(current_lr(bert, group))
        expected = 1e-3 * 0.1 * warmup_cosine(step / 8, 0.25)
        assert current_lr(bert, 0) == pytest.approx(expected)
        run_bertadam(bert_model, bert, range(step, step + 1))
        adamw.zero_grad()
        make_loss(adamw_model, step).backward()
        adamw.step()
        adamw_scheduler.step()


def test_build_optimizer_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="sgd"):
        build_optimizer(Tiny(), optimizer="sgd", total_steps=8, **OPTIM_ARGS)
    with pytest.raises(ConfigError, match="positive number"):
        build_optimizer(Tiny(), optimizer="bertadam", total_steps=0, **OPTIM_ARGS)
    frozen = Tiny().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable"):
        build_optimizer(frozen, optimizer="bertadam", total_steps=8, **OPTIM_ARGS)


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_blocked_update_is_bit_identical_to_the_published_loop(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """The cache-blocked step gives exactly the published per-tensor kernels' values (several chunks per tensor)."""
    import engine.optim as optim_module

    monkeypatch.setattr(optim_module, "UPDATE_CHUNK", chunk)
    torch.manual_seed(3)
    shapes = [(37, 29), (200,), (5, 7, 3)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    params.append(nn.Parameter(torch.randn(12, 9).t()))  # strided: updated as one block
    ref = [p.detach().clone() for p in params]
    initial = [p.detach().clone() for p in params]
    optimizer = BertAdam(
        [{"params": params[:2], "weight_decay": 0.2}, {"params": params[2:], "weight_decay": 0.0}],
        lr=1e-2,
        warmup=0.1,
        t_total=10,
        max_grad_norm=1.0,
    )
    state = [{"m": torch.zeros_like(r), "v": torch.zeros_like(r)} for r in ref]
    decays = [0.2, 0.2, 0.0, 0.0]
    for step in range(4):
        grads = [torch.randn(s.shape) * (3.0 if i % 2 else 0.1) for i, s in enumerate(params)]  # clipped or not
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        lr = 1e-2 * warmup_cosine(step / 10, 0.1)
        for r, g, s, decay in zip(ref, grads, state, decays, strict=True):  # the published code, verbatim
            r.grad = g.clone()
            torch.nn.utils.clip_grad_norm_(r, 1.0)
            s["m"].mul_(0.9).add_(r.grad, alpha=1.0 - 0.9)
            s["v"].mul_(0.98).addcmul_(r.grad, r.grad, value=1.0 - 0.98)
            update = s["m"] / (s["v"].sqrt() + 1e-6)
            if decay > 0.0:
                update.add_(r, alpha=decay)
            r.add_(update, alpha=-lr)
        for p, r in zip(params, ref, strict=True):
            assert torch.equal(p.detach(), r) and torch.equal(p.grad, r.grad)
    assert all(not torch.equal(p.detach(), start) for p, start in zip(params, initial, strict=True))  # they moved


# ------------------------------------------------------------------ --text_lr / --extra_lr on the real module names

TEXT_TOWER = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection")


def t2vlp_model(stage2: bool):
    """The tiny MemBridge model with T2VLP's tube module and a stand-in Chinese text encoder (``encoder.text_hf``);
    stage 2: the encoder frozen but for the tubes; stage 1: no fusion, everything trains."""
    from dataclasses import replace

    from modules.clip_model import CLIPConfig, load_clip
    from modules.fusion import MemBridgeFusion
    from modules.membridge import MemBridgeModel
    from modules.video_clip import VideoCLIP
    from tests.fusion_fixtures import TEST_VOCAB, TINY_CLIP, tiny_config

    torch.manual_seed(0)
    clip = load_clip(config=replace(CLIPConfig.from_json(TINY_CLIP), vocab_size=TEST_VOCAB))
    encoder = VideoCLIP(clip, joint_layers=1, max_frames=4, num_tubes=2)
    encoder.text_hf = nn.Linear(3, 4)
    model = MemBridgeModel(encoder, MemBridgeFusion(tiny_config()) if stage2 else None)
    if stage2:
        model.freeze_encoder()
    return model


def expected_part(name: str) -> str:
    """The group each name belongs in, written from the spec tables (MCQ_HMMC.md B.10, T2VLP_STOA.md C.2 item 9)."""
    if name.startswith(("encoder.tubes.", "encoder.objects.")):
        return "extra"
    if name.startswith("fusion."):
        return "fusion"
    if name.startswith("encoder.text_hf."):
        return "text"
    if name.startswith("encoder.clip."):
        return "text" if name.split(".")[2] in TEXT_TOWER else "visual"
    return "other"


def lr_of_each_parameter(model: nn.Module, **kwargs) -> dict[str, float]:
    groups = build_param_groups(model, weight_decay=0.2, **kwargs)
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("text_lr", [None, 1e-7])
def test_stage1_text_lr_moves_only_the_text_tower(text_lr) -> None:
    model = t2vlp_model(stage2=False)
    lrs = lr_of_each_parameter(model, lr=1e-4, coef_lr=1e-3, text_lr=text_lr)
    parts = {name: expected_part(name) for name in lrs}
    assert {"text", "visual", "extra"} <= set(parts.values())
    for name, lr in lrs.items():
        part = parts[name]
        if part == "text" and name.startswith("encoder.text_hf."):  # not CLIP: today's rule puts it at lr
            want = 1e-4 if text_lr is None else text_lr
        elif part in ("text", "visual"):
            want = 1e-7 if part == "visual" or text_lr is None else text_lr
        else:  # tubes in stage 1 (no fusion flags): the fusion rate is lr, as before --extra_lr
            want = 1e-4
        assert lr == pytest.approx(want, rel=1e-12), name
    assert lrs["encoder.clip.logit_scale"] == pytest.approx(1e-7)  # CLIP, not text tower


@pytest.mark.parametrize("fusion_lr", [None, 2e-5])
@pytest.mark.parametrize("extra_lr", [None, 3e-6])
def test_stage2_extra_lr_sets_the_tube_module_default_fusion_rate(fusion_lr, extra_lr) -> None:
    model = t2vlp_model(stage2=True)
    lrs = lr_of_each_parameter(model, lr=1e-5, coef_lr=None, fusion_lr=fusion_lr, extra_lr=extra_lr)
    fusion_rate = 1e-5 if fusion_lr is None else fusion_lr
    tubes = [name for name in lrs if expected_part(name) == "extra"]
    assert tubes and all(name.startswith("encoder.tubes.") for name in tubes)
    assert not any(expected_part(name) in ("text", "visual") for name in lrs)  # the CLIP is frozen
    for name, lr in lrs.items():
        want = (fusion_rate if extra_lr is None else extra_lr) if name in tubes else fusion_rate
        assert lr == pytest.approx(want, rel=1e-12), name


def first_step(model: nn.Module, **kwargs) -> dict[str, torch.Tensor]:
    """Parameter changes of one BertAdam step (no warm-up) on fixed per-name gradients, in float64 (the change is
    then exact to ~1e-12 of the weight, so a doubled rate gives a doubled change to that precision)."""
    model.double()
    optimizer, _, _ = build_optimizer(
        model, optimizer="bertadam", weight_decay=0.2, warmup_proportion=0.0, total_steps=10, max_grad_norm=1.0,
        **kwargs,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for index, p in enumerate(model.parameters()):
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
    optimizer.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


def test_doubling_extra_lr_doubles_the_tube_step_and_leaves_the_fusion_step() -> None:
    args = dict(lr=1e-5, coef_lr=None, fusion_lr=2e-5)
    base = first_step(t2vlp_model(stage2=True), extra_lr=1e-3, **args)
    double = first_step(t2vlp_model(stage2=True), extra_lr=2e-3, **args)
    tubes = [n for n in base if n.startswith("encoder.tubes.")]
    fusion = [n for n in base if n.startswith("fusion.")]
    assert tubes and fusion
    for name in tubes:
        assert base[name].abs().max() > 0
        torch.testing.assert_close(double[name], 2 * base[name], rtol=1e-9, atol=1e-12, msg=name)
    for name in fusion:
        assert torch.equal(double[name], base[name]), name


def test_doubling_text_lr_doubles_the_text_step_and_leaves_the_visual_step() -> None:
    args = dict(lr=1e-3, coef_lr=0.1, fusion_lr=None)
    base = first_step(t2vlp_model(stage2=False), text_lr=1e-3, **args)
    double = first_step(t2vlp_model(stage2=False), text_lr=2e-3, **args)
    text = [n for n in base if expected_part(n) == "text"]
    others = [n for n in base if expected_part(n) != "text"]
    assert "encoder.clip.token_embedding.weight" in text and "encoder.clip.visual.proj" in others
    for name in text:
        torch.testing.assert_close(double[name], 2 * base[name], rtol=1e-9, atol=1e-12, msg=name)
    for name in others:
        assert torch.equal(double[name], base[name]), name
