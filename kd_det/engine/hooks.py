"""Training hooks kd_det adds to Detectron2's defaults."""

import contextlib
import functools
import logging
import os
import random
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetMapper, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.engine import HookBase, hooks
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset, print_csv_format
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint.retention import prune_checkpoints
from ..evaluation import build_evaluator

__all__ = [
    "PeriodicCheckpointer",
    "TeacherEvalHook",
    "evaluate_teacher",
    "evaluate_teacher_on",
    "teacher_test_loader",
    "teacher_eval_hook",
]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def preserved_rng_state():
    """
    Restore Python's, NumPy's and torch's (CPU and every initialised CUDA device's)
    global random state on exit: evaluating a teacher draws from them (data loader
    seeds), and a logging-only evaluation must not change the run it precedes.
    """
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def teacher_test_loader(
    teacher,
    dataset_name: str,
    num_workers: int = 0,
    default_test_size: Tuple[int, int] = (800, 1333),
):
    """
    The test loader of ``dataset_name`` prepared as the teacher's own config prepares test
    images (Detectron2's ``build_detection_test_loader(teacher_cfg, name)``): its test-time
    resize and channel order.

    Args:
        teacher: a :class:`~kd_det.modeling.FrozenTeacher`.
        num_workers: loader workers (the student's).
        default_test_size: (shortest edge, longest edge at most) for a teacher whose config
            says none (a LazyConfig without a test-time resize): the student's.
    """
    min_size, max_size = teacher.test_size
    if min_size is None:
        # a LazyConfig teacher without a test-time resize: evaluate it at the student's test size
        min_size, max_size = default_test_size
        logger.info(
            "teacher %s has no ResizeShortestEdge in dataloader.test.mapper.augmentations: "
            "it is evaluated at the student's test size (%d, max %d)",
            teacher.config,
            min_size,
            max_size,
        )
    dataset = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    # what DatasetMapper(teacher_cfg, is_train=False) is: at test time it drops annotations,
    # so only the resize and the channel order matter
    resize = T.ResizeShortestEdge(min_size, max_size, "choice")
    mapper = DatasetMapper(
        is_train=False, augmentations=[resize], image_format=teacher.input_format
    )
    return build_detection_test_loader(dataset, mapper=mapper, num_workers=num_workers)


def evaluate_teacher_on(
    teacher,
    dataset_names: Sequence[str],
    build_evaluator: Callable[[str, str], DatasetEvaluator],
    output_dir: str,
    num_workers: int = 0,
    default_test_size: Tuple[int, int] = (800, 1333),
) -> Dict[str, Dict]:
    """
    Evaluate a :class:`~kd_det.modeling.FrozenTeacher` on ``dataset_names``, each set
    loaded with the teacher's own input settings (:func:`teacher_test_loader`) and scored
    by ``build_evaluator(dataset_name, output_dir)`` (the student's evaluator).

    Returns:
        dataset name -> evaluator results (e.g. {"bbox": {"AP": ..}}); empty on
        processes other than the main one.
    """
    results = OrderedDict()
    for name in dataset_names:
        loader = teacher_test_loader(teacher, name, num_workers, default_test_size)
        evaluator = build_evaluator(name, os.path.join(output_dir, name))
        results[name] = inference_on_dataset(teacher.inference_model, loader, evaluator) or {}
        if comm.is_main_process() and results[name]:
            logger.info("Teacher ({}) on {}:".format(teacher.meta_architecture, name))
            print_csv_format(results[name])
    return results


def evaluate_teacher(student_cfg, teacher, output_dir: str) -> Dict[str, Dict]:
    """
    :func:`evaluate_teacher_on` the yacs student's ``DATASETS.TEST``, scored by its
    evaluator (``TEST.EVALUATOR``), with its loader workers and test size.
    """
    return evaluate_teacher_on(
        teacher,
        student_cfg.DATASETS.TEST,
        functools.partial(build_evaluator, student_cfg),
        output_dir,
        student_cfg.DATALOADER.NUM_WORKERS,
        (student_cfg.INPUT.MIN_SIZE_TEST, student_cfg.INPUT.MAX_SIZE_TEST),
    )


