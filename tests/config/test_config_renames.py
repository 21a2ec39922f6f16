"""
Old config key names (before the KD node was split) keep loading through
kd_det/config/renames.py: each warns once, naming its new key, and gives the config the new
key gives; unknown keys still fail with yacs' error; the shipped configs use the new names.
"""

import glob
import os
import warnings

import pytest
import yaml
from conftest import REPO, config_path

from kd_det import get_kd_cfg, merge_kd_config
from kd_det.config import renames
from kd_det.config.renames import RENAMED_KEYS, TRANSLATED_VALUES, rename_opts

# (old KEY VALUE list, the same with the new keys): every entry of the rename map
CASES = {
    "trainer": (["KD.TRAINER", "MyTrainer"], ["TRAINER.NAME", "MyTrainer"]),
    "curriculum": (
        [
            "KD.CURRICULUM.ENABLED",
            True,
            "KD.CURRICULUM.SCORES",
            "s.json",
            "KD.CURRICULUM.PHASE_ITERS",
            [2, 4],
            "KD.CURRICULUM.PHASE_FRACTIONS",
            [0.5, 0.75],
        ],
        [
            "TRAINER.CURRICULUM.ENABLED",
            True,
            "TRAINER.CURRICULUM.SCORES",
            "s.json",
            "TRAINER.CURRICULUM.PHASE_ITERS",
            [2, 4],
            "TRAINER.CURRICULUM.PHASE_FRACTIONS",
            [0.5, 0.75],
        ],
    ),
    "self_temperature": (["KD.SELF.TEMPERATURE", 2.0], ["KD.SELF.SOFT_LABEL.TEMPERATURE", 2.0]),
    "self_weight_off": (["KD.SELF.SOFT_LABEL_WEIGHT", 0.0], ["KD.SELF.SOFT_LABEL.ENABLED", False]),
    "self_weight": (
        ["KD.SELF.SOFT_LABEL_WEIGHT", 2.0],
        ["KD.SELF.SOFT_LABEL.ENABLED", True, "KD.SELF.SOFT_LABEL.WEIGHT", 2.0],
    ),
    "feature_off": (["KD.FEATURE.LOSS", ""], ["KD.FEATURE.ENABLED", False]),
}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the warnings of a fresh process (they come once per key and process)."""
    monkeypatch.setattr(renames, "_WARNED", set())


def _renames_warned(record):
    return [str(w.message) for w in record if "kd_det config key" in str(w.message)]


def _merge(config_file=None, opts=()):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cfg = merge_kd_config(get_kd_cfg(), config_file, opts)
    return cfg, _renames_warned(record)


def _nested(pairs):
    """A KEY VALUE list as the nested dict of a yaml file."""
    out = {}
    for key, value in zip(pairs[0::2], pairs[1::2]):
        *parents, leaf = key.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    return out


def test_the_cases_cover_the_rename_map():
    olds = {k for old, _ in CASES.values() for k in old[0::2]}
    for old in list(RENAMED_KEYS) + list(TRANSLATED_VALUES):
        assert any(k == old or k.startswith(old + ".") for k in olds), old


@pytest.mark.parametrize("case", sorted(CASES))
def test_old_keys_on_the_command_line(case):
    old, new = CASES[case]
    cfg_old, warned = _merge(opts=[str(v) if not isinstance(v, str) else v for v in old])
    cfg_new, none = _merge(opts=new)
    assert cfg_old == cfg_new and not none
    assert len(warned) == 1, warned
    assert "is now" in warned[0] and "the command line" in warned[0]
    # once per key and process
    assert _merge(opts=[str(v) if not isinstance(v, str) else v for v in old])[1] == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_old_keys_in_a_config_file_with_base(case, tmp_path):
    old, new = CASES[case]
    # (an old LOSS "" leaves LOSS at its default, SSIMFeatureLoss: that of this base)
    base = config_path("synthetic/distill/ssim_retinanet_R50_to_R18.yaml")
    for name, pairs in (("old", old), ("new", new)):
        d = _nested(pairs)
        d["_BASE_"] = base
        (tmp_path / (name + ".yaml")).write_text(yaml.safe_dump(d))
    cfg_old, warned = _merge(str(tmp_path / "old.yaml"))
    cfg_new, none = _merge(str(tmp_path / "new.yaml"))
    assert cfg_old == cfg_new and not none
    assert len(warned) == 1 and str(tmp_path / "old.yaml") in warned[0], warned
    new_key = new[0].rsplit(".", 1)[0] if case == "curriculum" else new[0]
    assert new_key in warned[0]


def test_old_keys_in_a_base_and_new_keys_over_them(tmp_path):
    """A file's keys override its _BASE_'s whichever names either uses."""
    (tmp_path / "base_old.yaml").write_text(
        yaml.safe_dump(
            _nested(
                [
                    "KD.SELF.SOFT_LABEL_WEIGHT",
                    0.0,
                    "KD.CURRICULUM.SCORES",
                    "a.json",
                    "KD.FEATURE.LOSS",
                    "",
                ]
            )
        )
    )
    (tmp_path / "child_new.yaml").write_text(
        yaml.safe_dump(
            dict(
                _BASE_="base_old.yaml",
                **_nested(
                    [
                        "KD.SELF.SOFT_LABEL.ENABLED",
                        True,
                        "TRAINER.CURRICULUM.SCORES",
                        "b.json",
                        "KD.FEATURE.ENABLED",
                        True,
                    ]
                )
            )
        )
    )
    cfg, warned = _merge(str(tmp_path / "child_new.yaml"))
    assert cfg.KD.SELF.SOFT_LABEL.ENABLED and cfg.TRAINER.CURRICULUM.SCORES == "b.json"
    assert cfg.KD.FEATURE.ENABLED and cfg.KD.FEATURE.LOSS == "SSIMFeatureLoss"
    assert len(warned) == 3

    (tmp_path / "base_new.yaml").write_text(
        yaml.safe_dump(
            _nested(["KD.SELF.SOFT_LABEL.ENABLED", False, "TRAINER.CURRICULUM.SCORES", "a.json"])
        )
    )
    (tmp_path / "child_old.yaml").write_text(
        yaml.safe_dump(
            dict(
                _BASE_="base_new.yaml",
                **_nested(["KD.SELF.SOFT_LABEL_WEIGHT", 3.0, "KD.CURRICULUM.SCORES", "b.json"])
            )
        )
    )
    cfg, _ = _merge(str(tmp_path / "child_old.yaml"))
    assert cfg.KD.SELF.SOFT_LABEL.ENABLED and cfg.KD.SELF.SOFT_LABEL.WEIGHT == 3.0
    assert cfg.TRAINER.CURRICULUM.SCORES == "b.json"


def _to_old_layout(d):
    """A full saved config (nested dict) as kd_det wrote it before the KD node was split."""
    trainer = d.pop("TRAINER")
    d["KD"]["TRAINER"] = trainer["NAME"]
    d["KD"]["CURRICULUM"] = trainer["CURRICULUM"]
    soft = d["KD"]["SELF"].pop("SOFT_LABEL")
    d["KD"]["SELF"]["SOFT_LABEL_WEIGHT"] = soft["WEIGHT"] if soft["ENABLED"] else 0.0
    d["KD"]["SELF"]["TEMPERATURE"] = soft["TEMPERATURE"]
    if not d["KD"]["FEATURE"].pop("ENABLED"):
        d["KD"]["FEATURE"]["LOSS"] = ""
    return d


@pytest.mark.parametrize(
    "config",
    [
        "synthetic/distill/soft_label_retinanet_R50_to_R18.yaml",
        "synthetic/distill/curriculum_ssim_faster_rcnn_R50_to_R18.yaml",
        "synthetic/distill/self_frskd_retinanet_R18.yaml",
    ],
)
def test_a_saved_config_with_old_keys_loads(config, tmp_path):
    """A run's config.yaml written by an older kd_det (tools/model_zoo.py, --resume, snapshots)."""
    cfg, _ = _merge(config_path(config))
    (tmp_path / "new.yaml").write_text(cfg.dump())
    saved = _to_old_layout(yaml.safe_load(cfg.dump()))
    assert "TRAINER" not in saved and "CURRICULUM" in saved["KD"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(saved))
    loaded, warned = _merge(str(tmp_path / "old.yaml"))
    # (compared with the dump read back: a dump turns Detectron2's nested tuples into lists)
    assert loaded == _merge(str(tmp_path / "new.yaml"))[0]
    assert loaded.KD == cfg.KD and loaded.TRAINER == cfg.TRAINER
    assert len(warned) == len(RENAMED_KEYS) + 1 + (not cfg.KD.FEATURE.ENABLED), warned


