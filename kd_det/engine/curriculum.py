"""
Instance-level curriculum, its model and trainer side: a student snapshot scores the
training images (:func:`score_images`, run by ``tools/score_images.py``), and a resumed
training restarts the :class:`~kd_det.data.curriculum.CurriculumSampler`'s stream at its
iteration (:func:`restart_curriculum`).  The sampler and the scores file are
:mod:`kd_det.data.curriculum`.
"""

from typing import Dict

import torch

from ..data.curriculum import find_curriculum_sampler, image_key

__all__ = ["restart_curriculum", "score_images", "SCORE_KINDS"]

# which loss terms make an image's difficulty
SCORE_KINDS = ("detection", "distillation", "total")


def restart_curriculum(trainer, start_iter: int) -> bool:
    """
    On resume: restart the curriculum stream of ``trainer`` (a SimpleTrainer or its kind:
    ``data_loader`` and a running ``_data_loader_iter``) at ``start_iter``'s place in the
    curriculum, with a new iterator (so that data-loader workers get the updated
    sampler).  Returns whether its loader has a curriculum.
    """
    sampler = find_curriculum_sampler(trainer.data_loader)
    if sampler is None:
        return False
    if start_iter > 0:
        sampler.set_start_iter(start_iter)
        trainer._data_loader_iter = iter(trainer.data_loader)
    return True


@torch.no_grad()
def score_images(model: torch.nn.Module, data_loader, kind: str = "detection") -> Dict[str, float]:
    """
    Difficulty of each image: the sum of the snapshot's training losses on it alone.

    Args:
        model: the student snapshot (a kd_det or Detectron2 model that returns a loss dict
            in training mode).  Normalisation layers are kept in eval mode, so the
            snapshot is not changed.
        data_loader: yields single-image lists of mapped dataset dicts (with ``instances``).
        kind: "detection" (the detector's own losses), "distillation" (the ``loss_kd_*``
            terms) or "total".
    Returns:
        image key -> score.
    """
    if kind not in SCORE_KINDS:
        raise ValueError("score kind must be one of {}, got {!r}".format(SCORE_KINDS, kind))
    from detectron2.utils.events import EventStorage

    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    scores = {}
    with EventStorage(0):
        for batch in data_loader:
            for record in batch:
                losses = model([record])
                terms = [
                    v
                    for k, v in losses.items()
                    if kind == "total" or (k.startswith("loss_kd_") == (kind == "distillation"))
                ]
                if not terms:
                    raise ValueError(
                        "the model returns no {} losses ({}); choose another score kind".format(
                            kind, sorted(losses)
                        )
                    )
                scores[image_key(record)] = float(sum(terms))
    model.train(was_training)
    return scores
