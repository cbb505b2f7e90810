"""Sweeps: a step run as many variants (grid, list, Optuna search), each cached and tracked on its own, one chosen.

The runs use `feedforward` steps on 200 points (a second or two each) and one tiny pretrain; the spec errors and
the plan need no run at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import pytest
from mlflow.tracking import MlflowClient
from pydantic import Field, TypeAdapter, field_validator

import schemas
from flows.plan import make_plan
from schemas import SpecError

REPO = Path(__file__).resolve().parents[2]
FF = """\
    kind: feedforward
    data: {builtin: gauss, noise: 0.5, n: 200}
    network: {layers: []}
    epochs: 5
    frames: 0
"""
GRID = f"""\
name: grid
workdir: work
max_parallel: 4
trainer: {{share_devices: true}}   # tiny networks: the variants run side by side, one thread each
steps:
  ff:
{FF}    optimizer: {{name: sgd}}
    sweep:
      grid:
        optimizer.lr: [1.0e-4, 0.3]
        batch_size: [10, 25]
      select: {{metric: val/loss, mode: min}}
"""


def run(spec: Path, overrides: list[str] | None = None) -> dict[str, dict]:
    from flows.pipeline import run_pipeline

    return run_pipeline(str(spec), overrides=overrides)


def statuses(results: dict[str, dict]) -> dict[str, str]:
    return {n: r["status"] for n, r in results.items()}


def store(spec: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{spec.parent / 'work' / 'mlflow.db'}")


def runs(spec: Path, experiment: str, where: str) -> list:
    client = store(spec)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], where,
                              order_by=["attributes.start_time ASC"])


@pytest.mark.usefixtures("prefect_harness")
def test_grid_runs_each_variant_once_reuses_them_and_runs_only_new_values(write_spec, tmp_path):
    spec = write_spec(GRID)
    names = ["ff[lr=0.0001,batch_size=10]", "ff[lr=0.0001,batch_size=25]", "ff[lr=0.3,batch_size=10]",
             "ff[lr=0.3,batch_size=25]"]
    first = run(spec)
    assert statuses(first) == {**dict.fromkeys(names, "ran"), "ff": "ran"}
    losses = {n: first[n]["metrics"]["val/loss"] for n in names}
    best = min(losses, key=losses.get)
    # plain SGD at lr 1e-4 barely moves in 5 epochs; 0.3 fits the blobs: the documented winner is a 0.3 variant
    assert best.startswith("ff[lr=0.3,") and max(losses[n] for n in names[:2]) > min(losses[n] for n in names[2:])
    chosen = first["ff"]
    assert chosen["metrics"] == first[best]["metrics"] and chosen["info"]["sweep"]["chosen"] == best
    assert Path(chosen["dir"], chosen["outputs"]["network"]).resolve() == Path(first[best]["dir"], "network").resolve()
    table = json.loads(Path(chosen["dir"], "sweep_ff.json").read_text())
    assert [(r["variant"], r["params"], r["chosen"]) for r in table["variants"]] == [
        (n, {"optimizer.lr": lr, "batch_size": b}, n == best)
        for n, (lr, b) in zip(names, [(1e-4, 10), (1e-4, 25), (0.3, 10), (0.3, 25)])]
    assert f"**{best}** (chosen)" in Path(chosen["dir"], "sweep_ff.md").read_text()

    # MLflow: each variant a run with its swept params and metrics, grouped under the sweep's run
    [sweep_run] = runs(spec, "grid", "tags.`llmcycle.step` = 'ff'")
    assert sweep_run.data.tags["llmcycle.sweep.chosen"] == best
    assert sweep_run.data.metrics["val/loss"] == losses[best]
    assert sorted(a.path for a in store(spec).list_artifacts(sweep_run.info.run_id)) == ["sweep_ff.json", "sweep_ff.md"]
    variants = {r.data.tags["llmcycle.step"]: r for r in runs(spec, "grid", "tags.`llmcycle.sweep` = 'ff'")}
    assert sorted(variants) == sorted(names)
    for name, r in variants.items():
        assert r.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id and r.info.status == "FINISHED"
        params = table["variants"][names.index(name)]["params"]
        assert float(r.data.params["optimizer.lr"]) == params["optimizer.lr"]
        assert int(r.data.params["batch_size"]) == params["batch_size"]
        assert r.data.metrics["val/loss"] == pytest.approx(losses[name], rel=1e-6)  # Lightning logged it in float32
        assert "val/accuracy" in r.data.metrics
    spans = [(r.info.start_time, r.info.end_time) for r in variants.values()]
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans for b in spans if a != b), "no two variants overlapped"

    again = run(spec)
    assert set(statuses(again).values()) == {"cached"}
    assert {n: r["dir"] for n, r in again.items()} == {n: r["dir"] for n, r in first.items()}

    more = run(spec, ["steps.ff.sweep.grid.optimizer.lr=[1.0e-4, 0.3, 0.03]"])
    new = {"ff[lr=0.03,batch_size=10]", "ff[lr=0.03,batch_size=25]"}
    assert statuses(more) == {**dict.fromkeys(names, "cached"), **dict.fromkeys(new, "ran"), "ff": "ran"}


SEARCH = f"""\
name: search
workdir: work
seed: 3
steps:
  ff:
{FF}    optimizer: {{name: sgd}}
    sweep:
      search:
        optuna:
          n_trials: 3
          sampler: random
          metric: val/loss
          pruning: {{metric: val/loss, n_startup_trials: 1}}
        space:
          optimizer.lr: {{choices: [0.3, 1.0e-4]}}
          optimizer.weight_decay: {{low: 0.0, high: 0.001}}
