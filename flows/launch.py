"""Run one step's process(es) and wait for them: forked from the fork server, under torchrun, or on a work pool.

A step with one process is forked from a server that preloads the heavy libraries (flows/preload.py), so
isolation costs milliseconds, not the seconds of a fresh interpreter. A step that trains on several devices
or nodes runs under torchrun (standalone on one node; c10d rendezvous across nodes). A step with `run_on`
becomes a flow run of the `llmcycle-step/<pool>` deployment, whose worker launches it the same way. The
launcher streams the step's log, stops it on request (SIGTERM to its process group, SIGKILL after a
grace period) and turns the way it ended into an Outcome.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flows.step import EXIT_INTERRUPTED, StepRequest

STOP_GRACE_S = 60  # time a stopped step gets to write its checkpoint before SIGKILL
POLL_S = 0.2
STEP_DEPLOYMENT = "llmcycle-step"
SIGNAL_HINTS = {signal.SIGKILL: " (out of memory?)", signal.SIGSEGV: " (a crash in native code)"}


@dataclass
class Outcome:
    """How a step's process ended: `ok`, `failed`, `killed` (by a signal nobody here sent) or `stopped`."""

    status: str
    message: str = ""
    trace: str = ""  # the failing rank's traceback (for the step's MLflow run and --debug, not the terminal)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


FULL_DISK_BYTES = 1 << 20  # less free than this, and a step that failed without a word likely hit a full disk
ShouldStop = Callable[[], "str | None"]  # returns why to stop, or None to go on


# -- the fork server -------------------------------------------------------------------------------


def _forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["flows.preload"])
    return context


def start_forkserver() -> None:
    """Start the fork server now, so that its preloading overlaps whatever the caller does next."""
    from multiprocessing import forkserver

    _forkserver()
    forkserver.ensure_running()


