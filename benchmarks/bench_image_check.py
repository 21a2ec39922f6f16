#!/usr/bin/env python
"""
DATASETS.VALIDATE full's image check (kd_det.data.image_check) on photo-like JPEGs, extrapolated
to COCO train2017 (118,287 images).

    python benchmarks/bench_image_check.py                    # 200 JPEGs, 2 processes
    python benchmarks/bench_image_check.py --num 1000 --processes 4 --json out.json

First run: ``--num`` generated 640x480-class JPEGs (quality 90, smooth structure plus noise,
~150 KB each, as COCO's) are decoded by ``check_images`` with ``--processes`` processes and no
cache; the rate is extrapolated to ``--total`` images. Also the full-resolution PIL decode for
comparison, in one process. Cached run: ``--total`` hard links to those files, already in the
cache, checked again (a stat and a cache lookup each, plus loading and saving the cache file).
Targets (issue 37): first run <= 300 s on 2 cores, cached run <= 15 s.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

from kd_det.data.image_check import ImageCheckCache, check_image, check_images

COCO_TRAIN2017 = 118287
SIZES = [(640, 480), (480, 640), (640, 427), (427, 640), (640, 512), (500, 375)]


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An HxWx3 uint8 image that compresses like a photo: smooth waves plus sensor-like noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(6):
            fx, fy = rng.uniform(0.002, 0.05, 2)
            img[..., c] += np.sin(x * fx + y * fy + rng.uniform(0, 6.28)) * rng.uniform(20, 60)
    img += rng.normal(0, 18, img.shape)
    return np.clip(img + 128, 0, 255).astype(np.uint8)


def make_images(directory: str, num: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num):
        width, height = SIZES[i % len(SIZES)]
        path = os.path.join(directory, "{:012d}.jpg".format(i))
        Image.fromarray(photo_like(rng, width, height)).save(path, quality=90)
        paths.append(path)
    return paths


def full_decode(path: str):
    with Image.open(path) as im:
        im.load()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=200, help="distinct JPEGs to generate")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--total", type=int, default=COCO_TRAIN2017, help="images to project to")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="kd_bench_image_check_")
    images = os.path.join(workdir, "images")
    shutil.rmtree(images, ignore_errors=True)
    os.makedirs(images)
    paths = make_images(images, args.num)
    mean_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
    cache_file = os.path.join(workdir, "cache.json")
    if os.path.exists(cache_file):
        os.remove(cache_file)

    start = time.perf_counter()
    results = check_images(paths, cache_file, processes=args.processes, progress=False)
    first_s = time.perf_counter() - start
    assert all(r.error is None for r in results.values())
    rate = len(paths) / first_s

    start = time.perf_counter()
    for p in paths[:50]:
        full_decode(p)
    full_ms = (time.perf_counter() - start) / min(50, len(paths)) * 1000
    start = time.perf_counter()
    for p in paths[:50]:
        check_image(p)
    check_ms = (time.perf_counter() - start) / min(50, len(paths)) * 1000

    # the cached run over --total files: hard links to the generated ones, each in the cache
    links = os.path.join(workdir, "links")
    shutil.rmtree(links, ignore_errors=True)
    os.makedirs(links)
    cache = ImageCheckCache(cache_file)
    link_paths = []
    for i in range(args.total):
        source = paths[i % len(paths)]
        link = os.path.join(links, "{:012d}.jpg".format(i))
        os.link(source, link)
        cache.put(results[source]._replace(path=link), os.stat(link))
        link_paths.append(link)
    cache.save()
    start = time.perf_counter()
    cached = check_images(link_paths, cache_file, processes=args.processes, progress=False)
    cached_s = time.perf_counter() - start
    assert len(cached) == args.total and all(r.error is None for r in cached.values())

    numbers = {
        "images": len(paths),
        "mean_file_kb": round(mean_kb, 1),
        "processes": args.processes,
        "first_run_s": round(first_s, 3),
        "images_per_s": round(rate, 1),
        "check_ms_per_image_1proc": round(check_ms, 3),
        "full_decode_ms_per_image_1proc": round(full_ms, 3),
        "projected_total": args.total,
        "projected_first_run_s": round(args.total / rate, 1),
        "cached_run_s": round(cached_s, 2),
        "cache_file_mb": round(os.path.getsize(cache_file) / 2**20, 1),
    }
    for k, v in numbers.items():
        print("{:32s} {}".format(k, v))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return numbers


if __name__ == "__main__":
    main()