def test_unknown_keys_still_fail_with_the_yacs_error(tmp_path):
    for opts in (
        ["KD.FEATURE.LOSSS", "L2FeatureLoss"],
        ["KD.CURRICULUM.SCORE", "s.json"],
        ["TRAINER.NAMES", "KDTrainer"],
    ):
        new_name = opts[0].replace("KD.CURRICULUM", "TRAINER.CURRICULUM")
        with pytest.raises(AssertionError, match="Non-existent key: " + new_name):
            merge_kd_config(get_kd_cfg(), opts=opts)
    (tmp_path / "bad.yaml").write_text("KD:\n  SELF:\n    SOFT_LABEL_WEIGH: 1.0\n")
    with pytest.raises(KeyError, match="Non-existent config key: KD.SELF.SOFT_LABEL_WEIGH"):
        merge_kd_config(get_kd_cfg(), str(tmp_path / "bad.yaml"))
    with pytest.raises(AssertionError, match="Override list has odd length"):
        merge_kd_config(get_kd_cfg(), opts=["KD.TRAINER"])
    assert rename_opts(["KD.TRAINER"]) == ["KD.TRAINER"]
    # a wrong type is yacs' error too, under the new name
    with pytest.raises(ValueError, match="KD.SELF.SOFT_LABEL.WEIGHT"):
        merge_kd_config(get_kd_cfg(), opts=["KD.SELF.SOFT_LABEL_WEIGHT", "'high'"])


