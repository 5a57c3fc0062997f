"""Every culture-neurons command shown in the README and docs/ is one the command line takes:
parsed by its parser and checked by its option table (a real model and CVQA are not here to run
them; the toy's commands run end to end in tests/pipeline/test_cli.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from culture_neurons.pipeline.options import build_parser, read

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shown_commands(text: str) -> list[list[str]]:
    """The argv (after the program) of every culture-neurons command in ``bash`` blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            for part in line.split("&&"):
                words = shlex.split(part)
                if words[:1] == ["culture-neurons"]:
                    out.append(words[1:])
                elif words[:1] == ["torchrun"] and "culture_neurons" in words:
                    out.append(words[words.index("culture_neurons") + 1 :])
    return out


def test_the_pages_show_commands():
    assert len(shown_commands((REPO / "README.md").read_text(encoding="utf-8"))) >= 8
    assert [p.name for p in PAGES if not shown_commands(p.read_text(encoding="utf-8"))] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_shown_command_is_accepted(page):
    for argv in shown_commands(page.read_text(encoding="utf-8")):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            assert e.code == 0, argv
            continue
        read(args)  # every value checked by its option's entry
