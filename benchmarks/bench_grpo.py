"""GRPO tokens/s: our `grpo` step (components/grpo, under its Lightning trainer) against TRL's GRPOTrainer on the
same model, prompts, group size, completion length, learning rate and loss, in the same run; plus where our
iteration's time goes (generation / scoring / update).

Both take one optimizer step per iteration on P prompts x G completions (TRL: per_device_train_batch_size
P*G, num_generations G, steps_per_generation 1, num_iterations 1; ours: prompts_per_iteration P, group_size G,
epochs 1, minibatches 1), loss `dapo`, beta 0, temperature 1 without top-k/top-p, the same reward function
(-characters/100). Tokens/s counts the completion tokens generated over the wall time of the training loop
(the first iteration included on both sides). Not the same work: ours also runs the reference forward (it
reports KL at beta 0) and the old-log-prob forward at rollout time, which TRL skips when every batch is used
once (its ratio is then 1 by construction).

Then `packing: true` on its own: the three log-prob passes of an iteration (old log-probs with entropy, the
reference's, the update's forward and backward) on ragged episodes, padded against packed, alternating, best of
the rounds. The episodes are the task prompts with their gold answers and an EOS as completions (the ragged
lengths of a policy that has learned to stop; the untrained bench policy runs to the window's end, where only
the prompts' left padding is saved).

    .venv/bin/python benchmarks/bench_grpo.py [--quick] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_reward import tiny_model  # noqa: E402
from benchmarks.record import Results  # noqa: E402

TASKS = ["copy", "count", "reverse", "larger"]


def reward(completions, **kwargs) -> list[float]:
    """TRL's side of the reward: -characters/100, as components/lib/rewards.py `length_penalty`."""
    return [-len(c) / 100 for c in completions]


def ours(lm: Path, tmp: Path, prompts: int, group: int, new_tokens: int, iterations: int) -> tuple[float, int]:
    """(training seconds, completion tokens) of `iterations` iterations of our grpo step, run as a pipeline runs it
    (its Lightning trainer; the held-out comparison before and after is outside the training seconds)."""
    import components.grpo as grpo
    from schemas.steps.grpo import GrpoSpec
    from tests.conftest import make_ctx

    spec = GrpoSpec(kind="grpo", policy=str(lm), rewards=[{"function": "length_penalty"}], group_size=group,
                    prompts_per_iteration=prompts, iterations=iterations, max_new_tokens=new_tokens,
                    prompts={"builtin": "tasks", "tasks": TASKS, "n_per_task": 4 * prompts}, loss_type="dapo",
                    optimizer={"lr": 1e-5}, eval_samples=0, checkpoint_every=10 * iterations)
    modules, build = [], grpo.build_module
    grpo.build_module = lambda *a, **k: modules.append(build(*a, **k)) or modules[-1]  # keep it for its history
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            out = grpo.run(spec, make_ctx(tmp, name="grpo", kind="grpo"))
    finally:
        grpo.build_module = build
    lengths = [m["grpo/completion_length"] for m in modules[0].history]  # mean per iteration, EOS included
    return out.metrics["perf/train_seconds"], round(sum(lengths) * prompts * group)


def trl(lm: Path, tmp: Path, prompt_texts: list[str], prompts: int, group: int, new_tokens: int,
        iterations: int) -> tuple[float, int] | str:
    """(training seconds, completion tokens) of TRL's GRPOTrainer, or the reason it cannot run here."""
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=prompts * group,
                          num_generations=group, max_completion_length=new_tokens, max_steps=iterations,
                          learning_rate=1e-5, lr_scheduler_type="constant", beta=0.0, loss_type="dapo",
                          temperature=1.0, top_k=0, top_p=1.0, report_to=[], save_strategy="no", use_cpu=True,
                          logging_steps=1, bf16=False, disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = GRPOTrainer(model=str(lm), reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompt_texts]))
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        seconds = time.perf_counter() - start
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
        return seconds, round(sum(lengths) * prompts * group)
    except Exception as err:  # report exactly why, as the benchmark's answer
        return f"n/a ({type(err).__name__}: {str(err).splitlines()[0][:160]})"


