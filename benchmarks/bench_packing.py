"""Fine-tuning with packed sequences: real (non-padding) tokens/s with and without packing, against TRL's
SFTTrainer with its own packing (best-fit decreasing), same model, data and LoRA, in the same run.

Two data sets: the builtin task mixture (short rows, 17-60 tokens) and a ragged JSONL (pydoc paragraphs as
completions, 8-250 tokens). Each configuration runs in its own subprocess on the same random Llama. After
training, every configuration is scored on the same held-out rows (held-out loss per completion token; on the
task mixture also exact-match accuracy), having seen the same number of training examples:

- `padded`: today's batches, right-padded to the longest row;
- `padding_free`: each batch's examples packed into one row (the same examples and loss per step);
- `bfd`: the training set packed once into rows of 256 tokens, `batch_size` rows per step (TRL's packing);
- `trl-bfd`: TRL's SFTTrainer with packing=True (packing_strategy bfd, its position_ids path), same rows.

    .venv/bin/python benchmarks/bench_packing.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

LORA = {"method": "lora", "r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
ROW_LENGTH = 256
BATCH = 16  # examples per step for padded and padding_free


def ragged_rows(n: int, seed: int = 0) -> list[dict]:
    """{prompt, completion} rows whose completions are pydoc paragraphs cut to 8-250 words."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    words = " ".join(topics[k] for k in sorted(topics)).split()
    rows = []
    for i in range(n):
        start, length = rng.randrange(len(words) - 300), int(rng.paretovariate(1.2) * 8)
        rows.append({"prompt": f"Continue the text {i}:", "completion": " " + " ".join(words[start:start + min(length, 250)])})
    return rows


