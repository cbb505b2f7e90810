"""Wall time of `llmcycle validate` against the floor it stands on: `python -c "import pydantic, yaml"`.

Both run as fresh processes, alternately, in the same run; the ratio says what validating a spec
costs beyond starting Python and importing its two libraries (goal: well under a second in all).

    .venv/bin/python benchmarks/bench_validate.py [--repeats 10] [SPEC]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(REPO / "specs" / "quickstart.yaml"))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