def phases(lm: Path, prompts: int, group: int, new_tokens: int) -> dict[str, float]:
    """Seconds of one of our iterations, split: generation, scoring (old, reference log-probs and rewards), update."""
    import torch

    import components.grpo.module as grpo_module
    from components.grpo import build_module, build_rewards, core, load_functions
    from components.lib.policy import load_policy
    from components.lib.tasks import make_examples
    from schemas.steps.grpo import GrpoSpec

    spec = GrpoSpec(kind="grpo", policy=str(lm), rewards=[{"function": "length_penalty"}], group_size=group,
                    prompts_per_iteration=prompts, max_new_tokens=new_tokens, prompts={"builtin": "tasks"})

    class Ctx:  # what build_module and the rewards read
        seed, base_dir, upstream = 0, ".", {}

    policy, tok = load_policy(str(lm))
    module = build_module(spec, Ctx(), policy, tok, build_rewards(spec, Ctx(), tok, *load_functions(spec, Ctx())))
    opt = torch.optim.AdamW(module.policy.parameters(), lr=1e-5)
    module.optimizers = lambda: opt
    module.lr_schedulers = lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    module.manual_backward = lambda loss: loss.backward()
    rows = [r for r in make_examples(0, "train", prompts, TASKS)[:prompts] for _ in range(group)]
    spent = {"generation": 0.0}
    sample = grpo_module.sample

    def timed_sample(*a, **k):
        start = time.perf_counter()
        out = sample(*a, **k)
        spent["generation"] += time.perf_counter() - start
        return out

    grpo_module.sample = timed_sample
    try:
        module.rollout(rows[:group])  # warm up
        spent["generation"] = 0.0
        start = time.perf_counter()
        roll, _ = module.rollout(rows)
        rollout_s = time.perf_counter() - start
    finally:
        grpo_module.sample = sample
    roll.advantages, _, _ = core.group_advantages(roll.scores, group, spec.advantage)
    start = time.perf_counter()
    module.update(roll)
    return {"generation": spent["generation"], "scoring": rollout_s - spent["generation"],
            "update": time.perf_counter() - start}


