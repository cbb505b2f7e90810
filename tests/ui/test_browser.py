"""The UIs as a person sees them: the Prefect run's summary artifact, and the MLflow UI in headless Chromium."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, serving

CHROMIUM = "/usr/bin/chromium"
# Flags for a quiet, offline, sandbox-less (container) headless browser.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def pipeline(prefect_harness, tiny_lm, tmp_path_factory):
    """A two-step pipeline (tokenize, register with a gate) run through the engine; returns its spec."""
    from pydoc_data.topics import topics

    import schemas
    from flows.pipeline import run_pipeline

    folder = tmp_path_factory.mktemp("ui")
    (folder / "corpus.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[:20]))
    spec = folder / "spec.yaml"
    spec.write_text(f"""
name: ui-lifecycle
workdir: runs
steps:
  tokenizer:
    kind: tokenize
    corpus: {{files: [corpus.txt]}}
    vocab_size: 300
  release:
    kind: register
    model: {tiny_lm}
    name: ui-lifecycle-lm
    gate: [tokenizer.data/chars_per_token > 1.0]
    evidence: [tokenizer]
""")
    results = run_pipeline(str(spec))
    assert results["release"]["info"]["promoted"]
    return schemas.load(spec)


def test_run_publishes_a_prefect_table_artifact(pipeline):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["llmcycle-steps"])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    assert found and found[0].type == "table" and found[0].flow_run_id is not None
    rows = found[0].data if isinstance(found[0].data, list) else json.loads(found[0].data)
    by_step = {row["step"]: row for row in rows}
    assert by_step["tokenizer"]["status"] == "ran" and by_step["release"]["kind"] == "register"
    assert "gate/passed=1" in by_step["release"]["metrics"] and "mlflow.db" in by_step["release"]["mlflow"]


@pytest.fixture
def mlflow_server(pipeline, tmp_path):
    """`mlflow server` on the pipeline's store, on a free port; always stopped afterwards."""
    from flows.tracking import artifact_root, tracking_uri

    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri(pipeline),
               "--default-artifact-root", artifact_root(pipeline).as_uri(), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    with serving(command, f"http://127.0.0.1:{port}/health", tmp_path / "mlflow-server.log", 120):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's `chromium` (.ci/run does) to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) drives the system Chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_mlflow_ui_shows_runs_nested_steps_and_aliases(mlflow_server, browser):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(f"{mlflow_server}/#/experiments")
    page.get_by_text("Model training").click()  # MLflow 3 opens on the GenAI view
    page.get_by_role("link", name="ui-lifecycle", exact=True).click()
    close = page.locator("button[data-component-id='mlflow.assistant.chat_panel.close']")
    if close.count():
        close.click()
    parent = page.get_by_role("link", name="ui-lifecycle", exact=True).last
    expect(parent).to_be_visible()
    page.locator("button[data-component-id$='runnamecellrenderer.tsx_46']").first.click()  # expand the parent
    expect(page.get_by_role("link", name="tokenizer", exact=True)).to_be_visible()
    expect(page.get_by_role("link", name="release", exact=True)).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "mlflow-runs.png"))

    page.goto(f"{mlflow_server}/#/models/ui-lifecycle-lm")
    expect(page.get_by_text("Version 1", exact=True)).to_be_visible()
    expect(page.get_by_text("@ champion")).to_be_visible()
    expect(page.get_by_text("@ candidate")).to_be_visible()
    expect(page.get_by_text("llmcycle.gate", exact=True)).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "mlflow-model.png"), full_page=True)
