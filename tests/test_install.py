"""The install a user does: build the wheel, install it (not editable) into a fresh virtual environment, and use it.

The fresh environment gets its dependencies by a .pth line naming this environment's site-packages: a path
line only, so this checkout's editable install (which needs its own .pth to run) is not seen, and every
llmcycle module must come from the wheel.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import schemas

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The `python` of a fresh environment with the llmcycle wheel installed."""
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(REPO)], check=True, capture_output=True, text=True)
    [wheel] = glob.glob(str(tmp / "dist" / "llmcycle-*.whl"))
    venv.create(tmp / "env", with_pip=False)
    python = tmp / "env" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", wheel],
                   check=True, capture_output=True, text=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "llmcycle-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_the_wheel_holds_every_package_and_shipped_file(installed):
    [wheel] = glob.glob(str(installed.parents[2] / "dist" / "llmcycle-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in schemas.KINDS:
        assert f"components/{kind}.py" in names or f"components/{kind}/__init__.py" in names, kind
    assert {"components/lib/assets/constitution.yaml", "components/lib/assets/red_team.jsonl",
            "schemas/pipeline.schema.json", "flows/preload.py", "components/lib/scoring.py"} <= names


def test_the_installed_command_validates_every_shipped_spec(installed, tmp_path):
    specs = sorted(glob.glob(str(REPO / "specs" / "*.yaml")))
    out = subprocess.run([str(installed.parent / "llmcycle"), "validate", *specs], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": ok (") == len(specs)


def test_every_step_kind_imports_from_the_install(installed, tmp_path):
    code = ("import importlib, json, components, flows, schemas; "
            "mods = {k: importlib.import_module(f'components.{k}') for k in schemas.KINDS}; "
            "print(json.dumps({'where': [m.__file__ for m in (components, flows, schemas, *mods.values())], "
            "'run': [callable(getattr(m, 'run', None)) for m in mods.values()]}))")
    out = subprocess.run([str(installed), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout)
    assert all(str(installed.parents[1]) in path for path in found["where"]), found["where"]  # not the checkout
    assert all(found["run"])
