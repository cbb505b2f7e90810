"""Resume after the step's process is killed, fingerprint-keyed checkpoints, the quickstart's first steps."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, make_ctx

LM = {"family": "llama", "layers": 2, "hidden": 32, "heads": 2, "context": 64}
STEP = dict(max_steps=240, val_every=120, checkpoint_every=40, batch_size=8, val_batches=4, log_model=False)
SPEC = f"""\
name: resume
workdir: work
trainer: {{precision: 32-true, accelerator: cpu}}
steps:
  tok: {{kind: tokenize, corpus: {{builtin: pydoc}}, vocab_size: 512}}
  lm:
    kind: pretrain
    tokenizer: tok
    model: {json.dumps(LM)}
    optimizer: {{lr: 3.0e-3}}
{chr(10).join(f"    {k}: {json.dumps(v)}" for k, v in STEP.items())}
"""


def llmcycle(spec: Path, *args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(spec), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish_run(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def result(spec: Path, step: str) -> dict:
    found = glob.glob(str(spec.parent / "work" / step / "*" / "result.json"))
    assert len(found) == 1, found
    return json.loads(Path(found[0]).read_text())


@pytest.mark.slow
def test_step_killed_by_the_oom_killer_is_reported_and_the_rerun_resumes_to_the_same_result(tmp_path, tokenized,
                                                                                             prefect_harness):
    """SIGKILL to the step's own process (what the out-of-memory killer does): the flow reports it in one line,
    marks the step FAILED, keeps the checkpoint; the next run resumes and matches an uninterrupted run."""
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from components import pretrain
    from schemas.steps.pretrain import PretrainSpec

    spec = tmp_path / "resume.yaml"
    spec.write_text(SPEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONUNBUFFERED="1")
    proc = llmcycle(spec, env=env)
    deadline = time.time() + 600
    while not glob.glob(str(tmp_path / "work" / "lm" / ".ckpt-*" / "last.ckpt")):
        assert proc.poll() is None, f"run ended before its first checkpoint:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.2)
    time.sleep(1.0)  # let the checkpoint file be written completely
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resume").experiment_id
    [lm] = client.search_runs([experiment], "tags.`llmcycle.step` = 'lm'")
    os.kill(int(lm.data.tags["llmcycle.pid"]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-3000:]
    assert ("\nllmcycle: step 'lm' (pretrain) failed: killed by signal 9 (SIGKILL) (out of memory?); its checkpoint "
            "is kept, so the next run resumes it.") in out, out[-3000:]
    lm = client.get_run(lm.info.run_id)
    assert lm.info.status == "FAILED" and "killed by signal 9" in lm.data.tags["llmcycle.error"]
    assert not glob.glob(str(tmp_path / "work" / "lm" / "*" / "result.json"))
    assert glob.glob(str(tmp_path / "work" / "tok" / "*" / "result.json"))  # the step before it is kept

    # another configuration has another fingerprint, so it never picks up that checkpoint
    other = finish_run(llmcycle(spec, "--set", "steps.lm.max_steps=10", env=env))
    assert "resuming from" not in other
    ckpts = glob.glob(str(tmp_path / "work" / "lm" / ".ckpt-*" / "last.ckpt"))
    assert len(ckpts) == 1  # the killed run's, untouched; the finished run removed its own

    out = finish_run(llmcycle(spec, env=env))
    assert f"lm: resuming from {ckpts[0]}" in out
    resumed = [r for r in map(lambda p: json.loads(Path(p).read_text()),
                              glob.glob(str(tmp_path / "work" / "lm" / "*" / "result.json")))
               if r["metrics"]["train/steps"] == STEP["max_steps"]]
    assert len(resumed) == 1

    ctx = make_ctx(tmp_path / "reference", name="lm", kind="pretrain", upstream={"tok": tokenized})
    reference = pretrain.run(PretrainSpec(kind="pretrain", tokenizer="tok", model=LM, optimizer={"lr": 3e-3},
                                          **STEP), ctx)
    got, want = resumed[0]["metrics"]["val/loss"], reference.metrics["val/loss"]
    assert abs(got - want) / want < 0.01, (got, want)
    assert want < reference.metrics["before/val/loss"] - 0.5


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_quickstart_pretrain_and_evaluate_through_the_flow(tmp_path, monkeypatch):
    """The shipped quickstart's tokenize -> pretrain -> evaluate, shortened with --set, as a user runs it."""
    from mlflow.tracking import MlflowClient

    from flows.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "specs").mkdir()
    spec = tmp_path / "specs" / "quickstart.yaml"
    spec.write_text((REPO / "specs" / "quickstart.yaml").read_text())
    assert main(["run", str(spec), "--only", "base_eval", "--set", "steps.base.max_steps=60",
                 "--set", "steps.base.val_every=30", "--set", "steps.base_eval.generation.max_new_tokens=8"]) == 0
    base, evaluated = result_of(tmp_path / "runs", "base"), result_of(tmp_path / "runs", "base_eval")
    m = base["metrics"]
    assert m["before/val/perplexity"] / m["val/perplexity"] > 5, m
    assert evaluated["metrics"]["val/perplexity"] == pytest.approx(m["val/perplexity"], rel=0.02)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs(client.get_experiment_by_name("quickstart").experiment_id,
                               "tags.`llmcycle.step` = 'base'")
    steps = [x.step for x in client.get_metric_history(run.info.run_id, "val/loss")]
    assert steps[0] == 0 and len(steps) >= 3  # untrained, then every val_every (Lightning logs step - 1)
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    model_id = base["info"]["model_uri"].removeprefix("models:/")
    assert client.get_logged_model(model_id).source_run_id == run.info.run_id  # transformers flavor, this run

def result_of(workdir: Path, step: str) -> dict:
    [path] = glob.glob(str(workdir / step / "*" / "result.json"))
    return json.loads(Path(path).read_text())
