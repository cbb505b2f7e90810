"""The metric table (schemas/metrics.py) is the README's, and covers every step kind."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from schemas.metrics import METRICS, table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_shows_the_table_the_gates_are_checked_against():
    region = re.search(r"<!-- figures:metrics -->\n(.*?)\n<!-- /figures:metrics -->", README.read_text(), re.S)
    assert region is not None, "README.md lost its <!-- figures:metrics --> region"
    assert region.group(1) == table(), "README's metric table is stale: run .venv/bin/python docs/figures.py --only metrics"


def test_every_kind_has_metrics_and_names_follow_the_scheme():
    from schemas.pipeline import Step

    kinds = {typing.get_args(t.model_fields["kind"].annotation)[0]
             for t in typing.get_args(typing.get_args(Step)[0])}
    assert kinds == set(METRICS)
    for kind, metrics in METRICS.items():
        names = [m.name for m in metrics]
        assert len(names) == len(set(names)), kind
        assert "time/seconds" in names, kind  # the engine's, for every kind
        for name in names:
            assert re.fullmatch(r"[a-z0-9_{}]+(/[a-z0-9_{}*]+)+", name), f"{kind}: {name} is not <group>/<name>"
