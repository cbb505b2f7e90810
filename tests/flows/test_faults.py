"""Faults after the spec: broken data files, damaged outputs, secrets. Each is caused for real and must end
with nothing lost and a message a user can act on (issue 12).

The runs are real `llmcycle` processes on the session's Prefect server, or the flow in this process.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import schemas
from flows.cli import main
from flows.plan import make_plan
from tests.conftest import cli

pytestmark = pytest.mark.usefixtures("prefect_harness")

LM = "{family: llama, layers: 1, hidden: 32, heads: 2, context: 32}"
SFT = f"""\
name: faults
workdir: work
trainer: {{accelerator: cpu, precision: 32-true}}
steps:
  tok: {{kind: tokenize, corpus: {{files: [corpus.txt]}}, vocab_size: 300}}
  lm: {{kind: pretrain, tokenizer: tok, model: {LM}, max_steps: 2, batch_size: 4, log_model: false}}
  sft:
    kind: finetune
    model: lm
    data: {{files: [data/train.jsonl], eval_files: [data/eval.jsonl]}}
    max_steps: 2
    batch_size: 2
"""
CORPUS = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i % 7} times.\n\n" for i in range(300))


def run(spec: Path, *args: str) -> tuple[int, str]:
    log = spec.parent / f"run-{len(list(spec.parent.glob('run-*.log')))}.log"  # one per command, for a post-mortem
    with cli(*args, str(spec), log=log) as proc:
        proc.wait(timeout=600)
    return proc.returncode, log.read_text()


def test_bad_rows_fail_the_step_before_training_naming_each_row(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SFT)
    (tmp_path / "corpus.txt").write_text(CORPUS)
    data = tmp_path / "data"
    data.mkdir()
    train, held = data / "train.jsonl", data / "eval.jsonl"
    train.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n[1]\n'
                     '{"messages": [{"role": "bot", "content": "x"}]}\n')
    held.write_bytes(b'{"prompt": "caf\xe9", "completion": "b"}\n')

    # The data check a CI job runs: no training, every problem, exit status 2.
    assert main(["validate", "--data", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"sft: {train}:2: not valid JSON" in err and f"sft: {train}:3: expected a JSON object, got list" in err
    assert f"sft: {train}:4: messages.0.role: Input should be 'system', 'user' or 'assistant'" in err
    assert f"sft: {held}:1: not UTF-8 (byte 0xe9 at column 16)" in err

    code, out = run(spec, "run")
    assert code == 1, out[-3000:]
    assert "Traceback" not in out and "NoneType: None" not in out, out  # the paragraph, not the tracebacks
    assert "step 'sft' (finetune) failed: 4 data problems:" in out and f"{train}:2: not valid JSON" in out
    assert f"{held}:1: not UTF-8" in out
    plan = {p.name: p for p in make_plan(schemas.load(spec))}
    assert plan["tok"].cached and plan["lm"].cached and not plan["sft"].cached  # upstream untouched
    assert not [p for p in (tmp_path / "work" / "sft").iterdir() if not p.name.startswith(".run-")]

    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    [sft] = client.search_runs([client.get_experiment_by_name("faults").experiment_id], "tags.`llmcycle.step` = 'sft'")
    assert sft.info.status == "FAILED"
    trace = Path(client.download_artifacts(sft.info.run_id, "logs/traceback.txt", str(tmp_path))).read_text()
    assert "Traceback" in trace and "DataProblems" in trace  # kept where a developer looks

    code, out = run(spec, "--debug", "run")
    assert code == 1 and "Traceback (most recent call last)" in out

    train.write_text('{"prompt": "a", "completion": "b"}\n' * 8)  # fixed: the run goes on from there
    held.write_text('{"prompt": "a", "completion": "b"}\n')
    code, out = run(spec, "run")
    assert code == 0, out[-3000:]
    assert "tok: complete output found" in out and "lm: complete output found" in out


def test_a_damaged_output_is_found_and_run_again(tmp_path, capsys):
    from flows.pipeline import run_pipeline

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: damage\nworkdir: work\nsteps:\n"
                    "  tok: {kind: tokenize, corpus: {files: [corpus.txt]}, vocab_size: 300}\n")
    (tmp_path / "corpus.txt").write_text(CORPUS)
    run_pipeline(str(spec))
    assert main(["verify", str(spec)]) == 0 and "tok              ok" in capsys.readouterr().out

    def planned():
        return make_plan(schemas.load(spec))[0]

    folder = planned().output_dir
    vocab = folder / "tokenizer" / "tokenizer.json"
    original = vocab.read_bytes()
    edited = bytearray(original)
    middle = original.index(b"a", len(original) // 2)
    edited[middle] = ord("b")
    vocab.write_bytes(bytes(edited))  # one byte changed, same size: only a full check sees it
    assert planned().cached
    assert main(["verify", str(spec)]) == 1
    assert f"DAMAGED: {vocab} changed after the step wrote it" in capsys.readouterr().out
    vocab.write_bytes(original)

    [tokens] = [Path(p) for p in glob.glob(str(folder / "**" / "*.bin"), recursive=True)][:1]
    tokens.write_bytes(tokens.read_bytes()[:100])  # truncated: every reuse sees it
    damaged = planned()
    assert not damaged.cached and "bytes, the step wrote" in damaged.extra["damaged"]
    assert main(["plan", str(spec)]) == 0 and "damaged:" in capsys.readouterr().out
    assert run_pipeline(str(spec))["tok"]["status"] == "ran"
    assert main(["verify", str(spec)]) == 0

    result = folder / "result.json"
    data = json.loads(result.read_text())
    data["metrics"] = {k: 0.0 for k in data["metrics"]}
    result.write_text(json.dumps(data))  # an edited result.json
    assert "was changed after the step wrote it" in planned().extra["damaged"]
    assert run_pipeline(str(spec))["tok"]["status"] == "ran"
    assert planned().cached


def test_a_secret_never_reaches_logs_mlflow_prefect_or_results(tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    secret = "s3cr3t-5e7a9c1d"
    store = tmp_path / secret
    store.mkdir()
    monkeypatch.setenv("LLMCYCLE_TEST_STORE", str(store))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SFT.split("  sft:")[0].replace("name: faults", "name: secret\ntracking: {uri: "
                                                   "'sqlite:///${env:LLMCYCLE_TEST_STORE}/mlflow.db'}"))
    (tmp_path / "corpus.txt").write_text(CORPUS)
    code, out = run(spec, "run")
    assert code == 0, out[-3000:]
    assert secret not in out

    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaks == [], leaks  # the workdir: result.json, logs, requests, MLflow artifacts
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("secret").experiment_id])
    assert len(runs) == 3
    for r in runs:
        assert secret not in json.dumps({"params": r.data.params, "tags": r.data.tags})
    flow_run_id = next(r.data.tags["prefect.flow_run_id"] for r in runs if "prefect.flow_run_id" in r.data.tags)
    with get_client(sync_client=True) as prefect:
        logs = prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        [flow_run] = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert len(logs) > 5 and not [log.message for log in logs if secret in log.message]
    assert secret not in json.dumps(flow_run.parameters, default=str)


def test_cached_reruns_leave_nothing_behind(tmp_path):
    import psutil

    spec = tmp_path / "spec.yaml"
    spec.write_text(SFT.split("  lm:")[0].replace("name: faults", "name: soak"))
    (tmp_path / "corpus.txt").write_text(CORPUS)
    code, out = run(spec, "run")
    assert code == 0, out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("soak").experiment_id
    runs = len(client.search_runs([experiment]))
    for i in range(4):
        log = tmp_path / f"rerun-{i}.log"
        with cli("run", str(spec), log=log) as proc:
            proc.wait(timeout=300)
            # the session the command was started in: nothing of it outlives the command
            left = [p.pid for p in psutil.process_iter() if _session(p.pid) == proc.pid]
        assert proc.returncode == 0 and re.search(r"tok +cached", log.read_text()), log.read_text()[-2000:]
        assert left == [], left
        assert not [p for p in (tmp_path / "work").rglob(".tmp-*")]
        assert len(client.search_runs([experiment])) == runs + 2 * (i + 1)  # a parent and the cached step's run


def _session(pid: int) -> int | None:
    import os

    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_a_tracking_server_that_is_down_is_one_clear_error_before_any_work(tmp_path, capsys):
    from tests.conftest import free_port

    spec = tmp_path / "spec.yaml"
    spec.write_text(SFT.split("  lm:")[0].replace("name: faults", f"name: down\ntracking: {{uri: "
                                                     f"'http://127.0.0.1:{free_port()}'}}"))
    (tmp_path / "corpus.txt").write_text(CORPUS)
    assert main(["run", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "the MLflow tracking server at http://127.0.0.1:" in err and "is unreachable" in err, err
    assert not (tmp_path / "work").exists()  # nothing was started


@pytest.mark.slow
def test_a_tracking_server_killed_and_restarted_mid_step_loses_no_metric(tmp_path):
    import os
    import signal
    import sys
    import time

    from tests.conftest import REPO, free_port, serving

    port = free_port()
    server = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
              "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
              "--workers", "1"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(SFT.split("  sft:")[0].replace("name: faults", f"name: flaky\ntracking: {{uri: "
                                                   f"'http://127.0.0.1:{port}'}}")
                    .replace("max_steps: 2, batch_size: 4", "max_steps: 400, val_every: 50, batch_size: 4"))
    (tmp_path / "corpus.txt").write_text(CORPUS)
    uri = f"http://127.0.0.1:{port}"

    def lm_run():
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("flaky")
        found = experiment and client.search_runs([experiment.experiment_id], "tags.`llmcycle.step` = 'lm'")
        return found[0] if found else None

    log = tmp_path / "run.log"
    with serving(server, f"{uri}/health", tmp_path / "server1.log", 120, cwd=REPO) as first, \
            cli("run", str(spec), log=log) as pipeline:
        deadline = time.time() + 300
        while not ((run := lm_run()) and "val/loss" in run.data.metrics):  # the first validation round arrived
            assert pipeline.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert not glob.glob(str(tmp_path / "work" / "lm" / "*" / "result.json"))  # lm still training
        os.killpg(first.pid, signal.SIGKILL)  # the server dies mid-step...
        first.wait()
        time.sleep(5)
        with serving(server, f"{uri}/health", tmp_path / "server2.log", 120, cwd=REPO):  # ...and comes back
            pipeline.wait(timeout=600)
            out = log.read_text()
            assert pipeline.returncode == 0, out[-3000:]
            run = lm_run()
            history = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "val/loss")]
    assert run.info.status == "FINISHED"
    assert history == [0, *range(49, 400, 50)], history  # before training, then every round: none lost, none twice


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB filesystem (tmpfs) at tmp_path/disk; skipped where this process may not mount one."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip() or 'not root'}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill the filesystem at `disk` until `leave` bytes remain free; returns the ballast file."""
    import shutil

    ballast = disk / "ballast"
    with open(ballast, "wb") as fh:
        while (free := shutil.disk_usage(disk).free) > leave:
            fh.write(b"\0" * min(1 << 20, free - leave))
            fh.flush()
    return ballast


