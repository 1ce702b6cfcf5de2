"""Every benchmark still runs: each script's tiny --quick configuration end to end, in a fresh process,
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
QUICK = ["convert_official", "inversion", "render", "sample", "sd", "serve"]
# official.py needs a checkout of the reference code (--reference; tests/test_official.py covers the parity offline);
# train_ae.py trains for minutes on the wallpapers; strip.py and report.py draw from results (tested below).


def run_script(name: str, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", QUICK)
def test_each_benchmark_runs_its_quick_configuration(name, tmp_path):
    done = run_script(name, "--quick", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (result,) = tmp_path.glob(f"{name}-*-quick.json")
    data = json.loads(result.read_text())
    assert data["machine"]["cpu"] and data["rows"], "a result names its machine and holds rows"
    assert result.with_suffix(".png").stat().st_size > 1000
    assert "┃" in done.stdout or "|" in done.stdout, "it prints a table"


def test_the_report_gathers_the_committed_results(tmp_path):
    out = tmp_path / "benchmarks.md"
    done = run_script("report", "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "render" in text and "|" in text


def test_official_without_the_reference_checkout_says_what_to_pass(tmp_path):
    done = run_script("official", "--quick", "--reference", str(tmp_path / "missing"), "--out", str(tmp_path), timeout=120)
    assert done.returncode != 0 and "reference" in (done.stdout + done.stderr).lower()