"""


@pytest.mark.usefixtures("prefect_harness")
def test_an_optuna_search_runs_trials_in_turn_prunes_the_bad_and_resumes(write_spec):
    import optuna

    spec = write_spec(SEARCH)
    trials = [f"ff[trial={k}]" for k in range(3)]
    first = run(spec)
    assert statuses(first) == {**dict.fromkeys(trials, "ran"), "ff": "ran"}
    [db] = (spec.parent / "work" / "ff").glob("optuna-*.db")  # the study, in the step's folder
    study = optuna.load_study(study_name="ff", storage=f"sqlite:///{db}")
    held = study.get_trials()
    assert [t.number for t in held] == [0, 1, 2]
    tracked = {r.data.tags["llmcycle.step"]: r for r in runs(spec, "search", "tags.`llmcycle.sweep` = 'ff'")}
    for k, (name, t) in enumerate(zip(trials, held)):
        r = tracked[name]  # the trial's run: named with its settings, which its params show
        assert r.info.run_name == f"ff[trial={k},lr={t.params['optimizer.lr']:g},weight_decay={t.params['optimizer.weight_decay']:g}]"
        assert float(r.data.params["optimizer.lr"]) == t.params["optimizer.lr"]
        assert float(r.data.params["optimizer.weight_decay"]) == pytest.approx(t.params["optimizer.weight_decay"])
        assert t.intermediate_values, "the trial reported val/loss at its validation rounds"
        steps = first[name]["metrics"]["train/steps"]
        if t.state == optuna.trial.TrialState.PRUNED:  # stopped at a validation round, a complete shorter run
            assert t.params["optimizer.lr"] == 1e-4 and steps < 50
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE and steps == 50
            assert t.value == first[name]["metrics"]["val/loss"]
    good = [t.number for t in held if t.params["optimizer.lr"] == 0.3]
    bad_after_good = [t for t in held if t.params["optimizer.lr"] == 1e-4 and good and t.number > good[0]]
    assert bad_after_good and all(t.state == optuna.trial.TrialState.PRUNED for t in bad_after_good), \
        "seed 3 samples a good trial, then a bad one, which the median pruner stops"
    ends = [(tracked[n].info.start_time, tracked[n].info.end_time) for n in trials]
    assert all(ends[k][1] <= ends[k + 1][0] for k in range(2)), "trials run one after another"
    assert first["ff"]["info"]["sweep"]["chosen"] == f"ff[trial={study.best_trial.number}]"

    more = run(spec, ["steps.ff.sweep.search.optuna.n_trials=4"])  # resumes the study: one new trial
    assert statuses(more) == {**dict.fromkeys(trials, "cached"), "ff[trial=3]": "ran", "ff": "ran"}
    assert [t.number for t in optuna.load_study(study_name="ff", storage=f"sqlite:///{db}").get_trials()] == [0, 1, 2, 3]


PRETRAIN = """\
name: chosen
workdir: work
trainer: {accelerator: cpu, precision: 32-true}
steps:
  tok: {kind: tokenize, corpus: {builtin: pydoc}, vocab_size: 400}
  lm:
    kind: pretrain
    tokenizer: tok
    model: {family: llama, layers: 1, hidden: 32, heads: 2, context: 64}
    max_steps: 20
    batch_size: 8
    val_every: 20
    log_model: false
    sweep:
      grid: {optimizer.lr: [1.0e-5, 3.0e-3]}
      select: {metric: val/perplexity, mode: min}
  ev: {kind: evaluate, model: lm, tokens: tok, max_batches: 4}
  release:
    kind: register
    model: lm
    name: chosen-lm
    gate: ["lm.val/perplexity < 1.0e6"]
