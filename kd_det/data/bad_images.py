"""
Training-time handling of dataset items that cannot be loaded or mapped: the error names the file
and its dataset (a data-loader worker's traceback names neither), and with
``DATALOADER.SKIP_BAD_IMAGES`` the item is replaced by another training item, with a warning, and
counted in metrics.json. The replacement is drawn here, not by returning None to Detectron2's
MapDataset: v0.6's fallback calls ``random.sample`` on a set, a TypeError since Python 3.11.

The count travels back from the loader's worker processes on the data itself: the next item a
worker returns carries the number of items it skipped before it (:data:`SKIPPED_KEY`), and
:class:`SkippedItemsHook` pops it from the model's inputs in the training process. That works
with any loader (Detectron2's, a resumable one), any number of workers and any start method,
with no shared state; Detectron2's models read only the keys they know.
"""

import logging
import os
import random
import struct
from typing import Callable, Dict, List, Optional, Sequence

from detectron2.data import get_detection_dataset_dicts
from detectron2.engine import HookBase
from detectron2.utils import comm
from PIL import Image

from .sources import dataset_source, image_dirs

__all__ = ["SKIPPED_KEY", "BadImageError", "BadImageMapper", "SkippedItemsHook"]

logger = logging.getLogger(__name__)

SKIPPED_KEY = "_kd_det_skipped_items"
# what a missing, truncated, corrupt or mis-sized image raises in read_image and the mapper:
# OSError (PIL's "image file is truncated", UnidentifiedImageError, FileNotFoundError),
# SyntaxError and EOFError (PIL's broken PNG/GIF/TIFF), ValueError (SizeMismatchError),
# DecompressionBombError. Other errors (KeyError, TypeError, ...) are bugs of code or config:
# they stop training even with SKIP_BAD_IMAGES, naming the item.
BAD_IMAGE_ERRORS = (
    OSError,
    SyntaxError,
    EOFError,
    ValueError,
    struct.error,
    Image.DecompressionBombError,
)


class BadImageError(RuntimeError):
    """A dataset item that could not be loaded or mapped; the message names file and dataset."""


