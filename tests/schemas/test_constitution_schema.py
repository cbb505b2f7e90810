"""The constitution file schema: the shipped file loads; mistakes name FILE:LINE:COL."""

import json
import textwrap

import pytest

from components.lib import assets
from schemas.constitution import load_constitution
from schemas.errors import SpecError

GOOD = """\
principles:
  - name: polite
    critique: Say what is rude.
    revision: Rewrite it politely.
    comparison: Which reply is polite?
"""


def write(tmp_path, text):
    path = tmp_path / "constitution.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_default_constitution_loads_and_examples_name_known_principles():
    c = load_constitution(assets.path("constitution.yaml"))
    assert len(c.principles) >= 8
    assert {"polite", "harmless", "honest"} <= {p.name for p in c.principles}
    assert c.examples and all(r.principle in {p.name for p in c.principles} for t in c.examples for r in t.rounds)


def test_red_team_prompts_exercise_every_principle():
    names = {p.name for p in load_constitution(assets.path("constitution.yaml")).principles}
    rows = [json.loads(line) for line in (assets.path("constitution.yaml").parent / "red_team.jsonl").read_text().splitlines()]
    assert {r["principle"] for r in rows} == names
    assert all(r["prompt"] and r["chosen"] != r["rejected"] for r in rows)


def test_unknown_key_names_its_line_and_suggests(tmp_path):
    path = write(tmp_path, GOOD + "    critque: typo here\n")
    with pytest.raises(SpecError) as err:
        load_constitution(path)
    text = str(err.value)
    assert f"{path}:6:5: principles[0].critque: unknown key 'critque' (did you mean 'critique'?)" in text


def test_missing_field_and_empty_value_name_their_lines(tmp_path):
    path = write(tmp_path, GOOD + """\
  - name: honest
    critique: ""
    revision: Be honest.
""")
    with pytest.raises(SpecError) as err:
        load_constitution(path)
    text = str(err.value)
    assert f"{path}:6:5: principles[1]: missing required field 'comparison'" in text
    assert f"{path}:7:15: principles[1].critique: String should have at least 1 character" in text


def test_duplicate_principle_names(tmp_path):
    path = write(tmp_path, GOOD + GOOD.split("\n", 1)[1])
    with pytest.raises(SpecError) as err:
        load_constitution(path)
    assert f"{path}:2:3: principles: principle name 'polite' is used twice" in str(err.value)


def test_example_must_name_a_defined_principle(tmp_path):
    path = write(tmp_path, GOOD + """\
examples:
  - prompt: hi
    response: go away
    rounds:
      - {principle: polit, critique: rude, revision: hello}
""")
    with pytest.raises(SpecError, match="principle 'polit', which is not defined \\(did you mean 'polite'\\?\\)"):
        load_constitution(path)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "principles:\n  - name: [unclosed\n")
    with pytest.raises(SpecError, match=r"constitution.yaml:\d+:\d+: YAML syntax error"):
        load_constitution(path)
