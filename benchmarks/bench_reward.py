"""Reward-model training tokens/s: our Lightning loop against TRL's RewardTrainer, same model, data, batch.

    .venv/bin/python benchmarks/bench_reward.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.record import Results  # noqa: E402


def tiny_model(folder: Path, width: int, layers: int) -> Path:
    """A random Llama over a small BPE vocabulary trained on pydoc (no downloads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from components import tokenize
    from schemas.steps.tokenize import TokenizeSpec
    from tests.conftest import finish, make_ctx

    ctx = make_ctx(folder, name="tok", kind="tokenize")
    tok_dir = finish(ctx, tokenize.run(TokenizeSpec(kind="tokenize", corpus={"builtin": "pydoc"}, vocab_size=512),
                                       ctx)).path("tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder / "lm")
    tok.save_pretrained(folder / "lm")
    return folder / "lm"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, width, layers, batch = (10, 64, 2, 16) if args.quick else (50, 128, 4, 32)
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from components.lib.preferences import builtin_pairs, normalize_pair
    from components.lib.preferences import encode_pairs
    from components.lib.rewards import load_reward_model
    from components.reward_model import run
    from schemas.steps.reward_model import RewardModelSpec
    from tests.conftest import make_ctx

    tmp = Path(tempfile.mkdtemp())
    lm = tiny_model(tmp, width, layers)
    model, tok = load_reward_model(str(lm))
    model.save_pretrained(tmp / "rm0")
    tok.save_pretrained(tmp / "rm0")
    n = max(8, steps * batch // 8)
    train = encode_pairs([normalize_pair(r) for r in builtin_pairs(0, "train", n)], tok, 256)
    tokens = sum(len(r["chosen"][0]) + len(r["rejected"][0]) for r in train[:steps * batch])

    spec = RewardModelSpec(kind="reward_model", model=str(tmp / "rm0"), data={"builtin": "preferences", "n_per_task": n},
                           batch_size=batch, max_steps=steps, val_every=10_000, val_batches=1)
    ctx = make_ctx(tmp, name="rm", kind="reward_model")
    out = run(spec, ctx)
    ours = out.metrics.get("perf/tokens_per_s")
    start = time.perf_counter()
    model, tok = load_reward_model(str(tmp / "rm0"))
    trainer = RewardTrainer(model=model, processing_class=tok, train_dataset=Dataset.from_list(
        [{"chosen_ids": r["chosen"][0], "rejected_ids": r["rejected"][0]} for r in train]),
        args=RewardConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=batch, max_steps=steps,
                          report_to=[], save_strategy="no", use_cpu=True, logging_steps=steps))
    start = time.perf_counter()
    trainer.train()
    theirs = tokens / (time.perf_counter() - start)
    print(f"\nreward model, {layers} layers x {width}, batch {batch} pairs, {steps} steps, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':24}{'tokens/s':>12}")
    print(f"{'llmcycle reward_model':24}{ours or float('nan'):12.0f}")
    print(f"{'TRL RewardTrainer':24}{theirs:12.0f}")
    if ours:
        print(f"ratio (ours / TRL): {ours / theirs:.2f}x  (goal >= 1.0x)")
    results = Results(__file__, "quick" if args.quick else "")
    results.add("tokens/s, reward_model training", ours, "tokens/s", "TRL `RewardTrainer`", theirs, goal=">= 1.0",
                note=f"Llama {layers}x{width}, batch {batch} pairs, {steps} steps")
    results.write()


if __name__ == "__main__":
    main()
