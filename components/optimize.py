"""`optimize`: merge LoRA adapters, prune by magnitude, write bf16/fp16/int8/int4 variants; measure them side by side.

Reads: `model` (and optionally a step's peft `adapter`, merged with peft's `merge_and_unload`), the held-out
tokens of `measure.tokens`. Writes: `model/` (the float model after merging and pruning, safetensors; loads
with `from_pretrained`) and one folder per `quantize` variant, made from `model/` (components/lib/quantize.py):
`bf16/`, `fp16/` (plain transformers folders in that dtype), `int8/` (torchao weight-only int8 through
transformers' TorchAoConfig, safetensors), `int4/` (bf16 weights + `quantization.json`, int4 as it loads).
Every folder loads with `components.lib.models.load_model`, as `evaluate`, `generate` and `register` load
models, and each variant is measured as loaded from its folder. Logs per variant (baseline, pruned, each
quantized one): size on disk, size in memory, generation latency per token and held-out perplexity, plus a
table. Methods: magnitude pruning (Han et al. 2015) with torch.nn.utils.prune; weight-only quantization
(weights stored in int8 or int4 with per-channel or per-group scales, matmuls in float) with torchao.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from components.lib import quantize, scoring
from components.lib.context import StepContext, StepOutput
from components.lib.models import context_length, load_model, save_pretrained
from components.lib.peft import finalize_pruning, prune_by_magnitude, sparsity_of
from components.lib.serving import ms_per_token, size_mb
from components.lib.text import pad_token
from schemas.steps.optimize import MeasureSpec, OptimizeSpec


def run(spec: OptimizeSpec, ctx: StepContext) -> StepOutput:
    """Merge, prune, quantize; measure the baseline and every variant the same way."""
    source = ctx.model_source(spec.model)
    adapter = ctx.step(spec.adapter).path("adapter") if spec.adapter else None
    model, tokenizer = load_model(adapter or source, base=source if adapter else None)
    model.eval()
    windows = held_out_windows(ctx, spec.measure, model, tokenizer)
    scratch = ctx.out_dir / ".scratch"
    rows = [measure("baseline", model, tokenizer, spec.measure, windows, save_pretrained(model, tokenizer, scratch))]
    shutil.rmtree(scratch)

    if spec.prune is not None:
        prune_by_magnitude(model, spec.prune.sparsity, spec.prune.scope)
        finalize_pruning(model)
    save_pretrained(model, tokenizer, ctx.out_dir / "model")
    if spec.prune is not None:
        rows.append(measure("pruned", model, tokenizer, spec.measure, windows, ctx.out_dir / "model",
                            sparsity=sparsity_of(model)))
    outputs = {"model": "model"}
    for variant in spec.quantize:
        folder = quantize.save_variant(ctx.out_dir / "model", variant, ctx.out_dir / variant)
        loaded, _ = load_model(folder)  # measured as every later reader loads it
        rows.append(measure(variant, loaded.eval(), tokenizer, spec.measure, windows, folder))
        outputs[variant] = variant
        del loaded

    metrics = {f"{r['variant']}/{k}": v for r in rows for k, v in r.items() if k != "variant"}
    base = rows[0]
    for r in rows[1:]:
        metrics[f"{r['variant']}/size_ratio"] = r["size_mb"] / base["size_mb"]
        metrics[f"{r['variant']}/memory_ratio"] = r["memory_mb"] / base["memory_mb"]
        metrics[f"{r['variant']}/speedup"] = base["ms_per_token"] / r["ms_per_token"]
    ctx.log_table(rows, "optimize.json")
    print(format_table(rows), flush=True)
    return StepOutput(outputs=outputs, metrics=metrics, info={"table": format_table(rows)})


# -- measurements ----------------------------------------------------------------------------------


def held_out_windows(ctx: StepContext, m: MeasureSpec, model, tokenizer) -> list[scoring.Window]:
    """The held-out windows every variant is scored on: the first `batches x batch_size` of `measure.tokens`."""
    if m.tokens is None:
        return []
    context = min(m.context, context_length(model))
    return scoring.heldout_windows(ctx.step(m.tokens).path("tokens"), tokenizer, context, m.batches * m.batch_size)


def measure(variant: str, model, tokenizer, m: MeasureSpec, windows, folder: Path, **extra: float) -> dict:
    row = {"variant": variant, "size_mb": size_mb(folder), "memory_mb": quantize.weight_bytes(model) / 2**20,
           "ms_per_token": ms_per_token(model, tokenizer, m.prompt, m.new_tokens, m.repeats)}
    if windows:
        row["perplexity"] = scoring.score_windows(model, windows, m.batch_size, pad_token(tokenizer)).perplexity
    return {**row, **extra}


def format_table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "variant"] + sorted({k for r in rows for k in r} - set(rows[0]))
    lines = [f"{'variant':<10}" + "".join(f"{k:>14}" for k in keys)]
    for r in rows:
        lines.append(f"{r['variant']:<10}" + "".join(f"{r[k]:>14.4g}" if k in r else f"{'-':>14}" for k in keys))
    return "\n".join(lines)
