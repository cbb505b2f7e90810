"""What running each step in its own process costs: the quickstart's wall time, in-process vs isolated.

Three ways to run the same spec, each from an empty workdir, as a user runs it (`llmcycle run`, Prefect's
ephemeral server included), alternating in rounds so that a busy moment of the machine does not land on
one of them:

  (a) `--in-process`: every step inside the flow's process, one at a time (the design before isolation);
  (b) isolated, `max_parallel: 1`: each step forked from the preloading fork server, one at a time;
  (c) isolated, the default scheduling: `max_parallel: 2`, but CPU steps take turns on the CPU, so on one
      machine (c) behaves like (b);
  (d) isolated, `trainer: {share_devices: true}`: independent steps (base_eval beside sft, rm beside them)
      really run at the same time on the CPU, which is why (c) does not do it by default.

Goal: (b)/(a) and (c)/(a) at most 1.05; (d) is reported, not a goal.

    .venv/bin/python benchmarks/bench_isolation.py            # the full quickstart (about 2.5 min a run)
    .venv/bin/python benchmarks/bench_isolation.py --quick    # a shortened quickstart
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))
from figures import Project  # noqa: E402  (runs a shipped spec as a user does, in a scratch project)

sys.path.insert(0, str(REPO))
from benchmarks.record import Results  # noqa: E402

QUICK = ["steps.base.max_steps=60", "steps.base.val_every=30", "steps.sft.max_steps=40", "steps.sft.val_every=20",
         "steps.sft.data.n_per_task=40", "steps.sft.data.eval_per_task=8", "steps.rm.epochs=1",
         "steps.rm.data.n_per_task=40", "steps.ppo.iterations=4", "steps.ppo.rollouts=16",
         "steps.final_eval.tasks.n_per_task=4"]
MODES = {"a in-process": (["--in-process"], []), "b isolated, one step at a time": ([], ["max_parallel=1"]),
         "c isolated, default scheduling": ([], []),
         "d isolated, CPU steps overlapping": ([], ["trainer.share_devices=true"])}


def run_once(workdir: Path, flags: list[str], sets: list[str]) -> float:
    """Wall seconds of one `llmcycle run` of the quickstart into an empty workdir."""
    shutil.rmtree(workdir, ignore_errors=True)
    return Project(workdir).run("quickstart", *sets, flags=tuple(flags))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shortened quickstart")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (a, b, c, d); the median is reported")
    args = parser.parse_args()
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-isolation-") as tmp:
        for round_ in range(args.rounds):
            for mode, (flags, sets) in MODES.items():
                seconds = run_once(Path(tmp) / "project", flags, (QUICK if args.quick else []) + sets)
                times[mode].append(seconds)
                print(f"round {round_ + 1}: {mode:<30} {seconds:7.1f} s", flush=True)
    base = statistics.median(times["a in-process"])
    print(f"\nquickstart{' (--quick)' if args.quick else ''}, median of {args.rounds} round(s), this machine "
          f"({os.cpu_count()} cores):")
    results = Results(__file__, "quick" if args.quick else "")
    for mode, values in times.items():
        value = statistics.median(values)
        print(f"  {mode:<30} {value:7.1f} s   {value / base:5.3f}x of (a)")
        if not mode.startswith("a "):
            results.add(f"quickstart wall time, {mode[2:]}", value, "s", "`--in-process`", base,
                        goal="report" if mode.startswith("d ") else "<= 1.05",
                        note=f"median of {args.rounds} round(s)" if mode.startswith("b ") else None)
    results.write()


if __name__ == "__main__":
    main()
