"""Retake the README's Prefect UI screenshots: `python tests/ui/readme_screenshots.py SPEC [OUT_DIR]`.

Starts a throwaway Prefect server (own PREFECT_HOME), runs SPEC against it, and photographs the flow
run's Artifacts tab and the llmcycle-steps table in headless Chromium. The MLflow screenshots come from
tests/ui/test_browser.py (test-artifacts/).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import free_port  # noqa: E402
from tests.ui.test_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402


def main(spec: str, out: str = "docs/img") -> None:
    from playwright.sync_api import sync_playwright

    port, home = free_port(), tempfile.mkdtemp(prefix="prefect-home-")
    url = f"http://127.0.0.1:{port}"
    # The UI asks the API at PREFECT_UI_API_URL (default port 4200), not at the port the server was given.
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"{url}/api"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        subprocess.run([sys.executable, "-m", "flows.cli", "run", spec], env={**env, "PREFECT_API_URL": f"{url}/api"},
                       check=False)
        request = urllib.request.Request(f"{url}/api/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        run_id = json.loads(urllib.request.urlopen(request).read())[0]["id"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(f"{url}/runs/flow-run/{run_id}")
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("Steps of this pipeline run").first.wait_for()
            Path(out).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=f"{out}/prefect-run.png")
            page.get_by_text("Steps of this pipeline run").first.click()
            page.get_by_text("Show raw data").wait_for()
            page.screenshot(path=f"{out}/prefect-artifact.png")
            browser.close()
        print(f"wrote {out}/prefect-run.png and {out}/prefect-artifact.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


if __name__ == "__main__":
    main(*sys.argv[1:])
