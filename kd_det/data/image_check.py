"""
Every image file decoded completely before training, in parallel and cached, so that a truncated
or corrupt file is named before training starts (a header read passes it; training then fails
inside a data-loader worker, hours in).
"""

import json
import logging
import multiprocessing
import os
import sys
import time
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

from PIL import Image, ImageFile

from ..checkpoint.atomic import atomic_write_bytes

__all__ = [
    "ImageCheck",
    "check_image",
    "check_images",
    "default_cache_file",
    "image_size",
    "ImageCheckCache",
]

logger = logging.getLogger(__name__)

# EXIF orientations that swap width and height (Detectron2's read_image applies them)
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
# the file name extensions each PIL format is expected under; others get a warning
_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "PNG": (".png",),
    "BMP": (".bmp",),
    "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
    "MPO": (".jpg", ".jpeg", ".mpo"),  # a JPEG with extra frames (phone cameras)
}
# bump when the check changes: cached results of an older check are not trusted
CACHE_VERSION = 1
# below this many files a process pool costs more than it saves
_MIN_FILES_FOR_POOL = 64
# how often a long check saves its cache
_SAVE_EVERY_S = 60.0


class ImageCheck(NamedTuple):
    """The result of decoding one image file (picklable: it returns from pool workers)."""

    path: str
    # (width, height) after EXIF orientation, as Detectron2's read_image yields it; None on error
    size: Optional[Tuple[int, int]]
    # PIL's format name ("JPEG", "PNG", ...); None on error
    format: Optional[str]
    # "<ExceptionType>: <message>" when the file cannot be opened or decoded, else None
    error: Optional[str]
    # whether the EXIF orientation swapped width and height
    transposed: bool = False

    @property
    def warning(self) -> Optional[str]:
        """A problem that does not stop Detectron2 (it reads by content), or None."""
        if self.format is None:
            return None
        extensions = _EXTENSIONS.get(self.format)
        ext = os.path.splitext(self.path)[1].lower()
        if extensions is None or ext in extensions:
            return None
        return (
            "{} is a {} file named {}: it decodes (Detectron2 reads by content), but other "
            "tools may not; rename or convert it".format(self.path, self.format, ext)
        )


