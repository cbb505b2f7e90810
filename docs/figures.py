"""Rerun the shipped specs and rewrite the README's figures from what they report (`make figures`).

Every figure the README quotes about the shipped specs sits between `<!-- figures:NAME -->` and
`<!-- /figures:NAME -->` and is written here from the runs' result.json files, so it cannot drift from
the code. The specs run as a user runs them (`llmcycle run`, embedded defaults) in a scratch project.

    .venv/bin/python docs/figures.py                        # all of them (about 15 minutes on 2 cores)
    .venv/bin/python docs/figures.py --only quickstart      # one group: quickstart, ledger, monitor, constitutional, peft-zoo
    .venv/bin/python docs/figures.py --only metrics         # the metric table (schemas/metrics.py), instantly
    .venv/bin/python docs/figures.py --only benchmarks      # the benchmark table (benchmarks/results/), instantly
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
README = REPO / "README.md"
GROUPS = ("metrics", "quickstart", "ledger", "monitor", "constitutional", "peft-zoo", "benchmarks")


class Project:
    """A scratch copy of the shipped specs and data: `specs/*.yaml` write into `runs/` beside them."""

    def __init__(self, root: Path):
        self.root = root
        self.printed: dict[str, str] = {}  # spec -> what its last `llmcycle run` printed
        shutil.copytree(REPO / "specs", root / "specs")

    def run(self, spec: str, *sets: str, allow_failure: bool = False, flags: tuple[str, ...] = ()) -> float:
        """`llmcycle run specs/SPEC.yaml [FLAGS] [--set SET]...`; returns the wall seconds."""
        command = [sys.executable, "-m", "flows.cli", "run", str(self.root / "specs" / f"{spec}.yaml"), *flags]
        for value in sets:
            command += ["--set", value]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        started = time.perf_counter()
        out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if out.returncode != 0 and not allow_failure:
            raise SystemExit(f"{' '.join(command)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        seconds = time.perf_counter() - started
        self.printed[spec] = out.stdout
        print(f"  {spec} {' '.join((*flags, *sets))}: {seconds:.0f} s", flush=True)
        return seconds

    def metrics(self, step: str) -> dict[str, float]:
        """The newest complete result of `step`."""
        found = sorted(glob.glob(str(self.root / "runs" / step / "*" / "result.json")), key=os.path.getmtime)
        return json.loads(Path(found[-1]).read_text())["metrics"]


def metrics(p: Project) -> str:
    """Every metric of every kind, from the table the gate checks and the kinds' tests read."""
    from schemas.metrics import table

    return table()


def benchmark_table(p: Project) -> str:
    """The benchmark table, from the committed results files the benchmarks wrote (`make bench`); reruns nothing."""
    from benchmarks import record, report

    return report.markdown(record.read(record.RESULTS))


