"""Fine-tuning throughput: our LoRA vs our full fine-tune, and our LoRA vs TRL's SFTTrainer (same LoRA).

Each configuration runs in its own subprocess (so peak memory is its own) on the same randomly
initialised Llama, tokenizer and builtin task rows, for the same steps and batch size. Tokens/s counts
the non-padding tokens of the training batches over the training wall time.

    .venv/bin/python benchmarks/bench_finetune.py --quick
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
from benchmarks.record import Results, child_result  # noqa: E402


def build_base(folder: Path, layers: int, hidden: int) -> None:
    """A byte-level BPE tokenizer trained on the task rows and a random Llama, saved as transformers folders."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from components.lib.tasks import make_examples

    rows = make_examples(0, "train", 200)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((r["prompt"] + r["completion"] for r in rows),
                            trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), max_position_embeddings=256,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def rows_for(n: int) -> list[dict]:
    from components.lib.tasks import make_examples

    return make_examples(0, "train", n)


def tokens_seen(folder: Path, rows: list[dict], steps: int, batch: int) -> float:
    """Non-padding tokens per batch (mean over the data) times the batches trained."""
    from transformers import AutoTokenizer

    from components.lib.sft import encode_rows

    tok = AutoTokenizer.from_pretrained(folder)
    mean = sum(len(ids) for ids, _ in encode_rows(rows, tok, 256)) / len(rows)
    return mean * batch * steps


def run_ours(folder: Path, method: str, steps: int, batch: int, rows: list[dict]) -> float:
    """Train with the library's SFT loop (what finetune runs); return its seconds, which include encoding the
    rows, applying peft and building the Trainer (TRL's figure starts at `train()`: a conservative comparison)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_ctx

    from components.lib.models import load_model
    from components.lib.sft import train_sft
    from schemas.steps.finetune import FinetuneSpec

    peft = {"method": "lora", "r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]} \
        if method == "lora" else {"method": "full"}
    spec = FinetuneSpec.model_validate({"kind": "finetune", "model": str(folder), "data": {"builtin": "tasks"},
                                        "peft": peft, "max_steps": steps, "batch_size": batch, "val_every": 10 ** 6,
                                        "evaluation": None, "grad_clip": 1.0, "checkpoint_every": 10 ** 6,
                                        "optimizer": {"lr": 1e-3}, "schedule": {"decay": "constant"}})
    ctx = make_ctx(Path(tempfile.mkdtemp()), name="bench", kind="finetune")
    model, tokenizer = load_model(str(folder))
    started = time.perf_counter()
    train_sft(ctx, model, tokenizer, rows, rows[:8], spec.peft, spec.loop(), spec.data.max_length)
    return time.perf_counter() - started


def run_trl(folder: Path, steps: int, batch: int, rows: list[dict]) -> float:
    """Train with TRL's SFTTrainer, same LoRA, optimizer and completion-only loss; return training seconds."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(folder)
    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                       learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=10 ** 6,
                       save_strategy="no", report_to=[], completion_only_loss=True, use_cpu=not _cuda(),
                       dataloader_num_workers=0, seed=0, disable_tqdm=True, bf16=False)
    lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=config, train_dataset=data,
                         processing_class=tok, peft_config=lora)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def one(args: argparse.Namespace) -> None:
    """Run one configuration in this process and print its figures as JSON."""
    folder, rows = Path(args.folder), rows_for(args.rows)
    seconds = run_trl(folder, args.steps, args.batch, rows) if args.one == "trl-lora" else \
        run_ours(folder, args.one.split("-")[1], args.steps, args.batch, rows)
    tokens = tokens_seen(folder, rows, args.steps, args.batch)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if _cuda():
        import torch

        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    print("RESULT " + json.dumps({"tokens_per_s": tokens / seconds, "seconds": seconds, "peak_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers, 128 wide, 30 steps")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rows", type=int, default=100)
    args = p.parse_args()
    if args.one:
        return one(args)
    layers, hidden = (2, 128) if args.quick else (4, 256)
    steps = 30 if args.quick else args.steps
    folder = Path(tempfile.mkdtemp()) / "base"
    build_base(folder, layers, hidden)
    results = {}
    for name in ("ours-full", "ours-lora", "trl-lora"):
        cmd = [sys.executable, __file__, "--one", name, "--folder", str(folder), "--steps", str(steps),
               "--batch", str(args.batch), "--rows", str(args.rows)]
        results[name] = child_result(cmd, name)
    print(f"\nLlama {layers}x{hidden}, {steps} steps of {args.batch} task rows (same data and LoRA r=16 on q,k,v,o)")
    print(f"{'run':<10} {'tokens/s':>10} {'seconds':>8} {'peak MB':>8}")
    for name, r in results.items():
        print(f"{name:<10} {r['tokens_per_s']:>10.0f} {r['seconds']:>8.1f} {r['peak_mb']:>8.0f}")
    full, lora, trl = results["ours-full"], results["ours-lora"], results["trl-lora"]
    print(f"\nLoRA vs full (ours): {lora['tokens_per_s'] / full['tokens_per_s']:.2f}x tokens/s, "
          f"{lora['peak_mb'] / full['peak_mb']:.2f}x peak memory")
    print(f"ours vs TRL SFTTrainer (LoRA): {lora['tokens_per_s'] / trl['tokens_per_s']:.2f}x tokens/s (goal >= 1.0x)")
    results = Results(__file__, "quick" if args.quick else "")
    results.add("real tokens/s, finetune LoRA r16", lora["tokens_per_s"], "tokens/s", "TRL `SFTTrainer`, same LoRA",
                trl["tokens_per_s"], goal=">= 1.0", note=f"Llama {layers}x{hidden}, {steps} steps of {args.batch} "
                "task rows")
    results.add("real tokens/s, finetune LoRA vs full fine-tune (ours)", lora["tokens_per_s"], "tokens/s",
                "full fine-tune", full["tokens_per_s"])
    results.add("peak memory, finetune LoRA vs full fine-tune (ours)", lora["peak_mb"], "MB", "full fine-tune",
                full["peak_mb"])
    results.write()


if __name__ == "__main__":
    main()
