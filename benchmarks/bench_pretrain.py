"""Training throughput of the `pretrain` component against a hand-written PyTorch loop and transformers' Trainer.

Same model (a Llama from config), same token blocks, batch, steps, optimizer (AdamW, cosine schedule,
grad-norm clipping) and precision for all three; tokens/s are measured from the first batch to the last,
and achieved FLOP/s (6·N·tokens/s) is compared with this machine's matmul peak measured in the same run.

    .venv/bin/python benchmarks/bench_pretrain.py [--quick] [--precision bf16-mixed|32-true]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from components.lib.context import StepContext  # noqa: E402
from schemas.resources import TrainerSpec  # noqa: E402


def make_ctx(root: Path, name: str, precision: str, upstream: dict | None = None) -> StepContext:
    out = root / name / "out"
    out.mkdir(parents=True, exist_ok=True)
    return StepContext(name=name, kind=name, fingerprint="0" * 64, out_dir=out, ckpt_dir=root / name / "ckpt",
                       base_dir=root, workdir=root, seed=0, upstream=upstream or {},
                       trainer=TrainerSpec(accelerator="cpu", precision=precision))


def tokenized(root: Path):
    from components import tokenize
    from components.lib.context import StepResult
    from schemas.steps.tokenize import TokenizeSpec

    ctx = make_ctx(root, "tokenizer", "32-true")
    out = tokenize.run(TokenizeSpec(kind="tokenize", corpus={"builtin": "pydoc"}, vocab_size=2048), ctx)
    return StepResult(name="tokenizer", kind="tokenize", fingerprint="0" * 64, dir=ctx.out_dir,
                      outputs=out.outputs, metrics=out.metrics)


def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 1.5) -> float:
    """FLOP/s of a square matmul on this machine now (the ceiling the training loops are compared with)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision.startswith("bf16") else contextlib.nullcontext()


def hand_loop(spec, tok, blocks, precision: str) -> float:
    """(a) The minimal loop: forward, backward, clip, AdamW step, schedule step."""
    from components.lib import models
    from components.lib.training import configure_optimizer

    torch.manual_seed(0)
    model = models.build_model(spec.model, tok, "causal")
    opt = configure_optimizer(model.named_parameters(), spec.optimizer, spec.schedule, spec.max_steps)
    optimizer, sched = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    model.train()
    start = time.perf_counter()
    for batch in blocks:
        with autocast(precision):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sched.step()
    return len(blocks) * blocks[0].numel() / (time.perf_counter() - start)


def component(spec, tok, root: Path, precision: str) -> tuple[float, int]:
    """(b) The pretrain component end to end; tokens/s from its own throughput meter."""
    from components import pretrain

    ctx = make_ctx(root, "base", precision, {"tokenizer": tok})
    out = pretrain.run(spec, ctx)
    return out.metrics["perf/tokens_per_s"], int(out.metrics["params/total"])


def hf_trainer(spec, tok, blocks, root: Path, precision: str) -> float:
    """(c) transformers' Trainer on the same blocks."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from components.lib import models

    class Timer(TrainerCallback):
        start = end = None

        def on_step_begin(self, args, state, control, **kw):
            self.start = self.start or time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.end = time.perf_counter()

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}

    rows = [r for b in blocks for r in b]
    torch.manual_seed(0)
    model = models.build_model(spec.model, tok, "causal")
    args = TrainingArguments(output_dir=str(root / "hf"), per_device_train_batch_size=spec.batch_size,
                             max_steps=spec.max_steps, learning_rate=spec.optimizer.lr, weight_decay=0.1,
                             adam_beta1=spec.optimizer.betas[0], adam_beta2=spec.optimizer.betas[1],
                             lr_scheduler_type="cosine", warmup_steps=spec.schedule.warmup_steps,
                             max_grad_norm=spec.grad_clip, bf16=precision.startswith("bf16"), use_cpu=True,
                             save_strategy="no", report_to=[], logging_steps=10_000, dataloader_num_workers=0,
                             disable_tqdm=True, seed=0)
    timer = Timer()
    Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[timer]).train()
    return len(rows) * rows[0].numel() / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (contended machines)")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="rounds of (a, b, c); the best of each counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from components.lib import models
    from components.lib.tokens import TokenDataModule
    from schemas.steps.pretrain import PretrainSpec

    size = {"layers": 2, "hidden": 128, "heads": 4} if args.quick else {"layers": 4, "hidden": 256, "heads": 8}
    steps = args.steps or (30 if args.quick else 100)
    root = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    tok_result = tokenized(root)
    tok = models.load_tokenizer(str(tok_result.path("tokenizer")))
    spec = PretrainSpec(kind="pretrain", tokenizer="tokenizer", model={"family": "llama", "context": 128, **size},
                        optimizer={"lr": 1e-3, "weight_decay": 0.1}, schedule={"warmup_steps": 5}, batch_size=16,
                        max_steps=steps, val_every=10 * steps, checkpoint_every=10 * steps, log_model=False)
    data = TokenDataModule(str(tok_result.path("tokens")), context=128, batch_size=16, seed=0, tokenizer=tok)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    blocks = []
    while len(blocks) < steps:
        try:
            blocks.append(next(loader))
        except StopIteration:
            loader = iter(data.train_dataloader())

    peak = matmul_peak(torch.bfloat16 if args.precision.startswith("bf16") else torch.float32)
    peak32 = matmul_peak(torch.float32) if args.precision.startswith("bf16") else peak
    # Rounds of a, b, c in turn, best of each: on a shared machine, load from other processes then hits
    # all three alike instead of whichever happened to run during a burst.
    best = {"a": 0.0, "b": 0.0, "c": 0.0}
    for i in range(args.repeats or (2 if args.quick else 3)):
        best["a"] = max(best["a"], hand_loop(spec, tok, blocks, args.precision))
        rate, params = component(spec, tok_result, root / f"round{i}", args.precision)
        best["b"] = max(best["b"], rate)
        best["c"] = max(best["c"], hf_trainer(spec, tok, blocks, root / f"round{i}", args.precision))
    a, b, c = best["a"], best["b"], best["c"]
    flops = 6 * params * b
    print(f"\nmodel: llama {size}, {params:,} params; batch 16x128; {steps} steps; precision {args.precision}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'(a) hand-written loop':<28}{a:>10,.0f} tokens/s")
    print(f"{'(b) pretrain component':<28}{b:>10,.0f} tokens/s")
    print(f"{'(c) transformers Trainer':<28}{c:>10,.0f} tokens/s")
    print(f"b/a = {b / a:.3f} (goal >= 0.97)   b/c = {b / c:.3f} (goal >= 1.0)")
    print(f"achieved {flops / 1e9:.1f} GFLOP/s (6N x tokens/s) = {flops / peak32:.2f} of this machine's fp32 matmul "
          f"peak {peak32 / 1e9:.1f} GFLOP/s (goal >= 0.6); {flops / peak:.2f} of the {args.precision} matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")
    if not math.isfinite(b):
        sys.exit(1)


if __name__ == "__main__":
    main()
