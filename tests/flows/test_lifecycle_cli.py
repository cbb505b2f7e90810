"""`llmcycle models|generate|serve` against a real registry, a real pipeline output and a real scoring server."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import urllib.request

import pytest

from flows.cli import main
from tests.conftest import REPO, free_port, make_ctx, serving


@pytest.fixture(scope="module")
def registry(tiny_lm, tmp_path_factory):
    """tiny_lm registered as tiny-lm v1 (champion) in a fresh sqlite store; returns the tracking URI."""
    from mlflow.tracking import MlflowClient

    from components import register
    from components.lib.context import StepResult
    from schemas.steps.register import RegisterSpec

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("cli", artifact_location=(tmp / "artifacts").as_uri())
    evaluation = StepResult("eval", "evaluate", "e" * 64, tmp, {}, {"val/perplexity": 30.0})
    ctx = make_ctx(tmp, name="release", kind="register", upstream={"eval": evaluation})
    ctx.tracking_uri, ctx.run_id = uri, client.create_run(experiment).info.run_id
    spec = RegisterSpec(kind="register", model=str(tiny_lm), name="tiny-lm", gate=["eval.val/perplexity < 40"])
    register.run(spec, ctx)
    return uri


def expected_completion(tiny_lm, prompt: str, n: int) -> str:
    from components.lib.generation import generate_texts
    from components.lib.models import load_model

    model, tok = load_model(tiny_lm)
    return generate_texts(model, tok, [prompt], max_new_tokens=n)[0]


def test_models_lists_versions_aliases_and_metrics(registry, capsys):
    assert main(["models", "--tracking-uri", registry]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "tiny-lm"
    assert "v1" in out and "candidate,champion" in out and "gate=passed" in out and "eval.val/perplexity=30" in out
    assert main(["models", "nope", "--tracking-uri", registry]) == 1  # it failed; the command line was fine
    assert "nope" in capsys.readouterr().err


def test_generate_from_the_champion_matches_the_model(registry, tiny_lm, capsys):
    argv = ["generate", "models:/tiny-lm@champion", "--tracking-uri", registry, "--prompt", "The ",
            "--max-new-tokens", "6", "--json"]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row == {"prompt": "The ", "completion": expected_completion(tiny_lm, "The ", 6)}
    assert row["completion"]
    assert main(["generate", str(tiny_lm), "--prompt", "The ", "--strategy", "beam", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("The ")
    assert main(["generate", "models:/tiny-lm@nope", "--tracking-uri", registry, "--prompt", "x"]) == 1
    assert "not in the registry" in capsys.readouterr().err


def cli(*argv: str) -> tuple[int, str, str]:
    """Run `llmcycle ARGV` in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_generate_from_a_step_of_a_spec(prefect_harness, tiny_lm, write_spec):
    # No capsys here: Prefect's log handlers would keep its stream, closed after this test.
    from flows.pipeline import run_pipeline

    spec = write_spec(f"""
        name: cli-steps
        workdir: runs
        steps:
          small:
            kind: optimize
            model: {tiny_lm}
            measure: {{new_tokens: 2, repeats: 1}}
        """)
    code, _, err = cli("generate", "small", "--spec", str(spec), "--prompt", "x")
    assert code == 1 and "run `llmcycle run" in err
    run_pipeline(str(spec))
    code, out, _ = cli("generate", "small", "--spec", str(spec), "--prompt", "The ", "--max-new-tokens", "6", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["completion"] == expected_completion(tiny_lm, "The ", 6)
    quantized = next((spec.parent / "runs" / "small").glob("*/quantized"))
    assert cli("generate", str(quantized), "--prompt", "The ", "--max-new-tokens", "3")[0] == 0
    code, _, err = cli("generate", "smal", "--spec", str(spec), "--prompt", "x")
    assert code == 2 and "did you mean 'small'" in err  # a mistake on the command line


def test_serve_answers_invocations_with_generated_text(registry, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "serve", "models:/tiny-lm@champion", "--tracking-uri", registry,
               "--port", str(port)]
    with serving(command, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", 180, cwd=REPO):
        body = json.dumps({"inputs": ["The "], "params": {"max_new_tokens": 5}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        prediction = answer["predictions"][0]
        assert isinstance(prediction, str) and prediction.strip() and not prediction.startswith("The ")
