"""Fingerprints and output folders: which steps are complete and which must run.

A step's fingerprint hashes its resolved settings, the pipeline-wide settings that change its result
(seed, trainer), its upstream fingerprints and the contents of its input files. Its output folder is
`<workdir>/<step>/<fingerprint[:12]>`; `result.json`, written last, marks it complete.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from schemas import LoadedSpec, dependencies, step_order
from schemas.base import StepSpec

# Bump when a change to the code must invalidate every cached output.
CODE_VERSION = "1"
RESULT_FILE = "result.json"


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

    @property
    def will_run(self) -> bool:
        return self.selected and (self.forced or not self.cached)

    def to_json(self) -> dict:
        out = asdict(self)
        out["output_dir"] = str(self.output_dir)
        out["action"] = "skip" if not self.selected else ("run" if self.will_run else "cached")
        return out


def step_dir(workdir: Path, name: str, fingerprint: str) -> Path:
    return workdir / name / fingerprint[:12]


def checkpoint_dir(workdir: Path, name: str, fingerprint: str) -> Path:
    """Checkpoints live beside the output, keyed by the same fingerprint, so a resume never crosses configs."""
    return workdir / name / f".ckpt-{fingerprint[:12]}"


def make_plan(loaded: LoadedSpec, force: list[str] | None = None, only: list[str] | None = None) -> list[PlannedStep]:
    """Compute every step's fingerprint and status, in dependency order."""
    spec, prints, plan = loaded.spec, {}, []
    unknown = [n for n in list(force or []) + list(only or []) if n not in spec.steps]
    if unknown:
        raise KeyError(f"no step named {', '.join(map(repr, unknown))}; steps: {', '.join(spec.steps)}")
    wanted = _with_ancestors(loaded, only) if only else set(spec.steps)
    redacted = loaded.redacted()
    for name in step_order(spec):
        step = spec.steps[name]
        deps = dependencies(spec, name)
        payload = {
            "code": CODE_VERSION,
            "kind": step.kind,
            "spec": redacted["steps"][name],
            "seed": spec.seed,
            "trainer": redacted["trainer"],
            "upstream": {d: prints[d] for d in deps},
            "inputs": input_identity(step, loaded.base_dir),
        }
        fp = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        prints[name] = fp
        out = step_dir(loaded.workdir, name, fp)
        plan.append(PlannedStep(name=name, kind=step.kind, deps=deps, fingerprint=fp, output_dir=out,
                                cached=(out / RESULT_FILE).is_file(), selected=name in wanted,
                                forced=name in (force or []), extra=_plan_extra(step)))
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
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
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
