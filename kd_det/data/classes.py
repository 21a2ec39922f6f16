"""
The class names of registered datasets, and the check that two detectors share a label
space: class index i must mean the same object for both (a teacher that teaches class i
under another name spoils a distillation run without any error).
"""

from typing import Iterable, Optional, Sequence, Union

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["ClassNames", "registered_thing_classes", "thing_classes", "check_same_classes"]


class ClassNames(list):
    """Class names (index i = class i), and the datasets they were read from (for messages)."""

    def __init__(self, names: Iterable[str], datasets: Sequence[str] = ()):
        super().__init__(names)
        self.datasets = tuple(datasets)


def registered_thing_classes(dataset_names: Iterable[str]) -> Optional[ClassNames]:
    """
    The ``thing_classes`` metadata of the first of ``dataset_names`` that is registered
    and has it (its ``datasets``: all of ``dataset_names``), else None (not registered
    here, or classes known only once loaded).
    """
    dataset_names = tuple(dataset_names)
    registered = set(DatasetCatalog.list())
    for name in dataset_names:
        if name in registered:
            classes = MetadataCatalog.get(name).get("thing_classes", None)
            if classes:
                return ClassNames(classes, dataset_names)
    return None


def thing_classes(names: Union[str, Iterable[str]]) -> Optional[ClassNames]:
    """
    The class names of a student trained on the datasets ``names`` (one name or several,
    as ``get_detection_dataset_dicts`` takes them), for ``build_teacher(expected_classes=...)``
    in a LazyConfig, evaluated when the model is built::

        model.teacher = L(build_teacher)(config=..., weights=...,
            expected_classes=L(thing_classes)(names="${dataloader.train.dataset.names}"))

    None (nothing is checked) when none of them is registered with ``thing_classes``; the
    yacs ``KD.TEACHER.CHECK_CLASSES False`` is ``expected_classes=None``.
    """
    return registered_thing_classes((names,) if isinstance(names, str) else tuple(names))


def _student(expected: Sequence[str]) -> str:
    datasets = getattr(expected, "datasets", ())
    if datasets:
        return str(tuple(datasets))
    names = list(expected)
    return "classes {}{}".format(names[:5], " ..." if len(names) > 5 else "")


def check_same_classes(
    expected: Optional[Sequence[str]],
    teacher_train: Sequence[str],
    teacher_config: str,
) -> None:
    """
    Raise if the teacher's training sets name other classes than ``expected`` (the
    student's class names), or the same classes in another order.  Nothing is checked
    when ``expected`` is None, or when no teacher set is registered here with its classes.

    Args:
        expected: the student's class names, index i = class i (a :class:`ClassNames`
            also names the student's datasets in the message); None: not checked.
        teacher_train: the teacher's training set names (its config's DATASETS.TRAIN).
        teacher_config: the teacher's config file (for the message).
    """
    teacher = registered_thing_classes(teacher_train)
    if expected is None or teacher is None or list(expected) == list(teacher):
        return
    student = list(expected)
    if sorted(student) == sorted(teacher):
        i = next(i for i, (a, b) in enumerate(zip(student, teacher)) if a != b)
        what = (
            "the same classes in another order (class {} is {!r} for the teacher, {!r} for the "
            "student)".format(i, teacher[i], student[i])
        )
    else:
        what = (
            "other classes (the teacher's {} are not among the student's; the student's {} not "
            "among the teacher's)".format(
                sorted(set(teacher) - set(student))[:5], sorted(set(student) - set(teacher))[:5]
            )
        )
    raise ValueError(
        "teacher config {!r} was trained on DATASETS.TRAIN={} and the student on {}: they have {}, "
        "so the teacher's predictions would teach the wrong classes. Train the teacher on the "
        "student's label space; if the classes do correspond, set KD.TEACHER.CHECK_CLASSES "
        "False".format(teacher_config, tuple(teacher_train), _student(expected), what)
    )
