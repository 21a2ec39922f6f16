"""CrossKD (RetinaNet) and box distillation (RetinaNet and Faster R-CNN)."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import config_path, distill_cfg
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, ImageList
from tolerances import (
    ELEMENTARY,
    U64,
    Bounded,
    assert_bounded,
    assert_within,
    gamma,
    unit_roundoff,
)

from kd_det import get_kd_cfg, merge_kd_config
from kd_det.config.run import distillation_summary
from kd_det.engine import KDTrainer
from kd_det.losses import BoxDistillLoss, CrossKDClassLoss, box_distill_loss, crosskd_class_loss
from kd_det.modeling import DistillRetinaNet, build_teacher
from kd_det.modeling.distillers import (
    CrossKDDistiller,
    DenseBoxDistiller,
    RoIBoxDistiller,
    tower_split,
)

RETINA_TEACHER = "synthetic/retinanet_R_50_FPN.yaml"
RCNN_TEACHER = "synthetic/faster_rcnn_R_50_FPN.yaml"
CROSSKD = "synthetic/distill/crosskd_retinanet_R50_to_R18.yaml"
BOX_RETINA = "synthetic/distill/box_retinanet_R50_to_R18.yaml"
BOX_RCNN = "synthetic/distill/box_faster_rcnn_R50_to_R18.yaml"
DTYPES = [torch.float32, torch.float64]


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------- the losses, on hand-built rows


def _class_case(dtype):
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(6, 3, generator=g) * 2).to(dtype)
    t = (torch.randn(6, 3, generator=g) * 2).to(dtype)
    return s, t


def _direct_class(s, t, normalizer, mode, beta):
    """The per-anchor, per-class formula in Python floats (float64)."""
    total = 0.0
    for a, b in zip(s.flatten().tolist(), t.flatten().tolist()):
        ps, pt = _sig(a), _sig(b)
        if mode == "qfl":
            bce = -(pt * math.log(ps) + (1 - pt) * math.log(1 - ps))
            total += bce * abs(ps - pt) ** beta
        else:
            total += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    return total / normalizer


def _class_bounded(s, t, normalizer, mode, beta, dtype) -> Bounded:
    """crosskd_class_loss's operations: BCE with logits as (1 - p_t) s - logsigmoid(s)."""
    s, t = Bounded.exact(s, dtype), Bounded.exact(t, dtype)
    p_t = t.sigmoid()
    loss = (1 - p_t) * s - s.logsigmoid()
    if mode == "qfl":
        loss = loss * (s.sigmoid() - p_t).abs() ** beta
    else:
        loss = loss - ((1 - p_t) * t - t.logsigmoid())
    return loss.sum() / normalizer


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,beta", [("qfl", 1.0), ("qfl", 2.0), ("kl", 1.0)])
def test_crosskd_class_loss_equals_direct_computation(mode, beta, dtype):
    s, t = _class_case(dtype)
    got = crosskd_class_loss(s, t, 4.0, mode, beta)
    assert got.dtype == dtype and got.item() > 0
    want = _direct_class(s, t, 4.0, mode, beta)
    assert_bounded(got, _class_bounded(s, t, 4.0, mode, beta, dtype), mode, reference=want)
    # the registered class is the function
    assert torch.equal(CrossKDClassLoss(mode=mode, beta=beta)(s, t, normalizer=4.0), got)


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["qfl", "kl"])
def test_crosskd_class_loss_zero_when_student_equals_teacher(mode, dtype):
    _, t = _class_case(dtype)
    s = t.clone().requires_grad_(True)
    loss = crosskd_class_loss(s, t, 4.0, mode)
    # exact: qfl multiplies by |p_s - p_t| = |0|; kl subtracts the same BCE of the same numbers
    assert loss.item() == 0.0
    loss.backward()
    if mode == "qfl":
        # exact: BCE' * 0 + BCE * d|x|/dx at x = 0, which autograd takes as 0
        assert not s.grad.any()
    else:
        # (sigmoid(s) - p_t) / 4: the backward's sigmoid and the forward's, each within
        # ELEMENTARY + 2 roundings of the exact value, then the subtraction and the division
        p = t.double().sigmoid()
        u = unit_roundoff(dtype)
        bound = (2 * gamma(ELEMENTARY + 2, u) * p + gamma(2, u) * p) / 4
        assert_within(s.grad, torch.zeros_like(p), bound, "KL gradient, s = t")


