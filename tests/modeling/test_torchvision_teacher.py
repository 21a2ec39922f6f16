"""
torchvision detectors as teachers (``KD.TEACHER.CONFIG torchvision://NAME``) and teachers at
another input scale (``KD.TEACHER.INPUT_SCALE``).  Offline: the torchvision models are built
with random weights (kd_det's ResNet-18 FPN variants) and saved locally.
"""

import math

import pytest
import torch
from conftest import config_path, one_step, tiny_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList
from tolerances import assert_within, gamma

from kd_det.data import CLASS_NAMES
from kd_det.modeling.distillers import level_pairs
from kd_det.modeling.teacher import build_teacher
from kd_det.modeling.teacher.torchvision_models import build_torchvision_detector
from kd_det.modeling.teacher.torchvision_teacher import map_classes

SYNTHETIC_CATEGORIES = ["__background__"] + list(CLASS_NAMES)
RCNN = "synthetic/faster_rcnn_R_18_FPN.yaml"
RETINA = "synthetic/retinanet_R_18_FPN.yaml"
#: narrow teacher FPNs keep the tests fast (the builder argument, as KD.TEACHER.OPTS gives it)
NARROW = ("fpn_channels=32",)


def _coco_categories():
    from torchvision.models import get_model_weights

    return get_model_weights("retinanet_resnet50_fpn_v2").DEFAULT.meta["categories"]


@pytest.fixture(scope="module")
def tv_weights(tmp_path_factory):
    """name -> a local weights file of kd_det's torchvision detector (random weights)."""
    d = tmp_path_factory.mktemp("tv_teachers")
    out = {}
    for name in ("fasterrcnn_resnet18_fpn", "retinanet_resnet18_fpn", "fcos_resnet18_fpn"):
        torch.manual_seed(0)
        model = build_torchvision_detector(name, len(SYNTHETIC_CATEGORIES), fpn_channels=32)
        out[name] = str(d / (name + ".pth"))
        torch.save({"model": model.state_dict(), "categories": SYNTHETIC_CATEGORIES}, out[name])
    return out


def _distill_cfg(student, teacher, weights, out, opts=()):
    meta = "DistillGeneralizedRCNN" if "rcnn" in student else "DistillRetinaNet"
    return tiny_cfg(
        student,
        out,
        [
            "MODEL.META_ARCHITECTURE",
            meta,
            "KD.TEACHER.CONFIG",
            "torchvision://" + teacher,
            "KD.TEACHER.WEIGHTS",
            weights,
            "KD.FEATURE.LOSS",
            "L2FeatureLoss",
            "KD.TEACHER.OPTS",
            list(NARROW),
        ]
        + list(opts),
    )


def _batch(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
        for h, w in sizes
    ]


def test_features_equal_torchvision_backbone(tv_weights):
    """kd_det's teacher features are torchvision's backbone outputs on the same preprocessed
    image (BGR uint8 -> RGB [0, 1], torchvision's own normalize, padded), renamed by stride."""
    teacher = build_teacher(
        config="torchvision://fasterrcnn_resnet18_fpn",
        weights=tv_weights["fasterrcnn_resnet18_fpn"],
        opts=NARROW,
    )
    batch = _batch([(64, 80), (56, 64)])
    like = ImageList.from_tensors([x["image"].float() for x in batch], 32)  # student: 64x96
    images = teacher.preprocess_image(batch, like, "BGR")
    got = teacher.backbone_features(images)
    assert images.tensor.shape == like.tensor.shape
    assert {k: v.stride for k, v in teacher.output_shape().items()} == {
        "p2": 4,
        "p3": 8,
        "p4": 16,
        "p5": 32,
        "p6": 64,
    }

    # reference in float64: torchvision's GeneralizedRCNNTransform.normalize, zero padding
    model = build_torchvision_detector(
        "fasterrcnn_resnet18_fpn", len(SYNTHETIC_CATEGORIES), fpn_channels=32
    )
    model.load_state_dict(teacher.model.state_dict())
    model = model.double().eval()
    ref_in = torch.zeros(2, 3, *like.tensor.shape[-2:], dtype=torch.float64)
    for i, x in enumerate(batch):
        rgb = x["image"].flip(0).double() / 255
        ref_in[i, :, : rgb.shape[1], : rgb.shape[2]] = model.transform.normalize(rgb)
    with torch.no_grad():
        ref = model.backbone(ref_in)
    # first-order bound: every conv of the backbone is a dot product of its fan-in; the longest
    # chain of them adds at most the sum of all fan-ins of roundings (Higham's gamma), relative
    # to the terms' size, which for random weights of random sign is up to sqrt(fan-in) times
    # the result's (the largest fan-in taken)
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    fan_ins = [m.weight[0].numel() for m in convs]
    rel = gamma(sum(fan_ins) + 8) * math.sqrt(max(fan_ins))
    names = {"0": "p2", "1": "p3", "2": "p4", "3": "p5", "pool": "p6"}
    for key, name in names.items():
        assert got[name].dtype == torch.float32
        scale = ref[key].abs().max()
        assert_within(got[name], ref[key], rel * scale, "teacher level " + name)


