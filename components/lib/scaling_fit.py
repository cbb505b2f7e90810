"""Fit scaling laws to training runs (Hoffmann et al. 2022, "Chinchilla", approaches 3 and 2).

Conventions are those of `sizing` (schemas/sizing.py): N counts non-embedding parameters (Kaplan et al. 2020),
D training tokens, C = 6ND FLOPs, losses in nats per token. The law, its loss and its closed-form
compute-optimal allocation are schemas.sizing.Law: the published constants and fitted ones share one formula.

- Approach 3 (`fit_law`): L(N, D) = E + A/N^alpha + B/D^beta, fitted in log space as
  log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, minimising the Huber loss
  (delta 1e-3) of the log-loss residuals with L-BFGS from a grid of starts (ALGORITHMS.md §10).
- Bootstrap (`bootstrap_law`): resample the runs with replacement, refit, take percentile intervals.
- Approach 2 (`isoflop`): group the runs by compute budget, fit a parabola of loss in log N per budget, take
  its vertex N*, then fit the power laws N*(C) = k C^a and D*(C) = C / (6 N*) = k' C^b.

The optimizer is scipy.optimize's L-BFGS-B (run without bounds), as in Epoch's replication notebook
(epoch-research/analyzing-chinchilla): scipy is in the environment (mlflow depends on it; pyproject.toml names it
since this module imports it), and one start of this 5-parameter problem takes it a few milliseconds, several
times less than torch.optim.LBFGS here (Python overhead per step dominates at this size).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from schemas.sizing import Law

HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid of starts (ALGORITHMS.md §10): 6 * 6 * 5 * 5 * 5 = 4500; `coarse` keeps every other value.
GRIDS = {
    "hoffmann": {"a": (0, 5, 10, 15, 20, 25), "b": (0, 5, 10, 15, 20, 25), "e": (-1, -0.5, 0, 0.5, 1),
                 "alpha": (0, 0.5, 1, 1.5, 2), "beta": (0, 0.5, 1, 1.5, 2)},
    "coarse": {"a": (0, 10, 20), "b": (0, 10, 20), "e": (-1, 0, 1), "alpha": (0, 1, 2), "beta": (0, 1, 2)},
}
PARAMETERS = ("a", "b", "e", "alpha", "beta")  # the order of the optimizer's vector
# scipy's ftol is relative with a floor of 1 on |f|: on the raw Huber objective (~1e-4 and below) a start stops
# far from the optimum (ALGORITHMS.md §10 check 4: E=1.495 instead of 1.69). Divided by delta^2 (one residual of
# delta costs 1/2) the objective keeps the same minimiser and scipy's default tolerances apply as meant.
# Every start gets SCREEN iterations; the SURVIVORS best distinct endpoints then run to convergence. On the §10
# data and Epoch's law this finds the same optimum as running every start to convergence, with a third of the
# evaluations (most of them went to starts far from any good fit).
SCREEN, SURVIVORS = 10, 8
RESTARTS = 4  # a bootstrap refit starts from the full fit's best converged endpoints
TIE = 1e-6  # relative difference of objectives below which two fits are equally good
# L-BFGS-B's box on the exponents. Where the runs do not identify one (the loss falls with N only between the two
# smallest sizes, say), the objective is flat as it grows, and unbounded it ran to alpha = 363 and A = inf on the
# course's runs; bounded, it stops at the bound and the fit says so (`at_bound`). Fitted exponents are below 1.
EXPONENT_BOUND = 10.0
BOUNDS = [(None, None)] * 3 + [(0.0, EXPONENT_BOUND)] * 2


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Huber_delta(r) = r^2/2 for |r| <= delta, else delta (|r| - delta/2)."""
    r = np.abs(r)
    return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))


def law_of(theta: np.ndarray) -> Law:
    """The law of an optimizer vector [a, b, e, alpha, beta]."""
    a, b, e, alpha, beta = (float(v) for v in theta)
    with np.errstate(over="ignore"):  # a degenerate fit (a bootstrap resample of one size) may give A = inf
        return Law(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta)


def objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
              weights: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """sum_i w_i Huber(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) and its gradient in theta."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    share = np.exp(terms - top)
    total = share.sum(axis=0)
    share /= total  # softmax: d LSE / d term
    r = top + np.log(total) - log_loss
    slope = weights * np.where(np.abs(r) <= delta, r, delta * np.sign(r))
    grad = np.array([slope @ share[0], slope @ share[1], slope @ share[2],
                     -(slope * share[0]) @ log_n, -(slope * share[1]) @ log_d])
    return float(weights @ huber(r, delta)), grad


@dataclass
class LawFit:
    """The best fit of approach 3: its law, its objective (the Huber sum), and its converged endpoints, best first."""

    law: Law
    objective: float
    starts: int
    endpoints: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def at_bound(self) -> list[str]:
        """The exponents the fit left at EXPONENT_BOUND: the runs do not identify them."""
        return [k for k in ("alpha", "beta") if getattr(self.law, k) >= 0.99 * EXPONENT_BOUND]

    def predict(self, n, d) -> np.ndarray:
        with np.errstate(over="ignore"):
            return self.law.E + self.law.A * np.asarray(n, float) ** -self.law.alpha + \
                self.law.B * np.asarray(d, float) ** -self.law.beta


def grid_starts(grid: str = "hoffmann") -> np.ndarray:
    """Every start of the grid, as rows [a, b, e, alpha, beta]."""
    values = GRIDS[grid]
    return np.array(list(itertools.product(*(values[p] for p in PARAMETERS))), dtype=float)


def _scaled(theta: np.ndarray, *data) -> tuple[float, np.ndarray]:
    value, grad = objective(theta, *data)
    scale = 1 / data[-1] ** 2
    return value * scale, grad * scale


def _data(n, d, loss, weights, delta) -> tuple:
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    if min(n.min(), d.min(), loss.min()) <= 0:
        raise ValueError("scaling fit: every N, D and loss must be positive")
    w = np.ones_like(n) if weights is None else np.asarray(weights, float)
    return np.log(n), np.log(d), np.log(loss), w, delta


def fit_law(n, d, loss, grid: str | np.ndarray = "hoffmann", delta: float = HUBER_DELTA, weights=None) -> LawFit:
    """Approach 3: L-BFGS from every start of the grid (a name in GRIDS, or rows [a, b, e, alpha, beta]); the
    lowest objective wins. Ties within TIE go to the smallest vector: where the runs leave a constant
    unidentified (a flat valley of equal objective), the choice then does not hang on floating-point noise
    such as the order of the runs."""
    from scipy.optimize import minimize  # imported before the limit, which covers the BLAS libraries loaded
    from threadpoolctl import threadpool_limits

    data = _data(n, d, loss, weights, delta)
    starts = grid_starts(grid) if isinstance(grid, str) else np.atleast_2d(np.asarray(grid, float))

    def descend(x: np.ndarray, **options):
        return minimize(_scaled, x, args=data, jac=True, method="L-BFGS-B", bounds=BOUNDS, options=options)

    # One BLAS thread: L-BFGS-B's vectors are tiny, and threads waiting on a busy CPU made a start 12x slower here.
    with threadpool_limits(limits=1, user_api="blas"):
        screened = sorted((descend(x, maxiter=SCREEN) for x in starts), key=lambda r: r.fun)
        final = sorted((descend(x) for x in _distinct([r.x for r in screened], SURVIVORS)), key=lambda r: r.fun)
    best = min((r for r in final if r.fun <= final[0].fun * (1 + TIE) + 1e-12), key=lambda r: float(r.x @ r.x))
    return LawFit(law=law_of(best.x), objective=float(best.fun) * delta ** 2, starts=len(starts),
                  endpoints=_distinct([best.x] + [r.x for r in final], SURVIVORS))


def _distinct(points: list[np.ndarray], count: int) -> list[np.ndarray]:
    """The first `count` points that differ from every earlier one by more than 1e-3."""
    kept: list[np.ndarray] = []
    for x in points:
        if not any(np.allclose(x, y, rtol=1e-3, atol=1e-3) for y in kept):
            kept.append(x)
            if len(kept) == count:
                break
    return kept


@dataclass
class Bootstrap:
    """Refits on resampled runs: each resample's law, and percentile intervals of the constants."""

    laws: list[Law]
    confidence: float

    def samples(self, of) -> np.ndarray:
        """`of(law)` for every resample (a constant, an exponent, an allocation), NaN where it is undefined."""
        out = []
        for law in self.laws:
            try:
                out.append(float(of(law)))
            except (ValueError, ZeroDivisionError, OverflowError):
                out.append(float("nan"))
        return np.array(out)

    def interval(self, of) -> tuple[float, float]:
        """The central `confidence` percentile interval of `of(law)` over the resamples (NaN ones left out)."""
        values = self.samples(of)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return float("nan"), float("nan")
        tail = 100 * (1 - self.confidence) / 2
        low, high = np.percentile(values, [tail, 100 - tail])
        return float(low), float(high)


