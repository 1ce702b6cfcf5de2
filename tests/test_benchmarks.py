"""Every benchmark still runs: each script's tiny --smoke configuration end to end, in a fresh process,
writing its table, JSON and plot into a temporary folder (so the harness cannot rot unnoticed).

These are not timings (the numbers of a run on a busy test machine mean nothing): a benchmark is
measured by running it by hand on an idle machine, as docs/benchmarks.md says.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SMOKE = ["convert_official", "inversion", "render", "sample", "sd", "serve", "train_ae"]
# official.py needs a checkout of the reference code (--reference; tests/test_official.py covers the parity offline);
# report.py draws from results (tested below).


def run_script(name: str, *args: str, timeout: float = 300, folder: Path = BENCHMARKS) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(folder / f"{name}.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_benchmark_script_is_smoke_tested():
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")} - {"harness", "report", "official"}
    assert scripts == set(SMOKE), "a new benchmark script needs a --smoke run here"


@pytest.mark.parametrize("name", SMOKE)
def test_each_benchmark_runs_its_smoke_configuration(name, tmp_path):
    done = run_script(name, "--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (result,) = tmp_path.glob(f"{name}-*-smoke.json")
    data = json.loads(result.read_text())
    assert data["machine"]["cpu"] and data["rows"], "a result names its machine and holds rows"
    assert data["command"].startswith(f"python benchmarks/{name}.py") and "--smoke" in data["command"], "a result names the command that reproduces it"
    shown = {key for table in data["tables"] for key in table["columns"]}
    assert any(key in row for row in data["rows"] for key in shown), "its tables show what the rows hold"
    assert result.with_suffix(".png").stat().st_size > 1000
    assert "┃" in done.stdout, "it prints a table"


def test_the_report_gathers_the_committed_results_with_their_commands(tmp_path):
    out = tmp_path / "benchmarks.md"
    done = run_script("report", "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "## render (cpu)" in text and "Reproduce: `python benchmarks/render.py" in text and "|" in text
    assert "-smoke.json" not in text, "smoke runs are not results"


def test_official_without_the_reference_checkout_says_what_to_pass(tmp_path):
    done = run_script("official", "--smoke", "--reference", str(tmp_path / "missing"), "--out", str(tmp_path), timeout=120)
    assert done.returncode != 0 and "reference" in (done.stdout + done.stderr).lower()


def test_strip_puts_the_same_crop_of_two_renderings_side_by_side(tmp_path):
    from PIL import Image

    for folder, value in (("a", 40), ("b", 200)):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (120, 80), (value,) * 3).save(tmp_path / folder / "sample_0003.png")
    done = run_script("strip", "--a", f"A={tmp_path / 'a'}", "--b", f"B={tmp_path / 'b'}", "--seeds", "3", "--crop", "32", "--out", str(tmp_path / "s.png"), timeout=120, folder=ROOT / "scripts")
    assert done.returncode == 0, done.stderr[-3000:]
    strip = Image.open(tmp_path / "s.png").convert("L")
    assert strip.width > 2 * 64 and strip.getpixel((10, strip.height - 5)) == 40 and strip.getpixel((strip.width - 10, strip.height - 5)) == 200


def test_report_shows_any_result_with_its_tables_command_and_plot_and_leaves_smoke_runs_out(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import report

    results = tmp_path / "results"
    results.mkdir()
    machine = {"date": "2026-01-02T03:04:05", "device": "cpu", "cpu": "Test CPU", "cpu_count": 2, "torch": "2.x"}
    rows = [{"size": "64²", "seconds": 0.5, "runs": [0.5, 0.6]}, {"size": "128²", "seconds": 1.5, "runs": [1.5]}]
    goals = [{"goal": "fast", "value": 0.5, "target": "<= 1", "met": True}]
    tables = [{"title": "Times", "columns": {"size": "size", "seconds": "time (s)"}, "section": None}]
    (results / "newthing-cpu.json").write_text(json.dumps({"machine": machine, "command": "python benchmarks/newthing.py", "tables": tables, "rows": rows, "goals": goals}))
    (results / "newthing-cpu.png").write_bytes(b"png")
    (results / "older-cpu.json").write_text(json.dumps({"machine": machine, "rows": rows}))
    (results / "newthing-cpu-smoke.json").write_text(json.dumps({"machine": machine, "rows": rows}))
    (results / "broken.json").write_text("{")
    found = report.collect(results)
    assert [name for _, name, _, _ in found] == ["newthing", "older"]
    text = report.build_report(found, tmp_path / "docs" / "benchmarks.md")
    assert "**Times**" in text and "| size | time (s) |" in text and "| 128² | 1.5 |" in text
    assert "| size | seconds |" in text, "a result without tables: its scalar fields (lists left out)"
    assert "Reproduce: `python benchmarks/newthing.py`" in text and "![newthing-cpu](../results/newthing-cpu.png)" in text
    assert "1/1 goals met" in text and "Test CPU, 2 cores" in text
