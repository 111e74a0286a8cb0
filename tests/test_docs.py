"""Generated documentation stays in step with the code it is generated from."""

from __future__ import annotations

import runpy
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_backends_md_is_generated_from_the_declarations():
    generator = runpy.run_path(str(DOCS / "gen_backends_table.py"))
    assert (DOCS / "backends.md").read_text() == generator["render"](), (
        "docs/backends.md is out of date: run python docs/gen_backends_table.py")