def quickstart(p: Project) -> str:
    seconds = p.run("quickstart")
    tok, base, ev, sft, sft_ev = (p.metrics(s) for s in ("tokenizer", "base", "base_eval", "sft", "sft_eval"))
    rm, ppo, final, release = (p.metrics(s) for s in ("rm", "ppo", "final_eval", "release"))
    from schemas import load

    curve = [f"{v:.0f}" for _, v in _curve(p, "base")]
    tasks = ", ".join(f"{t} {sft[f'tasks/0shot/{t}']:.2f}" for t in
                      ("sentiment", "polite", "count", "larger", "add", "copy", "reverse", "capitalize"))
    gate = "passed" if release["gate/passed"] else "failed"
    spec = load(REPO / "specs" / "quickstart.yaml").spec
    rows = [
        ("tokenizer", "tokenize", f"byte-level BPE, {tok['data/vocab_size']:,.0f} tokens; {tok['train/tokens'] / 1e3:.0f}k "
         f"training / {tok['val/tokens'] / 1e3:.0f}k held-out tokens, {tok['data/chars_per_token']:.2f} characters per token"),
        ("base", "pretrain", f"held-out perplexity **{base['before/val/perplexity']:,.0f} → {base['val/perplexity']:.1f}** in "
         f"{base['train/steps']:.0f} steps ({base['time/seconds']:.0f} s); perplexity along the way: {', '.join(curve)}"),
        ("base_eval", "evaluate", f"perplexity {ev['val/perplexity']:.1f} on {ev['val/tokens']:,.0f} held-out tokens; "
         f"next-token top-1 {ev['val/next_token_top1']:.3f}, top-5 {ev['val/next_token_top5']:.3f}; replies to "
         f"{ev['references/rows']:.0f} held-out copy/reverse/capitalize prompts: {_refs(ev)}; decoding samples, "
         "nearest tokens, embedding map"),
        ("sft", "finetune", f"LoRA ({sft['params/trainable_fraction']:.1%} of the parameters) with "
         f"{spec.steps['sft'].replay:.0%} replay: held-out exact match **{sft['before/tasks/0shot/accuracy']:.2f} → "
         f"{sft['tasks/0shot/accuracy']:.2f}** zero-shot, {sft['tasks/3shot/accuracy']:.2f} three-shot ({tasks}); "
         f"pretraining perplexity {sft['before/pretrain/perplexity']:.1f} → {sft['pretrain/perplexity']:.1f}"),
        ("sft_eval", "evaluate", f"the same references after SFT: {_refs(sft_ev, bold=ev)}; the SFT model as "
         f"pairwise judge of its replies against the references: agreement {sft_ev['judge/agreement']:.2f}, "
         f"position bias {sft_ev['judge/position_bias']:+.2f}, mean p(reply better) {sft_ev['judge/score']:.2f}"),
        ("rm", "reward_model", f"held-out pairwise accuracy **{rm['before/val/accuracy']:.2f} → {rm['val/accuracy']:.2f}**"),
        ("ppo", "ppo", f"{spec.steps['ppo'].iterations} iterations x {spec.steps['ppo'].rollouts} rollouts "
         f"({ppo['perf/train_seconds']:.0f} s): held-out true reward **{ppo['before/val/true_reward']:.2f} → "
         f"{ppo['val/true_reward']:.2f}** sampled, {ppo['before/val/true_reward_greedy']:.2f} → "
         f"{ppo['val/true_reward_greedy']:.2f} greedy; KL to the SFT policy {ppo['val/kl']:.2f}"),
        ("final_eval", "evaluate", f"the aligned model: perplexity {final['val/perplexity']:.1f}, zero-shot exact match "
         f"{final['tasks/0shot/accuracy']:.2f}; lm-evaluation-harness: llmcycle_sentiment acc "
         f"{final['lm_eval/llmcycle_sentiment/acc']:.2f}, llmcycle_polite acc {final['lm_eval/llmcycle_polite/acc']:.2f}, "
         f"llmcycle_pydoc {final['lm_eval/llmcycle_pydoc/bits_per_byte']:.2f} bits per byte"),
        ("release", "register", f"gate {gate}: `quickstart-lm` v{release['registry/version']:.0f} is "
         f"`@{'champion' if release['gate/passed'] else 'candidate'}`"),
    ]
    table = "\n".join(f"| `{n}` | {k} | {w} |" for n, k, w in rows)
    return (f"`specs/quickstart.yaml` runs in **{_duration(seconds)}** on this machine ({os.cpu_count()} CPU cores, "
            f"`make run` after the install; seed 0):\n\n| step | kind | what it shows |\n| --- | --- | --- |\n{table}")


def monitor(p: Project) -> str:
    if not (p.root / "runs" / "mlflow.db").exists():
        p.run("quickstart")  # the champion it watches
    p.run("monitor")
    ok = p.metrics("drift")
    p.run("monitor", "steps.drift.data.files=[data/monitor/drifted/*.jsonl]", allow_failure=True)
    drifted = _mlflow_metrics(p, "monitor", "drift")
    return (f"Its data, held-out pydoc topics, passes (perplexity {ok['drift/perplexity']:.1f} against the champion's "
            f"{ok['drift/reference_perplexity']:.1f}, ratio {ok['drift/perplexity_ratio']:.2f}, JS "
            f"{ok['drift/js_divergence']:.3f}); the drifted example (stdlib module docstrings) fails: perplexity "
            f"{drifted['drift/perplexity']:.0f} is {drifted['drift/perplexity_ratio']:.1f}x the champion's.")


