"""Collect every benchmark's results into one page, docs/benchmarks.md.

    PYTHONPATH=. python benchmarks/report.py                  # collect benchmarks/results/**/*.json
    PYTHONPATH=. python benchmarks/report.py --run            # rerun each benchmark's --quick mode first
    PYTHONPATH=. python benchmarks/report.py --include-quick  # list smoke-test results beside full ones

Every JSON written by a benchmark (`common.write_json`: machine, settings, goals, rows) or
by `infd eval-ae` / `infd eval-gen` (anywhere under the results folder) becomes a section:
its machine and date, its goals, its rows as a table and its plot (the PNG of the same
name beside it). Rows are shown with the benchmark script's own `COLUMNS` when it has
them, with the evaluation's own tables for eval-ae/eval-gen, and otherwise as a table of
their scalar fields, so a new benchmark needs nothing here. Smoke-test results
(`*-quick.json`) are shown only where no full run of that benchmark and device exists.
The page starts with the headlines (every goal, met or not) and ends with the machines
and software versions.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from infd.evaluation import ae_markdown, gen_markdown, goals_markdown, markdown_table
from infd.files import atomic_path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks.md"
NOT_BENCHMARKS = ("common", "report")
MAX_ROWS = 60
MAX_GENERIC_COLUMNS = 10
SOFTWARE = ("torch", "torchvision", "diffusers", "accelerate", "transformers", "numpy", "torch-fidelity", "lpips", "open_clip_torch")
NAME = re.compile(r"^(?P<name>.+?)-(?P<device>cpu|cuda)(?:-(?P<tag>.+))?$")


@dataclass
class Result:
    path: Path
    data: dict
    name: str  # the benchmark: render, sample, eval-ae, ...
    device: str
    tag: str  # "quick" for smoke tests, "" for full runs

    @property
    def quick(self) -> bool:
        return self.tag == "quick" or bool(self.data.get("settings", {}).get("quick"))


# ---------------------------------------------------------------- collecting


def describe_path(path: Path, data: dict, results_dir: Path) -> tuple[str, str, str]:
    """(benchmark name, device, tag) from `<name>-<device>[-<tag>].json`, or from the JSON's
    "benchmark" field with its folder as the tag (`infd eval-ae --out results/NAME`)."""
    match = NAME.match(path.stem)
    device = data.get("machine", {}).get("device", "")
    if data.get("benchmark"):
        return data["benchmark"], device, path.parent.name if path.parent != results_dir else ""
    if match:
        return match["name"], match["device"], match["tag"] or ""
    return path.stem, device, ""


def collect(results_dir: Path, include_quick: bool = False) -> list[Result]:
    """Every readable result JSON under `results_dir` (hidden and temporary files skipped)."""
    results = []
    for path in sorted(results_dir.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(results_dir).parts):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            print(f"skipping {path}: {error}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            continue
        results.append(Result(path, data, *describe_path(path, data, results_dir)))
    full = {(r.name, r.device) for r in results if not r.quick}
    return [r for r in results if include_quick or not r.quick or (r.name, r.device) not in full]


def run_quick_benchmarks(timeout: float) -> None:
    """Run every benchmark script that has a --quick mode, one after another."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    for script in sorted(BENCHMARKS_DIR.glob("*.py")):
        if script.stem in NOT_BENCHMARKS or "--quick" not in script.read_text():
            continue
        print(f"running {script.name} --quick ...", flush=True)
        try:
            done = subprocess.run([sys.executable, str(script), "--quick"], cwd=REPO_ROOT, env=env, timeout=timeout)
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"stopped after {timeout:.0f} s"
        print(f"{script.name}: {status}", flush=True)


# ---------------------------------------------------------------- formatting


