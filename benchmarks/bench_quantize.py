"""What lower precision costs and saves: fp32 vs bf16, fp16, torchao int8 and int4, through the optimize step.

One run: a tokenize step (pydoc, 2048 tokens), a short pretrain of a Llama built from config (so held-out
perplexity means something), then `optimize` with every variant, each measured as loaded back from its folder
the way evaluate and generate load it: size on disk, size in memory and held-out perplexity on the same
windows (components/lib/scoring.py), as the step reports them. Latency per generated token (greedy, batch 1,
this machine's torch threads) is measured again here, best of `repeats` rounds that take every variant in
turn, so that load from other processes on a shared machine hits all alike. Ratios are against the fp32 model
measured in the same run.

    .venv/bin/python benchmarks/bench_quantize.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from benchmarks.record import Results  # noqa: E402

VARIANTS = ["bf16", "fp16", "int8", "int4"]


def pretrained(root: Path, size: dict, steps: int):
    """The tokenize and pretrain results: a Llama trained for `steps` batches of 16 x 128 tokens."""
    from bench_pretrain import make_ctx, tokenized  # noqa: the sibling benchmark's helpers

    from components import pretrain
    from components.lib.context import StepResult
    from schemas.steps.pretrain import PretrainSpec

    tok = tokenized(root)
    spec = PretrainSpec(kind="pretrain", tokenizer="tokenizer", model={"family": "llama", "context": 128, **size},
                        optimizer={"lr": 3e-3, "weight_decay": 0.1}, schedule={"warmup_steps": 10}, batch_size=16,
                        max_steps=steps, val_every=steps, val_batches=2, checkpoint_every=10 * steps,
                        log_model=False)
    ctx = make_ctx(root, "base", "32-true", {"tokenizer": tok})
    out = pretrain.run(spec, ctx)
    base = StepResult(name="base", kind="pretrain", fingerprint="1" * 64, dir=ctx.out_dir, outputs=out.outputs,
                      metrics=out.metrics)
    return tok, base, int(out.metrics["params/total"])


def interleaved_latency(out_dir: Path, measure, repeats: int) -> dict[str, float]:
    """Best ms per generated token of each variant folder (`model/` is the fp32 baseline), variants in turn."""
    from components.lib.models import load_model
    from components.lib.serving import ms_per_token

    models = {v: load_model(out_dir / ("model" if v == "baseline" else v)) for v in ["baseline", *VARIANTS]}
    best = {v: float("inf") for v in models}
    for _ in range(repeats):
        for v, (model, tok) in models.items():
            best[v] = min(best[v], ms_per_token(model.eval(), tok, measure.prompt, measure.new_tokens, 1))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers x 128 wide, 60 pretraining steps")
    parser.add_argument("--steps", type=int, help="pretraining steps (default 200; --quick 60)")
    parser.add_argument("--repeats", type=int, default=5, help="latency measurements per variant")
    args = parser.parse_args()
    from bench_pretrain import make_ctx

    from components import optimize
    from schemas.steps.optimize import OptimizeSpec

    size = {"layers": 2, "hidden": 128, "heads": 4} if args.quick else {"layers": 4, "hidden": 256, "heads": 8}
    steps = args.steps or (60 if args.quick else 200)
    root = Path(tempfile.mkdtemp(prefix="bench_quantize_"))
    started = time.perf_counter()
    tok, base, params = pretrained(root, size, steps)
    print(f"pretrained llama {size}, {params:,} params, {steps} steps in {time.perf_counter() - started:.0f} s; "
          f"val/perplexity {base.metrics['val/perplexity']:.1f}")

    spec = OptimizeSpec(kind="optimize", model="base", quantize=VARIANTS,
                        measure={"tokens": "tokenizer", "context": 128, "batches": 4, "batch_size": 8,
                                 "new_tokens": 32, "repeats": args.repeats})
    ctx = make_ctx(root, "optimize", "32-true", {"tokenizer": tok, "base": base})
    m = optimize.run(spec, ctx).metrics
    latency = interleaved_latency(ctx.out_dir, spec.measure, args.repeats)
    for v, ms in latency.items():
        m[f"{v}/ms_per_token"], m[f"{v}/speedup"] = ms, latency["baseline"] / ms
    print(f"\n{len(VARIANTS) + 1} variants of the same model; perplexity on {4 * 8} held-out windows of 128 tokens; "
          f"latency: 32 greedy tokens, batch 1, best of {args.repeats} interleaved rounds, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'variant':<9}{'disk MB':>9}{'memory MB':>11}{'ms/token':>10}{'perplexity':>12}"
          f"{'disk':>8}{'memory':>8}{'speed':>8}{'ppl':>8}   (ratios to fp32)")
    for v in ["baseline", *VARIANTS]:
        ratios = "".join(f"{m[f'{v}/{k}']:>7.2f}x" for k in ("size_ratio", "memory_ratio", "speedup")) \
            if v != "baseline" else f"{'1.00x':>8}" * 3
        print(f"{'fp32' if v == 'baseline' else v:<9}{m[f'{v}/size_mb']:>9.2f}{m[f'{v}/memory_mb']:>11.2f}"
              f"{m[f'{v}/ms_per_token']:>10.2f}{m[f'{v}/perplexity']:>12.2f}{ratios}"
              f"{m[f'{v}/perplexity'] / m['baseline/perplexity']:>7.3f}x")
    print("int4 is stored as bf16 on disk and quantized as it loads (components/lib/quantize.py)")
    results = Results(__file__, "quick" if args.quick else "")
    for v in VARIANTS:
        note = (f"Llama {size}, {params / 1e6:.1f}M params, batch 1 greedy, best of {args.repeats}" if v == VARIANTS[0]
                else None)
        results.add(f"{v}: size in memory", m[f"{v}/memory_mb"], "MB", "fp32", m["baseline/memory_mb"], note=note)
        results.add(f"{v}: ms per generated token", m[f"{v}/ms_per_token"], "ms", "fp32", m["baseline/ms_per_token"])
        results.add(f"{v}: held-out perplexity", m[f"{v}/perplexity"], "", "fp32", m["baseline/perplexity"])
    results.write()


if __name__ == "__main__":
    main()
