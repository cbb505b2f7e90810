"""The step entry point: one step of a pipeline, in a process of its own.

The engine (flows/launch.py) forks it from a server that has torch, transformers and Lightning imported
already, or starts it on every rank under torchrun when the step trains on several devices or nodes
(`python -m flows.step REQUEST.json`). Global rank 0 writes the output folder (a temporary folder renamed
into place, result.json last) and logs to the step's MLflow run; the other ranks train and exit. A failure
leaves `error.json` in the step's run folder (flows.plan.run_dir) for the launcher to report; SIGTERM stops the step the
way Ctrl-C stops Lightning (the checkpoint stays, so the next run resumes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

EXIT_INTERRUPTED = 130


@dataclass
class StepRequest:
    """Everything a step process needs, as JSON (the spec itself is re-read: it may hold secrets)."""

    spec_path: str
    overrides: list[str]
    name: str
    kind: str
    fingerprint: str
    output_dir: str
    workdir: str
    resources: dict
    tracking_uri: str  # "" when the spec's URI holds a secret: the step resolves it from the spec
    run_id: str | None = None
    upstream: dict[str, dict] = field(default_factory=dict)  # name -> StepResult.to_json() with "dir"
    cuda_devices: str | None = None  # CUDA_VISIBLE_DEVICES of this step's device claim
    cpu_threads: int | None = None  # torch threads when the step shares the CPU with others
    log_file: str = "step.log"  # in the step's run folder; each further node of a multi-node step has its own
    launched_at: float | None = None  # time.time() when the engine began the step: the ledger's start-up includes it
    sets: dict = field(default_factory=dict)  # an Optuna trial's settings (dotted path -> value): flows/sweeps.py
    trial: dict | None = None  # where a trial reports its pruning metric (components/lib/trials.py)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "StepRequest":
        return cls(**data)

    @property
    def run_dir(self) -> Path:
        from flows.plan import run_dir

        return run_dir(Path(self.workdir), self.name, self.fingerprint)

    @property
    def error_path(self) -> Path:
        return self.run_dir / "error.json"

    @property
    def log_path(self) -> Path:
        """The step's stdout and stderr (rank 0's prints, every rank's errors)."""
        return self.run_dir / self.log_file

    @property
    def ckpt_dir(self) -> Path:
        from flows.plan import checkpoint_dir

        return checkpoint_dir(Path(self.workdir), self.name, self.fingerprint)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT reached the step: stop like Ctrl-C (Lightning saves and tears down)."""


def _stop(signum, frame) -> None:
    raise Stopped(f"signal {signum}")


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def execute(request: StepRequest, own_process: bool = True) -> int:
    """Run the step's component; rank 0 writes the output and result.json. Returns the exit status.

    `own_process=False` runs it inside the caller (`llmcycle run --in-process`): the caller's signal handlers
    and output stay as they are.
    """
    rank = global_rank()
    if own_process:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        if request.cpu_threads:
            import torch

            torch.set_num_threads(request.cpu_threads)
    if rank != 0:  # one rank speaks for the step; the others' errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    # the engine's lock, MLflow run and the process start, up to here (another machine's clock may differ: >= 0)
    launch = max(0.0, time.time() - request.launched_at) if request.launched_at else 0.0
    tmp = _work_dir(request, rank)
    started = time.perf_counter()
    from components.lib import phases

    phases.reset()  # the step's wall time split into start-up, data, compute, logging (flows/ledger.py)
    try:
        with phases.charge("startup"):
            from components.lib import meter

            meter.reset()  # a step in this process before (--in-process) or the fork server's state
            ctx, step_spec = _context(request, tmp, rank)
        with phases.charge("data"):
            from schemas.rows import check_data

            check_data(step_spec, ctx.resolve_path)  # every row of every data file, before a model is built
        with phases.charge("startup"):
            import importlib

            component = importlib.import_module(f"components.{request.kind}")
        output = component.run(step_spec, ctx)
        if rank == 0:
            check_outputs(request, step_spec, output, ctx.out_dir)
        _barrier()  # no rank still uses the checkpoint folder that rank 0 is about to remove
        if rank == 0:
            _finalize(request, ctx, output, started, launch)
        _barrier()
        return 0
    except (Stopped, KeyboardInterrupt) as err:
        _report(request, rank, f"stopped ({err})", interrupted=True)
        return EXIT_INTERRUPTED
    except SystemExit as err:  # Lightning exits with 1 after handling a KeyboardInterrupt
        _report(request, rank, "stopped", interrupted=True)
        return EXIT_INTERRUPTED if err.code == 1 else int(err.code or 0)
    except BaseException as err:  # noqa: BLE001 - every failure is reported in one paragraph
        if os.environ.get("LLMCYCLE_DEBUG"):  # else the traceback goes to the step's MLflow run only
            traceback.print_exc()
        _report(request, rank, _cause(err), trace=traceback.format_exc())
        return 1
    finally:  # after success rank 0's folder has become the output; anything left is scratch
        shutil.rmtree(tmp, ignore_errors=True)


def _work_dir(request: StepRequest, rank: int) -> Path:
    """Rank 0 writes into a temporary folder beside the output; other ranks into a private scratch folder."""
    if rank != 0:
        return Path(tempfile.mkdtemp(prefix=f"llmcycle-{request.name}-rank{rank}-"))
    tmp = Path(request.output_dir).parent / f".tmp-{request.fingerprint[:12]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    request.error_path.unlink(missing_ok=True)
    return tmp


def _context(request: StepRequest, tmp: Path, rank: int):
    import schemas
    from components.lib.context import StepContext, StepResult
    from flows.tracking import tracking_uri
    from schemas.resources import TrainerSpec

    loaded = schemas.load(request.spec_path, request.overrides)
    if request.name not in loaded.spec.steps or loaded.spec.steps[request.name].kind != request.kind:
        raise RuntimeError(f"{request.spec_path} no longer has a {request.kind} step '{request.name}'; the spec "
                           "changed while the pipeline ran: run it again")
    upstream = {n: StepResult(dir=Path(r["dir"]), name=r["name"], kind=r["kind"], fingerprint=r["fingerprint"],
                              outputs=r["outputs"], metrics=r["metrics"], info=r.get("info", {}))
                for n, r in request.upstream.items()}
    _trust_code(loaded)
    run_id = _run_id(request) if rank == 0 else None
    ctx = StepContext(name=request.name, kind=request.kind, fingerprint=request.fingerprint, out_dir=tmp,
                      ckpt_dir=request.ckpt_dir, base_dir=loaded.base_dir, workdir=Path(request.workdir),
                      seed=loaded.spec.seed, trainer=TrainerSpec.model_validate(request.resources),
                      upstream=upstream, pipeline_name=loaded.spec.name, run_id=run_id,
                      tracking_uri=request.tracking_uri or tracking_uri(loaded), trial=request.trial)
    if rank == 0:
        ctx.set_tags({"llmcycle.pid": os.getpid(), "llmcycle.host": socket.gethostname(),
                      "llmcycle.world_size": os.environ.get("WORLD_SIZE", "1")})
    step = loaded.spec.steps[request.name]
    if request.sets:
        from schemas.variants import with_sets

        step = with_sets(step, request.sets)
    return ctx, step


def _trust_code(loaded) -> None:
    """Tell the model loaders which sources the spec lets run their own code (components/lib/models.py)."""
    from components.lib.models import TRUSTED_ENV

    sources = [ref[3:] if ref.startswith("hf:") else str(loaded.base_dir / ref) if not ref.startswith("/") else ref
               for ref in loaded.spec.trust_remote_code]
    os.environ[TRUSTED_ENV] = json.dumps(sources)


def _run_id(request: StepRequest) -> str | None:
    """The step's MLflow run: given by the engine, or left in the launch record for the other nodes."""
    if request.run_id:
        return request.run_id
    record = request.run_dir / "launch.json"
    return json.loads(record.read_text()).get("run_id") if record.is_file() else None


