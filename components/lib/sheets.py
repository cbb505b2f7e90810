"""Labelling sheets: the `collect` step writes them, people fill them in, `reward_model` reads them back.

The sheet (`sheet/sheet.csv` and `sheet/sheet.jsonl`, the same rows) has one row per completion:

    id,prompt_id,label,prompt,completion,rank          (or `rating` with mode: rate)
    p001-A,p001,A,"Review: the soup was awful.\\nAnswer:"," negative\\n",

Prompts are in a seeded random order and so are the completions within a prompt, labelled A, B, C, ...;
the id `p001-A` says only where a row sits on the sheet. The labeller fills the last column: a rank (1 =
best; equal ranks for completions they cannot tell apart) or a rating from 1 (worst) to 5 (best). The CSV
opens in any spreadsheet (save it back as CSV UTF-8); the JSONL takes `"rank": 2`. Each labeller fills a
copy; prompts nobody labelled may stay blank or be deleted, but a prompt is labelled whole or not at all.

The key (`key/key.jsonl`, not for the labeller) maps each id to its draw (`draw`: the order it was sampled
in), the exact prompt and completion texts, and the prompt row's other fields (a builtin task's `answer`).
Reading back takes the texts from the key, so a spreadsheet that trims a cell changes nothing.

Back into training data (one (file, prompt) group at a time, so a labeller's habits cancel):
- ranks: every pair of the group's k completions, k(k-1)/2, the better-ranked one chosen; equal ranks tie;
- ratings as pairs: every pair whose ratings differ by at least `min_gap`; a smaller difference ties;
- ratings pointwise (`mse`): each rated completion with the target (rating - 3) / 2, in [-1, 1].
Ties are dropped, or (`ties: soft`) kept as pairs with score p = 0.5. Held-out prompts (a seeded
`eval_fraction` of whole prompts) give held-out pairs, ties always left out.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from components.lib.io import read_jsonl, split_rows, write_jsonl, write_text_atomic
from schemas.rows import MAX_PER_FILE, RATINGS, DataProblems, sheet_rows

SHEET_CSV, SHEET_JSONL, KEY_FILE, INSTRUCTIONS = "sheet.csv", "sheet.jsonl", "key.jsonl", "INSTRUCTIONS.txt"
COLUMN = {"rank": "rank", "rate": "rating"}  # the column the labeller fills, by mode
SHOWN = ("id", "prompt_id", "label", "prompt", "completion")
KEY_FIELDS = ("id", "mode", "prompt_id", "label", "draw", "prompt", "completion")


def distinct(texts: list[str]) -> list[int]:
    """Indices of the texts unequal (up to whitespace) to an earlier one."""
    seen, keep = set(), []
    for i, text in enumerate(texts):
        norm = " ".join(text.split())
        if norm not in seen:
            seen.add(norm)
            keep.append(i)
    return keep


def make_sheet(rows: list[dict], completions: list[list[str]], mode: str, seed: int,
               dedupe: bool = True) -> tuple[list[dict], list[dict], int]:
    """(sheet rows, key rows, duplicates left out): prompts and each prompt's completions in a seeded order,
    labelled A, B, ...; a prompt with fewer than two completions (after `dedupe`) is left out."""
    rng = random.Random(f"{seed}|collect|sheet")
    order = list(range(len(rows)))
    rng.shuffle(order)
    sheet, key, duplicates, width, n = [], [], 0, max(3, len(str(len(rows)))), 0
    for i in order:
        draws = distinct(completions[i]) if dedupe else list(range(len(completions[i])))
        duplicates += len(completions[i]) - len(draws)
        if len(draws) < 2:
            continue
        rng.shuffle(draws)
        n += 1
        prompt_id = f"p{n:0{width}d}"
        extras = {k: v for k, v in rows[i].items() if k not in ("prompt", "_where")}
        for label, d in zip(string.ascii_uppercase, draws):
            item = {"id": f"{prompt_id}-{label}", "prompt_id": prompt_id, "label": label,
                    "prompt": rows[i]["prompt"], "completion": completions[i][d]}
            sheet.append({**item, COLUMN[mode]: None})
            key.append({**item, "mode": mode, "draw": d, "row": extras})
    return sheet, key, duplicates


def write_sheet(folder: Path, sheet: list[dict], mode: str) -> None:
    """The sheet as CSV and JSONL (the same rows), with the labeller's instructions beside them."""
    import csv
    import io

    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=[*SHOWN, COLUMN[mode]])  # CRLF rows: cells holding \r or \n are quoted
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in sheet)
    write_text_atomic(folder / SHEET_CSV, out.getvalue())
    write_jsonl(folder / SHEET_JSONL, sheet)
    write_text_atomic(folder / INSTRUCTIONS, instructions(mode))


