"""Decoding throughput of llmcycle's generation (components/lib/decoding.py) against plain `model.generate`, on the
same prompts in the same run, with the outputs compared token for token.

(a) evaluate: `generate_texts` greedy and beam (the beam falls through to generate), and the task answers of
    `generate_answers` on the builtin task mixture against what it did before (plain generate on batches of
    one prompt length) and against plain generate on the same length-sorted, left-padded batches;
(b) ppo / grpo rollouts: `rollout.sample` at the step's temperature against `generate` with the same config
    and seed (the draws are the same tokens; greedy too), llama and gpt2, and grpo's G copies per prompt;
(c) the `trainer.generation` options on one rollout: transformers' own static cache and its compiled
    decoding (CompileConfig, forced onto the CPU), llmcycle's loop with each cache and compiled, with the
    one-off compile time (`--compile`, or the full run).
Every pair is timed interleaved, best of `repeats`, so load from other processes hits both alike; the CPU-time
ratio beside the wall-clock one shows what a busy machine does to the figures.

    .venv/bin/python benchmarks/bench_generate.py [--quick] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.record import Results  # noqa: E402

PROMPTS = ["The for statement", "A class definition", "The import system", "Exceptions are raised",
           "The with statement", "Built-in functions", "Assignment statements", "The return value of"]
GOAL = ">= 1.3"


def build(root: Path, quick: bool, families=("llama",)):
    """The pydoc tokenizer and one untrained model per family (bench size)."""
    from bench_pretrain import make_ctx  # noqa: the sibling benchmark's helpers

    from components import tokenize
    from components.lib import models
    from schemas.steps.pretrain import ModelSpec
    from schemas.steps.tokenize import TokenizeSpec

    ctx = make_ctx(root, "tokenizer", "32-true")
    tokenize.run(TokenizeSpec(kind="tokenize", corpus={"builtin": "pydoc"}, vocab_size=2048), ctx)
    tok = models.load_tokenizer(str(ctx.out_dir / "tokenizer"))
    size = {"layers": 2, "hidden": 128} if quick else {"layers": 4, "hidden": 256}
    built = {}
    for family in families:
        torch.manual_seed(0)
        heads = {"heads": 4 if quick else 8} if family in ("llama", "gpt2") else {}
        built[family] = models.build_model(ModelSpec(family=family, context=256, **size, **heads), tok,
                                           "causal").eval()
    return built, tok


def timed(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Best-of-`repeats` (wall, CPU) seconds of each function, interleaved; each runs once first (warm-up)."""
    for fn in fns.values():
        fn()
    best = {k: [float("inf"), float("inf")] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            best[k] = [min(best[k][0], time.perf_counter() - wall), min(best[k][1], time.process_time() - cpu)]
    return {k: (w, c) for k, (w, c) in best.items()}


def seeded(fn, seed: int = 0):
    def run():
        torch.manual_seed(seed)
        with torch.inference_mode():
            return fn()
    return run


def report(results: Results, figure: str, tokens: int, times: dict, ours: str, base: str, same: bool | None,
           note: str = "", goal: str | None = GOAL) -> None:
    """Print one side-by-side line and record it (value and baseline in tokens/s)."""
    (w_ours, c_ours), (w_base, c_base) = times[ours], times[base]
    same_text = "" if same is None else ("  outputs identical" if same else "  OUTPUTS DIFFER")
    print(f"  {figure:<58} {tokens / w_ours:>8,.0f} vs {tokens / w_base:>8,.0f} tok/s   ratio {w_base / w_ours:5.2f} "
          f"(CPU time {c_base / c_ours:4.2f}){same_text}", flush=True)
    results.add(figure, tokens / w_ours, "tokens/s", base, tokens / w_base, goal=goal,
                note="; ".join(x for x in (note, f"CPU-time ratio {c_base / c_ours:.2f}",
                                           None if same is None else f"outputs identical: {same}") if x))


def evaluate_section(results, models, tok, quick: bool, repeats: int) -> None:
    from components.lib.decoding import Plan, line_end_ids, plain_generate
    from components.lib.evaluation import builtin_tasks
    from components.lib.generation import (answer_batches, encode_prompts, generate_answers, generate_texts,
                                           generation_config, left_padded)
    from components.lib.text import encode, pad_token

    new_tokens = 32 if quick else 64
    print(f"(a) evaluate: {len(PROMPTS)} prompts x {new_tokens} new tokens; builtin tasks, greedy answers")
    for family, model in models.items():
        for strategy, opts in (("greedy", {}), ("beam", {"num_beams": 4, "length_penalty": 1.0})):
            if strategy == "beam" and family != "llama":
                continue
            # min_new_tokens: equal work on both sides, no early EOS
            config = generation_config(tok, strategy, new_tokens, min_new_tokens=new_tokens, **opts)
            batch = encode_prompts(tok, PROMPTS)
            out = {}
            fns = {"plain": seeded(lambda: out.__setitem__("plain", tok.batch_decode(
                       model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:],
                       skip_special_tokens=True))),
                   "ours": lambda: out.__setitem__("ours", generate_texts(model, tok, PROMPTS, strategy, new_tokens,
                                                                          min_new_tokens=new_tokens, **opts))}
            times = timed(fns, repeats)
            path = "transformers' generate" if strategy == "beam" or family in ("rnn", "lstm", "mlp") else "loop"
            report(results, f"generate_texts {strategy} ({family}, {path})", len(PROMPTS) * new_tokens, times,
                   "ours", "plain", out["ours"] == out["plain"], goal=GOAL if path == "loop" else ">= 0.95")

    model = models["llama"]
    tasks = [t for t in builtin_tasks(0, 8 if quick else 16, None) if t.type == "exact_match"]
    work = []  # (prompts, max_new_tokens) per task, as evaluation.score_tasks asks
    for task in tasks:
        longest = max(len(encode(tok, " " + str(r["answer"]))) for r in task.rows)
        work.append(([r["prompt"] for r in task.rows], min(task.max_new_tokens, longest + 2)))
    stop, pad = line_end_ids(tok), pad_token(tok)
    from transformers import GenerationConfig

    def plain_answers(pad_left: bool):
        answers, generated = [], 0
        for prompts, new in work:
            encoded = [encode(tok, p) for p in prompts]
            config = GenerationConfig(max_new_tokens=new, do_sample=False, pad_token_id=pad,
                                      eos_token_id=tok.eos_token_id)
            got = [""] * len(prompts)
            for chunk in answer_batches(encoded, 64, pad_left):
                ids, mask = left_padded([encoded[i] for i in chunk], pad)
                rows = plain_generate(model, ids, mask, config, stop, Plan("generate", None, False))[:, ids.shape[1]:]
                for i, row in zip(chunk, rows):
                    got[i] = tok.decode(row, skip_special_tokens=True).split("\n", 1)[0]
                    generated += int((row != pad).sum())
            answers += got
        return answers, generated

    out = {}
    fns = {"groups": seeded(lambda: out.__setitem__("groups", plain_answers(False))),
           "padded": seeded(lambda: out.__setitem__("padded", plain_answers(True))),
           "ours": seeded(lambda: out.__setitem__("ours", [a for prompts, new in work
                                                          for a in generate_answers(model, tok, prompts, new)]))}
    times = timed(fns, max(2, repeats // 2))
    tokens = out["groups"][1]
    n = sum(len(p) for p, _ in work)
    groups = sum(len(answer_batches([encode(tok, q) for q in p], 64, False)) for p, _ in work)
    note = f"{n} prompts of {len(work)} tasks: {groups} batches of one length before, {len(work)} now"
    report(results, "task answers, generate_answers (llama) vs before", tokens, times, "ours", "groups",
           out["ours"] == out["groups"][0], note)
    report(results, "task answers: left-padded batches alone (plain generate)", tokens, times, "padded", "groups",
           out["padded"][0] == out["groups"][0], note, goal=None)
    report(results, "task answers: the loop alone (same batches)", tokens, times, "ours", "padded",
           out["ours"] == out["padded"][0], note, goal=None)


def rollout_section(results, models, tok, quick: bool, repeats: int) -> None:
    from transformers import GenerationConfig

    from components.lib.rollout import encode_prompts, first_eos_mask, sample
    from components.lib.tasks import make_examples

    new_tokens = 16
    batch = 16 if quick else 32
    rows = make_examples(0, "train", batch)[:batch]
    print(f"(b) rollouts: {batch} prompts x {new_tokens} new tokens (ppo's default), stop at EOS")
    cases = [("ppo", family, rows, 0.7) for family in models if family in ("llama", "gpt2")]
    group = 4
    cases.append(("grpo", "llama", [r for r in rows[:batch // group] for _ in range(group)], 1.0))
    for kind, family, prompts, temperature in cases:
        policy = models[family]
        query, mask = encode_prompts(tok, prompts, 128)
        eos, pad = tok.eos_token_id, tok.pad_token_id
        for greedy in (False, True):
            config = GenerationConfig(max_new_tokens=new_tokens, do_sample=not greedy, top_k=0, top_p=1.0,
                                      temperature=1.0 if greedy else temperature, eos_token_id=eos, pad_token_id=pad)
            out = {}

            def plain():
                seqs = policy.generate(input_ids=query, attention_mask=mask, generation_config=config)
                out["plain"] = seqs[:, query.shape[1]:]

            def ours():
                out["ours"] = sample(policy, query, mask, new_tokens, temperature, eos, pad, greedy=greedy).responses

            times = timed({"plain": seeded(plain, 1), "ours": seeded(ours, 1)}, repeats)
            seqs = out["plain"]
            if seqs.shape[1] < new_tokens:
                seqs = torch.cat([seqs, torch.full((len(seqs), new_tokens - seqs.shape[1]), pad)], 1)
            valid, _, _ = first_eos_mask(seqs, eos)
            same = torch.equal(torch.where(valid, seqs, pad), out["ours"])
            lengths = valid.sum(1).float()
            mode = "greedy" if greedy else f"sampled at T={temperature}"
            note = (f"G={group} copies of {len(prompts) // group} prompts; " if kind == "grpo" else "") + \
                f"mean response length {statistics.fmean(lengths.tolist()):.1f} tokens, same seed"
            report(results, f"{kind} rollout, {mode} ({family})", len(prompts) * new_tokens, times, "ours", "plain",
                   same, note)


def options_section(results, models, tok, quick: bool, repeats: int) -> None:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    from components.lib.decoding import Decoder
    from components.lib.rollout import encode_prompts
    from components.lib.tasks import make_examples

    policy, new_tokens, batch = models["llama"], 32, 16
    query, mask = encode_prompts(tok, make_examples(0, "train", batch)[:batch], 128)
    base = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    compiled = CompileConfig(mode="default", fullgraph=False)
    compiled._compile_all_devices = True  # transformers compiles only on accelerators unless told to
    configs = {"generate": GenerationConfig(**base),
               "generate, static cache": GenerationConfig(**base, cache_implementation="static"),
               "generate, static cache + compile": GenerationConfig(**base, cache_implementation="static",
                                                                    compile_config=compiled)}
    loops = {"loop, dynamic cache": Decoder("dynamic", False), "loop, static cache": Decoder("static", False),
             "loop, static cache + compile": Decoder("static", True)}
    print(f"(c) trainer.generation options: greedy rollout, {batch} prompts x {new_tokens} tokens; first call "
          "(compile) timed apart")
    out, first = {}, {}
    fns = {name: (lambda c=c, name=name: out.__setitem__(name, policy.generate(
        input_ids=query, attention_mask=mask, generation_config=c))) for name, c in configs.items()}
    fns.update({name: (lambda d=d, name=name: out.__setitem__(name, d.generate(policy, query, mask,
                                                                               configs["generate"])))
                for name, d in loops.items()})
    for name, fn in fns.items():
        start = time.perf_counter()
        seeded(fn)()
        first[name] = time.perf_counter() - start
    times = timed({k: seeded(fn) for k, fn in fns.items()}, repeats)
    for name in list(configs)[1:] + list(loops):
        report(results, f"options: {name}", batch * new_tokens, times, name, "generate",
               torch.equal(out[name], out["generate"]), f"first call (compile) {first[name]:.1f} s", goal=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, fewer prompts and repeats")
    parser.add_argument("--compile", action="store_true", help="(c) with --quick too (compiles take minutes here)")
    args = parser.parse_args()
    families = ("llama", "gpt2", "rnn")
    models, tok = build(Path(tempfile.mkdtemp(prefix="bench_generate_")), args.quick, families)
    repeats = 3 if args.quick else 7
    params = {f: f"{sum(p.numel() for p in m.parameters()):,}" for f, m in models.items()}
    print(f"models {params} params; torch threads {torch.get_num_threads()}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    results = Results(__file__, "quick" if args.quick else "")
    evaluate_section(results, models, tok, args.quick, repeats)
    rollout_section(results, models, tok, args.quick, repeats)
    if args.compile or not args.quick:
        options_section(results, models, tok, args.quick, repeats)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    results.write()


if __name__ == "__main__":
    main()
