"""Security basics that a grep can hold: no pickle/eval on data paths, no string-built SQL."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "polyqueue"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "migrations/versions" not in p.as_posix())

SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|WHERE|VALUES)\b")
FORMATTED = re.compile(r"""(\bf["']|\.format\(|%\s*\(|["']\s*%\s*\w)""")


def test_no_pickle_eval_or_exec_in_the_package() -> None:
    offenders = [
        f"{p.relative_to(PACKAGE)}:{n}"
        for p in SOURCES
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\b(pickle|marshal|eval\(|exec\()", line) and not line.lstrip().startswith("#")
    ]
    assert offenders == []


def test_sql_is_never_built_from_values() -> None:
    """String-formatted SQL is allowed only where a line says why (a `# noqa: S608` reason or
    constant fragments); every value travels as a bind parameter."""
    offenders = []
    for p in SOURCES:
        lines = p.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if SQL.search(line) and FORMATTED.search(line):
                context = " ".join(lines[max(0, n - 4) : n + 3])
                if "noqa: S608" in context or "constant" in context.lower():
                    continue
                offenders.append(f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert offenders == [], "string-built SQL:\n" + "\n".join(offenders)


def test_the_detector_catches_what_it_is_for() -> None:
    bad = 'conn.execute(text(f"SELECT * FROM polyqueue_jobs WHERE task = {task}"))'
    assert SQL.search(bad) and FORMATTED.search(bad)
    good = 'conn.execute(text("SELECT * FROM polyqueue_jobs WHERE task = :task"), {"task": task})'
    assert not FORMATTED.search(good)