def fmt_value(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def benchmark_columns(name: str):
    """The script's own `COLUMNS` (common.Column list), or None if it has none or cannot be imported."""
    script = BENCHMARKS_DIR / f"{name}.py"
    if not script.is_file() or name in NOT_BENCHMARKS:
        return None
    sys.path.insert(0, str(BENCHMARKS_DIR))
    try:
        module_name = f"_benchmark_{name.replace('-', '_')}"
        spec = importlib.util.spec_from_file_location(module_name, script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return getattr(module, "COLUMNS", None)
    except Exception as error:  # a script needing a package this environment lacks: generic table
        print(f"{script.name}: using a generic table ({type(error).__name__}: {error})", file=sys.stderr)
        return None
    finally:
        sys.path.remove(str(BENCHMARKS_DIR))


def rows_table(rows: list[dict], columns=None) -> str:
    """Rows as markdown, with the script's columns or the rows' scalar fields (at most MAX_ROWS rows)."""
    shown = rows[:MAX_ROWS]
    if columns:
        columns = [c for c in columns if any(row.get(c.key) is not None for row in shown)]
        headers = [c.header for c in columns]
        body = [["—" if row.get(c.key) is None else c.fmt(row[c.key]) for c in columns] for row in shown]
    else:
        keys = [k for k in dict.fromkeys(k for row in shown for k in row) if all(not isinstance(row.get(k), (list, dict)) for row in shown)]
        headers = keys[:MAX_GENERIC_COLUMNS]
        body = [[fmt_value(row.get(k)) for k in headers] for row in shown]
    text = markdown_table(headers, body)
    if len(rows) > len(shown):
        text += f"\n({len(rows) - len(shown)} more rows in the JSON.)\n"
    return text


def hardware_line(machine: dict) -> str:
    parts = []
    if machine.get("gpu"):
        parts.append(f"{machine['gpu']}" + (f" ({machine['gpu_memory_gib']} GiB)" if machine.get("gpu_memory_gib") else ""))
    cores = machine.get("cpu_affinity") or machine.get("cpu_count")
    parts.append(f"{machine.get('cpu', '?')}" + (f", {cores} cores" if cores else ""))
    parts.append(f"torch {machine.get('torch', '?')}" + (f", CUDA {machine['cuda']}" if machine.get("cuda") else ""))
    return ", ".join(parts)


def machine_line(machine: dict) -> str:
    """The hardware plus what changes from run to run: load and commit."""
    parts = [hardware_line(machine)]
    if machine.get("load_average"):
        parts.append(f"load {machine['load_average'][0]:.1f}")
    if machine.get("git_commit"):
        parts.append(f"commit {machine['git_commit'][:9]}{'+dirty' if machine.get('git_dirty') else ''}")
    return ", ".join(parts)


def relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def section(result: Result, out_dir: Path) -> str:
    data, machine = result.data, result.data.get("machine", {})
    title = f"{result.name} ({result.device or '?'}{', ' + result.tag if result.tag else ''})"
    text = f"## {title}\n\n"
    text += f"`{relative(result.path, REPO_ROOT)}` — {str(machine.get('date', '?'))[:19]}, {machine_line(machine)}.\n\n"
    if result.quick:
        text += "*Smoke test (`--quick`): tiny models and sizes, the numbers say only that it runs.*\n\n"
    if result.name in ("eval-ae", "eval-gen"):
        render = ae_markdown if result.name == "eval-ae" else gen_markdown
        text += render(data, link_prefix=relative(result.path.parent, out_dir) + "/") + "\n"
        # Picture strips saved beside the result (e.g. the same crop from each model).
        return text + "".join(f"![{p.stem}]({relative(p, out_dir)})\n\n" for p in sorted(result.path.parent.glob("strip*.png")))
    if data.get("goals"):
        text += "Goals:\n\n" + goals_markdown(data["goals"]) + "\n"
    text += rows_table(data["rows"], benchmark_columns(result.name)) + "\n"
    plot = result.path.with_suffix(".png")
    if plot.is_file():
        text += f"![{result.path.stem}]({relative(plot, out_dir)})\n\n"
    return text


def headlines(results: list[Result]) -> str:
    lines = []
    for result in results:
        goals = result.data.get("goals") or []
        met = sum(bool(g.get("met")) for g in goals)
        where = result.data.get("machine", {}).get("gpu") or result.data.get("machine", {}).get("cpu", "?")
        summary = f"{met}/{len(goals)} goals met" if goals else "no goals recorded"
        lines.append(f"- **{result.name}** ({result.device}{', quick' if result.quick else ''}, {where}): {summary}")
        for goal in goals:
            lines.append(f"  - {'✅' if goal.get('met') else '❌'} {goal.get('goal')}: {fmt_value(goal.get('value'))} (target {goal.get('target')})")
    return "\n".join(lines) + "\n"


def software_versions() -> str:
    versions = [f"python {platform.python_version()}"]
    for package in SOFTWARE:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(versions)


def build_report(results: list[Result], out: Path) -> str:
    out_dir = out.parent
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    text = "# Benchmarks\n\n"
    text += (
        f"Generated by `benchmarks/report.py` on {now} from {len(results)} result file(s) in "
        f"`benchmarks/results/`. Each section names the machine it was measured on; CPU numbers from a "
        f"shared 2-core machine are noisy.\n\n"
    )
    if not results:
        return text + "No results yet: run the scripts in `benchmarks/` (see benchmarks/README.md).\n"
    text += "## Headlines\n\n" + headlines(results) + "\n"
    text += "".join(section(result, out_dir) for result in results)
    machines = {hardware_line(r.data.get("machine", {})) for r in results}
    text += "## Machines and software\n\n" + "".join(f"- {m}\n" for m in sorted(machines))
    text += f"\nThis page was generated with {software_versions()}.\n"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of result JSONs (searched recursively)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    parser.add_argument("--run", action="store_true", help="rerun every benchmark's --quick mode first")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each --quick run may take")
    parser.add_argument("--include-quick", action="store_true", help="show smoke-test results even where a full run exists")
    args = parser.parse_args()
    if args.run:
        run_quick_benchmarks(args.timeout)
    results = collect(args.results, args.include_quick or args.run)
    text = build_report(results, args.out.resolve())
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(f"wrote {args.out} ({len(results)} results)")


if __name__ == "__main__":
    main()
