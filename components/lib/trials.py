"""A sweep's Optuna trial, seen from inside its step: report a metric after each validation round, stop when pruned.

The engine asks the study for the trial's settings and tells it the result (flows/sweeps.py); in between, the
step's Lightning loop reports here. Hand-written rather than optuna-integration's
PyTorchLightningPruningCallback: that one raises TrialPruned, which would fail the step and leave it to run again;
stopping the loop instead ends the step normally, so a pruned trial is a complete, shorter run (its output and
metrics kept, a re-run reuses it) that the engine then tells the study was PRUNED.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class PruneTrial(Callback):
    """After each validation round, report `trial["metric"]` at the global step to the trial; when Optuna's
    median pruner (the spec's settings) finds it worse than the earlier trials' median there, stop training and
    mark the trial (`pruned_at` among its user attributes)."""

    def __init__(self, trial: dict):
        self.settings = trial
        self.trial = None

    def _open(self):
        import optuna

        from components.lib.study import pruner

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        s = self.settings
        study = optuna.load_study(study_name=s["study"], storage=s["storage"], pruner=pruner(s))
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == s["number"])
        # Trial(study, trial_id) is Optuna's own handle on a running trial; the id is the storage's key for it
        return optuna.trial.Trial(study, frozen._trial_id)

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        stop = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.settings["metric"])
            if value is not None:
                self.trial = self.trial or self._open()
                step = trainer.global_step
                self.trial.report(float(value), step)
                if self.trial.should_prune():
                    self.trial.set_user_attr("pruned_at", step)
                    print(f"pruned at step {step}: {self.settings['metric']} {float(value):.4g} is worse than the "
                          "median of the earlier trials there", flush=True)
                    stop = True
        if trainer.world_size > 1:  # every rank stops together
            stop = trainer.strategy.broadcast(stop, src=0)
        if stop:
            trainer.should_stop = True
