"""DATASETS.VALIDATE full decodes every image: truncated, empty and mis-sized files are named before
training; the check runs in parallel and is cached."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from kd_det.data import DatasetError, image_check, validate_coco_json, validate_voc_dataset


def _noise_jpeg(path, size=(40, 30), seed=0):
    """A JPEG whose body is most of the file (noise compresses badly), so a cut hits the body."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _coco(tmp_path, sizes=((40, 30), (40, 30))):
    """A COCO json and its image folder: one box per image, inside every size used here."""
    root = tmp_path / "images"
    root.mkdir()
    images, annotations = [], []
    for i, (w, h) in enumerate(sizes, 1):
        _noise_jpeg(root / "im{}.jpg".format(i), (w, h), seed=i)
        images.append({"id": i, "file_name": "im{}.jpg".format(i), "width": w, "height": h})
        annotations.append(
            {"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [2, 3, 10, 12], "iscrowd": 0}
        )
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
    return data, root


def _validate(tmp_path, data, root, **kwargs):
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(data))
    kwargs.setdefault("cache_file", str(tmp_path / "cache.json"))
    return validate_coco_json(str(json_file), str(root), **kwargs), str(json_file)


def _truncate(path, fraction=0.6):
    """Cut ``path`` inside its entropy-coded data (a tiny JPEG's header is a large share)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_truncated_jpeg_is_named_though_its_header_reads(tmp_path):
    data, root = _coco(tmp_path)
    _truncate(root / "im2.jpg")
    with Image.open(root / "im2.jpg") as im:  # what the old header-only check read: it passes
        assert im.size == (40, 30)
    with pytest.raises(
        DatasetError,
        match=r"image id 2: .*im2.jpg cannot be read \(OSError: image file is truncated",
    ) as e:
        _validate(tmp_path, data, root)
    assert str(e.value).startswith(str(tmp_path / "instances.json"))
    assert "Replace the unreadable files" in str(e.value)


def test_truncation_is_found_even_where_pil_is_told_to_pad_truncated_images(tmp_path, monkeypatch):
    data, root = _coco(tmp_path)
    _truncate(root / "im1.jpg")
    monkeypatch.setattr("PIL.ImageFile.LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DatasetError, match=r"im1.jpg cannot be read .*truncated"):
        _validate(tmp_path, data, root)
    assert image_check.ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_zero_byte_file_is_named(tmp_path):
    data, root = _coco(tmp_path)
    (root / "im1.jpg").write_bytes(b"")
    with pytest.raises(
        DatasetError,
        match=r"image id 1: .*im1.jpg cannot be read \(the file is " r"empty \(0 bytes\)\)",
    ):
        _validate(tmp_path, data, root)


def test_every_bad_image_is_listed_in_one_error(tmp_path):
    data, root = _coco(tmp_path, sizes=((40, 30),) * 4)
    _truncate(root / "im1.jpg")
    (root / "im3.jpg").write_bytes(b"")
    (root / "im4.jpg").unlink()
    with pytest.raises(DatasetError, match=r"instances.json: 3 of 4 images cannot be used") as e:
        _validate(tmp_path, data, root)
    message = str(e.value)
    assert "im1.jpg cannot be read" in message and "im3.jpg cannot be read" in message
    assert "im4.jpg not found" in message and "im2.jpg" not in message
    assert "Check the image root" in message and "Replace the unreadable files" in message


def test_png_named_jpg_decodes_with_a_warning(tmp_path, caplog):
    data, root = _coco(tmp_path)
    Image.new("RGB", (40, 30), (9, 9, 9)).save(root / "im2.jpg", format="PNG")
    with caplog.at_level(logging.WARNING, logger="kd_det"):
        stats, _ = _validate(tmp_path, data, root)
    assert stats["images"] == 2
    assert any(
        "im2.jpg is a PNG file named .jpg" in r.getMessage() and r.levelno == logging.WARNING
        for r in caplog.records
    ), caplog.text


def test_swapped_width_height_is_a_size_mismatch(tmp_path):
    # the box fits both ways: only the decoded size shows the record is wrong
    data, root = _coco(tmp_path)
    data["images"][0].update(width=30, height=40)
    with pytest.raises(
        DatasetError,
        match=r"image id 1: the json says 30x40 \(width x height\) " r"but .*im1.jpg is 40x30",
    ) as e:
        _validate(tmp_path, data, root)
    assert "Correct the records' width/height" in str(e.value)


def test_box_outside_a_swapped_image_names_the_size_mismatch(tmp_path):
    """The issue's case: the swapped size puts a box outside; the cause is named, not the box."""
    data, root = _coco(tmp_path, sizes=((64, 40), (40, 30)))
    data["annotations"][0]["bbox"] = [30, 5, 30, 10]  # inside 64x40, outside 40x64
    data["images"][0].update(width=40, height=64)
    with pytest.raises(
        DatasetError,
        match=r"image id 1: the json says 40x64 \(width x height\) "
        r"but .*im1.jpg is 64x40, so its boxes fall outside the image",
    ):
        _validate(tmp_path, data, root)
    # without the image check, the box is what can be named
    with pytest.raises(DatasetError, match=r"annotation id 11 .*outside the 40x64 image"):
        _validate(tmp_path, data, root, check_images=False)


