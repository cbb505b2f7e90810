"""How steps execute: a process of their own, branches at the same time, two runs at once, stopping and resuming.

The runs here are real `llmcycle run` processes (or the flow in this process) on the session's Prefect
server, with tiny models; signals are sent the way a terminal, a supervisor or Prefect's UI sends them.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import cli

pytestmark = pytest.mark.usefixtures("prefect_harness")

LM = "{family: llama, layers: 2, hidden: 32, heads: 2, context: 64}"
BRANCHES = f"""\
name: branches
workdir: work
max_parallel: 3
trainer: {{accelerator: cpu, precision: 32-true}}
steps:
  tok: {{kind: tokenize, corpus: {{builtin: pydoc}}, vocab_size: 400}}
  lm: {{kind: pretrain, tokenizer: tok, model: {LM}, max_steps: 10, batch_size: 8, log_model: false}}
  ev1: {{kind: evaluate, model: lm, tokens: tok, max_batches: 8, embeddings: {{words: [class], k: 3}},
         trainer: {{share_devices: true}}}}
  ev2: {{kind: evaluate, model: lm, tokens: tok, split: train, max_batches: 8, embeddings: {{words: [list], k: 3}},
         trainer: {{share_devices: true}}}}
  bad: {{kind: evaluate, model: lm, tasks: {{items: [{{name: t, file: missing.jsonl}}]}}}}
"""
LONG = f"""\
name: long
workdir: work
trainer: {{accelerator: cpu, precision: 32-true}}
steps:
  tok: {{kind: tokenize, corpus: {{builtin: pydoc}}, vocab_size: 400}}
  lm:
    kind: pretrain
    tokenizer: tok
    model: {LM}
    max_steps: 2400
    val_every: 1200
    checkpoint_every: 150
    batch_size: 8
    log_model: false
