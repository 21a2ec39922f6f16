"""The documentation: relative links resolve, and docs/config_keys.md is the one the code makes."""

import glob
import os
import re
import runpy

import pytest
from conftest import REPO

GEN = runpy.run_path(os.path.join(REPO, "tools", "gen_config_docs.py"))

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _doc_files():
    return [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def _anchors(path):
    """GitHub's anchors of a Markdown file's headings."""
    with open(path) as f:
        text = _FENCE.sub("", f.read())
    anchors = set()
    for title in _HEADING.findall(text):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def broken_links(path):
    with open(path) as f:
        text = _CODE.sub("", _FENCE.sub("", f.read()))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (
            os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        )
        rel = os.path.relpath(dest, REPO).replace(os.sep, "/")
        if not os.path.exists(dest):
            broken.append("{} (no file {})".format(target, rel))
        elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
            broken.append("{} (no heading '#{}' in {})".format(target, anchor, rel))
    return broken


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(path):
    assert broken_links(path) == [], "broken links in " + os.path.relpath(path, REPO)


def test_link_checker_finds_broken_links(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## A `KEY` section\n")
    page.write_text(
        "[ok](other.md) [ok](other.md#a-key-section) [web](https://example.org/x) [self](#top)\n"
        "# Top\n`[not a link](nowhere.md)`\n```\n[code](nowhere.md)\n```\n"
        "[bad](missing.md) [bad anchor](other.md#nope)\n"
    )
    assert broken_links(str(page)) == [
        "missing.md (no file {})".format(os.path.relpath(str(tmp_path / "missing.md"), REPO)),
        "other.md#nope (no heading '#nope' in {})".format(
            os.path.relpath(str(tmp_path / "other.md"), REPO)
        ),
    ]


def test_config_keys_doc_is_current():
    with open(GEN["OUTPUT"]) as f:
        current = f.read()
    assert current == GEN["generate"](), "docs/config_keys.md is out of date: run {}".format(
        GEN["COMMAND"]
    )


SOURCE = """
def add(cfg):
    # The node's comment, passed on to the keys directly below.
    cfg.KD.NEW = CN()
    cfg.KD.NEW.ENABLED = False
    # Two keys
    # under one comment.
    cfg.KD.NEW.A = 1
    cfg.KD.NEW.B = [
        "x",
    ]
    cfg.KD.NEW.C = 2  # its own

    cfg.KD.NEW.UNDOCUMENTED = 0.5
"""


def test_comments_describe_the_keys_below_them():
    parsed = {a.key: a for a in GEN["parse_assignments"](SOURCE)}
    assert (
        parsed["KD.NEW.ENABLED"].description == "The node's comment, passed on to the keys "
        "directly below."
    )
    assert (
        parsed["KD.NEW.A"].description
        == parsed["KD.NEW.B"].description
        == ("Two keys under one comment.")
    )
    assert parsed["KD.NEW.B"].group == "KD.NEW.A"
    assert parsed["KD.NEW.C"].description == "its own"
    assert parsed["KD.NEW.UNDOCUMENTED"].description is None
    keys = {"KD.NEW.ENABLED": False, "KD.NEW.A": 1, "KD.NEW.B": ["x"], "KD.NEW.C": 2}
    text = GEN["render"](keys, SOURCE, "defaults.py")
    assert '| `KD.NEW.A`<br>`KD.NEW.B` | `1`<br>`["x"]` | Two keys under one comment. |' in text


def test_a_key_without_a_comment_fails_by_name():
    keys = {"KD.NEW.UNDOCUMENTED": 0.5, "KD.NEW.ELSEWHERE": 1}
    with pytest.raises(ValueError) as e:
        GEN["render"](keys, SOURCE, "defaults.py")
    message = str(e.value)
    assert "KD.NEW.UNDOCUMENTED (defaults.py line 14) has no comment" in message
    assert "KD.NEW.ELSEWHERE is not assigned in defaults.py" in message
    assert GEN["COMMAND"] in message
