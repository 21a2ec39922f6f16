"""Gradient accumulation: one optimizer step over several smaller batches."""

import contextlib
import time
from typing import Dict

import torch
from detectron2.engine import SimpleTrainer
from detectron2.engine.train_loop import TrainerBase
from torch.nn.parallel import DistributedDataParallel

__all__ = ["GradientAccumulationTrainer", "micro_batch_cfg", "micro_batch_size"]


def micro_batch_size(
    batch: int,
    steps: int,
    batch_key: str = "SOLVER.IMS_PER_BATCH",
    steps_key: str = "SOLVER.GRAD_ACCUM_STEPS",
) -> int:
    """
    The images of one micro-batch (all processes together) when a batch of ``batch``
    is accumulated over ``steps``; the key names are for the error message.

    Raises:
        ValueError naming both keys when the batch does not split over the steps and processes.
    """
    from detectron2.utils import comm

    world = comm.get_world_size()
    if steps < 1 or batch % (steps * world):
        raise ValueError(
            "{}={} must be a multiple of {}={} times the {} process(es): each process takes "
            "{} / ({} x processes) images per micro-batch. Change either".format(
                batch_key, batch, steps_key, steps, world, batch_key, steps_key
            )
        )
    return batch // steps


def micro_batch_cfg(cfg):
    """
    ``cfg`` with ``SOLVER.IMS_PER_BATCH`` divided by ``SOLVER.GRAD_ACCUM_STEPS``: the
    batch each data-loader step yields (all processes together).  ``cfg`` itself
    when there is no accumulation.
    """
    steps = cfg.SOLVER.GRAD_ACCUM_STEPS
    if steps == 1:
        return cfg
    batch = micro_batch_size(cfg.SOLVER.IMS_PER_BATCH, steps)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.freeze()
    return cfg


class GradientAccumulationTrainer(SimpleTrainer):
    """
    Detectron2's SimpleTrainer/AMPTrainer step, taken over ``steps`` micro-batches:
    each micro-batch's losses are divided by ``steps`` and back-propagated (without
    DDP's gradient all-reduce but for the last one), then the optimizer (with its
    gradient clipping) steps once.  With a data loader that yields
    ``SOLVER.IMS_PER_BATCH / steps`` images per step, one iteration sees
    ``SOLVER.IMS_PER_BATCH`` images, so the LR schedule and iteration counts of a
    config hold on fewer or smaller GPUs.  The gradient equals that of the full
    batch for losses averaged per image; Detectron2's losses average over the
    sampled anchors/RoIs of the batch, so it is close, not equal.  BatchNorm (not
    frozen) normalises over a micro-batch.

    Logged losses are the mean over the micro-batches.  The state (optimizer, and
    the grad scaler under AMP) is saved under the same keys as SimpleTrainer's and
    AMPTrainer's, so checkpoints resume across ``SOLVER.GRAD_ACCUM_STEPS`` values.
    """

    def __init__(self, inner: SimpleTrainer, steps: int, amp: bool = False):
        """
        Args:
            inner: the trainer Detectron2's DefaultTrainer made; its model, data loader
                (and running iterator), optimizer and, with AMP, grad scaler are taken over.
            steps: micro-batches per optimizer step (>= 1).
            amp: run the forward passes under CUDA autocast, as AMPTrainer does.
        """
        TrainerBase.__init__(self)  # not SimpleTrainer's: the running data iterator is reused
        if steps < 1:
            raise ValueError("SOLVER.GRAD_ACCUM_STEPS must be >= 1, got {}".format(steps))
        self.model = inner.model
        self.data_loader = inner.data_loader
        self._data_loader_iter = inner._data_loader_iter
        self.optimizer = inner.optimizer
        self.grad_scaler = getattr(inner, "grad_scaler", None) if amp else None
        self.steps = steps
        self.amp = amp

    def run_step(self):
        assert self.model.training, "[GradientAccumulationTrainer] model was changed to eval mode!"
        if self.amp:
            assert (
                torch.cuda.is_available()
            ), "[GradientAccumulationTrainer] CUDA is required for AMP training!"
        self.optimizer.zero_grad()
        data_time = 0.0
        mean_losses: Dict[str, torch.Tensor] = {}
        for i in range(self.steps):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            last = i == self.steps - 1
            sync = contextlib.nullcontext()
            if not last and isinstance(self.model, DistributedDataParallel):
                sync = (
                    self.model.no_sync()
                )  # all-reduce the gradients once, after the last micro-batch
            with sync:
                with torch.autocast("cuda") if self.amp else contextlib.nullcontext():
                    loss_dict = self.model(data)
                    if isinstance(loss_dict, torch.Tensor):
                        loss_dict = {"total_loss": loss_dict}
                    losses = sum(loss_dict.values()) / self.steps
                (
                    self.grad_scaler.scale(losses) if self.grad_scaler is not None else losses
                ).backward()
            for k, v in loss_dict.items():
                mean_losses[k] = mean_losses.get(k, 0.0) + v.detach() / self.steps
        # raises FloatingPointError on a non-finite loss, before the optimizer steps
        self._write_metrics(mean_losses, data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
