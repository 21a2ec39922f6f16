"""
``--dry-run`` of tools/train_net.py and tools/lazyconfig_train_net.py: every check a training
run would fail on, and what one step costs, in a minute, without training.

In order: the datasets (before anything is downloaded; the tool's own preparation and
validation), each teacher (its config resolved, its weights read and matched key by key: the
share of its parameters they fill, missing and unexpected keys), the class lists of student
and teachers, then the whole model, its initial weights and one real batch: one forward and
backward with each loss term, each distillation term's gradient-norm ratio to the detection
loss (:func:`~kd_det.engine.grad_ratio.measure_grad_ratios`, the health monitor's measure),
the step's peak memory, and the time per iteration and for the schedule, from a few timed
steps after a warm-up step.  Nothing is written: no checkpoint, metrics or config file; the
optimizer steps only the in-memory copy of the model.  Exits 1 with a summary of the problems,
0 without.
"""

import logging
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from ..checkpoint import (
    SafeDetectionCheckpointer,
    check_sha256,
    incompatible_keys_problems,
    resolve_weights,
)
from ..config.detector import (
    build_detector,
    describe_config,
    detector_settings,
    load_detector_config,
)
from ..data.classes import check_same_classes, registered_thing_classes
from .grad_ratio import measure_grad_ratios, student_parameters
from .health import health_problems

__all__ = [
    "DryRunReport",
    "TeacherSpec",
    "add_dry_run_argument",
    "check_teacher",
    "measure_training_step",
    "dry_run",
    "dry_run_lazy",
]

logger = logging.getLogger(__name__)


def add_dry_run_argument(parser) -> None:
    """Add ``--dry-run`` (and ``--dry-run-steps``) to a tool's argument parser."""
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check datasets, teachers and classes, run one real batch forward and backward "
        "and print the loss terms, distillation gradient ratios, peak memory and time "
        "estimates; write nothing; exit 1 on any problem",
    )
    parser.add_argument(
        "--dry-run-steps",
        type=int,
        default=3,
        help="steps timed after the warm-up step by --dry-run (default 3)",
    )


@dataclass
class DryRunReport:
    """What the dry run found: problems (exit 1), warnings, and the lines it printed."""

    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    out: Callable[[str], None] = print

    def section(self, title: str) -> None:
        self.out("\n== {}".format(title))

    def line(self, text: str) -> None:
        self.out("  " + text)

    def problem(self, where: str, text: str) -> None:
        self.problems.append("{}: {}".format(where, text))
        self.out("  PROBLEM ({}): {}".format(where, text))

    def warning(self, where: str, text: str) -> None:
        self.warnings.append("{}: {}".format(where, text))
        self.out("  warning ({}): {}".format(where, text))

    def summary(self) -> int:
        """Print the summary; the exit code (1 on any problem)."""
        self.section("dry run summary")
        for w in self.warnings:
            self.line("warning: " + w)
        if self.problems:
            self.line("FAILED, {} problem(s):".format(len(self.problems)))
            for p in self.problems:
                self.line(" - " + p)
            return 1
        self.line("OK ({} warning(s)): training can start".format(len(self.warnings)))
        return 0


@dataclass
class TeacherSpec:
    """One teacher as a config names it (the arguments of :func:`build_teacher`)."""

    config: str
    weights: str
    weights_sha256: str = ""
    opts: Sequence[str] = ()
    expected_classes: Optional[Sequence[str]] = None
    num_classes: int = 0  # the student's; 0: not checked here
    where: str = "teacher"