"""


@pytest.mark.usefixtures("prefect_harness")
def test_a_reference_to_a_swept_step_reads_the_chosen_variant_and_the_gate_its_metrics(write_spec):
    spec = write_spec(PRETRAIN)
    done = run(spec)
    slow, fast = done["lm[lr=1e-05]"]["metrics"], done["lm[lr=0.003]"]["metrics"]
    # 20 steps at lr 1e-5 leave the model near its random start; at 3e-3 it learns: the documented winner
    assert fast["val/perplexity"] < slow["val/perplexity"] and done["lm"]["info"]["sweep"]["chosen"] == "lm[lr=0.003]"
    assert done["lm"]["metrics"] == fast
    assert done["tok"]["status"] == "ran" and len(runs(spec, "chosen", "tags.`llmcycle.step` = 'tok'")) == 1  # once
    measured = done["ev"]["metrics"]["val/perplexity"]  # evaluate loaded the chosen variant's model
    assert abs(measured - fast["val/perplexity"]) < abs(measured - slow["val/perplexity"])
    version = store(spec).get_model_version("chosen-lm", "1")
    assert version.tags["metric.lm.val/perplexity"] == f"{fast['val/perplexity']:.6g}"  # the gate read the chosen


def problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(SpecError) as err:
        schemas.load(path, overrides)
    return [str(p) for p in err.value.problems]


BAD = f"""\
name: bad
steps:
  ff:
{FF}    sweep:
      grid:
        optimizer.lrr: [0.1, 0.2]
        optimizer.momentum: [0.5, 1.5]
      select: {{metric: val/los, mode: min}}
  big:
{FF}    sweep:
      grid: {{optimizer.lr: [1, 2, 3, 4, 5, 6, 7, 8, 9], batch_size: [1, 2, 3, 4, 5, 6, 7, 8]}}
  tok: {{kind: tokenize, corpus: {{builtin: pydoc}}}}
  lm:
    kind: pretrain
    tokenizer: tok
    model: {{layers: 2, hidden: 64, heads: 4}}
    sweep:
      variants: [{{name: small, set: {{model.hidden: 32}}}}, {{name: odd, set: {{model.heads: 5}}}}]
  ev: {{kind: evaluate, model: lm}}