class BadImageMapper:
    """
    ``mapper`` (e.g. Detectron2's DatasetMapper), whose errors name the item's file and dataset;
    with ``skip``, an item failing with one of :data:`BAD_IMAGE_ERRORS` is skipped with a
    warning and counted, and another training item is mapped in its place: one drawn uniformly
    from the items this worker mapped so far (a reservoir sample), or, before there are any,
    from the training records (``get_detection_dataset_dicts(dataset_names, filter_empty)``,
    loaded in the worker only then).
    """

    def __init__(
        self,
        mapper: Callable[[Dict], Optional[Dict]],
        dataset_names: Sequence[str] = (),
        skip: bool = False,
        max_consecutive: int = 100,
        skip_key: str = "DATALOADER.SKIP_BAD_IMAGES",
        filter_empty: bool = True,
        reservoir_size: int = 64,
    ):
        """
        Args:
            dataset_names: the training sets, to name an item's dataset.
            max_consecutive: with ``skip``, this many failures in a row stop training: that is
                a wrong image root or a broken mapper, not a few bad files.
            skip_key: the setting named in messages (a LazyConfig's ``train.skip_bad_images``).
            filter_empty: as the loader's records (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``).
            reservoir_size: mapped items remembered as replacements.
        """
        self.mapper = mapper
        self.dataset_names = tuple(dataset_names)
        self.skip = skip
        self.max_consecutive = max_consecutive
        self.skip_key = skip_key
        self.filter_empty = filter_empty
        self.reservoir_size = reservoir_size
        # resolved now, in the training process, where the catalogs are complete
        self._dirs = image_dirs(self.dataset_names)
        self._sources = {n: dataset_source(n) for n in self.dataset_names}
        # per worker process (each has its own copy): skipped, not yet reported; failures in a row
        self._pending = 0
        self._consecutive = 0
        self._reservoir: List[Dict] = []
        self._seen = 0

    def describe(self, dataset_dict: Dict) -> str:
        """'image <file> of dataset <name> (<annotation file>)', as far as known."""
        file_name = dataset_dict.get("file_name", "<no file_name>")
        path = os.path.abspath(file_name) if "file_name" in dataset_dict else ""
        name = next((n for d, n in self._dirs if path.startswith(d + os.sep)), None)
        if name is None and len(self.dataset_names) == 1:
            name = self.dataset_names[0]
        if name is None:
            where = "one of the datasets {}".format(list(self.dataset_names))
        else:
            source = self._sources.get(name)
            where = "dataset {!r}{}".format(name, " ({})".format(source) if source else "")
        return "image {} (image_id {}) of {}".format(
            file_name, dataset_dict.get("image_id", "?"), where
        )

    def _remember(self, dataset_dict: Dict) -> None:
        # reservoir sampling: every item mapped so far is equally likely to be in it
        self._seen += 1
        if len(self._reservoir) < self.reservoir_size:
            self._reservoir.append(dataset_dict)
        else:
            k = random.randrange(self._seen)
            if k < self.reservoir_size:
                self._reservoir[k] = dataset_dict

    def _replacement(self) -> Dict:
        if not self._reservoir:  # a worker's first item was bad: draw from all the records
            records = get_detection_dataset_dicts(
                list(self.dataset_names), filter_empty=self.filter_empty, check_consistency=False
            )
            return records[random.randrange(len(records))]
        return self._reservoir[random.randrange(len(self._reservoir))]

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        item = dataset_dict
        while True:
            try:
                data = self.mapper(item)
                break
            except Exception as e:
                self._skip_or_raise(item, e)
            item = self._replacement()
        self._consecutive = 0
        self._remember(item)
        if data is not None and self._pending and isinstance(data, dict):
            data[SKIPPED_KEY] = self._pending
            self._pending = 0
        return data

    def _skip_or_raise(self, dataset_dict: Dict, e: Exception) -> None:
        item = self.describe(dataset_dict)
        error = "{}: {}".format(type(e).__name__, e)
        if not (self.skip and isinstance(e, BAD_IMAGE_ERRORS)):
            raise BadImageError(
                "cannot load or map {}: {}. Replace or remove the file (tools/train_net.py "
                "with DATASETS.VALIDATE full finds every such file before training){}".format(
                    item,
                    error,
                    (
                        ", or set {} True to skip such images.".format(self.skip_key)
                        if isinstance(e, BAD_IMAGE_ERRORS)
                        else "."
                    ),
                )
            ) from e
        self._consecutive += 1
        if self._consecutive >= self.max_consecutive:
            raise BadImageError(
                "{} dataset items in a row failed (the last: {}: {}): not a few bad images "
                "but a wrong image root or a broken mapper. Check the dataset path and the "
                "mapper.".format(self._consecutive, item, error)
            ) from e
        self._pending += 1
        logger.warning("Skipping {} ({}): {}".format(item, self.skip_key, error))


class SkippedItemsHook(HookBase):
    """
    Counts the items :class:`BadImageMapper` skipped, all processes together, as the scalar
    ``data/skipped_items`` (metrics.json) every ``period`` iterations and at the last one.
    Register it before the writers (PeriodicWriter), so that its value is in their line.
    """

    def __init__(self, period: int = 20):
        self._period = period
        self._local = 0  # this process's count
        self._handle = None

    def _pop(self, module, inputs):
        # a forward pre-hook: inputs[0] is the batch, a list of dataset dicts
        batch = inputs[0] if inputs else None
        if isinstance(batch, list):
            for item in batch:
                if isinstance(item, dict):
                    self._local += item.pop(SKIPPED_KEY, 0)

    def before_train(self):
        self._handle = self.trainer.model.register_forward_pre_hook(self._pop)

    def after_train(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter % self._period and next_iter != self.trainer.max_iter:
            return
        counts: List[int] = (
            comm.all_gather(self._local) if comm.get_world_size() > 1 else [self._local]
        )
        self.trainer.storage.put_scalar("data/skipped_items", sum(counts), smoothing_hint=False)
