"""
A small torchvision teacher trained on kd_det's synthetic data, generated on first use as the
synthetic dataset is: ``KD.TEACHER.WEIGHTS synthetic-teacher://NAME`` trains kd_det's
torchvision detector ``NAME`` (:mod:`.torchvision_models`, e.g. ``fasterrcnn_resnet18_fpn``) on
``kd_synthetic_train`` once, saves ``{"model": state_dict, "categories": [...]}`` under the
synthetic dataset's folder (``teachers/NAME-v<version>.pth``) and reuses that file afterwards.
``tools/train_torchvision_teacher.py`` runs the same training with other settings.
"""

import io
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ...checkpoint import atomic_write_bytes, register_weights_scheme
from ...data.datasets import synthetic_root
from .torchvision_models import build_torchvision_detector

__all__ = [
    "TeacherRecipe",
    "train_torchvision_teacher",
    "save_torchvision_teacher",
    "ensure_synthetic_teacher",
    "SYNTHETIC_TEACHER_SCHEME",
]

logger = logging.getLogger(__name__)

SYNTHETIC_TEACHER_SCHEME = "synthetic-teacher://"
#: bump when the first-use recipe changes: a file of another version is not reused
RECIPE_VERSION = 1


@dataclass(frozen=True)
class TeacherRecipe:
    """How :func:`train_torchvision_teacher` trains (the first-use defaults: a few CPU minutes)."""

    iterations: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 10
    clip_norm: float = 5.0
    seed: int = 0


def _image(path: str) -> torch.Tensor:
    """An image file as torchvision takes it: RGB, (3, H, W) float in [0, 1]."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _target(record: Dict) -> Dict[str, torch.Tensor]:
    """A Detectron2 dataset record's objects as a torchvision target: boxes (R, 4) XYXY,
    labels (R,) = Detectron2 class + 1 (torchvision's label 0 is the background)."""
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in record["annotations"])]
    labels = [a["category_id"] + 1 for a in record["annotations"]]
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def train_torchvision_teacher(
    name: str,
    dataset: str = "kd_synthetic_train",
    recipe: TeacherRecipe = TeacherRecipe(),
    builder_kwargs: Dict = None,
) -> Dict:
    """
    Train kd_det's (or torchvision's) detector ``name`` from scratch on the registered
    Detectron2 dataset ``dataset`` (XYWH boxes, contiguous class ids, ``thing_classes``), on
    the CPU, with AdamW, linear warm-up and random horizontal flips.

    Returns:
        ``{"model": state_dict, "categories": ["__background__", *thing_classes]}``, what
        ``KD.TEACHER.WEIGHTS`` of a ``torchvision://NAME`` teacher reads.
    """
    records = [r for r in DatasetCatalog.get(dataset) if r.get("annotations")]
    classes = list(MetadataCatalog.get(dataset).thing_classes)
    categories = ["__background__"] + classes
    torch.manual_seed(recipe.seed)
    rng = np.random.RandomState(recipe.seed)
    model = build_torchvision_detector(name, len(categories), **(builder_kwargs or {}))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    start = time.perf_counter()
    for it in range(recipe.iterations):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * min(1.0, (it + 1) / max(recipe.warmup, 1))
        images, targets = [], []
        for i in rng.choice(len(records), recipe.batch_size, replace=False):
            image, target = _image(records[i]["file_name"]), _target(records[i])
            if rng.rand() < 0.5:
                width = image.shape[-1]
                image = image.flip(-1)
                target["boxes"] = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor(
                    [-1.0, 1.0, -1.0, 1.0]
                ) + torch.tensor([width, 0.0, width, 0.0])
            images.append(image)
            targets.append(target)
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                "training torchvision teacher {} diverged at iteration {}: {}".format(
                    name, it, {k: float(v) for k, v in losses.items()}
                )
            )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.clip_norm)
        optimizer.step()
        if it % 20 == 0 or it == recipe.iterations - 1:
            logger.info(
                "torchvision teacher %s: iter %d/%d loss %.3f (%.1f s)",
                name,
                it + 1,
                recipe.iterations,
                float(loss),
                time.perf_counter() - start,
            )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"model": state, "categories": categories}


def save_torchvision_teacher(checkpoint: Dict, path: str) -> str:
    """Write ``checkpoint`` to ``path`` atomically (a torch file plain tensors and strings)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))
    return path


def synthetic_teacher_path(name: str) -> str:
    return os.path.join(synthetic_root(), "teachers", "{}-v{}.pth".format(name, RECIPE_VERSION))


def ensure_synthetic_teacher(url: str) -> str:
    """
    The local file of ``synthetic-teacher://NAME``: trained on ``kd_synthetic_train`` with
    the default :class:`TeacherRecipe` on first use (a few CPU minutes), then reused.
    """
    name = url[len(SYNTHETIC_TEACHER_SCHEME) :] if "://" in url else url
    path = synthetic_teacher_path(name)
    if os.path.isfile(path):
        return path
    logger.info(
        "training the synthetic torchvision teacher %s on kd_synthetic_train (first use; "
        "saved to %s)",
        name,
        path,
    )
    return save_torchvision_teacher(train_torchvision_teacher(name), path)


register_weights_scheme("synthetic-teacher", ensure_synthetic_teacher)