"""


def test_sweep_mistakes_are_spec_errors_with_their_lines(write_spec):
    path = write_spec(BAD)
    assert problems(path) == [f"{path}:21:7: steps.big.sweep: this sweep makes 9 x 8 = 72 variants, more than "
                              "max_variants (64); shrink it, or raise max_variants if you mean it"]
    bad = BAD.replace("      grid: {optimizer.lr", "      max_variants: 72\n      grid: {optimizer.lr")
    path = write_spec(bad)
    found = problems(path)
    assert found[0] == (f"{path}:11:9: steps.ff.sweep.grid.optimizer.lrr: 'optimizer' has no field 'lrr' (did you "
                        "mean 'lr'?); it has: lr, momentum, name, weight_decay")
    assert found[1].startswith(f"{path}:13:24: steps.ff.sweep.select.metric: step 'ff' (feedforward) does not emit "
                               "'val/los' with its settings (did you mean 'val/loss'?); it emits: val/loss, ")
    assert found[2] == (f"{path}:29:58: steps.lm.sweep.variants[1]: the variant odd: model: heads (5) must divide "
                        "hidden (64)")
    assert len(found) == 3
    path = write_spec(bad.replace("lrr", "lr").replace("val/los,", "val/loss,").replace("heads: 5", "heads: 8"))
    assert problems(path) == [  # a value out of its field's range, at the value; a reference that needs a select
        f"{path}:12:35: steps.ff.sweep.grid.optimizer.momentum[1]: Input should be less than 1, got 1.5",
        f"{path}:30:31: steps.ev.model: step 'lm' is swept into 2 variants (lm[small], lm[odd]); add sweep.select to "
        "pick one by a metric, or reference one variant by name"]
    loaded = schemas.load(path, ["steps.ff.sweep.grid.optimizer.momentum=[0.5, 0.9]",  # --set an axis
                                 "steps.ev.model=lm[small]"])  # name one variant
    assert schemas.dependencies(loaded.spec, "ev") == ["lm[small]", "tok"]
    assert len(loaded.spec.swept("big")) == 72 and loaded.spec.steps["lm[odd]"].model.heads == 8
    assert loaded.spec.steps["ev"].tokens == "tok"  # evaluate's default tokens, through the variant


def test_plan_lists_every_variant_and_set_changes_an_axis(write_spec, capsys):
    from flows.cli import main

    spec = write_spec(GRID)
    assert main(["plan", str(spec), "--set", "steps.ff.sweep.grid.optimizer.lr=[0.1, 0.01, 1.0e-3]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert rows == [f"ff[lr={lr},batch_size={b}]" for lr in ("0.1", "0.01", "0.001") for b in (10, 25)] + ["ff"]
    details = [line.strip() for line in lines if line.startswith(" ")]
    assert details[-1] == "sweep: 6 variants (grid optimizer.lr (3) x batch_size (2)); select val/loss (min)"
    assert "sweep: variant of ff: optimizer.lr = 0.01, batch_size = 25" in details
    pooled = make_plan(schemas.load(spec, ["steps.ff.run_on.work_pool=gpu-pool"]))  # the step's placement...
    assert [p.run_on["work_pool"] for p in pooled[:-1]] == ["gpu-pool"] * 4  # ...is every variant's
    assert pooled[-1].run_on is None  # the swept step only reads their results, in the flow
    plan = {p.name: p for p in make_plan(schemas.load(write_spec(SEARCH)))}
    assert list(plan) == ["ff[trial=0]", "ff[trial=1]", "ff[trial=2]", "ff"]
    assert plan["ff[trial=2]"].deps == ["ff[trial=1]"] and plan["ff"].deps == ["ff[trial=0]", "ff[trial=1]", "ff[trial=2]"]
    assert plan["ff[trial=1]"].output_dir.parent.name == "ff@trial=1"
    assert plan["ff[trial=0]"].extra["sweep"] == ("trial 0 of 3 (random, minimize val/loss): its settings are asked "
                                                  "of the study when it starts")


def test_a_reference_marked_all_variants_reads_every_variant(write_spec):
    """The hook for steps that read many runs (scaling's `runs`): the variant names take the swept step's place."""
    from schemas.base import Ref, StepSpec
    from schemas.loader import parse_file
    from schemas.pipeline import PipelineSpec
    from schemas.steps.feedforward import FeedforwardSpec
    from schemas.variants import expand, splice

    class ReadAllSpec(StepSpec):
        produces: ClassVar[frozenset[str]] = frozenset({"report"})
        kind: Literal["read_all"]
        runs: list[Annotated[str, Ref("network", all_variants=True)]]

    class ReadAtLeastFive(ReadAllSpec):
        @field_validator("runs")
        @classmethod
        def _five(cls, runs: list[str]) -> list[str]:  # a rule on the runs sees every variant
            assert len(runs) >= 5, f"needs five runs, got {len(runs)}"
            return runs

    Kinds = Annotated[Union[FeedforwardSpec, ReadAtLeastFive], Field(discriminator="kind")]

    class Pipeline(PipelineSpec):
        steps: dict[str, Kinds]  # type: ignore[valid-type]

    path = write_spec(GRID + "  other:\n" + FF + "  fit: {kind: read_all, runs: [other, ff]}\n")
    doc = parse_file(path)  # what schemas.load does, with this file's kinds:
    splice(doc, TypeAdapter(Kinds), {"feedforward": FeedforwardSpec, "read_all": ReadAtLeastFive})
    spec = Pipeline.model_validate(doc.data)
    assert expand(spec, doc) == []
    assert spec.steps["fit"].runs == ["other", *spec.swept("ff")] and len(spec.swept("ff")) == 4
    assert schemas.dependencies(spec, "fit") == ["other", *spec.swept("ff")]
    assert doc.mark(("steps", "fit", "runs", 4)).line == doc.mark(("steps", "fit", "runs", 1)).line == 24  # `ff`


def test_the_shipped_sweep_spec_plans_its_variants():
    loaded = schemas.load(REPO / "specs" / "course" / "lr-sweep.yaml")
    assert len(loaded.spec.swept("blobs")) == 6 and loaded.spec.steps["blobs"].sweep.chooser().metric == "val/loss"
