"""The rules of the house (docs/design.md) as tests: stages never import each other, and no SQL
is spoken outside daemon/store/ (the results stage's scratch index aside)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

DAEMON = Path(__file__).resolve().parents[1] / "daemon"
STAGES = ("intake", "submit", "track", "results", "control")  # validate/ is a library
# The one stage-to-stage call left: `retry` asks the results stage's planner (design.md).
ALLOWED = {("control", "daemon.results.collect")}


def _modules() -> list[tuple[str, Path]]:
    return [
        (p.relative_to(DAEMON).parts[0], p)
        for p in sorted(DAEMON.rglob("*.py"))
        if "emulator" not in p.parts
    ]


def test_stages_never_import_each_other() -> None:
    crossings = []
    for top, path in _modules():
        if top not in STAGES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):  # lazy imports count too
            if isinstance(node, ast.ImportFrom) and node.module:
                other = node.module.split(".")[1] if node.module.count(".") else ""
                if other in STAGES and other != top and (top, node.module) not in ALLOWED:
                    crossings.append(f"{path.relative_to(DAEMON)} imports {node.module}")
    assert crossings == []


def test_no_sql_outside_the_store() -> None:
    sql = re.compile(r"\.(execute|executemany|executescript|fetchall|fetchone)\(")
    found = [
        str(path.relative_to(DAEMON))
        for top, path in _modules()
        if top != "store" and path.name != "index.py" and sql.search(path.read_text())
    ]
    assert found == []