def _box_case(dtype):
    """Five pairs of boxes (x0, y0, x1, y1): overlapping, nested, disjoint, equal."""
    s = torch.tensor(
        [
            [0.0, 0.0, 4.0, 4.0],
            [1.0, 1.0, 3.0, 5.0],
            [0.0, 0.0, 2.0, 2.0],
            [2.5, 1.0, 6.0, 3.0],
            [1.0, 2.0, 3.0, 7.0],
        ],
        dtype=dtype,
    )
    t = torch.tensor(
        [
            [1.0, 1.0, 5.0, 6.0],
            [0.0, 0.0, 4.0, 6.0],
            [3.0, 3.0, 5.0, 4.0],
            [2.0, 0.5, 5.5, 3.5],
            [1.0, 2.0, 3.0, 7.0],
        ],
        dtype=dtype,
    )
    w = torch.tensor([0.5, 1.0, 0.25, 0.75, 1.0], dtype=dtype)
    return s, t, w


def _direct_giou(a, b) -> float:
    """1 - GIoU of two boxes, in Python floats, as Rezatofighi et al. define it."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return 1 - (inter / union - (enclosing - union) / enclosing)


def _elementwise(fn, a: Bounded, b: Bounded) -> Bounded:
    """max/min of two bounded arrays: exact, moved by at most the larger error."""
    return Bounded(fn(a.value, b.value), torch.maximum(a.err, b.err), a.dtype)


def _giou_bounded(s, t, dtype) -> Bounded:
    s, t = Bounded.exact(s, dtype), Bounded.exact(t, dtype)
    x0, y0, x1, y1 = (s[:, i] for i in range(4))
    u0, v0, u1, v1 = (t[:, i] for i in range(4))
    iw = (_elementwise(torch.minimum, x1, u1) - _elementwise(torch.maximum, x0, u0)).clamp_min(0)
    ih = (_elementwise(torch.minimum, y1, v1) - _elementwise(torch.maximum, y0, v0)).clamp_min(0)
    inter = iw * ih
    union = (x1 - x0) * (y1 - y0) + (u1 - u0) * (v1 - v0) - inter
    ew = _elementwise(torch.maximum, x1, u1) - _elementwise(torch.minimum, x0, u0)
    eh = _elementwise(torch.maximum, y1, v1) - _elementwise(torch.minimum, y0, v0)
    enclosing = ew * eh
    return 1 - (inter / union - (enclosing - union) / enclosing)


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", ["l1", "giou"])
def test_box_distill_loss_equals_direct_computation(loss_type, dtype):
    s, t, w = _box_case(dtype)
    got = box_distill_loss(s, t, w, 3.0, loss_type)
    rows = zip(s.tolist(), t.tolist(), w.tolist())
    if loss_type == "l1":
        want = sum(c * sum(abs(a - b) for a, b in zip(x, y)) for x, y, c in rows) / 3
        per_box = (Bounded.exact(s, dtype) - Bounded.exact(t, dtype)).abs().sum(1)
    else:
        want = sum(c * _direct_giou(x, y) for x, y, c in rows) / 3
        per_box = _giou_bounded(s, t, dtype)
    assert got.item() > 0
    assert_bounded(got, (per_box * Bounded.exact(w, dtype)).sum() / 3, loss_type, reference=want)
    assert torch.equal(BoxDistillLoss(loss_type=loss_type)(s, t, weights=w, normalizer=3.0), got)


@pytest.mark.numeric
@pytest.mark.parametrize("loss_type", ["l1", "giou"])
def test_box_distill_loss_zero_when_equal_and_empty(loss_type):
    _, t, w = _box_case(torch.float32)
    s = t.clone().requires_grad_(True)
    loss = box_distill_loss(s, t, w, 3.0, loss_type)
    # exact: the same boxes give the same rounded areas, intersection = union = enclosing
    assert loss.item() == 0.0
    loss.backward()
    if loss_type == "l1":
        assert not s.grad.any()  # exact: autograd takes d|x|/dx at 0 as 0
    else:
        # 0 in exact arithmetic: min/max split ties evenly, and the intersection's, union's and
        # enclosing box's derivatives cancel.  They are at most 8 terms of size
        # max(w, h) / area (each coordinate's derivative of an area, over the union or the
        # enclosing area), times weight / normaliser, each within 10 roundings
        wh = t[:, 2:] - t[:, :2]
        size = wh.amax(1, keepdim=True) / wh.prod(1, keepdim=True) * w[:, None] / 3.0
        assert_within(s.grad, torch.zeros_like(s.grad), 8 * gamma(10) * size, "GIoU gradient")
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = box_distill_loss(empty, torch.zeros(0, 4), torch.zeros(0), 1.0, loss_type)
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="KD.BOX.LOSS"):
        box_distill_loss(s, t, w, 1.0, "smooth_l1")


# ---------------------------------------------------------------- the distillers' wiring


def _decode(transform, delta, ref):
    """Box2BoxTransform.apply_deltas for one box, in Python floats."""
    wx, wy, ww, wh = transform.weights
    w, h = ref[2] - ref[0], ref[3] - ref[1]
    cx, cy = ref[0] + 0.5 * w, ref[1] + 0.5 * h
    dx, dy, dw, dh = delta[0] / wx, delta[1] / wy, delta[2] / ww, delta[3] / wh
    pcx, pcy, pw, ph = dx * w + cx, dy * h + cy, math.exp(dw) * w, math.exp(dh) * h
    return [pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph]


def _encode(transform, box, ref):
    """Box2BoxTransform.get_deltas for one box, in Python floats."""
    wx, wy, ww, wh = transform.weights
    w, h = ref[2] - ref[0], ref[3] - ref[1]
    cx, cy = ref[0] + 0.5 * w, ref[1] + 0.5 * h
    bw, bh = box[2] - box[0], box[3] - box[1]
    bx, by = box[0] + 0.5 * bw, box[1] + 0.5 * bh
    return [wx * (bx - cx) / w, wy * (by - cy) / h, ww * math.log(bw / w), wh * math.log(bh / h)]


def _direct_box_term(loss_type, s_delta, t_box, ref, transform, weight, t_ref):
    """
    One anchor's or RoI's term in Python floats, and how far the distiller's can be from it.

    The distillers run in float64 here, except Detectron2's ``Box2BoxTransform.apply_deltas``,
    which decodes in float32 (it casts): each decoded coordinate is within
    e = gamma(ELEMENTARY + 8) * 2 M of the exact one (centre and size: the exp, and up to 8
    products and sums of magnitude at most M, the largest coordinate of the box and its
    reference).  The term moves by at most its slope times that: for "l1", the teacher's box
    encoded against ``ref`` (in float64) moves by wx e / w, wy e / h, ww 2 e / bw, wh 2 e / bh;
    for "giou", 1 - GIoU moves by at most 4 / (the smaller side of the two boxes) per coordinate
    (each of I / U and U / C by at most 2 / side), on the 4 coordinates of each decoded box.
    """

    def err(box, reference):
        return gamma(ELEMENTARY + 8) * 2 * max(abs(v) for v in list(box) + list(reference))

    e_t = err(t_box, t_ref)
    if loss_type == "l1":
        target = _encode(transform, t_box, ref)
        wx, wy, ww, wh = transform.weights
        w, h = ref[2] - ref[0], ref[3] - ref[1]
        bw, bh = t_box[2] - t_box[0], t_box[3] - t_box[1]
        slope = wx / w + wy / h + 2 * ww / bw + 2 * wh / bh
        return weight * sum(abs(a - b) for a, b in zip(s_delta, target)), weight * slope * e_t
    s_box = _decode(transform, s_delta, ref)
    side = min(s_box[2] - s_box[0], s_box[3] - s_box[1], t_box[2] - t_box[0], t_box[3] - t_box[1])
    bound = weight * 4 / side * 4 * (e_t + err(s_box, ref))
    return weight * _direct_giou(s_box, t_box), bound


def _assert_wiring(got, want, bound, what):
    """Within the float32 decoding's bound (and float64's rounding, far below it): a wrong anchor,
    class, transform, weight or normaliser moves the loss by orders of magnitude more."""
    assert_within(got, torch.tensor(want), bound + gamma(100, U64) * abs(want), what)


@pytest.mark.numeric
@pytest.mark.parametrize("loss_type", ["l1", "giou"])
def test_dense_box_distiller_equals_direct_computation(loss_type):
    g = torch.Generator().manual_seed(5)
    n, a, k = 2, 2, 3
    sizes = [(2, 2), (1, 1)]  # two levels: R = (4 + 1) * 2 = 10 anchors per image

    def levels(c, scale=0.3):
        return [(torch.randn(n, a * c, h, w, generator=g) * scale).double() for h, w in sizes]

    s_deltas, t_deltas, t_logits = levels(4), levels(4), levels(k, 2.0)

    def anchors(offset):
        out = []
        for h, w in sizes:
            xy = torch.rand(h * w * a, 2, generator=g).double() * 8 + offset
            wh = torch.rand(h * w * a, 2, generator=g).double() * 4 + 2
            out.append(Boxes(torch.cat([xy, xy + wh], dim=1)))
        return out

    s_anchors, t_anchors = anchors(0.0), anchors(0.5)  # the teacher decodes against its own
    r = 10
    labels = torch.zeros(n, r, dtype=torch.int8)
    matched = torch.zeros(n, r, dtype=torch.long)
    labels[0, [1, 4, 7]] = 1
    matched[0, [1, 4, 7]] = torch.tensor([0, 1, 0])
    labels[0, 2] = -1  # ignored: no term
    labels[1, [0, 9]] = 1
    matched[1, [0, 9]] = torch.tensor([1, 1])
    gt_classes = [torch.tensor([2, 0]), torch.tensor([1, 2])]
    s_tf, t_tf = Box2BoxTransform((1.0, 1.0, 1.0, 1.0)), Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    s_deltas = [x.requires_grad_(True) for x in s_deltas]
    distiller = DenseBoxDistiller(loss=BoxDistillLoss(loss_type=loss_type), weight=2.0)
    got = distiller(
        s_deltas, t_logits, t_deltas, s_anchors, t_anchors, matched, labels, gt_classes, s_tf, t_tf
    )["loss_kd_box"]

    def per_anchor(x, c, i, j):
        """Element (image i, anchor j of all levels) of per-level (N, A*c, H, W) tensors, as
        Detectron2 orders anchors: level, then position (row-major), then anchor."""
        for lvl in x:
            hw = lvl.shape[2] * lvl.shape[3]
            if j < hw * a:
                pos, anchor = divmod(j, a)
                return lvl[
                    i, anchor * c : (anchor + 1) * c, pos // lvl.shape[3], pos % lvl.shape[3]
                ]
            j -= hw * a

    s_cat = Boxes.cat(s_anchors).tensor
    t_cat = Boxes.cat(t_anchors).tensor
    want = bound = 0.0
    for i in range(n):
        for j in range(r):
            if labels[i, j] != 1:
                continue
            c = int(gt_classes[i][matched[i, j]])
            weight = _sig(per_anchor(t_logits, k, i, j)[c].item())
            t_box = _decode(t_tf, per_anchor(t_deltas, 4, i, j).tolist(), t_cat[j].tolist())
            s_delta = per_anchor(s_deltas, 4, i, j).tolist()
            term, err = _direct_box_term(
                loss_type, s_delta, t_box, s_cat[j].tolist(), s_tf, weight, t_cat[j].tolist()
            )
            want, bound = want + term, bound + err
    # weight 2, 5 positive anchors
    _assert_wiring(got, 2.0 * want / 5, 2.0 * bound / 5, "dense box distillation")
    got.backward()
    # only the positive anchors' deltas get a gradient
    s_grads = [x.grad for x in s_deltas]
    grads = torch.stack([per_anchor(s_grads, 4, i, j) for i in range(n) for j in range(r)])
    positive = (labels == 1).flatten()
    assert grads[positive].abs().sum(1).gt(0).all() and not grads[~positive].any()


def _roi_case(loss_type, agnostic=False):
    g = torch.Generator().manual_seed(7)
    k = 3
    boxes = [
        Boxes(torch.tensor([[0, 0, 4, 4], [1, 2, 6, 5], [2, 2, 9, 8]], dtype=torch.float64)),
        Boxes(torch.tensor([[3, 1, 5, 7], [0, 1, 8, 3]], dtype=torch.float64)),
    ]
    gt_classes = torch.tensor([2, 3, 0, 3, 1])  # RoIs 1 and 3 are background (class K = 3)
    width = 4 if agnostic else 4 * k
    s_deltas = (torch.randn(5, width, generator=g) * 0.3).double().requires_grad_(True)
    t_logits = torch.randn(5, k + 1, generator=g).double()
    t_deltas = (torch.randn(5, 4 * k, generator=g) * 0.3).double()
    t_tf = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    # the teacher's interface RoIBoxDistiller uses (FrozenTeacher's, TorchvisionTeacher's)
    teacher = SimpleNamespace(
        roi_predictions=lambda feats, bx: (t_logits, t_deltas), roi_box_transform=t_tf
    )
    distiller = RoIBoxDistiller(loss=BoxDistillLoss(loss_type=loss_type), weight=1.0)
    return distiller, boxes, gt_classes, s_deltas, t_logits, t_deltas, teacher, t_tf


@pytest.mark.numeric
@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("loss_type", ["l1", "giou"])
def test_roi_box_distiller_equals_direct_computation(loss_type, agnostic):
    distiller, boxes, gt, s_deltas, t_logits, t_deltas, teacher, t_tf = _roi_case(
        loss_type, agnostic
    )
    s_tf = Box2BoxTransform((5.0, 5.0, 2.0, 2.0))
    got = distiller(s_deltas, boxes, gt, teacher, {}, s_tf)["loss_kd_box"]
    rois = Boxes.cat(boxes).tensor
    want = bound = 0.0
    for r, c in enumerate(gt.tolist()):
        if c == 3:
            continue  # background: no box term
        probs = torch.softmax(t_logits[r], 0)
        t_box = _decode(t_tf, t_deltas[r, 4 * c : 4 * c + 4].tolist(), rois[r].tolist())
        col = 0 if agnostic else 4 * c
        s_delta = s_deltas[r, col : col + 4].tolist()
        ref = rois[r].tolist()
        term, err = _direct_box_term(loss_type, s_delta, t_box, ref, s_tf, probs[c].item(), ref)
        want, bound = want + term, bound + err
    # divided by all 5 sampled RoIs, as Detectron2's box loss
    _assert_wiring(got, want / 5, bound / 5, "RoI box distillation")
    got.backward()
    # background RoIs contribute nothing: no gradient, and changing their predictions (the
    # student's or the teacher's) leaves the loss as it is
    assert not s_deltas.grad[[1, 3]].any() and s_deltas.grad[[0, 2, 4]].abs().sum(1).gt(0).all()
    s2 = s_deltas.detach().clone()
    s2[[1, 3]] += 5.0
    t_deltas[[1, 3]] -= 3.0
    t_logits[[1, 3]] *= -4.0
    again = distiller(s2, boxes, gt, teacher, {}, s_tf)["loss_kd_box"]
    assert torch.equal(again, got.detach())


# ---------------------------------------------------------------- CrossKD on real heads


def test_tower_split():
    head = torch.nn.Sequential(
        torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU()
    )
    assert [tower_split(head, i) for i in range(3)] == [0, 1, 3]
    with pytest.raises(ValueError, match="HEAD_INDEX is 3.*2 convs"):
        tower_split(head, 3)


def test_crosskd_zero_for_a_student_equal_to_its_teacher(tiny_data_root, retina_teacher):
    """The teacher's own tower cuts through the cross-head reproduce its predictions exactly:
    both losses are 0 with a zero gradient; other features get a gradient, its weights none."""
    teacher = build_teacher(config_path(RETINA_TEACHER), retina_teacher)
    g = torch.Generator().manual_seed(0)
    images = ImageList(torch.randn(2, 3, 64, 64, generator=g), [(64, 64)] * 2)
    feats = teacher.backbone_features(images)
    for index in (0, 1):  # the FPN features; after the first of the 2 convs
        _check_crosskd_equal_student(teacher, feats, index)


def _check_crosskd_equal_student(teacher, feats, index):
    out = teacher.dense_head_predictions(feats, index)
    head = teacher.model.head
    width = head.cls_subnet[0].out_channels
    # the same numbers as the plain head
    logits, deltas = teacher.dense_head_predictions(feats)
    assert all(torch.equal(a, b) for a, b in zip(logits + deltas, out[0] + out[1]))

    def distiller(box_loss):
        return CrossKDDistiller(
            head_index=index,
            student_channels=width,
            teacher_channels=width,
            class_loss=CrossKDClassLoss(mode="qfl"),
            class_weight=1.0,
            box_loss=BoxDistillLoss(loss_type=box_loss),
            box_weight=1.0,
            align=False,
        )

    r = sum(x.shape[2] * x.shape[3] for x in logits) * 9
    labels = torch.zeros(2, r, dtype=torch.int8)
    labels[:, ::7] = 1
    labels[:, 3::11] = -1
    for box_loss in ("l1", "giou"):
        d = distiller(box_loss)
        assert not list(d.parameters())  # equal widths: no connector
        towers = [[x.clone().requires_grad_(True) for x in levels] for levels in out[2:]]
        losses = d(towers, out, teacher, labels)
        assert set(losses) == {"loss_kd_crosskd_cls", "loss_kd_crosskd_box"}
        # exact: the teacher's own layers on its own features, the same numbers
        assert all(v.item() == 0.0 for v in losses.values())
    # exact for qfl (|0| ** 1) and l1 (|0|): autograd takes d|x|/dx at 0 as 0 (GIoU's gradient
    # at equal boxes is 0 within rounding: test_box_distill_loss_zero_when_equal_and_empty)
    towers = [[x.clone().requires_grad_(True) for x in levels] for levels in out[2:]]
    sum(distiller("l1")(towers, out, teacher, labels).values()).backward()
    assert all(not x.grad.any() for levels in towers for x in levels)
    distiller = distiller("giou")
    # another student: positive losses, gradients to the student's features only
    other = [[(x + 0.5 * torch.randn_like(x)).requires_grad_(True) for x in lv] for lv in out[2:]]
    losses = distiller(other, out, teacher, labels)
    assert all(v.item() > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(x.grad.abs().sum() > 0 for levels in other for x in levels)
    assert all(p.grad is None for p in teacher.model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,teacher_config,expect",
    [
        (CROSSKD, RETINA_TEACHER, {"loss_kd_crosskd_cls", "loss_kd_crosskd_box"}),
        (BOX_RETINA, RETINA_TEACHER, {"loss_kd_box"}),
        (BOX_RCNN, RCNN_TEACHER, {"loss_kd_box"}),
    ],
)
def test_configs_train_two_iterations(
    config, teacher_config, expect, tiny_data_root, tmp_path, retina_teacher, rcnn_teacher
):
    weights = retina_teacher if teacher_config == RETINA_TEACHER else rcnn_teacher
    cfg = distill_cfg(
        config, teacher_config, weights, tmp_path, ["SOLVER.MAX_ITER", 2, "DATASETS.TEST", ()]
    )
    trainer = KDTrainer(cfg)
    teacher = trainer.model.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.resume_or_load(resume=False)
    trainer.train()
    history = trainer.storage.histories()
    kd = {k for k in history if k.startswith("loss_kd")}
    assert kd == expect
    for k in kd:
        values = [v for v, _ in history[k].values()]
        assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    if config == CROSSKD:
        # the student's 64-wide towers reach the teacher's 128-wide ones through a connector,
        # which is trained and exported with the kd_ prefix
        keys = [k for k in trainer.model.state_dict() if k.startswith("kd_crosskd.connector")]
        assert sorted(keys) == [
            "kd_crosskd.connector.{}.{}".format(b, p)
            for b in ("box", "cls")
            for p in ("bias", "weight")
        ]


def test_errors(tiny_data_root, tmp_path, retina_teacher, rcnn_teacher):
    with pytest.raises(ValueError, match="KD.CROSSKD distil per-anchor.*DistillGeneralizedRCNN"):
        build_model(
            distill_cfg(
                BOX_RCNN, RCNN_TEACHER, rcnn_teacher, tmp_path, ["KD.CROSSKD.ENABLED", True]
            )
        )
    with pytest.raises(ValueError, match="KD.BOX.*Faster R-CNN teacher"):
        build_model(distill_cfg(BOX_RCNN, RETINA_TEACHER, retina_teacher, tmp_path))
    with pytest.raises(ValueError, match="KD.BOX.*one-stage"):
        build_model(distill_cfg(BOX_RETINA, RCNN_TEACHER, rcnn_teacher, tmp_path))
    with pytest.raises(ValueError, match="HEAD_INDEX is 3"):
        build_model(
            distill_cfg(
                CROSSKD, RETINA_TEACHER, retina_teacher, tmp_path, ["KD.CROSSKD.HEAD_INDEX", 3]
            )
        )
    with pytest.raises(ValueError, match="CLASS_LOSS"):
        CrossKDClassLoss(mode="mse")
    # widths differ and no connector is allowed
    with pytest.raises(ValueError, match="student has 64 channels, teacher 128"):
        build_model(
            distill_cfg(
                CROSSKD, RETINA_TEACHER, retina_teacher, tmp_path, ["KD.CROSSKD.ADAPTER", "none"]
            )
        )
    # explicit arguments (a LazyConfig) that do not fit the heads
    cfg = distill_cfg(CROSSKD, RETINA_TEACHER, retina_teacher, tmp_path)
    kwargs = DistillRetinaNet.from_config(cfg)
    kwargs["crosskd"] = CrossKDDistiller(
        cfg, student_channels=kwargs["crosskd"].student_channels, teacher_channels=64
    )
    with pytest.raises(ValueError, match="student 64, teacher 128, but crosskd was given"):
        DistillRetinaNet(**kwargs)
    # off by weight 0, as the other methods
    cfg = distill_cfg(BOX_RCNN, RCNN_TEACHER, rcnn_teacher, tmp_path, ["KD.BOX.WEIGHT", 0.0])
    assert build_model(cfg).kd_roi_box is None


def test_run_descriptions_name_the_methods():
    for config, methods in [(CROSSKD, ("CrossKD",)), (BOX_RETINA, ("box",)), (BOX_RCNN, ("box",))]:
        cfg = merge_kd_config(get_kd_cfg(), config_path(config), [])
        assert distillation_summary(cfg).methods == methods
        cfg.merge_from_list(["KD.FEATURE.ENABLED", True, "KD.BOX.ENABLED", True])
        assert distillation_summary(cfg).methods[0] == "SSIM"
        assert "box" in distillation_summary(cfg).methods


def test_box_distillers_zero_for_identical_predictions():
    """A student predicting the teacher's deltas, with the teacher's anchors and transform:
    the same decoding of the same numbers, so GIoU's terms are exactly 0 (L1 compares the
    re-encoded teacher box, equal within rounding only: the loss tests cover it)."""
    g = torch.Generator().manual_seed(11)
    tf = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    giou = BoxDistillLoss(loss_type="giou")
    # RetinaNet: one level 2x2, 1 anchor per position, 2 classes
    t_deltas = [torch.randn(2, 4, 2, 2, generator=g) * 0.3]
    t_logits = [torch.randn(2, 2, 2, 2, generator=g)]
    xy = torch.rand(4, 2, generator=g) * 8
    anchors = [Boxes(torch.cat([xy, xy + 3], dim=1))]
    labels = torch.tensor([[1, 0, 1, -1], [0, 1, 1, 1]], dtype=torch.int8)
    matched = torch.zeros(2, 4, dtype=torch.long)
    s = [t_deltas[0].clone().requires_grad_(True)]
    loss = DenseBoxDistiller(loss=giou, weight=1.0)(
        s, t_logits, t_deltas, anchors, anchors, matched, labels, [torch.tensor([1])] * 2, tf, tf
    )["loss_kd_box"]
    assert loss.item() == 0.0
    # Faster R-CNN: the teacher's deltas for each RoI's class
    distiller, boxes, gt, _, _, t_roi, teacher, _ = _roi_case("giou")
    s_roi = t_roi.clone().requires_grad_(True)
    loss = distiller(s_roi, boxes, gt, teacher, {}, tf)["loss_kd_box"]
    assert loss.item() == 0.0
