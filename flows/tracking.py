"""MLflow wiring: the default local store, the pipeline's parent run and one nested run per step."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from schemas import LoadedSpec


def tracking_uri(loaded: LoadedSpec) -> str:
    """The spec's URI, else MLFLOW_TRACKING_URI, else a sqlite store under the workdir (absolute path)."""
    if loaded.spec.tracking.uri:
        return loaded.spec.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{loaded.workdir / 'mlflow.db'}"


def artifact_root(loaded: LoadedSpec) -> Path:
    return loaded.workdir / "mlartifacts"


def experiment_id(loaded: LoadedSpec, client) -> str:
    """Get or create the pipeline's experiment, with artifacts under the workdir for local stores."""
    name = loaded.spec.tracking.experiment or loaded.spec.name
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = artifact_root(loaded).as_uri() if tracking_uri(loaded).startswith(("sqlite:", "file:")) else None
    loaded.workdir.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=location)


def git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


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
