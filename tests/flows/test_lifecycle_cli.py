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
    quantized = next((spec.parent / "runs" / "small").glob("*/int8"))
    assert cli("generate", str(quantized), "--prompt", "The ", "--max-new-tokens", "3")[0] == 0
    code, _, err = cli("generate", "smal", "--spec", str(spec), "--prompt", "x")
    assert code == 2 and "did you mean 'small'" in err  # a mistake on the command line


def test_serve_answers_invocations_with_generated_text(registry, tiny_lm, tmp_path):
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
        from transformers import AutoTokenizer  # the model honours the request's max_new_tokens

        assert len(AutoTokenizer.from_pretrained(tiny_lm)(prediction, add_special_tokens=False)["input_ids"]) <= 10  # 5 asked; not ~256


def post(port: int, body: bytes, timeout: float = 60) -> tuple[int, dict]:
    import urllib.error

    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_refuses_what_it_cannot_do_holds_under_load_and_stops_everything(registry, tmp_path):
    import re
    import signal

    import psutil

    from flows.loadtest import load_test

    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "flows.cli", "serve", "models:/tiny-lm@champion", "--tracking-uri", registry,
               "--port", str(port), "--max-new-tokens", "16"]
    with serving(command, f"http://127.0.0.1:{port}/ping", log, 180, cwd=REPO) as server:
        scorer = psutil.Process(int(re.search(r"scoring server pid (\d+)", log.read_text()).group(1)))
        assert [c.laddr.ip for c in scorer.net_connections() if c.status == "LISTEN"] == ["127.0.0.1"]
        ok = json.dumps({"inputs": ["The "], "params": {"max_new_tokens": 4}}).encode()
        assert post(port, ok)[0] == 200
        refused = {
            b"{not json": (400, "not valid JSON"),
            b'{"prompts": ["x"]}': (400, 'expected a JSON object {"inputs"'),
            b'{"inputs": [3]}': (400, "must be a prompt or a non-empty list of prompts"),
            json.dumps({"inputs": ["x"] * 17}).encode(): (413, "17 prompts in one request; this server takes at most 16"),
            json.dumps({"inputs": ["x"], "params": {"max_new_tokens": 10_000_000}}).encode():
                (422, "max_new_tokens is 10,000,000; this server generates at most 16"),
            json.dumps({"inputs": ["x" * (2 << 20)]}).encode(): (413, "this server takes at most 65,536"),
            json.dumps({"inputs": ["x"], "params": {"temperature": "hot"}}).encode(): (400, ""),
        }
        for body, (status, text) in refused.items():
            code, answer = post(port, body)
            assert (code, set(answer)) == (status, {"error"}) and text in answer["error"], (body[:60], code, answer)
            assert "Traceback" not in answer["error"]

        before = scorer.memory_info().rss
        report = load_test(f"http://127.0.0.1:{port}/invocations", clients=6, seconds=4, max_new_tokens=8)
        assert report.errors == 0 and report.answered >= 6, report
        assert report.p99_ms < 30_000
        assert scorer.memory_info().rss < before * 1.25 + (30 << 20), (before, scorer.memory_info().rss)

        server.send_signal(signal.SIGTERM)  # the command alone, as a supervisor stops it
        server.wait(timeout=30)
        assert server.returncode == 0, log.read_text()[-2000:]
        psutil.wait_procs([scorer], timeout=20)
        assert not scorer.is_running(), "the scoring server outlived `llmcycle serve`"


def test_serve_loads_a_pre_transformer_family(tokenized, tmp_path):
    """The scoring server runs in a process of its own: llmcycle's rnn class must be registered there too."""
    from mlflow.tracking import MlflowClient

    from components import register
    from components.lib.models import build_model, load_tokenizer
    from schemas.steps.pretrain import ModelSpec
    from schemas.steps.register import RegisterSpec

    tok = load_tokenizer(str(tokenized.path("tokenizer")))
    folder = tmp_path / "rnn"
    build_model(ModelSpec(family="rnn", layers=1, hidden=32, context=64), tok, "causal").save_pretrained(folder)
    tok.save_pretrained(folder)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("rnn", artifact_location=(tmp_path / "artifacts").as_uri())
    ctx = make_ctx(tmp_path, name="release", kind="register")
    ctx.tracking_uri, ctx.run_id = uri, client.create_run(experiment).info.run_id
    register.run(RegisterSpec(kind="register", model=str(folder), name="tiny-rnn"), ctx)
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "serve", "models:/tiny-rnn@candidate", "--tracking-uri", uri,
               "--port", str(port)]
    with serving(command, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", 180, cwd=REPO):
        status, answer = post(port, json.dumps({"inputs": ["The "], "params": {"max_new_tokens": 4}}).encode())
    assert status == 200 and answer["predictions"][0] == expected_completion(folder, "The ", 4)
