"""kd_det's config keys, added to a Detectron2 config by :func:`add_kd_config`."""

from detectron2.config import CfgNode as CN

__all__ = ["add_kd_config", "get_kd_cfg"]


def add_kd_config(cfg: CN) -> CN:
    """
    Add the ``KD`` (model) and ``TRAINER`` (training loop) nodes, and kd_det's
    dataset/solver/evaluator keys, to ``cfg`` in place.  Safe to call twice.  Returns
    ``cfg``.  Load config files and overrides into it with
    :func:`kd_det.config.merge_kd_config`, which renames the keys of older versions.
    """
    if "KD" in cfg:
        return cfg
    # The model's distillation keys.  Each method is switched on and off by its ENABLED key;
    # kd_det/config/renames.py maps the keys of older kd_det versions to these.
    cfg.KD = CN()

    cfg.KD.TEACHER = CN()
    # The teacher's own Detectron2 config (a path: a yacs .yaml, or a LazyConfig .py such as
    # Detectron2's new_baselines) and its Detectron2 checkpoint.  Or torchvision://NAME: a
    # torchvision detector (e.g. fasterrcnn_resnet50_fpn_v2), WEIGHTS then its state dict
    # (empty: torchvision's default COCO weights, downloaded once into torch's hub cache) and
    # OPTS its builder's "key=value" arguments (docs/torchvision_teachers.md).
    cfg.KD.TEACHER.CONFIG = ""
    cfg.KD.TEACHER.WEIGHTS = ""
    # The SHA-256 of WEIGHTS (sha256sum FILE: the full digest or its first 8+ hex digits),
    # checked before the file is read; empty: not pinned.  Detectron2's model zoo publishes
    # none, so pin a downloaded file once you have it (docs/safe_loading.md).
    cfg.KD.TEACHER.WEIGHTS_SHA256 = ""
    # Overrides applied to the teacher config after CONFIG: yacs KEY, VALUE pairs for a .yaml,
    # "key=value" strings (e.g. "model.roi_heads.box_predictor.test_score_thresh=0.05") for a .py.
    cfg.KD.TEACHER.OPTS = []
    # Cheaper teacher inference: "" (fp32), "bf16" or "fp16" autocast (outputs back in
    # fp32), and channels-last weights/inputs.  See benchmarks/bench_step.py.
    cfg.KD.TEACHER.AUTOCAST = ""
    cfg.KD.TEACHER.CHANNELS_LAST = False
    # Refuse a teacher whose training set (its config's DATASETS.TRAIN) names other classes,
    # or the same ones in another order, than the student's: equal class counts alone let a
    # teacher teach class i under the wrong name.  Checked where both sets are registered.
    cfg.KD.TEACHER.CHECK_CLASSES = True
    # Run the teacher on the student's batch resized by this factor (e.g. 2.0: a teacher at
    # twice the student's resolution; its activations cost about INPUT_SCALE^2 times the
    # memory and time).  Feature levels pair by stride in the student's image (a 2x teacher's
    # p3 with the student's p2), resampled where none matches; per-anchor and RoI KD (RM, PFI,
    # soft labels, CrossKD, box KD), channel statistics and LAKD refuse a scale other than 1.
    cfg.KD.TEACHER.INPUT_SCALE = 1.0
    # Evaluate every teacher on DATASETS.TEST before the first iteration (not on --resume;
    # skipped without test sets), logged as teacher/bbox/AP.  MIN_AP > 0 implies it, and stops
    # when a teacher's box AP on a test set is lower (a teacher that loads but does not detect:
    # wrong checkpoint, input format, pixel normalisation, ...).
    cfg.KD.TEACHER.EVAL_BEFORE_TRAIN = False
    cfg.KD.TEACHER.MIN_AP = 0.0

    # Student weights initialised from the (first) teacher: state_dict key prefixes such as
    # "backbone.fpn_output", "proposal_generator", "roi_heads" (Faster R-CNN) or "head"
    # (RetinaNet), for modules the two share with equal shapes (same FPN width).  Applied
    # when the model is built; MODEL.WEIGHTS and --resume load over them.
    cfg.KD.INHERIT = CN()
    cfg.KD.INHERIT.PREFIXES = []

    # Feature imitation between student and teacher FPN outputs.
    cfg.KD.FEATURE = CN()
    # feature imitation on (the default) or off (e.g. for prediction or box distillation alone)
    cfg.KD.FEATURE.ENABLED = True
    # Class name in kd_det.losses.FEATURE_LOSS_REGISTRY: "SSIMFeatureLoss",
    # "L2FeatureLoss", "L1FeatureLoss", "AttentionTransferLoss", "CWDFeatureLoss" (channel-wise
    # distillation, KD.CWD), "MGDFeatureLoss" (masked generative distillation, KD.MGD),
    # "PKDFeatureLoss" (PKD: each channel standardised over the whole batch, then MSE / 2).
    cfg.KD.FEATURE.LOSS = "SSIMFeatureLoss"
    # weight of the feature loss (loss_kd_<short name>: ssim, l2, l1, at, cwd, mgd, pkd)
    cfg.KD.FEATURE.WEIGHT = 4.0
    # FPN levels to imitate; empty means every level both backbones output.
    cfg.KD.FEATURE.IN_FEATURES = []
    # How the per-level losses combine when LEVEL_WEIGHTS is empty: "mean" over levels, or
    # "sum" (SSIM-KD's convention: its lambda of 2 to 4 multiplies the sum over FPN levels).
    cfg.KD.FEATURE.LEVEL_REDUCTION = "mean"
    # Per-level weights (same length as the levels used); overrides LEVEL_REDUCTION.
    cfg.KD.FEATURE.LEVEL_WEIGHTS = []
    # Student-side adapter: "auto" = 1x1 conv only where channels differ,
    # "conv1x1" = always a 1x1 conv, "none" = never (channels must then match).
    cfg.KD.FEATURE.ADAPTER = "auto"
    # L2FeatureLoss / L1FeatureLoss only: compare each (image, channel) map after
    # "none", "minmax" (to [0, 1], as SSIM does) or "channel" (zero mean, unit variance per
    # image and channel; PKDFeatureLoss standardises each channel over the whole batch instead).
    cfg.KD.FEATURE.NORMALIZE = "none"

    # CWDFeatureLoss (Shu et al., ICCV 2021): per (image, channel), softmax over the H*W
    # positions of feature / TEMPERATURE; KL(teacher || student) summed over positions,
    # averaged over images and channels, times TEMPERATURE^2.  mmrazor's detection configs:
    # TEMPERATURE 1, KD.FEATURE.WEIGHT 10 on the sum over the FPN levels.
    cfg.KD.CWD = CN()
    cfg.KD.CWD.TEMPERATURE = 1.0

    # MGDFeatureLoss (Yang et al., ECCV 2022): the adapted student feature, with a random
    # MASK_RATIO of its positions (per image, all channels) zeroed, goes through a generation
    # block conv-ReLU-conv (KERNEL_SIZE; HIDDEN_CHANNELS between the convs, 0 = the teacher's
    # channels); loss = sum of squared errors to the teacher's feature / images.  The block is
    # the distiller's (kd_feature.generator, dropped at export).  Paper and mmrazor for
    # RetinaNet / Faster R-CNN: MASK_RATIO (lambda) 0.65, KD.FEATURE.WEIGHT (alpha) 2e-5 on
    # the sum over the FPN levels.
    cfg.KD.MGD = CN()
    cfg.KD.MGD.MASK_RATIO = 0.65
    cfg.KD.MGD.KERNEL_SIZE = 3
    cfg.KD.MGD.HIDDEN_CHANNELS = 0

    # SSIMFeatureLoss: SSIM over a Gaussian window of WINDOW_SIZE x WINDOW_SIZE and std SIGMA
    cfg.KD.SSIM = CN()
    cfg.KD.SSIM.WINDOW_SIZE = 11
    cfg.KD.SSIM.SIGMA = 1.5
    # SSIM's stability constants are C1 = (K1 * L)^2 and C2 = (K2 * L)^2 with L the
    # dynamic range of the values compared.
    cfg.KD.SSIM.K1 = 0.01
    cfg.KD.SSIM.K2 = 0.03
    # "minmax": rescale every (image, channel) map to [0, 1] (L = 1), as published;
    # "none": raw features, L = the teacher map's value range (max - min).
    cfg.KD.SSIM.NORMALIZE = "minmax"
    # "auto" (fused GPU kernel on CUDA when available, else PyTorch), "torch", "triton".
    cfg.KD.SSIM.IMPL = "auto"
    # exponents of SSIM's luminance, contrast and structure terms, l^a * c^b * s^g (C3 = C2 / 2):
    # [1, 1, 1] is SSIM; e.g. [0, 0, 1] imitates structure alone (the fused kernel: [1, 1, 1] only)
    cfg.KD.SSIM.EXPONENTS = [1.0, 1.0, 1.0]

    # Prediction distillation for one-stage students (DistillRetinaNet with a RetinaNet
    # teacher of the same classes and anchors per position).
    # Rank Mimicking: KL between teacher and student softmax(score / T) over each
    # object's positive anchors (student's anchor matcher), averaged over objects.
    cfg.KD.RM = CN()
    cfg.KD.RM.ENABLED = False
    cfg.KD.RM.WEIGHT = 4.0
    cfg.KD.RM.TEMPERATURE = 1.0
    # Prediction-guided Feature Imitation: the KD.FEATURE loss (L2 as in the paper,
    # or SSIM) weighted per position by the teacher-student class-logit difference.
    cfg.KD.PFI = CN()
    cfg.KD.PFI.ENABLED = False
    # Soft-label classification KD on every non-ignored anchor (the RM baseline).
    cfg.KD.SOFT_LABEL = CN()
    cfg.KD.SOFT_LABEL.ENABLED = False
    cfg.KD.SOFT_LABEL.WEIGHT = 1.0
    cfg.KD.SOFT_LABEL.TEMPERATURE = 1.0
    # "kl" (binary KL per class) or "bce" (cross-entropy with the teacher's scores)
    cfg.KD.SOFT_LABEL.MODE = "kl"

    # CrossKD (Wang et al., CVPR 2024; RetinaNet student and teacher): the student's class and
    # box head towers, cut after HEAD_INDEX convs (before that conv's ReLU; 0: the FPN
    # features), go through the rest of the teacher's frozen head; these cross-head predictions
    # mimic the teacher's own on every anchor the student's matcher does not ignore, summed and
    # divided by the positive anchors: loss_kd_crosskd_cls (CLASS_LOSS on sigmoid scores) and
    # loss_kd_crosskd_box (BOX_LOSS, each anchor weighted by the teacher's top class score).
    cfg.KD.CROSSKD = CN()
    cfg.KD.CROSSKD.ENABLED = False
    # the paper's i: 3 of RetinaNet's 4 head convs (at most MODEL.RETINANET.NUM_CONVS)
    cfg.KD.CROSSKD.HEAD_INDEX = 3
    # "qfl" (the paper's quality-focal KD loss, BCE * |p_s - p_t| ** BETA) or "kl" (binary KL)
    cfg.KD.CROSSKD.CLASS_LOSS = "qfl"
    cfg.KD.CROSSKD.BETA = 1.0
    # weight of loss_kd_crosskd_cls
    cfg.KD.CROSSKD.CLASS_WEIGHT = 1.0
    # "giou" (the paper's, on boxes decoded against the teacher's anchors) or "l1" (deltas)
    cfg.KD.CROSSKD.BOX_LOSS = "giou"
    # weight of loss_kd_crosskd_box
    cfg.KD.CROSSKD.BOX_WEIGHT = 1.0
    # give the student's tower features the teacher's per-channel mean and std before the
    # teacher's layers (as the reference code does)
    cfg.KD.CROSSKD.ALIGN_SCALE = True
    # a 1x1 conv from the student's tower width to the teacher's: "auto" (where they differ),
    # "conv1x1" (always) or "none" (widths must match)
    cfg.KD.CROSSKD.ADAPTER = "auto"

    # Box distillation (RetinaNet and Faster R-CNN students, teacher of the same kind): the
    # teacher's decoded boxes are regression targets on the student's positive anchors (its own
    # matching) or foreground sampled RoIs (the teacher's box head on the student's RoIs), each
    # weighted by the teacher's probability of the ground-truth class: loss_kd_box, divided
    # as the detector's own box loss (positive anchors; sampled RoIs).
    cfg.KD.BOX = CN()
    cfg.KD.BOX.ENABLED = False
    cfg.KD.BOX.WEIGHT = 1.0
    # "l1" (on deltas in the student's encoding, as Detectron2's box losses) or "giou" (boxes)
    cfg.KD.BOX.LOSS = "l1"

    # Channel-statistics transfer (Yang et al. 2020), on the teacher's dense-head levels
    # (RetinaNet head / RPN): loss_kd_stats pulls the student's per-channel mean and std to
    # the teacher's; loss_kd_adain transplants them into the teacher's features by AdaIN
    # and compares the teacher head's outputs there with its outputs on its own features.
    cfg.KD.CHANNEL_STATS = CN()
    cfg.KD.CHANNEL_STATS.ENABLED = False
    cfg.KD.CHANNEL_STATS.WEIGHT = 1.0
    cfg.KD.CHANNEL_STATS.ADAIN_WEIGHT = 1.0

    # LAKD, Local Attention Knowledge Distillation (Zhang et al. 2024, a classification paper;
    # adapted to detection, docs/methods.md "LAKD"): each ResNet stage of the student backbone
    # (its FPN's bottom_up) is a local module that imitates the teacher's stage of the same name
    # through a
    # non-directional activation map (channel mean of |x|^P, average-pooled to MAP_SIZE x
    # MAP_SIZE, L2-normalised: no adapter across widths).  A stage's loss is computed on a second
    # run of that stage on its detached input, so it updates that stage only; the detection
    # loss still trains the whole backbone.  One teacher only; combines with the other KD keys.
    cfg.KD.LAKD = CN()
    cfg.KD.LAKD.ENABLED = False
    # the local modules, shallow to deep; each must train (not frozen by MODEL.BACKBONE.FREEZE_AT)
    cfg.KD.LAKD.STAGES = ["res2", "res3", "res4", "res5"]
    # from simple to complex: STAGES[k] is distilled from iteration START_ITERS[k] on (one per
    # stage, shallow ones first); empty: every stage from iteration 0
    cfg.KD.LAKD.START_ITERS = []
    # multiplies each stage's loss (in [0, 2]); the stages' terms add up (loss_kd_lakd)
    cfg.KD.LAKD.WEIGHT = 1.0
    # exponent of |x| in the activation map (>= 1; 2 is attention transfer's)
    cfg.KD.LAKD.P = 2.0
    # side of the coarse map each stage's map is pooled to; 0: the stage's own resolution
    cfg.KD.LAKD.MAP_SIZE = 8

    # Several teachers for feature imitation (KD.FEATURE): each its own config and
    # checkpoint (KD.TEACHER.CONFIG then stays empty; KD.TEACHER's other keys apply to all),
    # each with its own adapters.  Per-image losses are combined with FIXED_WEIGHTS, or,
    # when that is empty, with weights from a learned gate (adaptive multi-teacher KD):
    # softmax over teachers of <embed(pooled student features), teacher latent>.
    cfg.KD.MULTI_TEACHER = CN()
    cfg.KD.MULTI_TEACHER.CONFIGS = []
    cfg.KD.MULTI_TEACHER.WEIGHTS = []
    # One SHA-256 per WEIGHTS entry ("" leaves one unpinned), or empty: none pinned.
    cfg.KD.MULTI_TEACHER.WEIGHTS_SHA256 = []
    # fixed per-teacher weights of the feature losses (one per teacher); empty: the learned gate
    cfg.KD.MULTI_TEACHER.FIXED_WEIGHTS = []
    # width of the gate's embedding of the pooled student features and of the teacher latents
    cfg.KD.MULTI_TEACHER.GATE_DIM = 64

    # Teacher-free self-distillation (FRSKD; MODEL.META_ARCHITECTURE "SelfDistillRetinaNet"
    # or "SelfDistillGeneralizedRCNN"): a BiFPN-style self-teacher refines the student's
    # pyramid; the student imitates the refined maps with KD.FEATURE (AttentionTransferLoss
    # as in the paper, or SSIMFeatureLoss); the self-teacher has its own detection head.
    cfg.KD.SELF = CN()
    # pyramid levels the self-teacher refines, fine to coarse; empty = the heads' levels
    cfg.KD.SELF.IN_FEATURES = []
    # refined maps have WIDTH_MULTIPLIER x (student FPN channels) channels (FRSKD's w)
    cfg.KD.SELF.WIDTH_MULTIPLIER = 1.0
    # GroupNorm: batch-size independent (BatchNorm fails on 1x1 maps of P7 with one image per GPU)
    cfg.KD.SELF.NORM = "GN"
    # weight of the self-teacher head's ground-truth losses (loss_self_*)
    cfg.KD.SELF.HEAD_WEIGHT = 1.0
    # True: the self-teacher's losses do not reach the student's backbone
    cfg.KD.SELF.DETACH_INPUT = False
    # RetinaNet only: student class scores -> self-teacher head's scores (binary KL)
    cfg.KD.SELF.SOFT_LABEL = CN()
    cfg.KD.SELF.SOFT_LABEL.ENABLED = True
    cfg.KD.SELF.SOFT_LABEL.WEIGHT = 1.0
    cfg.KD.SELF.SOFT_LABEL.TEMPERATURE = 1.0

    # The distillation health monitor (kd_det/engine/health.py, docs/dry_run_and_health.md):
    # every PERIOD iterations (from 0) each loss_kd_* term's gradient norm on the student's
    # parameters is divided by the detection loss's and logged (kd_grad_ratio/<term>); a
    # term that is 0, non-finite, above DOMINATING or below VANISHING times the detection
    # gradient is warned about.  Cost: one extra backward per distillation term and one for the
    # detection loss at each measured iteration (no extra forward).
    cfg.KD.MONITOR = CN()
    cfg.KD.MONITOR.ENABLED = True
    cfg.KD.MONITOR.PERIOD = 20
    # ratio thresholds; 0 disables either
    cfg.KD.MONITOR.DOMINATING = 10.0
    cfg.KD.MONITOR.VANISHING = 1e-3
    # warn when the student's box AP at an evaluation is below AP_DROP x its previous one; 0: never
    cfg.KD.MONITOR.AP_DROP = 0.5

    # Automatic distillation weights (kd_det/engine/auto_weight.py): over the first ITERS
    # iterations of each loss_kd_* term (and of each LAKD stage's start, KD.LAKD.START_ITERS),
    # the term is multiplied by a factor that makes its gradient norm on the student FRACTION
    # times the detection loss's (measured as the monitor measures, averaged over processes and
    # iterations).  The KD.*.WEIGHT keys still apply before it; the factors are logged
    # (kd_auto_weight/<term>) and saved in checkpoints, so --resume keeps them.
    cfg.KD.AUTO_WEIGHT = CN()
    cfg.KD.AUTO_WEIGHT.ENABLED = False
    cfg.KD.AUTO_WEIGHT.FRACTION = 0.5
    cfg.KD.AUTO_WEIGHT.ITERS = 20

    # The training loop, beside SOLVER and DATALOADER (tools/train_net.py).
    cfg.TRAINER = CN()
    # Name in kd_det.engine.TRAINER_REGISTRY.
    cfg.TRAINER.NAME = "KDTrainer"
    # Instance-level curriculum: a student snapshot's per-image scores
    # (tools/score_images.py) order the training images from easy to hard.  Phase p ends at
    # iteration PHASE_ITERS[p] and draws from the easiest PHASE_FRACTIONS[p] of the images;
    # after the last phase every image is drawn uniformly.
    cfg.TRAINER.CURRICULUM = CN()
    cfg.TRAINER.CURRICULUM.ENABLED = False
    cfg.TRAINER.CURRICULUM.SCORES = ""
    cfg.TRAINER.CURRICULUM.PHASE_ITERS = []
    cfg.TRAINER.CURRICULUM.PHASE_FRACTIONS = []

    # Checks of COCO- and VOC-format datasets by tools/train_net.py before training: "full"
    # (annotations, and every image decoded completely and its size compared with the
    # annotation's: in parallel on all cores, results cached by path, size and mtime in
    # $KD_DET_CACHE, default ~/.cache/kd_det), "annotations", or "none".
    cfg.DATASETS.VALIDATE = "full"
    # COCO-format datasets registered by the tools before anything is built, in every worker
    # process (kd_det.data.coco_format), so that DATASETS.TRAIN/TEST can name them without
    # Python: "NAME=JSON:IMAGE_DIR" strings, e.g. ["my_train=data/train.json:data/images"]
    # (paths from the current directory; classes from the json's categories, ordered by id).
    # The tools' repeatable --dataset NAME=JSON:IMAGE_DIR appends to it.
    cfg.DATASETS.COCO_FORMAT = []
    # An image that fails to load or map during training: False stops training with an error
    # naming the file and dataset; True skips it (another image is drawn) with a warning and
    # counts the skips as data/skipped_items in metrics.json. False by default: VALIDATE full
    # finds bad files before training, and a silently smaller training set changes results;
    # True is for data that may go bad during a run (network storage, images still arriving).
    cfg.DATALOADER.SKIP_BAD_IMAGES = False

    # The SHA-256 of MODEL.WEIGHTS, checked before it is read (as KD.TEACHER.WEIGHTS_SHA256);
    # not of the checkpoints --resume continues from.  Released configs drop it.
    cfg.MODEL.WEIGHTS_SHA256 = ""

    # KDTrainer's optimizer: "SGD" (Detectron2's) or "AdamW".
    cfg.SOLVER.OPTIMIZER = "SGD"
    # Gradient accumulation: each iteration (optimizer step) runs GRAD_ACCUM_STEPS micro-batches
    # of IMS_PER_BATCH / GRAD_ACCUM_STEPS images, so IMS_PER_BATCH, BASE_LR and the schedule of a
    # config keep their meaning on fewer or smaller GPUs (with SOLVER.REFERENCE_WORLD_SIZE unset).
    cfg.SOLVER.GRAD_ACCUM_STEPS = 1
    # Periodic checkpoints (model_<iter>.pth) kept in OUTPUT_DIR: the newest CHECKPOINT_KEEP,
    # counting those of earlier runs of a resumed training; 0 keeps all. The file
    # last_checkpoint names and model_final.pth are never deleted.
    cfg.SOLVER.CHECKPOINT_KEEP = 0

    # Evaluator name in kd_det.evaluation.EVALUATOR_REGISTRY; "" picks it from the
    # dataset's ``evaluator_type`` metadata ("coco" or "pascal_voc").
    cfg.TEST.EVALUATOR = ""

    return cfg


def get_kd_cfg() -> CN:
    """A Detectron2 default config with kd_det's keys added."""
    from detectron2.config import get_cfg

    return add_kd_config(get_cfg())