def instructions(mode: str) -> str:
    """What the labeller is asked to do."""
    task = ("Rank the completions of each prompt in the `rank` column: 1 for the best, 2 for the next, and so on.\n"
            "Give equal ranks to completions you cannot tell apart." if mode == "rank" else
            f"Rate each completion in the `rating` column from {RATINGS[0]} (worst) to {RATINGS[1]} (best).\n"
            "Judge each on its own; compare only completions of the same prompt.")
    return (f"{task}\nLabel every completion of a prompt, or leave the whole prompt blank.\nFill either sheet.csv "
            "(save it back as CSV UTF-8) or sheet.jsonl; do not edit the other columns.\n")


# -- reading a filled sheet back -----------------------------------------------------------------


@dataclass
class SheetLabels:
    """A filled sheet as training data: `train` pairs {prompt, chosen, rejected, score} (or, pointwise,
    {prompt, completion, target}), held-out pairs, and what was read (`counts`: the data/ metrics)."""

    train: list[dict]
    held: list[dict]
    counts: dict[str, int] = field(default_factory=dict)


def read_key(path: Path) -> dict[str, dict]:
    """The key's rows by id; a clear error for a file that is not a collect key."""
    if path.is_dir():
        path = path / KEY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"data.sheet.key: no key file at {path}; give the collect step's name or its "
                                f"key/{KEY_FILE}")
    key = {}
    for row in read_jsonl(path):
        missing = [k for k in KEY_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{row['_where']}: not a collect key row (missing {', '.join(missing)})")
        key[row["id"]] = row
    return key


def read_filled(paths: list[Path], key: dict[str, dict], mode: str) -> tuple[dict[tuple, list], int]:
    """{(file, prompt_id): [(key row, label value)]} of every fully labelled prompt, and the labelled rows read;
    every problem (FILE:LINE) raised at once as DataProblems."""
    column = COLUMN[mode]
    modes = {row["mode"] for row in key.values()}
    if modes != {mode}:
        raise ValueError(f"data.sheet.mode is {mode!r} but the key holds a {'/'.join(sorted(modes))!r} sheet; "
                         "set mode to the collect step's mode")
    labels: dict[str, set[str]] = {}  # prompt id -> the labels of its completions
    for row in key.values():
        labels.setdefault(row["prompt_id"], set()).add(row["label"])
    groups, problems, count = {}, [], 0
    for path in paths:
        rows, found = sheet_rows(path)
        mine: list[str] = []
        by_prompt: dict[str, list[dict]] = {}
        seen: dict[str, str] = {}
        for row in rows:
            problem = _row_problem(row, key, column, seen)
            if problem:
                mine.append(f"{row['_where']}: {problem}")
                continue
            seen[row["id"]] = row["_where"]
            by_prompt.setdefault(key[row["id"]]["prompt_id"], []).append(row)
        for prompt_id, members in by_prompt.items():
            labelled = [r for r in members if r[column] is not None]
            if labelled:  # else nobody labelled this prompt in this file
                mine += _group_problems(path, prompt_id, members, labelled, labels[prompt_id], column, key)
                groups[(str(path), prompt_id)] = [(key[r["id"]], r[column]) for r in labelled]
                count += len(labelled)
        mine = found + mine
        problems += mine[:MAX_PER_FILE] + ([f"{path}: ... and {len(mine) - MAX_PER_FILE} more problem(s)"]
                                           if len(mine) > MAX_PER_FILE else [])
    if problems:
        raise DataProblems(problems)
    return groups, count


def _row_problem(row: dict, key: dict, column: str, seen: dict) -> str:
    """Why a sheet row cannot be read against the key ("" when it can)."""
    if column not in row:
        other = "rating" if column == "rank" else "rank"
        return f"no {column} column, a {other} one; data.sheet.mode must be the collect step's mode"
    if row["id"] not in key:
        return (f"id {row['id']!r} is not on the sheet's key (ids look like {next(iter(key))}); was the id edited, "
                "or is the sheet from another collect run?")
    if row["id"] in seen:
        return f"id {row['id']!r} appears twice in this file (first at {seen[row['id']]}); label it once per file"
    return ""


def _group_problems(path: Path, prompt_id: str, members: list[dict], labelled: list[dict], labels: set[str],
                    column: str, key: dict) -> list[str]:
    """A prompt labelled in part, or ranked past its number of completions."""
    out = [f"{r['_where']}: {column} is blank, but other completions of prompt {prompt_id} are labelled; label "
           "every completion of a prompt, or none" for r in members if r[column] is None]
    absent = sorted(labels - {key[r["id"]]["label"] for r in members})
    if absent:
        out.append(f"{path}: prompt {prompt_id} is labelled but its completion(s) {', '.join(absent)} are not in the "
                   "file; label every completion of a prompt, or none")
    out += [f"{r['_where']}: rank {r['rank']}, but prompt {prompt_id} has {len(labels)} completions (ranks go from "
            f"1 = best to {len(labels)})" for r in labelled if column == "rank" and r["rank"] > len(labels)]
    return out


def group_pairs(group: list[tuple[dict, int]], mode: str, min_gap: int = 1) -> tuple[list[dict], int]:
    """(pairs, ties) of one labelled (file, prompt) group: all k(k-1)/2 pairs, the better one (lower rank,
    higher rating) chosen; a tie (an equal rank, or a rating gap under `min_gap`) is flagged `tie`, score 0.5."""
    pairs, ties = [], 0
    for (a, x), (b, y) in combinations(group, 2):
        better = (y - x) if mode == "rank" else (x - y)  # > 0: a is better
        if abs(better) < (min_gap if mode == "rate" else 1):
            ties += 1
            pairs.append({"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"],
                          "score": 0.5, "tie": True})
            continue
        win, lose = (a, b) if better > 0 else (b, a)
        pairs.append({"prompt": a["prompt"], "chosen": win["completion"], "rejected": lose["completion"],
                      "score": 1.0, "tie": False})
    return pairs, ties


