"""The benchmark harness, written once: arguments, timing, peak memory, the machine, tables, JSON and plots.

A script builds a `Benchmark`, adds its own options, `parse`s, `start`s with its tables,
hands each measured row to `add_row` (printed and saved at once, so an interrupted run
keeps it) and `finish`es with its goals and plot panels. Results:
`<out>/<name>-<device>[-<tag>].json` (machine, command, settings, tables, goals, rows) and
a PNG beside it; `report.py` gathers them into docs/benchmarks.md. CPU peak memory is the
peak RSS of a process of its own per measurement; CUDA's comes from the caching allocator.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch

from infd import system
from infd.evaluation.report import Panel, Series, plot_panels  # noqa: F401 (the scripts take them from here)
from infd.files import atomic_path
from infd.geometry import parse_size
from infd.models import NeuralFieldAutoencoder
from infd.store import find_checkpoint, load_autoencoder

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MIB = 2**20
# The paper's autoencoder: 256² input -> z 3x64x64 -> phi 128x256x256 -> CLIF of width 256.
PAPER_AE = dict(input_size=256, latent_channels=3, block_out_channels=(128, 256, 256), layers_per_block=2, renderer_hidden=256, renderer_blocks=2)
TINY_AE = dict(input_size=32, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, renderer_hidden=8, renderer_blocks=1)


# ---------------------------------------------------------------- the machine


def git(*args: str, cwd: Path = REPO_ROOT) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on (`infd.system.machine_record`, as `infd doctor` sees the machine) and the commit."""
    return {**system.machine_record(device), "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def describe_machine(info: dict) -> str:
    """One line: GPU, CPU with its vector instructions, cores, threads, load, torch, commit."""
    flags = " ".join(info.get("cpu_flags") or []) or "no AVX2"
    text = f"{info['cpu']} ({flags}; {info.get('cpu_affinity') or info.get('cpu_count')} cores, {info.get('torch_threads')} torch threads)"
    if info.get("gpu"):
        text = f"{info['gpu']} ({info['gpu_memory_gib']} GiB), " + text
    if info.get("load_average"):
        text += f", load {info['load_average'][0]:.1f}"
    return f"{text}, torch {info['torch']}, commit {(info.get('git_commit') or '?')[:9]}{'+dirty' if info.get('git_dirty') else ''}"


# ---------------------------------------------------------------- timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(run: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `run`, synchronising the GPU around each."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the peak)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Restart the peak RSS at the current RSS (Linux: /proc/self/clear_refs 5); False where that cannot be done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(run: Callable[[], object], device: torch.device, repeats: int = 1, warm: bool | None = None) -> dict:
    """Seconds of `repeats` calls (median too), after one untimed call if `warm` (default: on CUDA, for cuDNN's
    algorithm choice); on CUDA also the peak allocated memory and its increment over the start."""
    if device.type == "cuda" if warm is None else warm:
        run()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    seconds = time_runs(run, repeats, device)
    result = {"seconds": seconds, "median_s": statistics.median(seconds)}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        result.update(peak_mib=peak / MIB, increment_mib=(peak - base) / MIB)
    return result


def in_fresh_process(function: Callable, *args, preload: Sequence[str] = ("torch",), env: Mapping[str, str] | None = None):
    """`function(*args)` in a new process; its result, or {"note": "..."} if the process dies.

    ru_maxrss only grows, so each peak needs a process of its own. They fork from a forkserver
    that has imported `preload` (without running torch: thread pools start clean), so each
    starts in about a second. `function` must be defined at module level. With `env` (read at
    import, e.g. INFD_MALLOC_TUNING=0) the process is spawned instead.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    if env is None and "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
    else:
        context = multiprocessing.get_context("spawn")
    try:
        with mock.patch.dict(os.environ, env or {}), ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:  # env: restored after
            return pool.submit(function, *args).result()
    except BrokenProcessPool:
        return {"note": "the measuring process died (out of memory?)"}


def measure_fresh(setup: Callable, *args, repeats: int = 1, preload: Sequence[str] = ("torch",), env: Mapping[str, str] | None = None) -> dict:
    """Time and peak RSS of a run in a process of its own. `setup(*args)` (module level) returns `run`,
    `(run, warm)` or `(run, warm, info)`: `warm` is called once first, then the peak restarts and
    `run` is timed `repeats` times. Returns seconds, median_s, peak_mib, increment_mib (over the RSS
    before the runs), base_mib, minor_faults per run and `info`; {"note": why} if the process died."""
    return in_fresh_process(_measure_here, setup, args, repeats, torch.get_num_threads(), preload=preload, env=env)


def _measure_here(setup: Callable, args: tuple, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    prepared = setup(*args)
    run, warm, info = (*prepared, None, None)[:3] if isinstance(prepared, tuple) else (prepared, None, None)
    if warm is not None:
        warm()
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # noqa: E731 (pages mapped in on first touch: fresh memory)
    reset, base, faults_before = reset_peak_rss(), current_rss_bytes(), faults()
    seconds = time_runs(run, repeats, torch.device("cpu"))
    peak = peak_rss_bytes()
    result = dict(seconds=seconds, median_s=statistics.median(seconds), peak_mib=peak / MIB, increment_mib=(peak - base) / MIB, base_mib=base / MIB)
    result.update(minor_faults=(faults() - faults_before) / repeats, **(info or {}))
    return result if reset else dict(result, note="peak since the process started: it could not be restarted")


# ---------------------------------------------------------------- models and sizes


def autoencoder(spec: dict, device: torch.device, width: int | None = None):
    """spec {"ckpt": folder} or {"config": NeuralFieldAutoencoder options} (seeded random weights); with
    `width`, the same shapes with that renderer width and random weights."""
    if spec.get("ckpt") and width is None:
        return load_autoencoder(spec["ckpt"], device)
    config = dict(NeuralFieldAutoencoder.load_config(find_checkpoint(spec["ckpt"]))) if spec.get("ckpt") else dict(spec["config"])
    torch.manual_seed(0)
    return NeuralFieldAutoencoder.from_config(dict(config, **({"renderer_hidden": width} if width else {}))).to(device).eval()


def random_latent(model, seed: int = 0) -> torch.Tensor:
    """z (1, C, h, w) of N(0, 1), on the model's device."""
    return torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(seed)).to(next(model.parameters()).device)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"256,512,2048x1536" -> [(256, 256), (512, 512), (1536, 2048)] as (height, width)."""
    return [parse_size(part) for part in text.split(",") if part.strip()]


def size_fields(size: tuple[int, int]) -> dict:
    """A row's size: "2048²" (or "2048x1536"), height, width, megapixels."""
    h, w = size
    return {"size": f"{w}²" if h == w else f"{w}x{h}", "height": h, "width": w, "megapixels": h * w / 1e6}


