#!/usr/bin/env bash
# Wheels for the lent GPU machine, built here (it has no package registry).
#
#   bash benchmarks/gpu/prepare_wheels.sh [DEST]        # default DEST: .whl (git-ignored)
#
# That machine's image has Python 3.12 with torch, torchvision, numpy, Pillow, matplotlib,
# opencv, tabulate, cloudpickle, portalocker, tensorboard, pytest and Triton; this adds
# what kd_det and the benchmarks need besides: the patched pure-Python Detectron2, its
# pure-Python dependencies, pycocotools (a cp312 binary wheel) and the benchmark extras
# (pytorch-msssim, kornia).  Then carry DEST to the machine: run(carry=[".whl"], ...)
# with benchmarks/gpu/run_suite.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
PY=${PY:-.venv/bin/python}
mkdir -p "$DEST"
"$PY" tools/install_detectron2.py --wheel-dir "$DEST"
# pure Python (some only exist as sdists: built here into py3-none-any wheels)
# (versions: those `make install` resolves on the CI machine, 2026-11)
"$PY" -m pip wheel -q --no-deps -w "$DEST" "fvcore==0.1.5.post20221221" "iopath==0.1.9" "yacs==0.1.8" \
    "termcolor==3.3.0" "omegaconf==2.3.1" "hydra-core==1.3.8" "antlr4-python3-runtime==4.9.3" \
    "pytorch-msssim==1.0.0" "kornia==0.9.0"
# binary wheels for the GPU machine's Python (PYVER=3.11 to try the suite on this machine)
"$PY" -m pip download -q --no-deps -d "$DEST" --only-binary=:all: --python-version "${PYVER:-3.12}" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    "pycocotools==2.0.11" "kornia_rs==0.2.0"
ls -l "$DEST"
