"""Models in MLflow: log a transformers folder to the step's run (transformers flavor), the pinned requirements
that go with it, and where the code came from (the git commit)."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

from components.lib.context import StepContext
from components.lib.phases import charged

# Explicit so that MLflow does not infer them from the environment (it probes for torchvision, absent here).
PIP_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")


def pip_requirements() -> list[str]:
    """The packages a logged model needs, pinned to the versions installed here."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in PIP_REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def generation_signature():
    """Text in, text out, and the generation settings a request may pass as `params`. Without a params schema
    MLflow's scoring server drops every param (with a warning in its log), so `max_new_tokens` would be
    ignored and each request would generate up to the model's maximum length."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", 32),
                                              ParamSpec("do_sample", "boolean", False),
                                              ParamSpec("temperature", "double", 1.0),
                                              ParamSpec("top_k", "long", 50),
                                              ParamSpec("top_p", "double", 1.0),
                                              ParamSpec("num_beams", "long", 1)]))


@charged("logging")  # the ledger's split of the step's time (components/lib/phases.py)
def log_transformers_model(ctx: StepContext, folder: Path, artifact_path: str = "model",
                           task: str = "text-generation", registered_name: str | None = None) -> str:
    """Log `folder` (model + tokenizer) under the step's run; return the model URI ('' without a run). An
    encoder-decoder is logged as the pyfunc generator of `seq2seq_pyfunc` instead."""
    if ctx.run_id is None:
        return ""
    import mlflow
    from mlflow.tracking import MlflowClient
    from components.lib.models import is_masked_model, is_seq2seq_model, load_model

    seq2seq = is_seq2seq_model(str(folder))
    masked = is_masked_model(str(folder))
    if not seq2seq:
        model, tokenizer = load_model(folder, "masked" if masked else "causal")
    if masked and task == "text-generation":
        task = "fill-mask"
    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    with tracking_to(ctx.tracking_uri):
        try:
            with mlflow.start_run(run_id=ctx.run_id, nested=True):
                if seq2seq:
                    info = mlflow.pyfunc.log_model(name=artifact_path, registered_model_name=registered_name,
                                                   **seq2seq_pyfunc(folder))
                    return info.model_uri
                info = mlflow.transformers.log_model({"model": model, "tokenizer": tokenizer}, name=artifact_path,
                                                     task=task, pip_requirements=pip_requirements(),
                                                     registered_model_name=registered_name,
                                                     signature=generation_signature() if task == "text-generation"
                                                     else None)
        finally:
            # start_run's exit marks the run FINISHED; the engine ends the step's run, so keep it running.
            client.update_run(ctx.run_id, status="RUNNING")
    return info.model_uri


def seq2seq_pyfunc(folder: Path) -> dict:
    """`mlflow.pyfunc.log_model`/`save_model` arguments for an encoder-decoder's folder: the generator of
    seq2seq_serving.py (models from code) with the folder as its artifact `model`. MLflow's transformers flavor
    cannot serve one under transformers 5, which has no text2text-generation pipeline."""
    return {"python_model": str(Path(__file__).with_name("seq2seq_serving.py")), "artifacts": {"model": str(folder)},
            "signature": generation_signature(), "pip_requirements": pip_requirements()}


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


def log_outputs(ctx: StepContext, outputs: dict[str, str]) -> None:
    """Log a training step's results to its run: the standalone `model` with the transformers flavor, the peft
    `adapter` and `metrics.json` as artifacts."""
    if ctx.run_id is None:
        return
    if "adapter" in outputs:
        ctx.log_artifact(ctx.out_dir / outputs["adapter"], "adapter")
    if "model" in outputs:
        log_transformers_model(ctx, ctx.out_dir / outputs["model"])
    if "metrics" in outputs:
        ctx.log_artifact(ctx.out_dir / outputs["metrics"])


def git_commit(folder: Path) -> str | None:
    """The commit checked out at `folder`, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
