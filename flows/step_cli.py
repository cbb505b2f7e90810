"""`llmcycle step SPEC STEP`: one step, on this machine, once its inputs are complete.

On its own it plays the engine's part for that step (lock, MLflow run, launch). For a step with
`num_nodes` above 1, start it on every machine: the first to arrive (or `llmcycle run`) owns the step,
leaves its MLflow run in `launch.json` and waits; the others join the rendezvous as further nodes.
"""

from __future__ import annotations

from components.lib.context import StepResult
from flows import launch, tracking
from flows.plan import UsageError, make_plan, run_dir
from flows.runner import StepFailed, Stopper, StepStopped, claim, execute_step, join, step_lock

__all__ = ["Stopper", "run_one"]


def run_one(loaded, name: str, force: bool, stopper: Stopper) -> tuple[bool, str]:
    """(ok, one-line message) after running, joining or reusing step `name`."""
    plan = {p.name: p for p in make_plan(loaded, force=[name] if force and name in loaded.spec.steps else None)}
    if name not in plan:
        raise UsageError(f"{loaded.path} has no step '{name}'; steps: {', '.join(plan)}")
    planned = plan[name]
    folder = run_dir(loaded.workdir, name, planned.fingerprint)
    folder.mkdir(parents=True, exist_ok=True)
    lock = step_lock(folder)
    inputs_done = lambda: all((plan[d].output_dir / "result.json").is_file() for d in planned.deps)  # noqa: E731
    if planned.resources.get("num_nodes", 1) > 1:  # the other machines may still be making its inputs
        timeout = planned.resources["launcher"]["join_timeout"]
        if not claim(lock, folder / "launch.json", True, print, stopper, name, ready=inputs_done, timeout=timeout):
            upstream = {d: StepResult.read(plan[d].output_dir) for d in planned.deps}
            outcome = join(planned, loaded, upstream, tracking.tracking_uri(loaded), print, stopper)
            return outcome.ok, f"step '{name}': this node's part ended {outcome.status}" + \
                (f": {outcome.message}" if outcome.message else "")
    else:
        lock = None  # execute_step claims it (waiting for a run that holds it)
    try:
        missing = [d for d in planned.deps if not (plan[d].output_dir / "result.json").is_file()]
        if missing:
            raise UsageError(f"step '{name}' needs {', '.join(missing)}, which have no complete output yet; run "
                             f"`llmcycle run {loaded.path} --only {' --only '.join(missing)}` first")
        planned.run_on = None  # `llmcycle step` runs where it is started
        upstream = {d: StepResult.read(plan[d].output_dir) for d in planned.deps}
        launch.start_forkserver()
        uri = tracking.tracking_uri(loaded)
        client, experiment = tracking.open_store(loaded)
        parent = tracking.start_parent_run(loaded, client, experiment)
        held, lock = lock, None  # from here on execute_step releases it
        try:
            result = execute_step(planned, loaded, upstream, client, parent, uri, print, stopper, lock=held)
        except (StepFailed, StepStopped) as err:
            client.set_terminated(parent, "KILLED" if isinstance(err, StepStopped) else "FAILED")
            return False, str(err)
    finally:
        if lock is not None and lock.is_locked:
            lock.release()
    client.set_terminated(parent, "FINISHED")
    return True, f"step '{name}' complete: {result.dir}"