def test_map_classes_by_name():
    coco = _coco_categories()
    assert map_classes(coco, ["dog", "person", "car"]) == [
        coco.index("dog"),
        coco.index("person"),
        coco.index("car"),
    ]
    with pytest.raises(ValueError, match=r"no class named \['unicorn'\]"):
        map_classes(coco, ["person", "unicorn"])
    with pytest.raises(ValueError, match=r"no class named \['N/A'\]"):
        map_classes(coco, ["N/A"])  # torchvision's placeholders name no class


def test_class_and_anchor_mapping_on_hand_picked_anchors(tmp_path, tiny_data_root):
    """A torchvision RetinaNet with COCO's 91 labels teaching a 3-class student: the logits kd_det
    gives at hand-picked (level, position, anchor, class) are torchvision's own head outputs
    at the teacher's anchor of that shape and the COCO label of that name."""
    coco = _coco_categories()
    torch.manual_seed(1)
    tv = build_torchvision_detector("retinanet_resnet18_fpn", len(coco), fpn_channels=32)
    path = str(tmp_path / "coco_retina.pth")
    torch.save(tv.state_dict(), path)  # a plain state dict: categories from torchvision's meta
    with pytest.raises(ValueError, match="hold no 'categories'"):
        build_teacher(config="torchvision://retinanet_resnet18_fpn", weights=path, opts=NARROW)
    torch.save({"model": tv.state_dict(), "categories": coco}, path)
    classes = ["dog", "person", "car"]
    teacher = build_teacher(
        config="torchvision://retinanet_resnet18_fpn",
        weights=path,
        opts=NARROW,
        expected_classes=classes,
    )
    student = build_model(tiny_cfg(RETINA, tmp_path, ["MODEL.RETINANET.NUM_CLASSES", 3]))
    teacher.map_dense_student(student)
    # Detectron2 orders a position's anchors size-major (size s, ratio r) -> 3 s + r, torchvision
    # ratio-major -> 3 r + s: the student's anchor 1 (smallest size, ratio 1) is teacher anchor 3
    assert teacher._dense["orders"][0] == [0, 3, 6, 1, 4, 7, 2, 5, 8]

    images = ImageList.from_tensors([torch.randn(3, 64, 64)], 32)
    features = teacher.backbone_features(images)
    logits, deltas = teacher.dense_head_predictions(features)
    levels = ["p3", "p4", "p5", "p6", "p7"]
    with torch.no_grad():
        raw = teacher.model.head([features[p] for p in levels])
    sizes = [f.shape[-2:] for f in (features[p] for p in levels)]
    offsets = [0]
    for h, w in sizes:
        offsets.append(offsets[-1] + h * w * 9)
    for level, y, x, a, k in [(0, 3, 5, 1, 0), (0, 0, 0, 8, 2), (1, 2, 1, 4, 1), (2, 1, 0, 6, 0)]:
        t_anchor = [0, 3, 6, 1, 4, 7, 2, 5, 8][a]
        row = offsets[level] + (y * sizes[level][1] + x) * 9 + t_anchor
        label = coco.index(classes[k])
        # the same head on the same features, read at another index: exact
        assert torch.equal(logits[level][0, a * 3 + k, y, x], raw["cls_logits"][0, row, label])
        assert torch.equal(
            deltas[level][0, a * 4 : a * 4 + 4, y, x], raw["bbox_regression"][0, row]
        )
    assert logits[0].shape == (1, 9 * 3, *sizes[0])

    other = build_model(
        tiny_cfg(
            RETINA,
            tmp_path,
            ["MODEL.RETINANET.NUM_CLASSES", 3, "MODEL.ANCHOR_GENERATOR.SIZES", [[12, 16, 20]] * 5],
        )
    )
    with pytest.raises(ValueError, match="anchors per position differ"):
        teacher.map_dense_student(other)


