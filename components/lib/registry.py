"""The MLflow Model Registry side of llmcycle: read `models:/` URIs back into folders.

`download_registered` turns `models:/name@alias` or `models:/name/version` into a folder that
`from_pretrained` loads (and `components.lib.models.load_model`).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """Split `models:/name@alias` / `models:/name/version` into (name, alias, version)."""
    body = uri[len("models:/"):] if uri.startswith("models:/") else uri
    name, at, alias = body.partition("@")
    if at:
        return name, alias, None
    name, slash, version = body.partition("/")
    if not slash or not version:
        raise ValueError(f"'{uri}' is not a registered model URI; expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, None, version


def resolve_version(uri: str, tracking_uri: str | None = None):
    """The ModelVersion a `models:/` URI points at, with a clear error when the name or alias is unknown."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, alias, number = parse_model_uri(uri)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as err:
        known = [m.name for m in client.search_registered_models()]
        raise ValueError(f"{uri}: not in the registry at {tracking_uri or 'the default store'} "
                         f"({err.message.splitlines()[0]}); registered models: {', '.join(known) or 'none'}") from err


def download_registered(uri: str, cache: Path, tracking_uri: str | None = None) -> Path:
    """Download a registered transformers model once and return a folder `from_pretrained` loads."""
    return _download(uri, cache, tracking_uri, "", _merge_transformers_layout)


def download_mlflow_model(uri: str, cache: Path, tracking_uri: str | None = None) -> Path:
    """Download a registered model once and return its MLflow model folder (the one holding `MLmodel`), as
    MLflow's scoring server loads it."""
    def mlflow_folder(root: Path) -> Path:
        found = sorted(root.rglob("MLmodel"), key=lambda p: len(p.parts))
        if not found:
            raise FileNotFoundError(f"no MLmodel file in the registered model at {root}")
        return found[0].parent

    return _download(uri, cache, tracking_uri, "mlflow-", mlflow_folder, done="MLmodel")


def _download(uri: str, cache: Path, tracking_uri: str | None, prefix: str, pick, done: str = "config.json") -> Path:
    import mlflow
    from mlflow.tracking import MlflowClient

    version = resolve_version(uri, tracking_uri)
    name = version.name
    # Keyed by where the version's files live, not only its number: version 1 of a name in another store
    # (another workdir, a reset registry) is another model.
    origin = hashlib.sha256(f"{tracking_uri}|{version.source}|{version.run_id}".encode()).hexdigest()[:12]
    target = cache / name / f"{prefix}{version.version}-{origin}"
    if (target / done).is_file():
        return target
    staging = cache / name / f".dl-{prefix}{version.version}-{origin}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # The version's storage location, not models:/..., whose resolution reads the global registry URI.
    where = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(
        name, version.version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=str(staging),
                                                     tracking_uri=tracking_uri))
    folder = pick(local)
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
