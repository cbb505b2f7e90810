"""Log a transformers model folder to the step's MLflow run with the transformers flavor."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from components.context import StepContext

# Explicit so that MLflow does not infer them from the environment (it probes for torchvision, absent here).
PIP_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")


def _pins() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in PIP_REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def log_transformers_model(ctx: StepContext, folder: Path, artifact_path: str = "model",
                           task: str = "text-generation", registered_name: str | None = None) -> str:
    """Log `folder` (model + tokenizer) under the step's run; return the model URI ('' without a run)."""
    if ctx.run_id is None:
        return ""
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from components.models import is_masked_model

    masked = is_masked_model(str(folder))
    model = (AutoModelForMaskedLM if masked else AutoModelForCausalLM).from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if masked and task == "text-generation":
        task = "fill-mask"
    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    with tracking_to(ctx.tracking_uri):
        try:
            with mlflow.start_run(run_id=ctx.run_id, nested=True):
                info = mlflow.transformers.log_model({"model": model, "tokenizer": tokenizer}, name=artifact_path,
                                                     task=task, pip_requirements=_pins(),
                                                     registered_model_name=registered_name)
        finally:
            # start_run's exit marks the run FINISHED; the engine ends the step's run, so keep it running.
            client.update_run(ctx.run_id, status="RUNNING")
    return info.model_uri


@contextmanager
def tracking_to(uri: str | None):
    """Point MLflow's fluent API at `uri` for a block, then restore both its global and the environment
    variable it writes (set_tracking_uri exports MLFLOW_TRACKING_URI, which would leak into later runs)."""
    from mlflow.tracking._tracking_service import utils

    saved_global, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    utils.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils.set_tracking_uri(saved_global)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env
