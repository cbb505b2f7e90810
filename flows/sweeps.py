"""Sweeps at run time (schemas/sweep.py makes the variants): their place in the plan, Optuna's ask and tell around
each trial, and the swept step itself, which picks the chosen variant and writes the comparison.

- A variant is a step like any other: its own fingerprint, folder (`<workdir>/base@lr=0.1/<fingerprint>`) and
  nested MLflow run, tagged `llmcycle.sweep=<base>` and `llmcycle.variant=<label>`, whose params are its
  settings. So the engine caches, schedules and places it as it does every step: variants run side by side
  within `max_parallel` and the device claims, and on a work pool when the step has `run_on`.
- A search's trial k has a fingerprint of the step, the study's settings (but not `n_trials`: raising it keeps
  the trials run so far) and trial k-1's fingerprint. The study lives in the step's folder
  (`<workdir>/<base>/optuna-<key>.db`, sqlite). When the trial starts, the engine asks the study for its
  settings (or takes those the study already holds for it), records them in the trial's run folder
  (trial.json), hands them to its process (StepRequest.sets) and, when it ends, tells the study its metric.
  A failed trial stays RUNNING in the study and runs again with the same settings; with `pruning`, the trial
  reports its metric after each validation round and stops early when the median pruner says so
  (components/lib/trials.py), which leaves a complete, shorter run marked PRUNED.
- The swept step runs in the flow's process (it only reads results): it writes `sweep_<base>.json` and
  `sweep_<base>.md` (every variant's settings and metrics, and the chosen one) and a result.json whose outputs
  lead to the chosen variant's files and whose metrics are its metrics, so every reader of the step's name
  (a model reference, a `register` gate on `base.METRIC`) gets the chosen variant. Its MLflow run logs both
  files, tags `llmcycle.sweep.chosen`, and becomes the parent of this pipeline run's variant runs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

from schemas.sweep import variant_name
from schemas.variants import leaf_types, numeric_kind, set_path, short_names, values_label

TRIAL_FILE = "trial.json"  # in a trial's run folder: its number, settings and state in the study
PREFERRED = ("val/loss", "val/perplexity", "val/accuracy", "train/loss")  # shown beside the select metric


# -- the plan -----------------------------------------------------------------------------------------------


def payload(spec, name: str, payload: dict) -> dict:
    """The fingerprint payload of step `name`: a swept step's covers its variants and how it chooses; a trial's
    also the study (without n_trials) and its number."""
    if spec.swept(name):
        pick = spec.steps[name].sweep.chooser()
        return {"code": payload["code"], "kind": "sweep", "select": pick.model_dump() if pick else None,
                "upstream": payload["upstream"]}
    variant = spec.variant(name)
    if variant is None or variant.trial is None:
        return payload
    search = spec.steps[variant.base].sweep.search.model_dump(mode="json")
    search["optuna"].pop("n_trials")
    return {**payload, "trial": variant.trial, "search": search}


def planned(loaded, planned, prints: dict[str, str]):
    """The planned step with what the engine needs to know of its sweep (and a line for `llmcycle plan`)."""
    spec, name = loaded.spec, planned.name
    if spec.swept(name):
        sweep = spec.steps[name].sweep
        pick = sweep.chooser()
        planned.sweep = {"variants": spec.swept(name), "select": pick.model_dump() if pick else None}
        planned.run_on = None  # it reads its variants' results, in the flow's process
        damaged = {k: v for k, v in planned.extra.items() if k == "damaged"}
        planned.extra = {"sweep": sweep.describe(), **damaged}  # its own settings are the variants' business
        return planned
    variant = spec.variant(name)
    if variant is None:
        return planned
    planned.variant = {"of": variant.base, "label": variant.label, "sets": dict(variant.sets)}
    if variant.trial is None:
        planned.extra["sweep"] = f"variant of {variant.base}: " + ", ".join(f"{p} = {json.dumps(v)}"
                                                                            for p, v in variant.sets.items())
        return planned
    search = spec.steps[variant.base].sweep.search
    first = prints.get(variant_name(variant.base, "trial=0"), planned.fingerprint)
    planned.variant.update(trial=variant.trial, study=_study_settings(loaded, variant.base, search, first))
    recorded = _recorded(loaded.workdir, name, planned.fingerprint)
    planned.variant["sets"] = recorded.get("params", {})
    o = search.optuna
    shown = ", ".join(f"{p} = {json.dumps(v)}" for p, v in planned.variant["sets"].items())
    planned.extra["sweep"] = (f"trial {variant.trial} of {o.n_trials} ({o.sampler}, {o.direction} {o.metric}): "
                              + (f"{shown} ({recorded.get('state', 'running')})" if shown else
                                 "its settings are asked of the study when it starts"))
    return planned


def _study_settings(loaded, base: str, search, first: str) -> dict:
    from flows.plan import folder

    cls = type(loaded.spec.steps[base])
    space = {path: {**s.model_dump(mode="json"), "type": "choices" if s.choices is not None else
                    numeric_kind(leaf_types(cls, path))} for path, s in search.space.items()}
    db = loaded.workdir / folder(base) / f"optuna-{first[:12]}.db"
    o = search.optuna
    return {"storage": f"sqlite:///{db}", "name": base, "sampler": o.sampler, "direction": o.direction,
            "metric": o.metric, "seed": loaded.spec.seed, "space": space,
            "pruning": o.pruning.model_dump(mode="json") if o.pruning else None}


def _trial_file(workdir: Path, name: str, fingerprint: str) -> Path:
    from flows.plan import run_dir

    return run_dir(workdir, name, fingerprint) / TRIAL_FILE


def _recorded(workdir: Path, name: str, fingerprint: str) -> dict:
    path = _trial_file(workdir, name, fingerprint)
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def is_trial(planned) -> bool:
    variant = getattr(planned, "variant", None)
    return bool(variant) and variant.get("trial") is not None


def request_fields(planned) -> dict:
    """What a trial's process needs besides its step: its settings, and where to report for pruning."""
    if not is_trial(planned):
        return {}
    v, study = planned.variant, planned.variant["study"]
    pruning = study["pruning"]
    trial = None if pruning is None else {"storage": study["storage"], "study": study["name"], "number": v["trial"],
                                          **pruning}
    return {"sets": dict(v["sets"]), "trial": trial}


