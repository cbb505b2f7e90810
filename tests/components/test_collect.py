"""The collect step and filled sheets read back by reward_model: anonymity, the round trip, exact pair counts,
FILE:LINE errors, and reward models from rankings and from ratings at an equal labelling budget."""

from __future__ import annotations

import csv
import json
import random
from itertools import combinations
from pathlib import Path

import pytest
import torch

from components import collect
from components.lib import sheets
from components.lib.evaluation import exact_match
from schemas.rows import DataProblems
from schemas.steps.collect import CollectSpec
from schemas.steps.reward_model import RewardModelSpec
from tests.conftest import check_contract, finish, make_ctx

TASKS = ["sentiment", "polite"]


@pytest.fixture
def one_thread():
    """One intra-op thread: on two shared cores a second one mostly waits (10x slower steps under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_collect(tmp: Path, policy: Path, seed: int = 0, name: str = "labels", **settings):
    spec = CollectSpec(kind="collect", policy=str(policy), **{
        "prompts": {"builtin": "tasks", "tasks": TASKS, "n_per_task": 6}, "max_new_tokens": 5, **settings})
    ctx = make_ctx(tmp, name=name, kind="collect", seed=seed)
    out = collect.run(spec, ctx)
    check_contract(spec, out)
    return spec, finish(ctx, out), out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_key(result) -> list[dict]:
    return [json.loads(line) for line in open(result.path("key") / sheets.KEY_FILE)]


# -- the sheet ---------------------------------------------------------------------------------------


def test_sheet_is_shuffled_anonymised_and_seeded(tiny_lm, tmp_path, one_thread):
    spec, result, out = run_collect(tmp_path, tiny_lm, completions=4)
    sheet_csv = read_csv(result.path("sheet") / sheets.SHEET_CSV)
    sheet_jsonl = [json.loads(line) for line in open(result.path("sheet") / sheets.SHEET_JSONL)]
    key = read_key(result)
    # the labeller sees the prompt, an id that says only where a row sits, the completion and an empty column
    assert list(sheet_csv[0]) == ["id", "prompt_id", "label", "prompt", "completion", "rank"]
    assert all(r["rank"] == "" for r in sheet_csv) and all(r["rank"] is None for r in sheet_jsonl)
    assert [r["id"] for r in sheet_csv] == [r["id"] for r in sheet_jsonl] == [k["id"] for k in key]
    assert [r["completion"] for r in sheet_csv] == [k["completion"] for k in key]  # CSV keeps the exact text
    assert sheet_csv[0]["id"] == "p001-A" and {"answer", "task", "draw"}.isdisjoint(sheet_jsonl[0])
    assert result.path("key") != result.path("sheet") and not (result.path("sheet") / sheets.KEY_FILE).exists()
    # shuffled: prompts leave their source order, completions their draw order
    source = [r["prompt"] for r in collect.choose_prompts(spec, make_ctx(tmp_path, "probe"), None)]
    shown = list(dict.fromkeys(k["prompt"] for k in key))
    assert shown != [p for p in source if p in shown]
    draws = [[k["draw"] for k in key if k["prompt_id"] == p] for p in dict.fromkeys(k["prompt_id"] for k in key)]
    assert any(d != sorted(d) for d in draws)
    # a random model's 5-token samples do not repeat: every prompt keeps its 4 completions
    assert out.metrics["collect/duplicates"] == 0 and len(key) == 4 * out.metrics["collect/prompts"] == 4 * len(source)
    # seeded: the same seed writes the same files, another seed another order
    _, again, _ = run_collect(tmp_path, tiny_lm, name="again", completions=4)
    assert (again.path("key") / sheets.KEY_FILE).read_text() == (result.path("key") / sheets.KEY_FILE).read_text()
    _, other, _ = run_collect(tmp_path, tiny_lm, seed=1, name="other", completions=4)
    assert read_key(other) != key


def test_identical_completions_are_left_out():
    assert sheets.distinct([" a\n", "a", " b", "b ", "c"]) == [0, 2, 4]
    sheet, key, duplicates = sheets.make_sheet([{"prompt": "P1"}, {"prompt": "P2"}], [["x", " x", "y"], ["z", "z"]],
                                               "rate", seed=0)
    assert duplicates == 2 and {k["prompt"] for k in key} == {"P1"} and len(sheet) == 2  # P2 had one text left
    assert all(r["rating"] is None for r in sheet) and all(k["mode"] == "rate" for k in key)


def test_csv_cells_hold_any_text_and_lines_are_where_records_start(tmp_path):
    from schemas.rows import csv_records

    texts = [[' a, "b"\r\nc', "\rx\x1dy\u2028z", "plain"]]
    sheet, key, _ = sheets.make_sheet([{"prompt": "Say:\nAnswer:"}], texts, "rank", seed=0)
    sheets.write_sheet(tmp_path, sheet, "rank")
    records = list(csv_records(tmp_path / sheets.SHEET_CSV))
    assert [r["completion"] for _, r, _ in records] == [k["completion"] for k in key] == \
        [r["completion"] for r in read_csv(tmp_path / sheets.SHEET_CSV)]
    lines = (tmp_path / sheets.SHEET_CSV).read_bytes().decode().split("\n")
    assert all(lines[n - 1].startswith(r["id"] + ",") for n, r, _ in records)


# -- reading filled sheets back ----------------------------------------------------------------------


def fill(result, folder: Path, raters: list[dict], truth, mode: str) -> list[Path]:
    """One filled copy of the sheet per rater (CSV, JSONL alternately); rater i labels every len(raters)-th
    prompt from its own view: quality = 2 truth + offset + noise, reported as a rank or a 1-5 rating."""
    key = {k["id"]: k for k in read_key(result)}
    rows = read_csv(result.path("sheet") / sheets.SHEET_CSV)
    column = sheets.COLUMN[mode]
    prompt_ids = list(dict.fromkeys(r["prompt_id"] for r in rows))
    paths = []
    for i, rater in enumerate(raters):
        rng = random.Random(f"rater{i}")
        mine = set(prompt_ids[i::len(raters)])
        view = {r["id"]: 2 + 2 * truth(key[r["id"]]) + rng.gauss(0, rater["noise"]) for r in rows}
        filled = []
        for r in rows:
            label = ""
            if r["prompt_id"] in mine:
                seen = round(view[r["id"]] + rater["offset"])
                if mode == "rate":
                    label = min(5, max(1, seen))
                else:  # 1 + how many of its prompt's completions look better (equal: a tie)
                    same = [round(view[o["id"]]) for o in rows if o["prompt_id"] == r["prompt_id"]]
                    label = 1 + sum(s > round(view[r["id"]]) for s in same)
            filled.append({**r, column: label})
        path = folder / f"rater{i}.{'csv' if i % 2 == 0 else 'jsonl'}"
        if path.suffix == ".csv":
            write_csv(path, filled)
        else:
            path.write_text("".join(json.dumps({**r, column: r[column] if r[column] != "" else None}) + "\n"
                                    for r in filled))
        paths.append(path)
    return paths


def exact_truth(key_row: dict) -> float:
    return float(exact_match(key_row["completion"], key_row["row"]["answer"]))


def all_pairs_expected(result, paths: list[Path], mode: str, min_gap: int = 1) -> tuple[int, int]:
    """(k(k-1)/2 summed over every labelled (file, prompt) group, the ties among them), counted here by hand."""
    key = {k["id"]: k for k in read_key(result)}
    total = ties = 0
    column = sheets.COLUMN[mode]
    for path in paths:
        rows = read_csv(path) if path.suffix == ".csv" else [json.loads(line) for line in open(path)]
        groups: dict[str, list[int]] = {}
        for r in rows:
            if r[column] not in ("", None):
                groups.setdefault(key[r["id"]]["prompt_id"], []).append(int(r[column]))
        for labels in groups.values():
            total += len(labels) * (len(labels) - 1) // 2
            ties += sum(abs(a - b) < (min_gap if mode == "rate" else 1) for a, b in combinations(labels, 2))
    return total, ties


def test_round_trip_gives_exactly_the_pairs_of_each_prompt(tiny_lm, tmp_path, one_thread):
    _, result, _ = run_collect(tmp_path, tiny_lm, completions=4)
    paths = fill(result, tmp_path, [{"offset": 0, "noise": 0.0}, {"offset": 1, "noise": 0.0}],
                 lambda k: k["draw"] % 2, "rank")  # a truth that ties: draws 0 and 2 are as good, 1 and 3 better
    total, ties = all_pairs_expected(result, paths, "rank")
    labels = sheets.load_sheet(paths, result.path("key"), "rank", seed=0, eval_fraction=0.25)
    c = labels.counts
    assert c["data/ties"] == ties > 0 and len(labels.train) + len(labels.held) == total - ties
    assert c["data/sheet_blank_prompts"] == 0 and c["data/sheet_rows"] == len(read_key(result))
    held_prompts, train_prompts = {p["prompt"] for p in labels.held}, {p["prompt"] for p in labels.train}
    assert held_prompts and not held_prompts & train_prompts  # whole prompts are held out
    # every pair prefers the better draw (the raters' offsets do not move ranks); texts come from the key
    draw = {(k["prompt"], k["completion"]): k["draw"] for k in read_key(result)}
    assert all(draw[(p["prompt"], p["chosen"])] % 2 > draw[(p["prompt"], p["rejected"])] % 2 and p["score"] == 1
               for p in labels.train + labels.held)
    soft = sheets.load_sheet(paths, result.path("key"), "rank", seed=0, eval_fraction=0.25, ties="soft")
    assert len(soft.train) == len(labels.train) + sum(p["score"] == 0.5 for p in soft.train) > len(labels.train)
    assert soft.held == labels.held  # held-out ties are left out either way


def test_ratings_become_pairs_by_difference_or_points(tiny_lm, tmp_path, one_thread):
    _, result, _ = run_collect(tmp_path, tiny_lm, completions=3, mode="rate")
    paths = fill(result, tmp_path, [{"offset": 0, "noise": 1.0}], lambda k: k["draw"] / 2, "rate")
    for gap in (1, 2):
        total, ties = all_pairs_expected(result, paths, "rate", gap)
        labels = sheets.load_sheet(paths, result.path("key"), "rate", 0, 0.25, min_gap=gap)
        assert labels.counts["data/ties"] == ties and len(labels.train) + len(labels.held) == total - ties
    points = sheets.load_sheet(paths, result.path("key"), "rate", 0, 0.25, loss="mse")
    assert {p["target"] for p in points.train} <= {-1.0, -0.5, 0.0, 0.5, 1.0}
    train_prompts = {p["prompt"] for p in points.train}
    assert len(points.train) == 3 * len(train_prompts) and train_prompts.isdisjoint(p["prompt"] for p in points.held)
    assert sheets.rating_target(5) == 1 and sheets.rating_target(1) == -1 and sheets.rating_target(3) == 0


def test_bad_filled_sheets_are_file_line_errors_before_training(tiny_lm, tmp_path, one_thread):
    from schemas.rows import data_problems

    _, result, _ = run_collect(tmp_path, tiny_lm, completions=3)
    rows = read_csv(result.path("sheet") / sheets.SHEET_CSV)
    p1 = [r for r in rows if r["prompt_id"] == "p001"]
    filled = [{**r, "rank": str(i + 1)} for i, r in enumerate(p1)]
    filled[1]["rank"] = ""                                       # line 3: a blank among ranked ones
    p2 = [{**r, "rank": "9" if r["label"] == "A" else "1"} for r in rows if r["prompt_id"] == "p002"]  # rank > k
    bad_id = {**p2[1], "id": "p002-Z"}                            # not on the key
    rating = {**p2[2], "rank": "0"}                              # ranks start at 1
    path = tmp_path / "filled.csv"
    write_csv(path, filled + [p2[0], bad_id, rating])
    with pytest.raises(DataProblems) as err:
        sheets.load_sheet([path], result.path("key"), "rank", 0, 0.25)
    problems = err.value.problems
    lines = path.read_bytes().decode().split("\n")  # the line numbers editors show

    def line_of(fragment: str, row_id: str) -> None:  # the message names the line where that row's record starts
        found = [p for p in problems if fragment in p]
        assert len(found) == 1, (fragment, problems)
        n = int(found[0].removeprefix(f"{path}:").split(":", 1)[0])
        assert lines[n - 1].startswith(row_id + ","), (found[0], lines[n - 1])

    line_of("rank is blank, but other completions of prompt p001 are labelled; label every completion", p1[1]["id"])
    line_of("id 'p002-Z' is not on the sheet's key", "p002-Z")
    line_of('rank: ranks start at 1 (the best completion of its prompt) (got "0")', rating["id"])
    line_of("rank 9, but prompt p002 has 3 completions (ranks go from 1 = best to 3)", p2[0]["id"])
    assert f"{path}: prompt p002 is labelled but its completion(s) B, C are not in the file; label every completion of a prompt, or none" in problems, problems
    assert len(problems) == 5
    # the row checks also run before the step starts (flows/step.py, `llmcycle validate --data`)
    rated = tmp_path / "rated.jsonl"
    rated.write_text("\n".join(json.dumps({"id": r["id"], "rating": v}) for r, v in zip(p1, (7, 2, 3))))
    spec = RewardModelSpec(kind="reward_model", model="x", data={"sheet": {"files": ["rated.jsonl", "filled.csv"],
                                                                           "key": "labels", "mode": "rank"}})
    before = data_problems(spec, lambda p: tmp_path / p)
    assert f"{rated}:1: rating: ratings go from 1 (worst) to 5 (best) (got 7)" in before
    assert [p for p in before if p.startswith(str(path))] == [p for p in problems if "ranks start at 1" in p]
    with pytest.raises(ValueError, match="data.sheet.mode is 'rate' but the key holds a 'rank' sheet"):
        sheets.load_sheet([path], result.path("key"), "rate", 0, 0.25)
    twice = tmp_path / "twice.jsonl"
    twice.write_text("\n".join(json.dumps({"id": r["id"], "rank": i + 1}) for i, r in enumerate(p1 + p1[:1])))
    with pytest.raises(DataProblems, match=rf"{twice}:4: id 'p001-A' appears twice in this file \(first at {twice}:1\)"):
        sheets.load_sheet([twice], result.path("key"), "rank", 0, 0.25)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("\n".join(json.dumps({"id": r["id"], "rating": 3}) for r in p1))
    with pytest.raises(DataProblems, match=rf"{wrong}:1: no rank column, a rating one"):
        sheets.load_sheet([wrong], result.path("key"), "rank", 0, 0.25)


# -- ratings against rankings ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_policy(tiny_lm, tmp_path_factory) -> Path:
    """tiny_lm after 60 SFT steps on sentiment and polite: it answers in the format and is right about a third
    of the time, so its samples hold good and bad completions to label."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.lib.sft import collate, encode_rows
    from components.lib.tasks import make_examples

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm)
    rows = encode_rows(make_examples(0, "train", 200, TASKS), tok, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(60):
        batch = collate(rng.sample(rows, 16), tok.pad_token_id)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("sft_policy")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def truth_pairs(result) -> list[dict]:
    """Every pair of one prompt's completions where exactly one is right (exact match), the right one chosen."""
    groups: dict[str, list[dict]] = {}
    for k in read_key(result):
        groups.setdefault(k["prompt_id"], []).append(k)
    pairs = []
    for group in groups.values():
        for a, b in combinations(group, 2):
            if exact_truth(a) != exact_truth(b):
                win, lose = (a, b) if exact_truth(a) > exact_truth(b) else (b, a)
                pairs.append({"prompt": a["prompt"], "chosen": win["completion"], "rejected": lose["completion"]})
    return pairs


def truth_accuracy(folder: Path, pairs: list[dict]) -> float:
    """Pairwise accuracy of a saved reward model on ground-truth pairs."""
    from torch.utils.data import DataLoader

    from components.lib.preferences import collate_pairs, encode_pairs
    from components.lib.rewards import load_reward_model
    from components.reward_model import evaluate_pairs

    model, tok = load_reward_model(str(folder))
    loader = DataLoader(encode_pairs(pairs, tok, 128), batch_size=64,
                        collate_fn=lambda rows: collate_pairs(rows, tok.pad_token_id))
    return evaluate_pairs(model, loader)["val/accuracy"]


RATERS = [{"offset": -1, "noise": 0.7}, {"offset": 0, "noise": 0.7}, {"offset": 1, "noise": 0.7}]


def test_reward_models_from_rankings_and_ratings_at_an_equal_budget(sft_policy, tmp_path, one_thread):
    """The same three labellers (each with an offset and noise) label the same completions once each, as ranks
    or as ratings; each reward model is scored on ground-truth pairs of fresh samples on held-out task keys."""
    from components import reward_model
    from components.lib.tasks import make_examples

    prompts = {"builtin": "tasks", "tasks": TASKS, "n_per_task": 64}
    sheets_of, files = {}, {}
    for mode in ("rank", "rate"):
        _, sheets_of[mode], _ = run_collect(tmp_path, sft_policy, name=f"{mode}_sheet", mode=mode, completions=4,
                                            prompts=prompts, max_new_tokens=6)
        (tmp_path / mode).mkdir()
        files[mode] = fill(sheets_of[mode], tmp_path / mode, RATERS, exact_truth, mode)
    key = read_key(sheets_of["rank"])
    budget = len(key)  # completions labelled, each by one labeller, in both forms
    assert [(k["prompt"], k["completion"]) for k in key] == \
        [(k["prompt"], k["completion"]) for k in read_key(sheets_of["rate"])]
    right = sum(map(exact_truth, key)) / budget
    assert 0.1 < right < 0.9, right  # good and bad completions to tell apart
    held_keys = [{"prompt": r["prompt"], "answer": r["answer"]} for r in make_examples(0, "eval", 40, TASKS)]
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_keys))
    _, fresh, _ = run_collect(tmp_path, sft_policy, name="fresh", completions=4, max_new_tokens=6,
                              prompts={"files": ["held_out.jsonl"]})
    truth = truth_pairs(fresh)

    runs = (("rm_ranks", "rankings -> pairs", "rank", {}, "rank_sheet"),
            ("rm_rate_pairs", "ratings -> pairs (default)", "rate", {},
             str(sheets_of["rate"].path("key") / sheets.KEY_FILE)),
            ("rm_rate_mse", "ratings -> mse", "rate", {"loss": "mse"}, "rate_sheet"))
    report = []
    for step, name, mode, extra, key_ref in runs:
        spec = RewardModelSpec(kind="reward_model", model=str(sft_policy), optimizer={"lr": 2e-3}, batch_size=16,
                               max_steps=80, val_every=80, val_batches=4,
                               data={"sheet": {"files": [f"{mode}/*"], "key": key_ref, "mode": mode, **extra},
                                     "eval_fraction": 0.25})
        ctx = make_ctx(tmp_path, name=step, kind="reward_model", upstream={f"{mode}_sheet": sheets_of[mode]})
        out = reward_model.run(spec, ctx)
        check_contract(spec, out)
        m = out.metrics
        assert m["data/sheet_rows"] == budget and m["data/sheet_blank_prompts"] == 0
        if "loss" not in extra:  # the pairs are exactly those of every labelled prompt, less the ties
            total, ties = all_pairs_expected(sheets_of[mode], files[mode], mode)
            assert m["data/ties"] == ties and m["data/train_pairs"] + m["data/eval_pairs"] == total - ties
        else:
            assert 0 < m["data/train_ratings"] < budget and "data/train_pairs" not in m
        report.append((name, m["data/train_ratings" if "loss" in extra else "data/train_pairs"],
                       m["val/accuracy"], truth_accuracy(finish(ctx, out).path("reward_model"), truth)))
    print(f"\nreward models from {budget} labelled completions of {budget and len({k['prompt_id'] for k in key})} "
          f"prompts (k=4 before duplicates; {right:.0%} right), 3 labellers (offsets -1/0/+1, noise sd 0.7), "
          f"80 steps each; ground truth: {len(truth)} pairs of fresh samples on held-out task keys")
    print(f"{'labels':28} {'trained on':>10} {'held-out sheet pairs':>21} {'ground-truth pairs':>19}")
    for name, n, val, gt in report:
        print(f"{name:28} {n:>10} {val:>21.3f} {gt:>19.3f}")
    assert len(truth) >= 30 and all(r[3] > 0.5 for r in report)  # each learned something of the truth


