#!/usr/bin/env python
"""
Write docs/config_keys.md: every config key kd_det adds to Detectron2's defaults, with its
default and its description, generated so that it cannot drift from the code.

    python tools/gen_config_docs.py            # rewrite docs/config_keys.md
    python tools/gen_config_docs.py --check    # exit 1 if the file is out of date (tests do this)

The keys are those of ``kd_det.get_kd_cfg()`` that ``detectron2.config.get_cfg()`` lacks,
whatever they are when it runs; the defaults are read from that config. The descriptions are
the comments of ``kd_det/config/defaults.py``, read with the ``tokenize`` module (comments
stay next to the keys they describe, where whoever adds a key writes one anyway; a separate
table of descriptions would be a second place to forget). The rule:

- a comment block describes the assignments on the lines directly below it, up to the next
  blank line or comment: ``cfg.KD.TEACHER.CONFIG`` and ``cfg.KD.TEACHER.WEIGHTS`` under one
  comment share it (a node's ``cfg.KD.RM = CN()`` line passes its comment on to its keys);
- a comment at the end of the assignment's own line describes that key alone.

A key no comment describes, or one that ``defaults.py`` does not assign, is an error that
names it: every key gets documented.
"""

import argparse
import io
import os
import sys
import tokenize
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = os.path.join(ROOT, "kd_det", "config", "defaults.py")
OUTPUT = os.path.join(ROOT, "docs", "config_keys.md")
COMMAND = "python tools/gen_config_docs.py"


class Assignment(NamedTuple):
    key: str  # "KD.TEACHER.CONFIG" (without "cfg.")
    line: int
    description: Optional[str]
    group: str  # the statement directly under the comment (keys sharing a comment share it)


def _comment_text(lines: List[str]) -> str:
    return " ".join(ln.lstrip("#").strip() for ln in lines).strip()


def parse_assignments(source: str) -> List[Assignment]:
    """The ``cfg.X.Y = ...`` statements of ``source``, in order, each with its description."""
    comments: Dict[int, str] = {}  # line -> a comment alone on its line
    trailing: Dict[int, str] = {}  # line -> a comment after code
    statements: List[Tuple[str, int, int]] = []  # key, first line, last line
    current: List[tokenize.TokenInfo] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = tok.line.strip().startswith("#")
            (comments if alone else trailing)[tok.start[0]] = tok.string
        elif tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            key = _assigned_key(current)
            if key:
                statements.append((key, current[0].start[0], current[-1].end[0]))
            current = []
        elif tok.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            current.append(tok)

    out: List[Assignment] = []
    context = None  # (description, group) of the comment block the lines run under
    previous_end = None
    for key, first, last in statements:
        block: List[str] = []
        line = first - 1
        while line in comments:
            block.insert(0, comments[line])
            line -= 1
        if block:
            context = (_comment_text(block), key)
        elif previous_end != first - 1:
            context = None  # after a blank line (or other code): no comment above
        previous_end = last
        if last in trailing:
            out.append(Assignment(key, first, _comment_text([trailing[last]]), key))
        elif context:
            out.append(Assignment(key, first, context[0], context[1]))
        else:
            out.append(Assignment(key, first, None, key))
    return out


def _assigned_key(statement: Sequence[tokenize.TokenInfo]) -> Optional[str]:
    """ "KD.TEACHER.CONFIG" for the tokens of ``cfg.KD.TEACHER.CONFIG = ...``, else None."""
    names = []
    if not statement or statement[0].string != "cfg":
        return None
    i = 1
    while (
        i + 1 < len(statement)
        and statement[i].string == "."
        and statement[i + 1].type == tokenize.NAME
    ):
        names.append(statement[i + 1].string)
        i += 2
    if names and i < len(statement) and statement[i].string == "=":
        return ".".join(names)
    return None


def _flatten(node, prefix: str = "") -> Dict[str, object]:
    out = {}
    for k, v in node.items():
        if hasattr(v, "items"):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def added_keys() -> Dict[str, object]:
    """kd_det's keys (and their defaults) that Detectron2's own config lacks, in config order."""
    sys.path.insert(0, ROOT)
    from detectron2.config import get_cfg

    from kd_det.config import get_kd_cfg

    theirs = _flatten(get_cfg())
    return {k: v for k, v in _flatten(get_kd_cfg()).items() if k not in theirs}


def _value(v) -> str:
    if isinstance(v, str):
        return '"{}"'.format(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return repr(v)


def _cell(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|")


def render(keys: Dict[str, object], source: str, source_name: str) -> str:
    """docs/config_keys.md's text. Raises ValueError naming every undocumented key."""
    assignments = {a.key: a for a in parse_assignments(source)}
    problems = []
    for key in keys:
        a = assignments.get(key)
        if a is None:
            problems.append("{} is not assigned in {}".format(key, source_name))
        elif not a.description:
            problems.append(
                "{} ({} line {}) has no comment: write one on the line(s) above it".format(
                    key, source_name, a.line
                )
            )
    if problems:
        raise ValueError(
            "undocumented config keys:\n  " + "\n  ".join(problems) + "\nthen run " + COMMAND
        )
    ordered = sorted(keys, key=lambda k: assignments[k].line)
    # rows: one per comment, with the keys it describes
    rows: List[List[str]] = []
    for key in ordered:
        if rows and assignments[rows[-1][0]].group == assignments[key].group:
            rows[-1].append(key)
        else:
            rows.append([key])
    lines = [
        "# Config keys",
        "",
        "<!-- generated by {} from kd_det/config/defaults.py: edit the comments there, "
        "not this file -->".format(COMMAND),
        "",
        "Every key kd_det adds to Detectron2's defaults (`kd_det.get_kd_cfg()` against "
        "`detectron2.config.get_cfg()`), with its default and the comment that documents it in "
        "[`kd_det/config/defaults.py`](../kd_det/config/defaults.py). Detectron2's own keys are "
        "in [its documentation](https://detectron2.readthedocs.io/en/latest/modules/config.html"
        "#yaml-config-references). How the methods use these keys: [methods.md](methods.md) and "
        "[training.md](training.md). `{}` writes this file; `{} --check` (run by "
        "`tests/test_docs.py`) fails when it is out of date or a key has no comment.".format(
            COMMAND, COMMAND
        ),
    ]
    section = None
    for row in rows:
        top = row[0].split(".")[0]
        if top != section:
            section = top
            lines += [
                "",
                "## `{}`".format(top),
                "",
                "| key | default | description |",
                "| --- | --- | --- |",
            ]
        lines.append(
            "| {} | {} | {} |".format(
                "<br>".join("`{}`".format(k) for k in row),
                "<br>".join("`{}`".format(_cell(_value(keys[k]))) for k in row),
                _cell(assignments[row[0]].description),
            )
        )
    return "\n".join(lines) + "\n"


def generate() -> str:
    with open(DEFAULTS) as f:
        source = f.read()
    return render(added_keys(), source, os.path.relpath(DEFAULTS, ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="only compare; exit 1 when the file is out of date"
    )
    args = parser.parse_args(argv)
    try:
        text = generate()
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    if args.check:
        try:
            with open(OUTPUT) as f:
                current = f.read()
        except OSError:
            current = None
        if current != text:
            print(
                "{} is out of date: run {}".format(os.path.relpath(OUTPUT, ROOT), COMMAND),
                file=sys.stderr,
            )
            return 1
        return 0
    os.makedirs(os.path.dirname(OUTPUT), exist_ok=True)
    with open(OUTPUT, "w") as f:
        f.write(text)
    print("wrote", os.path.relpath(OUTPUT, ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
