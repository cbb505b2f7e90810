"""`llmcycle models|generate|serve`: browse the registry, try a model from the terminal, serve it over HTTP."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flows.plan import UsageError
from flows.serve import Limits

DEFAULT_SPEC = "specs/quickstart.yaml"
KEY_METRICS = 4  # metric tags shown per version by `llmcycle models`


def register(sub) -> None:
    """Add the lifecycle commands to the `llmcycle` parser."""
    p = sub.add_parser("models", help="list registered models: versions, aliases and key metrics")
    p.add_argument("name", nargs="?", help="one registered model (default: all)")
    _store_options(p)
    p.set_defaults(func=_friendly(cmd_models))

    p = sub.add_parser("generate", help="generate text from a step's model, a folder, hf:ID or models:/NAME@ALIAS")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--strategy", default="greedy", choices=("greedy", "sample", "top_k", "top_p", "beam"))
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print {prompt, completion} rows as JSON lines")
    _store_options(p)
    p.set_defaults(func=_friendly(cmd_generate))

    p = sub.add_parser("serve", help="serve a registered model with MLflow's scoring server (POST /invocations)")
    p.add_argument("model", metavar="MODEL", help="models:/NAME@ALIAS, models:/NAME/VERSION or a register step")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only; "
                                                      "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=5001)
    limits = Limits()
    p.add_argument("--max-request-bytes", type=int, default=limits.max_request_bytes,
                   help=f"largest request body accepted (default {limits.max_request_bytes:,})")
    p.add_argument("--max-batch", type=int, default=limits.max_batch,
                   help=f"most prompts in one request (default {limits.max_batch})")
    p.add_argument("--max-new-tokens", type=int, default=limits.max_new_tokens,
                   help=f"most tokens generated per prompt; also the default (default {limits.max_new_tokens})")
    p.add_argument("--concurrency", type=int, default=limits.concurrency,
                   help=f"requests generating at once; the others wait (default {limits.concurrency})")
    p.add_argument("--timeout", type=float, default=limits.timeout_s,
                   help=f"seconds a request may take (default {limits.timeout_s:.0f})")
    _store_options(p)
    p.set_defaults(func=_friendly(cmd_serve))


def _friendly(command):
    """Print what went wrong (an unknown model, a step not run yet) as one line, not a traceback: exit status 2
    for a mistake on the command line (UsageError), 1 for anything that failed."""
    def wrapped(args) -> int:
        from mlflow.exceptions import MlflowException

        try:
            return command(args)
        except UsageError:
            raise  # main() prints it and exits 2
        except (ValueError, OSError, RuntimeError, MlflowException) as err:  # OSError: e.g. the port is taken
            print(f"llmcycle: {err}", file=sys.stderr)
            return 1

    return wrapped


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help=f"pipeline whose steps and tracking store to use (default: {DEFAULT_SPEC} if present)")
    p.add_argument("--tracking-uri", help="MLflow store holding the registry (default: MLFLOW_TRACKING_URI, else the spec's)")


def _loaded(args):
    import schemas

    path = args.spec or (DEFAULT_SPEC if Path(DEFAULT_SPEC).is_file() else None)
    return schemas.load(path) if path else None


def store_uri(args) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the spec's store."""
    from flows.tracking import tracking_uri

    if args.tracking_uri:
        return args.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    loaded = _loaded(args)
    if loaded is None:
        raise UsageError("no tracking store: give --spec SPEC or --tracking-uri URI (or set MLFLOW_TRACKING_URI)")
    return tracking_uri(loaded)


def cmd_models(args) -> int:
    from mlflow.tracking import MlflowClient

    uri = store_uri(args)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    models = [client.get_registered_model(args.name)] if args.name else client.search_registered_models()
    if not models:
        print(f"no registered models in {uri}")
        return 0
    for model in models:
        aliases: dict[str, list[str]] = {}
        for alias, number in (model.aliases or {}).items():
            aliases.setdefault(str(number), []).append(alias)
        print(f"{model.name}")
        versions = client.search_model_versions(f"name='{model.name}'")
        for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
            gate = v.tags.get("llmcycle.gate_report", "")
            # The metrics the gate read first: they are why this version is (or is not) the champion.
            metrics = sorted((k[len("metric."):] not in gate, k[len("metric."):], val)
                             for k, val in v.tags.items() if k.startswith("metric."))
            shown = [f"{name}={val}" for _, name, val in metrics]
            print(f"  v{v.version:<4} {','.join(sorted(aliases.get(str(v.version), []))) or '-':<20} "
                  f"gate={v.tags.get('llmcycle.gate', '-'):<7} step={v.tags.get('llmcycle.spec', '?')}."
                  f"{v.tags.get('llmcycle.step', '?')}  {'  '.join(shown[:KEY_METRICS])}")
    return 0


