"""Serving under load: `llmcycle serve` (the guard in front of MLflow's scoring server) against the scoring
server alone, the same model, the same load, in the same run.

A 1-layer Llama is registered in a scratch MLflow store; N clients post one prompt each, back to back, for T
seconds, on loopback (flows/loadtest.py). Reports answered/errors, p50/p99 latency, requests per second and
the scoring server's memory before and after the load (it must stay flat). Goal: the guard costs at most
10% of throughput (ours/baseline >= 0.9); every request answered.

    .venv/bin/python benchmarks/bench_serve.py              # 8 clients x 30 s each
    .venv/bin/python benchmarks/bench_serve.py --quick      # 8 clients x 8 s
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from flows.loadtest import load_test  # noqa: E402
from flows.serve import free_port  # noqa: E402
from benchmarks.record import Results  # noqa: E402


def register_tiny_model(tmp: Path) -> str:
    """A 1-layer Llama with a byte-level tokenizer, registered as tiny@champion; returns the store URI."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import LlamaConfig, LlamaForCausalLM

    from pydoc_data.topics import topics
    from transformers import PreTrainedTokenizerFast

    from components.lib.mlflow_models import generation_signature, pip_requirements
    from components.tokenize import SPECIALS, build_tokenizer
    from schemas.steps.tokenize import TokenizeSpec

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    bpe, trainer = build_tokenizer(TokenizeSpec(kind="tokenize", corpus={"builtin": "pydoc"}, vocab_size=512))
    bpe.train_from_iterator(topics.values(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=SPECIALS["eos_token"], **SPECIALS,
                                  clean_up_tokenization_spaces=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("serve", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        mlflow.transformers.log_model({"model": model, "tokenizer": tok}, name="model", task="text-generation",
                                      pip_requirements=pip_requirements(), registered_model_name="tiny",
                                      signature=generation_signature())
    MlflowClient(uri, uri).set_registered_model_alias("tiny", "champion", "1")
    return uri


def wait(url: str, proc: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s")


def measure(name: str, url: str, scorer: psutil.Process, clients: int, seconds: float):
    load_test(url, clients=2, seconds=2)  # warm-up: first requests compile and allocate
    before = scorer.memory_info().rss
    report = load_test(url, clients=clients, seconds=seconds)
    after = scorer.memory_info().rss
    print(f"  {name:<34} {report}; scoring server RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB", flush=True)
    return report, before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args()
    seconds = args.seconds or (8 if args.quick else 30)
    from flows.serve import start_scoring_server
    from components.lib.registry import download_mlflow_model

    with tempfile.TemporaryDirectory(prefix="llmcycle-serve-") as tmp:
        tmp = Path(tmp)
        uri = register_tiny_model(tmp)
        folder = download_mlflow_model("models:/tiny@champion", tmp / "cache", uri)
        base_port, our_port = free_port(), free_port()
        env = {"MLFLOW_TRACKING_URI": uri, "PATH": os.pathsep.join([os.path.dirname(sys.executable),
                                                                    os.environ.get("PATH", "")])}
        print(f"{args.clients} clients x {seconds:.0f} s, one prompt per request, max_new_tokens 8, loopback")
        base = start_scoring_server(folder, base_port, env)
        try:
            wait(f"http://127.0.0.1:{base_port}/ping", base, tmp / "none.log")
            baseline = measure("(a) MLflow scoring server alone", f"http://127.0.0.1:{base_port}/invocations",
                               psutil.Process(base.pid), args.clients, seconds)
        finally:
            os.killpg(base.pid, signal.SIGKILL)
            base.wait()
        log = tmp / "serve.log"
        with open(log, "w") as out:
            ours = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "models:/tiny@champion",
                                     "--tracking-uri", uri, "--port", str(our_port)], cwd=REPO, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait(f"http://127.0.0.1:{our_port}/ping", ours, log)
            scorer = psutil.Process(int(re.search(r"scoring server pid (\d+)", log.read_text()).group(1)))
            guarded = measure("(b) llmcycle serve (guard + server)", f"http://127.0.0.1:{our_port}/invocations",
                              scorer, args.clients, seconds)
        finally:
            ours.send_signal(signal.SIGTERM)
            ours.wait(timeout=30)
        gone = not scorer.is_running()
    (a, _, _), (b, b0, b1) = baseline, guarded
    print(f"\nthroughput b/a {b.per_second / a.per_second:.2f} (goal >= 0.9); p50 b/a {b.p50_ms / a.p50_ms:.2f}; "
          f"p99 b/a {b.p99_ms / a.p99_ms:.2f}; all answered: {a.errors == b.errors == 0}; memory under load "
          f"{b1 / b0:.3f}x; scoring server stopped with serve: {gone}")
    results = Results(__file__, "quick" if args.quick else "")
    results.add("requests/s, `llmcycle serve` (guard + scoring server)", b.per_second, "req/s",
                "MLflow's scoring server alone", a.per_second, goal=">= 0.9, every request answered",
                note=f"{args.clients} clients x {seconds:.0f} s, 1-layer Llama, 8 new tokens; errors {b.errors} vs "
                f"{a.errors}")
    results.add("p50 latency, `llmcycle serve`", b.p50_ms, "ms", "MLflow's scoring server alone", a.p50_ms)
    results.add("p99 latency, `llmcycle serve`", b.p99_ms, "ms", "MLflow's scoring server alone", a.p99_ms)
    results.add("scoring server RSS after the load, `llmcycle serve`", b1 / 2 ** 20, "MiB", "before the load",
                b0 / 2 ** 20, goal="flat")
    results.write()


if __name__ == "__main__":
    main()