def _orientation(im) -> Optional[int]:
    try:
        return im.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # as Detectron2's _apply_exif_orientation: unreadable EXIF is ignored
        return None


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) of ``path`` after EXIF orientation, from its header only."""
    with Image.open(path) as im:
        size = im.size
        return size[::-1] if _orientation(im) in TRANSPOSING_ORIENTATIONS else size


def check_image(path: str) -> ImageCheck:
    """
    Decode ``path`` completely, as Detectron2's read_image would, and report what it finds.

    A JPEG is decoded at 1/8 scale (PIL's ``draft``, libjpeg's DCT scaling): every byte of its
    entropy-coded data is still read and decoded, so truncation and corrupt data fail as in a
    full decode, at about half the cost. Truncated files are errors whatever
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` says (they are bad data even where PIL would pad them).
    """
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        if os.path.getsize(path) == 0:
            return ImageCheck(path, None, None, "the file is empty (0 bytes)")
        with Image.open(path) as im:
            fmt, (width, height) = im.format, im.size
            transposed = _orientation(im) in TRANSPOSING_ORIENTATIONS
            if fmt == "JPEG":
                im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
    except Exception as e:  # any failure is what the data loader would hit: report, not raise
        return ImageCheck(path, None, None, "{}: {}".format(type(e).__name__, e))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    size = (height, width) if transposed else (width, height)
    return ImageCheck(path, size, fmt, None, transposed)


def default_cache_file() -> str:
    """``$KD_DET_CACHE/image_check.json``; without it, under ``$XDG_CACHE_HOME`` or ~/.cache."""
    root = os.environ.get("KD_DET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "kd_det",
    )
    return os.path.join(root, "image_check.json")


class ImageCheckCache:
    """
    Results of :func:`check_image` for good files, keyed by absolute path and valid while the
    file's size and modification time (ns) are unchanged. Stored as one JSON file, replaced
    atomically; a cache that cannot be read or written is a warning, never an error.
    """

    def __init__(self, path: str):
        self.path = path
        self._entries: Dict[str, list] = {}
        self._changed = False
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("version") == CACHE_VERSION:
                self._entries = data["entries"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, AttributeError) as e:
            logger.warning("Ignoring the image check cache {} ({})".format(path, e))

    def get(self, path: str, stat: os.stat_result) -> Optional[ImageCheck]:
        entry = self._entries.get(path)
        if entry is None or entry[0] != stat.st_size or entry[1] != stat.st_mtime_ns:
            return None
        _, _, width, height, fmt, transposed = entry
        return ImageCheck(path, (width, height), fmt, None, bool(transposed))

    def put(self, result: ImageCheck, stat: os.stat_result) -> None:
        if result.error is None:  # bad files are re-checked: they are few, and may be replaced
            self._entries[result.path] = [
                stat.st_size,
                stat.st_mtime_ns,
                result.size[0],
                result.size[1],
                result.format,
                int(result.transposed),
            ]
            self._changed = True

    def save(self) -> None:
        if not self._changed:
            return
        data = json.dumps({"version": CACHE_VERSION, "entries": self._entries}).encode()
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            atomic_write_bytes(self.path, lambda f: f.write(data))
        except OSError as e:
            logger.warning(
                "Could not write the image check cache {} ({}); the next run decodes every "
                "image again. Set $KD_DET_CACHE to a writable directory".format(self.path, e)
            )
        self._changed = False


def _progress(total: int, desc: str, show: Optional[bool]):
    """A tqdm bar on a terminal (or when ``show``), else a no-op with the same interface."""
    if show is None:
        show = sys.stderr.isatty()
    if show:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)

    class _NoBar:
        def update(self, n=1):
            pass

        def close(self):
            pass

    return _NoBar()


def _default_processes() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _decode_all(paths: List[str], processes: int) -> Iterator[ImageCheck]:
    """:func:`check_image` of each path, in any order, in ``processes`` processes."""
    if processes <= 1 or len(paths) < _MIN_FILES_FOR_POOL:
        yield from map(check_image, paths)
        return
    # chunks: few enough round trips, small enough that the progress bar moves
    chunk = max(1, min(64, len(paths) // (processes * 8)))
    with multiprocessing.get_context().Pool(processes) as pool:
        yield from pool.imap_unordered(check_image, paths, chunk)


def check_images(
    paths: Iterable[str],
    cache_file: Optional[str] = None,
    processes: Optional[int] = None,
    progress: Optional[bool] = None,
    desc: str = "checking images",
) -> Dict[str, ImageCheck]:
    """
    :func:`check_image` every file of ``paths``, in ``processes`` worker processes (default:
    the cores available), skipping files whose result is cached unchanged.

    Args:
        paths: image files; missing ones get the error "file not found".
        cache_file: the cache (:class:`ImageCheckCache`); None: :func:`default_cache_file`;
            "": no cache.
        progress: show a progress bar; None: when stderr is a terminal.
        desc: the progress bar's label.
    Returns:
        {path: ImageCheck} for every path (as given).
    """
    cache = None
    if cache_file != "":
        cache = ImageCheckCache(default_cache_file() if cache_file is None else cache_file)
    results: Dict[str, ImageCheck] = {}
    todo: List[Tuple[str, str, os.stat_result]] = []  # (path as given, absolute path, stat)
    for path in dict.fromkeys(paths):
        absolute = os.path.abspath(path)
        try:
            stat = os.stat(absolute)
        except OSError:
            results[path] = ImageCheck(path, None, None, "file not found")
            continue
        hit = cache.get(absolute, stat) if cache is not None else None
        if hit is not None:
            results[path] = hit._replace(path=path)
        else:
            todo.append((path, absolute, stat))

    if todo:
        processes = processes or _default_processes()
        if multiprocessing.current_process().daemon:
            processes = 1  # a daemonic process (e.g. a pool worker) may not start a pool
        stats = {a: st for _, a, st in todo}
        checked: Dict[str, ImageCheck] = {}
        bar = _progress(len(todo), desc, progress)
        last_save = time.monotonic()
        try:
            for result in _decode_all(list(stats), processes):
                checked[result.path] = result
                bar.update()
                if cache is not None:
                    cache.put(result, stats[result.path])
                    if time.monotonic() - last_save > _SAVE_EVERY_S:
                        cache.save()  # an interrupted check keeps what it did
                        last_save = time.monotonic()
        finally:
            bar.close()
            if cache is not None:
                cache.save()
        for path, absolute, _ in todo:
            results[path] = checked[absolute]._replace(path=path)
    return results