def test_sheet_section_errors():
    def rm(sheet: dict, **settings):
        return RewardModelSpec(kind="reward_model", model="sft", data={"sheet": sheet}, **settings)

    base = {"files": ["filled.csv"], "key": "labels"}
    assert rm({**base, "key": "./key.jsonl", "mode": "rank"}).input_globs() == ["filled.csv", "./key.jsonl"]
    for sheet, settings, message in (
            ({**base, "key": "hf:org/model", "mode": "rank"}, {}, "key: a collect step's name or a key file"),
            ({**base, "mode": "rank", "min_gap": 2}, {}, "min_gap applies to mode: rate only"),
            ({**base, "mode": "rate", "loss": "mse", "ties": "soft"}, {}, "ties applies to pairs"),
            ({**base, "mode": "rank", "ties": "soft"}, {"soft_labels": False}, "ties: soft .* needs soft_labels"),
            ({**base, "mode": "rate", "loss": "mse"}, {"margin": 1.0}, "margin and center_coef shape the pairwise"),
            ({**base, "mode": "grade"}, {}, "mode"), ({"files": ["f.csv"], "mode": "rank"}, {}, "key")):
        with pytest.raises(ValueError, match=message):
            rm(sheet, **settings)
    with pytest.raises(ValueError, match="exactly one of files, builtin, step, sheet"):
        RewardModelSpec(kind="reward_model", model="sft", data={"builtin": "preferences", "sheet": {**base,
                                                                                                  "mode": "rank"}})
