"""docs/SECURITY.md names a test for every threat, and every test it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "SECURITY.md"


def referenced() -> list[tuple[str, str | None]]:
    refs = []
    for path, _, name in re.findall(r"`([\w/]+\.py)(::(\w+))?", DOC.read_text()):
        refs.append((path.removeprefix("tests/"), name or None))
    return refs


def test_every_threat_row_names_a_test() -> None:
    rows = [line for line in DOC.read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 15
    for row in rows:
        assert ".py" in row, row


def test_every_test_the_threat_model_names_exists() -> None:
    missing = []
    for rel, name in referenced():
        path = ROOT / "tests" / rel
        if not path.is_file():
            missing.append(rel)
            continue
        if name is None:
            continue
        tree = ast.parse(path.read_text())
        names = {
            n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        if name not in names:
            missing.append(f"{rel}::{name}")
    assert missing == []
