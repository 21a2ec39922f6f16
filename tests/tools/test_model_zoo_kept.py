"""tools/model_zoo.py rewrites MODEL_ZOO.md's generated table and keeps its hand-written part."""

import importlib.util
import os

from conftest import REPO


def _tool():
    spec = importlib.util.spec_from_file_location(
        "model_zoo_tool", os.path.join(REPO, "tools", "model_zoo.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_hand_written_part_is_kept(tmp_path):
    tool = _tool()
    path = tmp_path / "MODEL_ZOO.md"
    assert tool.kept_part(str(path)) == ""
    path.write_text("generated\n\n" + tool.KEPT_MARKER + "\n## Paper settings\n| a |\n")
    assert tool.kept_part(str(path)) == "\n" + tool.KEPT_MARKER + "\n## Paper settings\n| a |\n"
    with open(os.path.join(REPO, "MODEL_ZOO.md")) as f:
        assert tool.KEPT_MARKER in f.read()