class _Forked:
    def __init__(self, request: StepRequest):
        from flows.step import forked_main

        self.process = _forkserver().Process(target=forked_main, args=(request.to_json(), dict(os.environ), os.getcwd()),
                                             name=f"llmcycle-step-{request.name}")
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def signal(self, sig: int) -> None:
        _signal_group(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode


class _Torchrun:
    def __init__(self, request: StepRequest, command: list[str], log: Path):
        env = dict(os.environ)
        if request.cuda_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = request.cuda_devices
        with open(log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def signal(self, sig: int) -> None:
        _signal_group(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:  # not yet its own group leader
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def torchrun_command(request: StepRequest, request_file: Path) -> list[str]:
    """torchrun for this step: standalone on one node, a c10d rendezvous across several."""
    from schemas.resources import TrainerSpec

    resources = TrainerSpec.model_validate(request.resources)
    per_node = resources.device_count() or max(1, len(visible_gpus()))
    command = [sys.executable, "-m", "flows.step", "--torchrun", "--nproc-per-node", str(per_node),
               "--max-restarts", "0"]
    if resources.num_nodes == 1:
        command += ["--standalone", "--nnodes", "1"]
    else:
        launcher = resources.launcher
        command += ["--nnodes", str(resources.num_nodes), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", launcher.rdzv_endpoint, "--rdzv-id", f"llmcycle-{request.fingerprint[:12]}",
                    "--rdzv-conf", f"join_timeout={launcher.join_timeout}"]
    return command + ["-m", "flows.step", str(request_file)]


def world_size(request: StepRequest) -> int:
    from schemas.resources import TrainerSpec

    return TrainerSpec.model_validate(request.resources).world_size(len(visible_gpus()))


def visible_gpus() -> list[str]:
    """The GPUs this process may use, found without importing torch (CUDA_VISIBLE_DEVICES, else the driver)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    driver = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(driver.iterdir())))] if driver.is_dir() else []


# -- running and watching ---------------------------------------------------------------------------


def run_local(request: StepRequest, on_line: Callable[[str], None], should_stop: ShouldStop) -> Outcome:
    """Start the step's process(es) here, stream the log to `on_line`, and wait for the end."""
    log = request.log_path
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    if world_size(request) > 1:
        request_file = request.log_path.with_suffix(".request.json")  # one per node: the run folder may be shared
        request_file.write_text(json.dumps(request.to_json(), indent=2))
        child = _Torchrun(request, torchrun_command(request, request_file), log)
    else:
        child = _Forked(request)
    follow, stop_reason = LogFollower(log, on_line), None
    try:
        while (code := child.poll()) is None:
            follow()
            if stop_reason is None and (stop_reason := should_stop()):
                on_line(f"stopping step '{request.name}': {stop_reason}")
                _stop(child)
            time.sleep(POLL_S)
        follow(final=True)
    finally:
        if child.poll() is None:  # the launcher itself is going away (e.g. the worker was cancelled)
            _stop(child)
    return _outcome(request, code, stop_reason, log)


class LogFollower:
    """Forward the complete new lines of a log file that another process (or machine) is writing."""

    def __init__(self, path: Path, on_line: Callable[[str], None]):
        self.path, self.on_line, self.offset = path, on_line, 0

    def __call__(self, final: bool = False) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as reader:
            reader.seek(self.offset)
            for line in reader:
                if not line.endswith(b"\n") and not final:  # still being written
                    break
                self.offset += len(line)
                self.on_line(line.decode(errors="replace").rstrip("\n"))


def _stop(child) -> None:
    child.signal(signal.SIGTERM)
    if child.wait(STOP_GRACE_S) is None:
        child.signal(signal.SIGKILL)
        child.wait(10)


def _outcome(request: StepRequest, code: int, stop_reason: str | None, log: Path) -> Outcome:
    error = json.loads(request.error_path.read_text()) if request.error_path.is_file() else None
    done = (Path(request.output_dir) / "result.json").is_file()
    if code == 0 and done and stop_reason is None:
        return Outcome("ok")
    if error and not error.get("interrupted") and stop_reason is None:
        return Outcome("failed", error["message"] + (f" (rank {error['rank']})" if error.get("rank") else ""),
                       error.get("traceback", ""))
    if stop_reason is not None or code == EXIT_INTERRUPTED or (error or {}).get("interrupted"):
        return Outcome("stopped", f"stopped ({stop_reason or 'interrupted'}); its checkpoint is kept, so the next "
                                  "run resumes it")
    if code is not None and code < 0:
        sig = signal.Signals(-code)
        return Outcome("killed", f"killed by signal {-code} ({sig.name}){SIGNAL_HINTS.get(sig, '')}; its "
                                 "checkpoint is kept, so the next run resumes it")
    if error:
        return Outcome("failed", error["message"], error.get("traceback", ""))
    died = re.findall(r"exitcode\s*:\s*(-\d+)", log.read_text(errors="replace")[-20000:])
    if died:  # torchrun's summary of a worker that a signal ended
        sig = signal.Signals(-int(died[0]))
        return Outcome("killed", f"a worker was killed by signal {sig.value} ({sig.name}){SIGNAL_HINTS.get(sig, '')}")
    if hint := disk_hint(request.output_dir):
        return Outcome("failed", f"the step's process exited with status {code}{hint}")
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    return Outcome("failed", f"the step's process exited with status {code} without a report: {tail}")


def disk_hint(folder: str | Path) -> str:
    """A note when the disk holding `folder` is (nearly) full: the likely cause of a step that died mute."""
    import shutil

    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    if free >= FULL_DISK_BYTES:
        return ""
    return (f"; the disk holding {folder} is full ({free:,} bytes free: No space left on device). Free some space "
            "and run again: the step resumes from its last checkpoint")


def run_inline(request: StepRequest, on_line: Callable[[str], None], should_stop: ShouldStop) -> Outcome:
    """Run the step in this process and thread (for debuggers, and to measure what isolation costs)."""
    from flows.step import execute

    request.log_path.parent.mkdir(parents=True, exist_ok=True)
    code = execute(request, own_process=False)
    return _outcome(request, code, None, request.log_path)


# -- work pools -----------------------------------------------------------------------------------


def run_on_pool(request: StepRequest, run_on: dict, on_line: Callable[[str], None], should_stop: ShouldStop,
                poll_s: float = 2.0) -> Outcome:
    """Submit the step as a flow run of `llmcycle-step/<pool>` and wait; its output lands in the shared workdir."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelling

    name = f"{STEP_DEPLOYMENT}/{run_on['work_pool']}"
    try:
        flow_run = run_deployment(name, parameters={"request": request.to_json()}, timeout=0,
                                  job_variables=run_on.get("job_variables") or None,
                                  flow_run_name=f"{request.kind}:{request.name}")
    except ObjectNotFound:
        return Outcome("failed", f"run_on: no deployment '{name}' on the Prefect server; declare it in prefect.yaml "
                                 f"(a {STEP_DEPLOYMENT} deployment on work pool '{run_on['work_pool']}') and run "
                                 "`prefect deploy --all`")
    on_line(f"submitted as flow run {flow_run.id} of {name}")
    follow, stop_reason = LogFollower(request.log_path, on_line), None
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run.id).state
            follow()
            if state is not None and state.is_final():
                break
            if stop_reason is None and (stop_reason := should_stop()):
                client.set_flow_run_state(flow_run.id, Cancelling(message=stop_reason), force=True)
            time.sleep(poll_s)
    follow(final=True)
    if state.is_completed():
        return Outcome("ok")
    if stop_reason or state.is_cancelled():
        return Outcome("stopped", f"stopped ({stop_reason or 'flow run cancelled'}); its checkpoint is kept")
    error = json.loads(request.error_path.read_text()) if request.error_path.is_file() else None
    return Outcome("failed", error["message"] if error else f"flow run {flow_run.id} ended {state.type.value}: "
                                                           f"{state.message or 'see the worker log'}")
