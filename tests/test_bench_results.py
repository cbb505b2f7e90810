"""Benchmark results files (benchmarks/record.py), the combined table (benchmarks/report.py) and the README region
docs/figures.py writes from them; the cheapest benchmark run for real; the GPU check script's shape."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import record, report

REPO = Path(__file__).resolve().parents[1]
HOST = {"cpu": "Some CPU", "cores": 2, "torch": "2.13.0+cpu", "cuda_device": None, "load": 1.5}
GPU = {"cpu": "Other CPU", "cores": 16, "torch": "2.13.0", "cuda_device": "NVIDIA H200"}


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCYCLE_BENCH_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def test_a_run_replaces_its_file_atomically_with_one_row_per_figure(results_dir, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_x.py", "--quick"])
    results = record.Results("benchmarks/bench_x.py", "quick")
    first = results.add("tokens/s, ours", 1500.0, "tokens/s", "theirs", 1000.0, goal=">= 1.0", note="tiny model")
    results.add("seconds per iteration", 0.9, "s", "TRL, one step", 0.68, ratio=0.68 / 0.9)
    results.add("a figure whose baseline failed", float("nan"), "tokens/s", "TRL", None)
    path = results.write()

    assert path == results_dir / "bench_x.quick.json" and os.listdir(results_dir) == ["bench_x.quick.json"]
    rows = json.loads(path.read_text())
    assert [r["figure"] for r in rows] == ["tokens/s, ours", "seconds per iteration", "a figure whose baseline failed"]
    assert set(rows[0]) == set(record.FIELDS) and rows[0] == first
    assert rows[0]["ratio"] == 1.5 and rows[1]["ratio"] == pytest.approx(0.68 / 0.9)  # value / baseline unless given
    assert rows[2]["value"] is rows[2]["ratio"] is None  # JSON has no NaN
    assert (rows[0]["benchmark"], rows[0]["variant"], rows[0]["command"]) == ("bench_x", "quick",
                                                                             "benchmarks/bench_x.py --quick")
    machine = rows[0]["machine"]
    assert machine["cores"] == os.cpu_count() and machine["cpu"] and machine["torch"].startswith("2.")
    assert machine["load"] == pytest.approx(os.getloadavg()[1], abs=2.0)
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", rows[0]["commit"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rows[0]["date"])

    again = record.Results("bench_x", "quick")
    again.add("tokens/s, ours", 1600.0, "tokens/s")
    again.write()
    assert [r["value"] for r in json.loads(path.read_text())] == [1600.0]  # the new run replaced the old one
    record.Results("bench_x").write()
    assert sorted(os.listdir(results_dir)) == ["bench_x.json", "bench_x.quick.json"]  # variants kept apart


def rows() -> list[dict]:
    common = {"variant": "", "goal": None, "note": None, "commit": "592706bf79974be57f4400a7aea26ad73e0e2c36+dirty",
              "date": "2026-12-02T07:00:00Z"}
    return [
        {**common, "benchmark": "bench_validate", "figure": "`llmcycle validate` wall time", "value": 275.4,
         "unit": "ms", "baseline": "bare imports", "baseline_value": 70.2, "ratio": 3.923, "goal": "< 1000 ms",
         "machine": HOST, "command": "benchmarks/bench_validate.py"},
        {**common, "benchmark": "bench_pretrain", "variant": "cuda-125m", "figure": "MFU | bf16", "value": 412.3,
         "unit": "TFLOP/s", "baseline": "H200 peak", "baseline_value": 989.0, "ratio": 0.4169, "note": "125.5M",
         "machine": GPU, "command": "benchmarks/bench_pretrain.py --device cuda --size 125m"},
        {**common, "benchmark": "bench_ppo", "figure": "seconds per iteration", "value": 0.9, "unit": "s",
         "baseline": "TRL", "baseline_value": None, "ratio": None, "machine": HOST,
         "command": "benchmarks/bench_ppo.py"},
    ]


def test_the_readme_table_has_a_row_per_figure_and_names_the_machines():
    table = report.markdown(rows()).splitlines()
    assert table[0] == "| " + " | ".join(report.HEADERS) + " |"
    assert table[2] == ("| `bench_validate.py` | `llmcycle validate` wall time | 275 ms | bare imports 70.2 ms | "
                        "3.92x | < 1000 ms | [1] 2026-12-02 592706b+dirty, load 1.5 |")
    assert table[3].startswith("| `bench_pretrain.py --device cuda --size 125m` | MFU \\| bf16 (125.5M) | 412 TFLOP/s "
                               "| H200 peak 989 TFLOP/s | 0.417x |")  # a | in a figure does not split the cell
    assert "| [2] 2026-12-02" in table[3]
    assert table[4].startswith("| `bench_ppo.py` | seconds per iteration | 0.9 s | TRL | - |")
    assert table[-1] == ("Measured on: [1] Some CPU, 2 cores, torch 2.13.0+cpu; [2] Other CPU, 16 cores, "
                         "torch 2.13.0, NVIDIA H200.")
    assert report.markdown([]).startswith("No results files yet")

    lines = report.text(rows()).splitlines()
    assert lines[0].split()[:2] == ["benchmark", "figure"] and set(lines[1]) == {"-"}
    assert len({line.rindex("[") for line in lines[2:5]}) == 1  # aligned: the last column starts at one offset


def test_docs_figures_writes_the_region_from_the_committed_results_files(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "docs"))
    import figures

    (tmp_path / "bench_a.json").write_text(json.dumps(rows()[:1]))
    (tmp_path / "bench_b.cuda-125m.json").write_text(json.dumps(rows()[1:]))
    monkeypatch.setattr(record, "RESULTS", tmp_path)
    readme = "# x\n\n<!-- figures:benchmarks -->\nold table\n<!-- /figures:benchmarks -->\n\nmore\n"
    body = figures.benchmark_table(None)
    assert figures.rewrite(readme, "benchmarks", body) == (
        "# x\n\n<!-- figures:benchmarks -->\n" + report.markdown(record.read(tmp_path)) + "\n<!-- /figures:benchmarks -->"
        "\n\nmore\n")
    assert body.count("\n| `bench_") == 3 and "benchmarks" in figures.GROUPS
    (tmp_path / "broken.json").write_text(json.dumps({"figure": "not a list"}))
    with pytest.raises(ValueError, match=r"broken.json: expected a JSON list of figure rows"):
        record.read(tmp_path)


def test_every_benchmark_writes_its_results_file():
    for script in sorted((REPO / "benchmarks").glob("bench_*.py")):
        source = script.read_text()
        assert re.search(r"from (benchmarks\.)?record import Results", source) and ".write()" in source, script.name


def test_the_cheapest_benchmark_runs_and_records_what_it_printed(results_dir):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_validate.py"), "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "LLMCYCLE_BENCH_RESULTS": str(results_dir)})
    assert out.returncode == 0, out.stderr[-3000:]
    [row] = json.loads((results_dir / "bench_validate.quick.json").read_text())
    printed = re.search(r"validate\s+(\d+) ms", out.stdout).group(1)
    assert f"{row['value']:.0f}" == printed and row["unit"] == "ms"
    assert row["value"] > row["baseline_value"] > 0 and row["ratio"] == pytest.approx(row["value"] / row["baseline_value"])
    assert "bench_validate.py --quick" in report.text(record.read(results_dir))


def test_the_125m_shape_has_about_125m_parameters_and_known_gpus_have_a_peak():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_pretrain

    assert bench_pretrain.model_params("125m") == pytest.approx(125e6, rel=0.02)
    assert bench_pretrain.model_params("small", context=128) == pytest.approx(4.7e6, rel=0.05)  # the README's
    assert bench_pretrain.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench_pretrain.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench_pretrain.gpu_peak_flops("NVIDIA H200") == 989e12
    assert bench_pretrain.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench_pretrain.gpu_peak_flops("NVIDIA L4") == 121e12 and bench_pretrain.gpu_peak_flops("NVIDIA L40S") == 362e12
    assert bench_pretrain.gpu_peak_flops("Tesla T4") is None  # no bf16 tensor cores: no MFU against a bf16 peak


def test_the_gpu_check_script_parses():
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    text = script.read_text()
    assert "-m gpu" in text and "bench_pretrain.py --device cuda --size 125m" in text and "torchrun" in text