def _parameter_share(model: torch.nn.Module, not_loaded: Sequence[str]) -> Tuple[float, int]:
    """(share of ``model``'s parameter elements outside ``not_loaded``, parameter elements)."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    total = sum(sizes.values())
    missing = sum(sizes.get(k, 0) for k in set(not_loaded))
    return (1.0 - missing / total if total else 0.0), total


def check_teacher(spec: TeacherSpec, report: DryRunReport) -> bool:
    """
    Resolve ``spec``'s config, build its model on the CPU, read its weights (nothing in them
    runs) and match them key by key as the strict loader does, and check its class list and
    count against the student's; report each finding.  Returns whether the teacher is usable.
    """
    from ..modeling.teacher.kinds import teacher_kind
    from ..modeling.teacher.resolve import resolve_teacher_config

    if teacher_kind(spec.config):
        return _check_registered_kind_teacher(spec, report)
    where = spec.where
    try:
        path = resolve_teacher_config(spec.config)
        cfg = load_detector_config(path, spec.opts, role="teacher", opts_name=where + " opts")
        settings = detector_settings(cfg)
        model = build_detector(cfg, "cpu")
    except Exception as e:
        report.problem(where, "config {!r} does not build: {}".format(spec.config, e))
        return False
    report.line(
        "{}: {} ({}, {} classes)".format(
            where, describe_config(path), settings.meta_architecture, settings.num_classes
        )
    )
    ok = _check_teacher_weights(spec, path, model, report)
    if spec.num_classes and settings.num_classes != spec.num_classes:
        report.problem(
            where,
            "{} classes, the student {}: both must be trained on the same label space".format(
                settings.num_classes, spec.num_classes
            ),
        )
        ok = False
    teacher_classes = registered_thing_classes(settings.train_datasets)
    if spec.expected_classes is None or teacher_classes is None:
        report.line(
            "classes: not checked ({})".format(
                "the check is off, or the student's training sets have no class names here"
                if spec.expected_classes is None
                else "the teacher's training sets {} are not registered here".format(
                    tuple(settings.train_datasets)
                )
            )
        )
        return ok
    try:
        check_same_classes(spec.expected_classes, settings.train_datasets, path)
        report.line(
            "classes: the same {} as the student's, in order".format(len(spec.expected_classes))
        )
    except ValueError as e:
        report.problem(where + " classes", str(e))
        ok = False
    return ok


def _check_registered_kind_teacher(spec: TeacherSpec, report: DryRunReport) -> bool:
    """
    A teacher of a kind registered by scheme (``torchvision://NAME``): built by its kind's own
    builder, which reads its weights safely and loads them strictly (every key, with its
    shape, or an error naming them); its classes are matched to the student's by name.
    """
    from ..modeling.teacher.build import build_teacher

    try:
        teacher = build_teacher(
            spec.config,
            spec.weights,
            weights_sha256=spec.weights_sha256,
            opts=spec.opts,
            expected_classes=spec.expected_classes,
            device="cpu",
        )
    except Exception as e:
        report.problem(
            spec.where, "{} does not build: {}: {}".format(spec.config, type(e).__name__, e)
        )
        return False
    total = sum(p.numel() for p in teacher.model.parameters())
    report.line(
        "{}: {} ({}); weights {}: 100.0% of its {:,} parameters loaded (strictly: no key "
        "missing, unexpected or of another shape)".format(
            spec.where, spec.config, type(teacher).__name__, spec.weights or "default", total
        )
    )
    categories = getattr(teacher, "categories", None)
    if spec.expected_classes is not None and categories is not None:
        unmapped = [c for c in spec.expected_classes if c not in categories]
        report.line(
            "classes: every student class is one of the teacher's, by name"
            if not unmapped
            else "classes: the teacher has no class named {}: feature KD only (prediction-level "
            "methods refuse it)".format(unmapped)
        )
    return True


def _check_teacher_weights(spec: TeacherSpec, config_path: str, model, report) -> bool:
    where, path = spec.where, spec.weights
    if not path:
        report.problem(where, "no weights given: a distilled student needs a trained teacher")
        return False
    if "://" not in path and not os.path.isfile(path):
        report.problem(where, "weights {!r} not found".format(path))
        return False
    try:
        local = resolve_weights(path, where + " weights")
        check_sha256(local, spec.weights_sha256, where + " weights_sha256", path)
        checkpointer = SafeDetectionCheckpointer(model)
        incompatible = checkpointer._load_model(checkpointer._load_file(local))
    except Exception as e:
        report.problem(where, "weights {!r} do not load: {}: {}".format(path, type(e).__name__, e))
        return False
    not_loaded = list(incompatible.missing_keys) + [k for k, _, _ in incompatible.incorrect_shapes]
    share, total = _parameter_share(model, not_loaded)
    report.line(
        "weights {}: {:.1%} of its {:,} parameters loaded; missing keys: {}; unexpected keys: "
        "{}; shape mismatches: {}".format(
            path,
            share,
            total,
            len(incompatible.missing_keys),
            len(incompatible.unexpected_keys),
            len(incompatible.incorrect_shapes),
        )
    )
    problems = incompatible_keys_problems(incompatible)
    if problems:
        report.problem(
            where,
            "weights {!r} do not fit its config {!r} ({}). Use the config the teacher was "
            "trained with".format(path, config_path, "; ".join(problems)),
        )
        return False
    return True


def _peak_rss_mib() -> float:
    # ru_maxrss: KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training_step(
    model: torch.nn.Module,
    batches,
    report: DryRunReport,
    optimizer: Optional[torch.optim.Optimizer] = None,
    steps: int = 3,
    accum_steps: int = 1,
    max_iter: int = 0,
    amp: bool = False,
    dominating: float = 10.0,
    vanishing: float = 1e-3,
    auto_fraction: float = 0.0,
) -> None:
    """
    One warm-up step on a real batch (loss terms and gradient ratios printed), then ``steps``
    timed ones (forward, backward, and the ``optimizer`` step: of the in-memory model only),
    the time per iteration (``accum_steps`` micro-batches) and for ``max_iter`` iterations.

    Args:
        batches: an iterator of training batches.
        auto_fraction: > 0 (KD.AUTO_WEIGHT.FRACTION): also print the factor each term would
            get from this batch.
    """
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda") if amp and cuda else torch.autocast("cpu", enabled=False)
    model.train()
    with EventStorage(0):
        report.section("one training step on a real batch (iteration 0)")
        rss_before = _peak_rss_mib()
        start = time.perf_counter()
        with autocast:
            loss_dict = model(next(batches))
        for name, value in sorted(loss_dict.items()):
            report.line("{:<28} {:.5g}".format(name, float(value.detach())))
        bad = [k for k, v in loss_dict.items() if not torch.isfinite(v.detach()).all()]
        if bad:
            report.problem("step", "non-finite loss terms {}".format(bad))
        # under AMP, as the grad scaler's first scale would: fp16 gradients must not underflow
        scale = 2.0**16 if amp and cuda else 1.0
        _report_ratios(model, loss_dict, report, dominating, vanishing, auto_fraction, scale)
        sum(loss_dict.values()).backward()
        if optimizer is not None:
            optimizer.zero_grad()
        _sync(device)
        warm = time.perf_counter() - start
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for it in range(1, steps + 1):
            start = time.perf_counter()
            with autocast:
                losses = model(next(batches))
            sum(losses.values()).backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad()
            _sync(device)
            times.append(time.perf_counter() - start)
        report.section("cost")
        if cuda:
            report.line(
                "peak memory of a step: {:.0f} MiB (CUDA max allocated, timed steps)".format(
                    torch.cuda.max_memory_allocated(device) / 2**20
                )
            )
        else:
            report.line(
                "peak memory of a step: CPU, peak RSS growth over the steps {:.0f} MiB (ru_maxrss; "
                "a lower bound: 0 when the steps stay under the process's earlier peak, e.g. "
                "while building)".format(_peak_rss_mib() - rss_before)
            )
        report.line("warm-up step (with the gradient-ratio measurement): {:.2f} s".format(warm))
        if times:
            per_step = statistics.median(times)
            per_iter = per_step * accum_steps
            report.line(
                "time per iteration: {:.3f} s (median of {} steps after the warm-up{}, "
                "data loading included, evaluation and checkpoints not)".format(
                    per_iter,
                    len(times),
                    ", x {} micro-batches".format(accum_steps) if accum_steps > 1 else "",
                )
            )
            if max_iter:
                total = per_iter * max_iter
                report.line(
                    "whole schedule ({} iterations): {:.0f} s = {:.2f} h".format(
                        max_iter, total, total / 3600
                    )
                )


def _report_ratios(
    model, loss_dict, report, dominating, vanishing, auto_fraction, scale=1.0
) -> None:
    if not any(k.startswith("loss_kd_") for k in loss_dict):
        report.line("no distillation term (loss_kd_*) in the loss dict")
        return
    measured = measure_grad_ratios(loss_dict, student_parameters(model), scale=scale)
    report.section("gradient norm of each distillation term / the detection loss's")
    report.line("detection loss gradient norm: {:.4g}".format(measured.det_norm))
    for name, ratio in sorted(measured.ratios.items()):
        extra = ""
        if not measured.active[name]:
            extra = " (switched off at iteration 0: no graph)"
        elif auto_fraction > 0 and ratio > 0 and math.isfinite(ratio):
            extra = " (KD.AUTO_WEIGHT would multiply it by ~{:.3g})".format(auto_fraction / ratio)
        report.line("{:<28} {:.4g}{}".format(name, ratio, extra))
    for p in health_problems(measured, dominating, vanishing):
        (report.problem if p.is_error else report.warning)("gradient", str(p))


def _run(report: DryRunReport, what: str, fn, *args):
    """``fn(*args)``, or None with a problem naming ``what`` when it raises."""
    try:
        return fn(*args)
    except Exception as e:
        report.problem(what, "{}: {}".format(type(e).__name__, e))
        return None


def _with(context, fn):
    """``fn`` called inside ``context`` (which turns some errors into clearer ones)."""

    def call(*args):
        with context:
            return fn(*args)

    return call


def _yacs_teacher_specs(cfg) -> List[TeacherSpec]:
    from ..config.detector import detector_settings as settings_of

    kd = cfg.KD
    if not cfg.MODEL.META_ARCHITECTURE.startswith("Distill"):
        return []
    expected = registered_thing_classes(cfg.DATASETS.TRAIN) if kd.TEACHER.CHECK_CLASSES else None
    num_classes = settings_of(cfg).num_classes
    mt = kd.MULTI_TEACHER
    if mt.CONFIGS:
        pins = list(mt.WEIGHTS_SHA256) or [""] * len(mt.CONFIGS)
        return [
            TeacherSpec(
                c, w, p, tuple(kd.TEACHER.OPTS), expected, num_classes, "teacher{}".format(i)
            )
            for i, (c, w, p) in enumerate(zip(mt.CONFIGS, mt.WEIGHTS, pins))
        ]
    t = kd.TEACHER
    return [
        TeacherSpec(t.CONFIG, t.WEIGHTS, t.WEIGHTS_SHA256, tuple(t.OPTS), expected, num_classes)
    ]


def _check_datasets(report: DryRunReport, prepare, args) -> bool:
    report.section("datasets (before anything is downloaded)")
    before = len(report.problems)
    _run(report, "datasets", prepare, args)
    if len(report.problems) > before:
        return False
    report.line("registered, generated where synthetic, and validated")
    return True


def _check_teachers(report: DryRunReport, specs: Sequence[TeacherSpec]) -> bool:
    report.section("teachers")
    if not specs:
        report.line("none (not a distillation config)")
    return all([check_teacher(s, report) for s in specs])


def dry_run(args, prepare: Callable) -> int:
    """
    The dry run of tools/train_net.py (a yacs config): see the module's docstring.

    Args:
        args: the tool's parsed arguments (config_file, opts, resume, dry_run_steps).
        prepare: the tool's ``prepare(args)``: datasets generated and validated.
    Returns:
        the exit code: 0, or 1 after a summary of the problems.
    """
    from detectron2.config import get_cfg
    from detectron2.utils.logger import setup_logger

    from .. import merge_kd_config
    from ..checkpoint import AtomicDetectionCheckpointer
    from ..data.empty import empty_dataset_errors
    from .accumulation import micro_batch_cfg
    from .trainer import get_trainer_class

    setup_logger(name="kd_det")
    report = DryRunReport()
    cfg = _run(report, "config", merge_kd_config, get_cfg(), args.config_file, args.opts)
    if cfg is None:
        return report.summary()
    cfg.freeze()
    # as default_setup seeds a training run (which the dry run does not call: it writes files)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    datasets_ok = _check_datasets(report, prepare, args)
    teachers_ok = _check_teachers(report, _run(report, "teachers", _yacs_teacher_specs, cfg) or [])
    if not (datasets_ok and teachers_ok):
        report.line("(the model is not built: fix the problems above first)")
        return report.summary()
    report.section("model, initial weights, data loader")
    trainer_cls = get_trainer_class(cfg)
    model = _run(report, "model", trainer_cls.build_model, cfg)
    if model is None:
        return report.summary()
    checkpointer = AtomicDetectionCheckpointer(model, cfg.OUTPUT_DIR, save_to_disk=False)
    checkpointer.pin(cfg.MODEL.WEIGHTS, cfg.MODEL.WEIGHTS_SHA256)
    resume = bool(getattr(args, "resume", False)) and checkpointer.has_checkpoint()
    weights = checkpointer.get_checkpoint_file() if resume else cfg.MODEL.WEIGHTS
    if weights and _run(report, "MODEL.WEIGHTS", checkpointer.load, weights, []) is None:
        return report.summary()
    report.line("student weights: {}".format(weights or "random initialisation"))
    loader = _run(
        report, "data loader", _with(empty_dataset_errors(), trainer_cls.build_train_loader), cfg
    )
    optimizer = _run(report, "optimizer", trainer_cls.build_optimizer, cfg, model)
    if loader is None or optimizer is None:
        return report.summary()
    micro = micro_batch_cfg(cfg).SOLVER.IMS_PER_BATCH
    report.line(
        "batch: {} images per micro-batch, {} per iteration".format(micro, cfg.SOLVER.IMS_PER_BATCH)
    )
    mon, auto = cfg.KD.MONITOR, cfg.KD.AUTO_WEIGHT
    _run(
        report,
        "step",
        lambda: measure_training_step(
            model,
            iter(loader),
            report,
            optimizer,
            steps=args.dry_run_steps,
            accum_steps=cfg.SOLVER.GRAD_ACCUM_STEPS,
            max_iter=cfg.SOLVER.MAX_ITER,
            amp=cfg.SOLVER.AMP.ENABLED,
            dominating=mon.DOMINATING,
            vanishing=mon.VANISHING,
            auto_fraction=auto.FRACTION if auto.ENABLED else 0.0,
        ),
    )
    return report.summary()


def _lazy_teacher_specs(cfg) -> List[TeacherSpec]:
    from detectron2.config import instantiate

    from ..config.lazy import is_call_of, lazy_get

    calls = [("teacher", lazy_get(cfg, "model.teacher"))]
    extra = lazy_get(cfg, "model.extra_teachers") or []
    calls += [("extra_teachers[{}]".format(i), t) for i, t in enumerate(extra)]
    specs = []
    for where, call in calls:
        if call is None or not is_call_of(call, "build_teacher"):
            continue
        expected = lazy_get(call, "expected_classes")
        if expected is not None and not isinstance(expected, (list, tuple)):
            expected = instantiate(expected)
        specs.append(
            TeacherSpec(
                str(call.config),
                str(lazy_get(call, "weights", "")),
                str(lazy_get(call, "weights_sha256", "") or ""),
                tuple(lazy_get(call, "opts", ()) or ()),
                expected,
                0,  # the model's constructor compares the counts
                "model." + where,
            )
        )
    return specs


def dry_run_lazy(args, load_config: Callable, prepare: Callable) -> int:
    """
    The dry run of tools/lazyconfig_train_net.py: as :func:`dry_run`, on a LazyConfig
    (datasets validated as ``train.validate_datasets`` says, default "full").

    Args:
        load_config, prepare: the tool's ``load_config(args)`` and ``prepare(args)``.
    """
    from detectron2.config import instantiate
    from detectron2.utils.logger import setup_logger

    from ..checkpoint import AtomicDetectionCheckpointer
    from ..config.lazy import lazy_get
    from ..data.empty import empty_dataset_errors
    from .lazy import build_lazy_trainer, lazy_settings

    setup_logger(name="kd_det")
    report = DryRunReport()
    cfg = _run(report, "config", load_config, args)
    if cfg is None:
        return report.summary()
    seed = int(lazy_get(cfg, "train.seed", -1))
    seed_all_rng(None if seed < 0 else seed)
    datasets_ok = _check_datasets(report, prepare, args)
    teachers_ok = _check_teachers(report, _run(report, "teachers", _lazy_teacher_specs, cfg) or [])
    if not (datasets_ok and teachers_ok):
        report.line("(the model is not built: fix the problems above first)")
        return report.summary()
    report.section("model, initial weights, data loader")
    model = _run(report, "model", instantiate, cfg.model)
    if model is None:
        return report.summary()
    model.to(lazy_get(cfg, "train.device", "cpu"))
    init = str(lazy_get(cfg, "train.init_checkpoint", "") or "")
    checkpointer = AtomicDetectionCheckpointer(model, save_to_disk=False)
    if init and _run(report, "train.init_checkpoint", checkpointer.load, init, []) is None:
        return report.summary()
    report.line("student weights: {}".format(init or "random initialisation"))
    cfg.optimizer.params.model = model
    optimizer = _run(report, "optimizer", instantiate, cfg.optimizer)
    if optimizer is None:
        return report.summary()
    empty = empty_dataset_errors("dataloader.train.dataset.filter_empty")
    trainer = _run(report, "data loader", _with(empty, build_lazy_trainer), cfg, model, optimizer)
    if trainer is None:
        return report.summary()
    mon = lazy_settings(cfg, "train.kd_monitor")
    auto = lazy_settings(cfg, "train.auto_weight")
    _run(
        report,
        "step",
        lambda: measure_training_step(
            model,
            iter(trainer.data_loader),
            report,
            optimizer,
            steps=args.dry_run_steps,
            accum_steps=int(lazy_get(cfg, "train.grad_accum_steps", 1)),
            max_iter=int(lazy_get(cfg, "train.max_iter", 0)),
            amp=bool(lazy_get(cfg, "train.amp.enabled", False)),
            dominating=float(mon["dominating"]),
            vanishing=float(mon["vanishing"]),
            auto_fraction=float(auto["fraction"]) if auto["enabled"] else 0.0,
        ),
    )
    return report.summary()
