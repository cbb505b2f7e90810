"""Fingerprints and output folders: which steps are complete and which must run.

A step's fingerprint hashes its resolved settings, the settings that change its result (the seed, the
trainer it runs with, but not where it runs), its upstream fingerprints and the contents of its input
files. Its output folder is `<workdir>/<step>/<fingerprint[:12]>`; `result.json`, written last, marks it
complete. Beside it, keyed by the same fingerprint: `.ckpt-*` (resumable checkpoints) and `.run-*` (the
engine's lock, log and reports for the step, see `run_dir`).
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flows import sweeps
from flows.integrity import RESULT_FILE, damage, sha256
from schemas import LoadedSpec, dependencies, step_order
from schemas.base import StepSpec
from schemas.resources import PLACEMENT_FIELDS, TrainerSpec

# Bump when a change to the code must invalidate every cached output.
CODE_VERSION = "2"


class UsageError(Exception):
    """A command-line mistake (an unknown step name, a command run the wrong way): exit status 2."""


@dataclass
class PlannedStep:
    """One step as the engine will treat it."""

    name: str
    kind: str
    deps: list[str]
    fingerprint: str
    output_dir: Path
    cached: bool
    selected: bool = True
    forced: bool = False
    extra: dict = field(default_factory=dict)  # kind-specific planning facts (e.g. compute-optimal sizing)
    resources: dict = field(default_factory=dict)  # the merged trainer settings (schemas.resources.TrainerSpec)
    run_on: dict | None = None  # a Prefect work pool to run on, or None for beside the flow
    variant: dict | None = None  # a sweep's variant: its step, label, settings, trial (flows/sweeps.py)
    sweep: dict | None = None  # a swept step: its variants and how one is chosen (flows/sweeps.py)

    @property
    def will_run(self) -> bool:
        return self.selected and (self.forced or not self.cached)

    def describe_resources(self) -> str:
        """What the step runs on, in a few words: `cpu x1`, `gpu x8 fsdp bf16-mixed, 2 nodes (torchrun)`."""
        if self.run_on:
            return f"work pool {self.run_on['work_pool']}"
        from flows.launch import visible_gpus

        r = TrainerSpec.model_validate(self.resources)
        text = f"{r.accelerator} x{r.devices}" + "".join(f" {v}" for v in (r.strategy, r.precision) if v != "auto")
        if r.num_nodes > 1:
            return text + f", {r.num_nodes} nodes (torchrun, c10d at {r.launcher.rdzv_endpoint})"
        return text + (" (torchrun)" if r.world_size(len(visible_gpus())) > 1 else "")

    def to_json(self) -> dict:
        out = asdict(self)
        out["output_dir"] = str(self.output_dir)
        out["action"] = "skip" if not self.selected else ("run" if self.will_run else "cached")
        return out


def folder(name: str) -> str:
    """A step's folder under the workdir: its name, a sweep variant's `base[lr=0.1]` as `base@lr=0.1` (brackets
    in a path are patterns to glob)."""
    return name.replace("[", "@").replace("]", "")


def step_dir(workdir: Path, name: str, fingerprint: str) -> Path:
    return workdir / folder(name) / fingerprint[:12]


def checkpoint_dir(workdir: Path, name: str, fingerprint: str) -> Path:
    """Checkpoints live beside the output, keyed by the same fingerprint, so a resume never crosses configs."""
    return workdir / folder(name) / f".ckpt-{fingerprint[:12]}"


def run_dir(workdir: Path, name: str, fingerprint: str) -> Path:
    """The engine's own files for this fingerprint: `lock` (held while a run works on the step), `step.log`,
    `step.request.json`, `error.json` (why the last attempt failed) and `launch.json` (how the nodes of a
    multi-node step find its MLflow run)."""
    return workdir / folder(name) / f".run-{fingerprint[:12]}"


def make_plan(loaded: LoadedSpec, force: list[str] | None = None, only: list[str] | None = None) -> list[PlannedStep]:
    """Compute every step's fingerprint and status, in dependency order."""
    spec, prints, plan = loaded.spec, {}, []
    unknown = [n for n in list(force or []) + list(only or []) if n not in spec.steps]
    if unknown:
        raise UsageError(f"no step named {', '.join(map(repr, unknown))}; steps: {', '.join(spec.steps)}")
    wanted = _with_ancestors(loaded, only) if only else set(spec.steps)
    redacted = loaded.redacted()
    for name in step_order(spec):
        step = spec.steps[name]
        deps = dependencies(spec, name)
        resources = loaded.resources(name).model_dump(mode="json")
        payload = {
            "code": CODE_VERSION,
            "kind": step.kind,
            "spec": {k: v for k, v in redacted["steps"][name].items() if k not in ("trainer", "run_on", "sweep")},
            "seed": spec.seed,
            "trainer": {k: v for k, v in resources.items() if k not in PLACEMENT_FIELDS},
            "upstream": {d: prints[d] for d in deps},
            "inputs": input_identity(step, loaded.base_dir),
        }
        payload = sweeps.payload(spec, name, payload)
        fp = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        prints[name] = fp
        out = step_dir(loaded.workdir, name, fp)
        damaged = damage(out) if (out / RESULT_FILE).is_file() else ""
        extra = {**_plan_extra(step), **({"damaged": f"{damaged}; it runs again"} if damaged else {})}
        planned = PlannedStep(name=name, kind=step.kind, deps=deps, fingerprint=fp, output_dir=out,
                              cached=(out / RESULT_FILE).is_file() and not damaged, selected=name in wanted,
                              forced=name in (force or []), extra=extra, resources=resources,
                              run_on=step.run_on.model_dump(mode="json") if step.run_on else None)
        plan.append(sweeps.planned(loaded, planned, prints))
    return plan


def _with_ancestors(loaded: LoadedSpec, names: list[str]) -> set[str]:
    keep: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo += dependencies(loaded.spec, name)
    return keep


def _plan_extra(step: StepSpec) -> dict:
    describe = getattr(step, "plan_details", None)
    return describe() if callable(describe) else {}


_HASHES: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256(path)
    return _HASHES[key]


def input_identity(step: StepSpec, base_dir: Path) -> dict[str, str]:
    """Map each input file a step reads (relative to the spec) to its content hash."""
    out = {}
    for pattern in step.input_globs():
        full = pattern if Path(pattern).is_absolute() else str(base_dir / pattern)
        matches = sorted(glob.glob(full, recursive=True))
        for match in matches:
            p = Path(match)
            if p.is_file():
                out[str(p.relative_to(base_dir)) if p.is_relative_to(base_dir) else str(p)] = file_digest(p)
            elif p.is_dir():
                for f in sorted(x for x in p.rglob("*") if x.is_file()):
                    out[str(f)] = file_digest(f)
        if not matches:
            out[pattern] = "missing"
    return out