def test_roi_class_mapping_on_hand_picked_boxes(tmp_path):
    """A torchvision Faster R-CNN with COCO's labels on given RoIs: kd_det's (R, K + 1) logits
    are torchvision's box head outputs at the labels of the student's class names, background
    last; the deltas those labels' four."""
    from torchvision.models.detection import FasterRCNN

    coco = _coco_categories()
    torch.manual_seed(2)
    tv = build_torchvision_detector("fasterrcnn_resnet18_fpn", len(coco), fpn_channels=32)
    path = str(tmp_path / "coco_frcnn.pth")
    torch.save({"model": tv.state_dict(), "categories": coco}, path)
    classes = ["dog", "person", "car"]
    teacher = build_teacher(
        config="torchvision://fasterrcnn_resnet18_fpn",
        weights=path,
        opts=NARROW,
        expected_classes=classes,
    )
    assert isinstance(teacher.model, FasterRCNN)
    images = ImageList.from_tensors([torch.randn(3, 64, 96), torch.randn(3, 64, 96)], 32)
    features = teacher.backbone_features(images)
    boxes = [
        Boxes(torch.tensor([[2.0, 3.0, 40.0, 30.0], [10.0, 10.0, 90.0, 60.0]])),
        Boxes(torch.tensor([[0.0, 0.0, 16.0, 16.0]])),
    ]
    logits, deltas = teacher.roi_predictions(features, boxes)
    assert logits.shape == (3, 4) and deltas.shape == (3, 12)
    heads = teacher.model.roi_heads
    tv_features = {k: features[p] for k, (p, _) in teacher._levels.items()}
    with torch.no_grad():
        pooled = heads.box_roi_pool(tv_features, [b.tensor for b in boxes], [(64, 96)] * 2)
        raw_logits, raw_deltas = heads.box_predictor(heads.box_head(pooled))
    for k, name in enumerate(classes):
        label = coco.index(name)
        # the same head on the same RoIs, read at another index: exact
        assert torch.equal(logits[:, k], raw_logits[:, label])
        assert torch.equal(deltas[:, 4 * k : 4 * k + 4], raw_deltas[:, 4 * label : 4 * label + 4])
    assert torch.equal(logits[:, 3], raw_logits[:, 0])  # torchvision's background, last


