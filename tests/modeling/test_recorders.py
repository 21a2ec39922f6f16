"""Recorders: module outputs kept by forward hooks, and the student's own anchor matching."""

import pytest
import torch
from conftest import distill_cfg, tiny_cfg
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from torch import nn

from kd_det.losses import rank_mimicking_loss, soft_label_kd_loss
from kd_det.modeling import AnchorMatchRecorder, ModuleOutputRecorder, Source


class _Tower(nn.Module):
    """A head in the style of RetinaNet's: one tower run once per level, two outputs."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 1)
        self.tower = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.score = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        f = self.backbone(x)
        levels = [f, f[..., ::2, ::2]]
        towers = [self.tower(level) for level in levels]
        return [self.score(t) for t in towers], towers


def test_module_output_recorder_keeps_outputs_inputs_and_every_call():
    torch.manual_seed(0)
    model = _Tower()
    rec = ModuleOutputRecorder(
        model,
        {
            "features": "backbone",
            "images": Source("backbone", "input", 0),
            "scores": Source("score", calls="all"),
            "tower": Source("tower"),
            "first": Source("", index=0),
        },
    )
    x = torch.randn(2, 3, 4, 4)
    scores, towers = model(x)
    assert rec["images"] is x  # the input itself: no copy
    assert torch.equal(rec["features"], model.backbone(x))
    assert [s is r for s, r in zip(scores, rec["scores"])] == [True, True]  # one per call, in order
    assert rec["tower"] is towers[-1]  # "last": the last call
    assert rec["first"] is scores
    records = rec.pop()
    assert set(records) == {"features", "images", "scores", "tower", "first"}
    assert "features" not in rec and rec.pop() == {}  # cleared: no graph outlives its step
    with pytest.raises(KeyError, match="nothing recorded as 'features'.*'backbone'"):
        rec["features"]
    # a new forward clears what the last one left ("all" lists start afresh)
    model(x)
    model(x)
    assert len(rec["scores"]) == 2
    with rec.paused():
        model(x)
    assert "features" not in rec
    model(x)
    rec.remove()
    model(x)
    assert rec.pop() == {}
    with pytest.raises(ValueError, match="has no submodule 'head'"):
        ModuleOutputRecorder(model, {"head": "head"})


def test_module_output_recorder_training_only_and_an_eval_teacher():
    model = _Tower()
    student = ModuleOutputRecorder(model, {"features": "backbone"}, training_only=True)
    teacher = ModuleOutputRecorder(model, {"features": "backbone"})
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 2, 2))
    assert "features" not in student and "features" in teacher  # a frozen teacher runs in eval mode
    model.train()(torch.zeros(1, 3, 2, 2))
    assert "features" in student
    with pytest.raises(KeyError, match="in training mode"):
        ModuleOutputRecorder(model, {"features": "backbone"}, training_only=True)["features"]


def test_retinanet_head_outputs_and_towers_of_a_frozen_teacher():
    """A RetinaNetHead in eval mode with gradients off, as a FrozenTeacher runs it."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    from kd_det.modeling.meta_arch.retinanet import HEAD_TOWER_SOURCES

    torch.manual_seed(0)
    teacher = nn.Module()
    teacher.head = RetinaNetHead(
        input_shape=[ShapeSpec(channels=4)] * 2, num_classes=3, num_anchors=2, conv_dims=[4, 4]
    )
    teacher.eval().requires_grad_(False)
    rec = ModuleOutputRecorder(teacher, dict(HEAD_TOWER_SOURCES, head="head"))
    levels = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    with torch.no_grad():
        logits, deltas = teacher.head(levels)
    records = rec.pop()
    assert records["head"][0] is logits and records["head"][1] is deltas
    assert [t.shape[-1] for t in records["cls_tower"]] == [8, 4]  # one per level, in order
    for tower, box_tower, lg, dl in zip(records["cls_tower"], records["box_tower"], logits, deltas):
        assert torch.equal(teacher.head.cls_score(tower), lg)
        assert torch.equal(teacher.head.bbox_pred(box_tower), dl)


class _Dense(nn.Module):
    """Matches anchors to objects per image as RetinaNet.label_anchors (maybe skipping empties)."""

    def __init__(self, skip_empty: bool):
        super().__init__()
        self.anchor_matcher = Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)
        self.skip_empty = skip_empty

    def forward(self, anchors, gt_instances, second_pass=None):
        """``second_pass``: a context to match a second time in (as another head's loss would)."""
        self.label_anchors(anchors, gt_instances)
        if second_pass is not None:
            with second_pass():
                self.label_anchors(anchors, gt_instances)

    def label_anchors(self, anchors, gt_instances):
        for gt in gt_instances:
            # Detectron2 after v0.6 does not match an image without objects
            if len(gt) or not self.skip_empty:
                self.anchor_matcher(pairwise_iou(gt.gt_boxes, anchors))


def _gt(boxes):
    gt = Instances((64, 64))
    gt.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    return gt


