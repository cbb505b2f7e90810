"""Expansion of sweeps (schemas/sweep.py): each variant checked against its step's schema and made a step of its own.

Paths are checked against the step's Pydantic model (a bad part is an error with "did you mean"), each variant
is validated as the step it becomes (an error goes to the sweep entry that set the field), the variants join
`spec.steps` just before their step, and `all_variants` references get the variant names in place of its name.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import Problem, did_you_mean
from .sweep import UNSWEPT, Variant, variant_name


# -- applying a variant's settings ------------------------------------------------------------------------


def set_path(data: dict, path: str, value: Any) -> None:
    """Set a dotted path in plain (dumped) data, making the sections it passes through."""
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    if isinstance(node, list):
        node[int(parts[-1])] = copy.deepcopy(value)
    else:
        node[parts[-1]] = copy.deepcopy(value)


def get_path(model: Any, path: str) -> Any:
    """The value at a dotted path of a validated model."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, (list, tuple)) else getattr(node, part)
    return node


def written(step: BaseModel) -> dict:
    """The step as its file wrote it (fields set, not defaults), without its sweep: what a variant changes."""
    return step.model_dump(mode="json", exclude_unset=True, exclude={"sweep"})


def with_sets(step: BaseModel, sets: dict[str, Any]) -> BaseModel:
    """The step with `sets` (dotted path -> value) applied, validated again."""
    data = written(step)
    for path, value in sets.items():
        set_path(data, path, value)
    return type(step).model_validate(data)


# -- checking paths against a step's schema --------------------------------------------------------------