def test_feature_loss_names_are_not_old_keys():
    cfg, warned = _merge(opts=["KD.FEATURE.LOSS", "L2FeatureLoss"])
    assert cfg.KD.FEATURE.LOSS == "L2FeatureLoss" and cfg.KD.FEATURE.ENABLED and not warned


def test_teacher_opts_are_renamed(tmp_path):
    from kd_det.config.detector import load_detector_config

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        teacher = load_detector_config(
            config_path("synthetic/retinanet_R_50_FPN.yaml"),
            ["KD.SELF.TEMPERATURE", 2.0],
            role="teacher",
            opts_name="KD.TEACHER.OPTS",
        )
    assert teacher.KD.SELF.SOFT_LABEL.TEMPERATURE == 2.0
    assert ["KD.TEACHER.OPTS" in m for m in _renames_warned(record)] == [True]


def test_lazy_config_kd_dicts_are_renamed():
    from kd_det.modeling.lazy_student import kd_node

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        node = kd_node(
            {"FEATURE": {"LOSS": ""}, "SELF": {"SOFT_LABEL_WEIGHT": 0, "TEMPERATURE": 2}},
            self_distillation=True,
        )
    assert not node.FEATURE.ENABLED and node.FEATURE.LOSS == "SSIMFeatureLoss"
    assert not node.SELF.SOFT_LABEL.ENABLED and node.SELF.SOFT_LABEL.TEMPERATURE == 2.0
    assert len(_renames_warned(record)) == 3
    assert kd_node({"FEATURE": {"ENABLED": False}}) == kd_node({"FEATURE": {"LOSS": ""}})
    # training keys have no place in a LazyConfig model, under either name
    with pytest.raises(ValueError, match=r"KD.TRAINER, .*a yacs config's TRAINER.NAME"):
        kd_node({"TRAINER": "KDTrainer"})


SHIPPED_YAML = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
SHIPPED_LAZY = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True))


@pytest.mark.parametrize(
    "path", SHIPPED_YAML + SHIPPED_LAZY, ids=lambda p: os.path.relpath(p, REPO)
)
def test_shipped_configs_use_the_new_names(path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if path.endswith(".py"):
            from detectron2.config import LazyConfig

            from kd_det.modeling.lazy_student import kd_node

            lazy = LazyConfig.load(path)
            kd = lazy.model.get("kd", None)
            if kd is not None:
                kd_node(kd, self_distillation=True)
        else:
            merge_kd_config(get_kd_cfg(), path)
    assert not _renames_warned(record)