def model_folder(ref: str, args) -> str:
    """Resolve a model reference on the command line to a folder (or hub id) `from_pretrained` loads."""
    from schemas.base import is_external

    if ref.startswith("models:/"):
        from components.lib.registry import download_registered

        loaded = _loaded(args)
        cache = (loaded.workdir if loaded else Path.home() / ".cache" / "llmcycle") / ".models"
        return str(download_registered(ref, cache, store_uri(args)))
    if ref.startswith("hf:"):
        return ref[3:]
    if is_external(ref) or Path(ref).exists():
        if not Path(ref).exists():
            raise FileNotFoundError(f"no model folder at {Path(ref).resolve()}")
        return str(Path(ref).resolve())
    result = step_result(ref, args)
    for key in ("model", "adapter"):
        if key in result.outputs:
            return str(result.path(key))
    raise UsageError(f"step '{ref}' ({result.kind}) has no model output; it has: {', '.join(result.outputs) or 'none'}")


def step_result(name: str, args):
    """The completed result of step `name` of --spec, with a clear error when it has not run."""
    from components.lib.context import StepResult
    from flows.plan import make_plan
    from schemas.errors import did_you_mean

    loaded = _loaded(args)
    if loaded is None:
        raise UsageError(f"'{name}' is not a path, hf:ID or models:/ URI; to use a step, give --spec SPEC")
    plan = {p.name: p for p in make_plan(loaded)}
    if name not in plan:
        raise UsageError(f"{loaded.path} has no step '{name}'{did_you_mean(name, plan)}; steps: {', '.join(plan)}")
    if not plan[name].cached:
        raise ValueError(f"step '{name}' has no complete output for the current spec; run "
                         f"`llmcycle run {args.spec or DEFAULT_SPEC} --only {name}` first")
    return StepResult.read(plan[name].output_dir)


def cmd_generate(args) -> int:
    from components.lib.generation import generate_texts
    from components.lib.models import load_model

    model, tokenizer = load_model(model_folder(args.model, args))
    model.eval()
    texts = generate_texts(model, tokenizer, args.prompt, strategy=args.strategy,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, num_beams=args.num_beams, length_penalty=args.length_penalty,
                           seed=args.seed)
    for prompt, text in zip(args.prompt, texts):
        print(json.dumps({"prompt": prompt, "completion": text}) if args.json else f"{prompt}{text}")
    return 0


def registered_uri(ref: str, args) -> str:
    """The `models:/` URI to serve: given as such, or the one a register step of --spec registered."""
    from schemas.base import is_external

    if ref.startswith("models:/"):
        return ref
    if is_external(ref) or Path(ref).exists():
        raise UsageError(f"serve takes a registered model (models:/NAME@ALIAS or models:/NAME/VERSION) or a "
                         f"register step of --spec, got '{ref}'; try `llmcycle generate {ref}` for a folder")
    result = step_result(ref, args)
    if "model_uri" not in result.info:
        raise UsageError(f"serve takes a registered model (models:/NAME@ALIAS); step '{ref}' ({result.kind}) "
                         "registered none. Add a `register` step, or use `llmcycle generate` for local folders")
    return result.info["model_uri"]


def cmd_serve(args) -> int:
    from components.lib.registry import download_mlflow_model
    from flows.serve import serve

    for name in ("max_request_bytes", "max_batch", "max_new_tokens", "concurrency", "timeout"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be above 0, got {getattr(args, name)}")
    ref, uri = registered_uri(args.model, args), store_uri(args)
    loaded = _loaded(args)
    cache = (loaded.workdir if loaded else Path.home() / ".cache" / "llmcycle") / ".models"
    folder = download_mlflow_model(ref, cache, uri)  # fails here, readably, for an unknown name or alias
    # The scoring server execs nothing by name, but MLflow looks up tools beside this interpreter.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PATH": path}
    limits = Limits(args.max_request_bytes, args.max_batch, args.max_new_tokens, args.concurrency, args.timeout)
    print(f"serving {ref} at http://{args.host}:{args.port}/invocations  (Ctrl-C stops it)\n"
          f"  curl -s http://{args.host}:{args.port}/invocations -H 'Content-Type: application/json' "
          "-d '{\"inputs\": [\"def \"], \"params\": {\"max_new_tokens\": 20}}'", flush=True)
    return serve(folder, args.host, args.port, limits, env)
