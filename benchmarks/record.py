"""The results file of a benchmark run: `benchmarks/results/<bench>[.<variant>].json`, one JSON row per figure.

Every `bench_*.py` keeps printing its side-by-side table and also records its figures here, so that
`benchmarks/report.py` (`make bench`) prints them together and docs/figures.py writes the README's benchmark
table from them. A row is a figure measured against a baseline in the same run:

    {"benchmark": "bench_pretrain", "variant": "quick", "figure": "tokens/s, pretrain component vs Trainer",
     "value": 10150.2, "unit": "tokens/s", "baseline": "transformers Trainer", "baseline_value": 10171.0,
     "ratio": 0.998, "goal": ">= 1.0", "note": "...", "machine": {"cpu": ..., "cores": 2, "torch": "2.13.0+cpu",
     "cuda_device": null, "load": 1.5}, "commit": "592706b...+dirty", "date": "2026-12-02T07:00:00Z",
     "command": "benchmarks/bench_pretrain.py --quick"}

`ratio` is value / baseline_value unless the benchmark says otherwise (its `note` then says how). One run
replaces its file (written atomically); the variant (`quick`, `cuda-125m`, ...) keeps a shortened or GPU run
from replacing the full one. The files are committed: the README's table is generated from them, so it can
be rerun and checked. `LLMCYCLE_BENCH_RESULTS` points the files elsewhere (tests, a scratch run).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FIELDS = ("benchmark", "variant", "figure", "value", "unit", "baseline", "baseline_value", "ratio", "goal", "note",
          "machine", "commit", "date", "command")


def folder() -> Path:
    """Where results files go: `LLMCYCLE_BENCH_RESULTS`, else benchmarks/results."""
    return Path(os.environ.get("LLMCYCLE_BENCH_RESULTS") or RESULTS)


def machine() -> dict:
    """The CPU model, its cores, the torch version and the CUDA device the figures were measured on, and the
    machine's 5-minute load average as the run ended (other processes on a shared machine slow every figure)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    load = round(os.getloadavg()[1], 1) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch_version, "cuda_device": cuda_device(), "load": load}


def cuda_device() -> str | None:
    """The CUDA device torch uses, when torch is imported and sees one; else the NVIDIA driver's first GPU."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        return torch.cuda.get_device_name(0) + (f" x {count}" if count > 1 else "")
    gpus = sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))
    for info in gpus[:1]:
        model = next((ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("Model")),
                     None)
        if model:
            return model + (f" x {len(gpus)}" if len(gpus) > 1 else "")
    return None


def commit() -> str | None:
    """`git rev-parse HEAD`, with `+dirty` when tracked files differ from it (None outside a git checkout)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: no index refresh beside other engineers' git
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, env=env,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


class Results:
    """The figures of one benchmark run; `write()` replaces its results file with them."""

    def __init__(self, benchmark: str, variant: str = ""):
        self.benchmark, self.variant = Path(benchmark).stem, variant
        self.rows: list[dict] = []
        self.common = {"machine": machine(), "commit": commit(),
                       "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "command": " ".join([_shown(sys.argv[0]), *sys.argv[1:]])}

    @property
    def path(self) -> Path:
        return folder() / (f"{self.benchmark}.{self.variant}.json" if self.variant else f"{self.benchmark}.json")

    def add(self, figure: str, value: float | None, unit: str, baseline: str | None = None,
            baseline_value: float | None = None, ratio: float | None = None, goal: str | None = None,
            note: str | None = None) -> dict:
        """Record one figure (and its baseline, measured in the same run); `ratio` defaults to
        value / baseline_value."""
        if ratio is None and _number(value) and _number(baseline_value) and baseline_value:
            ratio = value / baseline_value
        row = {"benchmark": self.benchmark, "variant": self.variant, "figure": figure, "value": _plain(value),
               "unit": unit, "baseline": baseline, "baseline_value": _plain(baseline_value), "ratio": _plain(ratio),
               "goal": goal, "note": note, **self.common}
        self.rows.append(row)
        return row

    def write(self) -> Path:
        """Replace this benchmark's results file (atomically: readers see the old rows or the new ones)."""
        sys.path.insert(0, str(REPO))
        from components.lib.io import write_text_atomic

        write_text_atomic(self.path, json.dumps(self.rows, indent=1) + "\n")
        print(f"results: {len(self.rows)} figures in {_shown(self.path)}")
        return self.path


def child_result(cmd: list[str], what: str) -> dict:
    """Run one configuration of a benchmark in its own process (so its memory and start-up are its own) and
    return the JSON it printed on its `RESULT ` line; exit naming `what` and the child's output when it failed."""
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def read(where: Path | None = None) -> list[dict]:
    """Every row of every results file in `where` (default: folder()), file by file in name order."""
    rows = []
    for path in sorted((where or folder()).glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, list) or not all(isinstance(r, dict) and "figure" in r for r in data):
            raise ValueError(f"{path}: expected a JSON list of figure rows (benchmarks/record.py)")
        rows += data
    return rows


def _shown(path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _plain(value):
    """A JSON number (NaN and infinities become null: JSON has no such numbers)."""
    if value is None or isinstance(value, bool):
        return value
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None
