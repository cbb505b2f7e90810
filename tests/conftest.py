"""Shared fixtures: one Prefect harness per session, a tokenized corpus and a tiny model for component tests."""

from __future__ import annotations

import contextlib
import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests track to their own temporary stores

REPO = Path(__file__).resolve().parents[1]

from flows.serve import free_port  # noqa: E402,F401 - a loopback port for the server tests


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server for the whole session (starting one costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def run_shipped_spec(tmp_path: Path, spec: str, sets: list[str] = (), extra: list[str] = ()) -> None:
    """`llmcycle run` a shipped spec as a user does: `specs/<spec>` copied to the same place under `tmp_path`
    (so that paths relative to it hold), each of `sets` given as `--set`, `extra` as more arguments; it must
    succeed. Runs, the MLflow store and models land under tmp_path/runs."""
    import shutil

    from flows.cli import main

    path = tmp_path / "specs" / spec
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "specs" / spec, path)
    assert main(["run", str(path), *extra, *[arg for s in sets for arg in ("--set", s)]]) == 0


def cut_training(steps: list[str], max_steps: int = 4) -> list[str]:
    """`--set` values that cut each training step to `max_steps` steps, two held-out rounds of one batch, and
    no model logged: a shipped spec's whole graph in seconds."""
    return [f"steps.{s}.{k}={v}" for s in steps for k, v in (("max_steps", max_steps), ("val_every", 2),
                                                             ("val_batches", 1), ("log_model", "false"))]


def step_result(tmp_path: Path, step: str) -> dict:
    """The result.json of the one run of `step` under tmp_path/runs."""
    import json

    [result] = [json.loads(p.read_text()) for p in (tmp_path / "runs" / step).glob("*/result.json")]
    return result


def make_ctx(tmp: Path, name: str = "step", kind: str = "step", upstream: dict | None = None, seed: int = 0,
             trainer: dict | None = None, base_dir: Path | None = None, fingerprint: str = "0" * 64):
    """A StepContext for calling a component's run() directly, without Prefect or MLflow."""
    from components.lib.context import StepContext
    from schemas.resources import TrainerSpec

    out = tmp / name / "out"
    out.mkdir(parents=True, exist_ok=True)
    return StepContext(name=name, kind=kind, fingerprint=fingerprint, out_dir=out, ckpt_dir=tmp / name / "ckpt",
                       base_dir=base_dir or tmp, workdir=tmp, seed=seed,
                       trainer=TrainerSpec(**(trainer or {"precision": "32-true", "accelerator": "cpu"})),
                       upstream=upstream or {})


def check_contract(spec, output, steps: dict | None = None) -> None:
    """A kind's StepOutput against what its spec declares: exactly its outputs, and its metrics both ways
    (every name it reported is in the table of schemas/metrics.py; every name the table says it surely
    reports with these settings, it reported). `time/seconds` is the engine's, not the component's."""
    from schemas.metrics import emits, emitted

    up = (steps or {}).get
    assert set(output.outputs) == set(spec.outputs()), (sorted(output.outputs), sorted(spec.outputs()))
    declared = emits(spec, up)
    undeclared = [k for k in output.metrics if not emitted(k, declared)]
    missing = [k for k in emits(spec, up, certain_only=True) if k != "time/seconds" and "*" not in k
               and k not in output.metrics]
    assert not undeclared and not missing, f"undeclared: {undeclared}; declared but missing: {missing}"


def finish(ctx, output, name: str | None = None):
    """Turn a component's StepOutput into the StepResult downstream steps would see."""
    from components.lib.context import StepResult

    return StepResult(name=name or ctx.name, kind=ctx.kind, fingerprint=ctx.fingerprint, dir=ctx.out_dir,
                      outputs=output.outputs, metrics=output.metrics, info=output.info)


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory):
    """The pydoc corpus with a 512-token BPE vocabulary, as a tokenize step's result."""
    from components import tokenize
    from schemas.steps.tokenize import TokenizeSpec

    tmp = tmp_path_factory.mktemp("tokenized")
    spec = TokenizeSpec(kind="tokenize", corpus={"builtin": "pydoc"}, vocab_size=512)
    ctx = make_ctx(tmp, name="tokenizer", kind="tokenize")
    return finish(ctx, tokenize.run(spec, ctx))


@pytest.fixture(scope="session")
def tiny_lm(tokenized, tmp_path_factory) -> Path:
    """An untrained 2-layer, 64-wide Llama with the pydoc tokenizer, saved as a transformers folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenized.path("tokenizer"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny_lm")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def serving(command: list[str], ready_url: str, log: Path, seconds: float, cwd: Path | None = None):
    """Run a server process until the block ends: wait until `ready_url` answers (failing with the tail of
    its log if it exits or time runs out), then stop its whole process group, forcefully if it lingers."""
    import signal
    import subprocess
    import time
    import urllib.request

    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + seconds
            while True:
                assert server.poll() is None, log.read_text()[-3000:]
                try:
                    urllib.request.urlopen(ready_url, timeout=2)
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"{ready_url} did not answer within {seconds:.0f} s"
                    time.sleep(1)
            yield server
        finally:
            if server.poll() is None:  # the block may have stopped it already
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()


def cli(*args: str, log: Path):
    """`llmcycle ARGS` as a user runs it, against the session's Prefect server, as a `started` process."""
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONUNBUFFERED="1")
    return started([sys.executable, "-m", "flows.cli", *args], log, env=env)


@contextlib.contextmanager
def started(command: list[str], log: Path, env: dict | None = None, cwd: Path = REPO):
    """A process writing to `log`; on leaving the block, its whole session is stopped if it still runs (so a
    failing test leaves no pipeline, fork server or torchrun agent behind)."""
    import signal
    import subprocess

    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec (dedented YAML text) into a temporary folder and return its path."""
    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write