def _unwrap(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return [u for a in typing.get_args(tp) for u in _unwrap(a)]
    return [tp]


def leaf_types(cls: type[BaseModel], path: str) -> list[Any]:
    """The types a dotted path into a step's schema may hold; ValueError naming the first part that is not a field."""
    types: list[Any] = [cls]
    parts = path.split(".")
    for i, part in enumerate(parts):
        options = [t for tp in types for t in _unwrap(tp)]
        models = [t for t in options if isinstance(t, type) and issubclass(t, BaseModel)]
        lists = [typing.get_args(t)[0] for t in options if typing.get_origin(t) in (list, tuple) and typing.get_args(t)]
        where = "the step" if i == 0 else f"'{'.'.join(parts[:i])}'"
        if part.isdigit() and lists:
            types = lists
            continue
        found = [m.model_fields[part].annotation for m in models if part in m.model_fields]
        if i == 0 and part in UNSWEPT:
            raise ValueError(f"'{part}' cannot be swept: a variant is the same kind of step, and one variant")
        if not found:
            names = sorted({n for m in models for n in m.model_fields if i or n not in UNSWEPT})
            if not names:
                raise ValueError(f"{where} is a value, not a section: '{path}' goes past it")
            raise ValueError(f"{where} has no field '{part}'{did_you_mean(part, names)}; it has: {', '.join(names)}")
        types = found
    return types


def numeric_kind(types: list[Any]) -> str | None:
    """`int` or `float` for a field a range may search (None: neither)."""
    kinds = {t for tp in types for t in _unwrap(tp)}
    if float in kinds:
        return "float"
    if int in kinds and bool not in kinds:
        return "int"
    return None


def _shown(value: Any) -> str:
    """A value as it appears in a variant's name: short, and safe in a folder name."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_shown(v) for v in value) or "none"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_unset=True)
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(text))[:40]


def short_names(paths: list[str]) -> dict[str, str]:
    """Each path's shortest tail of parts that no other path ends with: `optimizer.lr` -> `lr`."""
    out = {}
    for path in paths:
        parts = path.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if n == len(parts) or not any(o != path and (o == tail or o.endswith("." + tail)) for o in paths):
                out[path] = tail
                break
    return out


def values_label(sets: dict[str, Any]) -> str:
    """`lr=0.003,layers=4` for a variant's settings."""
    names = short_names(list(sets))
    return ",".join(f"{names[p]}={_shown(v)}" for p, v in sets.items())


# -- expansion -----------------------------------------------------------------------------------------------


class _Where:
    """Where the file writes each path of a sweep section: the dotted key itself, or the nested form --set makes."""

    def __init__(self, doc, root: tuple):
        self.doc, self.root = doc, root

    def key(self, key: str) -> tuple:
        here = self.root + (key,)
        return here if here in self.doc.values or here in self.doc.keys else self.root + tuple(key.split("."))


def _errors(err: ValidationError) -> list[tuple[tuple, str]]:
    """(location, message) of each error, the value included where it helps."""
    out = []
    for e in err.errors():
        message = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        if isinstance(value, (str, int, float, bool)) and e["type"] not in ("value_error", "assertion_error"):
            message += f", got {json.dumps(value)}"
        out.append((tuple(str(p) for p in e["loc"]), message))
    return out


def _validated(cls, data: dict, places: dict[str, tuple], fallback: tuple, doc, what: str) -> tuple[Any, list]:
    """(the variant, []) or (None, its problems): each error goes to the sweep entry that set the field it is
    about, else to `fallback`, saying which variant (`what`) it is."""
    try:
        return cls.model_validate(data), []
    except ValidationError as err:
        problems = []
        for loc, message in _errors(err):
            hit = next(((path, where) for path, where in places.items()
                        if loc[:len(path.split("."))] == tuple(path.split("."))), None)
            if hit is None:
                problems.append(doc.problem(fallback, f"{what}: {'.'.join(loc) + ': ' if loc else ''}{message}"))
            else:  # the problem's path names the field; a part below it is named in the message
                below = loc[len(hit[0].split(".")):]
                problems.append(doc.problem(hit[1], f"{'.'.join(below)}: {message}" if below else message))
        return None, problems


Made = list[tuple[Variant, Any]]  # each variant and its validated step


def _grid(name: str, step, doc) -> tuple[Made, list[Problem]]:
    cls, grid, at = type(step), step.sweep.grid, _Where(doc, ("steps", name, "sweep", "grid"))
    problems = _path_problems(cls, list(grid), at, doc)
    if problems:
        return [], problems
    base, made, paths = written(step), [], list(grid)
    for combo in itertools.product(*(range(len(grid[p])) for p in paths)):
        sets = {path: grid[path][i] for path, i in zip(paths, combo)}
        places = {path: at.key(path) + (i,) for path, i in zip(paths, combo)}
        variant, found = _validated(cls, _applied(base, sets), places, at.root, doc, f"the variant {values_label(sets)}")
        problems += found
        if variant is not None:
            checked = {p: get_path(variant, p) for p in paths}  # as validated: 1e-3 written as text is 0.001
            made.append((Variant(name, values_label(checked), {p: _json(v) for p, v in checked.items()}), variant))
    return made, problems


def _listed(name: str, step, doc) -> tuple[Made, list[Problem]]:
    cls, base, made, problems = type(step), written(step), [], []
    for i, v in enumerate(step.sweep.variants):
        at = _Where(doc, ("steps", name, "sweep", "variants", i, "set"))
        found = _path_problems(cls, list(v.set), at, doc)
        if not found:
            variant, found = _validated(cls, _applied(base, v.set), {p: at.key(p) for p in v.set}, at.root[:-1], doc,
                                        f"the variant {v.name}")
            if variant is not None:
                made.append((Variant(name, v.name, {p: _json(get_path(variant, p)) for p in v.set}), variant))
        problems += found
    return made, problems


def _searched(name: str, step, doc) -> tuple[Made, list[Problem]]:
    cls, search = type(step), step.sweep.search
    at = _Where(doc, ("steps", name, "sweep", "search", "space"))
    problems = _path_problems(cls, list(search.space), at, doc)
    if problems:
        return [], problems
    base = written(step)
    for path, space in search.space.items():
        numeric = numeric_kind(leaf_types(cls, path))
        if space.choices is None and numeric is None:
            problems.append(doc.problem(at.key(path), f"'{path}' is not a number; search it with choices"))
            continue
        if numeric == "int" and space.choices is None and not all(float(x).is_integer() for x in (space.low, space.high)):
            problems.append(doc.problem(at.key(path), f"'{path}' is a whole number; give low and high as integers"))
            continue
        tried = ([(("choices", i), c) for i, c in enumerate(space.choices)] if space.choices is not None else
                 [((k,), int(x) if numeric == "int" else x) for k, x in (("low", space.low), ("high", space.high))])
        for key, value in tried:
            where = at.key(path) + key
            problems += _validated(cls, _applied(base, {path: value}), {path: where}, where, doc, path)[1]
    if problems:
        return [], problems
    return [(Variant(name, f"trial={k}", {}, k), cls.model_validate(base)) for k in range(search.optuna.n_trials)], []


def _applied(base: dict, sets: dict[str, Any]) -> dict:
    data = copy.deepcopy(base)
    for path, value in sets.items():
        set_path(data, path, value)
    return data


def _path_problems(cls, paths: list[str], at: _Where, doc) -> list[Problem]:
    problems = []
    for path in paths:
        try:
            leaf_types(cls, path)
        except ValueError as err:
            problems.append(doc.problem(at.key(path), str(err), key=True))
    return problems


def _json(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    return json.loads(json.dumps(value, default=str))


def _metric_problems(name: str, step, spec, doc) -> list[Problem]:
    """`select`, a search's objective and its pruning metric name metrics the step's kind reports."""
    from .metrics import emits, emitted

    sweep, names = step.sweep, emits(step, spec.steps.get)
    named = [(("select", "metric"), sweep.select.metric if sweep.select else None)]
    if sweep.search is not None:
        o = sweep.search.optuna
        named += [(("search", "optuna", "metric"), o.metric),
                  (("search", "optuna", "pruning", "metric"), o.pruning.metric if o.pruning else None)]
    problems = [doc.problem(("steps", name, "sweep") + where, f"step '{name}' ({step.kind}) does not emit "
                            f"'{metric}' with its settings{did_you_mean(metric, names)}; it emits: {', '.join(names)}")
                for where, metric in named if metric is not None and not emitted(metric, names)]
    return problems


def expand(spec, doc) -> list[Problem]:
    """Check every sweep against its step's schema and metrics and put its variants into `spec.steps`, each just
    before its step (the `all_variants` lists got their names from `splice`, before validation). A sweep with a
    problem adds no variants. Returns the problems."""
    problems: list[Problem] = []
    steps: dict = {}
    for name, step in spec.steps.items():
        if step.sweep is not None:
            make = _grid if step.sweep.grid is not None else _listed if step.sweep.variants is not None else _searched
            made, found = make(name, step, doc)
            found += _metric_problems(name, step, spec, doc)
            labels = [v.label for v, _ in made]
            twice = sorted({v for v in labels if labels.count(v) > 1})
            if twice and not found:
                found.append(doc.problem(("steps", name, "sweep"), f"several variants get the name "
                                         f"{variant_name(name, twice[0])}; name them with variants: instead"))
            problems += found
            for variant, variant_step in made if not found else []:
                steps[variant.name] = variant_step
                spec.register_variant(variant)
                doc.variants[variant.name] = (name, _places(name, step, variant, doc))
        steps[name] = step
    spec.steps.clear()
    spec.steps.update(steps)
    return problems


def _places(name: str, step, variant: Variant, doc) -> dict[tuple, tuple]:
    """{field path in the variant: where the file sets it} for its swept fields."""
    sweep = step.sweep
    if sweep.grid is not None:
        at = _Where(doc, ("steps", name, "sweep", "grid"))
        return {tuple(p.split(".")): at.key(p) for p in variant.sets}
    if sweep.variants is not None:
        i = next(i for i, v in enumerate(sweep.variants) if v.name == variant.label)
        return {tuple(p.split(".")): ("steps", name, "sweep", "variants", i, "set", p) for p in variant.sets}
    return {tuple(p.split(".")): ("steps", name, "sweep", "search", "space", p) for p in sweep.search.space}


def splice(doc, adapter, classes: dict[str, type]) -> None:
    """Before the spec is validated: put a swept step's variant names in place of its name in every list marked
    `Ref(..., all_variants=True)` (each new item keeps the written name's line), so that the reading step's own
    validators (a least number of runs, no name twice) see the runs it will read. `adapter` validates one step,
    `classes` maps each kind to its schema."""
    raw = doc.data.get("steps") if isinstance(doc.data, dict) else None
    if not isinstance(raw, dict):
        return
    swept = {}
    for name, body in raw.items():
        if isinstance(body, dict) and isinstance(body.get("sweep"), dict):
            try:
                step = adapter.validate_python(body)
            except ValidationError:
                continue  # reported when the spec is validated
            if step.sweep is not None:
                make = _grid if step.sweep.grid is not None else _listed if step.sweep.variants is not None else _searched
                made, found = make(name, step, doc)
                if not found:
                    swept[name] = [v.name for v, _ in made]
    for name, body in raw.items() if swept else ():
        cls = classes.get(body.get("kind")) if isinstance(body, dict) else None
        if cls is not None:
            _splice_into(cls, body, ("steps", name), swept, doc)


def _splice_into(cls, data: dict, path: tuple, swept: dict[str, list[str]], doc) -> None:
    from .base import Ref, _find_ref

    for name, info in cls.model_fields.items():
        value = data.get(name)
        ref = next((m for m in info.metadata if isinstance(m, Ref)), None) or _find_ref(info.annotation)
        if ref is not None and ref.all_variants and isinstance(value, list):
            items = [(v, i) for i, item in enumerate(value)
                     for v in (swept.get(item, [item]) if isinstance(item, str) else [item])]
            marks = [doc.values.get(path + (name, i)) for _, i in items]
            data[name] = [v for v, _ in items]
            for k, mark in enumerate(marks):
                if mark is not None:
                    doc.values[path + (name, k)] = mark
        elif isinstance(value, dict):
            for sub in _unwrap(info.annotation):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    _splice_into(sub, value, path + (name,), swept, doc)