def data(name: str, n: int) -> tuple[list[dict], list[dict]]:
    from components.lib.io import split_rows
    from components.lib.tasks import make_examples

    if name == "tasks":
        return make_examples(0, "train", n // 8), make_examples(0, "eval", 6)
    return split_rows(ragged_rows(n + n // 8), 1 / 9, 0)


def heldout(model, tokenizer, rows: list[dict], tasks: bool) -> dict:
    """Held-out completion loss (token mean) and, on the task mixture, exact-match accuracy."""
    import torch

    from components.lib import evaluation
    from components.lib.sft import IGNORE, collate, encode_rows

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        encoded = encode_rows(rows, tokenizer, ROW_LENGTH)
        for i in range(0, len(encoded), 16):
            batch = collate(encoded[i:i + 16], tokenizer.pad_token_id)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(model(**batch).loss) * n
            count += n
    out = {"val_loss": total / count}
    if tasks:
        scores, _ = evaluation.score_tasks(model, tokenizer, evaluation.builtin_tasks(0, 6), 0)
        out["accuracy"] = sum(v for k, v in scores.items() if k.endswith("/accuracy")) / \
            max(1, sum(1 for k in scores if k.endswith("/accuracy")))
    return out


def run_ours(folder: Path, how: str, rows: list[dict], batch: int, steps: int) -> tuple[float, object]:
    """Real tokens/s of llmcycle's SFT loop (what finetune runs) and the merged model."""
    from conftest import make_ctx

    from components.lib.models import load_model
    from components.lib.sft import train_sft
    from schemas.steps.finetune import FinetuneSpec

    packing = {"padded": False, "padding_free": True, "bfd": {"strategy": "bfd", "length": ROW_LENGTH}}[how]
    spec = FinetuneSpec.model_validate({
        "kind": "finetune", "model": str(folder), "data": {"builtin": "tasks", "max_length": ROW_LENGTH},
        "peft": LORA, "max_steps": steps, "batch_size": batch, "val_every": 10 ** 6, "evaluation": None,
        "checkpoint_every": 10 ** 6, "optimizer": {"lr": 1e-3}, "schedule": {"decay": "constant"},
        "packing": packing})
    ctx = make_ctx(Path(tempfile.mkdtemp()), name="bench", kind="finetune")
    model, tokenizer = load_model(str(folder))
    result = train_sft(ctx, model, tokenizer, rows, rows[:4], spec.peft, spec.loop(), ROW_LENGTH,
                       packing=spec.packing_spec())
    # the Throughput callback's real tokens over the time from the first batch to the last (TRL's figure below
    # is its whole `train()`, which also holds its start-up: a comparison that favours neither more than that)
    return result.metrics["perf/tokens_per_s"], result.model.merge_and_unload()


def run_trl(folder: Path, rows: list[dict], batch: int, steps: int) -> tuple[float, object]:
    """Seconds of TRL's SFTTrainer.train() with bfd packing, and the merged model."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(folder)
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                       learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=10 ** 6,
                       save_strategy="no", report_to=[], completion_only_loss=True, use_cpu=not torch.cuda.is_available(),
                       dataloader_num_workers=0, seed=0, disable_tqdm=True, bf16=False, packing=True,
                       packing_strategy="bfd", max_length=ROW_LENGTH)
    lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=LORA["target_modules"])
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=config, train_dataset=ds,
                         processing_class=tok, peft_config=lora)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started, trainer.model.merge_and_unload()


def one(args) -> None:
    """One configuration in this process; prints its figures as JSON."""
    import torch
    from transformers import AutoTokenizer

    from components.lib.packing import bfd_rows, padding_share
    from components.lib.sft import encode_rows

    torch.manual_seed(0)
    folder = Path(args.folder)
    train, held = data(args.data, args.rows)
    tok = AutoTokenizer.from_pretrained(folder)
    encoded = encode_rows(train, tok, ROW_LENGTH)
    real_per_example = sum(len(ids) for ids, _ in encoded) / len(encoded)
    examples = args.steps * BATCH  # every configuration sees this many examples
    if args.one in ("bfd", "trl-bfd"):
        per_row = len(encoded) / len(bfd_rows(encoded, ROW_LENGTH))
        batch = max(1, round(BATCH / per_row * 4))  # rows per step: 4x the examples of a padded step
        steps = max(1, math.ceil(examples / (batch * per_row)))
    else:
        batch, steps = BATCH, args.steps
    if args.one == "trl-bfd":
        seconds, model = run_trl(folder, train, batch, steps)
        rate = real_per_example * steps * batch * per_row / seconds  # the real tokens of its packed rows
    else:
        rate, model = run_ours(folder, args.one, train, batch, steps)
    print("RESULT " + json.dumps({"tokens_per_s": rate, "steps": steps,
                                  "batch": batch, "padding_share": padding_share([len(i) for i, _ in encoded], BATCH),
                                  **heldout(model, tok, held, args.data == "tasks")}))


def main() -> None:
    from bench_finetune import build_base
    from benchmarks.record import Results, child_result

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers, 128 wide, 20 steps")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rows", type=int, default=1600)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--data", default="tasks", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    layers, hidden = (2, 128) if args.quick else (4, 256)
    steps = 20 if args.quick else args.steps
    folder = Path(tempfile.mkdtemp()) / "base"
    build_base(folder, layers, hidden)
    record = Results(__file__, "quick" if args.quick else "")
    for data_name in ("tasks", "ragged"):
        results = {}
        for name in ("padded", "padding_free", "bfd", "trl-bfd"):
            cmd = [sys.executable, __file__, "--one", name, "--data", data_name, "--folder", str(folder),
                   "--steps", str(steps), "--rows", str(args.rows)]
            results[name] = child_result(cmd, f"{data_name} {name}")
        base, trl = results["padded"], results["trl-bfd"]
        print(f"\n{data_name}: Llama {layers}x{hidden}, LoRA r=16, {steps * BATCH} training examples each; "
              f"unpacked batches of {BATCH} are {base['padding_share']:.0%} padding")
        print(f"{'run':<13} {'real tokens/s':>13} {'vs padded':>9} {'vs TRL':>7} {'steps':>6} {'batch':>6} "
              f"{'val loss':>9} {'accuracy':>9}")
        for name, r in results.items():
            print(f"{name:<13} {r['tokens_per_s']:>13.0f} {r['tokens_per_s'] / base['tokens_per_s']:>8.2f}x "
                  f"{r['tokens_per_s'] / trl['tokens_per_s']:>6.2f}x {r['steps']:>6} {r['batch']:>6} "
                  f"{r['val_loss']:>9.3f} {r.get('accuracy', float('nan')):>9.3f}")
        for name in ("padding_free", "bfd"):
            r = results[name]
            record.add(f"finetune real tokens/s, {name} packing vs padded ({data_name})", r["tokens_per_s"],
                       "tokens/s", "padded batches", base["tokens_per_s"], goal=">= 1.5",
                       note=f"{base['padding_share']:.0%} of padded batches was padding")
            record.add(f"finetune real tokens/s, {name} packing vs TRL SFTTrainer bfd packing ({data_name})",
                       r["tokens_per_s"], "tokens/s", "TRL SFTTrainer packing=True", trl["tokens_per_s"],
                       goal=">= 1.0")
            record.add(f"held-out loss after the same examples, {name} vs padded ({data_name})", r["val_loss"],
                       "nats/token", "padded batches", base["val_loss"], note="1.0: unchanged")
    record.write()


if __name__ == "__main__":
    main()
