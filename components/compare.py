"""`compare`: put steps that already ran side by side.

Reads: each compared step's result: its metrics, and the held-out loss curve a pretrain step records
(`info["curve"]`: (optimizer step, val/loss) pairs, the untrained model's at step 0). Writes: `comparison.md`
(the table), `comparison.json` (its rows) and `comparison.png` (the curves on one figure); logs the table as an
MLflow table artifact and the figure. Nothing is trained or measured here: every number is the step's own.
"""

from __future__ import annotations

import json

from components.lib.context import StepContext, StepOutput
from schemas.steps.compare import CompareSpec


def run(spec: CompareSpec, ctx: StepContext) -> StepOutput:
    """Collect the rows, check every step has what the table and figure need, then write and log both."""
    results = {name: ctx.step(name) for name in spec.steps}
    rows = [table_row(name, result, spec.metrics) for name, result in results.items()]
    curves = {name: check_curve(name, result) for name, result in results.items()} if spec.curve != "none" else {}
    table = format_table(rows, spec.metrics)
    (ctx.out_dir / "comparison.md").write_text(table + "\n")
    (ctx.out_dir / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    ctx.log_table(rows, "comparison.json")
    ctx.log_artifact(ctx.out_dir / "comparison.md")
    if curves:
        plot_curves(curves, rows, ctx.out_dir / "comparison.png", f"{ctx.pipeline_name}, {ctx.name}: held-out loss")
        ctx.log_artifact(ctx.out_dir / "comparison.png")
    print(f"{ctx.name}:\n{table}", flush=True)
    return StepOutput(outputs={"report": "comparison.md"}, info={"table": rows})


def table_row(name: str, result, metrics: list[str]) -> dict:
    """The step's name and kind and its value of each metric; a metric it did not report is an error."""
    missing = [m for m in metrics if m not in result.metrics]
    if missing:
        raise ValueError(f"compare.metrics: step '{name}' ({result.kind}) reported no {', '.join(missing)}; it "
                         f"reported: {', '.join(sorted(result.metrics))}")
    return {"step": name, "kind": result.kind, **{m: result.metrics[m] for m in metrics}}


def check_curve(name: str, result) -> list[tuple[int, float]]:
    curve = result.info.get("curve")
    if not curve:
        raise ValueError(f"compare.curve: step '{name}' ({result.kind}) recorded no held-out loss curve (pretrain "
                         "steps do); remove it from steps or set curve: none")
    return [(int(step), float(loss)) for step, loss in curve]


def format_table(rows: list[dict], metrics: list[str]) -> str:
    """A Markdown table: one row per step, one column per metric."""
    head = ["step", "kind", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join([row["step"], row["kind"], *(number(row[m]) for m in metrics)]) + " |")
    return "\n".join(lines)


def number(value: float) -> str:
    """From 1,000 up: whole, with thousands separators; below: 4 significant digits."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def plot_curves(curves: dict[str, list[tuple[int, float]]], rows: list[dict], path, title: str) -> None:
    """Every step's held-out loss against optimizer steps, on one figure; the legend carries the table's row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: E402

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        steps, losses = zip(*curves[row["step"]])
        facts = ", ".join(f"{m} {number(row[m])}" for m in row if m not in ("step", "kind"))
        ax.plot(steps, losses, "o-", label=f"{row['step']} ({facts})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