class TeacherEvalHook(HookBase):
    """
    Before the first iteration of a run (not when resuming), evaluate every teacher
    of the model (its ``teachers``) and log its metrics as ``teacher/...``
    (``teacher<k>/...`` for the k-th of several teachers; a dataset level is added
    when there are several test sets, as Detectron2 does).  The global random state
    is restored afterwards, so the run trains exactly as it would without this hook.
    With ``min_ap`` > 0, stop there when a teacher's box AP on a test set is below
    it: a teacher that loads but does not detect (an early or foreign checkpoint,
    another input format or pixel normalisation) would otherwise spoil the whole run
    silently.
    """

    def __init__(
        self,
        evaluate: Callable[[object, str], Dict[str, Dict]],
        output_dir: str,
        min_ap: float = 0.0,
        keys: Optional[Dict[str, str]] = None,
    ):
        """
        Args:
            evaluate: ``evaluate(teacher, output_dir)`` -> test set name -> results (e.g.
                :func:`evaluate_teacher` with the student's config bound).
            output_dir: the run's; each teacher's results go to ``inference_teacher<k>`` in it.
            min_ap: the box AP each teacher must reach on every test set; 0: not checked.
            keys: how the error names the settings, ``min_ap`` and ``teacher_config`` (the
                yacs keys by default; a LazyConfig's are other).
        """
        self._evaluate = evaluate
        self._output_dir = output_dir
        self._min_ap = float(min_ap)
        self._keys = dict(
            {
                "min_ap": "KD.TEACHER.MIN_AP",
                "teacher_config": "KD.TEACHER.CONFIG",
                "input": "the config's INPUT.FORMAT and MODEL.PIXEL_MEAN/PIXEL_STD",
            },
            **(keys or {})
        )

    def before_train(self):
        if self.trainer.iter > 0:
            return
        model = self.trainer.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        teachers = getattr(model, "teachers", [])
        too_low: List[str] = []
        for k, teacher in enumerate(teachers):
            prefix = "teacher" if len(teachers) == 1 else "teacher{}".format(k)
            with preserved_rng_state():
                results = self._evaluate(
                    teacher, os.path.join(self._output_dir, "inference_" + prefix)
                )
            if comm.is_main_process():
                logged = next(iter(results.values())) if len(results) == 1 else results
                scalars = {prefix + "/" + key: v for key, v in flatten_results_dict(logged).items()}
                self.trainer.storage.put_scalars(**scalars, smoothing_hint=False)
                for name, res in results.items():
                    ap = res.get("bbox", {}).get("AP")
                    if self._min_ap > 0 and ap is None:
                        too_low.append(
                            "{} (weights {}) has no box AP on {} (the evaluator gave {})".format(
                                prefix, teacher.weights, name, sorted(res)
                            )
                        )
                    elif ap is not None and ap < self._min_ap:
                        too_low.append(
                            "{} (weights {}) has box AP {:.2f} on {}".format(
                                prefix, teacher.weights, ap, name
                            )
                        )
        # every process stops, or none: the main one alone has the metrics
        too_low = comm.all_gather(too_low)[0]
        if too_low:
            keys = self._keys
            raise ValueError(
                "{}, below {}={}; training did not start. Check that the teacher checkpoint is "
                "the trained one for its config ({}), and that {} are those it was trained "
                "with; or lower {}".format(
                    "; ".join(too_low),
                    keys["min_ap"],
                    self._min_ap,
                    keys["teacher_config"],
                    keys["input"],
                    keys["min_ap"],
                )
            )


def teacher_eval_hook(cfg) -> Optional[TeacherEvalHook]:
    """
    The :class:`TeacherEvalHook` that ``KD.TEACHER.EVAL_BEFORE_TRAIN`` or ``MIN_AP`` ask
    for, on ``DATASETS.TEST``; None when neither does, or (without MIN_AP) there is no test set.

    Raises:
        ValueError when ``MIN_AP`` is set and there is no test set to check it on.
    """
    teacher = cfg.KD.TEACHER
    if teacher.MIN_AP > 0 and not cfg.DATASETS.TEST:
        raise ValueError(
            "KD.TEACHER.MIN_AP={} is checked on the test sets (DATASETS.TEST; a LazyConfig's "
            "dataloader.test.dataset.names), which are empty: name a test set, or set "
            "KD.TEACHER.MIN_AP 0".format(teacher.MIN_AP)
        )
    if (teacher.EVAL_BEFORE_TRAIN or teacher.MIN_AP > 0) and cfg.DATASETS.TEST:
        return TeacherEvalHook(
            functools.partial(evaluate_teacher, cfg), cfg.OUTPUT_DIR, teacher.MIN_AP
        )
    return None


class PeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """
    Detectron2's PeriodicCheckpointer hook that keeps only the newest ``keep`` periodic
    checkpoints (``SOLVER.CHECKPOINT_KEEP``; 0 keeps all), found by scanning the folder
    (:func:`~kd_det.checkpoint.prune_checkpoints`), so that those saved before a resume
    count too. Deleting follows each save, after its file and ``last_checkpoint`` are
    written; the tagged file and ``model_final.pth`` are never deleted.
    """

    def __init__(
        self,
        checkpointer,
        period: int,
        max_iter: Optional[int] = None,
        keep: int = 0,
        file_prefix: str = "model",
    ):
        if keep < 0:
            raise ValueError(
                "SOLVER.CHECKPOINT_KEEP must be >= 0 (0 keeps all), got {}".format(keep)
            )
        super().__init__(checkpointer, period, max_iter=max_iter, file_prefix=file_prefix)
        self.keep = int(keep)

    def step(self, iteration: int, **kwargs) -> None:
        super().step(iteration, **kwargs)
        saved = (iteration + 1) % self.period == 0 or (
            self.max_iter is not None and iteration >= self.max_iter - 1
        )
        if saved and self.keep > 0 and comm.is_main_process():
            prune_checkpoints(self.checkpointer.save_dir, self.keep, self.file_prefix)