def test_exif_rotation_is_applied_before_comparing(tmp_path):
    data, root = _coco(tmp_path, sizes=((40, 30), (40, 30)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: Detectron2's read_image yields 30x40
    Image.new("RGB", (40, 30)).save(root / "im2.jpg", exif=exif)
    with pytest.raises(
        DatasetError,
        match=r"image id 2: the json says 40x30 .* is 30x40 after " r"its EXIF orientation",
    ):
        _validate(tmp_path, data, root)
    data["images"][1].update(width=30, height=40)
    _validate(tmp_path, data, root)


def test_cache_skips_unchanged_files_and_rechecks_a_changed_one(tmp_path, monkeypatch):
    data, root = _coco(tmp_path, sizes=((40, 30),) * 3)
    decoded = []
    real = image_check.check_image

    def counting(path):
        decoded.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(image_check, "check_image", counting)
    _validate(tmp_path, data, root)
    assert sorted(decoded) == ["im1.jpg", "im2.jpg", "im3.jpg"]
    decoded.clear()
    _validate(tmp_path, data, root)
    assert decoded == []  # unchanged: nothing decoded
    _truncate(root / "im2.jpg")  # changed size and mtime
    with pytest.raises(DatasetError, match=r"im2.jpg cannot be read"):
        _validate(tmp_path, data, root)
    assert decoded == ["im2.jpg"]
    decoded.clear()
    with pytest.raises(DatasetError, match=r"im2.jpg cannot be read"):  # bad files: not cached
        _validate(tmp_path, data, root)
    assert decoded == ["im2.jpg"]
    # a file replaced with the same size gets a new mtime: re-checked
    decoded.clear()
    _noise_jpeg(root / "im2.jpg", seed=2)
    os.utime(root / "im2.jpg", ns=(1, 1))
    _validate(tmp_path, data, root)
    assert decoded == ["im2.jpg"]


def test_an_unwritable_or_corrupt_cache_is_only_a_warning(tmp_path, caplog):
    data, root = _coco(tmp_path)
    cache = tmp_path / "cache.json"
    cache.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="kd_det"):
        _validate(tmp_path, data, root, cache_file=str(cache))
    assert "Ignoring the image check cache" in caplog.text
    assert json.loads(cache.read_text())["version"] == image_check.CACHE_VERSION
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING, logger="kd_det"):
        _validate(tmp_path, data, root, cache_file=str(blocked / "cache.json"))
    assert "Could not write the image check cache" in caplog.text


def test_parallel_check_names_the_bad_file(tmp_path, monkeypatch):
    monkeypatch.setattr(image_check, "_MIN_FILES_FOR_POOL", 2)  # a pool for 4 files
    data, root = _coco(tmp_path, sizes=((40, 30),) * 4)
    _truncate(root / "im3.jpg")
    with pytest.raises(DatasetError, match=r"image id 3: .*im3.jpg cannot be read .*truncated"):
        _validate(tmp_path, data, root, processes=2)
    results = image_check.check_images(
        [str(root / "im{}.jpg".format(i)) for i in (1, 2, 4)], "", processes=2
    )
    assert all(r.error is None and r.size == (40, 30) for r in results.values())


def test_voc_images_are_decoded_too(tmp_path):
    root = tmp_path / "VOC"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for image_id in ("a1", "a2"):
        _noise_jpeg(root / "JPEGImages" / (image_id + ".jpg"))
        (root / "Annotations" / (image_id + ".xml")).write_text(
            "<annotation><size><width>40</width><height>30</height></size><object><name>cat"
            "</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
            "</object></annotation>"
        )
    (root / "ImageSets/Main/train.txt").write_text("a1\na2\n")
    cache = str(tmp_path / "cache.json")
    assert validate_voc_dataset(str(root), "train", ["cat"], cache_file=cache)["images"] == 2
    _truncate(root / "JPEGImages" / "a2.jpg")
    with pytest.raises(DatasetError, match=r"a2.xml: .*a2.jpg cannot be read .*truncated"):
        validate_voc_dataset(str(root), "train", ["cat"], cache_file=cache)


def test_progress_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    bar = image_check._progress(3, "decoding", None)
    assert type(bar).__name__ == "tqdm"
    bar.close()
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert type(image_check._progress(3, "decoding", None)).__name__ == "_NoBar"
