"""MLflow wiring: the default local store (created race-free), the pipeline's parent run, one nested run per step."""

from __future__ import annotations

import json
import os
import socket
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


def holds_secret(loaded: LoadedSpec) -> bool:
    """Whether the spec's tracking URI was written with `${env:...}` (a password, a token): it is then never
    written down (step requests, launch records, logs); each process resolves it from the spec itself."""
    return ("tracking", "uri") in loaded.doc.secrets


def shown_uri(loaded: LoadedSpec) -> str:
    """The tracking URI as it may be printed: as written in the spec when it holds a secret."""
    return loaded.redacted()["tracking"]["uri"] if holds_secret(loaded) else tracking_uri(loaded)


def artifact_root(loaded: LoadedSpec) -> Path:
    return loaded.workdir / "mlartifacts"


class StoreUnreachable(RuntimeError):
    """The spec's tracking server does not answer: nothing was started."""


def check_reachable(loaded: LoadedSpec, timeout: float = 10.0) -> None:
    """For a tracking server (http/https), one GET of its /health before any work, so that a server that is
    down is one clear error, not retries deep inside the first step."""
    import urllib.error
    import urllib.request

    uri = tracking_uri(loaded)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise StoreUnreachable(f"the MLflow tracking server at {shown_uri(loaded)} answers {err.code} "
                                   f"({err.reason}); nothing was run") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise StoreUnreachable(f"the MLflow tracking server at {shown_uri(loaded)} is unreachable ({reason}); "
                               "start it, or fix tracking.uri in the spec (or MLFLOW_TRACKING_URI); nothing was "
                               "run") from None


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


def launcher_tags() -> dict[str, str]:
    """Who keeps a run open: this process (host, pid, start time), so that a later run can tell whether the
    process is gone without closing it (`end_orphans`)."""
    import psutil

    return {"llmcycle.launcher_host": socket.gethostname(), "llmcycle.launcher_pid": str(os.getpid()),
            "llmcycle.launcher_started": f"{psutil.Process().create_time():.2f}"}


def _alive(tags: dict[str, str]) -> bool:
    import psutil

    try:
        started = psutil.Process(int(tags["llmcycle.launcher_pid"])).create_time()
    except (psutil.NoSuchProcess, ValueError):
        return False
    return abs(started - float(tags.get("llmcycle.launcher_started", started))) < 1.0  # else a reused pid


def end_orphans(client, experiment: str, resumed_by: str) -> list[str]:
    """Mark KILLED the runs of this experiment still RUNNING whose launcher on this host is gone (a `kill -9`,
    a power cut), tagged with the run that found them; return their ids. Runs launched on other hosts are left
    alone: this host cannot tell whether their launcher lives."""
    host, ended = socket.gethostname(), []
    for run in client.search_runs([experiment], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get("llmcycle.launcher_host") != host or run.info.run_id == resumed_by or _alive(tags):
            continue
        client.set_tag(run.info.run_id, "llmcycle.resumed_by", resumed_by)
        client.set_tag(run.info.run_id, "llmcycle.error", f"its launcher (pid {tags['llmcycle.launcher_pid']} on "
                       f"{host}) ended without closing it: killed; run {resumed_by} took over")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


def start_parent_run(loaded: LoadedSpec, client, experiment: str, flow_run_id: str = "") -> str:
    """The pipeline's run: the spec as an artifact and its top-level settings as params."""
    tags = {"llmcycle.spec": loaded.spec.name, "llmcycle.spec_path": str(loaded.path),
            "prefect.flow_run_id": flow_run_id, "mlflow.source.git.commit": git_commit(loaded.base_dir) or "",
            **launcher_tags()}
    run = client.create_run(experiment, run_name=loaded.spec.name, tags={k: v for k, v in tags.items() if v})
    client.log_text(run.info.run_id, json.dumps(loaded.redacted(), indent=2), "spec.json")
    log_params(client, run.info.run_id, flatten({k: v for k, v in loaded.redacted().items() if k != "steps"}))
    return run.info.run_id


def start_step_run(loaded: LoadedSpec, client, parent_run_id: str, planned, cached: bool) -> str:
    """A nested run for one step: its settings as params, where its output goes as tags (a sweep's variants: the
    swept step and the variant's label, which the swept step's run later groups: flows/sweeps.py)."""
    from flows import sweeps

    variant, swept = getattr(planned, "variant", None), getattr(planned, "sweep", None)
    run = client.create_run(
        client.get_run(parent_run_id).info.experiment_id, run_name=sweeps.run_name(planned),
        tags={"mlflow.parentRunId": parent_run_id, "llmcycle.kind": planned.kind, "llmcycle.step": planned.name,
              "llmcycle.fingerprint": planned.fingerprint, "llmcycle.cached": "yes" if cached else "no",
              "llmcycle.output_dir": str(planned.output_dir), **launcher_tags(),
              **({"llmcycle.work_pool": planned.run_on["work_pool"]} if planned.run_on and not cached else {}),
              **({"llmcycle.sweep": variant["of"], "llmcycle.variant": variant["label"]} if variant else {}),
              **({"llmcycle.sweep.variants": str(len(swept["variants"]))} if swept else {})})
    step = loaded.redacted()["steps"][planned.name]
    if sweeps.is_trial(planned):
        step = sweeps.applied(step, planned.variant["sets"])
    if swept:  # its own settings are the variants' (each run shows its own); the sweep is what it adds
        step = {"kind": step["kind"], "sweep": step["sweep"]}
    log_params(client, run.info.run_id, flatten({**step, "resources": planned.resources}))
    return run.info.run_id


def finish_step_run(client, run_id: str, status: str, metrics: dict[str, float] | None = None,
                    error: str = "", log: Path | None = None, trace: str = "") -> None:
    """Log the final metrics (except those a training curve already logged), the step's log, the traceback
    of a failure (kept here rather than shown in the terminal), and the status."""
    from mlflow.entities import Metric

    if metrics:
        logged = client.get_run(run_id).data.metrics
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, 0) for k, v in metrics.items() if k not in logged]
        for i in range(0, len(batch), 500):
            client.log_batch(run_id, metrics=batch[i:i + 500])
    if error:
        client.set_tag(run_id, "llmcycle.error", error[:5000])
    try:
        if log is not None and log.is_file() and log.stat().st_size:
            client.log_artifact(run_id, str(log), "logs")
        if trace:
            client.log_text(run_id, trace, "logs/traceback.txt")
    except OSError as err:  # a full disk under the artifact store: the status matters more than the log
        client.set_tag(run_id, "llmcycle.logs", f"not stored: {err}")
    client.set_terminated(run_id, STATUS[status])


def log_ledger(client, run_id: str, ledger: dict, table: str) -> None:
    """The run's ledger on the pipeline's parent run: `ledger.json` (the figures) and `ledger.md` (the table)."""
    client.log_text(run_id, json.dumps(ledger, indent=2), "ledger.json")
    client.log_text(run_id, table, "ledger.md")


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
