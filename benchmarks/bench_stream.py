"""Streamed JSONL: peak memory of a finetune on a 2 GB file against the same on a 200 MB one (goal: within 10%).

Both files are written in a temporary folder from the builtin task rows (each row with an id, so that rows
differ as real rows do). Each finetune runs in a subprocess of its own and does what the step entry
(flows/step.py) does with its data: hash the input files for the fingerprint (flows/plan.input_identity), check
every row (schemas/rows.check_data), then run the component (components/finetune.run) with `data.stream: auto`,
LoRA on a tiny random Llama (bench_finetune.build_base), a few steps. Peak memory is that process's ru_maxrss.
`--loaded MB` adds the same finetune on a file of that size loaded whole (`data.stream: false`), for scale.

    .venv/bin/python benchmarks/bench_stream.py             # 200 MB vs 2 GB (minutes: every row is checked)
    .venv/bin/python benchmarks/bench_stream.py --quick     # 100 MB vs 1 GB
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchmarks.record import Results, child_result  # noqa: E402


def write_file(path: Path, megabytes: int) -> int:
    """Task rows with ids up to `megabytes` MiB of JSONL; returns the rows written."""
    from components.lib.tasks import make_examples

    tails = [json.dumps({"prompt": r["prompt"], "completion": r["completion"], "task": r["task"]})[1:]
             for r in make_examples(0, "train", 300)]
    target, size, n = megabytes * 2 ** 20, 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while size < target:
            chunk = "".join(f'{{"id": {i}, {tails[i % len(tails)]}\n' for i in range(n, n + 10_000))
            fh.write(chunk)
            size, n = size + len(chunk), n + 10_000
    return n


def one(args: argparse.Namespace) -> None:
    """One finetune on one file, in this process; print its figures as JSON."""
    from components import finetune
    from flows.plan import input_identity
    from schemas.rows import check_data
    from schemas.steps.finetune import FinetuneSpec

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_ctx

    path = Path(args.one)
    spec = FinetuneSpec.model_validate({
        "kind": "finetune", "model": args.base, "data": {"files": [path.name], "stream": args.stream, "max_length": 64},
        "peft": {"method": "lora", "r": 8}, "max_steps": args.steps, "batch_size": 16, "val_every": args.steps,
        "val_batches": 2, "evaluation": None, "checkpoint_every": 10 ** 6})
    ctx = make_ctx(Path(tempfile.mkdtemp()), name="sft", kind="finetune", base_dir=path.parent)
    times = {}
    started = time.perf_counter()
    input_identity(spec, path.parent)
    times["hash_s"] = time.perf_counter() - started
    started = time.perf_counter()
    check_data(spec, ctx.resolve_path)
    times["check_s"] = time.perf_counter() - started
    started = time.perf_counter()
    out = finetune.run(spec, ctx)
    times["finetune_s"] = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"peak_mb": peak_mb, **times, "steps": out.metrics["train/steps"],
                                  "train_loss": out.metrics.get("train/loss")}))


def run_one(path: Path, base: Path, stream: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--one", str(path), "--base", str(base), "--stream", stream, "--steps", str(steps)]
    return child_result(cmd, path.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100 MB vs 1 GB")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--loaded", type=int, default=0, help="also a finetune on a file of this many MB, loaded whole")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--stream", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    from bench_finetune import build_base

    small_mb, big_mb = (100, 1024) if args.quick else (200, 2048)
    tmp = Path(tempfile.mkdtemp(prefix="bench_stream-"))
    base = tmp / "base"
    build_base(base, 2, 128)
    runs, rows = {}, {}
    try:
        for name, mb, stream in [("small", small_mb, "auto"), ("big", big_mb, "auto")] + \
                ([("loaded", args.loaded, "false")] if args.loaded else []):
            path = tmp / f"{name}.jsonl"
            started = time.perf_counter()
            rows[name] = write_file(path, mb)
            print(f"wrote {path.name}: {mb} MB, {rows[name]:,} rows ({time.perf_counter() - started:.0f} s)", flush=True)
            runs[name] = {"mb": mb, "stream": stream, **run_one(path, base, stream, args.steps)}
            path.unlink()
    finally:
        for leftover in tmp.glob("*.jsonl"):
            leftover.unlink()
    print(f"\nfinetune, LoRA r=8 on Llama 2x128, {args.steps} steps of 16 rows, data.stream as shown; peak RSS of the "
          "process (torch and the model included)")
    print(f"{'file':>8} {'stream':>7} {'rows':>11} {'peak MB':>8} {'hash s':>7} {'check s':>8} {'finetune s':>10}")
    for name, r in runs.items():
        print(f"{r['mb']:>5} MB {r['stream']:>7} {rows[name]:>11,} {r['peak_mb']:>8.0f} {r['hash_s']:>7.1f} "
              f"{r['check_s']:>8.1f} {r['finetune_s']:>10.1f}")
    small, big = runs["small"], runs["big"]
    ratio = big["peak_mb"] / small["peak_mb"]
    print(f"\npeak memory {big_mb} MB vs {small_mb} MB: {ratio:.3f}x (goal <= 1.10)")
    results = Results(__file__, "quick" if args.quick else "")
    note = (f"LoRA finetune, {args.steps} steps, data.stream auto; each in its own process after hashing and "
            f"checking every row; {rows['small']:,} vs {rows['big']:,} rows")
    results.add(f"peak RSS, finetune on a {big_mb} MB JSONL vs a {small_mb} MB one", big["peak_mb"], "MB",
                f"the same on {small_mb} MB", small["peak_mb"], goal="<= 1.10", note=note)
    if "loaded" in runs:
        loaded = runs["loaded"]
        results.add(f"peak RSS, finetune on {loaded['mb']} MB loaded whole (stream: false) vs streamed {small_mb} MB",
                    loaded["peak_mb"], "MB", f"streamed {small_mb} MB", small["peak_mb"])
    results.write()


if __name__ == "__main__":
    main()