def _assert_student_only_gradients(model):
    teacher_params = list(model.teacher.model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher_params)
    assert not any(p is q for p in model.parameters() for q in teacher_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize(
    "student,teacher,opts,expected",
    [
        (
            RCNN,
            "fasterrcnn_resnet18_fpn",
            ["KD.SOFT_LABEL.ENABLED", True, "KD.BOX.ENABLED", True],
            ["loss_kd_l2", "loss_kd_soft", "loss_kd_box"],
        ),
        (
            RETINA,
            "retinanet_resnet18_fpn",
            ["KD.PFI.ENABLED", True, "KD.RM.ENABLED", True]
            + ["KD.SOFT_LABEL.ENABLED", True, "KD.BOX.ENABLED", True],
            ["loss_kd_l2", "loss_kd_rm", "loss_kd_soft", "loss_kd_box"],
        ),
        (RETINA, "fcos_resnet18_fpn", ["KD.FEATURE.LOSS", "SSIMFeatureLoss"], ["loss_kd_ssim"]),
    ],
)
def test_training_step(tmp_path, tiny_data_root, tv_weights, student, teacher, opts, expected):
    """One step per torchvision teacher kind with each KD method that applies: finite losses,
    gradients on the student only."""
    cfg = _distill_cfg(student, teacher, tv_weights[teacher], tmp_path, opts)
    model = build_model(cfg)
    assert model.kd_feature.teacher_levels == {k: k for k in model.kd_feature.levels}
    losses, _ = one_step(model, cfg)
    for name in expected:
        assert name in losses and torch.isfinite(losses[name]), (name, losses)
    _assert_student_only_gradients(model)


def test_2x_teacher_pairs_levels_by_stride(tmp_path, tiny_data_root, tv_weights):
    """A teacher at twice the student's resolution: its p3 pairs with the student's p2, ...;
    the student's p6 has no partner (skipped); naming it in IN_FEATURES is an error."""
    name = "fasterrcnn_resnet18_fpn"
    opts = ["KD.TEACHER.INPUT_SCALE", 2.0]
    cfg = _distill_cfg(RCNN, name, tv_weights[name], tmp_path, opts)
    model = build_model(cfg)
    assert model.kd_feature.teacher_levels == {"p2": "p3", "p3": "p4", "p4": "p5", "p5": "p6"}
    batch = _batch([(64, 64), (64, 48)])
    like = ImageList.from_tensors([x["image"].float() for x in batch], 32)
    images = model.teacher_images(batch, like)
    assert images.tensor.shape[-2:] == (128, 128) and images.image_sizes == [(128, 128), (128, 96)]
    losses, _ = one_step(model, cfg)
    assert torch.isfinite(losses["loss_kd_l2"])
    _assert_student_only_gradients(model)

    cfg = _distill_cfg(RCNN, name, tv_weights[name], tmp_path, opts)
    cfg.KD.FEATURE.IN_FEATURES = ["p5", "p6"]
    with pytest.raises(ValueError, match="'p6' \\(stride 64\\) has no teacher level"):
        build_model(cfg)


def test_level_pairs_resample_where_no_stride_matches():
    student = {"p{}".format(k): ShapeSpec(channels=8, stride=2**k) for k in range(2, 7)}
    teacher = {"p{}".format(k): ShapeSpec(channels=16, stride=2**k) for k in range(3, 8)}
    assert level_pairs(student, teacher) == {f: f for f in ["p3", "p4", "p5", "p6"]}
    # 1.5x: stride 8 / 1.5 = 5.3 is nearest to the student's 4 (p2) ... resampled
    pairs = level_pairs(student, teacher, teacher_scale=1.5)
    assert pairs == {"p2": "p3", "p3": "p4", "p4": "p5", "p5": "p6", "p6": "p7"}

    # the distiller resamples the teacher's maps to the student's size (bilinear)
    from kd_det.losses import L2FeatureLoss
    from kd_det.modeling.distillers import FeatureDistiller

    distiller = FeatureDistiller(
        levels=list(pairs),
        student_channels=8,
        teacher_channels=16,
        loss=L2FeatureLoss(),
        weight=1.0,
        teacher_levels=pairs,
        teacher_scale=1.5,
    )
    distiller.check_shapes(student, teacher)
    g = torch.Generator().manual_seed(0)
    # a 64 px student image (p2..p6: 16 ... 1) and its 96 px teacher view (p3..p7: 12 ... 1)
    s_maps = {f"p{k}": torch.randn(1, 8, *[-(-64 // 2**k)] * 2, generator=g) for k in range(2, 7)}
    t_maps = {f"p{k}": torch.randn(1, 16, *[-(-96 // 2**k)] * 2, generator=g) for k in range(3, 8)}
    maps = distiller.teacher_maps(t_maps, list(s_maps.values()))
    for (name, s_map), t_map in zip(s_maps.items(), maps):
        expected = torch.nn.functional.interpolate(
            t_maps[pairs[name]], size=s_map.shape[-2:], mode="bilinear", align_corners=False
        )
        assert torch.equal(t_map, expected)
    assert torch.isfinite(distiller(s_maps, t_maps)["loss_kd_l2"])


def test_detectron2_teacher_at_2x(tmp_path, tiny_data_root, rcnn_teacher):
    """KD.TEACHER.INPUT_SCALE applies to Detectron2 teachers too: levels pair by stride."""
    cfg = tiny_cfg(
        "synthetic/distill/l2_faster_rcnn_R50_to_R18.yaml",
        tmp_path,
        [
            "KD.TEACHER.CONFIG",
            config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
            "KD.TEACHER.WEIGHTS",
            rcnn_teacher,
            "KD.TEACHER.INPUT_SCALE",
            2.0,
        ],
    )
    model = build_model(cfg)
    assert model.kd_feature.teacher_levels == {"p2": "p3", "p3": "p4", "p4": "p5", "p5": "p6"}
    losses, _ = one_step(model, cfg)
    assert torch.isfinite(losses["loss_kd_l2"])


@pytest.mark.parametrize(
    "student,teacher,opts,message",
    [
        (
            RETINA,
            "fcos_resnet18_fpn",
            ["KD.RM.ENABLED", True],
            "FCOS is anchor-free",
        ),
        (
            RCNN,
            "retinanet_resnet18_fpn",
            ["KD.SOFT_LABEL.ENABLED", True],
            "has none; use a torchvision Faster R-CNN teacher",
        ),
        (
            RETINA,
            "retinanet_resnet18_fpn",
            ["KD.RM.ENABLED", True, "KD.TEACHER.INPUT_SCALE", 2.0],
            "KD.TEACHER.INPUT_SCALE is 2: set it to 1.0",
        ),
        (
            RETINA,
            "retinanet_resnet18_fpn",
            ["KD.CROSSKD.ENABLED", True],
            "needs a Detectron2 RetinaNet teacher",
        ),
    ],
)
def test_refusals(tmp_path, tiny_data_root, tv_weights, student, teacher, opts, message):
    cfg = _distill_cfg(student, teacher, tv_weights[teacher], tmp_path, opts)
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_bad_teacher_names_and_opts(tv_weights):
    with pytest.raises(ValueError, match="no such torchvision detector"):
        build_teacher(
            config="torchvision://fasterrcnn_resnet7", weights=tv_weights["fcos_resnet18_fpn"]
        )
    with pytest.raises(ValueError, match="must be key=value"):
        build_teacher(
            config="torchvision://fcos_resnet18_fpn",
            weights=tv_weights["fcos_resnet18_fpn"],
            opts=["min_size"],
        )
    with pytest.raises(ValueError, match="do not fit the torchvision model"):
        build_teacher(
            config="torchvision://fcos_resnet18_fpn",
            weights=tv_weights["retinanet_resnet18_fpn"],
            opts=NARROW,
        )
    with pytest.raises(ValueError, match="no teacher kind foo://"):
        build_teacher(config="foo://x", weights="")


def test_teacher_evaluation_in_the_students_classes(tmp_path, tiny_data_root, tv_weights):
    """KD.TEACHER.EVAL_BEFORE_TRAIN runs torchvision's own inference, labels mapped by name."""
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import COCOEvaluator

    from kd_det.engine.hooks import evaluate_teacher_on

    name = "retinanet_resnet18_fpn"
    # the student's classes in another order than the teacher's labels
    classes = list(reversed(CLASS_NAMES))
    teacher = build_teacher(
        config="torchvision://" + name,
        weights=tv_weights[name],
        opts=NARROW + ("min_size=64", "max_size=64"),
        expected_classes=classes,
    )
    lut = teacher.inference_model.label_to_class
    assert lut.tolist() == [-1, 4, 3, 2, 1, 0]
    val = "kd_test_tiny_val"
    assert MetadataCatalog.get(val).thing_classes == list(CLASS_NAMES)
    results = evaluate_teacher_on(
        teacher,
        [val],
        lambda n, out: COCOEvaluator(n, output_dir=out, use_fast_impl=False),
        str(tmp_path),
    )
    assert "AP" in results[val]["bbox"]