def bootstrap_law(n, d, loss, fit: LawFit, resamples: int = 200, confidence: float = 0.9, seed: int = 0,
                  delta: float = HUBER_DELTA) -> Bootstrap:
    """Resample the runs with replacement (as integer weights), refit from the full fit's best distinct
    endpoints (a grid per resample would cost `resamples` full fits), keep each resample's best.

    A resample of fewer distinct runs than constants, or of one N or one D, is drawn again: no fit can
    determine five constants from it (with 9 runs, 6% of the draws), and keeping it filled the percentiles
    with arbitrary values (E down to 1e-122 on the course's runs) rather than with the spread of the data."""
    rng = np.random.default_rng(seed)
    n, d = np.asarray(n, float), np.asarray(d, float)
    if len(n) < len(PARAMETERS) or len(set(n)) < 2 or len(set(d)) < 2:
        raise ValueError(f"bootstrap: {len(n)} runs of {len(set(n))} sizes and {len(set(d))} token counts cannot "
                         f"determine {len(PARAMETERS)} constants; give at least {len(PARAMETERS)} runs, 2 of each")
    laws = []
    while len(laws) < resamples:
        pick = rng.integers(0, len(n), len(n))
        if len(set(pick)) < len(PARAMETERS) or len(set(n[pick])) < 2 or len(set(d[pick])) < 2:
            continue
        weights = np.bincount(pick, minlength=len(n)).astype(float)
        laws.append(fit_law(n, d, loss, np.array(fit.endpoints[:RESTARTS]), delta, weights).law)
    return Bootstrap(laws=laws, confidence=confidence)


# -- approach 2: isoFLOP profiles ---------------------------------------------------------------


@dataclass
class Profile:
    """One compute budget: its runs, the parabola of loss in log N through them, and its vertex."""

    flops: float                 # the budget: geometric mean of its runs' 6ND
    runs: list[int]              # indices into the inputs
    coef: tuple[float, float, float] | None = None  # loss = c2 x^2 + c1 x + c0 with x = ln N
    n_opt: float | None = None   # the vertex, where the parabola opens upward
    inside: bool = False         # the vertex lies within the budget's sampled N (else it is an extrapolation)
    why: str = ""                # why there is no usable minimum

    @property
    def d_opt(self) -> float | None:
        return None if self.n_opt is None else self.flops / (6 * self.n_opt)

    def loss_at(self, n) -> np.ndarray:
        x = np.log(np.asarray(n, float))
        c2, c1, c0 = self.coef
        return c2 * x * x + c1 * x + c0


@dataclass
class Isoflop:
    """Every budget's profile and, from the vertices inside their ranges, N* = k C^a and D* = k' C^b."""

    profiles: list[Profile]
    n_law: tuple[float, float] | None = None  # (k, a)
    d_law: tuple[float, float] | None = None  # (k', b)

    def used(self) -> list[Profile]:
        return [p for p in self.profiles if p.n_opt is not None and p.inside]

    def optimal(self, flops: float) -> tuple[float, float] | None:
        """(N*, D*) for a budget from the fitted power laws, or None without them."""
        if self.n_law is None:
            return None
        return self.n_law[0] * flops ** self.n_law[1], self.d_law[0] * flops ** self.d_law[1]


def group_budgets(flops, tolerance: float = 0.25) -> list[list[int]]:
    """Indices grouped by budget: sorted by C, a new group starts where C grows by more than 1 + tolerance
    over the previous run's."""
    flops = np.asarray(flops, float)
    order = np.argsort(flops, kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if groups and flops[i] <= flops[groups[-1][-1]] * (1 + tolerance):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return groups


def profile(flops: float, runs: list[int], n: np.ndarray, loss: np.ndarray) -> Profile:
    """The parabola through one budget's (ln N, loss) points by least squares, and its vertex."""
    out = Profile(flops=flops, runs=runs)
    x = np.log(n[runs])
    if len(set(np.round(x, 9))) < 3:
        out.why = f"{len(set(np.round(x, 9)))} distinct sizes (a parabola needs 3)"
        return out
    c2, c1, c0 = np.polyfit(x, loss[runs], 2)
    out.coef = (float(c2), float(c1), float(c0))
    if c2 <= 0:
        out.why = "the loss has no minimum over these sizes (the parabola opens downward)"
        return out
    vertex = -c1 / (2 * c2)
    out.n_opt, out.inside = float(math.exp(vertex)), bool(x.min() <= vertex <= x.max())
    if not out.inside:
        out.why = "the minimum lies outside the sizes trained (an extrapolation, left out of the power law)"
    return out


def power_law(x, y) -> tuple[float, float]:
    """(k, a) of y = k x^a by least squares on log y = a log x + log k."""
    a, log_k = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(math.exp(log_k)), float(a)


def isoflop(n, d, loss, tolerance: float = 0.25) -> Isoflop:
    """Approach 2: the profile of every budget (C = 6ND grouped within `tolerance`), then the power laws
    through the vertices that lie inside their budget's sampled sizes (at least two budgets)."""
    n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
    flops = 6 * n * d
    profiles = [profile(float(np.exp(np.log(flops[g]).mean())), g, n, loss) for g in group_budgets(flops, tolerance)]
    out = Isoflop(profiles=profiles)
    used = out.used()
    if len({round(math.log(p.flops), 9) for p in used}) >= 2:
        budgets = [p.flops for p in used]
        out.n_law = power_law(budgets, [p.n_opt for p in used])
        out.d_law = power_law(budgets, [p.d_opt for p in used])
    return out
