"""Every shipped config merges into a kd_det config and names a registered meta-architecture."""

import glob
import os

import pytest
from conftest import REPO

from detectron2.modeling import META_ARCH_REGISTRY

from kd_det import get_kd_cfg

CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"),
                                                               recursive=True))


def test_configs_found():
    assert len(CONFIGS) > 30


@pytest.mark.parametrize("path", CONFIGS)
def test_config_merges(path):
    cfg = get_kd_cfg()
    cfg.merge_from_file(os.path.join(REPO, path))  # unknown keys or bad values raise here
    META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    if cfg.KD.TEACHER.CONFIG:
        assert os.path.isfile(os.path.join(REPO, cfg.KD.TEACHER.CONFIG)), cfg.KD.TEACHER.CONFIG
    for teacher in cfg.KD.MULTI_TEACHER.CONFIGS:
        assert os.path.isfile(os.path.join(REPO, teacher)), teacher