def packed_passes(lm: Path, prompts: int, group: int, new_tokens: int, rounds: int) -> dict:
    """Real tokens/s of an iteration's log-prob passes, padded and packed (`packing: true`), and the padding
    share of the padded batch."""
    import copy

    import torch

    from components.lib.policy import load_policy
    from components.lib.rollout import encode_prompts, first_eos_mask, reference_logprobs, response_logprobs
    from components.lib.tasks import make_examples

    policy, tok = load_policy(str(lm))
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    rows = [r for r in make_examples(0, "train", prompts, TASKS)[:prompts] for _ in range(group)]
    query, query_mask = encode_prompts(tok, rows, 128)
    answers = [tok(r["completion"])["input_ids"][:new_tokens - 1] + [tok.eos_token_id] for r in rows]
    responses = torch.full((len(rows), new_tokens), tok.pad_token_id)
    for i, a in enumerate(answers):
        responses[i, :len(a)] = torch.tensor(a)
    valid = first_eos_mask(responses, tok.eos_token_id)[0]
    ids, mask, context = torch.cat([query, responses], 1), torch.cat([query_mask, valid.long()], 1), query.shape[1]

    def passes(packed):
        with torch.no_grad():
            response_logprobs(policy, ids, mask, context, responses, 1.0, entropy=True, packed=packed)
            reference_logprobs(policy, reference, ids, mask, context, responses, 1.0, packed=packed)
        logp = response_logprobs(policy, ids, mask, context, responses, 1.0, packed=packed)[0]
        (logp * valid).sum().backward()
        policy.zero_grad()

    best = {"padded": float("inf"), "packed": float("inf")}
    for _ in range(rounds + 1):  # the first round warms up
        for name, packed in (("padded", None), ("packed", ids.shape[1])):
            start = time.perf_counter()
            passes(packed)
            best[name] = min(best[name], time.perf_counter() - start)
    real = int(mask.sum())
    return {"padded": real / best["padded"], "packed": real / best["packed"], "real": real,
            "padding_share": 1 - real / mask.numel()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both; the best of each is kept")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for both (1 is steadier on a shared machine)")
    args = parser.parse_args()
    width, layers, prompts, group, new_tokens, iterations = (64, 2, 2, 4, 16, 3) if args.quick else \
        (256, 4, 4, 8, 32, 6)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from components.lib.tasks import make_examples

    tmp = Path(tempfile.mkdtemp())
    lm = tiny_model(tmp, width, layers)
    # TRL reads the dataset's prompts; ours the builtin rows of the same tasks (the same kind of text, lengths)
    texts = [r["prompt"] for r in make_examples(0, "train", 4 * prompts, TASKS)]
    # alternate the two, so that a change of load on a shared machine hits both alike; keep the best of each
    runs: dict[str, list] = {"ours": [], "trl": []}
    for round_ in range(args.rounds):
        runs["ours"].append(ours(lm, tmp / f"ours{round_}", prompts, group, new_tokens, iterations))
        runs["trl"].append(trl(lm, tmp / f"trl{round_}", texts, prompts, group, new_tokens, iterations))
    split = phases(lm, prompts, group, new_tokens)
    packed = packed_passes(lm, prompts, group, new_tokens, max(args.rounds, 3))

    print(f"\nGRPO, Llama {layers} layers x {width}, {prompts} prompts x G={group} completions x {new_tokens} new "
          f"tokens per iteration, {iterations} iterations, {torch.get_num_threads()} threads, best of {args.rounds} "
          "rounds")
    best = max((t / s, s, t) for s, t in runs["ours"])
    print(f"ours (components/grpo)  {best[0]:8.0f} tok/s   ({best[2]} completion tokens in {best[1]:.2f} s; "
          f"rounds {', '.join(f'{t / s:.0f}' for s, t in runs['ours'])})")
    trl_runs = [r for r in runs["trl"] if not isinstance(r, str)]
    if trl_runs:
        base = max((t / s, s, t) for s, t in trl_runs)
        print(f"TRL GRPOTrainer         {base[0]:8.0f} tok/s   ({base[2]} completion tokens in {base[1]:.2f} s; "
              f"rounds {', '.join(f'{t / s:.0f}' for s, t in trl_runs)})")
        print(f"ratio (ours / TRL)      {best[0] / base[0]:8.2f}x  (goal >= 0.9x)")
    else:
        print(f"TRL GRPOTrainer         {runs['trl'][0]}")
    total = sum(split.values())
    print(f"one iteration of ours   {total:.3f} s = generation {split['generation']:.3f} + scoring "
          f"{split['scoring']:.3f} (old and reference log-probs, entropy, rewards) + update {split['update']:.3f}")
    print(f"packing: log-prob passes   {packed['packed']:8.0f} real tok/s packed vs {packed['padded']:.0f} padded, "
          f"{packed['packed'] / packed['padded']:.2f}x ({packed['padding_share']:.0%} of the padded batch was padding)")
    results = Results(__file__, "quick" if args.quick else "")
    results.add("real tokens/s of a grpo iteration's log-prob passes, packing vs padded (ragged episodes)",
                packed["packed"], "tokens/s", "the same passes padded", packed["padded"],
                note=f"{prompts * group} episodes, task prompts + gold answers + EOS, {packed['real']} real tokens, "
                f"{packed['padding_share']:.0%} of the padded batch padding; old log-probs with entropy, reference, "
                "update forward and backward")
    results.add("completion tokens/s, grpo step", best[0], "tokens/s", "TRL `GRPOTrainer`",
                base[0] if trl_runs else None, goal=">= 0.9",
                note=f"Llama {layers}x{width}, {prompts} prompts x G={group} x {new_tokens} new tokens, {iterations} "
                f"iterations, {torch.get_num_threads()} threads, best of {args.rounds}; one iteration {total:.2f} s = "
                f"generation {split['generation']:.2f} + scoring {split['scoring']:.2f} + update "
                f"{split['update']:.2f}" + ("" if trl_runs else f"; TRL: {runs['trl'][0]}"))
    results.write()


if __name__ == "__main__":
    main()
