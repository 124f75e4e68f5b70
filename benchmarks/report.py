"""Results and the printed table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Result", "percentile", "render"]


@dataclass
class Result:
    """One measured number, with its target (if any) and what it means."""

    name: str
    value: float
    unit: str
    jobs: int | None = None
    target: float | None = None
    higher_is_better: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def _fmt(value: float, unit: str) -> str:
    if unit == "jobs/s":
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:,.2f}"
    return f"{value:,.3g}"


def render(results: list[Result], *, title: str) -> str:
    """A fixed-width table: benchmark, value, unit, jobs, target, met."""
    header = ("benchmark", "value", "unit", "jobs", "target", "met")
    rows = []
    for r in results:
        target = "" if r.target is None else ("≥ " if r.higher_is_better else "≤ ") + _fmt(r.target, r.unit)
        met = "" if r.met is None else ("yes" if r.met else "NO")
        jobs = "" if r.jobs is None else f"{r.jobs:,}"
        rows.append((r.name, _fmt(r.value, r.unit), r.unit, jobs, target, met))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    align = ["<", ">", "<", ">", "<", "<"]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths, strict=True)).rstrip()

    out = [title, line(header), line(tuple("-" * w for w in widths))]
    out += [line(row) for row in rows]
    notes = [(r.name, n) for r in results for n in r.notes]
    if notes:
        out += ["", "notes:"]
        out += [f"  {name}: {note}" for name, note in notes]
    return "\n".join(out)
