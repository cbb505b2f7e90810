"""The `llmcycle-step` flow: one step of a pipeline, run by a worker of the pool its `run_on` names.

The engine submits the step as a flow run of deployment `llmcycle-step/<pool>` (declared in prefect.yaml)
with the step's request as the parameter; this flow launches the step on the worker's machine exactly as
the engine would (flows/launch.py), so the output and result.json land in the shared workdir.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

import schemas
from flows import launch, tracking
from flows.step import StepRequest


@flow(name="llmcycle-step", log_prints=True)
def run_step_flow(request: dict) -> dict:
    """Run one pipeline step here and report how it ended."""
    from mlflow.tracking import MlflowClient

    step = StepRequest.from_json(request)
    if step.run_id:  # this worker now keeps the step's run open
        client = MlflowClient(tracking_uri=step.tracking_uri or tracking.tracking_uri(schemas.load(step.spec_path,
                                                                                                    step.overrides)))
        for key, value in tracking.launcher_tags().items():
            client.set_tag(step.run_id, key, value)
    launch.start_forkserver()
    outcome = launch.run_local(step, get_run_logger().info, should_stop=lambda: None)
    if not outcome.ok:
        raise RuntimeError(f"step '{step.name}' ({step.kind}) {outcome.status}: {outcome.message}")
    return {"status": outcome.status, "output_dir": step.output_dir}
