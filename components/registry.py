"""Read models back from the MLflow Model Registry (`models:/name@alias` or `models:/name/version`)."""

from __future__ import annotations

import shutil
from pathlib import Path


def download_registered(uri: str, cache: Path, tracking_uri: str | None = None) -> Path:
    """Download a registered transformers model once and return a folder `from_pretrained` loads."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    name, _, selector = uri[len("models:/"):].partition("@")
    if selector:
        version = client.get_model_version_by_alias(name, selector)
    else:
        name, _, number = name.partition("/")
        version = client.get_model_version(name, number)
    target = cache / name / str(version.version)
    if (target / "config.json").is_file():
        return target
    staging = cache / name / f".dl-{version.version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                     dst_path=str(staging), tracking_uri=tracking_uri))
    folder = _merge_transformers_layout(local)
    shutil.rmtree(target, ignore_errors=True)
    folder.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _merge_transformers_layout(root: Path) -> Path:
    """The transformers flavor stores `model/` and `components/tokenizer/`; join them into one folder."""
    config = next(iter(sorted(root.rglob("config.json"), key=lambda p: len(p.parts))), None)
    if config is None:
        raise FileNotFoundError(f"no config.json in the registered model at {root}")
    model_dir = config.parent
    for tok in root.rglob("tokenizer_config.json"):
        if tok.parent != model_dir:
            for f in tok.parent.iterdir():
                if f.is_file() and not (model_dir / f.name).exists():
                    shutil.copy2(f, model_dir / f.name)
    return model_dir
