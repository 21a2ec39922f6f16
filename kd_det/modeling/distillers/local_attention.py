"""
LAKD (Local Attention Knowledge Distillation; Zhang et al. 2024, "LAKD-Activation Mapping
Distillation Based on Local Learning", a classification paper) adapted to detection.

* **Local modules with independent gradients** (the paper's separation-decoupling): the
  modules are the student backbone's ResNet stages (``res2`` .. ``res5``).  A stage's
  distillation loss must update that stage alone, so it is computed on a second run of the
  stage on its *detached* input (recorded by a forward hook in the normal pass): its
  gradient reaches that stage's parameters and nothing before or after it.  The detection
  loss still trains the whole backbone end to end through the normal forward, which is not
  changed.  (The paper trains its local modules on the distillation signal; kd_det keeps
  the detector's end-to-end loss beside it.)
* **Non-directional activation maps** (NDAM): each stage imitates the teacher's stage of the
  same name through :class:`~kd_det.losses.NonDirectionalAttentionLoss` (channel mean of
  ``|x|^p``, pooled to a coarse map, L2-normalised), so stages of different widths compare
  without an adapter.
* **From simple to complex**: stage ``k`` is switched on at iteration ``start_iters[k]``,
  shallow stages first (``KD.LAKD.START_ITERS``); a switched-on stage stays on.

The second run costs one more forward and backward of each switched-on stage (measured by
``benchmarks/bench_lakd_overhead.py``).  BatchNorm layers normalise the second run with the
batch's statistics, as in the normal pass, but do not update their running statistics again
(they would otherwise count every batch twice).
"""

import contextlib
from typing import Dict, List, Mapping, Sequence

import torch
from detectron2.config import configurable
from torch import nn

from ...losses import NonDirectionalAttentionLoss
from ..recorders import Source

__all__ = ["LocalAttentionDistiller", "backbone_stage", "running_stats_untouched"]


def _stage_path(backbone: nn.Module, stage: str) -> str:
    """Dotted path of ResNet stage ``stage`` inside ``backbone`` (an FPN's ``bottom_up``)."""
    return "bottom_up." + stage if hasattr(backbone, "bottom_up") else stage


def backbone_stage(backbone: nn.Module, stage: str, who: str = "student") -> nn.Module:
    """
    The ResNet stage ``stage`` (e.g. "res3") of a Detectron2 backbone: of its ``bottom_up``
    for an FPN, else of the backbone itself.

    Raises:
        ValueError: naming the stages the backbone has.
    """
    path = _stage_path(backbone, stage)
    modules = dict(backbone.named_modules())
    if path not in modules:
        body = getattr(backbone, "bottom_up", backbone)
        raise ValueError(
            "LAKD (KD.LAKD.STAGES) distils ResNet stage {!r}, but the {}'s backbone ({}) has "
            "no submodule {!r}; its stages: {}".format(
                stage,
                who,
                type(backbone).__name__,
                path,
                list(getattr(body, "stage_names", ())) or "none (not a ResNet)",
            )
        )
    return modules[path]


