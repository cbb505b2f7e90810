"""prefect.yaml end to end: a real Prefect server, process work pools, `prefect deploy`, workers, runs; and a
step dispatched to a second pool with `run_on` while the rest of its pipeline runs beside the flow.

Everything runs as subprocesses with their own PREFECT_HOME and database, so the session's
prefect_test_harness is untouched; every process is stopped however the test ends.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, started

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
POOL = "llmcycle-process"
STEP_POOL = "llmcycle-gpu"  # the pool of prefect.yaml's llmcycle-step deployment (process type here)


def test_prefect_yaml_declares_the_quickstart_deployment():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [deployment] = [d for d in config["deployments"] if d["name"] == "quickstart"]
    assert deployment["entrypoint"] == "flows/pipeline.py:run_pipeline"
    assert deployment["parameters"] == {"spec_path": "specs/quickstart.yaml"}
    assert deployment["work_pool"]["name"] == POOL
    assert [s["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]


def api(url: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"},
                                     method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prefect server exited:\n{log.read_text()[-3000:]}"
        try:
            api(url, "/health")
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"prefect server did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def prefect(env: dict, *args: str, timeout: float = 120) -> str:
    out = subprocess.run(PREFECT + list(args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_deploy_from_prefect_yaml_and_run_on_a_worker(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i} about tokens, models and the data they learn from"
                                  for i in range(30)))
    spec = tmp_path / "tiny.yaml"
    spec.write_text("name: deployed\nworkdir: out\nsteps:\n  tok:\n    kind: tokenize\n"
                    "    corpus: {files: [corpus.txt]}\n    vocab_size: 300\n")
    dispatched = tmp_path / "dispatched.yaml"
    dispatched.write_text("name: dispatched\nworkdir: out2\nsteps:\n"
                          "  here: {kind: tokenize, corpus: {files: [corpus.txt]}, vocab_size: 300}\n"
                          f"  there: {{kind: tokenize, corpus: {{files: [corpus.txt]}}, vocab_size: 290, "
                          f"run_on: {{work_pool: {STEP_POOL}}}}}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=url,
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_CLI_PROMPT="false")
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    server = PREFECT + ["server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with started(server, server_log, env) as srv:
        wait_for_server(url, srv, server_log)
        prefect(env, "work-pool", "create", POOL, "--type", "process")
        prefect(env, "work-pool", "create", STEP_POOL, "--type", "process")
        deployed = prefect(env, "--no-prompt", "deploy", "--all")
        assert "llmcycle/quickstart" in deployed and f"llmcycle-step/{STEP_POOL}" in deployed
        deployment = api(url, "/deployments/name/llmcycle/quickstart")
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert deployment["parameters"] == {"spec_path": "specs/quickstart.yaml"}
        with started(PREFECT + ["worker", "start", "--pool", POOL], worker_log, env):
            answer = prefect(env, "deployment", "run", "llmcycle/quickstart", "--param", f"spec_path={spec}",
                              "--watch", "--watch-timeout", "180", timeout=240)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", answer).group(1)
        flow_run = api(url, f"/flow_runs/{flow_run_id}")
        with started(PREFECT + ["worker", "start", "--pool", STEP_POOL], tmp_path / "step-worker.log", env):
            run = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(dispatched)], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert flow_run["state"]["type"] == "COMPLETED", worker_log.read_text()[-3000:]
    assert flow_run["parameters"]["spec_path"] == str(spec)
    results = list((tmp_path / "out" / "tok").glob("*/result.json"))
    assert len(results) == 1 and json.loads(results[0].read_text())["metrics"]["data/vocab_size"] <= 300
    assert (tmp_path / "out" / "mlflow.db").is_file()

    # `there` ran as a flow run of llmcycle-step/llmcycle-gpu: launched by that worker's flow-run process, not
    # by the `llmcycle run` process that launched `here`; both wrote their outputs to the shared workdir.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'out2' / 'mlflow.db'}")
    runs = {r.data.tags["llmcycle.step"]: r for r in client.search_runs(
        [client.get_experiment_by_name("dispatched").experiment_id], "tags.`llmcycle.step` != ''")}
    here, there = runs["here"].data.tags, runs["there"].data.tags
    assert there["llmcycle.work_pool"] == STEP_POOL and "llmcycle.work_pool" not in here
    assert there["llmcycle.launcher_pid"] != here["llmcycle.launcher_pid"]
    assert here["llmcycle.pid"] != here["llmcycle.launcher_pid"]  # every step runs in a process of its own
    assert runs["there"].info.status == runs["here"].info.status == "FINISHED"
    assert len(list((tmp_path / "out2" / "there").glob("*/result.json"))) == 1
