"""EleutherAI's lm-evaluation-harness on the step's model: `lm_eval.simple_evaluate` with the `hf` backend.

The harness gets the model llmcycle already loaded (an `HFLM` around it), so every model reference works the
same way: a step's output, a peft adapter on its base, `hf:ID`, a folder, a registered model. Tasks are found
in llmcycle's own folder (components/lib/assets/harness_tasks: offline tasks over data that ships with the
project), in the spec's `include_path`, and, only when a task is in neither, in the harness's registry (hub
datasets: those need the network). Every figure the harness reports becomes a metric
`lm_eval/<task>/<metric>` (`<metric>.<filter>` when the filter is not `none`; `<metric>_stderr` as the
harness names it); its whole result is logged as `lm_eval.json`.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

from components.lib.io import write_json_atomic

TASKS_FOLDER = Path(str(resources.files("components.lib.assets") / "harness_tasks"))


def task_manager(include_path: Path | None, tasks: list[str]):
    """A TaskManager over llmcycle's tasks and `include_path`; the harness's own registry (thousands of YAML files,
    seconds to index) only when a task is in neither."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_FOLDER)] + ([str(include_path)] if include_path is not None else [])
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        from schemas.errors import did_you_mean

        raise ValueError(f"lm_eval.tasks: unknown task {unknown[0]!r}{did_you_mean(unknown[0], manager.all_tasks)} "
                         f"(llmcycle's own: {', '.join(sorted(local.all_tasks))})")
    return manager


def flatten(results: dict) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` for every number in the harness's `results` table."""
    out = {}
    for task, figures in results.get("results", {}).items():
        for key, value in figures.items():
            if key == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}.{filt}"
            if math.isfinite(value):
                out[f"lm_eval/{task}/{name}"] = float(value)
    return out


def evaluate(model, tokenizer, spec, include_path: Path | None, out_dir: Path, seed: int,
             max_length: int) -> tuple[dict[str, float], dict]:
    """Run the harness; (metrics, its full result). Writes `lm_eval.json` into out_dir."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    if include_path is not None and not include_path.is_dir():
        raise FileNotFoundError(f"lm_eval.include_path: {include_path} is not a folder")
    manager = task_manager(include_path, spec.tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size, max_length=max_length)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot,
                                      limit=spec.limit, task_manager=manager, log_samples=False,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, bootstrap_iters=1000)
    full = json.loads(json.dumps(results, default=handle_non_serializable))
    write_json_atomic(out_dir / "lm_eval.json", full)
    return flatten(full), full