"""


def store(spec: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{spec.parent / 'work' / 'mlflow.db'}")


def step_runs(spec: Path, name: str, step: str | None = None) -> list:
    client = store(spec)
    where = f"tags.`llmcycle.step` = '{step}'" if step else "tags.`llmcycle.step` != ''"
    return client.search_runs([client.get_experiment_by_name(name).experiment_id], where,
                              order_by=["attributes.start_time ASC"])


def parent_runs(spec: Path, name: str) -> list:
    client = store(spec)
    return client.search_runs([client.get_experiment_by_name(name).experiment_id],
                              f"tags.`mlflow.runName` = '{name}'", order_by=["attributes.start_time ASC"])


def llmcycle(spec: Path, *args: str, log: Path):
    return cli("run", str(spec), *args, log=log)


def wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc is None or proc.poll() is None, f"run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def checkpoint_step(workdir: Path) -> int:
    """The step of the newest periodic checkpoint of `lm` (0: none yet)."""
    found = glob.glob(str(workdir / "lm" / ".ckpt-*" / "step-step=*.ckpt"))
    return max((int(p.rsplit("=", 1)[1].split(".")[0]) for p in found), default=0)


def test_branches_run_at_once_in_their_own_processes_and_a_failure_lets_them_finish(tmp_path):
    from flows.pipeline import format_failure, run_pipeline

    spec = tmp_path / "branches.yaml"
    spec.write_text(BRANCHES)
    with pytest.raises(Exception) as err:
        run_pipeline(str(spec))
    message = format_failure(err.value)
    assert message.startswith("step 'bad' (evaluate) failed: tasks.items.0.file: no file matches 'missing.jsonl'")

    runs = {r.data.tags["llmcycle.step"]: r for r in step_runs(spec, "branches")}
    assert {n: r.info.status for n, r in runs.items()} == {"tok": "FINISHED", "lm": "FINISHED", "ev1": "FINISHED",
                                                           "ev2": "FINISHED", "bad": "FAILED"}
    ev1, ev2 = runs["ev1"].info, runs["ev2"].info
    assert ev1.start_time < ev2.end_time and ev2.start_time < ev1.end_time, "independent branches did not overlap"
    pids = {n: int(r.data.tags["llmcycle.pid"]) for n, r in runs.items()}
    assert os.getpid() not in pids.values() and len(set(pids.values())) == len(pids)  # one process per step
    assert all(int(r.data.tags["llmcycle.launcher_pid"]) == os.getpid() for r in runs.values())
    assert runs["ev1"].data.tags["llmcycle.world_size"] == "1"
    for name in ("ev1", "ev2"):  # the branches that did not fail completed, and their logs reached MLflow
        assert len(glob.glob(str(tmp_path / "work" / name / "*" / "result.json"))) == 1
        logs = [a.path for a in store(spec).list_artifacts(runs[name].info.run_id, "logs")]
        assert logs == ["logs/step.log"]
    assert parent_runs(spec, "branches")[-1].info.status == "FAILED"
    check_ledger(spec, tmp_path)


def check_ledger(spec: Path, tmp_path: Path) -> None:
    """The run's ledger.json on its parent run: a row per step with what the step's models computed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    parent = parent_runs(spec, "branches")[-1].info.run_id
    spent = json.loads(Path(store(spec).download_artifacts(parent, "ledger.json", str(tmp_path))).read_text())
    rows = {r["step"]: r for r in spent["rows"]}
    assert {n: r["status"] for n, r in rows.items()} == {"tok": "ran", "lm": "ran", "ev1": "ran", "ev2": "ran",
                                                         "bad": "failed"}
    [lm_result] = [json.loads(Path(p).read_text()) for p in glob.glob(str(tmp_path / "work" / "lm" / "*" / "result.json"))]
    lm, n = rows["lm"], lm_result["metrics"]["params/total"]
    assert lm["train_tokens"] == lm_result["metrics"]["train/tokens"] == 10 * 8 * 64  # every training position
    assert lm["inference_tokens"] > 0 and lm["params_trainable"] == lm["params_total"] == n  # validation rounds
    assert lm["flops"] == 6 * n * lm["train_tokens"] + 2 * n * lm["inference_tokens"]
    assert (lm["examples"], lm["examples_of"]) == (80, "sequences")
    for name in ("ev1", "ev2"):
        ev = rows[name]
        assert ev["train_tokens"] == 0 and ev["params_trainable"] == 0 and ev["params_total"] == n
        assert ev["flops"] == 2 * n * ev["inference_tokens"] and ev["inference_tokens"] >= 8 * 64 * 0.9
    assert rows["bad"]["seconds"] > 0 and rows["bad"]["tokens"] is None
    assert spent["total"]["flops"] == sum(r["flops"] for r in rows.values() if r["flops"] is not None)

    with get_client(sync_client=True) as client:  # the same figures in the flow run's Prefect table
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["llmcycle-steps"])),
                                           sort=ArtifactSort.CREATED_DESC, limit=1)
    table = artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)
    assert [r["step"] for r in table] == ["tok", "lm", "ev1", "ev2", "bad", "total"]
    assert table[1]["FLOPs"].endswith("FLOP") and table[4]["status"] == "failed"


