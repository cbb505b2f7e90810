"""`scaling`: fit scaling laws to pretrain runs of several sizes and budgets (Hoffmann et al. 2022, "Chinchilla").

Reads: each run's result (nothing re-runs): `params/non_embedding` as N (the convention of `sizing`,
schemas/sizing.py), `train/tokens` as D, C = 6ND, and its final held-out `val/loss`. Fits approach 3, the
parametric loss L(N, D) = E + A/N^alpha + B/D^beta (Huber on log-loss, L-BFGS from a grid of starts), with
bootstrap intervals, and approach 2, the isoFLOP profiles (components/lib/scaling_fit.py). With `holdout: largest`
it also fits every run but the largest-compute one and reports how well that fit predicts it. Writes:
`constants.json` (the fitted law, which a pretrain step's `sizing.constants` reads), `scaling.json` (every run,
fit, interval, profile and prediction), and `loss_vs_compute.png`, `isoflop.png`, `fitted_vs_measured.png`;
logs the metrics, the runs as an MLflow table, the JSON files and the figures.
"""

from __future__ import annotations

import json
import math

import numpy as np

from components.lib import scaling_fit
from components.lib.context import StepContext, StepOutput
from schemas.sizing import CHINCHILLA, LAW_KEYS, Law
from schemas.steps.scaling import ScalingSpec

READS = {"N": "params/non_embedding", "D": "train/tokens", "loss": "val/loss"}
# metric suffix -> (name in constants.json, value of a law)
VALUES = {"e": ("E", lambda law: law.E), "a": ("A", lambda law: law.A), "b": ("B", lambda law: law.B),
          "alpha": ("alpha", lambda law: law.alpha), "beta": ("beta", lambda law: law.beta),
          "n_exponent": ("n_exponent", lambda law: law.exp_n)}