def run_name(planned) -> str:
    """The MLflow run name: the step's, with a trial's settings once it has them."""
    if is_trial(planned) and planned.variant["sets"]:
        return variant_name(planned.variant["of"], f"{planned.variant['label']},{values_label(planned.variant['sets'])}")
    return planned.name


def applied(step: dict, sets: dict) -> dict:
    """A dumped step with a trial's settings in place (for its MLflow params)."""
    out = copy.deepcopy(step)
    for path, value in sets.items():
        set_path(out, path, value)
    return out


# -- Optuna -------------------------------------------------------------------------------------------------


def _study(settings: dict, number: int):
    """The study, created on first use. Its sampler is seeded per trial (seed + number), so what trial k samples
    depends on the trials before it and not on which process asks."""
    import optuna

    from components.lib.study import pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = settings["seed"] + number
    sampler = (optuna.samplers.TPESampler(seed=seed) if settings["sampler"] == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    Path(settings["storage"].removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(storage=settings["storage"], study_name=settings["name"], sampler=sampler,
                               pruner=pruner(settings["pruning"]), direction=settings["direction"], load_if_exists=True)


def _distributions(space: dict) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for path, s in space.items():
        if s["type"] == "choices":
            out[path] = CategoricalDistribution([_primitive(c) for c in s["choices"]])
        elif s["type"] == "int":
            out[path] = IntDistribution(int(s["low"]), int(s["high"]), log=s["log"], step=int(s["step"] or 1))
        else:
            out[path] = FloatDistribution(s["low"], s["high"], log=s["log"], step=s["step"])
    return out


def _primitive(choice):
    """Optuna's choices are None, bool, int, float or str; a list or a mapping goes as its JSON text."""
    return choice if choice is None or isinstance(choice, (bool, int, float, str)) else json.dumps(choice, sort_keys=True)


def _settings_of(params: dict, space: dict) -> dict:
    out = {}
    for path, s in space.items():
        value = params[path]
        if s["type"] == "choices":
            value = next(c for c in s["choices"] if _primitive(c) == value)
        out[path] = value
    return out


def ask(loaded, planned, reuse: bool) -> None:
    """Give a trial its settings: those the study holds for its number (a resumed run, a retry after a failure),
    else new ones from the sampler; recorded in its run folder. A reused trial keeps those it recorded."""
    from components.lib.io import write_json_atomic
    from flows.runner import StepFailed

    v = planned.variant
    if reuse and v["sets"]:
        return
    settings, number = v["study"], v["trial"]
    study = _study(settings, number)
    held = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number in held:
        params = held[number].params
    elif len(held) == number:
        params = study.ask(_distributions(settings["space"])).params
    else:
        raise StepFailed(f"step '{planned.name}': the Optuna study {settings['storage'].removeprefix('sqlite:///')} "
                         f"holds {len(held)} trials, and trial {number} needs the {number} before it; the file was "
                         "replaced or trials were deleted: delete it and the trials' folders to start the search again")
    v["sets"] = _settings_of(params, settings["space"])
    write_json_atomic(_trial_file(loaded.workdir, planned.name, planned.fingerprint),
                      {"number": number, "params": v["sets"], "state": "running"})


def tell(loaded, planned, result, on_line) -> None:
    """Tell the study how the trial ended (once): its metric, or PRUNED when it stopped early on the pruner's word."""
    import optuna
    from components.lib.io import write_json_atomic

    v = planned.variant
    settings, number = v["study"], v["trial"]
    study = _study(settings, number)
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    path = _trial_file(loaded.workdir, planned.name, planned.fingerprint)
    if trial is None or trial.state.is_finished():
        state = trial.state.name.lower() if trial is not None else "unknown"
    else:
        value = result.metrics.get(settings["metric"])
        if trial.user_attrs.get("pruned_at") is not None:
            study.tell(number, state=optuna.trial.TrialState.PRUNED)
            state = "pruned"
        elif value is None or not math.isfinite(value):
            study.tell(number, state=optuna.trial.TrialState.FAIL)
            on_line(f"{planned.name}: reported no finite {settings['metric']}; the study counts the trial as failed")
            state = "fail"
        else:
            study.tell(number, value)
            state = "complete"
    write_json_atomic(path, {"number": number, "params": v["sets"], "state": state})


# -- the swept step -----------------------------------------------------------------------------------------


def select(planned, loaded, upstream: dict, client, parent_run_id: str, on_line):
    """The swept step: pick the chosen variant (or none, without select), write the comparison, log it; return the
    result a reference to the step reads."""
    from components.lib.context import StepResult
    from flows import tracking

    base, pick = planned.name, planned.sweep["select"]
    rows = [_row(loaded, name, upstream[name]) for name in planned.sweep["variants"]]
    chosen = _choose(rows, pick, base) if pick else None
    for r in rows:
        r["chosen"] = r["variant"] == chosen
    from flows.plan import run_dir
    from flows.runner import step_lock

    folder = run_dir(loaded.workdir, base, planned.fingerprint)
    folder.mkdir(parents=True, exist_ok=True)
    with step_lock(folder):  # two runs of the spec at once write it once
        reuse = not planned.forced and _same(planned.output_dir, chosen, upstream)
        if not reuse:
            _write(planned, rows, chosen, upstream)
    result = StepResult.read(planned.output_dir)
    result.reused = reuse
    run_id = tracking.start_step_run(loaded, client, parent_run_id, planned, cached=reuse)
    client.set_tag(run_id, "llmcycle.sweep.chosen", chosen or "")
    for suffix in ("json", "md"):
        client.log_artifact(run_id, str(planned.output_dir / f"sweep_{base}.{suffix}"))
    _adopt(client, parent_run_id, run_id, base)
    tracking.finish_step_run(client, run_id, "ok", result.metrics)
    if chosen:
        value = next(r for r in rows if r["chosen"])["metrics"][pick["metric"]]
        on_line(f"{base}: {chosen} has the {'lowest' if pick['mode'] == 'min' else 'highest'} {pick['metric']} "
                f"({value:.4g}) of {len(rows)} variants")
    else:
        on_line(f"{base}: compared {len(rows)} variants (no select)")
    return result


def _same(final: Path, chosen: str | None, upstream: dict) -> bool:
    """Whether the swept step's complete output already names this choice with these metrics (a variant run again
    with --force keeps its fingerprint, not necessarily its last digits)."""
    from components.lib.context import StepResult
    from flows import integrity
    from flows.plan import RESULT_FILE

    if not (final / RESULT_FILE).is_file() or integrity.damage(final):
        return False
    held = StepResult.read(final)
    return held.info.get("sweep", {}).get("chosen", "") == chosen and (chosen is None or held.metrics == upstream[chosen].metrics)


def _row(loaded, name: str, result) -> dict:
    variant = loaded.spec.variant(name)
    recorded = _recorded(loaded.workdir, name, result.fingerprint) if variant.trial is not None else {}
    return {"variant": name, "label": variant.label, "params": recorded.get("params", variant.sets),
            "state": recorded.get("state", "complete"), "metrics": result.metrics, "dir": str(result.dir)}


def _choose(rows: list[dict], pick: dict, base: str) -> str:
    """The variant with the best value of the select metric (ties: the first); pruned trials only if all were."""
    from flows.runner import StepFailed

    metric = pick["metric"]
    scored = [r for r in rows if isinstance(r["metrics"].get(metric), (int, float)) and math.isfinite(r["metrics"][metric])]
    live = [r for r in scored if r["state"] != "pruned"] or scored
    if not live:
        reported = sorted({k for r in rows for k in r["metrics"]})
        raise StepFailed(f"step '{base}': no variant reported {metric} (sweep.select.metric), so none can be chosen; "
                         f"they report: {', '.join(reported) or 'nothing'}")
    best = (min if pick["mode"] == "min" else max)(live, key=lambda r: r["metrics"][metric])
    return best["variant"]


def _write(planned, rows: list[dict], chosen: str | None, upstream: dict) -> None:
    """The swept step's folder, written beside and renamed into place: the comparison, and a result.json that leads
    to the chosen variant's outputs."""
    from components.lib.context import StepResult
    from components.lib.io import write_json_atomic, write_text_atomic
    from flows import integrity
    from flows.plan import RESULT_FILE

    base, final, pick = planned.name, planned.output_dir, planned.sweep["select"]
    tmp = final.parent / f".tmp-{planned.fingerprint[:12]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    table = {"step": base, "select": pick, "chosen": chosen, "variants": rows}
    write_json_atomic(tmp / f"sweep_{base}.json", table)
    write_text_atomic(tmp / f"sweep_{base}.md", markdown(table))
    outputs, metrics, info = {}, {}, {"sweep": {"variants": len(rows), "chosen": chosen, "select": pick}}
    if chosen is not None:
        winner = upstream[chosen]
        outputs = {k: os.path.relpath(winner.dir / rel, final) for k, rel in winner.outputs.items()}
        metrics = dict(winner.metrics)
        info = {**{k: v for k, v in winner.info.items() if k not in ("effort", "phases")}, **info}
    result = StepResult(name=base, kind=planned.kind, fingerprint=planned.fingerprint, dir=final, outputs=outputs,
                        metrics=metrics, info=info)
    write_json_atomic(tmp / RESULT_FILE, integrity.seal(result.to_json(), tmp))
    if final.exists():  # --force: the new selection replaces the old
        old = final.with_name(final.name + f".old-{os.getpid()}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


def markdown(table: dict) -> str:
    """The comparison as a Markdown table: a row per variant, its swept settings and metrics, the chosen in bold."""
    rows, pick = table["variants"], table["select"]
    paths = list(dict.fromkeys(p for r in rows for p in r["params"]))
    names = short_names(paths)
    shown = [pick["metric"]] if pick else []
    shown += [m for m in PREFERRED if m not in shown and any(m in r["metrics"] for r in rows)][:4 - len(shown)]
    head = ["variant", *(names[p] for p in paths), *shown, "state"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = f"**{r['variant']}** (chosen)" if r["chosen"] else r["variant"]
        cells = [name, *(_cell(r["params"].get(p)) for p in paths),
                 *(f"{r['metrics'][m]:.4g}" if m in r["metrics"] else "-" for m in shown), r["state"]]
        lines.append("| " + " | ".join(cells) + " |")
    how = (f"chosen: {table['chosen']} ({pick['mode']} {pick['metric']})" if pick else
           "no select: every variant is read by name")
    return f"# sweep {table['step']}\n\n" + "\n".join(lines) + f"\n\n{how}\n"


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def _adopt(client, parent_run_id: str, run_id: str, base: str) -> None:
    """Make the swept step's run the parent of this pipeline run's variant runs (MLflow's nested runs)."""
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_runs([experiment], f"tags.`llmcycle.sweep` = '{base}' and "
                               f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=5000)
    for run in found:
        client.set_tag(run.info.run_id, "mlflow.parentRunId", run_id)
