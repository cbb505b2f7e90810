"""PPO costs: rollout sampling vs plain `generate`, one iteration split into generation / scoring / update,
and one step of TRL's online RLOOTrainer on the same model, prompts and lengths.

    .venv/bin/python benchmarks/bench_ppo.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_reward import tiny_model  # noqa: E402
from benchmarks.record import Results  # noqa: E402


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat, out


def rloo_step(lm: Path, prompts: list[str], batch: int, new_tokens: int, tmp: Path) -> str:
    """Seconds for one RLOOTrainer step, or the reason it cannot run here."""
    try:
        from datasets import Dataset
        from trl import RLOOConfig, RLOOTrainer

        args = RLOOConfig(output_dir=str(tmp / "rloo"), per_device_train_batch_size=batch, num_generations=2,
                          max_completion_length=new_tokens, max_steps=2, report_to=[], save_strategy="no",
                          use_cpu=True, logging_steps=1, temperature=0.7)
        trainer = RLOOTrainer(model=str(lm), reward_funcs=lambda completions, **kw: [-len(c) / 100 for c in completions],
                              args=args, train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
        start = time.perf_counter()
        trainer.train()
        return f"{(time.perf_counter() - start) / 2:.3f}"
    except Exception as err:  # report exactly why, as the benchmark's answer
        return f"n/a ({type(err).__name__}: {str(err).splitlines()[0][:160]})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    width, layers, batch, new_tokens, repeat = (64, 2, 16, 16, 2) if args.quick else (128, 4, 32, 32, 5)
    import torch

    from components.ppo import build_module, load_policy, load_scorer
    from components.ppo.rollout import sample
    from components.lib.tasks import make_examples
    from schemas.steps.ppo import PPOSpec

    tmp = Path(tempfile.mkdtemp())
    lm = tiny_model(tmp, width, layers)
    rows = make_examples(0, "train", batch // 4 + 1)[:batch]
    spec = PPOSpec(kind="ppo", policy=str(lm), reward={"function": "length_penalty"}, prompts={"builtin": "tasks"},
                   rollouts=batch, max_new_tokens=new_tokens, epochs=4, minibatches=1)
    policy, tok = load_policy(str(lm))

    class Ctx:
        seed = 0

    scorer, rm = load_scorer(spec, Ctx(), tok, rows)
    module = build_module(spec, Ctx(), policy, tok, scorer, rm)
    query, mask = module.encode(rows)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ours = lambda: sample(policy, query, mask, new_tokens, 0.7, eos, pad)  # noqa: E731
    plain = lambda: policy.generate(input_ids=query, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,  # noqa: E731
                                    temperature=0.7, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad)
    ours(), plain()  # warm up both
    sample_s = plain_s = 0.0
    for _ in range(repeat):  # interleaved, so load changes on a shared machine hit both alike
        sample_s += timed(ours)[0]
        plain_s += timed(plain)[0]
    gen_tokens = batch * new_tokens * repeat

    import components.ppo.module as ppo_module

    spent = {"generation": 0.0}

    def timed_sample(*a, **k):
        start = time.perf_counter()
        out = sample(*a, **k)
        spent["generation"] += time.perf_counter() - start
        return out

    ppo_module.sample = timed_sample
    rollout_s, (roll, extras) = timed(lambda: module.rollout(rows))
    gen_s = spent["generation"]
    score_s = rollout_s - gen_s
    module.advantages(roll, extras["kl"])
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5)
    module.optimizers = lambda: opt
    module.lr_schedulers = lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    module.manual_backward = lambda loss: loss.backward()
    module.clip_gradients = lambda *a, **k: None
    update_s, _ = timed(lambda: module.update(roll))
    rloo = rloo_step(lm, [r["prompt"] for r in rows] * 4, batch, new_tokens, tmp)

    print(f"\nPPO, {layers} layers x {width}, {batch} rollouts x {new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"rollout sampling   {gen_tokens / sample_s:10.0f} tok/s   plain generate {gen_tokens / plain_s:10.0f} tok/s   "
          f"ratio {plain_s / sample_s:.2f}x (goal >= 0.9x; window-sized tokens/s, both stop at EOS)")
    total = gen_s + score_s + update_s
    print(f"one iteration      {total:.3f} s = generation {gen_s:.3f} + scoring {score_s:.3f} "
          f"(log-probs, reference, values, reward) + update (4 epochs) {update_s:.3f}")
    print(f"TRL RLOOTrainer    one step: {rloo} s" + (f"   ratio (TRL / ours) {float(rloo) / total:.2f}x"
                                                      if not rloo.startswith("n/a") else ""))
    results = Results(__file__, "quick" if args.quick else "")
    results.add("tokens/s, PPO rollout sampling", gen_tokens / sample_s, "tokens/s", "plain `model.generate`",
                gen_tokens / plain_s, goal=">= 0.9", note=f"Llama {layers}x{width}, {batch} rollouts x {new_tokens} "
                "new tokens")
    measured = not rloo.startswith("n/a")
    results.add("seconds per PPO iteration (4 epochs)", total, "s", "TRL `RLOOTrainer`, one step",
                float(rloo) if measured else None, ratio=float(rloo) / total if measured else None, goal="report",
                note=f"generation {gen_s:.3f} + scoring {score_s:.3f} + update {update_s:.3f} s; ratio TRL / ours"
                + ("" if measured else f"; TRL: {rloo}"))
    results.write()


if __name__ == "__main__":
    main()
