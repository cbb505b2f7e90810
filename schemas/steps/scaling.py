"""`scaling`: fit scaling laws to pretrain runs of several sizes and budgets (Hoffmann et al. 2022)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from ..base import Ref, Section, StepSpec

FITTED = ("E", "A", "B", "alpha", "beta")  # the constants of approach 3, one run at least per constant
RunRef = Annotated[str, Ref("model", kinds=("pretrain",), all_variants=True)]


class FitSpec(Section):
    """How approach 3 (the parametric loss) is fitted."""

    grid: Literal["hoffmann", "coarse"] = "hoffmann"
    """L-BFGS starts: `hoffmann`, the paper's 4500 (alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
    a, b in {0, 5, ..., 25}); `coarse`, every other value of each (243 starts, about 20x faster)."""
    huber_delta: float = Field(1e-3, gt=0)
    """Huber loss threshold on the log-loss residuals (the paper's 1e-3)."""


class BootstrapSpec(Section):
    """Uncertainty of the fitted constants: refit on runs resampled with replacement."""

    resamples: int = Field(200, ge=0, le=10000)
    """Refits on resampled runs (0: no intervals)."""
    confidence: float = Field(0.9, gt=0, lt=1)
    """Coverage of the percentile intervals (0.9: the 5th to the 95th percentile)."""


class IsoflopSpec(Section):
    """How approach 2 (isoFLOP profiles) groups the runs by compute budget."""

    tolerance: float = Field(0.25, gt=0, le=1)
    """Runs whose C = 6ND lies within this fraction of the previous run's (sorted by C) share a budget."""


class ScalingSpec(StepSpec):
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (approach 3) and the isoFLOP profiles (approach 2) to pretrain runs;
    check the fit on the largest run held out; give the compute-optimal N and D for a budget."""

    produces: ClassVar[frozenset[str]] = frozenset({"constants", "report"})

    kind: Literal["scaling"]
    runs: list[RunRef] = Field(min_length=1)
    """The pretrain steps to fit, each at its own size N (non-embedding parameters) and tokens D, on one tokenizer;
    their final val/loss is the loss fitted."""
    holdout: Literal["largest", "none"] = "largest"
    """`largest`: also fit on every run but the one of largest compute C = 6ND (of the top budget's runs, the largest
    model), and report how well that fit predicts its loss (scaling/holdout_error); `none`: no held-out check."""
    budget: float | None = Field(None, gt=0)
    """A compute budget in FLOPs for which to report the compute-optimal N and D of both approaches."""
    fit: FitSpec = FitSpec()
    """Approach 3's starts and Huber threshold."""
    bootstrap: BootstrapSpec = BootstrapSpec()
    """Percentile intervals of the fitted constants."""
    isoflop: IsoflopSpec = IsoflopSpec()
    """Approach 2's grouping of runs into budgets."""

    @model_validator(mode="after")
    def _enough_runs(self) -> "ScalingSpec":
        twice = sorted({r for r in self.runs if self.runs.count(r) > 1})
        if twice:
            raise ValueError(f"runs names {', '.join(twice)} twice")
        need = len(FITTED) + (self.holdout == "largest")
        if len(self.runs) < need:
            raise ValueError(f"runs: approach 3 fits {len(FITTED)} constants ({', '.join(FITTED)}), so it needs at "
                             f"least {len(FITTED)} runs" + (f", and {need} with holdout: largest (its check fits all "
                                                            "runs but one)" if need > len(FITTED) else "")
                             + f"; got {len(self.runs)}")
        return self

    def tokenizer_problems(self, steps: dict) -> list[tuple[tuple, str]]:
        """(field, message) for runs trained on different tokenize steps: losses per token compare only under one
        tokenizer and held-out split."""
        first = next((r for r in self.runs if getattr(steps.get(r), "kind", None) == "pretrain"), None)
        if first is None:
            return []
        own = steps[first].tokenizer
        return [(("runs", i), f"run '{run}' was trained on tokenizer '{steps[run].tokenizer}', run '{first}' on "
                              f"'{own}'; a scaling fit compares losses per token, so every run needs one tokenize step")
                for i, run in enumerate(self.runs)
                if getattr(steps.get(run), "kind", None) == "pretrain" and steps[run].tokenizer != own]
