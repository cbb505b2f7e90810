"""The pruner of a sweep's Optuna search, as the engine (flows/sweeps.py) and a trial's step (trials.py) both build
it: Optuna keeps a study's trials in its storage but not its pruner, so each side makes the same one."""

from __future__ import annotations


def pruner(pruning: dict | None):
    """Optuna's MedianPruner with the spec's settings (`n_startup_trials`, `n_warmup_steps`); NopPruner for none."""
    import optuna

    if pruning is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=pruning["n_startup_trials"],
                                       n_warmup_steps=pruning["n_warmup_steps"])
