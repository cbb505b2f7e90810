"""`llmcycle step SPEC STEP`: one step, on this machine, once its inputs are complete.

On its own it plays the engine's part for that step (lock, MLflow run, launch). For a step with
`num_nodes` above 1, start it on every machine: the first to arrive (or `llmcycle run`) owns the step,
leaves its MLflow run in `launch.json` and waits; the others join the rendezvous as further nodes.
"""

from __future__ import annotations

import os
import socket

from components.context import StepResult
from flows import launch, tracking
from flows.plan import UsageError, make_plan, run_dir
from flows.runner import StepFailed, Stopper, StepStopped, execute_step, step_lock, try_lock
from flows.step import StepRequest

__all__ = ["Stopper", "run_one"]


def run_one(loaded, name: str, force: bool, stopper: Stopper) -> tuple[bool, str]:
    """(ok, one-line message) after running, joining or reusing step `name`."""
    plan = {p.name: p for p in make_plan(loaded, force=[name] if force and name in loaded.spec.steps else None)}
    if name not in plan:
        raise UsageError(f"{loaded.path} has no step '{name}'; steps: {', '.join(plan)}")
    planned = plan[name]
    folder = run_dir(loaded.workdir, name, planned.fingerprint)
    folder.mkdir(parents=True, exist_ok=True)
    owner = step_lock(folder)
    if planned.resources.get("num_nodes", 1) > 1:
        if not _own_or_wait(plan, planned, folder, owner, stopper):
            return _join(loaded, planned, plan, stopper)
    else:
        owner = None  # execute_step takes the lock itself (waiting for a run that holds it)
    try:
        missing = [d for d in planned.deps if not plan[d].cached]
        if missing:
            raise UsageError(f"step '{name}' needs {', '.join(missing)}, which have no complete output yet; run "
                             f"`llmcycle run {loaded.path} --only {' --only '.join(missing)}` first")
        planned.run_on = None  # `llmcycle step` runs where it is started
        upstream = {d: StepResult.read(plan[d].output_dir) for d in planned.deps}
        launch.start_forkserver()
        uri = tracking.tracking_uri(loaded)
        client, experiment = tracking.open_store(loaded)
        parent = tracking.start_parent_run(loaded, client, experiment)
        held, owner = owner, None  # from here on execute_step releases it
        try:
            result = execute_step(planned, loaded, upstream, client, parent, uri, print, stopper, lock=held)
        except (StepFailed, StepStopped) as err:
            client.set_terminated(parent, "KILLED" if isinstance(err, StepStopped) else "FAILED")
            return False, str(err)
    finally:
        if owner is not None and owner.is_locked:
            owner.release()
    client.set_terminated(parent, "FINISHED")
    return True, f"step '{name}' complete: {result.dir}"


def _own_or_wait(plan: dict, planned, folder, owner, stopper: Stopper) -> bool:
    """For a multi-node step: True once this machine owns it (its inputs complete, nobody else running it),
    False once another machine runs it (its launch record exists: join). Waits up to the join timeout."""
    import time

    timeout = planned.resources["launcher"]["join_timeout"]
    deadline, said = time.monotonic() + timeout, False
    while time.monotonic() < deadline and not stopper():
        if (folder / "launch.json").is_file():
            return False
        if all((plan[d].output_dir / "result.json").is_file() for d in planned.deps) and try_lock(owner):
            for d in planned.deps:
                plan[d].cached = True
            return True
        if not said:
            print(f"waiting for step '{planned.name}' to start on the machine that runs the pipeline, or for its "
                  f"inputs ({', '.join(planned.deps)}) to complete (up to {timeout} s)", flush=True)
            said = True
        time.sleep(1)
    raise UsageError(f"step '{planned.name}' did not start within {timeout} s (launcher.join_timeout): start "
                     "`llmcycle run` (or `llmcycle step`) on the head node")


def _join(loaded, planned, plan: dict, stopper: Stopper) -> tuple[bool, str]:
    """Another machine owns the step: run this node's torchrun agent into the same rendezvous."""
    upstream = {d: StepResult.read(plan[d].output_dir) for d in planned.deps}
    request = StepRequest(spec_path=str(loaded.path), overrides=list(loaded.overrides), name=planned.name,
                          kind=planned.kind, fingerprint=planned.fingerprint, output_dir=str(planned.output_dir),
                          workdir=str(loaded.workdir), resources=planned.resources,
                          tracking_uri=tracking.tracking_uri(loaded),
                          upstream={n: {**r.to_json(), "dir": str(r.dir)} for n, r in upstream.items()},
                          log_file=f"node-{socket.gethostname()}-{os.getpid()}.log")
    print(f"joining step '{planned.name}' as a further node (rendezvous {planned.resources['launcher']['rdzv_endpoint']})")
    outcome = launch.run_local(request, print, stopper)
    return outcome.ok, (f"step '{planned.name}': this node's part ended {outcome.status}" +
                        (f": {outcome.message}" if outcome.message else ""))
