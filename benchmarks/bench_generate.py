"""Decoding throughput of evaluate's `generate_texts` against plain `model.generate` on the same inputs.

Both decode the same prompts with the same GenerationConfig (greedy, then beam search); the component's
figure includes its own tokenization, left padding and decoding to text, the plain one only `generate`.

    .venv/bin/python benchmarks/bench_generate.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PROMPTS = ["The for statement", "A class definition", "The import system", "Exceptions are raised",
           "The with statement", "Built-in functions", "Assignment statements", "The return value of"]


def build(root: Path, quick: bool):
    from bench_pretrain import make_ctx  # noqa: the sibling benchmark's helpers

    from components import tokenize
    from components.lib import models
    from schemas.steps.pretrain import ModelSpec
    from schemas.steps.tokenize import TokenizeSpec

    ctx = make_ctx(root, "tokenizer", "32-true")
    tokenize.run(TokenizeSpec(kind="tokenize", corpus={"builtin": "pydoc"}, vocab_size=2048), ctx)
    tok = models.load_tokenizer(str(ctx.out_dir / "tokenizer"))
    size = {"layers": 2, "hidden": 128, "heads": 4} if quick else {"layers": 4, "hidden": 256, "heads": 8}
    torch.manual_seed(0)
    model = models.build_model(ModelSpec(family="llama", context=256, **size), tok, "causal").eval()
    return model, tok


def timed_pair(first, second, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds of each, interleaved so that load from other processes hits both alike."""
    first(), second()  # warm-up
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer repeats")
    args = parser.parse_args()
    from components.lib.generation import encode_prompts, generate_texts, generation_config

    model, tok = build(Path(tempfile.mkdtemp(prefix="bench_generate_")), args.quick)
    new_tokens, repeats = (32, 5) if args.quick else (64, 10)
    print(f"llama {sum(p.numel() for p in model.parameters()):,} params; {len(PROMPTS)} prompts x {new_tokens} "
          f"new tokens; torch threads {torch.get_num_threads()}")
    for strategy, opts in (("greedy", {}), ("beam", {"num_beams": 4, "length_penalty": 1.0})):
        # min_new_tokens: equal work on both sides, no early EOS
        config = generation_config(tok, strategy, new_tokens, min_new_tokens=new_tokens, **opts)
        batch = encode_prompts(tok, PROMPTS)

        def plain():
            with torch.inference_mode():
                model.generate(**batch, generation_config=config)

        def ours():
            generate_texts(model, tok, PROMPTS, strategy, new_tokens, min_new_tokens=new_tokens, **opts)

        t_plain, t_ours = timed_pair(plain, ours, repeats)
        n = len(PROMPTS) * new_tokens
        print(f"{strategy:<7} plain generate {n / t_plain:>8,.0f} tok/s   generate_texts {n / t_ours:>8,.0f} tok/s   "
              f"ratio {t_plain / t_ours:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