@pytest.mark.parametrize("skip_empty", [False, True])
def test_anchor_match_recorder(skip_empty):
    anchors = Boxes(
        torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20], [50, 50, 60, 60], [0, 0, 11, 10]])
    )
    gts = [_gt([[0.0, 0, 10, 10], [50, 50, 60, 61]]), _gt([]), _gt([[50.0, 50, 60, 60]])]
    model = _Dense(skip_empty)
    matcher = model.anchor_matcher
    rec = AnchorMatchRecorder(model)
    assert model.anchor_matcher.thresholds == matcher.thresholds  # the wrapper reads as the matcher
    model(anchors, gts)
    assert rec.num_calls == (2 if skip_empty else 3)
    matched, labels = rec.pop([len(g) for g in gts], len(anchors))
    assert labels.dtype == torch.int8 and matched.dtype == torch.int64
    # the per-object index that RM needs: -1 where the anchor is no positive
    positives = torch.where(labels == 1, matched, torch.full_like(matched, -1))
    assert positives.tolist() == [[0, -1, 1, 0], [-1, -1, -1, -1], [-1, -1, 0, -1]]
    assert labels.tolist() == [[1, 0, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0]]
    # a second matching in the same step (e.g. another head's) is refused unless paused
    model(anchors, gts, second_pass=rec.paused)
    assert rec.pop([len(g) for g in gts], len(anchors))[0].tolist() == matched.tolist()
    model.eval()(anchors, gts)  # not in training: nothing kept
    assert rec.num_calls == 0
    model.train()(anchors, gts, second_pass=torch.no_grad)
    with pytest.raises(RuntimeError, match="once per image"):
        rec.pop([len(g) for g in gts], len(anchors))
    with pytest.raises(RuntimeError, match="once per image"):
        rec.pop([len(g) for g in gts], len(anchors))  # nothing recorded since
    rec.remove()
    assert model.anchor_matcher is matcher


RM_SOFT = ["KD.RM.ENABLED", True, "KD.SOFT_LABEL.ENABLED", True, "KD.SOFT_LABEL.TEMPERATURE", 2.0]


class _Counting:
    """A matcher that counts its calls and keeps its outputs."""

    def __init__(self, matcher):
        self.matcher, self.calls = matcher, []

    def __call__(self, quality):
        out = self.matcher(quality)
        self.calls.append((quality, out))
        return out


@pytest.mark.slow
def test_rank_mimicking_uses_the_students_own_matching(tiny_data_root, tmp_path, retina_teacher):
    """One matching per image and step (the student's loss's); RM and soft labels read it."""
    cfg = distill_cfg(
        "synthetic/distill/rm_retinanet_R50_to_R18.yaml",
        "synthetic/retinanet_R_50_FPN.yaml",
        retina_teacher,
        tmp_path,
        RM_SOFT,
    )
    model = build_model(cfg)
    counting = _Counting(model._kd_matches.matcher)
    model.anchor_matcher.matcher = counting  # under the recorder's wrapper: every call of the step
    seen = {}
    model.head.register_forward_hook(lambda m, i, o: seen.update(logits=o[0]))
    data = next(iter(build_detection_train_loader(cfg)))
    model.train()
    with EventStorage(0):
        losses = model(data)
    assert len(counting.calls) == len(data) == 2
    gt = [x["instances"] for x in data]
    # the matches the student's focal loss was built on
    matched = torch.stack(
        [torch.where(lab == 1, m, torch.full_like(m, -1)) for _, (m, lab) in counting.calls]
    )
    valid = torch.stack([lab >= 0 for _, (m, lab) in counting.calls])
    features = model.backbone(model.preprocess_image(data).tensor)
    anchors = Boxes.cat(model.anchor_generator([features[f] for f in model.head_in_features]))
    for (quality, _), g in zip(counting.calls, gt):
        assert torch.equal(quality, pairwise_iou(g.gt_boxes, anchors))
    with torch.no_grad():
        images = model.preprocess_image(data)
        t_logits = model.teacher.dense_class_logits(model.teacher.backbone_features(images))
    k = model.num_classes

    def flat(logits):
        return torch.cat([x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, k) for x in logits], dim=1)

    s, t = flat(seen["logits"]), flat(t_logits)
    rm = cfg.KD.RM.WEIGHT * rank_mimicking_loss(
        s, t, matched, [g.gt_classes for g in gt], cfg.KD.RM.TEMPERATURE
    )
    soft = cfg.KD.SOFT_LABEL.WEIGHT * soft_label_kd_loss(s, t, valid, 2.0)
    assert torch.equal(losses["loss_kd_rm"], rm) and torch.equal(losses["loss_kd_soft"], soft)
    assert model._kd_matches.num_calls == 0  # popped


@pytest.mark.slow
def test_self_distilled_retinanet_records_the_students_pass(tiny_data_root, tmp_path):
    """The self-teacher head matches anchors again; the recorders keep the student's pass only."""
    cfg = tiny_cfg("synthetic/distill/self_frskd_retinanet_R18.yaml", tmp_path)
    model = build_model(cfg)
    assert model.kd_prediction is not None
    counting = _Counting(model._kd_matches.matcher)
    model.anchor_matcher.matcher = counting
    seen = []
    model.head.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    model.kd_self_head.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    data = next(iter(build_detection_train_loader(cfg)))
    model.train()
    with EventStorage(0):
        losses = model(data)
    assert len(counting.calls) == 2 * len(data)  # the student's loss, then the self-teacher head's
    valid = torch.stack([lab >= 0 for _, (m, lab) in counting.calls[: len(data)]])
    k = model.num_classes
    s, t = (
        torch.cat([x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, k) for x in logits], dim=1)
        for logits in seen
    )
    want = cfg.KD.SELF.SOFT_LABEL.WEIGHT * soft_label_kd_loss(
        s, t.detach(), valid, cfg.KD.SELF.SOFT_LABEL.TEMPERATURE
    )
    assert torch.equal(losses["loss_kd_soft"], want)
