"""The combined table of every benchmark's results file (benchmarks/results/*.json, written by benchmarks/record.py).

`make bench` runs the benchmarks and then this; docs/figures.py (`--only benchmarks`) writes `markdown()` into the
README's benchmark table, so the README shows exactly what the committed results files hold.

    .venv/bin/python benchmarks/report.py               # the table for the terminal
    .venv/bin/python benchmarks/report.py --markdown    # the README's table
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import record  # noqa: E402

HEADERS = ("benchmark", "figure", "ours", "baseline (same run)", "ratio", "goal", "measured")


def number(value: float | None, unit: str = "") -> str:
    """`12,345 tokens/s`, `275 ms`, `3.14 GFLOP/s`; "-" for unknown."""
    if value is None:
        return "-"
    a = abs(value)
    shown = f"{value:,.0f}" if a >= 1000 else f"{value:.0f}" if a >= 100 else f"{value:.1f}" if a >= 10 \
        else f"{value:.3g}"
    return f"{shown} {unit}".strip()


def machines(rows: list[dict]) -> list[str]:
    """The distinct machines of the rows, in order of first appearance, each as one line."""
    seen: list[str] = []
    for r in rows:
        line = machine_line(r.get("machine") or {})
        if line not in seen:
            seen.append(line)
    return seen


def machine_line(m: dict) -> str:
    parts = [m.get("cpu") or "unknown CPU", f"{m.get('cores')} cores" if m.get("cores") else None,
             f"torch {m['torch']}" if m.get("torch") else None, m.get("cuda_device")]
    return ", ".join(p for p in parts if p)


def cells(r: dict, where: list[str], notes: bool = True) -> dict[str, str]:
    """A row as the tables show it, keyed by HEADERS (`notes`: the figure's note in brackets after it)."""
    command = (r.get("command") or r["benchmark"]).removeprefix("benchmarks/")
    baseline = r.get("baseline") or ""
    if r.get("baseline_value") is not None:
        baseline = f"{baseline} {number(r['baseline_value'], r.get('unit', ''))}".strip()
    figure = r["figure"] + (f" ({r['note']})" if notes and r.get("note") else "")
    commit = (r.get("commit") or "")[:7] + ("+dirty" if (r.get("commit") or "").endswith("+dirty") else "")
    load = (r.get("machine") or {}).get("load")
    measured = (f"[{where.index(machine_line(r.get('machine') or {})) + 1}] {(r.get('date') or '')[:10]} {commit}"
                + (f", load {load:g}" if load is not None else ""))
    return {"benchmark": command, "figure": figure, "ours": number(r.get("value"), r.get("unit", "")),
            "baseline (same run)": baseline or "-", "ratio": "-" if r.get("ratio") is None else f"{r['ratio']:.3g}x",
            "goal": r.get("goal") or "", "measured": measured.strip()}


def markdown(rows: list[dict]) -> str:
    """The README's benchmark table, with the machines the figures were measured on below it."""
    if not rows:
        return "No results files yet: run `make bench` (benchmarks/results/*.json)."
    where = machines(rows)
    lines = ["| " + " | ".join(HEADERS) + " |", "| " + " | ".join("---" for _ in HEADERS) + " |"]
    for r in rows:
        c = cells(r, where)
        c["benchmark"] = f"`{c['benchmark']}`"
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in c.values()) + " |")
    notes = [f"[{i}] {m}" for i, m in enumerate(where, 1)]
    return "\n".join(lines) + "\n\nMeasured on: " + "; ".join(notes) + "."


def text(rows: list[dict]) -> str:
    """The same table for the terminal (aligned columns)."""
    if not rows:
        return f"no results files in {record.folder()}"
    where = machines(rows)
    table = [dict(zip(HEADERS, HEADERS))] + [cells(r, where, notes=False) for r in rows]  # notes: in the files
    width = {h: max(len(c[h]) for c in table) for h in HEADERS}
    right = ("ours", "ratio")
    lines = ["  ".join(c[h].rjust(width[h]) if h in right else c[h].ljust(width[h]) for h in HEADERS).rstrip()
             for c in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + [""] + [f"[{i}] {m}" for i, m in enumerate(where, 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="the README's table")
    parser.add_argument("--results", type=Path, default=None, help="folder of results files (default: "
                                                                    "benchmarks/results)")
    args = parser.parse_args()
    rows = record.read(args.results)
    print(markdown(rows) if args.markdown else text(rows))


if __name__ == "__main__":
    main()
