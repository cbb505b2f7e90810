"""The run's ledger: for each step its time and effort (wall time, tokens, FLOPs, parameters, examples, labels).

Figures come from each step's result, never from its settings: its metrics (`time/seconds`, `params/*`) and
`info["effort"]`, where the step states what it trained on (components/lib/context.py `effort`) and the engine
adds what its models computed (components/lib/meter.py). What a step does not know stays blank: None in
ledger.json, "-" in the tables. Outputs made before llmcycle kept `effort` fall back to the metrics
`train/tokens` and `train/flops`, where the step reported them.

Each step's wall time is also split into start-up, data, compute and logging (components/lib/phases.py says
what each covers), shown in a second table, "where the time goes", when some step of the run reported it.

The pipeline publishes the ledger on its parent MLflow run (ledger.json, ledger.md) and in its Prefect table
artifact; `llmcycle run` prints it at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

COLUMNS = {
    "seconds": "wall time of the step in this run: its time/seconds; for a failed or stopped step the engine's "
               "time from start to end; 0 for a cached one (its first run's time is `original_seconds`)",
    "tokens": "token positions its models computed (train_tokens + inference_tokens, padding included; a resumed "
              "step's since it resumed), plus tokens it produced without a model (a tokenizer's output)",
    "train_tokens": "positions computed with gradients (forward and backward)",
    "inference_tokens": "positions computed without gradients: scoring, generation, frozen references, judges",
    "flops": "6·N·train_tokens + 2·N·inference_tokens summed over its models, N = the model's parameter count "
             "(Kaplan et al. 2020); attention's own FLOPs are left out",
    "params_trainable": "parameters that train (params/trainable, else those its models trained)",
    "params_total": "parameters of its model (params/total, else its largest model)",
    "examples": "items it trained on, each counted once; `examples_of` says what they are",
    "labels": "preference labels it produced",
    "launch_seconds": "from the engine beginning the step (its task) to the step's process starting its work: the "
                      "lock, the MLflow run, the fork or torchrun start; part of startup_seconds",
    "startup_seconds": "of its task's time (launch + wall): the launch, reading the spec, building the context, "
                       "importing the component, building and loading models (components/lib/phases.py)",
    "data_seconds": "of its task's time: checking the data files' rows, Lightning's data fetching and DataModule hooks",
    "compute_seconds": "of its task's time: the rest (its training, evaluation and generation loops)",
    "logging_seconds": "of its task's time: MLflow calls, writing models, logging them to MLflow, checkpoints",
}
PHASES = ("startup", "data", "compute", "logging")  # components/lib/phases.py
PHASE_HEADERS = ("step", "task", *PHASES)
PHASE_TITLE = "where the time goes (task: the step's launch + its wall time; startup includes the launch)"
WORKED = ("ran", "failed", "stopped")  # the statuses whose figures were spent in this run
STATUSES = (*WORKED, "cached", "skipped")
SUMMED = ("seconds", "tokens", "train_tokens", "inference_tokens", "flops", "labels", "launch_seconds",
          *(f"{p}_seconds" for p in PHASES))
HEADERS = ("step", "kind", "status", "wall", "tokens", "FLOPs", "trainable", "params", "examples", "labels")


@dataclass
class Entry:
    """One step as the ledger sees it: its status in this run and what its result says."""

    name: str
    kind: str
    status: str  # one of STATUSES
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    seconds: float | None = None  # the engine's time, for a step that left no result (failed, stopped)


def row(entry: Entry) -> dict:
    """The ledger row of one step; None where the step does not know a figure."""
    m, effort = entry.metrics, entry.info.get("effort", {})
    if "sweep" in entry.info:  # a sweep's selection repeats its chosen variant's metrics: counted on that row
        m, effort = {}, {}
    models = effort.get("models") or []
    train = sum(x["train_tokens"] for x in models) if models else None
    inference = sum(x["inference_tokens"] for x in models) if models else None
    if models:
        tokens = train + inference + effort.get("tokens", 0)
        flops = float(sum(6 * x["params"] * x["train_tokens"] + 2 * x["params"] * x["inference_tokens"]
                          for x in models))
    else:
        tokens, flops = effort.get("tokens", m.get("train/tokens")), m.get("train/flops")
    total = m.get("params/total", max((x["params"] for x in models), default=None))
    trainable = m.get("params/trainable", sum(x["trainable"] for x in models) if models else None)
    own = m.get("time/seconds")
    seconds = {"ran": own if own is not None else entry.seconds, "cached": 0.0, "skipped": None}.get(
        entry.status, entry.seconds)
    split = entry.info.get("phases") if entry.status == "ran" else None  # what this run spent, by phase
    return {"step": entry.name, "kind": entry.kind, "status": entry.status, "seconds": seconds,
            "original_seconds": own if entry.status == "cached" else None, "tokens": _int(tokens),
            "train_tokens": train, "inference_tokens": inference, "flops": flops,
            "params_trainable": _int(trainable), "params_total": _int(total), "examples": effort.get("examples"),
            "examples_of": effort.get("examples_of"), "labels": effort.get("labels"),
            "launch_seconds": split.get("launch", 0.0) if split else None,
            **{f"{p}_seconds": split.get(p) if split else None for p in PHASES}}


def total(rows: list[dict], with_cached: bool = False) -> dict:
    """The sums of the figures shown for the steps that worked in this run (and, `with_cached`, of the cached
    steps' first runs); a column none of them knows stays None, and with no such step every sum is 0."""
    counted = [r for r in rows if r["status"] in WORKED or (with_cached and r["status"] == "cached")]
    out = {"step": "total incl. cached" if with_cached else "total", "kind": None, "status": None}
    for key in SUMMED:
        known = [r["original_seconds"] if key == "seconds" and r["status"] == "cached" else r[key] for r in counted]
        known = [v for v in known if v is not None]
        out[key] = sum(known) if known or not counted else None
    return out


def build(entries: list[Entry], seconds: float | None = None) -> dict:
    """The ledger: a row per step, the total of this run, the total with the cached steps' first runs (only when
    some step was cached), and the pipeline's own wall time (its steps may overlap)."""
    rows = [row(e) for e in entries]
    cached = any(r["status"] == "cached" for r in rows)
    return {"rows": rows, "total": total(rows), "total_with_cached": total(rows, True) if cached else None,
            "pipeline_seconds": seconds, "columns": COLUMNS}


def totals(ledger: dict) -> list[dict]:
    return [t for t in (ledger["total"], ledger["total_with_cached"]) if t is not None]


def cells(r: dict) -> dict[str, str]:
    """A row (or total) as the tables show it, keyed by HEADERS."""
    examples = "-" if r.get("examples") is None else f"{count(r['examples'])} {r.get('examples_of') or ''}".strip()
    return {"step": r["step"], "kind": r.get("kind") or "", "status": r.get("status") or "",
            "wall": duration(r["seconds"]), "tokens": count(r["tokens"]), "FLOPs": flop(r["flops"]),
            "trainable": count(r.get("params_trainable")), "params": count(r.get("params_total")),
            "examples": examples, "labels": count(r["labels"])}


def text(ledger: dict) -> str:
    """The ledger as an aligned table for the terminal."""
    table = [dict(zip(HEADERS, HEADERS))] + [cells(r) for r in ledger["rows"] + totals(ledger)]
    width = {h: max(len(c[h]) for c in table) for h in HEADERS}
    left = ("step", "kind", "status", "examples")
    lines = ["  ".join(c[h].ljust(width[h]) if h in left else c[h].rjust(width[h]) for h in HEADERS).rstrip()
             for c in table]
    lines.insert(len(ledger["rows"]) + 1, "-" * len(lines[0]))
    return "\n".join(lines + _notes(ledger) + _phase_lines(ledger))


def markdown(ledger: dict) -> str:
    """The ledger as a Markdown table (ledger.md in MLflow)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" if h in ("step", "kind", "status", "examples")
                                                              else "--:" for h in HEADERS) + "|"]
    for r in ledger["rows"]:
        lines.append("| " + " | ".join(cells(r).values()) + " |")
    for t in totals(ledger):
        lines.append("| " + " | ".join(f"**{v}**" if h == "step" else v for h, v in cells(t).items()) + " |")
    phased = _phased(ledger)
    if phased:
        lines += ["", PHASE_TITLE, "", "| " + " | ".join(PHASE_HEADERS) + " |",
                  "|---|" + "--:|" * (len(PHASE_HEADERS) - 1)]
        lines += ["| " + " | ".join(f"**{v}**" if h == "step" and r is phased[-1] else v
                                    for h, v in phase_cells(r).items()) + " |" for r in phased]
    return "\n\n".join(["\n".join(lines), *_notes(ledger)]) + "\n"


def _phased(ledger: dict) -> list[dict]:
    """The rows that know their split of time, and the run's total, when any does."""
    rows = [r for r in ledger["rows"] if r.get("compute_seconds") is not None]
    if not rows:
        return []
    keys = ("seconds", "launch_seconds", *(f"{p}_seconds" for p in PHASES))
    return rows + [{"step": "total", **{k: sum(r[k] or 0.0 for r in rows) for k in keys}}]


def phase_cells(r: dict) -> dict[str, str]:
    """A row's split of time as the tables show it, keyed by PHASE_HEADERS: `12.3 s 45%` per phase."""
    wall = (r.get("seconds") or 0.0) + (r.get("launch_seconds") or 0.0)  # the task: its launch and its wall time
    out = {"step": r["step"], "task": duration(wall)}
    for p in PHASES:
        value = r.get(f"{p}_seconds")
        share = f" {100 * value / wall:.0f}%" if value is not None and wall else ""
        out[p] = duration(value) + share
    return out


def _phase_lines(ledger: dict) -> list[str]:
    """The "where the time goes" table for the terminal (nothing when no step reported its split)."""
    phased = _phased(ledger)
    if not phased:
        return []
    table = [dict(zip(PHASE_HEADERS, PHASE_HEADERS))] + [phase_cells(r) for r in phased]
    width = {h: max(len(c[h]) for c in table) for h in PHASE_HEADERS}
    lines = ["  ".join(c[h].ljust(width[h]) if h == "step" else c[h].rjust(width[h]) for h in PHASE_HEADERS)
             for c in table]
    lines.insert(len(phased), "-" * len(lines[0]))
    return ["", PHASE_TITLE, *lines]


def _notes(ledger: dict) -> list[str]:
    notes = []
    if ledger["total_with_cached"] is not None:
        notes.append("cached: figures of the run that made the output; 0 s in this one")
    if ledger["pipeline_seconds"] is not None:
        notes.append(f"pipeline wall time {duration(ledger['pipeline_seconds'])} (steps in parallel overlap)")
    return notes


def duration(seconds: float | None) -> str:
    """`3.2 s`, `4m 05s`, `2h 10m`; "-" for unknown."""
    if seconds is None:
        return "-"
    if seconds == 0:
        return "0 s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def count(n: float | None) -> str:
    """`812`, `12.3 k`, `4.56 M`, `1.2 G`; "-" for unknown."""
    if n is None:
        return "-"
    return str(int(n)) if abs(n) < 1000 else _si(n, "")


def flop(n: float | None) -> str:
    """`3.4 GFLOP`, `1.2 PFLOP`; "-" for unknown."""
    return "-" if n is None else "0" if n == 0 else _si(n, "FLOP")


def _si(n: float, unit: str) -> str:
    for prefix in ("", "k", "M", "G", "T", "P", "E", "Z"):
        if abs(n) < 999.5 or prefix == "Z":
            return f"{n:.3g} {prefix}{unit}".rstrip()
        n /= 1000
    raise AssertionError  # unreachable


def _int(value) -> int | None:
    return None if value is None else int(value)