@contextlib.contextmanager
def running_stats_untouched(module: nn.Module):
    """
    A context in which the BatchNorm layers of ``module`` that are in training mode normalise
    with the batch's statistics, as in training, but leave their running statistics alone: a
    second pass over the same batch does not count it twice.  (Restoring the buffers
    afterwards would not do: they are saved for the backward pass of the normal one, and an
    in-place change invalidates it.)
    """
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    try:
        for m in norms:
            m.track_running_stats = False
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class LocalAttentionDistiller(nn.Module):
    """
    LAKD for a student whose backbone is (or has as ``bottom_up``) a Detectron2 ResNet: each
    of ``stages`` learns the teacher's stage of the same name through the activation-map
    loss, from iteration ``start_iters[k]`` on, with gradients to that stage only.

    It holds no parameters and no student modules: the meta-architecture records each
    stage's input and passes the stages in (:meth:`forward`).

    Example (LazyConfig)::

        model.local_attention = L(LocalAttentionDistiller)(
            stages=["res2", "res3", "res4", "res5"], start_iters=[0, 25, 50, 75],
            loss=L(NonDirectionalAttentionLoss)(p=2.0, map_size=8), weight=1.0)
    """

    @configurable
    def __init__(
        self,
        *,
        stages: Sequence[str],
        loss: NonDirectionalAttentionLoss,
        weight: float,
        start_iters: Sequence[int] = (),
    ):
        """
        Args:
            stages: student (and teacher) ResNet stages to distil, e.g. ["res2", "res3"].
            loss: the activation-map loss (any feature loss that takes other channel counts).
            weight: multiplies each stage's loss; the stages' terms add up (each trains its
                own stage, so switching one on does not rescale the others' gradients).
            start_iters: per stage, the iteration from which it is distilled; empty: all
                from iteration 0.
        """
        super().__init__()
        self.stages = list(stages)
        if not self.stages or len(set(self.stages)) != len(self.stages):
            raise ValueError(
                "KD.LAKD.STAGES (stages) must name distinct ResNet stages, e.g. "
                "['res2', 'res3', 'res4', 'res5']; got {}".format(self.stages)
            )
        start_iters = list(start_iters) or [0] * len(self.stages)
        if len(start_iters) != len(self.stages) or any(int(s) < 0 for s in start_iters):
            raise ValueError(
                "KD.LAKD.START_ITERS (start_iters) needs one iteration >= 0 per stage of {}, "
                "got {}".format(self.stages, start_iters)
            )
        if loss.needs_equal_channels:
            raise ValueError(
                "LAKD compares stages of different widths without adapters: its loss must "
                "take other channel counts (NonDirectionalAttentionLoss), not {}".format(
                    type(loss).__name__
                )
            )
        self.start_iters = [int(s) for s in start_iters]
        self.loss = loss
        self.weight = float(weight)

    @classmethod
    def from_config(cls, cfg):
        lakd = cfg.KD.LAKD
        return {
            "stages": list(lakd.STAGES),
            "start_iters": list(lakd.START_ITERS),
            "loss": NonDirectionalAttentionLoss(cfg),
            "weight": lakd.WEIGHT,
        }

    def active_stages(self, iteration: int) -> List[str]:
        """The stages distilled at ``iteration`` (those whose start iteration has come)."""
        return [s for s, start in zip(self.stages, self.start_iters) if iteration >= start]

    def stage_input_sources(self, backbone: nn.Module, prefix: str = "backbone.") -> Dict:
        """Recorder sources (:class:`Source`) of each stage's input, (N, C_in, H, W)."""
        return {
            "lakd_input_" + s: Source(prefix + _stage_path(backbone, s), "input", 0)
            for s in self.stages
        }

    def stage_output_sources(self, backbone: nn.Module, prefix: str = "") -> Dict:
        """Recorder sources of each stage's output (a teacher's), (N, C, H, W)."""
        return {s: Source(prefix + _stage_path(backbone, s)) for s in self.stages}

    def check_backbones(self, student: nn.Module, teacher: nn.Module) -> None:
        """
        Raise unless both backbones have every stage, and every student stage trains.

        Raises:
            ValueError naming the stage and the key to change.
        """
        for stage in self.stages:
            backbone_stage(teacher, stage, "teacher")
            params = list(backbone_stage(student, stage).parameters())
            if not any(p.requires_grad for p in params):
                raise ValueError(
                    "LAKD distils student stage {!r}, which is frozen (MODEL.BACKBONE."
                    "FREEZE_AT): leave it out of KD.LAKD.STAGES, or freeze fewer "
                    "stages".format(stage)
                )

    def local_forward(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """
        The distillation path of one local module: ``stage`` run again on its input
        ``x`` (N, C_in, H, W), detached, so that a loss on the result reaches ``stage``'s
        parameters only; BatchNorm running statistics are left as they were.
        """
        with running_stats_untouched(stage):
            return stage(x.detach())

    def forward(
        self,
        stages: Mapping[str, nn.Module],
        stage_inputs: Mapping[str, torch.Tensor],
        teacher_outputs: Mapping[str, torch.Tensor],
        iteration: int,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            stages: stage name -> the student's stage module.
            stage_inputs: stage name -> its input in the normal pass, (N, C_in, H, W).
            teacher_outputs: stage name -> the teacher stage's output, (N, C_t, H, W).
            iteration: the training iteration (decides the switched-on stages).
        Returns:
            {"loss_kd_lakd": weight * sum over switched-on stages of the stage's loss}: a
            zero (without graph) before the first stage is switched on.
        """
        active = self.active_stages(iteration)
        if not active:
            ref = next(iter(stage_inputs.values()))
            return {"loss_kd_" + self.loss.short_name: ref.new_zeros(())}
        student = [self.local_forward(stages[s], stage_inputs[s]) for s in active]
        teacher = [teacher_outputs[s] for s in active]
        value = self.loss(student, teacher, level_weights=[1.0] * len(active))
        return {"loss_kd_" + self.loss.short_name: self.weight * value}
