"""MLflow wiring: the default local store (created race-free), the pipeline's parent run, one nested run per step."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from components.lib.mlflow_models import git_commit
from schemas import LoadedSpec

STATUS = {"ok": "FINISHED", "failed": "FAILED", "killed": "FAILED", "stopped": "KILLED"}


def tracking_uri(loaded: LoadedSpec) -> str:
    """The spec's URI, else MLFLOW_TRACKING_URI, else a sqlite store under the workdir (absolute path)."""
    if loaded.spec.tracking.uri:
        return loaded.spec.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{loaded.workdir / 'mlflow.db'}"


def artifact_root(loaded: LoadedSpec) -> Path:
    return loaded.workdir / "mlartifacts"


def open_store(loaded: LoadedSpec):
    """(client, experiment id). Creating a sqlite store runs migrations that two processes must not run at
    once, so the first run to arrive creates it (and the experiment) under a file lock; the others wait."""
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(loaded)
    if not uri.startswith("sqlite:"):
        client = MlflowClient(tracking_uri=uri)
        return client, experiment_id(loaded, client)
    loaded.workdir.mkdir(parents=True, exist_ok=True)
    db = Path(uri.removeprefix("sqlite:///"))
    with FileLock(str(db) + ".lock"):
        client = MlflowClient(tracking_uri=uri)  # creating the client creates (and migrates) the store
        return client, experiment_id(loaded, client)


def experiment_id(loaded: LoadedSpec, client) -> str:
    """Get or create the pipeline's experiment, with artifacts under the workdir for local stores."""
    from mlflow.exceptions import MlflowException

    name = loaded.spec.tracking.experiment or loaded.spec.name
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = artifact_root(loaded).as_uri() if tracking_uri(loaded).startswith(("sqlite:", "file:")) else None
    loaded.workdir.mkdir(parents=True, exist_ok=True)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # a server store: another run created it a moment ago
        return client.get_experiment_by_name(name).experiment_id


def start_parent_run(loaded: LoadedSpec, client, experiment: str, flow_run_id: str = "") -> str:
    """The pipeline's run: the spec as an artifact and its top-level settings as params."""
    tags = {"llmcycle.spec": loaded.spec.name, "llmcycle.spec_path": str(loaded.path),
            "prefect.flow_run_id": flow_run_id, "mlflow.source.git.commit": git_commit(loaded.base_dir) or ""}
    run = client.create_run(experiment, run_name=loaded.spec.name, tags={k: v for k, v in tags.items() if v})
    client.log_text(run.info.run_id, json.dumps(loaded.redacted(), indent=2), "spec.json")
    log_params(client, run.info.run_id, flatten({k: v for k, v in loaded.redacted().items() if k != "steps"}))
    return run.info.run_id


def start_step_run(loaded: LoadedSpec, client, parent_run_id: str, planned, cached: bool) -> str:
    """A nested run for one step: its settings as params, where its output goes as tags."""
    run = client.create_run(
        client.get_run(parent_run_id).info.experiment_id, run_name=planned.name,
        tags={"mlflow.parentRunId": parent_run_id, "llmcycle.kind": planned.kind, "llmcycle.step": planned.name,
              "llmcycle.fingerprint": planned.fingerprint, "llmcycle.cached": "yes" if cached else "no",
              "llmcycle.output_dir": str(planned.output_dir), "llmcycle.launcher_pid": str(os.getpid()),
              **({"llmcycle.work_pool": planned.run_on["work_pool"]} if planned.run_on and not cached else {})})
    step = loaded.redacted()["steps"][planned.name]
    log_params(client, run.info.run_id, flatten({**step, "resources": planned.resources}))
    return run.info.run_id


def finish_step_run(client, run_id: str, status: str, metrics: dict[str, float] | None = None,
                    error: str = "", log: Path | None = None) -> None:
    """Log the final metrics (except those a training curve already logged), the step's log, and the status."""
    from mlflow.entities import Metric

    if metrics:
        logged = client.get_run(run_id).data.metrics
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, 0) for k, v in metrics.items() if k not in logged]
        for i in range(0, len(batch), 500):
            client.log_batch(run_id, metrics=batch[i:i + 500])
    if error:
        client.set_tag(run_id, "llmcycle.error", error[:5000])
    if log is not None and log.is_file() and log.stat().st_size:
        client.log_artifact(run_id, str(log), "logs")
    client.set_terminated(run_id, STATUS[status])


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested settings into MLflow params: optimizer.lr -> "0.001"."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): str(data)[:500]}


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