# ---------------------------------------------------------------- tables and goals


@dataclass
class Table:
    """A table of the rows whose "section" is `section` (None: every row): row key -> column header."""

    title: str
    columns: dict[str, str]
    section: str | None = None

    def rows(self, rows: Sequence[dict]) -> list[dict]:
        return [r for r in rows if self.section is None or r.get("section") == self.section]


def goal(name: str, value: float, target: float, unit: str = "", lower_is_better: bool = False) -> dict:
    """One goal row: did `value` reach `target` (>= by default, <= if lower is better)?"""
    met = value <= target if lower_is_better else value >= target
    return {"goal": name, "value": value, "target": f"{'<=' if lower_is_better else '>='} {target:g}" + (f" {unit}" if unit else ""), "met": met}


def fmt(value) -> str:
    """A cell: — for missing, yes/no, thousands as integers, else 3 significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def shown_columns(columns: Mapping[str, str], rows: Sequence[dict]) -> dict[str, str]:
    """The columns that some row has a value for."""
    return {key: header for key, header in columns.items() if any(row.get(key) is not None for row in rows)}


def print_table(table: Table, rows: Sequence[dict], console) -> None:
    from rich.table import Table as RichTable

    rows = table.rows(rows)
    if not rows:
        return
    shown = shown_columns(table.columns, rows)
    out = RichTable(title=table.title)
    for key, header in shown.items():
        out.add_column(header, justify="left" if all(isinstance(r.get(key, ""), str) for r in rows) else "right")
    for row in rows:
        out.add_row(*(fmt(row.get(key)) for key in shown))
    console.print(out)


# ---------------------------------------------------------------- plots


def lines(rows: Sequence[dict], x: str, y: str, by: str | Sequence[str] = (), styles: Mapping | None = None, label: str = "", **style) -> list[Series]:
    """One line per distinct value of the `by` fields (in order of appearance): the rows' (x, y), sorted by x, where both exist.
    `styles` maps a group (its one value, or the tuple of values) to matplotlib keywords; `style` applies to every line."""
    by = (by,) if isinstance(by, str) else tuple(by)
    out = []
    for group in dict.fromkeys(tuple(r.get(k) for k in by) for r in rows):
        points = sorted((r[x], r[y]) for r in rows if tuple(r.get(k) for k in by) == group and r.get(x) is not None and r.get(y) is not None)
        if points:
            key = group[0] if len(group) == 1 else group
            name = " ".join(f"({k})" if v is True else str(v) for k, v in zip(by, group, strict=True) if v not in (None, False)) + label  # True: "(field)"
            out.append(Series(name or y, [p[0] for p in points], [p[1] for p in points], style={**style, **(styles or {}).get(key, {})}))
    return out


def hline(label: str, xs: Sequence[float], value: float, **style) -> Series:
    """A horizontal reference line across the x range (a baseline, a goal, a floor)."""
    return Series(label, [min(xs), max(xs)], [value, value], style={"linestyle": ":", "marker": "", "color": "gray", **style})


def size_ticks(rows: Sequence[dict], x: str = "megapixels") -> dict[float, str]:
    return {r[x]: r["size"] for r in rows if x in r}


# ---------------------------------------------------------------- the frame


class Benchmark:
    """Arguments every benchmark takes, the machine, rows saved as they come, tables, goals and the plot.

        bench = Benchmark("render", __doc__)
        bench.add("--sizes", ...)                     # the script's own options
        args = bench.parse()
        bench.start("render benchmark", [Table("Render time", {"size": "size", "median_s": "seconds"})], model=...)
        bench.add_row({"size": "1024²", **measure(run, bench.device)})
        bench.finish(goals, [Panel(...)])
    """

    def __init__(self, name: str, doc: str):
        self.name = name
        self.parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add = self.parser.add_argument
        self.add("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
        self.add("--repeats", type=int, help="timed runs per row, median reported")
        self.add("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 with --smoke)")
        self.add("--cudnn-benchmark", action="store_true", help="set torch.backends.cudnn.benchmark")
        self.add("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
        self.add("--tag", default="", help="write <name>-<device>-<tag>.json (default: no tag; 'smoke' with --smoke)")
        self.add("--smoke", action="store_true", help="tiny models and sizes: proves the script runs, in seconds (the numbers mean nothing)")
        self.rows: list[dict] = []
        self.extra: dict = {}

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """The arguments; applies --threads (1 with --smoke: tiny ops on a busy machine mostly wait in OpenMP barriers) and --cudnn-benchmark."""
        args = self.args = self.parser.parse_args(argv)
        if args.device == "cuda" and not torch.cuda.is_available():
            self.parser.error("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        args.threads = args.threads or (1 if args.smoke else None)
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        return args

    def start(self, title: str, tables: Sequence[Table], tag: str | None = None, device: str | None = None, **settings) -> None:
        """Name the results (`<name>-<device>[-<tag>]`), record the machine and the command, announce them."""
        args = self.args
        self.device = torch.device(device or args.device)
        self.title, self.tables = title, list(tables)
        tag = args.tag or (tag or "") + ("-smoke" if tag and args.smoke else "smoke" if args.smoke else "")
        args.out.mkdir(parents=True, exist_ok=True)
        self.json_path = args.out / f"{self.name}-{self.device.type}{'-' + tag if tag else ''}.json"
        self.png_path = self.json_path.with_suffix(".png")
        self.machine = machine_info(self.device)
        self.command = shlex.join(["python", f"benchmarks/{self.name}.py", *sys.argv[1:]])
        self.extra["settings"] = settings
        from rich.console import Console

        self.console = Console(highlight=False, width=max(Console().width, 120))  # pipes and logs default to 80 columns
        self.console.print(f"[bold]{title}[/] on {describe_machine(self.machine)}", markup=True)

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def add_row(self, row: dict) -> dict:
        """Keep a row: print its table's columns on one line and save every row so far."""
        self.rows.append(row)
        table = next((t for t in self.tables if t.rows([row])), None)
        columns = shown_columns(table.columns, [row]) if table else {}
        self.say("  " + "  ".join(f"{header} {fmt(row[key])}" for key, header in columns.items()))
        self.save()
        return row

    def save(self, **extra) -> None:
        self.extra.update(extra)
        tables = [asdict(t) for t in self.tables]
        data = {"machine": self.machine, "command": self.command, **self.extra, "tables": tables, "rows": self.rows}
        with atomic_path(self.json_path) as tmp:
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")

    @contextlib.contextmanager
    def interruptible(self):
        """Ctrl-C stops measuring; the tables, goals and plot then show what was measured."""
        try:
            yield
        except KeyboardInterrupt:
            self.say("interrupted: the tables and the plot show what was measured")

    def finish(self, goals: Sequence[dict] = (), panels: Sequence[Panel] = (), columns: int | None = None) -> None:
        """Print every table and the goals, save them, draw the panels."""
        for table in self.tables:
            print_table(table, self.rows, self.console)
        if goals:
            print_table(Table("Goals", {key: key for key in ("goal", "value", "target", "met")}), goals, self.console)
        self.save(goals=list(goals))
        where = self.machine.get("gpu") or self.machine["cpu"]
        plot_panels(self.png_path, panels, f"{self.title} — {where}, torch {self.machine['torch']}, {self.machine['date'][:10]}", columns)
        self.say(f"wrote {self.json_path} and {self.png_path}")
