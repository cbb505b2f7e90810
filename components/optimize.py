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

import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch

from components.context import StepContext, StepOutput
from schemas.steps.optimize import MeasureSpec, OptimizeSpec

INT8_FILE = "model_int8.pt"
QUANT_FILE = "quantization.json"


def run(spec: OptimizeSpec, ctx: StepContext) -> StepOutput:
    from components.registry import load_merged

    source = ctx.model_source(spec.model)
    if spec.adapter:
        model, tokenizer = load_merged(ctx.step(spec.adapter).path("adapter"), base=source)
    else:
        model, tokenizer = load_merged(source)
    model.eval()
    windows = held_out_windows(ctx, spec.measure)
    scratch = ctx.out_dir / ".scratch"
    rows = [measure("baseline", model, tokenizer, spec.measure, windows, save_float(model, tokenizer, scratch))]
    shutil.rmtree(scratch)

    if spec.prune is not None:
        prune_linear(model, spec.prune.sparsity, spec.prune.scope)
    save_float(model, tokenizer, ctx.out_dir / "model")
    if spec.prune is not None:
        rows.append(measure("pruned", model, tokenizer, spec.measure, windows, ctx.out_dir / "model",
                            sparsity=sparsity(model)))
    outputs = {"model": "model"}
    if spec.quantize == "int8":
        qmodel = quantize_int8(model)
        save_quantized(qmodel, tokenizer, ctx.out_dir / "quantized")
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


# -- transformations -------------------------------------------------------------------------------


def _block_linears(model) -> list[torch.nn.Linear]:
    """Linear layers inside the transformer blocks; the LM head stays dense (it is also the embedding when tied)."""
    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


def prune_linear(model, amount: float, scope: str) -> None:
    """Zero the smallest-magnitude weights and make the pruning permanent (no masks left behind)."""
    from torch.nn.utils import prune

    layers = _block_linears(model)
    if scope == "global":
        prune.global_unstructured([(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for m in layers:
            prune.l1_unstructured(m, "weight", amount=amount)
    for m in layers:
        prune.remove(m, "weight")


def sparsity(model) -> float:
    layers = _block_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    return zeros / max(1, sum(m.weight.numel() for m in layers))


def quantize_int8(model):
    """Dynamic int8 quantization of every Linear layer: int8 weights, activations quantized per batch at run time."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


# -- saving and loading ----------------------------------------------------------------------------


def save_float(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_quantized(qmodel, tokenizer, folder: Path) -> Path:
    """Save a dynamically quantized model: safetensors cannot hold packed int8 weights, so a state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    qmodel.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(qmodel.state_dict(), folder / INT8_FILE)
    (folder / QUANT_FILE).write_text(json.dumps({
        "method": "torch.ao.quantization.quantize_dynamic", "dtype": "qint8", "modules": ["torch.nn.Linear"],
        "load": "components.optimize.load_quantized(folder)", "torch": torch.__version__}, indent=2))
    return folder


def load_quantized(folder: str | Path):
    """Load a `quantized/` folder: rebuild the float model from its config, quantize it, load the int8 weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from components.models import load_tokenizer

    folder = Path(folder)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    qmodel = quantize_int8(model.eval())
    qmodel.load_state_dict(torch.load(folder / INT8_FILE, weights_only=False))
    return qmodel.eval(), load_tokenizer(str(folder))


def load_any(source: str):
    """(model, tokenizer) from a model folder, hub id, peft adapter or an int8 `quantized/` folder."""
    from components.registry import load_merged

    if (Path(source) / QUANT_FILE).is_file():
        return load_quantized(source)
    model, tokenizer = load_merged(source)
    return model.eval(), tokenizer


# -- measurements ----------------------------------------------------------------------------------


def held_out_windows(ctx: StepContext, m: MeasureSpec) -> list[torch.Tensor]:
    """Batches of consecutive `context`-token windows from the tokens' val split (train tail if none held out)."""
    if m.tokens is None:
        return []
    import numpy as np

    from components.data import read_tokens

    folder = ctx.step(m.tokens).path("tokens")
    tokens = read_tokens(folder, "val")
    if len(tokens) < m.context + 1:
        train = read_tokens(folder, "train")
        tokens = train[-max(len(train) // 10, m.context * m.batch_size):]
    n = min(len(tokens) // m.context, m.batches * m.batch_size)
    blocks = torch.from_numpy(np.asarray(tokens[:n * m.context], dtype=np.int64)).view(n, m.context)
    return list(blocks.split(m.batch_size))


@torch.inference_mode()
def perplexity(model, windows: list[torch.Tensor]) -> float:
    """exp of the mean next-token loss over every predicted position of the windows."""
    total, count = 0.0, 0
    for batch in windows:
        loss = model(input_ids=batch, labels=batch).loss
        n = batch.numel() - batch.shape[0]
        total, count = total + float(loss) * n, count + n
    return math.exp(total / count) if count else float("nan")


@torch.inference_mode()
def ms_per_token(model, tokenizer, m: MeasureSpec) -> float:
    """Median wall time per generated token over `repeats` greedy generations (after one warm-up)."""
    batch = tokenizer([m.prompt], return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=m.new_tokens, min_new_tokens=m.new_tokens, do_sample=False, pad_token_id=pad)
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
        row["perplexity"] = perplexity(model, windows)
    return {**row, **extra}


def format_table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "variant"] + sorted({k for r in rows for k in r} - set(rows[0]))
    lines = [f"{'variant':<10}" + "".join(f"{k:>14}" for k in keys)]
    for r in rows:
        lines.append(f"{r['variant']:<10}" + "".join(f"{r[k]:>14.4g}" if k in r else f"{'-':>14}" for k in keys))
    return "\n".join(lines)
