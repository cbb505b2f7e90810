"""Soak: fully cached re-runs of the quickstart, back to back, as a user (or a schedule) starts them.

Runs the quickstart once into a scratch project, then `--runs` cached re-runs (`llmcycle run`, Prefect's
ephemeral server included). Reports the wall time of each re-run (first vs last, the spread), and checks
what must not grow: temporary folders left in the workdir, processes left behind, MLflow runs beyond one
parent and one run per step for each re-run. The baseline is the first re-run, measured in the same run.

    .venv/bin/python benchmarks/bench_soak.py             # 20 re-runs of the full quickstart (about 7 min)
    .venv/bin/python benchmarks/bench_soak.py --quick     # a shortened quickstart, 5 re-runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_isolation import QUICK  # noqa: E402
from figures import Project  # noqa: E402

sys.path.insert(0, str(REPO))
from benchmarks.record import Results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=None, help="cached re-runs (default 20, --quick 5)")
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 20)
    sets = QUICK if args.quick else []
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="llmcycle-soak-") as tmp:
        project = Project(Path(tmp))
        first = project.run("quickstart", *sets)
        store = MlflowClient(f"sqlite:///{Path(tmp) / 'runs' / 'mlflow.db'}")
        experiment = store.get_experiment_by_name("quickstart").experiment_id
        count = lambda: len(store.search_runs([experiment], max_results=50_000))  # noqa: E731
        runs_before, procs_before = count(), {p.pid for p in psutil.process_iter()}
        from schemas import load

        steps = len(load(REPO / "specs" / "quickstart.yaml").spec.steps)
        seconds = [project.run("quickstart", *sets) for _ in range(runs)]
        leftover_tmp = [str(p) for p in (Path(tmp) / "runs").rglob(".tmp-*")]
        leftover_procs = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"]) if p.pid not in procs_before
                          and any(tmp in part for part in (p.info["cmdline"] or []))]
        grew = count() - runs_before

    print(f"\nquickstart{' (--quick)' if args.quick else ''}: first run {first:.0f} s, then {runs} cached re-runs")
    print(f"  re-run wall time: first {seconds[0]:.1f} s, last {seconds[-1]:.1f} s (last/first "
          f"{seconds[-1] / seconds[0]:.2f}), median {statistics.median(seconds):.1f} s, min {min(seconds):.1f}, "
          f"max {max(seconds):.1f}")
    print(f"  MLflow runs added: {grew} (expected {runs} x (1 parent + {steps} steps) = {runs * (1 + steps)})")
    print(f"  temporary folders left: {len(leftover_tmp)}; processes left: {len(leftover_procs)}")
    results = Results(__file__, "quick" if args.quick else "")
    results.add(f"wall time of the last of {runs} cached re-runs of the quickstart", seconds[-1], "s",
                "the first re-run", seconds[0], goal="flat, nothing left behind",
                note=f"median {statistics.median(seconds):.1f} s, min {min(seconds):.1f}, max {max(seconds):.1f}; "
                f"{len(leftover_tmp)} temporary folders and {len(leftover_procs)} processes left; {grew} MLflow runs "
                f"added (expected {runs * (1 + steps)})")
    results.write()
    if grew != runs * (1 + steps) or leftover_tmp or leftover_procs:
        raise SystemExit(f"soak failed: {leftover_tmp[:3]} {leftover_procs[:3]}")


if __name__ == "__main__":
    main()
