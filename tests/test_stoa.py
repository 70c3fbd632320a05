"""STOA-VLP (``--method stoa``, spec T2VLP_STOA.md B / C): detections, object/action tokens, matching loss."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dataloaders import synthetic
from dataloaders.detections import (
    DetectedObject,
    DetectionReader,
    TagReader,
    box_iou,
    frame_boxes,
    read_detection_file,
    select_objects,
    tag_masks,
    trajectory_ids,
)
from dataloaders.errors import DataError
from dataloaders.tokenizer import ClipTokenizer
from modules.aux_losses import hungarian, object_action_matching
from modules.stoa import ObjectActionTokens, roi_features

LABELS = {"circle": 1, "square": 2, "blob": 3}


# ---- data -------------------------------------------------------------------------------------------------------


def test_box_selection_drops_duplicates_and_overlaps_and_keeps_the_largest():
    big = DetectedObject(1, (0.0, 0.0, 0.5, 0.5), 0.9)
    duplicate = DetectedObject(1, (0.05, 0.05, 0.55, 0.55), 0.95)  # same class, IoU 0.68 >= 0.2: dropped
    same_far = DetectedObject(1, (0.6, 0.6, 0.7, 0.7), 0.8)  # same class, no overlap: kept
    other_on_top = DetectedObject(2, (0.0, 0.0, 0.45, 0.5), 0.99)  # new class, IoU 0.9 >= 0.5: dropped
    other_side = DetectedObject(2, (0.5, 0.0, 1.0, 0.3), 0.7)  # new class, no overlap: kept
    assert box_iou(big.box, duplicate.box) == pytest.approx(0.2025 / (0.25 + 0.25 - 0.2025))
    kept = select_objects([big, duplicate, same_far, other_on_top, other_side], object_count=10)
    assert kept == [big, other_side, same_far]  # area order 0.25, 0.15, 0.01
    assert select_objects([big, duplicate, same_far, other_on_top, other_side], object_count=2) == [big, other_side]
    # the 2*O cap applies in detection order before the confidence sort (S10)
    small = [DetectedObject(3, (0.125 * i, 0.75, 0.125 * i + 0.125, 0.875), 0.1 * i) for i in range(6)]
    # only the first 2 are scanned (conf 0.0, 0.1, never the 0.5 one); equal areas keep the confidence order
    assert [o.conf for o in select_objects(small, object_count=1)] == [0.1]


def test_trajectory_ids_follow_first_appearance_not_confidence():
    classes = np.array([[0, 5, 2], [2, 7, 0]])
    assert trajectory_ids(classes, object_count=2).tolist() == [5, 2, 7, 0]
    assert trajectory_ids(classes, object_count=1).tolist() == [5, 2]


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_detection_file_errors_name_the_file_and_frame(tmp_path: Path):
    good = {"objects": [{"class": "circle", "rect": [0.1, 0.1, 0.4, 0.5], "conf": 0.9}]}
    frames = read_detection_file(_write(tmp_path / "v.json", [good, {"objects": []}]), LABELS)
    assert frames[0][0] == DetectedObject(1, (0.1, 0.1, 0.4, 0.5), 0.9) and frames[1] == []
    cases = {
        "unknown": [good, {"objects": [{"class": "dragon", "rect": [0, 0, 1, 1]}]}],
        "absolute": [good, {"objects": [{"class": "circle", "rect": [10, 10, 100, 120]}]}],
        "inverted": [good, {"objects": [{"class": "circle", "rect": [0.5, 0.1, 0.4, 0.5]}]}],
        "no_objects": [good, {"boxes": []}],
        "no_rect": [good, {"objects": [{"class": "circle"}]}],
    }
    for name, data in cases.items():
        path = _write(tmp_path / f"{name}.json", data)
        with pytest.raises(DataError, match=rf"{name}\.json frame 1"):
            read_detection_file(path, LABELS)
    with pytest.raises(DataError, match="empty.json"):
        read_detection_file(_write(tmp_path / "empty.json", []), LABELS)


def test_missing_detections_give_padding_and_a_counted_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    label_map = _write(tmp_path / "labels.json", {"label_to_idx": LABELS})
    (tmp_path / "objects").mkdir()
    reader = DetectionReader(tmp_path / "objects", label_map, object_count=2)
    items = reader.items("absent", torch.ones(3, dtype=torch.long))
    reader.items("absent2", torch.ones(3, dtype=torch.long))
    assert reader.missing == 2 and "absent2" in caplog.text
    assert (items["object_boxes"] == -1).all() and (items["object_classes"] == 0).all()
    assert items["trajectory_ids"].tolist() == [0, 0, 0, 0]


def test_frame_entries_spread_over_the_valid_frames():
    frames = [[DetectedObject(1, (0.1 * i, 0.0, 0.1 * i + 0.1, 0.1), 0.9)] for i in range(7)]
    boxes, classes = frame_boxes(frames, num_frames=5, num_valid=4, object_count=2)
    assert boxes[:4, 0, 0].tolist() == pytest.approx([0.0, 0.2, 0.4, 0.6])  # entries 0, 2, 4, 6
    assert (boxes[4] == -1).all() and (boxes[:, 1] == -1).all() and classes[:4, 0].tolist() == [1, 1, 1, 1]


def test_tag_masks_align_with_the_text_ids_and_bad_tag_files_raise(tmp_path: Path):
    nouns, verbs = tag_masks(["DET", "NOUN", "VERB", "NOUN"], max_words=5)
    assert nouns.tolist() == [0, 0, 1, 0, 0] and verbs.tolist() == [0, 0, 0, 1, 0]  # truncated to L-2 tokens
    tokenizer = ClipTokenizer()
    captions = ["a red circle moves up"]
    tags = _write(tmp_path / "tags.json", {"0": synthetic.caption_token_tags(captions[0], tokenizer)})
    items = TagReader(tags, captions, tokenizer, max_words=8).items(captions[0])
    assert items["noun_mask"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert items["verb_mask"].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    with pytest.raises(DataError, match="has 5 CLIP-BPE tokens"):
        TagReader(_write(tmp_path / "bad.json", {"0": ["NOUN"]}), captions, tokenizer, max_words=8)


def test_synthetic_detections_are_exact_and_filtered(synthetic_small: Path):
    manifest = json.loads((synthetic_small / "manifest.json").read_text())
    labels = json.loads((synthetic_small / synthetic.LABEL_MAP_FILE_NAME).read_text())["label_to_idx"]
    distractor_frames = 0
    for video_id, attrs in list(manifest["videos"].items())[:12]:
        spec = next(s for s in synthetic.make_specs(synthetic.split_sizes(None, True), 0) if s.video_id == video_id)
        raw = read_detection_file(synthetic_small / "objects" / f"{video_id}.json", labels)
        truth = synthetic.shape_boxes(spec, synthetic.SMALL_FORMAT)
        assert len(raw) == synthetic.SMALL_FORMAT.num_frames
        for frame, boxes in zip(raw, truth, strict=True):
            distractor_frames += len(frame) > attrs["count"]
            kept = select_objects(frame, object_count=5)
            shapes = sorted(o.box for o in kept if o.label == labels[attrs["shape"]])
            # duplicates / overlapping blobs are filtered: exactly the drawn shapes remain, with their exact boxes
            assert len(shapes) == attrs["count"]
            np.testing.assert_allclose(sorted(map(tuple, boxes)), shapes, atol=1e-5)
    assert distractor_frames > 0
    # the rendered shape lies inside its box (frame 0 of the first video, pixels of the shape colour)
    spec = synthetic.make_specs(synthetic.split_sizes(None, True), 0)[0]
    frame = synthetic.render_video(spec, synthetic.SMALL_FORMAT)[0].astype(int)
    ys, xs = np.nonzero(np.abs(frame - np.asarray(spec.rgb)).sum(-1) == 0)
    size = synthetic.SMALL_FORMAT.size
    boxes = synthetic.shape_boxes(spec, synthetic.SMALL_FORMAT)[0] * size
    assert xs.min() + 0.5 >= boxes[:, 0].min() - 1e-6 and xs.max() + 0.5 <= boxes[:, 2].max() + 1e-6
    assert ys.min() + 0.5 >= boxes[:, 1].min() - 1e-6 and ys.max() + 0.5 <= boxes[:, 3].max() + 1e-6


def test_synthetic_tag_file_marks_shape_nouns_and_motion_verbs(synthetic_small: Path):
    captions = [e["caption"] for e in json.loads((synthetic_small / "webvid" / "frozen_train_labels.json").read_text())]
    tokenizer = ClipTokenizer()
    reader = TagReader(synthetic_small / "webvid" / synthetic.TAG_FILE_NAME, captions, tokenizer, max_words=16)
    for caption in captions:
        ids = tokenizer.encode(caption, 16)[0]
        items = reader.items(caption)
        nouns = tokenizer.decode(ids[items["noun_mask"].numpy().astype(bool)])
        assert any(shape in nouns for shape in synthetic.SHAPES), (caption, nouns)
        assert items["verb_mask"].sum() >= 1


# ---- object / action tokens -------------------------------------------------------------------------------------


def test_roi_align_on_a_known_grid_hand_computed():
    g, w = 4, 2
    xs = torch.arange(g, dtype=torch.float32)
    # channel 0 = column index, channel 1 = row index: bilinear sampling returns the sample coordinates
    grid = torch.stack([xs.repeat(g), xs.repeat_interleave(g)], dim=-1).reshape(1, g * g, w)
    box = torch.tensor([[[0.25, 0.5, 0.75, 1.0]]])  # grid coords x 1..3, y 2..4
    points = roi_features(grid, box)[0, 0].reshape(g, g, w)
    # aligned=True: pixel centres at integer coordinates after the -0.5 shift; bins of width 0.5, 2x2 samples each
    centres_x = 1.0 - 0.5 + 0.5 * (torch.arange(g) + 0.5)  # 0.75, 1.25, 1.75, 2.25
    centres_y = 2.0 - 0.5 + 0.5 * (torch.arange(g) + 0.5)  # 1.75, 2.25, 2.75, 3.25 (clamped at 3 beyond the grid)
    torch.testing.assert_close(points[0, :, 0], centres_x)
    torch.testing.assert_close(points[:, 0, 1], centres_y.clamp(max=g - 1))


def _tokens(o: int = 2, t: int = 3, quirks: bool = False) -> ObjectActionTokens:
    torch.manual_seed(0)
    module = ObjectActionTokens(16, 8, max_frames=t, object_count=o, num_actions=2, heads=2, official_quirks=quirks)
    with torch.no_grad():
        module.encoder.box_categories.normal_()  # non-zero so that slot identity would show
    return module


def _object_inputs(b: int = 2, t: int = 3, o: int = 2, p: int = 16, w: int = 16) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    tap10 = torch.randn(b, t, 1 + p, w, generator=generator)
    tap11 = torch.randn(b, t, 1 + p, w, generator=generator)
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.2, 0.9, 0.9]]).expand(b, t, o, 4).clone()
    boxes = boxes + 0.05 * torch.rand(b, t, o, 4, generator=generator)
    classes = torch.tensor([[3, 5], [5, 3], [3, 0]]).expand(b, t, o).clone()
    boxes[classes == 0] = -1.0
    traj = torch.tensor([3, 5, 0, 0]).expand(b, 2 * o).clone()
    return tap10, tap11, boxes, classes, traj, torch.ones(b, t, dtype=torch.long)


def test_trajectory_grouping_matches_a_per_class_reference():
    module = _tokens()
    tap10, tap11, boxes, classes, traj, mask = _object_inputs()
    out = module(tap10, tap11, boxes, classes, traj, mask)
    objects = module.object_tokens(tap11, boxes)
    for b in range(2):
        for j, label in enumerate(traj[b].tolist()):
            slots = objects[b][classes[b] == label]  # the class's boxes over all frames, no mask needed
            seq = torch.cat([module.cls_embedding[None], slots])[None]
            expected = module.trajectory(seq)[0]
            torch.testing.assert_close(out.trajectories[b, j], expected, atol=1e-5, rtol=1e-5)
    assert out.trajectory_valid[0].tolist() == [True, True, False, False]
    assert out.tokens.shape == (2, 2 * 2 + 2, 8)


def test_permuting_box_slots_leaves_trajectory_tokens_unchanged_and_padding_leaves_actions():
    module = _tokens()
    with torch.no_grad():
        module.encoder.box_categories.zero_()  # the published init (a per-slot embedding breaks slot symmetry)
    tap10, tap11, boxes, classes, traj, mask = _object_inputs()
    out = module(tap10, tap11, boxes, classes, traj, mask)
    perm = torch.tensor([1, 0])
    permuted = module(tap10, tap11, boxes[:, :, perm], classes[:, :, perm], traj, mask)
    torch.testing.assert_close(permuted.trajectories, out.trajectories, atol=1e-5, rtol=1e-5)
    # more padding slots (O 2 -> 3) do not change the action tokens
    padded_boxes = torch.cat([boxes, torch.full_like(boxes[:, :, :1], -1.0)], dim=2)
    padded_classes = torch.cat([classes, torch.zeros_like(classes[:, :, :1])], dim=2)
    wide = ObjectActionTokens(16, 8, max_frames=3, object_count=3, num_actions=2, heads=2)
    state = {k: v for k, v in module.state_dict().items() if k != "encoder.box_categories"}
    wide.load_state_dict(state, strict=False)
    with torch.no_grad():
        wide.encoder.box_categories.zero_()
    actions = wide.actions(tap10, wide.object_tokens(tap11, padded_boxes), padded_classes, mask)
    torch.testing.assert_close(actions, out.actions, atol=1e-5, rtol=1e-5)


def test_official_quirks_run_only_the_first_trajectory_block():
    module = _tokens(quirks=True)
    tap10, tap11, boxes, classes, traj, mask = _object_inputs()
    out = module(tap10, tap11, boxes, classes, traj, mask)
    out.tokens.sum().backward()
    assert module.trajectory.blocks.resblocks[1].attn.in_proj_weight.grad is None
    assert module.trajectory.blocks.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    normal = _tokens()
    normal(tap10, tap11, boxes, classes, traj, mask).tokens.sum().backward()
    assert normal.trajectory.blocks.resblocks[1].attn.in_proj_weight.grad.abs().sum() > 0


def test_action_tokens_do_not_train_through_the_block10_patches():
    module = _tokens()
    tap10, tap11, boxes, classes, traj, mask = _object_inputs()
    tap10.requires_grad_(True)
    tap11.requires_grad_(True)
    module(tap10, tap11, boxes, classes, traj, mask).tokens.sum().backward()
    assert tap10.grad[:, :, 1:].abs().sum() == 0 and tap10.grad[:, :, 0].abs().sum() > 0  # head CLS only
    assert tap11.grad[:, :, 1:].abs().sum() > 0  # object tokens are not detached (B.3)
    assert module.action_queries.grad.abs().sum() > 0 and module.encoder.patch_to_d[0].weight.grad.abs().sum() > 0


# ---- Hungarian matching and the loss ----------------------------------------------------------------------------


def test_hungarian_hand_computed_and_against_brute_force():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.85, 0.1, 0.2]])
    rows, cols = hungarian(scores)
    # greedy would take (0,0)=0.9 then (1,2)=0.2 -> 1.1; the optimum is (0,1)+(1,0) = 1.65
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    generator = torch.Generator().manual_seed(0)
    for r, c in [(1, 1), (2, 3), (3, 3), (4, 2), (3, 5)]:
        for _ in range(5):
            s = torch.rand(r, c, generator=generator)
            rows, cols = hungarian(s)
            best = max(
                sum(float(s[i, j]) for i, j in zip(rs, cs, strict=True))
                for rs in itertools.permutations(range(r), min(r, c))
                for cs in itertools.permutations(range(c), min(r, c))
            )
            assert len(rows) == min(r, c)
            assert float(s[rows, cols].sum()) == pytest.approx(best, abs=1e-6)


def _reference_matching(traj, valid, act, text, nouns, verbs):
    """Brute force: per sample the minimum-cost pairing is the permutation maximising the softmaxed score."""
    video, words = [], []
    for i in range(traj.shape[0]):
        for tokens, mask in ((traj[i][valid[i]], nouns[i].bool()), (act[i], verbs[i].bool())):
            z = text[i][mask]
            if len(tokens) == 0 or len(z) == 0:
                continue
            s = (tokens @ z.t()).softmax(-1)
            k = min(len(tokens), len(z))
            best = max(
                ((rs, cs) for rs in itertools.permutations(range(len(tokens)), k)
                 for cs in itertools.permutations(range(len(z)), k)),
                key=lambda p: sum(float(s[a, b].detach()) for a, b in zip(*p, strict=True)),
            )  # fmt: skip
            video += [tokens[a] for a in best[0]]
            words += [z[b] for b in best[1]]
    return ((torch.stack(video) - torch.stack(words)) ** 2).mean()


def test_matching_loss_equals_a_brute_force_reference_and_trains_only_the_video_side():
    generator = torch.Generator().manual_seed(3)
    traj = torch.randn(2, 4, 6, generator=generator, requires_grad=True)
    act = torch.randn(2, 3, 6, generator=generator, requires_grad=True)
    text = torch.randn(2, 7, 6, generator=generator)
    valid = torch.tensor([[True, True, True, False], [False, True, False, False]])
    text_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    nouns = torch.tensor([[0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0]])
    verbs = torch.tensor([[0, 0, 0, 1, 1, 0, 0], [0, 1, 0, 1, 0, 0, 0]])
    loss = object_action_matching(traj, valid, act, text, text_mask, nouns, verbs)
    torch.testing.assert_close(loss, _reference_matching(traj, valid, act, text, nouns, verbs))
    loss.backward()
    assert traj.grad[0, 3].abs().sum() == 0 and traj.grad[1, 0].abs().sum() == 0  # invalid trajectories
    assert act.grad.abs().sum() > 0
    # S6: EOT joins both sets; S7: no objects -> no actions either
    eot = torch.zeros_like(nouns)
    eot[0, 6], eot[1, 4] = 1, 1
    quirky = object_action_matching(traj, valid, act, text, text_mask, nouns, verbs, eot_in_sets=True)
    torch.testing.assert_close(quirky, _reference_matching(traj, valid, act, text, nouns | eot, verbs | eot))
    none_valid = torch.zeros_like(valid)
    only_actions = object_action_matching(traj, none_valid, act, text, text_mask, nouns, verbs)
    torch.testing.assert_close(only_actions, _reference_matching(traj, none_valid, act, text, nouns, verbs))
    skipped = object_action_matching(
        traj, none_valid, act, text, text_mask, nouns, verbs, skip_actions_without_objects=True
    )
    assert skipped == 0 and skipped.requires_grad


# ---- model wiring, gradients and the end-to-end run --------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _stoa_model(object_count: int = 2, quirks: bool = False):
    from modules.clip_model import CLIPConfig
    from modules.fusion import FusionConfig
    from modules.methods import fusion_overrides
    from modules.model_config import ModelConfig, build_membridge

    clip = CLIPConfig(**json.loads((REPO / "CLIP-modules" / "tiny.json").read_text()))
    fusion = FusionConfig.from_json(
        REPO / "CLIP-modules" / "fusion-tiny.json", num_bridge_tokens=2 * object_count + 4, max_frames=3, max_words=8,
        official_quirks=quirks, **fusion_overrides("stoa"),
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_membridge(
        ModelConfig(clip=clip, fusion=fusion, method="stoa", object_count=object_count, max_frames=3)
    )
    model.freeze_encoder()
    return model


def _stoa_batch(model, b: int = 3) -> dict:
    size = model.encoder.clip.config.image_resolution
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(b, 8, dtype=torch.long)
    ids[:, 0], ids[:, 1:5], ids[:, 5] = 49406, torch.randint(1, 400, (b, 4), generator=generator), 49407
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.5, 0.4, 0.9, 0.9]]).expand(b, 3, 2, 4).clone()
    classes = torch.tensor([[1, 2], [1, 0], [2, 1]]).expand(b, 3, 2).clone()
    boxes[classes == 0] = -1
    return {
        "video": torch.randn(b, 3, 3, size, size, generator=generator),
        "video_mask": torch.ones(b, 3, dtype=torch.long),
        "text_ids": ids, "text_mask": (torch.arange(8) <= 5).long().expand(b, 8).clone(),
        "object_boxes": boxes, "object_classes": classes, "trajectory_ids": torch.tensor([1, 2, 0, 0]).expand(b, 4),
        "noun_mask": torch.tensor([0, 1, 0, 1, 0, 0, 0, 0]).expand(b, 8),
        "verb_mask": torch.tensor([0, 0, 1, 0, 0, 0, 0, 0]).expand(b, 8),
    }  # fmt: skip


def test_stage2_gradients_reach_exactly_the_fusion_and_the_object_module():
    from modules.membridge import Stage2Weights

    model = _stoa_model()
    out = model.stage2_losses(_stoa_batch(model), torch.Generator().manual_seed(1), Stage2Weights())
    assert {"vtm", "mlm", "plm", "match"} <= set(out) and out["match"] > 0
    out["loss"].backward()
    grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}
    clip = [n for n in grads if n.startswith("encoder.") and not n.startswith("encoder.objects.")]
    assert clip and not any(grads[n] for n in clip)  # CLIP frozen
    for name in ("encoder.objects.action_queries", "encoder.objects.encoder.patch_to_d.0.weight",
                 "encoder.objects.trajectory.proj", "encoder.objects.action.proj", "fusion.vocab_proj"):  # fmt: skip
        assert grads[name], name
    # the matching loss alone trains only the object module
    model.zero_grad()
    only = model.stage2_losses(_stoa_batch(model), torch.Generator().manual_seed(1), Stage2Weights(0, 0, 0, 1, 0, 1))
    only["loss"].backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(n.startswith("encoder.objects.") for n in trained)


def _stage2_with_details(model, batch: dict) -> tuple[dict, dict]:
    from modules.membridge import Stage2Weights

    torch.manual_seed(7)  # the heads' dropout masks: the same in every call
    return model.stage2_losses(batch, torch.Generator().manual_seed(1), Stage2Weights(), return_details=True)


@pytest.mark.parametrize("quirks", [False, True])
def test_empty_trajectory_slots_are_key_masked_in_every_fusion_pass(quirks: bool):
    """B.6: the object part comes with the mask ``[id_list != 0, 1, 1, 1, 1]``. Video 0 has one trajectory (slots
    1..3 empty), video 1 two (slots 2, 3 empty), video 2 none: the padding boxes (class 0) feed only the empty
    trajectory slots, so moving them must leave every fusion pass bit-identical (VTM with its hard negatives, MLM,
    PLM; the matching loss already skips empty slots), while moving a real box changes the losses."""
    model = _stoa_model(quirks=quirks)
    batch = _stoa_batch(model)
    batch["trajectory_ids"] = torch.tensor([[1, 0, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0]])
    classes = torch.tensor([[1, 0], [2, 1], [0, 0]])  # per video, the same classes in each of the 3 frames
    batch["object_classes"] = classes[:, None].expand(3, 3, 2).clone()
    batch["object_boxes"][batch["object_classes"] == 0] = -1.0
    with torch.no_grad():
        out, details = _stage2_with_details(model, batch)
        draws = {k: details[k] for k in ("neg_video", "neg_text", "mlm_masked_ids", "mlm_labels", "plm_starts")}
        from modules.membridge import Stage2Draws

        moved = {**batch, "object_boxes": batch["object_boxes"].clone()}
        moved["object_boxes"][moved["object_classes"] == 0] = torch.tensor([0.2, 0.3, 0.7, 0.8])
        # the empty trajectory tokens really change ...
        frames, tokens, mask = model.video_tokens(batch)
        _, tokens_moved, _ = model.video_tokens(moved)
        valid = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]).bool()
        assert torch.equal(mask, torch.cat([valid, torch.ones(3, 4, dtype=torch.bool)], dim=1))
        assert not torch.equal(tokens[:, :4][~valid], tokens_moved[:, :4][~valid])
        assert torch.equal(tokens[:, :4][valid], tokens_moved[:, :4][valid])
        # ... yet no fusion output sees them (same draws, incl. hard negatives carrying other videos' masks)
        torch.manual_seed(7)
        same, same_details = model.stage2_losses(moved, weights=None, draws=Stage2Draws(**draws), return_details=True)
        real = {**batch, "object_boxes": batch["object_boxes"].clone()}
        real["object_boxes"][0, :, 0] = torch.tensor([0.3, 0.2, 0.8, 0.7])  # video 0's one real box
        torch.manual_seed(7)
        other = model.stage2_losses(real, weights=None, draws=Stage2Draws(**draws))
    for key in ("vtm", "mlm", "plm", "loss"):
        assert torch.equal(out[key], same[key]), key
        assert not torch.equal(out[key], other[key]), key
    assert int(details["neg_video"].eq(0).sum() + details["vtm_video_index"].eq(0).sum()) > 0
    for name in ("vtm", "mlm", "plm"):
        assert torch.equal(details[f"{name}_logits"], same_details[f"{name}_logits"]), name
        # the additive mask has -inf in exactly the empty slots' columns (plus the usual padding/causal entries)
        attention = details[f"{name}_attention_mask"][:, 0]  # [R, N, N]
        video_of_row = {"vtm": details["vtm_video_index"], "plm": details["plm_rows"]}.get(name, torch.arange(3))
        extra_cols = attention[:, :, 3 + 1 : 3 + 1 + 8]  # T = 3 frames, then v_sep, then the 2O + 4 extra tokens
        hidden = torch.isinf(extra_cols)
        assert bool((extra_cols[~hidden] == 0).all())
        expected = ~mask[video_of_row].unsqueeze(1).expand_as(hidden).clone()
        assert torch.equal(hidden, expected), name  # every row (video, extra, text; PLM's causal text too)
    # without the object module (cached tokens + their mask): the mask still travels with the tokens
    cached = {"frame_feats": frames, "video_mask": batch["video_mask"], "text_ids": batch["text_ids"],
              "text_mask": batch["text_mask"], "video_tokens": tokens, "video_token_mask": mask}  # fmt: skip
    noisy = {**cached, "video_tokens": torch.where(mask.unsqueeze(-1), tokens, torch.randn_like(tokens) * 50)}
    with torch.no_grad():
        torch.manual_seed(7)
        a = model.stage2_losses(cached, draws=Stage2Draws(**draws))
        torch.manual_seed(7)
        b = model.stage2_losses(noisy, draws=Stage2Draws(**draws))
        torch.manual_seed(7)
        c = model.stage2_losses({**cached, "video_token_mask": None} | {"video_tokens": noisy["video_tokens"]},
                                draws=Stage2Draws(**draws))  # fmt: skip
    for key in ("vtm", "mlm", "plm"):
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], out[key]), key
        assert not torch.equal(a[key], c[key]), key  # the same noise without the mask does change the losses


def test_extra_mask_hides_exactly_its_columns_in_the_fusion_attention_mask():
    from modules.fusion import fusion_attention_mask

    video_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    extra = torch.tensor([[1, 0, 1], [0, 0, 1]])
    for attention, causal in (("joint", False), ("joint", True), ("bridge", False), ("bridge", True)):
        plain = fusion_attention_mask(video_mask, text_mask, 3, causal, attention=attention)
        masked = fusion_attention_mask(video_mask, text_mask, 3, causal, attention=attention, extra_mask=extra)
        expected = plain.clone()
        for b in range(2):
            for k in range(3):
                if not extra[b, k]:
                    expected[b, 0, :, 3 + 1 + k] = float("-inf")
        assert torch.equal(masked, expected), (attention, causal)
    with pytest.raises(ValueError, match="extra_mask has shape"):
        fusion_attention_mask(video_mask, text_mask, 3, False, extra_mask=extra[:, :2])


def _run(script: str, args: list[str], timeout: int = 240) -> None:
    """One entry script or module in a subprocess (tests/test_t2vlp.py's runner)."""
    from tests.test_t2vlp import _run as run_entry

    run_entry(script, args, timeout)


def _common(data: Path, out: Path) -> list[str]:
    return [
        "--clip_config", str(REPO / "CLIP-modules" / "tiny.json"), "--output_dir", str(out),
        "--val_csv", str(data / "msrvtt" / "MSRVTT_JSFUSION_test.csv"), "--features_path", str(data / "videos"),
        "--max_frames", "4", "--max_words", "12", "--batch_size", "8", "--n_display", "3", "--seed", "42",
        "--no-log_tensorboard", "--torch_threads", "1",
    ]  # fmt: skip


def _stoa_flags(data: Path) -> list[str]:
    return [
        "--method", "stoa", "--object_count", "3", "--objects_dir", str(data / "objects"),
        "--labelmap_path", str(data / synthetic.LABEL_MAP_FILE_NAME),
        "--cross_config_path", str(REPO / "CLIP-modules" / "fusion-tiny.json"), "--rerank_topk", "4",
    ]  # fmt: skip


def _latest(run: Path) -> Path:
    return run / "ckpt" / (run / "ckpt" / "latest").read_text().strip()


def _stage2_stoa_flags(data: Path, out: Path, *extra: str) -> list[str]:
    from tests.test_stage2 import fusion_flags

    tags = str(data / "webvid" / synthetic.TAG_FILE_NAME)
    return fusion_flags(data, out, *_stoa_flags(data)[:-2], "--tag_file", tags, "--head_dropout", "0",
                        "--torch_threads", "1", *extra)  # fmt: skip


@pytest.mark.slow
def test_stage2_two_gloo_ranks_equal_one_process(synthetic_small: Path, tmp_path: Path):
    """Same global batch (4), 3 steps: per-sample draws (MLM masks, PLM starts, VTM negatives over the canonically
    ordered global batch) and global-batch means make 2 ranks x 2 samples train exactly like 1 process x 4; the
    object tokens of the hard negatives travel with their masks. Head dropout off (its masks are drawn per rank)."""
    from tests.test_stage1 import latest_weights
    from tests.test_stage2 import losses, run

    flags = ("--max_steps", "3", "--epochs", "1")
    run("main_task_fusion.py", _stage2_stoa_flags(synthetic_small, tmp_path / "one", *flags))
    run("main_task_fusion.py", _stage2_stoa_flags(synthetic_small, tmp_path / "two", *flags), nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        for key in ("train/vtm", "train/mlm", "train/plm", "train/match", "train/loss", "train/vtm_acc"):
            assert one[step][key] == pytest.approx(two[step][key], rel=1e-5, abs=1e-6), (step, key)
    w1, w2 = latest_weights(tmp_path / "one"), latest_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-6, msg=name)
    run("main_task_fusion.py", _stage2_stoa_flags(synthetic_small, tmp_path / "init", "--max_steps", "1", "--epochs",
                                                  "1", "--fusion_lr", "0", "--lr", "0"))  # fmt: skip
    initial = latest_weights(tmp_path / "init")
    moved = {n.split(".")[1] for n in w1 if not torch.equal(w1[n], initial[n])}
    assert {"objects", "transformer", "match_matrix"} <= moved and "clip" not in moved, moved  # trained, CLIP frozen


@pytest.mark.slow
def test_stage2_resume_after_sigkill_continues_exactly(synthetic_small: Path, tmp_path: Path):
    from tests.test_stage1 import kill_after_first_checkpoint, latest_weights
    from tests.test_stage2 import losses, run

    flags = ("--epochs", "1", "--save_steps", "2")
    full = tmp_path / "full"
    run("main_task_fusion.py", _stage2_stoa_flags(synthetic_small, full, *flags))
    reference = losses(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]  # 24 videos / batch 4
    killed = tmp_path / "killed"
    argv = _stage2_stoa_flags(synthetic_small, killed, *flags)
    interrupted_at = kill_after_first_checkpoint(argv, killed, script="main_task_fusion.py")
    assert interrupted_at < 6
    run("main_task_fusion.py", [*argv, "--resume"])
    resumed = losses(killed)
    assert sorted(resumed) == sorted(reference)
    for step in range(interrupted_at + 1, 7):
        for key in ("train/loss", "train/match"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-7), (step, key)
    final, expected = latest_weights(killed), latest_weights(full)
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
def test_stage2_stoa_from_a_stage1_checkpoint_then_retrieval_rerank(synthetic_small: Path, tmp_path: Path):
    webvid = synthetic_small / "webvid"
    train = ["--train_csv", str(webvid / "frozen_train_labels.json"), "--webvid_tfrecord", str(webvid / "tfrecord")]
    stage1 = tmp_path / "stage1"
    _run("main_task_clip.py", ["--do_train", *_common(synthetic_small, stage1), *train, "--epochs", "2", "--lr", "2e-3",
                               "--coef_lr", "1"])  # fmt: skip
    stage2 = tmp_path / "stage2"
    _run("main_task_fusion.py", [
        "--do_train", "--do_eval", *_common(synthetic_small, stage2), *train, *_stoa_flags(synthetic_small),
        "--tag_file", str(webvid / synthetic.TAG_FILE_NAME), "--epochs", "4", "--lr", "1e-3",
        "--init_model", str(_latest(stage1)),
    ])  # fmt: skip
    rows = [json.loads(line) for line in (stage2 / "scalars.jsonl").read_text().splitlines()]
    match = [row["train/match"] for row in rows if "train/match" in row]
    assert len(match) >= 3 and match[-1] < 0.6 * match[0], match
    assert {"eval/rerank_t2v_R1", "eval/heldout_vtm_acc"} <= set(rows[-1])
    retrieval = tmp_path / "retrieval"
    _run("video_text_retrieval.main_task_retrieval", [
        "--do_train", *_common(synthetic_small, retrieval), *_stoa_flags(synthetic_small), "--epochs", "1",
        "--lr", "1e-4", "--init_model", str(_latest(stage2)), "--datatype", "msrvtt",
        "--train_csv", str(synthetic_small / "msrvtt" / "MSRVTT_train.9k.csv"),
        "--data_path", str(synthetic_small / "msrvtt" / "MSRVTT_data.json"),
    ])  # fmt: skip
    rows = [json.loads(line) for line in (retrieval / "scalars.jsonl").read_text().splitlines()]
    assert any("train/vtm" in row for row in rows) and "eval/rerank_t2v_R1" in rows[-1]


def test_stoa_refuses_stage1_and_needs_detections_but_captions():
    from dataloaders.errors import ConfigError
    from engine.builders import build_model
    from engine.flags import build_parser, validate
    from video_captioning.task import build_caption_parser, caption_contrastive_weight, validate_caption_flags

    base = ["--do_train", "--output_dir", "/tmp/unused", "--clip_config", str(REPO / "CLIP-modules" / "tiny.json")]
    with pytest.raises(ConfigError, match="needs --objects_dir"):
        validate(build_parser("fusion").parse_args([*base, "--method", "stoa"]))
    with pytest.raises(ConfigError, match="needs --objects_dir"):
        validate(build_caption_parser().parse_args([*base, "--method", "stoa", "--datatype", "msvd"]))
    args = build_parser("clip").parse_args([*base, "--method", "stoa", "--objects_dir", "x", "--labelmap_path", "y"])
    with pytest.raises(ConfigError, match="no stage 1 of its own"):
        build_model(args, with_fusion=False)
    # captioning is supported; the contrastive term defaults to STOA's MSR-VTT recipe (B.7) and can be set
    cases = [("stoa", "msrvtt", None, 1.0), ("stoa", "msvd", None, 0.0), ("membridge", "msrvtt", None, 0.0),
             ("stoa", "msrvtt", 0.0, 0.0)]  # fmt: skip
    for method, datatype, weight, expected in cases:
        ns = argparse_namespace(method=method, datatype=datatype, beam_size=1, caption_contrastive_weight=weight)
        validate_caption_flags(ns)
        assert caption_contrastive_weight(ns) == expected
    with pytest.raises(ConfigError, match="caption_contrastive_weight must be >= 0"):
        validate_caption_flags(argparse_namespace(method="stoa", datatype="msvd", beam_size=1,
                                                  caption_contrastive_weight=-1.0))  # fmt: skip


def argparse_namespace(**values: object):
    import argparse

    return argparse.Namespace(**values)


def test_published_stoa_state_dict_converts_and_loads_strictly():
    from modules.published_keys import convert_published_state_dict, is_published_layout

    model = _stoa_model()
    gen = torch.Generator().manual_seed(0)
    rand = lambda t: torch.randn(t.shape, generator=gen)  # noqa: E731
    sd = {f"clip.{k}": rand(v) for k, v in model.encoder.clip.state_dict().items()}
    objects, fusion = model.encoder.objects, model.fusion
    prefix = "clip.visual.transformer.object_encoder."
    sd.update({f"{prefix}patch_to_d.{k}": rand(v) for k, v in objects.encoder.patch_to_d.state_dict().items()})
    sd.update(
        {f"{prefix}c_coord_to_feature.{k}": rand(v) for k, v in objects.encoder.coord_to_feature.state_dict().items()}
    )
    sd[f"{prefix}box_categories"] = rand(objects.encoder.box_categories)
    for name, head in (("object_fusion", objects.trajectory), ("object_act_fusion", objects.action)):
        sd.update({f"clip.{name}.transformer.{k}": rand(v) for k, v in head.blocks.state_dict().items()})
        sd.update({f"clip.{name}.ln_post.{k}": rand(v) for k, v in head.ln_post.state_dict().items()})
        sd[f"clip.{name}.proj"] = rand(head.proj)
    width = objects.frame_pos.shape[1]
    sd["clip.object_frame_pos_emb"] = rand(objects.frame_pos)
    sd["clip.object_cls_embedding"] = torch.randn(1, width, generator=gen)
    sd["clip.object_action"] = torch.randn(1, 1, objects.num_actions, width, generator=gen)
    unused = {"clip.object_fusion.conv1.weight", "clip.object_act_fusion.class_embedding", "clip.obj_proj",
              "clip.object_alignment_proj", "clip.object_logit_bias", "clip.obj_ln.weight"}  # fmt: skip
    sd.update({k: torch.randn(2, generator=gen) for k in unused})
    block = fusion.transformer.resblocks[0].state_dict()
    for i in range(fusion.config.layers):
        sd.update({f"clip.fusion_transformer.resblocks.{i}.{k}": rand(v) for k, v in block.items()})
    for name, ours in (
        ("fusion_positional_embedding", fusion.positional_embedding), ("fusion_proj", fusion.vocab_proj),
        ("fusion_logit_bias", fusion.vocab_bias), ("fusion_match_matrix", fusion.match_matrix),
        ("fusion_unmatch_matrix", fusion.unmatch_matrix),
    ):  # fmt: skip
        sd[f"clip.{name}"] = rand(ours)
    assert is_published_layout(sd)
    converted, unmapped = convert_published_state_dict(sd, fusion_layers=fusion.config.layers)
    assert set(unmapped) == unused
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(objects.action_queries, sd["clip.object_action"][0, 0])
    assert torch.equal(objects.cls_embedding, sd["clip.object_cls_embedding"][0])
    assert torch.equal(objects.encoder.coord_to_feature[2].weight, sd[f"{prefix}c_coord_to_feature.2.weight"])
    del converted["encoder.objects.frame_pos"]
    assert model.load_state_dict(converted, strict=False).missing_keys == ["encoder.objects.frame_pos"]


# ---- downstream: captioning and QA ------------------------------------------------------------------------------


def _trained(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}


OBJECT_PARTS = (
    "encoder.objects.action_queries", "encoder.objects.encoder.patch_to_d.0.weight",
    "encoder.objects.encoder.box_categories", "encoder.objects.trajectory.proj",
    "encoder.objects.trajectory.blocks.resblocks.1.mlp.c_proj.weight", "encoder.objects.action.proj",
)  # fmt: skip


def test_stoa_captioning_trains_the_object_module_and_the_fusion_and_post_sim_the_dual_encoder():
    from video_captioning.task import CaptionTask

    model = _stoa_model()  # CLIP frozen, as with a large --freeze_layer_num
    batch = _stoa_batch(model)
    out = CaptionTask(model).train()(batch)
    assert set(out) == {"loss", "plm_acc"}
    out["loss"].backward()
    trained = _trained(model)
    assert all(n.startswith(("encoder.objects.", "fusion.")) for n in trained), trained
    assert set(OBJECT_PARTS) <= trained and "fusion.vocab_proj" in trained
    assert not trained & {"fusion.match_matrix", "fusion.unmatch_matrix"}  # no VTM in captioning
    # end-to-end fine-tuning (--freeze_layer_num 0): the ViT trains through frames and objects, the text tower only
    # through the tied head (its prefix features carry no gradient) ...
    model.encoder.requires_grad_(True)
    model.zero_grad()
    CaptionTask(model).train()(batch)["loss"].backward()
    trained = _trained(model)
    clip_trained = {n for n in trained if n.startswith("encoder.clip.")}
    assert {"encoder.clip.visual.conv1.weight", "encoder.clip.token_embedding.weight"} <= clip_trained
    assert all(n.startswith("encoder.clip.visual.") for n in clip_trained - {"encoder.clip.token_embedding.weight"})
    # ... and the contrastive term (STOA's post_sim) adds the text tower and the temperature
    model.zero_grad()
    out = CaptionTask(model, contrastive_weight=1.0).train()(batch)
    assert out["contrastive"] > 0
    out["loss"].backward()
    added = _trained(model) - trained
    assert "encoder.clip.logit_scale" in added and "encoder.clip.transformer.resblocks.0.attn.in_proj_weight" in added


def test_stoa_decoding_is_the_argmax_of_the_training_rows_and_cached_equals_naive():
    from modules.fusion import encode_text_with_probes, plm_targets
    from video_captioning.captioner import generate_captions

    model = _stoa_model().eval()
    batch = _stoa_batch(model)
    encoder, fusion, clip = model.encoder, model.fusion, model.encoder.clip
    sot, eot = 49406, fusion.config.eot_token_id
    with torch.no_grad():
        frames, objects = encoder.encode_video_tokens(batch["video"], batch["video_mask"], batch=batch)
        vmask = batch["video_mask"]
        cached = generate_captions(model, frames, vmask, 7, bos=sot, video_tokens=objects)
        plain = generate_captions(model, frames, vmask, 7, bos=sot, video_tokens=objects, use_cache=False)
        assert torch.equal(cached, plain) and cached.shape[1] > 0
        beams = generate_captions(model, frames, vmask, 7, beam_size=2, bos=sot, video_tokens=objects)
        beams_plain = generate_captions(
            model, frames, vmask, 7, beam_size=2, bos=sot, video_tokens=objects, use_cache=False
        )
        assert torch.equal(beams, beams_plain)
        # greedy token i+1 = argmax of the teacher-forced training row (b, i) on the decoded prefix
        for b in range(len(cached)):
            words = cached[b].tolist()
            n = min(len(words) - (words[-1] == 0) * words.count(0), 6)
            ended = eot in words[: n + 1]
            words = words[: words.index(eot)] if ended else words[:n]
            ids = torch.zeros(1, 8, dtype=torch.long)
            ids[0, : len(words) + 2] = torch.tensor([sot, *words, eot])
            mask = (ids != 0).long()
            starts = torch.ones(1, dtype=torch.long)
            prefixes = plm_targets(ids, mask, starts)[1].unique()
            feats, probes = encode_text_with_probes(clip, ids, prefixes, eot)
            rows = fusion.plm_objective(
                frames[b : b + 1], vmask[b : b + 1], ids, mask, starts, feats, probes, prefixes,
                clip.token_embedding.weight, objects[b : b + 1],
            )  # fmt: skip
            predicted = rows.logits.argmax(-1).tolist()
            assert predicted[: len(words)] == words
            if ended:
                assert predicted[len(words)] == eot


def test_stoa_qa_answer_state_matches_an_unpadded_reference_and_trains_objects_and_fusion():
    from video_qa.model import MemBridgeQAModel
    from video_qa.task import QATask

    base = _stoa_model()
    model = MemBridgeQAModel(base.encoder, base.fusion, head="first_token").eval()
    batch = _stoa_batch(model, b=2)
    batch["trajectory_ids"] = torch.tensor([[1, 2, 3, 4], [2, 1, 3, 4]])  # every trajectory slot valid
    lengths = [4, 6]
    batch["question_ids"] = torch.zeros(2, 8, dtype=torch.long)
    for b, n in enumerate(lengths):
        batch["question_ids"][b, :n] = torch.tensor([49406, *range(10 + b, 8 + b + n), 49407])
    batch["question_mask"] = (batch["question_ids"] != 0).long()
    batch["answer_first_token"] = torch.tensor([5, 9])
    fusion, t = model.fusion, batch["video_mask"].shape[1]
    with torch.no_grad():
        logits, _ = model.answer_logits(batch)
        frames, objects = model.encoder.encode_video_tokens(batch["video"], batch["video_mask"], batch=batch)
        q_feats, _ = model.encode_question(batch["question_ids"], batch["question_mask"])
        states = []
        for b, n in enumerate(lengths):  # [frames | v_sep | trajectories + actions | question | answer slot]
            x = torch.cat([frames[b], frames[b].mean(0, keepdim=True), objects[b], q_feats[b, :n], torch.zeros(1, 64)])
            keep = torch.ones(x.shape[0], 1)
            keep[t] = keep[t + 1 + objects.shape[1] + n - 1] = 0  # no position at v_sep and the question's EOT
            x = x + fusion.positional_embedding[: x.shape[0]] * keep
            states.append(fusion.transformer(x.unsqueeze(0))[0, -1])  # joint attention, nothing padded
        expected = fusion.vocab_logits(torch.stack(states), model.encoder.clip.token_embedding.weight)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    out = QATask(model.train())(batch)
    out["loss"].backward()
    trained = _trained(model)
    assert all(n.startswith(("encoder.objects.", "fusion.")) for n in trained), trained
    assert set(OBJECT_PARTS) <= trained and "fusion.vocab_proj" in trained


def test_caption_sets_carry_boxes_padding_without_a_detection_file_and_objects_are_encoded_once_per_video(
    synthetic_small: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    import shutil

    from dataloaders.tokenizer import ClipTokenizer
    from engine.builders import build_dataset
    from engine.distributed import DistInfo
    from video_captioning.task import DecodeSettings, build_caption_parser, caption_videos

    objects = tmp_path / "objects"
    shutil.copytree(synthetic_small / "objects", objects)
    args = build_caption_parser().parse_args([
        "--do_eval", "--output_dir", str(tmp_path / "out"), "--datatype", "msvd", "--method", "stoa",
        "--object_count", "2", "--objects_dir", str(objects), "--labelmap_path",
        str(synthetic_small / synthetic.LABEL_MAP_FILE_NAME), "--data_path", str(synthetic_small / "msvd"),
        "--features_path", str(synthetic_small / "videos"), "--max_frames", "3",
    ])  # fmt: skip
    model = _stoa_model().eval()
    size = model.encoder.clip.config.image_resolution
    dataset = build_dataset(args, "msvd_caption", "test", size)
    (objects / f"{dataset.video_ids[0]}.json").unlink()
    item = dataset[0]
    assert item["object_boxes"].shape == (3, 2, 4) and bool((item["object_boxes"] == -1).all())
    assert not item["trajectory_ids"].any() and dataset.video_extras.__self__.missing == 1
    assert f"no detection file {objects / dataset.video_ids[0]}.json" in caplog.text
    assert bool((dataset[1]["object_classes"] > 0).any())  # a video with its file gets its boxes
    train = build_dataset(args, "msvd_caption", "train", size)
    assert {"object_boxes", "object_classes", "trajectory_ids", "text_ids"} <= set(train[0])
    calls = []
    model.encoder.objects.register_forward_hook(lambda module, inputs, out: calls.append(len(inputs[0])))
    settings = DecodeSettings(max_len=3, beam_size=2, bos=49406)
    cpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    captions = caption_videos(model, dataset, cpu, 4, settings, ClipTokenizer())
    assert list(captions) == dataset.video_ids
    assert calls == [min(4, len(dataset) - i) for i in range(0, len(dataset), 4)]  # once per video, not per step


@pytest.mark.slow
def test_stoa_captioning_end_to_end_loss_falls_and_decodes(synthetic_small: Path, tmp_path: Path):
    out = tmp_path / "caption"
    _run("video_captioning.main_task_caption", [
        "--do_train", "--do_eval", *_stoa_flags(synthetic_small), "--clip_config",
        str(REPO / "CLIP-modules" / "tiny.json"), "--output_dir", str(out), "--datatype", "msrvtt",
        "--data_path", str(synthetic_small / "msrvtt" / "MSRVTT_data.json"),
        "--features_path", str(synthetic_small / "videos"), "--max_frames", "3", "--max_words", "10",
        "--batch_size", "16", "--batch_size_val", "20", "--epochs", "1", "--lr", "2e-3", "--n_display", "2",
        "--num_thread_reader", "0", "--torch_threads", "1", "--no-log_tensorboard", "--seed", "42",
    ])  # fmt: skip
    rows = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    loss = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(loss) >= 6 and np.mean(loss[-3:]) < np.mean(loss[:3]) - 0.3, loss
    assert all("train/contrastive" in row for row in rows if "train/loss" in row)  # post_sim on MSR-VTT
    captions = json.loads((out / "captions_test.json").read_text())
    assert captions and all(isinstance(c, str) for c in captions.values())
    assert any(c.strip() for c in captions.values())
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_videos"] == len(captions)


def test_stoa_qa_end_to_end(synthetic_small: Path, tmp_path: Path):
    from modules.model_config import read_model_config
    from tests.test_qa import qa_flags, run_entry

    out = tmp_path / "qa"
    run_entry(qa_flags(synthetic_small, out, "--do_train", "--do_eval", *_stoa_flags(synthetic_small)[:8],
                       "--epochs", "1", "--batch_size", "8", "--lr", "1e-3", "--torch_threads", "1"))  # fmt: skip
    results = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= results["accuracy"] <= 100.0 and results["num_questions"] > 0
    config = read_model_config(out / "ckpt" / (out / "ckpt" / "latest").read_text().strip())
    assert config.method == "stoa" and config.object_count == 3


def test_captioning_and_qa_hide_the_empty_trajectory_slots():
    """Captioning (training loss, cached decoding) and QA read the object tokens with their mask: moving the
    padding boxes, which feed only the empty trajectory slots (2 and 3 of ``_stoa_batch``), changes those tokens but
    no output; moving a real box changes them."""
    from video_captioning.captioner import generate_captions
    from video_captioning.task import CaptionTask
    from video_qa.model import MemBridgeQAModel

    base = _stoa_model()
    qa_model = MemBridgeQAModel(base.encoder, base.fusion, head="first_token").eval()
    batch = _stoa_batch(base)
    batch["question_ids"], batch["question_mask"] = batch["text_ids"], batch["text_mask"]
    padding = batch["object_classes"] == 0
    moved = {**batch, "object_boxes": batch["object_boxes"].clone()}
    moved["object_boxes"][padding] = torch.tensor([0.2, 0.3, 0.7, 0.8])
    real = {**batch, "object_boxes": batch["object_boxes"].clone()}
    real["object_boxes"][:, 0, 0] = torch.tensor([0.3, 0.2, 0.8, 0.7])

    def outputs(b: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        torch.manual_seed(3)
        loss = CaptionTask(base).eval()(b)["loss"]
        frames, tokens, mask = base.encoder.encode_video_tokens(b["video"], b["video_mask"], batch=b, return_mask=True)
        captions = generate_captions(base, frames, b["video_mask"], 5, bos=49406, video_tokens=tokens,
                                     video_token_mask=mask)  # fmt: skip
        return loss, captions, qa_model.answer_logits(b)[0], tokens

    with torch.no_grad():
        loss, captions, answers, tokens = outputs(batch)
        loss_m, captions_m, answers_m, tokens_m = outputs(moved)
        loss_r, _, answers_r, _ = outputs(real)
    assert not torch.equal(tokens[:, 2:4], tokens_m[:, 2:4])  # the empty slots' tokens did change
    assert torch.equal(loss, loss_m) and torch.equal(captions, captions_m) and torch.equal(answers, answers_m)
    assert not torch.equal(loss, loss_r) and not torch.equal(answers, answers_r)
