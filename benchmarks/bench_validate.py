"""Wall time of `llmcycle validate` against the floor it stands on: `python -c "import pydantic, yaml"`.

Both run as fresh processes, alternately, in the same run; the ratio says what validating a spec
costs beyond starting Python and importing its two libraries (goal: well under a second in all).

    .venv/bin/python benchmarks/bench_validate.py [--quick] [--repeats 10] [SPEC]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.record import Results  # noqa: E402


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(REPO / "specs" / "quickstart.yaml"))
    parser.add_argument("--repeats", type=int, default=None, help="runs of each (default 10; --quick 3)")
    parser.add_argument("--quick", action="store_true", help="3 runs of each")
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 10)
    llmcycle = Path(sys.executable).with_name("llmcycle")
    commands = {
        "baseline": [sys.executable, "-c", "import pydantic, yaml"],
        "validate": [str(llmcycle), "validate", args.spec] if llmcycle.exists()
        else [sys.executable, "-m", "flows.cli", "validate", args.spec],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for name, command in commands.items():  # warm the file cache once
        timed(command)
    for _ in range(args.repeats):
        for name, command in commands.items():
            times[name].append(timed(command))
    print(f"{Path(args.spec).name}, {args.repeats} runs each (median, min):")
    for name, values in times.items():
        print(f"  {name:<9} {statistics.median(values) * 1000:7.0f} ms  {min(values) * 1000:7.0f} ms   "
              f"{' '.join(commands[name][-3:])}")
    ratio = statistics.median(times["validate"]) / statistics.median(times["baseline"])
    print(f"  ratio validate/baseline: {ratio:.2f}x; validate median "
          f"{statistics.median(times['validate']) * 1000:.0f} ms (goal: well under 1000 ms)")
    results = Results(__file__, "quick" if args.quick else "")
    results.add(f"`llmcycle validate {Path(args.spec).name}` wall time, median of {args.repeats}",
                statistics.median(times["validate"]) * 1000, "ms", baseline='`python -c "import pydantic, yaml"`',
                baseline_value=statistics.median(times["baseline"]) * 1000, goal="well under 1000 ms")
    results.write()


if __name__ == "__main__":
    main()
