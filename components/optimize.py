"""`optimize`: merge LoRA adapters, prune by magnitude, quantize to int8; measure every variant side by side.

Reads: `model` (and optionally a step's peft `adapter`, merged with peft's `merge_and_unload`), the held-out
tokens of `measure.tokens`. Writes: `model/` (the float model after merging and pruning, safetensors;
loads with `from_pretrained`) and, with `quantize: int8`, `quantized/` (config, tokenizer,
`model_int8.pt`, `quantization.json`; load it with `load_quantized`). Logs per variant (baseline,
pruned, int8): size on disk, generation latency per token and held-out perplexity, plus a table.
Methods: magnitude pruning (Han et al. 2015) with torch.nn.utils.prune; dynamic int8 quantization
(weights int8, activations quantized on the fly) with torch.ao.quantization.quantize_dynamic.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import torch

from components.lib import quantize, scoring
from components.lib.context import StepContext, StepOutput
from components.lib.models import context_length, load_model, save_pretrained
from components.lib.peft import finalize_pruning, prune_by_magnitude, sparsity_of
from components.lib.text import encode, pad_token, start_token
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
    if spec.quantize == "int8":
        qmodel = quantize.quantize_int8(model)
        quantize.save_quantized(qmodel, tokenizer, ctx.out_dir / "quantized")
        rows.append(measure("int8", qmodel, tokenizer, spec.measure, windows, ctx.out_dir / "quantized"))
        outputs["quantized"] = "quantized"

    metrics = {f"{r['variant']}/{k}": v for r in rows for k, v in r.items() if k != "variant"}
    base = rows[0]
    for r in rows[1:]:
        metrics[f"{r['variant']}/size_ratio"] = r["size_mb"] / base["size_mb"]
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


@torch.inference_mode()
def ms_per_token(model, tokenizer, m: MeasureSpec) -> float:
    """Median wall time per generated token over `repeats` greedy generations (after one warm-up)."""
    ids = torch.tensor([encode(tokenizer, m.prompt) or [start_token(tokenizer)]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs = dict(max_new_tokens=m.new_tokens, min_new_tokens=m.new_tokens, do_sample=False,
                  pad_token_id=pad_token(tokenizer))
    model.generate(**batch, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    times = []
    for _ in range(m.repeats):
        started = time.perf_counter()
        model.generate(**batch, **kwargs)
        times.append((time.perf_counter() - started) / m.new_tokens)
    return 1000 * statistics.median(times)


def size_mb(folder: Path) -> float:
    """Size of the weight files (not the tokenizer) on disk."""
    weights = [f for f in folder.iterdir() if f.suffix in (".safetensors", ".pt", ".bin")]
    return sum(f.stat().st_size for f in weights) / 2**20


def measure(variant: str, model, tokenizer, m: MeasureSpec, windows, folder: Path, **extra: float) -> dict:
    row = {"variant": variant, "size_mb": size_mb(folder), "ms_per_token": ms_per_token(model, tokenizer, m)}
    if windows:
        row["perplexity"] = scoring.score_windows(model, windows, m.batch_size, pad_token(tokenizer)).perplexity
    return {**row, **extra}


def format_table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "variant"] + sorted({k for r in rows for k in r} - set(rows[0]))
    lines = [f"{'variant':<10}" + "".join(f"{k:>14}" for k in keys)]
    for r in rows:
        lines.append(f"{r['variant']:<10}" + "".join(f"{r[k]:>14.4g}" if k in r else f"{'-':>14}" for k in keys))
    return "\n".join(lines)
