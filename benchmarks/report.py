"""Collect every result into one page, docs/benchmarks.md.

    python benchmarks/report.py          # benchmarks/results/**/*.json -> docs/benchmarks.md

Each JSON written by a benchmark (harness.Benchmark: machine, command, settings, tables,
goals, rows) or by `infd eval-ae` / `infd eval-gen` becomes a section: the command that
reproduces it, its machine and date, its goals, its tables and its plot (the PNG beside
it). Smoke runs (`*-smoke.json`) are left out: their numbers only say that a script runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

from harness import REPO_ROOT, RESULTS_DIR, Table, describe_machine, fmt, shown_columns

from infd.evaluation import ae_markdown, gen_markdown, goals_markdown, markdown_table
from infd.files import atomic_path

MAX_ROWS, MAX_GENERIC_COLUMNS = 60, 10
SOFTWARE = ("torch", "torchvision", "diffusers", "accelerate", "transformers", "numpy", "torch-fidelity", "lpips", "open_clip_torch")
NAME = re.compile(r"^(?P<name>.+?)-(?P<device>cpu|cuda)(?:-(?P<tag>.+))?$")


def collect(results_dir: Path) -> list[tuple[str, str, Path, dict]]:
    """(title, name, path, data) of every readable result under `results_dir`, smoke runs and hidden files left out."""
    results = []
    for path in sorted(results_dir.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(results_dir).parts):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            print(f"skipping {path}: {error}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or path.stem.endswith(("-smoke", "-quick")):
            continue
        match, device = NAME.match(path.stem), data.get("machine", {}).get("device", "?")
        if data.get("benchmark"):  # infd eval-ae / eval-gen --out results/NAME
            name, tag = data["benchmark"], path.parent.name if path.parent != results_dir else ""
        else:
            name, tag = (match["name"], match["tag"]) if match else (path.stem, "")
        results.append((f"{name} ({device}{', ' + tag if tag else ''})", name, path, data))
    return results


def tables_markdown(data: dict) -> str:
    """The result's tables (at most MAX_ROWS rows each); without any, one of the rows' scalar fields."""
    rows = data["rows"]
    if not data.get("tables"):
        keys = [k for k in dict.fromkeys(k for row in rows for k in row) if all(not isinstance(row.get(k), (list, dict)) for row in rows)]
        data = dict(data, tables=[{"title": "", "columns": {k: k for k in keys[:MAX_GENERIC_COLUMNS]}}])
    text = ""
    for table in (Table(**t) for t in data["tables"]):
        shown = table.rows(rows)
        if not shown:
            continue
        columns = shown_columns(table.columns, shown[:MAX_ROWS])
        text += (f"**{table.title}**\n\n" if table.title else "") + markdown_table(list(columns.values()), [[fmt(r.get(k)).replace("|", "\\|") for k in columns] for r in shown[:MAX_ROWS]])
        text += f"\n({len(shown) - MAX_ROWS} more rows in the JSON.)\n\n" if len(shown) > MAX_ROWS else "\n"
    return text


def hardware(machine: dict) -> str:
    cores = machine.get("cpu_affinity") or machine.get("cpu_count")
    parts = [f"{machine['gpu']} ({machine.get('gpu_memory_gib')} GiB)"] if machine.get("gpu") else []
    parts += [f"{machine.get('cpu', '?')}, {cores} cores", f"torch {machine.get('torch', '?')}" + (f", CUDA {machine['cuda']}" if machine.get("cuda") else "")]
    return ", ".join(parts)


def relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def section(title: str, name: str, path: Path, data: dict, out_dir: Path) -> str:
    machine = data.get("machine", {})
    where = describe_machine(machine) if machine.get("cpu") and "torch_threads" in machine else hardware(machine)
    text = f"## {title}\n\n`{relative(path, REPO_ROOT)}` — {str(machine.get('date', '?'))[:19]}, {where}.\n\n"
    if data.get("command"):
        text += f"Reproduce: `{data['command']}`\n\n"
    if name in ("eval-ae", "eval-gen"):
        text += (ae_markdown if name == "eval-ae" else gen_markdown)(data, link_prefix=relative(path.parent, out_dir) + "/") + "\n"
        return text + "".join(f"![{p.stem}]({relative(p, out_dir)})\n\n" for p in sorted(path.parent.glob("strip*.png")))  # picture strips beside it
    if data.get("goals"):
        text += "Goals:\n\n" + goals_markdown(data["goals"]) + "\n"
    text += tables_markdown(data)
    return text + (f"![{path.stem}]({relative(path.with_suffix('.png'), out_dir)})\n\n" if path.with_suffix(".png").is_file() else "")


def build_report(results: list, out: Path) -> str:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    text = f"# Benchmarks\n\nGenerated by `benchmarks/report.py` on {now} from {len(results)} result file(s) in `benchmarks/results/`. "
    text += "Each section names the machine it was measured on and the command that measures it again; CPU numbers from a shared 2-core machine are noisy.\n\n"
    if not results:
        return text + "No results yet: run the scripts in `benchmarks/` (see benchmarks/README.md).\n"
    text += "## Headlines\n\n"
    for title, _, _, data in results:
        goals, machine = data.get("goals") or [], data.get("machine", {})
        text += f"- **{title}**, {machine.get('gpu') or machine.get('cpu', '?')}: " + (f"{sum(bool(g.get('met')) for g in goals)}/{len(goals)} goals met\n" if goals else "no goals recorded\n")
        text += "".join(f"  - {'✅' if g.get('met') else '❌'} {g.get('goal')}: {fmt(g.get('value'))} (target {g.get('target')})\n" for g in goals)
    text += "\n" + "".join(section(*result, out.parent) for result in results)
    text += "## Machines and software\n\n" + "".join(f"- {m}\n" for m in sorted({hardware(r[3].get("machine", {})) for r in results}))
    versions = [f"python {platform.python_version()}"]
    for package in SOFTWARE:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return text + f"\nThis page was generated with {', '.join(versions)}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of result JSONs (searched recursively)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="markdown file to write")
    args = parser.parse_args()
    results = collect(args.results)
    with atomic_path(args.out) as tmp:
        tmp.write_text(build_report(results, args.out.resolve()))
    print(f"wrote {args.out} ({len(results)} results)")


if __name__ == "__main__":
    main()
