"""The `llmcycle` command line. Heavy libraries are imported only by the commands that need them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

EXIT_SPEC = 2  # a spec (or command-line) mistake
EXIT_FAILED = 1  # a step failed


def _load(path: str, overrides: list[str] | None = None):
    import schemas

    return schemas.load(path, overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.specs:
        loaded = _load(path, args.set)
        found = _check_data(loaded) if args.data else 0
        bad += found
        print(f"{path}: " + (f"{found} data problem(s)" if found else "ok") + f" ({len(loaded.spec.steps)} steps: "
              f"{', '.join(loaded.spec.steps)}){' and their data files' if args.data and not found else ''}")
    return EXIT_SPEC if bad else 0


def _check_data(loaded) -> int:
    """Print every problem in the data files the spec's steps read; return how many were found."""
    from schemas.rows import data_problems

    found = 0
    for name, step in loaded.spec.steps.items():
        problems = data_problems(step, lambda p: loaded.base_dir / p)
        for problem in problems:
            print(f"{name}: {problem}", file=sys.stderr)
        found += len(problems)
    return found


def cmd_verify(args: argparse.Namespace) -> int:
    """Read every byte of every complete output of the spec against the checksums its step recorded."""
    from flows.integrity import damage
    from flows.plan import RESULT_FILE, make_plan

    loaded = _load(args.spec, args.set)
    damaged = 0
    for p in make_plan(loaded):
        if not (p.output_dir / RESULT_FILE).is_file():
            print(f"{p.name:<16} not run")
            continue
        why = damage(p.output_dir, full=True)
        damaged += bool(why)
        print(f"{p.name:<16} {'DAMAGED: ' + why + ' (the next run runs it again)' if why else 'ok'}")
    return EXIT_FAILED if damaged else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from flows.plan import make_plan

    loaded = _load(args.spec, args.set)
    plan = make_plan(loaded, force=args.force, only=args.only)
    if args.json:
        print(json.dumps([p.to_json() for p in plan], indent=2))
        return 0
    width = max(len(p.name) for p in plan)
    gets = max(len(p.describe_resources()) for p in plan)
    for p in plan:
        action = p.to_json()["action"]
        print(f"{p.name:<{width}}  {p.kind:<14} {p.fingerprint[:12]}  {action:<6}  {p.describe_resources():<{gets}}  "
              f"{p.output_dir}")
        for key, value in p.extra.items():
            print(f"{'':<{width}}    {key}: {value}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    import schemas

    print(json.dumps(schemas.json_schema(), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.plan import UsageError, make_plan

    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        raise UsageError("llmcycle run is started once, not under torchrun: it launches torchrun itself for "
                         "every step whose trainer has devices x num_nodes above 1")
    from flows.tracking import StoreUnreachable, check_reachable

    loaded = _load(args.spec, args.set)  # fail fast, before any server or heavy import
    plan = make_plan(loaded, force=args.force, only=args.only)
    try:
        check_reachable(loaded)
    except StoreUnreachable as err:
        print(f"llmcycle: {err}", file=sys.stderr)
        return EXIT_FAILED
    if not args.in_process and any(p.will_run and not p.run_on for p in plan):
        from flows.launch import start_forkserver

        start_forkserver()  # its imports overlap Prefect's start-up
    from flows.pipeline import check_in_process, format_failure, run_pipeline

    if args.in_process:
        check_in_process(plan)
    started = time.perf_counter()
    try:
        results = run_pipeline(str(loaded.path), overrides=args.set, force=args.force, only=args.only,
                               in_process=args.in_process)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - Prefect's TerminationSignal (SIGTERM) is a BaseException
        if args.debug:
            import traceback

            traceback.print_exception(err)
        spent = _ledger_of(err)
        if spent is not None:
            _print_ledger(spent, time.perf_counter() - started)
        print(f"\nllmcycle: {format_failure(err)}", file=sys.stderr)
        return EXIT_FAILED
    _print_summary(loaded, results, time.perf_counter() - started)
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    """Run one step whose inputs are complete; on the other machines of a multi-node step, join it."""
    import signal

    from flows import step_cli

    stopper = step_cli.Stopper()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stopper.stop(signal.Signals(signum).name))
    ok, message = step_cli.run_one(_load(args.spec, args.set), args.step, args.force, stopper)
    print(f"llmcycle: {message}", file=sys.stderr if not ok else sys.stdout)
    return 0 if ok else EXIT_FAILED


def _print_summary(loaded, results: dict[str, dict], seconds: float) -> None:
    from flows import ledger
    from flows.tracking import shown_uri

    print(f"\n{loaded.spec.name}: {len(results)} steps")
    for name, r in results.items():
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(r["metrics"].items())[:5])
        print(f"  {name:<14} {r['status']:<7} {shown}")
    _print_ledger(ledger.build([ledger.Entry(n, r["kind"], r["status"], r["metrics"], r["info"])
                                for n, r in results.items()]), seconds)
    print(f"MLflow: {shown_uri(loaded)}   browse: llmcycle ui {loaded.path}")


def _print_ledger(spent: dict, seconds: float) -> None:
    """The run's time and effort (flows/ledger.py; ledger.json and ledger.md on the pipeline's MLflow run), and
    how long the command took."""
    from flows import ledger

    print("\nledger: time and effort of this run")
    print(ledger.text({**spent, "pipeline_seconds": None}))
    print(f"llmcycle run took {ledger.duration(seconds)} (Prefect's start included; steps in parallel overlap)")


def _ledger_of(err: BaseException) -> dict | None:
    """The ledger a failed pipeline run left in its PipelineFailed, if the failure is one."""
    from flows.runner import PipelineFailed

    while err is not None and not isinstance(err, PipelineFailed):
        err = err.__cause__ or err.__context__
    return getattr(err, "ledger", None)


def cmd_metrics(args: argparse.Namespace) -> int:
    from schemas.metrics import METRICS, table

    if args.kind and args.kind not in METRICS:
        from flows.plan import UsageError
        from schemas.errors import did_you_mean

        raise UsageError(f"no step kind '{args.kind}'{did_you_mean(args.kind, METRICS)}; kinds: {', '.join(METRICS)}")
    print(table(args.kind))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from flows.tracking import artifact_root, tracking_uri

    loaded = _load(args.spec)
    uri = tracking_uri(loaded)
    if not uri.startswith(("sqlite:", "file:")) and "://" in uri:
        print(f"this pipeline tracks to a server; open {uri} in a browser")
        return 0
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--default-artifact-root", artifact_root(loaded).as_uri(),
               "--host", args.host, "--port", str(args.port)]
    print(f"MLflow UI for {loaded.spec.name}: http://{args.host}:{args.port}  (Ctrl-C stops it)")
    os.execv(sys.executable, command)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmcycle", description="Run the life of a language model from one YAML file.")
    parser.add_argument("--debug", action="store_true",
                        help="show the tracebacks of failures (otherwise kept in each step's MLflow run)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                       help="override a field, e.g. --set steps.tokenizer.vocab_size=4096 (repeatable)")

    p = sub.add_parser("validate", help="check specs and report every mistake with its line")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.add_argument("--data", action="store_true",
                   help="also check every row of the data files the steps read (what each step checks at its start)")
    with_overrides(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("verify", help="check every complete output against the checksums its step recorded")
    p.add_argument("spec", metavar="SPEC")
    with_overrides(p)
    p.set_defaults(func=cmd_verify)

    for name, helptext, func in (("plan", "show each step's fingerprint, folder and whether it will run", cmd_plan),
                                 ("run", "run the pipeline as a Prefect flow", cmd_run)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("spec", metavar="SPEC")
        with_overrides(p)
        p.add_argument("--force", action="append", default=[], metavar="STEP", help="re-run STEP even if complete")
        p.add_argument("--only", action="append", default=[], metavar="STEP",
                       help="run STEP and the steps it needs, nothing else")
        if name == "plan":
            p.add_argument("--json", action="store_true", help="print the plan as JSON")
        else:
            p.add_argument("--in-process", action="store_true",
                           help="run every step inside this process, one at a time (for a debugger)")
        p.set_defaults(func=func)

    p = sub.add_parser("step", help="run one step whose inputs are complete (on each machine of a multi-node step)")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("step", metavar="STEP")
    with_overrides(p)
    p.add_argument("--force", action="store_true", help="run it even if its output is complete")
    p.set_defaults(func=cmd_step)

    p = sub.add_parser("metrics", help="list every metric each step kind reports (the README's table)")
    p.add_argument("kind", nargs="?", help="one step kind (default: all)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("schema", help="print the JSON Schema of specs")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("ui", help="open the MLflow UI on a pipeline's tracking store")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    from flows import lifecycle_cli  # models, generate, serve

    lifecycle_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flows.plan import UsageError
    from schemas import SpecError

    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ["LLMCYCLE_DEBUG"] = "1"  # the steps' processes print their tracebacks too
    try:
        return args.func(args)
    except SpecError as err:
        print(err, file=sys.stderr)
        print(f"llmcycle: {len(err.problems)} problem(s) found", file=sys.stderr)
        return EXIT_SPEC
    except UsageError as err:
        print(f"llmcycle: {err}", file=sys.stderr)
        return EXIT_SPEC
    except KeyboardInterrupt:
        print("llmcycle: interrupted; completed steps are kept and a re-run resumes", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmcycle plan SPEC | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
