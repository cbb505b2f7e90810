"""`trainer.compile`: eager against torch.compile'd training steps of each training kind, in the same run.

For each kind, one process times the optimizer step that kind runs (forward, backward, fused AdamW, bf16
autocast on a CPU with fast bf16) on the same model and batches: eager first, then compiled in place
(`nn.Module.compile`, what `trainer.compile: true` does). It reports the one-off compile time (the first
compiled step less an eager one), steps/s of each, their ratio, and the break-even: how many steps the
compiled step must run to win its compile time back (none when the compiled step is not faster).
`compile: auto` (components/lib/training.py `should_compile`) follows these figures.

- pretrain: causal LM loss on full blocks (fixed shape);
- finetune: causal LM loss on task rows padded per batch (the shape changes batch to batch), LoRA;
- reward_model: the score head on chosen+rejected pairs;
- dpo: policy forward on pairs (the reference's forward is no_grad, and stays eager).

    .venv/bin/python benchmarks/bench_compile.py [--quick] [--kinds pretrain,finetune]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KINDS = ("pretrain", "finetune", "reward_model", "dpo")


def batches(kind: str, tok, n: int, batch: int, context: int):
    import torch

    from components.lib.preferences import builtin_pairs, collate_pairs, encode_pairs
    from components.lib.sft import collate, encode_rows
    from components.lib.tasks import make_examples

    g = torch.Generator().manual_seed(0)
    if kind == "pretrain":
        for _ in range(n):
            ids = torch.randint(3, len(tok), (batch, context), generator=g)
            yield {"input_ids": ids, "labels": ids}
    elif kind == "finetune":
        rows = encode_rows(make_examples(0, "train", n * batch // 8 + 1), tok, context)
        for i in range(n):
            yield collate(rows[i * batch:(i + 1) * batch], tok.pad_token_id)
    else:
        items = encode_pairs(builtin_pairs(0, "train", n * batch // 8 + 1), tok, context)
        for i in range(n):
            yield collate_pairs(items[i * batch:(i + 1) * batch], tok.pad_token_id)


def one(kind: str, layers: int, hidden: int, steps: int, batch: int) -> dict:
    """Time `steps` eager steps, then compile and time as many again; figures as a dict."""
    import tempfile

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_finetune import build_base

    from components.dpo import batch_logps
    from components.lib.rewards import batch_rewards
    from components.lib.training import cpu_has_fast_bf16

    folder = Path(tempfile.mkdtemp()) / "base"
    build_base(folder, layers, hidden)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    if kind == "reward_model":
        net = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    else:
        from transformers import AutoModelForCausalLM

        net = AutoModelForCausalLM.from_pretrained(folder)
    if kind == "finetune":
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, fused=True)
    dtype = torch.bfloat16 if cpu_has_fast_bf16() and not torch.cuda.is_available() else None

    def loss_of(b):
        if kind in ("pretrain", "finetune"):
            return net(**b, use_cache=False).loss
        if kind == "reward_model":
            c, r = batch_rewards(net, b).chunk(2)
            return -torch.nn.functional.logsigmoid(c - r).mean()
        c, r = batch_logps(net, b).chunk(2)
        return -torch.nn.functional.logsigmoid(0.1 * (c - r)).mean()

    def step(b):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = loss_of(b)
        loss.backward()
        opt.step()
        opt.zero_grad()

    data = list(batches(kind, tok, steps + 1, batch, 128))
    step(data[0])  # warm-up, eager
    started = time.perf_counter()
    for b in data[1:]:
        step(b)
    eager = (time.perf_counter() - started) / steps
    net.compile()
    started = time.perf_counter()
    step(data[0])
    first = time.perf_counter() - started
    started = time.perf_counter()
    for b in data[1:]:
        step(b)
    compiled = (time.perf_counter() - started) / steps
    gain = eager - compiled
    return {"eager_s": eager, "compiled_s": compiled, "compile_s": first - eager,
            "break_even_steps": (first - eager) / gain if gain > 0 else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2x128 Llama, 10 steps per side")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    layers, hidden, steps, batch = (2, 128, 10, 16) if args.quick else (4, 256, 20, 16)
    if args.one:
        print("RESULT " + json.dumps(one(args.one, layers, hidden, steps, batch)))
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from benchmarks.record import Results, child_result

    record = Results(__file__, "quick" if args.quick else "")
    print(f"Llama {layers}x{hidden}, batch {batch}, {steps} steps per side")
    print(f"{'kind':<13} {'eager s/step':>12} {'compiled':>9} {'speed':>6} {'compile s':>9} {'break-even':>11}")
    for kind in args.kinds.split(","):
        cmd = [sys.executable, __file__, "--one", kind] + (["--quick"] if args.quick else [])
        r = child_result(cmd, kind)
        even = "nothing compiled" if r["compile_s"] < 1 else \
            f"{r['break_even_steps']:.0f} steps" if r["break_even_steps"] else "never"
        print(f"{kind:<13} {r['eager_s']:>12.3f} {r['compiled_s']:>9.3f} {r['eager_s'] / r['compiled_s']:>5.2f}x "
              f"{r['compile_s']:>9.1f} {even:>11}")
        record.add(f"{kind} training step, torch.compile vs eager", 1 / r["compiled_s"], "steps/s", "eager",
                   1 / r["eager_s"], note=f"compile {r['compile_s']:.0f} s; break-even {even}")
    record.write()


if __name__ == "__main__":
    main()
