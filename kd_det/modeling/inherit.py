"""Initialising student weights from the teacher where the architectures agree."""

import logging
from typing import List, Sequence

import torch

__all__ = ["inherit_teacher_weights"]

logger = logging.getLogger(__name__)


def inherit_teacher_weights(
    student: torch.nn.Module, teacher: torch.nn.Module, prefixes: Sequence[str]
) -> List[str]:
    """
    Copy into ``student`` every teacher ``state_dict`` entry whose key starts with
    one of ``prefixes`` (plain string prefixes: ``backbone.fpn_output`` takes
    ``backbone.fpn_output2.weight`` ...; ``roi_heads``, ``head``): a
    student with a smaller backbone but the teacher's FPN width can start from the
    teacher's FPN output convolutions and detection heads instead of random ones.

    Strict, so that nothing is silently left random: every prefix must match a
    teacher key, and every matched key must exist in the student with the same shape.

    Returns:
        the copied keys.
    """
    if not prefixes:
        return []
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    copied, problems = {}, []
    for prefix in prefixes:
        matched = [k for k in teacher_state if k.startswith(prefix)]
        if not matched:
            modules = sorted({".".join(k.split(".")[:2]) for k in teacher_state})
            raise ValueError(
                "KD.INHERIT.PREFIXES entry {!r} matches no teacher weight; "
                "the teacher has {}".format(prefix, ", ".join(modules))
            )
        for key in matched:
            if key not in student_state:
                problems.append("{} (not in the student)".format(key))
            elif student_state[key].shape != teacher_state[key].shape:
                problems.append(
                    "{} (teacher {}, student {})".format(
                        key, tuple(teacher_state[key].shape), tuple(student_state[key].shape)
                    )
                )
            else:
                copied[key] = teacher_state[key]
    if problems:
        raise ValueError(
            "KD.INHERIT.PREFIXES {} name teacher weights the student cannot take: {}{}. Name only "
            "modules the two share with equal shapes (e.g. backbone.fpn_output and the heads when "
            "the FPN widths agree)".format(
                list(prefixes),
                "; ".join(problems[:8]),
                " and {} more".format(len(problems) - 8) if len(problems) > 8 else "",
            )
        )
    with torch.no_grad():
        for key, value in copied.items():
            student_state[key].copy_(value)
    logger.info(
        "Initialised {} student weights from the teacher ({})".format(
            len(copied), ", ".join(prefixes)
        )
    )
    return sorted(copied)
