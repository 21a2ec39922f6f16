#!/usr/bin/env python
"""kd_det: knowledge distillation of object detectors on Detectron2.

Detectron2 itself is not on PyPI: install it first with ``tools/install_detectron2.py``
(the README's ``make`` targets do this).
"""

from setuptools import find_packages, setup

setup(
    name="kd_det",
    version="0.1.0",
    description="Knowledge distillation of object detectors (SSIM, RM, PFI, ...) on Detectron2",
    packages=find_packages(exclude=("tests", "tests.*")),
    python_requires=">=3.9",
    install_requires=[
        "torch>=1.10",
        "torchvision",
        "fvcore",
        "pycocotools>=2.0.2",
        "numpy",
        "Pillow",
    ],
    extras_require={
        # onnx and onnxruntime: export_student --onnx writes the file and checks it
        "onnx": ["onnx", "onnxruntime"],
        # pytest-xdist: `make test` runs the tests in two processes, a fifth less time on 2 cores
        "test": ["pytest", "pytest-xdist", "pytorch-msssim==1.0.0", "onnx", "onnxruntime"],
        "bench": ["pytorch-msssim==1.0.0", "kornia"],
        # `make lint` / `make format` (setup.cfg, pyproject.toml): Detectron2's formatters, pinned
        # because each release formats a little differently
        "lint": ["black==26.10.1", "isort==9.0.2", "flake8==7.5.0"],
    },
)