def test_a_full_disk_fails_the_step_with_the_path_and_the_rerun_resumes(tmp_path, small_disk):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SFT.split("  sft:")[0]
                    .replace("workdir: work", f"workdir: {small_disk / 'work'}\n"
                                              f"tracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}")
                    .replace("max_steps: 2, batch_size: 4", "max_steps: 40, checkpoint_every: 10, batch_size: 4"))
    (tmp_path / "corpus.txt").write_text(CORPUS)
    code, out = run(spec, "run", "--only", "tok")
    assert code == 0, out[-3000:]

    ballast = fill(small_disk, leave=64 << 10)  # room for the step's log, not for its checkpoints
    code, out = run(spec, "run")
    assert code == 1, out[-3000:]
    assert "No space left on device" in out and str(small_disk) in out, out[-3000:]
    assert "Traceback" not in out
    plan = {p.name: p for p in make_plan(schemas.load(spec))}
    assert plan["tok"].cached and not plan["lm"].cached  # no partial output taken for a complete one
    assert not (plan["lm"].output_dir / "result.json").exists()

    ballast.unlink()
    code, out = run(spec, "run")
    assert code == 0, out[-3000:]
    result = json.loads((plan["lm"].output_dir / "result.json").read_text())
    assert result["metrics"]["train/steps"] == 40