def test_two_runs_started_together_train_each_step_once(tmp_path):
    spec = tmp_path / "twice.yaml"
    spec.write_text(BRANCHES.replace("name: branches", "name: twice").split("  ev1:")[0])
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with llmcycle(spec, log=logs[0]) as first, llmcycle(spec, log=logs[1]) as second:
        first.wait(timeout=600), second.wait(timeout=600)
    outputs = [log.read_text() for log in logs]
    assert first.returncode == 0 and second.returncode == 0, "\n".join(o[-2000:] for o in outputs)
    runs = step_runs(spec, "twice")
    for step in ("tok", "lm"):
        trained = [r for r in runs if r.data.tags["llmcycle.step"] == step and r.data.tags["llmcycle.cached"] == "no"]
        reused = [r for r in runs if r.data.tags["llmcycle.step"] == step and r.data.tags["llmcycle.cached"] == "yes"]
        assert len(trained) == 1 and len(reused) == 1, (step, len(trained), len(reused))
        assert len(glob.glob(str(tmp_path / "work" / step / "*" / "result.json"))) == 1
    assert any("another run is working on this step, or its inputs are not complete; waiting" in o for o in outputs)
    assert not glob.glob(str(tmp_path / "work" / "*" / ".tmp-*"))
    ledgers = [o.split("ledger: time and effort of this run\n", 1)[1].splitlines()[1:3] for o in outputs]
    for i, step in enumerate(("tok", "lm")):  # the run that waited for a step reused it: 0 s of its time
        assert sorted(lines[i].split()[2] for lines in ledgers if lines[i].split()[0] == step) == ["cached", "ran"]


def test_ctrl_c_sigterm_and_cancel_stop_the_step_and_each_rerun_resumes(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    spec, work = tmp_path / "long.yaml", tmp_path / "work"
    spec.write_text(LONG)
    reached = 0
    for attempt, how in enumerate(("SIGINT", "SIGTERM", "cancel", "kill -9")):
        log = tmp_path / f"{how}.log"
        with llmcycle(spec, log=log) as proc:
            wait_for(lambda: checkpoint_step(work) > reached, proc, log, "a new periodic checkpoint")
            reached = checkpoint_step(work)
            if how == "cancel":  # as the UI's Cancel button does: the flow run goes to Cancelling
                flow_run_id = parent_runs(spec, "long")[-1].data.tags["prefect.flow_run_id"]
                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(flow_run_id, Cancelling(message="cancelled by the test"), force=True)
            elif how == "kill -9":  # the whole process group, as an OOM killer or `kill -9 -PGID` does
                child = int(step_runs(spec, "long", "lm")[-1].data.tags["llmcycle.pid"])
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(getattr(signal, how))
            proc.wait(timeout=180)
        reached = checkpoint_step(work)  # a step stops between checkpoints: the next run must pass its last one
        out = log.read_text()
        assert proc.returncode != 0, out[-3000:]
        assert attempt == 0 or "lm: resuming from" in out, out[-3000:]
        lm = step_runs(spec, "long", "lm")
        if how == "kill -9":  # nobody was left to close its runs
            assert lm[-1].info.status == parent_runs(spec, "long")[-1].info.status == "RUNNING"
            wait_for(lambda: not psutil.pid_exists(child), None, log, "the step's process to stop (its parent died)")
            continue
        assert len(lm) == attempt + 1 and lm[-1].info.status == "KILLED", (how, out[-3000:])
        assert "stopped" in lm[-1].data.tags["llmcycle.error"]
        assert parent_runs(spec, "long")[-1].info.status == "KILLED"
        assert glob.glob(str(work / "lm" / ".ckpt-*" / "last.ckpt")), out[-3000:]
        assert not glob.glob(str(work / "lm" / "*" / "result.json"))

    log = tmp_path / "done.log"
    with llmcycle(spec, log=log) as done:
        done.wait(timeout=600)
    out = log.read_text()
    assert done.returncode == 0 and "lm: resuming from" in out, out[-3000:]
    [result] = glob.glob(str(work / "lm" / "*" / "result.json"))
    assert json.loads(Path(result).read_text())["metrics"]["train/steps"] == 2400
    # The run that resumed closed what the killed one left RUNNING, and says so on each.
    *_, killed, resumed = parent_runs(spec, "long")
    orphans = [killed, step_runs(spec, "long", "lm")[-2]]
    assert resumed.info.status == "FINISHED" and "marked 2 MLflow run(s)" in out, out[-3000:]
    for run in orphans:
        assert run.info.status == "KILLED" and run.data.tags["llmcycle.resumed_by"] == resumed.info.run_id
        assert "ended without closing it" in run.data.tags["llmcycle.error"]
