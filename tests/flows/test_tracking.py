"""MLflow tracking: the default store under the workdir, URI overrides, parent/nested runs, no secrets."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import schemas
from flows.pipeline import run_pipeline
from flows.plan import make_plan

pytestmark = pytest.mark.usefixtures("prefect_harness")

SECRET = "tok-9f8e7d6c5b4a"
SPEC = """\
name: tracked
description: "uses ${{env:LLMCYCLE_TEST_SECRET}}"
workdir: work
{tracking}steps:
  tok:
    kind: tokenize
    corpus: {{files: ["${{env:LLMCYCLE_TEST_CORPUS}}"]}}
    vocab_size: 280
    val_fraction: 0.2
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A git repository holding a spec and its corpus; the secret and corpus name come from the environment."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "corpus.txt").write_text("\n\n".join(f"line {i} of a corpus about tracking runs" for i in range(30)))
    monkeypatch.setenv("LLMCYCLE_TEST_SECRET", SECRET)
    monkeypatch.setenv("LLMCYCLE_TEST_CORPUS", "corpus.txt")

    def write(tracking: str = "") -> Path:
        path = folder / "spec.yaml"
        path.write_text(SPEC.format(tracking=tracking))
        return path

    return write


def git_commit(folder: Path) -> str:
    run = lambda *a: subprocess.run(["git", *a], cwd=folder, check=True, capture_output=True, text=True)  # noqa: E731
    run("init", "-q")
    run("add", ".")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "spec")
    return run("rev-parse", "HEAD").stdout.strip()


def runs(uri: str, experiment: str = "tracked"):
    client = MlflowClient(tracking_uri=uri)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                               order_by=["attributes.start_time ASC"])
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_default_store_found_from_any_directory(project, tmp_path, monkeypatch):
    spec = project()
    commit = git_commit(spec.parent)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    first = run_pipeline("../project/spec.yaml")
    monkeypatch.chdir(spec.parent)
    second = run_pipeline("spec.yaml")
    assert (first["tok"]["status"], second["tok"]["status"]) == ("ran", "cached")
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing written where the command ran
    uri = f"sqlite:///{spec.parent / 'work' / 'mlflow.db'}"
    client, parents, children = runs(uri)
    assert len(parents) == 2 and len(children) == 2

    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tracked"
    assert parent.data.tags["llmcycle.spec"] == "tracked"
    assert parent.data.tags["mlflow.source.git.commit"] == commit
    assert len(parent.data.tags["prefect.flow_run_id"]) == 36
    assert parent.data.tags["prefect.flow_run_id"] != parents[1].data.tags["prefect.flow_run_id"]
    assert parent.data.params["seed"] == "0" and parent.data.params["trainer.precision"] == "auto"

    step = children[0]
    assert step.data.tags["mlflow.parentRunId"] == parent.info.run_id and step.info.run_name == "tok"
    assert step.data.tags["llmcycle.kind"] == "tokenize"
    assert step.data.tags["llmcycle.fingerprint"] == first["tok"]["fingerprint"]
    assert (step.data.tags["llmcycle.cached"], children[1].data.tags["llmcycle.cached"]) == ("no", "yes")
    assert step.data.params["vocab_size"] == "280" and step.data.params["algorithm"] == "bpe"
    assert step.data.params["corpus.files"] == "['${env:LLMCYCLE_TEST_CORPUS}']"
    metrics = step.data.metrics
    assert metrics["data/vocab_size"] == 280 and metrics["train/documents"] + metrics["val/documents"] == 30
    assert metrics["train/tokens"] > 0 and metrics["data/chars_per_token"] > 1
    assert children[1].data.metrics["train/tokens"] == metrics["train/tokens"]  # the cached run reports them too
    assert "tokenizer" in [a.path for a in client.list_artifacts(step.info.run_id)]

    logged = json.loads(Path(client.download_artifacts(parent.info.run_id, "spec.json", str(tmp_path))).read_text())
    assert logged == schemas.load(spec).redacted()
    assert logged["description"] == "uses ${env:LLMCYCLE_TEST_SECRET}" and logged["steps"]["tok"]["vocab_size"] == 280


def test_secret_is_never_written(project, tmp_path):
    spec = project()
    result = run_pipeline(str(spec))
    client, parents, children = runs(f"sqlite:///{spec.parent / 'work' / 'mlflow.db'}")
    for run in parents + children:
        assert SECRET not in json.dumps({**run.data.params, **run.data.tags})
    spec_json = Path(client.download_artifacts(parents[0].info.run_id, "spec.json", str(tmp_path))).read_text()
    assert SECRET not in spec_json
    assert SECRET not in (Path(result["tok"]["dir"]) / "result.json").read_text()
    assert SECRET not in json.dumps([p.to_json() for p in make_plan(schemas.load(spec))])
    assert SECRET not in json.dumps(result)


def test_tracking_uri_from_spec_or_environment(project, tmp_path, monkeypatch):
    by_env = f"sqlite:///{tmp_path / 'env-store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", by_env)
    spec = project()
    run_pipeline(str(spec))
    assert len(runs(by_env)[1]) == 1
    assert not (spec.parent / "work" / "mlflow.db").exists()

    by_spec = f"sqlite:///{tmp_path / 'spec-store.db'}"
    spec = project(tracking=f"tracking: {{uri: '{by_spec}', experiment: elsewhere}}\n")
    run_pipeline(str(spec))  # the spec wins over the environment
    assert len(runs(by_spec, "elsewhere")[1]) == 1 and len(runs(by_env)[1]) == 1