def check_outputs(request: StepRequest, step_spec, output, folder: Path) -> None:
    """The step returned exactly the outputs its spec declares with these settings, and each exists."""
    declared, returned = set(step_spec.outputs()), set(output.outputs)
    outside = [k for k, rel in output.outputs.items() if not (folder / rel).resolve().is_relative_to(folder.resolve())]
    if outside:
        raise RuntimeError(f"components/{request.kind} returned outputs {outside} outside its output folder "
                           "(a bug in llmcycle: please report it)")
    missing = [k for k in sorted(returned) if not (folder / output.outputs[k]).exists()]
    if declared != returned or missing:
        raise RuntimeError(
            f"components/{request.kind} broke its contract: it returned outputs {sorted(returned)} where its spec "
            f"declares {sorted(declared)} with these settings" + (f", and {missing} do not exist" if missing else "")
            + " (a bug in llmcycle: please report it)")


def _finalize(request: StepRequest, ctx, output, started: float, launch: float = 0.0) -> None:
    """result.json last inside the temporary folder, then one rename puts the output in place."""
    from components.lib import meter, phases
    from components.lib.context import StepResult, finite_metrics
    from components.lib.io import write_json_atomic
    from flows import integrity
    from flows.plan import RESULT_FILE

    metrics = finite_metrics(output.metrics)
    metrics.setdefault("time/seconds", round(time.perf_counter() - started, 3))
    info = {**output.info, "effort": {**output.info.get("effort", {}), "models": meter.measured()},  # flows/ledger.py
            "phases": phases.spent(metrics["time/seconds"], launch)}
    final = Path(request.output_dir)
    result = StepResult(name=request.name, kind=request.kind, fingerprint=request.fingerprint, dir=final,
                        outputs=output.outputs, metrics=metrics, info=info)
    write_json_atomic(ctx.out_dir / RESULT_FILE, integrity.seal(result.to_json(), ctx.out_dir))
    if final.exists():  # a forced re-run replaces the previous output
        old = final.with_name(final.name + f".old-{os.getpid()}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(ctx.out_dir, final)
    shutil.rmtree(request.ckpt_dir, ignore_errors=True)


def _barrier() -> None:
    """Every rank leaves only once rank 0 has written the output (the launchers read it next)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _report(request: StepRequest, rank: int, message: str, interrupted: bool = False, trace: str = "") -> None:
    """Leave why the step ended for the launcher: the first real failure of any rank (the root cause; the
    others usually fail because of it), else rank 0's note that it was stopped."""
    if interrupted and rank != 0:
        return
    tmp = request.error_path.with_name(f".error-{os.getpid()}.json")
    try:
        tmp.write_text(json.dumps({"message": message, "interrupted": interrupted, "rank": rank, "traceback": trace}))
    except OSError:  # a full disk: the launcher reports the exit status and the disk's state instead
        tmp.unlink(missing_ok=True)
        return
    try:
        os.link(tmp, request.error_path)  # atomic and exclusive: the first report wins...
    except FileExistsError:
        if not interrupted and json.loads(request.error_path.read_text()).get("interrupted"):
            os.replace(tmp, request.error_path)  # ...except a real failure beats a note that a rank was stopped
    finally:
        tmp.unlink(missing_ok=True)


def _cause(err: BaseException) -> str:
    from schemas.rows import DataProblems

    if isinstance(err, DataProblems):
        return str(err)  # one problem per line
    text = str(err).strip().replace("\n", " ") or type(err).__name__
    return text if isinstance(err, (ValueError, FileNotFoundError, KeyError, RuntimeError)) \
        else f"{type(err).__name__}: {text}"


def forked_main(request_json: dict, environ: dict[str, str], cwd: str) -> None:
    """The body of a step forked by the engine's fork server: the launcher's environment and folder (not the
    server's, which are those of when it started), its own session, output to the step's log."""
    request = StepRequest.from_json(request_json)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.setsid()  # its own process group, so stopping the step also stops what it started
    _die_with_parent()
    fd = os.open(request.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    if request.cuda_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = request.cuda_devices
    sys.exit(execute(request))


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the parent (the fork server, or torchrun's agent) dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the launcher still stops the step itself


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.step REQUEST.json`: one rank of a step under torchrun.

    `python -m flows.step --torchrun ARGS...` is torchrun itself, told to stop when its launcher dies.
    """
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--torchrun":
        import runpy

        _die_with_parent()
        sys.argv = ["torchrun", *args[1:]]
        runpy.run_module("torch.distributed.run", run_name="__main__")
        return 0
    request = StepRequest.from_json(json.loads(Path(args[0]).read_text()))
    _die_with_parent()
    return execute(request)


if __name__ == "__main__":
    sys.exit(main())
