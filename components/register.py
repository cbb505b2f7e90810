"""`register`: log a model with MLflow's transformers flavor (an encoder-decoder: as the pyfunc generator of
components/lib/seq2seq_serving.py) and register it; move aliases by a metric gate.

Reads: `model` (a model folder, hub id or `models:/` URI; a peft adapter is merged into its base) and the
metrics of the steps the gate and `evidence` name. Registers: a new version of `name` in the registry of
the pipeline's tracking store, tagged with the spec, step, fingerprint, git commit and the metrics. Moves
`candidate` to every new version and `alias` (default `champion`) only when every gate condition holds
and, with `beat_champion`, the model beats the version holding the alias now.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from components.lib.context import StepContext, StepOutput
from components.lib.mlflow_models import git_commit, pip_requirements, seq2seq_pyfunc
from schemas.steps.register import Condition, Operand, RegisterSpec, parse_operand

CANDIDATE = "candidate"
COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
           "!=": operator.ne}
# Generation settings a caller may pass at /invocations ("params"); MLflow rejects params not in the signature.
SERVING_PARAMS = {"max_new_tokens": 32, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                  "num_beams": 1, "return_full_text": False}


@dataclass
class Check:
    """One gate condition, evaluated: what it says, whether it held, and the values behind the answer."""

    text: str
    passed: bool
    why: str

    def __str__(self) -> str:
        return f"[{'pass' if self.passed else 'FAIL'}] {self.text}: {self.why}"


def run(spec: RegisterSpec, ctx: StepContext) -> StepOutput:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ctx.tracking_uri, registry_uri=ctx.tracking_uri)
    metrics = {name: ctx.step(name).metrics for name in _metric_steps(spec)}
    champion = _current(client, spec.name, spec.alias)
    checks = [evaluate(c, metrics) for c in spec.conditions()]
    if spec.beat_champion is not None:
        checks.append(_beats(spec, metrics, champion))
    passed = all(c.passed for c in checks)

    version = log_and_register(spec, ctx, client)
    client.set_registered_model_alias(spec.name, CANDIDATE, version.version)
    tags = {**_provenance(ctx), **_metric_tags(spec, metrics), "llmcycle.gate": "passed" if passed else "failed",
            "llmcycle.gate_report": "\n".join(map(str, checks))[:4000] or "no gate"}
    for key, value in tags.items():
        client.set_model_version_tag(spec.name, version.version, key, value)
    if passed:
        client.set_registered_model_alias(spec.name, spec.alias, version.version)
    report = _report(spec, version.version, checks, passed, champion)
    print(report)
    if not passed and spec.on_fail == "stop":
        raise RuntimeError("; ".join(line.strip() for line in report.splitlines()))
    uri = f"models:/{spec.name}/{version.version}"
    return StepOutput(metrics={"gate/passed": float(passed), "registry/version": float(version.version)},
                      info={"model_uri": uri, "name": spec.name, "version": int(version.version),
                            "promoted": passed, "alias": spec.alias if passed else CANDIDATE,
                            "gate": [str(c) for c in checks]})


def _metric_steps(spec: RegisterSpec) -> list[str]:
    steps = [s for c in spec.conditions() for s in c.steps()] + list(spec.evidence)
    if spec.beat_champion is not None:
        steps.append(parse_operand(spec.beat_champion.metric).step)
    return list(dict.fromkeys(steps))


def value(operand: Operand, metrics: dict[str, dict[str, float]]) -> float:
    """The number an operand stands for; a metric the step did not report is an error, not a failed gate."""
    if operand.step is None:
        return operand.number
    have = metrics[operand.step]
    if operand.metric not in have:
        raise ValueError(f"gate: step '{operand.step}' reported no metric '{operand.metric}'; it reported: "
                         f"{', '.join(sorted(have)) or 'none'}")
    x = have[operand.metric]
    return {"+": x + operand.k, "-": x - operand.k, "*": x * operand.k}.get(operand.op, x)


def evaluate(condition: Condition, metrics: dict[str, dict[str, float]]) -> Check:
    """Evaluate one condition and explain it with the actual values."""
    left, right = value(condition.left, metrics), value(condition.right, metrics)
    ok = COMPARE[condition.op](left, right)
    values = [f"{o} = {v:.6g}" for o, v in ((condition.left, left), (condition.right, right)) if o.step is not None]
    why = ", ".join(values) + f", so {left:.6g} {condition.op} {right:.6g} is {'true' if ok else 'false'}"
    return Check(condition.text, ok, why)


def _current(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model or alias yet
        return None


def _beats(spec: RegisterSpec, metrics: dict, champion) -> Check:
    rule = spec.beat_champion
    text = f"beats {spec.alias} on {rule.metric} by at least {rule.by:g} ({rule.mode})"
    mine = value(parse_operand(rule.metric), metrics)
    if champion is None:
        return Check(text, True, f"no version holds '{spec.alias}' yet; {rule.metric} = {mine:.6g}")
    theirs = champion.tags.get(f"metric.{rule.metric}")
    if theirs is None:
        return Check(text, False, f"{spec.alias} (version {champion.version}) has no tag metric.{rule.metric} "
                                  "to compare with")
    theirs = float(theirs)
    gain = theirs - mine if rule.mode == "min" else mine - theirs
    return Check(text, gain >= rule.by, f"this model {mine:.6g}, {spec.alias} v{champion.version} {theirs:.6g}: "
                                        f"improvement {gain:.6g} {'>=' if gain >= rule.by else '<'} {rule.by:g}")


def log_and_register(spec: RegisterSpec, ctx: StepContext, client):
    """Log the merged model (tokenizer included) to the step's run and register it; return the ModelVersion.

    Saved locally and uploaded through the client rather than with mlflow's fluent API, which would set the
    process-wide tracking URI (and MLFLOW_TRACKING_URI) under every later pipeline in the same process.
    """
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    from components.lib.models import load_model, save_pretrained

    model, tokenizer = load_model(ctx.model_source(spec.model))
    run_id = ctx.run_id or _own_run(ctx, client)
    signature = infer_signature(["a prompt"], ["a completion"], params=SERVING_PARAMS)
    with tempfile.TemporaryDirectory(dir=ctx.out_dir) as tmp:
        if model.config.is_encoder_decoder:  # t5: a pyfunc generator around its folder (lib/seq2seq_serving.py)
            mlflow.pyfunc.save_model(f"{tmp}/model", **seq2seq_pyfunc(save_pretrained(model, tokenizer,
                                                                                     f"{tmp}/folder")))
        else:
            mlflow.transformers.save_model({"model": model, "tokenizer": tokenizer}, f"{tmp}/model",
                                           task="text-generation", signature=signature,
                                           pip_requirements=pip_requirements())
        client.log_artifacts(run_id, f"{tmp}/model", "model")
    try:
        client.create_registered_model(spec.name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(spec.name, f"runs:/{run_id}/model", run_id=run_id,
                                          description=spec.description or None)
    if not ctx.run_id:
        client.set_terminated(run_id)
    return version


def _own_run(ctx: StepContext, client) -> str:
    """A run to log into when the step is called outside the engine (which normally provides one)."""
    found = client.get_experiment_by_name(ctx.pipeline_name)
    experiment = found.experiment_id if found else client.create_experiment(ctx.pipeline_name)
    return client.create_run(experiment, run_name=ctx.name).info.run_id


def _provenance(ctx: StepContext) -> dict[str, str]:
    commit = git_commit(ctx.base_dir)
    tags = {"llmcycle.spec": ctx.pipeline_name, "llmcycle.step": ctx.name, "llmcycle.fingerprint": ctx.fingerprint}
    if ctx.run_id:
        tags["llmcycle.run_id"] = ctx.run_id
    return {**tags, "llmcycle.git_commit": commit} if commit else tags


def _metric_tags(spec: RegisterSpec, metrics: dict[str, dict[str, float]]) -> dict[str, str]:
    """`metric.STEP.METRIC` tags: every metric of the evidence steps, and each metric the gate reads."""
    tags = {f"metric.{s}.{k}": f"{v:.6g}" for s in spec.evidence for k, v in metrics[s].items()}
    operands = [o for c in spec.conditions() for o in (c.left, c.right) if o.step is not None]
    if spec.beat_champion is not None:
        operands.append(parse_operand(spec.beat_champion.metric))
    for o in operands:
        if o.metric in metrics[o.step]:
            tags[f"metric.{o.step}.{o.metric}"] = f"{metrics[o.step][o.metric]:.6g}"
    return tags


def _report(spec: RegisterSpec, version: str, checks: list[Check], passed: bool, champion) -> str:
    head = f"registered {spec.name} version {version} (alias '{CANDIDATE}')"
    lines = [head] + [f"  {c}" for c in checks]
    if passed:
        lines.append(f"  gate passed: '{spec.alias}' -> version {version}")
    else:
        where = f"version {champion.version}" if champion else "no version"
        lines.append(f"  gate failed: '{spec.alias}' not moved (stays on {where})")
    return "\n".join(lines)
