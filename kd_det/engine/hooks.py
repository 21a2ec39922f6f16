"""Training hooks kd_det adds to Detectron2's defaults."""

import contextlib
import logging
import os
import random
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
import torch

from detectron2.data import DatasetMapper, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.engine import HookBase
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..evaluation import build_evaluator

__all__ = ["TeacherEvalHook", "evaluate_teacher", "teacher_eval_hook"]

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


def _teacher_test_loader(teacher, dataset_name: str, student_cfg):
    """
    The test loader of ``dataset_name`` prepared as the teacher's own config prepares test
    images (Detectron2's ``build_detection_test_loader(teacher_cfg, name)``): its test-time
    resize and channel order, the student's number of loader workers.
    """
    min_size, max_size = teacher.test_size
    if min_size is None:
        # a LazyConfig teacher without a test-time resize: evaluate it at the student's test size
        min_size, max_size = student_cfg.INPUT.MIN_SIZE_TEST, student_cfg.INPUT.MAX_SIZE_TEST
        logger.info("teacher %s has no ResizeShortestEdge in dataloader.test.mapper.augmentations: "
                    "it is evaluated at the student's test size (%d, max %d)", teacher.config,
                    min_size, max_size)
    dataset = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    # what DatasetMapper(teacher_cfg, is_train=False) is: at test time it drops annotations,
    # so only the resize and the channel order matter
    resize = T.ResizeShortestEdge(min_size, max_size, "choice")
    mapper = DatasetMapper(is_train=False, augmentations=[resize],
                           image_format=teacher.input_format)
    return build_detection_test_loader(dataset, mapper=mapper,
                                       num_workers=student_cfg.DATALOADER.NUM_WORKERS)


def evaluate_teacher(student_cfg, teacher, output_dir: str) -> Dict[str, Dict]:
    """
    Evaluate a :class:`~kd_det.modeling.FrozenTeacher` on the student's
    ``DATASETS.TEST``, each set loaded with the teacher's own input settings
    (test size, channel order) and scored by the student's evaluator.

    Returns:
        dataset name -> evaluator results (e.g. {"bbox": {"AP": ..}}); empty on
        processes other than the main one.
    """
    results = OrderedDict()
    for name in student_cfg.DATASETS.TEST:
        loader = _teacher_test_loader(teacher, name, student_cfg)
        evaluator = build_evaluator(student_cfg, name, os.path.join(output_dir, name))
        results[name] = inference_on_dataset(teacher.model, loader, evaluator) or {}
        if comm.is_main_process() and results[name]:
            logger.info("Teacher ({}) on {}:".format(teacher.meta_architecture, name))
            print_csv_format(results[name])
    return results


class TeacherEvalHook(HookBase):
    """
    Before the first iteration of a run (not when resuming), evaluate every teacher
    of the model on ``DATASETS.TEST`` and log its metrics as ``teacher/...``
    (``teacher<k>/...`` for the k-th of several teachers; a dataset level is added
    when there are several test sets, as Detectron2 does).  The global random state
    is restored afterwards, so the run trains exactly as it would without this hook.
    With ``min_ap`` > 0, stop there when a teacher's box AP on a test set is below
    it: a teacher that loads but does not detect (an early or foreign checkpoint,
    another input format or pixel normalisation) would otherwise spoil the whole run
    silently.
    """

    def __init__(self, cfg, min_ap: float = 0.0):
        self._cfg = cfg
        self._min_ap = float(min_ap)

    def before_train(self):
        if self.trainer.iter > 0:
            return
        model = self.trainer.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        teachers = getattr(model, "teachers", [])
        cfg = self._cfg
        too_low: List[str] = []
        for k, teacher in enumerate(teachers):
            prefix = "teacher" if len(teachers) == 1 else "teacher{}".format(k)
            with preserved_rng_state():
                results = evaluate_teacher(cfg, teacher, os.path.join(cfg.OUTPUT_DIR, "inference_" + prefix))
            if comm.is_main_process():
                logged = results[cfg.DATASETS.TEST[0]] if len(results) == 1 else results
                scalars = {prefix + "/" + key: v for key, v in flatten_results_dict(logged).items()}
                self.trainer.storage.put_scalars(**scalars, smoothing_hint=False)
                for name, res in results.items():
                    ap = res.get("bbox", {}).get("AP")
                    if self._min_ap > 0 and ap is None:
                        too_low.append("{} (weights {}) has no box AP on {} (the evaluator gave {})".format(
                            prefix, teacher.weights, name, sorted(res)))
                    elif ap is not None and ap < self._min_ap:
                        too_low.append("{} (weights {}) has box AP {:.2f} on {}".format(
                            prefix, teacher.weights, ap, name))
        # every process stops, or none: the main one alone has the metrics
        too_low = comm.all_gather(too_low)[0]
        if too_low:
            raise ValueError(
                "{}, below KD.TEACHER.MIN_AP={}; training did not start. Check that the teacher checkpoint is "
                "the trained one for its config (KD.TEACHER.CONFIG), and that the config's INPUT.FORMAT and "
                "MODEL.PIXEL_MEAN/PIXEL_STD are those it was trained with; or lower KD.TEACHER.MIN_AP".format(
                    "; ".join(too_low), self._min_ap))


def teacher_eval_hook(cfg) -> Optional[TeacherEvalHook]:
    """
    The :class:`TeacherEvalHook` that ``KD.TEACHER.EVAL_BEFORE_TRAIN`` or ``MIN_AP`` ask
    for, on ``DATASETS.TEST``; None when neither does, or (without MIN_AP) there is no test set.

    Raises:
        ValueError when ``MIN_AP`` is set and there is no test set to check it on.
    """
    teacher = cfg.KD.TEACHER
    if teacher.MIN_AP > 0 and not cfg.DATASETS.TEST:
        raise ValueError("KD.TEACHER.MIN_AP={} is checked on the test sets (DATASETS.TEST; a LazyConfig's "
                         "dataloader.test.dataset.names), which are empty: name a test set, or set KD.TEACHER.MIN_AP "
                         "0".format(teacher.MIN_AP))
    if (teacher.EVAL_BEFORE_TRAIN or teacher.MIN_AP > 0) and cfg.DATASETS.TEST:
        return TeacherEvalHook(cfg, teacher.MIN_AP)
    return None