def load_sheet(paths: list[Path], key_path: Path, mode: str, seed: int, eval_fraction: float, ties: str = "drop",
               loss: str = "pairs", min_gap: int = 1) -> SheetLabels:
    """A filled sheet as training data (module docstring); whole prompts are held out, by a seeded hash."""
    key = read_key(key_path)
    groups, count = read_filled(paths, key, mode)
    if not groups:
        raise ValueError(f"data.sheet: no labelled prompt in {', '.join(str(p) for p in paths)}; fill in the "
                         f"{COLUMN[mode]} column first")
    prompts = {pid: g[0][0]["prompt"] for (_, pid), g in groups.items()}
    # by text, so that a prompt drawn twice (builtin train rows repeat) stays on one side
    _, held_rows = split_rows([{"prompt": t} for t in sorted(set(prompts.values()))], eval_fraction, seed)
    held_texts = {r["prompt"] for r in held_rows}
    held_ids = {pid for pid, text in prompts.items() if text in held_texts}
    train, held, tie_count = [], [], 0
    for (_, prompt_id), group in groups.items():
        pairs, n_ties = group_pairs(group, mode, min_gap)
        tie_count += n_ties
        if prompt_id in held_ids:
            held += [p for p in pairs if not p["tie"]]
        elif mode == "rate" and loss == "mse":
            train += [{"prompt": k["prompt"], "completion": k["completion"], "target": rating_target(v)}
                      for k, v in group]
        else:
            train += [p for p in pairs if ties == "soft" or not p["tie"]]
    if not train:
        raise ValueError("data.sheet: nothing left to train on (every labelled pair tied or was held out); label "
                         "more prompts, lower eval_fraction, or use ties: soft")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tie"} for r in rows]  # noqa: E731
    counts = {"data/sheet_rows": count, "data/sheet_prompts": len(prompts), "data/ties": tie_count,
              "data/sheet_blank_prompts": len({k["prompt_id"] for k in key.values()} - set(prompts))}
    return SheetLabels(strip(train), strip(held), counts)


def rating_target(rating: int) -> float:
    """A rating mapped onto [-1, 1]: (rating - 3) / 2 on the 1-5 scale."""
    mid, half = (RATINGS[0] + RATINGS[1]) / 2, (RATINGS[1] - RATINGS[0]) / 2
    return (rating - mid) / half
