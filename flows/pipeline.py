"""The Prefect flow: validate, plan, then one task per step in dependency order.

Step outputs are cached by fingerprint (see flows/plan.py), not by Prefect's own cache, because the
cache key must cover input file contents and upstream fingerprints, and must survive a server reset.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
import traceback
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

import schemas  # noqa: E402
from components.context import StepContext, StepResult, finite_metrics, write_json_atomic  # noqa: E402
from flows import tracking  # noqa: E402
from flows.plan import RESULT_FILE, PlannedStep, checkpoint_dir, make_plan  # noqa: E402


class StepFailed(RuntimeError):
    """A step raised; the message names the step and the cause in one paragraph."""


@task(cache_policy=NO_CACHE)
def run_step(planned: PlannedStep, loaded: schemas.LoadedSpec, upstream: dict[str, StepResult],
             parent_run_id: str, uri: str) -> StepResult:
    """Run one step (or reuse its complete output) inside a nested MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    reuse = planned.cached and not planned.forced
    run = client.create_run(
        client.get_run(parent_run_id).info.experiment_id, run_name=planned.name,
        tags={"mlflow.parentRunId": parent_run_id, "llmcycle.kind": planned.kind, "llmcycle.step": planned.name,
              "llmcycle.fingerprint": planned.fingerprint, "llmcycle.cached": "yes" if reuse else "no",
              "llmcycle.output_dir": str(planned.output_dir)})
    run_id = run.info.run_id
    step_spec = loaded.spec.steps[planned.name]
    tracking.log_params(client, run_id, tracking.flatten(loaded.redacted()["steps"][planned.name]))
    if reuse:
        result = StepResult.read(planned.output_dir)
        _log_result_metrics(client, run_id, result)
        client.set_terminated(run_id, "FINISHED")
        get_run_logger().info("%s: complete output found in %s, skipped", planned.name, planned.output_dir)
        return result
    tmp = planned.output_dir.parent / f".tmp-{planned.fingerprint[:12]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx = StepContext(name=planned.name, kind=planned.kind, fingerprint=planned.fingerprint, out_dir=tmp,
                      ckpt_dir=checkpoint_dir(loaded.workdir, planned.name, planned.fingerprint),
                      base_dir=loaded.base_dir, workdir=loaded.workdir, seed=loaded.spec.seed,
                      trainer=loaded.spec.trainer, upstream=upstream, pipeline_name=loaded.spec.name,
                      run_id=run_id, tracking_uri=uri)
    started = time.perf_counter()
    try:
        component = importlib.import_module(f"components.{planned.kind}")
        output = component.run(step_spec, ctx)
        metrics = finite_metrics(output.metrics)  # timed before result.json, so a cached re-run reports it too
        metrics.setdefault("time/seconds", round(time.perf_counter() - started, 3))
        result = StepResult(name=planned.name, kind=planned.kind, fingerprint=planned.fingerprint,
                            dir=planned.output_dir, outputs=output.outputs, metrics=metrics, info=output.info)
        write_json_atomic(tmp / RESULT_FILE, result.to_json())
        _move_into_place(tmp, planned.output_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        client.set_tag(run_id, "llmcycle.error", _cause(err)[:5000])
        client.set_terminated(run_id, "FAILED")
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise StepFailed(f"step '{planned.name}' ({planned.kind}) failed: {_cause(err)}. Outputs of the steps "
                         f"before it are kept; fix the cause and run again to resume from here.") from err
    shutil.rmtree(ctx.ckpt_dir, ignore_errors=True)
    _log_result_metrics(client, run_id, result)
    client.set_terminated(run_id, "FINISHED")
    return result


def _cause(err: BaseException) -> str:
    text = str(err).strip().replace("\n", " ") or type(err).__name__
    return text if isinstance(err, (ValueError, FileNotFoundError, KeyError, RuntimeError)) \
        else f"{type(err).__name__}: {text}"


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():  # a forced re-run replaces the previous output
        old = final.with_name(final.name + f".old-{os.getpid()}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


def _log_result_metrics(client, run_id: str, result: StepResult) -> None:
    """Log the step's final metrics, except those its training curves already logged (a final point at
    step 0 would end each curve with a jump back to the start)."""
    from mlflow.entities import Metric

    logged = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in result.metrics.items() if k not in logged]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i:i + 500])


