"""
A training set that is empty, or that ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` empties, named with
its annotation file and the two likely fixes (Detectron2 says only ``AssertionError: No valid
data found in <names>``).
"""

import contextlib
import re
from typing import Iterator, Sequence

from .sources import dataset_source

__all__ = ["EmptyDatasetError", "empty_dataset_message", "empty_dataset_errors"]

# the assertions of detectron2.data.build.get_detection_dataset_dicts
_NO_VALID_DATA = re.compile(r"No valid data found in (.*)\.$")
_EMPTY = re.compile(r"Dataset '(.*)' is empty!$")


class EmptyDatasetError(ValueError):
    """A training set with no image to train on."""


def _named(name: str) -> str:
    source = dataset_source(name)
    return "dataset {!r}{}".format(name, " ({})".format(source) if source else "")


def empty_dataset_message(
    names: Sequence[str], filtered: bool, filter_key: str = "DATALOADER.FILTER_EMPTY_ANNOTATIONS"
) -> str:
    """
    The error for training sets ``names`` that have no images (``filtered`` False) or none left
    after dropping the images without a non-crowd annotation (``filtered`` True, as
    ``filter_key`` True asks).
    """
    what = ", ".join(_named(n) for n in names)
    wrong_file = (
        "the registration names the training split's instances file, not an image_info, "
        "captions or test file or an empty export; check the dataset path "
        "($DETECTRON2_DATASETS) and the registered json/dirname"
    )
    if not filtered:
        return "{} has no images to train on. Check that {}.".format(what, wrong_file)
    return (
        "{}: no image has a non-crowd annotation, and {} True drops images without one, so "
        "nothing is left to train on. Either the file is the wrong one (check that {}), or the "
        "images are meant to have no objects (set {} False).".format(
            what, filter_key, wrong_file, filter_key
        )
    )


@contextlib.contextmanager
def empty_dataset_errors(
    filter_key: str = "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
) -> Iterator[None]:
    """
    Around building a training loader: Detectron2's empty-dataset assertions become an
    :class:`EmptyDatasetError` from :func:`empty_dataset_message`.
    """
    try:
        yield
    except AssertionError as e:
        message = str(e)
        empty, no_valid = _EMPTY.match(message), _NO_VALID_DATA.match(message)
        if empty:
            raise EmptyDatasetError(empty_dataset_message([empty.group(1)], False)) from e
        if no_valid:
            names = no_valid.group(1).split(",")
            raise EmptyDatasetError(empty_dataset_message(names, True, filter_key)) from e
        raise
