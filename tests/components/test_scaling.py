"""scaling: approach 3 recovers a planted law, approach 2 a planted optimum, the bootstrap covers the truth; the step
writes its constants, figures and held-out check; pretrain's sizing reads fitted constants; the course spec runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from schemas.sizing import CHINCHILLA, Law

# ALGORITHMS.md §10 check 4: the Chinchilla law on 5 sizes x 4 token counts
SIZES, TOKENS = [1e8, 3e8, 1e9, 3e9, 1e10], [1e9, 1e10, 1e11, 1e12]


def planted(law: Law = CHINCHILLA, noise: float = 0.0, seed: int = 0):
    n, d = (g.ravel() for g in np.meshgrid(SIZES, TOKENS, indexing="ij"))
    loss = np.array([law.loss(a, b) for a, b in zip(n, d)])
    return n, d, loss * np.exp(np.random.default_rng(seed).normal(0, noise, loss.size)) if noise else loss


def test_huber_and_the_planted_losses_match_the_reference_values():
    from components.lib.scaling_fit import huber

    assert huber(np.array([5e-4, 1e-3, 1e-2])) == pytest.approx([1.25e-7, 5e-7, 9.5e-6])  # §10 check 1
    _, _, loss = planted()
    assert (loss[0], loss[-1]) == (pytest.approx(3.704673, abs=1e-6), pytest.approx(2.031068, abs=1e-6))


def test_the_fit_recovers_the_planted_constants():
    """Noise-free: every constant to 1e-3 relative (the §10 check; the coarse grid's 243 starts suffice here).
    With 0.2% log-normal noise: E, alpha, beta to 3%, and the compute-optimal exponent to 0.01."""
    from components.lib.scaling_fit import fit_law

    fit = fit_law(*planted(), grid="coarse")
    for key in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.law, key) == pytest.approx(getattr(CHINCHILLA, key), rel=1e-3), key
    assert fit.objective < 1e-12
    noisy = fit_law(*planted(noise=0.002), grid="coarse").law
    for key in ("E", "alpha", "beta"):
        assert getattr(noisy, key) == pytest.approx(getattr(CHINCHILLA, key), rel=0.03), key
    assert noisy.exp_n == pytest.approx(CHINCHILLA.exp_n, abs=0.01)


def test_scipy_s_default_tolerances_stall_on_the_raw_objective_and_not_on_the_scaled_one():
    """§10 check 4: one start [5, 5, 0.5, 0.5, 0.5]; raw Huber objective: stops at E=1.495; divided by delta^2
    (what fit_law minimises): reaches E=1.69."""
    from scipy.optimize import minimize

    from components.lib import scaling_fit as sf

    n, d, loss = planted()
    data = sf._data(n, d, loss, None, sf.HUBER_DELTA)
    start = np.array([5, 5, 0.5, 0.5, 0.5])
    raw = minimize(sf.objective, start, args=data, jac=True, method="L-BFGS-B")
    assert sf.law_of(raw.x).E == pytest.approx(1.495, abs=0.01)
    assert sf.fit_law(n, d, loss, grid=start).law.E == pytest.approx(1.69, rel=1e-4)


def test_the_bootstrap_intervals_contain_the_truth():
    from components.lib.scaling_fit import bootstrap_law, fit_law

    n, d, loss = planted(noise=0.002, seed=1)
    fit = fit_law(n, d, loss, grid="coarse")
    boot = bootstrap_law(n, d, loss, fit, resamples=40, confidence=0.95, seed=0)
    for key in ("E", "A", "B", "alpha", "beta"):
        low, high = boot.interval(lambda law, key=key: getattr(law, key))
        assert low <= getattr(CHINCHILLA, key) <= high, (key, low, high)
        assert low < high
    low, high = boot.interval(lambda law: law.exp_n)
    assert low <= CHINCHILLA.exp_n <= high


def test_isoflop_minima_recover_the_planted_optimum():
    """§10 check 5: 5 budgets 1e18..1e22, 9 sizes log-spaced over +-1 decade around the true N*: each vertex is
    4.0% high (a parabola in log N is not the true profile), so the fitted exponent is exactly beta/(alpha+beta)."""
    from components.lib.scaling_fit import isoflop

    n, d = [], []
    for flops in np.geomspace(1e18, 1e22, 5):
        for size in CHINCHILLA.optimal(flops)[0] * np.geomspace(0.1, 10, 9):
            n.append(size)
            d.append(flops / (6 * size))
    loss = [CHINCHILLA.loss(a, b) for a, b in zip(n, d)]
    iso = isoflop(n, d, loss)
    assert len(iso.profiles) == 5 and len(iso.used()) == 5
    for p in iso.profiles:
        assert p.n_opt / CHINCHILLA.optimal(p.flops)[0] == pytest.approx(1.040, abs=0.002)
    assert iso.profiles[0].n_opt == pytest.approx(8.379e7, rel=1e-3)
    assert iso.n_law[1] == pytest.approx(CHINCHILLA.exp_n, abs=1e-6)
    assert iso.d_law[1] == pytest.approx(CHINCHILLA.exp_d, abs=1e-6)


def test_the_closed_form_is_sizing_s():
    from schemas import sizing

    for flops in (1e15, 1e21, 5.76e23):
        assert CHINCHILLA.optimal(flops) == sizing.allocate(flops, "closed_form")
    epoch = Law(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)  # §10 check 3
    n, d = sizing.allocate(5.76e23, "closed_form", law=epoch)
    assert (n, d, epoch.exp_n) == (pytest.approx(7.225e10, rel=1e-3), pytest.approx(1.329e12, rel=1e-3),
                                   pytest.approx(0.5126, abs=1e-4))


# -- the step ------------------------------------------------------------------------------------


EPOCH = Law(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)  # Besiroglu et al. 2024's refit (§10)


def results(law: Law, sizes=(1e8, 3e8, 9e8), budgets=(1e18, 1e19, 1e20)) -> dict:
    """Pretrain results on a sizes x budgets grid whose val/loss follows `law` exactly."""
    from components.lib.context import StepResult

    out = {}
    for i, flops in enumerate(budgets):
        for j, size in enumerate(sizes):
            name, tokens = f"n{j}c{i}", flops / (6 * size)
            out[name] = StepResult(name, "pretrain", name * 16, None, {"model": "model"},
                                   {"params/non_embedding": size, "train/tokens": tokens,
                                    "val/loss": law.loss(size, tokens)})
    return out


def scaling_spec(runs, **fields):
    from schemas.steps.scaling import ScalingSpec

    return ScalingSpec.model_validate({"kind": "scaling", "runs": list(runs), "fit": {"grid": "coarse"},
                                       "bootstrap": {"resamples": 4}, **fields})


def test_the_step_fits_predicts_the_held_out_run_and_writes_what_sizing_reads(tmp_path):
    """Epoch's law on 3 sizes x 3 budgets: the constants, a held-out error of ~0, both approaches' optimum for a
    budget; the budget 1e18's minimum (8.1e7) lies below the sizes trained, so approach 2 uses the other two."""
    from components import scaling
    from schemas.sizing import read_law
    from schemas.steps.pretrain import PretrainSpec
    from tests.conftest import check_contract, make_ctx

    upstream = results(EPOCH)
    spec = scaling_spec(upstream, budget=1e21)
    ctx = make_ctx(tmp_path, name="fit", kind="scaling", upstream=upstream)
    out = scaling.run(spec, ctx)
    check_contract(spec, out)
    m = out.metrics
    for key in ("e", "a", "b", "alpha", "beta"):
        assert m[f"scaling/{key}"] == pytest.approx(getattr(EPOCH, {"e": "E", "a": "A", "b": "B"}.get(key, key)),
                                                    rel=1e-3), key
        assert m[f"scaling/{key}_low"] <= m[f"scaling/{key}_high"]
    held = "n2c2"  # the top budget's largest model
    assert out.info["holdout"]["run"] == held and m["scaling/holdout_measured"] == upstream[held].metrics["val/loss"]
    assert abs(m["scaling/holdout_error"]) < 1e-4 and m["scaling/runs"] == 9
    assert (m["scaling/budget_params"], m["scaling/budget_tokens"]) == pytest.approx(EPOCH.optimal(1e21), rel=1e-6)
    assert m["isoflop/budgets"] == 2 and m["isoflop/budget_params"] == pytest.approx(EPOCH.optimal(1e21)[0], rel=0.1)
    report = json.loads((ctx.out_dir / "scaling.json").read_text())
    assert [p["inside"] for p in report["isoflop"]["profiles"]] == [False, True, True]
    for figure in ("loss_vs_compute.png", "isoflop.png", "fitted_vs_measured.png"):
        assert (ctx.out_dir / figure).stat().st_size > 5000, figure

    fitted = read_law(ctx.out_dir / "constants.json")
    assert fitted.alpha == pytest.approx(EPOCH.alpha, rel=1e-3)
    pretrain = PretrainSpec.model_validate({"kind": "pretrain", "tokenizer": "tok", "model": {"family": "llama"},
                                            "sizing": {"flops": 1e12, "rule": "closed_form", "constants": "fit"}})
    assert pretrain.sized(fitted).target_params == pytest.approx(EPOCH.optimal(1e12)[0], rel=1e-3)
    assert pretrain.sized().target_params == pytest.approx(CHINCHILLA.optimal(1e12)[0])  # 2.3x more


def test_too_few_runs_a_run_that_is_no_pretrain_and_mixed_tokenizers_are_spec_errors(write_spec):
    import schemas

    with pytest.raises(ValueError, match=r"runs: approach 3 fits 5 constants \(E, A, B, alpha, beta\), so it needs at "
                                         r"least 5 runs, and 6 with holdout: largest .*; got 5"):
        scaling_spec(["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match=r"needs at least 5 runs; got 4"):
        scaling_spec(["a", "b", "c", "d"], holdout="none")
    scaling_spec(["a", "b", "c", "d", "e"], holdout="none")

    runs = "\n".join(f"  r{i}: {{kind: pretrain, tokenizer: tok, model: {{family: llama, hidden: {16 * (i + 1)}}}}}"
                     for i in range(6))
    text = f"""
name: fit
steps:
  tok: {{kind: tokenize, corpus: {{builtin: pydoc}}}}
  tok2: {{kind: tokenize, corpus: {{builtin: pydoc}}, vocab_size: 512}}
{runs}
  fit: {{kind: scaling, runs: [r0, r1, r2, r3, r4, r5]}}
"""
    loaded = schemas.load(write_spec(text))
    assert schemas.dependencies(loaded.spec, "fit") == [f"r{i}" for i in range(6)]
    with pytest.raises(schemas.SpecError, match=r"step 'tok' is a tokenize step; this field takes pretrain steps "
                                                r"\(r0, r1, r2, r3, r4, r5 in this pipeline\)"):
        schemas.load(write_spec(text.replace("runs: [r0,", "runs: [tok,")))
    with pytest.raises(schemas.SpecError, match=r"run 'r3' was trained on tokenizer 'tok2', run 'r0' on 'tok'"):
        schemas.load(write_spec(text.replace("r3: {kind: pretrain, tokenizer: tok,",
                                             "r3: {kind: pretrain, tokenizer: tok2,")))


def test_sizing_with_fitted_constants_runs_after_the_fit_and_plan_says_so(write_spec, capsys):
    import schemas
    from flows.cli import main

    runs = "\n".join(f"  r{i}: {{kind: pretrain, tokenizer: tok, model: {{family: llama, hidden: {16 * (i + 1)}}}}}"
                     for i in range(5))
    path = write_spec(f"""
name: fitted
steps:
  tok: {{kind: tokenize, corpus: {{builtin: pydoc}}}}
{runs}
  fit: {{kind: scaling, runs: [r0, r1, r2, r3, r4], holdout: none}}
  sized:
    kind: pretrain
    tokenizer: tok
    model: {{family: llama, context: 64}}
    sizing: {{flops: 1.0e+12, rule: closed_form, constants: fit}}
""")
    assert schemas.dependencies(schemas.load(path).spec, "sized") == ["tok", "fit"]
    assert main(["plan", str(path)]) == 0
    assert "fitted by step 'fit' when this step runs; shown above with the published ones" in capsys.readouterr().out
    with pytest.raises(schemas.SpecError, match=r"step 'r0' \(pretrain\) writes no constants"):
        schemas.load(write_spec(path.read_text().replace("constants: fit", "constants: r0"), "bad.yaml"))
    with pytest.raises(schemas.SpecError, match=r"sizing.constants \('fit'\) gives the closed form's constants; it "
                                                r"needs rule: closed_form, got rule: tokens_per_param"):
        schemas.load(write_spec(path.read_text().replace("rule: closed_form", "rule: tokens_per_param"), "bad.yaml"))


@pytest.mark.usefixtures("prefect_harness")
def test_the_course_scaling_spec_runs_end_to_end(tmp_path, monkeypatch):
    """specs/course/scaling.yaml as a user runs it, every run's tokens cut tenfold, the fit's starts and
    resamples cut: the plots, the constants and the held-out check reach MLflow."""
    import shutil

    import yaml
    from mlflow.tracking import MlflowClient

    from flows.cli import main
    from tests.conftest import REPO

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "specs" / "course").mkdir(parents=True)
    path = tmp_path / "specs" / "course" / "scaling.yaml"
    shutil.copy(REPO / "specs" / "course" / "scaling.yaml", path)
    steps = yaml.safe_load(path.read_text())["steps"]
    runs = steps["fit"]["runs"]
    shorter = [f"steps.{r}.max_tokens={steps[r]['max_tokens'] // 10}" for r in runs]
    shorter += ["steps.fit.fit.grid=coarse", "steps.fit.bootstrap.resamples=5"]
    assert main(["run", str(path), *sum((["--set", s] for s in shorter), [])]) == 0

    def result(step: str) -> dict:
        [found] = [json.loads(p.read_text()) for p in (tmp_path / "runs" / step).glob("*/result.json")]
        return found

    fit = result("fit")
    sizes = {r: result(r)["metrics"]["params/non_embedding"] for r in runs}
    flops = {r: 6 * sizes[r] * result(r)["metrics"]["train/tokens"] for r in runs}
    top = [r for r in runs if flops[r] * 1.25 >= max(flops.values())]  # the top budget's runs
    assert len(top) == 3 and fit["info"]["holdout"]["run"] == max(top, key=sizes.get)
    assert fit["metrics"]["scaling/holdout_measured"] == result(max(top, key=sizes.get))["metrics"]["val/loss"]
    assert np.isfinite(fit["metrics"]["scaling/holdout_error"]) and fit["metrics"]["scaling/runs"] == len(runs)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("scaling-laws")
    [run] = client.search_runs(experiment.experiment_id, "tags.`llmcycle.step` = 'fit'")
    assert "scaling/holdout_error" in run.data.metrics and "scaling/alpha_low" in run.data.metrics
    assert {"loss_vs_compute.png", "isoflop.png", "fitted_vs_measured.png", "constants.json",
            "scaling.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_pretrain_builds_the_shape_the_fitted_constants_choose(tmp_path, tokenized):
    """components/pretrain.build reads the scaling step's constants.json (here Epoch's law) for `sizing`."""
    from components import pretrain
    from components.lib import models
    from components.lib.context import StepResult
    from schemas.sizing import size_model
    from schemas.steps.pretrain import PretrainSpec
    from tests.conftest import make_ctx

    (tmp_path / "constants.json").write_text(json.dumps({**EPOCH.as_dict(), "step": "fit"}))
    fit = StepResult("fit", "scaling", "f" * 64, tmp_path, {"constants": "constants.json", "report": "x"}, {})
    spec = PretrainSpec.model_validate({"kind": "pretrain", "tokenizer": "tokenizer", "model": {"family": "llama"},
                                        "sizing": {"flops": 1e13, "rule": "closed_form", "constants": "fit"}})
    ctx = make_ctx(tmp_path, name="sized", kind="pretrain", upstream={"tokenizer": tokenized, "fit": fit})
    model, _, sized = pretrain.build(spec, ctx, models.load_tokenizer(tokenized.path("tokenizer")))
    want = size_model("llama", flops=1e13, rule="closed_form", law=EPOCH)
    assert (sized.model.layers, sized.model.hidden, sized.max_tokens) == (want.layers, want.hidden, want.tokens)
    assert want.hidden != size_model("llama", flops=1e13, rule="closed_form").hidden  # not the published choice
    assert model.config.hidden_size == want.hidden