@flow(name="llmcycle", log_prints=True)
def run_pipeline(spec_path: str, overrides: list[str] | None = None, force: list[str] | None = None,
                 only: list[str] | None = None) -> dict[str, dict]:
    """Validate the spec, then run each selected step (or reuse its output) in dependency order."""
    from mlflow.tracking import MlflowClient
    from prefect.runtime import flow_run

    loaded = schemas.load(spec_path, overrides)
    plan = make_plan(loaded, force=force, only=only)
    uri = tracking.tracking_uri(loaded)
    client = MlflowClient(tracking_uri=uri)
    tags = {"llmcycle.spec": loaded.spec.name, "llmcycle.spec_path": str(loaded.path),
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "mlflow.source.git.commit": tracking.git_commit(loaded.base_dir) or ""}
    parent = client.create_run(tracking.experiment_id(loaded, client), run_name=loaded.spec.name,
                               tags={k: v for k, v in tags.items() if v})
    client.log_text(parent.info.run_id, json.dumps(loaded.redacted(), indent=2), "spec.json")
    tracking.log_params(client, parent.info.run_id,
                        tracking.flatten({k: v for k, v in loaded.redacted().items() if k != "steps"}))
    results: dict[str, StepResult] = {}
    statuses: dict[str, str] = {}
    try:
        for planned in plan:
            if not planned.selected:
                statuses[planned.name] = "not selected"
                continue
            upstream = {d: results[d] for d in planned.deps}
            results[planned.name] = run_step.with_options(task_run_name=f"{planned.kind}:{planned.name}")(
                planned, loaded, upstream, parent.info.run_id, uri)
            statuses[planned.name] = "cached" if planned.cached and not planned.forced else "ran"
    except BaseException:
        client.set_terminated(parent.info.run_id, "FAILED")
        _publish_summary(plan, results, statuses, uri, parent.info.run_id, failed=True)
        raise
    client.set_terminated(parent.info.run_id, "FINISHED")
    _publish_summary(plan, results, statuses, uri, parent.info.run_id)
    return {name: {**r.to_json(), "dir": str(r.dir), "status": statuses[name]} for name, r in results.items()}


def _publish_summary(plan: list[PlannedStep], results: dict[str, StepResult], statuses: dict[str, str],
                     uri: str, parent_run_id: str, failed: bool = False) -> None:
    """Publish a table of the run's steps as a Prefect artifact (shown on the flow run's page)."""
    from prefect.artifacts import create_table_artifact

    rows = []
    for planned in plan:
        result = results.get(planned.name)
        status = statuses.get(planned.name, "failed" if failed and planned.selected and result is None else "-")
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in list((result.metrics if result else {}).items())[:6])
        rows.append({"step": planned.name, "kind": planned.kind, "status": status,
                     "cached": "yes" if status == "cached" else "no", "metrics": metrics,
                     "mlflow": f"{uri} run {parent_run_id}"})
    try:
        create_table_artifact(key="llmcycle-steps", table=rows, description="Steps of this pipeline run")
    except Exception as err:  # the summary is a convenience; never fail a finished pipeline over it
        get_run_logger().warning("could not publish the Prefect summary artifact: %s", err)


def format_failure(err: BaseException) -> str:
    """One paragraph for the terminal: the step and its cause, not a traceback."""
    chain = err
    while chain is not None and not isinstance(chain, StepFailed):
        chain = chain.__cause__ or chain.__context__
    return str(chain) if chain is not None else "".join(traceback.format_exception_only(type(err), err)).strip()