def run(spec: ScalingSpec, ctx: StepContext) -> StepOutput:
    """Read the runs, fit both approaches (and the held-out check), then write, plot and log them."""
    runs = read_runs(spec.runs, ctx)
    n, d, loss = (np.array([r[k] for r in runs]) for k in ("N", "D", "loss"))
    fit = scaling_fit.fit_law(n, d, loss, spec.fit.grid, spec.fit.huber_delta)
    boot = scaling_fit.bootstrap_law(n, d, loss, fit, spec.bootstrap.resamples, spec.bootstrap.confidence, ctx.seed,
                                     spec.fit.huber_delta) if spec.bootstrap.resamples else None
    held = holdout(runs, spec) if spec.holdout == "largest" else None
    iso = scaling_fit.isoflop(n, d, loss, spec.isoflop.tolerance)
    for run_, fitted in zip(runs, fit.predict(n, d)):
        run_["fitted"] = float(fitted)

    metrics = law_metrics(fit, boot, runs)
    metrics.update(held["metrics"] if held else {})
    metrics["isoflop/budgets"] = len(iso.used())
    if iso.n_law is not None:
        metrics.update({"isoflop/n_exponent": iso.n_law[1], "isoflop/d_exponent": iso.d_law[1]})
    budget = budget_report(spec.budget, fit.law, boot, iso) if spec.budget is not None else {}
    metrics.update(budget.pop("metrics", {}))

    report = {"runs": runs, "conventions": conventions(), "approach3": law_report(fit, boot, spec),
              "published": CHINCHILLA.as_dict(), "holdout": held and held["report"],
              "isoflop": isoflop_report(iso, runs), "budget": budget}
    constants = {**{k: getattr(fit.law, k) for k in LAW_KEYS}, "n_exponent": fit.law.exp_n,
                 "intervals": report["approach3"]["intervals"], "conventions": conventions(),
                 "runs": [r["name"] for r in runs], "step": ctx.name}
    (ctx.out_dir / "constants.json").write_text(json.dumps(constants, indent=2) + "\n")
    (ctx.out_dir / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    figures = plot_all(runs, fit, held, iso, ctx.out_dir, f"{ctx.pipeline_name}, {ctx.name}")

    ctx.log_table([{k: r[k] for k in ("name", "N", "D", "C", "loss", "fitted")} for r in runs], "runs.json")
    for path in [ctx.out_dir / "constants.json", ctx.out_dir / "scaling.json", *figures]:
        ctx.log_artifact(path)
    print(summary(ctx.name, fit, metrics, held), flush=True)
    return StepOutput(outputs={"constants": "constants.json", "report": "scaling.json"}, metrics=metrics,
                      info={"law": fit.law.as_dict(), "holdout": held and held["report"]})


def read_runs(names: list[str], ctx: StepContext) -> list[dict]:
    """Each run's name, N, D, C = 6ND and loss; a run that lacks one, or too little spread to fit, is an error."""
    runs = []
    for name in names:
        result = ctx.step(name)
        missing = [m for m in READS.values() if not math.isfinite(result.metrics.get(m, float("nan")))]
        if missing:
            raise ValueError(f"scaling.runs: step '{name}' ({result.kind}) reported no {', '.join(missing)}; a run "
                             "needs its N (params/non_embedding), D (train/tokens) and val/loss, as pretrain reports")
        row = {"name": name, **{k: float(result.metrics[m]) for k, m in READS.items()}}
        runs.append({**row, "C": 6 * row["N"] * row["D"]})
    for key, term in (("N", "alpha (model size)"), ("D", "beta (training tokens)")):
        if len({r[key] for r in runs}) < 2:
            raise ValueError(f"scaling.runs: every run has {key}={runs[0][key]:,.0f}, so {term} cannot be fitted; "
                             f"give runs of at least two different {key}")
    return runs


def held_out(runs: list[dict], tolerance: float) -> int:
    """The run of largest compute; of the top budget's runs (C within `tolerance` of the largest), the largest model."""
    top = max(r["C"] for r in runs)
    return max((i for i, r in enumerate(runs) if r["C"] * (1 + tolerance) >= top), key=lambda i: runs[i]["N"])


def holdout(runs: list[dict], spec: ScalingSpec) -> dict:
    """Fit every run but the held-out one and predict its loss."""
    out = held_out(runs, spec.isoflop.tolerance)
    rest = [r for i, r in enumerate(runs) if i != out]
    n, d, loss = (np.array([r[k] for r in rest]) for k in ("N", "D", "loss"))
    fit = scaling_fit.fit_law(n, d, loss, spec.fit.grid, spec.fit.huber_delta)
    held = runs[out]
    predicted = float(fit.predict(held["N"], held["D"]))
    error = (predicted - held["loss"]) / held["loss"]
    return {"metrics": {"scaling/holdout_error": error, "scaling/holdout_predicted": predicted,
                        "scaling/holdout_measured": held["loss"]},
            "report": {"run": held["name"], "N": held["N"], "D": held["D"], "C": held["C"], "measured": held["loss"],
                       "predicted": predicted, "relative_error": error, "law": fit.law.as_dict()}}


def law_metrics(fit: scaling_fit.LawFit, boot: scaling_fit.Bootstrap | None, runs: list[dict]) -> dict:
    """The constants, their intervals, the objective and the mean relative error of the fit."""
    out = {f"scaling/{k}": of(fit.law) for k, (_, of) in VALUES.items()}
    for k, (_, of) in VALUES.items() if boot is not None else ():
        out[f"scaling/{k}_low"], out[f"scaling/{k}_high"] = boot.interval(of)
    out["scaling/objective"] = fit.objective
    out["scaling/exponents_at_bound"] = len(fit.at_bound)
    out["scaling/fit_error"] = float(np.mean([abs(r["fitted"] - r["loss"]) / r["loss"] for r in runs]))
    out["scaling/runs"] = len(runs)
    return out


def law_report(fit: scaling_fit.LawFit, boot: scaling_fit.Bootstrap | None, spec: ScalingSpec) -> dict:
    intervals = {name: list(boot.interval(of)) for name, of in VALUES.values()} if boot else {}
    return {**fit.law.as_dict(), "n_exponent": fit.law.exp_n, "objective": fit.objective, "starts": fit.starts,
            "at_bound": fit.at_bound, "exponent_bound": scaling_fit.EXPONENT_BOUND,
            "grid": spec.fit.grid, "huber_delta": spec.fit.huber_delta, "intervals": intervals,
            "confidence": spec.bootstrap.confidence if boot else None, "resamples": len(boot.laws) if boot else 0}


def budget_report(flops: float, law: Law, boot: scaling_fit.Bootstrap | None, iso: scaling_fit.Isoflop) -> dict:
    """Compute-optimal N and D for the budget by both approaches (approach 2 only with its power laws)."""
    out: dict = {"flops": flops, "metrics": {}}
    try:
        n_opt, d_opt = law.optimal(flops)
    except ValueError as err:  # a fit whose loss does not fall with N or D has no optimum to report
        out["approach3"] = {"error": str(err)}
        print(f"scaling.budget: {err}", flush=True)
    else:
        loss = law.loss(n_opt, d_opt)
        out["approach3"] = {"N": n_opt, "D": d_opt, "loss": loss}
        out["metrics"].update({"scaling/budget_params": n_opt, "scaling/budget_tokens": d_opt,
                               "scaling/budget_loss": loss})
        if boot is not None:
            for i, key in enumerate(("params", "tokens")):
                low, high = boot.interval(lambda x, i=i: x.optimal(flops)[i])
                out["metrics"].update({f"scaling/budget_{key}_low": low, f"scaling/budget_{key}_high": high})
    found = iso.optimal(flops)
    if found is not None:
        out["approach2"] = {"N": found[0], "D": found[1]}
        out["metrics"].update({"isoflop/budget_params": found[0], "isoflop/budget_tokens": found[1]})
    return out


def isoflop_report(iso: scaling_fit.Isoflop, runs: list[dict]) -> dict:
    profiles = [{"flops": p.flops, "runs": [runs[i]["name"] for i in p.runs], "parabola": p.coef,
                 "N_opt": p.n_opt, "D_opt": p.d_opt, "inside": p.inside, "why": p.why} for p in iso.profiles]
    laws = {name: None if law is None else {"k": law[0], "exponent": law[1]}
            for name, law in (("N_opt", iso.n_law), ("D_opt", iso.d_law))}
    return {"profiles": profiles, **laws}


def conventions() -> dict:
    return {"N": "non-embedding parameters (params/non_embedding)", "D": "training tokens (train/tokens)",
            "C": "6ND FLOPs", "loss": "final held-out val/loss, nats per token"}


def summary(name: str, fit: scaling_fit.LawFit, metrics: dict, held: dict | None) -> str:
    law = fit.law
    text = (f"{name}: L(N, D) = {law.E:.3f} + {law.A:.4g}/N^{law.alpha:.3f} + {law.B:.4g}/D^{law.beta:.3f} "
            f"(N_opt ~ C^{law.exp_n:.3f}; published: {CHINCHILLA.E} + {CHINCHILLA.A}/N^{CHINCHILLA.alpha} + "
            f"{CHINCHILLA.B}/D^{CHINCHILLA.beta})")
    for k in fit.at_bound:
        text += (f"\n{name}: {k} stopped at its bound {scaling_fit.EXPONENT_BOUND:g}: these runs do not identify it "
                 f"(the fit is as good for any larger {k}); add runs whose loss falls with "
                 f"{'N' if k == 'alpha' else 'D'} across more of their range")
    if held:
        r = held["report"]
        text += (f"\n{name}: held-out run '{r['run']}' (C={r['C']:.3g}): predicted {r['predicted']:.4f}, measured "
                 f"{r['measured']:.4f} ({100 * r['relative_error']:+.2f}%)")
    if "isoflop/n_exponent" in metrics:
        text += f"\n{name}: isoFLOP minima give N* ~ C^{metrics['isoflop/n_exponent']:.3f}"
    return text


# -- figures -----------------------------------------------------------------------------------


def plot_all(runs, fit, held, iso, folder, title: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    paths = [folder / "loss_vs_compute.png", folder / "isoflop.png", folder / "fitted_vs_measured.png"]
    plot_compute(runs, fit.law, held, paths[0], title)
    plot_isoflop(runs, iso, fit.law, paths[1], title)
    plot_fitted(runs, held, paths[2], title)
    return paths


def _envelope(law: Law, flops: np.ndarray) -> np.ndarray | None:
    """The fitted loss at the compute-optimal N and D of each budget (None for a fit without an optimum)."""
    try:
        return np.array([law.loss(*law.optimal(c)) for c in flops])
    except ValueError:
        return None


def plot_compute(runs, law: Law, held, path, title: str) -> None:
    """Loss against C = 6ND: the runs, the fitted law along each size, and its compute-optimal envelope."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    c = np.array([r["C"] for r in runs])
    grid = np.geomspace(c.min() / 2, c.max() * 2, 100)
    for i, size in enumerate(sorted({r["N"] for r in runs})):
        mine = [r for r in runs if r["N"] == size]
        line, = ax.plot(grid, [law.loss(size, g / (6 * size)) for g in grid], "-", lw=1, alpha=0.6)
        ax.plot([r["C"] for r in mine], [r["loss"] for r in mine], "o", color=line.get_color(),
                label=f"N={size:,.0f}")
    envelope = _envelope(law, grid)
    if envelope is not None:
        ax.plot(grid, envelope, "k--", lw=1.5, label="fitted law at the compute-optimal N, D")
    if held:
        r = held["report"]
        ax.plot([r["C"]], [r["predicted"]], "kx", ms=10, mew=2,
                label=f"held out '{r['run']}': predicted {r['predicted']:.3f} ({100 * r['relative_error']:+.1f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6ND (FLOPs, N non-embedding)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"{title}: loss vs compute", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_isoflop(runs, iso: scaling_fit.Isoflop, law: Law, path, title: str) -> None:
    """Left: each budget's loss against N with its parabola and minimum; right: the minima against C."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for p in iso.profiles:
        n = np.array([runs[i]["N"] for i in p.runs])
        points, = left.plot(n, [runs[i]["loss"] for i in p.runs], "o", label=f"C={p.flops:.2g}")
        if p.coef is not None:
            grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
            left.plot(grid, p.loss_at(grid), "-", color=points.get_color(), lw=1)
        if p.n_opt is not None:
            left.plot([p.n_opt], p.loss_at([p.n_opt]), "*", ms=12, color=points.get_color(),
                      mfc=points.get_color() if p.inside else "none")
    left.set_xscale("log")
    left.set_xlabel("N (non-embedding parameters)")
    left.set_ylabel("held-out loss (nats/token)")
    left.set_title("isoFLOP profiles (star: minimum; hollow: outside the sizes trained)", fontsize=9)
    left.legend(fontsize=7)
    used = iso.used()
    budgets = np.geomspace(min(p.flops for p in iso.profiles) / 2, max(p.flops for p in iso.profiles) * 2, 50)
    if used:
        right.plot([p.flops for p in used], [p.n_opt for p in used], "o", label="isoFLOP minima (approach 2)")
    if iso.n_law is not None:
        k, a = iso.n_law
        right.plot(budgets, k * budgets ** a, "-", label=f"N* = {k:.3g} C^{a:.3f}")
    if _envelope(law, budgets[:1]) is not None:
        right.plot(budgets, [law.optimal(c)[0] for c in budgets], "--",
                   label=f"fitted law's N_opt (approach 3) ~ C^{law.exp_n:.3f}")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("C = 6ND (FLOPs)")
    right.set_ylabel("compute-optimal N")
    right.set_title("compute-optimal model size", fontsize=9)
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_fitted(runs, held, path, title: str) -> None:
    """Fitted against measured loss of every run, and the held-out run as the fit without it predicts it."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    measured = [r["loss"] for r in runs]
    ax.plot(measured, [r["fitted"] for r in runs], "o", label="fitted on every run")
    if held:
        r = held["report"]
        ax.plot([r["measured"]], [r["predicted"]], "rx", ms=10, mew=2, label=f"'{r['run']}' held out")
        measured.append(r["predicted"])
    low, high = min(measured), max(measured)
    pad = 0.05 * (high - low or 1)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], "k-", lw=0.8, label="fitted = measured")
    ax.set_xlabel("measured val/loss")
    ax.set_ylabel("L(N, D) of the fit")
    ax.set_title(f"{title}: fitted vs measured", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
