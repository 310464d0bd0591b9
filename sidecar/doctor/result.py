"""One check's outcome, and how a list of them is shown: a line per check, or JSON."""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class Status(enum.Enum):
    PASS = "pass"  # noqa: S105 - a status, not a password
    WARN = "warn"  # works, but worth a look; does not fail the run
    FAIL = "fail"
    SKIP = "skip"  # could not run because something it needs failed first


# Marks for a UTF-8 terminal, and their ASCII stand-ins for any other.
_MARKS = {Status.PASS: "✓", Status.WARN: "!", Status.FAIL: "✗", Status.SKIP: "-"}
_ASCII_MARKS = {Status.PASS: "ok", Status.WARN: "!!", Status.FAIL: "XX", Status.SKIP: "--"}


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in (Status.PASS, Status.WARN)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
        }


def passed(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.PASS, detail)


def warned(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.WARN, detail, fix)


def failed(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.FAIL, detail, fix)


def skipped(name: str, detail: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, detail)


def all_ok(results: Sequence[CheckResult]) -> bool:
    return all(r.ok for r in results)


def to_json(results: Sequence[CheckResult]) -> str:
    return json.dumps([r.to_json() for r in results], indent=2, ensure_ascii=False)


def to_text(results: Sequence[CheckResult], *, unicode: bool = True) -> str:
    """One line per check (continuation lines indented), the fix under each ✗ and !."""
    marks = _MARKS if unicode else _ASCII_MARKS
    width = max((len(r.name) for r in results), default=0)
    indent = " " * (len(marks[Status.PASS]) + 1 + width + 2)
    lines = []
    for r in results:
        first, *rest = r.detail.splitlines() or [""]
        lines.append(f"{marks[r.status]} {r.name:<{width}}  {first}")
        lines += [f"{indent}{line}" for line in rest]
        if r.fix and r.status in (Status.FAIL, Status.WARN):
            lines.append(f"{indent}fix: {r.fix}")
    counts = {s: sum(1 for r in results if r.status is s) for s in Status}
    summary = f"{len(results)} checks: {counts[Status.PASS]} passed"
    for status, word in (
        (Status.WARN, "warned"),
        (Status.FAIL, "failed"),
        (Status.SKIP, "skipped"),
    ):
        if counts[status]:
            summary += f", {counts[status]} {word}"
    lines.append(summary)
    return "\n".join(lines) + "\n"