def constitutional(p: Project) -> str:
    seconds = p.run("constitutional")
    judge, cai, align = p.metrics("judge"), p.metrics("cai"), p.metrics("align")
    p.run("constitutional", "steps.cai.prompts={builtin: red_team}")
    red = p.metrics("cai")
    agree = f"{cai['labels/agreement'] * cai['labels/reference_pairs']:.0f}/{cai['labels/reference_pairs']:.0f}"
    red_agree = f"{red['labels/agreement'] * red['labels/reference_pairs']:.0f}/{red['labels/reference_pairs']:.0f}"
    return (f"Measured here (seed 0, {_duration(seconds)}): the judge reaches {judge['tasks/0shot/polite']:.2f} on "
            f"held-out `polite` questions; on requests built from held-out combinations it never saw its soft labels "
            f"agree with the ground truth on **{agree}** pairs (mean p = {cai['labels/mean_score']:.3f} for the reply "
            f"it prefers, A/B position bias {cai['labels/position_bias']:+.2f}); DPO on those labels moves the "
            f"implicit-reward accuracy on held-out pairs from {align['before/val/rewards/accuracy']:.2f} (policy = "
            f"reference) to **{align['val/rewards/accuracy']:.2f}** (margin {align['val/rewards/margin']:.1f}), while "
            f"the policy's own log-probability prefers the polite reply on {align['before/val/policy_prefers_chosen']:.2f}"
            f" of held-out pairs before and {align['val/policy_prefers_chosen']:.2f} after. With the red-team prompts, "
            f"whose wording the judge never saw, agreement is {red_agree} (position bias "
            f"{red['labels/position_bias']:+.2f}): the judge learned its task, not politeness in general.")


def peft_zoo(p: Project) -> str:
    seconds = p.run("peft-zoo")
    names = {"full": "full", "prune": "prune (50%)", "rslora": "rsLoRA", "dora": "DoRA", "lora": "LoRA", "ia3": "IA3",
             "bitfit": "bitfit", "prompt": "prompt tuning"}
    rows = sorted(((names[s], p.metrics(s)) for s in names), key=lambda r: -r[1]["tasks/0shot/accuracy"])
    shown = "; ".join(f"{n} {m['tasks/0shot/accuracy']:.2f} / {_count(m['params/trainable'])} / "
                      f"{m['forgetting/perplexity_ratio']:.1f}x" for n, m in rows)
    return (f"Measured here (seed 0, 300 steps each, no replay, {_duration(seconds)} in all): held-out zero-shot exact "
            f"match / trainable parameters / forgetting (pretraining perplexity, tuned over base): {shown}.")


def _curve(p: Project, step: str) -> list[tuple[int, float]]:
    import math

    found = sorted(glob.glob(str(p.root / "runs" / step / "*" / "curve.json")), key=os.path.getmtime)
    return [(s, math.exp(v)) for s, v in json.loads(Path(found[-1]).read_text())["val/loss"][1:]]


def _mlflow_metrics(p: Project, experiment: str, step: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{p.root / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                               f"tags.`llmcycle.step` = '{step}'", order_by=["attributes.start_time DESC"],
                               max_results=1)
    return run.data.metrics


def ledger(p: Project) -> str:
    """The quickstart's ledger as `llmcycle run` printed it (the quickstart runs first if this call has not run it)."""
    if "quickstart" not in p.printed:
        p.run("quickstart")
    printed = p.printed["quickstart"]
    start = printed.index("ledger: time and effort of this run")
    block = printed[start:].split("\n", 1)[1]
    block = block[:block.index("llmcycle run took")].rstrip()
    return f"```\n{block}\n```"


def _refs(m: dict, bold: dict | None = None) -> str:
    """ROUGE-L, BLEU, chrF and exact match of an evaluate step's `references` (bold ROUGE-L: before -> after)."""
    rouge = f"**{bold['references/rouge_l']:.2f} → {m['references/rouge_l']:.2f}**" if bold else f"{m['references/rouge_l']:.2f}"
    return (f"ROUGE-L {rouge}, BLEU {m['references/bleu']:.1f}, chrF {m['references/chrf']:.1f}, "
            f"exact match {m['references/exact_match']:.2f}")


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s" if seconds >= 60 else f"{seconds:.0f} s"


def _count(n: float) -> str:
    return f"{n / 1000:.0f}k" if n >= 10_000 else f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


def rewrite(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- figures:{re.escape(name)} -->\n).*?(\n<!-- /figures:{re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- figures:{name} --> region")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=GROUPS, help="rerun only these groups (repeatable)")
    args = parser.parse_args()
    makers = {"metrics": metrics, "benchmarks": benchmark_table, "quickstart": quickstart, "ledger": ledger, "monitor": monitor, "constitutional": constitutional, "peft-zoo": peft_zoo}
    with tempfile.TemporaryDirectory(prefix="llmcycle-figures-") as tmp:
        project = Project(Path(tmp))
        text = README.read_text()
        for name in args.only or GROUPS:
            print(f"{name}:", flush=True)
            text = rewrite(text, name, makers[name](project))
            README.write_text(text)  # each group lands as soon as it is measured
    print(f"rewrote {README}")


if __name__ == "__main__":
    main()
