"""Fixtures for the engine and CLI tests."""

import pytest


@pytest.fixture(autouse=True)
def default_store(monkeypatch):
    """Engine tests rely on the default store: unset MLFLOW_TRACKING_URI for each, whatever ran before
    (mlflow.set_tracking_uri exports it process-wide)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
