"""Helpers shared by the benchmarks: machine description, timing, peak memory, results.

Every benchmark prints a rich table, writes `results/<name>-<device>.json` (machine +
rows) and a PNG plot beside it. CPU peak memory is the peak RSS of a fresh process per
measurement; CUDA peak memory comes from the caching allocator's statistics.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infd import system

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


# ---------------------------------------------------------------- machine


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on: CPU (model, vector instructions), cores, threads, torch, GPU, date, commit.

    The CPU, its vector instructions, bfloat16 and the allocator come from `infd.system`,
    as `infd doctor` reports them.
    """
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type,
        "cpu": system.cpu_info().model,
        "cpu_flags": system.vector_extensions(),
        "bf16_fast": system.fast_bf16(device),
        "allocator": system.tune_allocator(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    return info


def describe_machine(info: dict) -> str:
    """One line for the console (and the README): CPU, vector instructions, cores, threads, load, torch, commit."""
    flags = " ".join(info.get("cpu_flags") or []) or "no AVX2"
    text = f"{info['cpu']} ({flags}; {info['cpu_affinity'] or info['cpu_count']} cores, {info['torch_threads']} torch threads)"
    if info.get("gpu"):
        text = f"{info['gpu']} ({info['gpu_memory_gib']} GiB), " + text
    load = info.get("load_average")
    if load:
        text += f", load {load[0]:.1f}"
    return f"{text}, torch {info['torch']}, commit {(info['git_commit'] or '?')[:9]}{'+dirty' if info['git_dirty'] else ''}"


# ---------------------------------------------------------------- timing


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


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------- memory


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; falls back to the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def minor_faults() -> int:
    """Minor page faults of this process so far: pages the kernel mapped in on first touch (fresh memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_cuda_peak(device: torch.device) -> int:
    """Start a CUDA peak-memory window; returns the bytes allocated now (the baseline)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def cuda_peak_bytes(device: torch.device) -> int:
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def run_in_fresh_process(function: Callable, *args, preload: Sequence[str] = ("torch",), env: Mapping[str, str] | None = None):
    """`function(*args)` in a new process; returns its result, or {"error": "..."} if it dies.

    For CPU peak memory: ru_maxrss only ever grows, so each measurement needs a process
    of its own. The processes fork from a forkserver that has imported `preload` (but
    never run torch, so thread pools start clean): each starts in about a second instead
    of paying for the imports again. `function` must be defined at module level.
    `env`: environment variables the process starts with (e.g. INFD_MALLOC_TUNING=0, read
    when infd is imported); such a process is spawned, since the forkserver has imported
    infd already.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    if env is None and "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))  # takes effect when the server starts
    else:
        context = multiprocessing.get_context("spawn")
    with environment(env or {}), ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(function, *args).result()
        except BrokenProcessPool:
            return {"error": "the measuring process died (out of memory?)"}


@contextlib.contextmanager
def environment(variables: Mapping[str, str]):
    """Set environment variables (for the processes started meanwhile), then restore them."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------- results


def result_path(name: str, device: torch.device, suffix: str, tag: str = "", out_dir: Path | None = None) -> Path:
    """results/<name>-<device>[-<tag>].<suffix>, creating the folder."""
    folder = out_dir or RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{device.type}{'-' + tag if tag else ''}.{suffix}"


def write_json(path: Path, machine: dict, rows: list[dict], **extra) -> None:
    path.write_text(json.dumps({"machine": machine, **extra, "rows": rows}, indent=2, default=str) + "\n")


class BenchmarkRun:
    """The frame every benchmark script shares: a console, the machine (announced on start),
    results/<name>-<device>[-<tag>].json and .png, the tables and the closing line.

        run = BenchmarkRun("render", device, tag, args.out, "render benchmark")
        run.save(rows, settings=settings)        # after every row: an interrupted run keeps them
        run.table("Render throughput", COLUMNS, rows); run.goals(goals)
        plot(run.png_path, run.machine, rows); run.done()
    """

    def __init__(self, name: str, device: torch.device, tag: str = "", out_dir: Path | None = None, title: str | None = None):
        self.console = make_console()
        self.machine = machine_info(device)
        self.json_path = result_path(name, device, "json", tag, out_dir)
        self.png_path = result_path(name, device, "png", tag, out_dir)
        self.console.print(f"[bold]{title or name + ' benchmark'}[/] on {describe_machine(self.machine)}")

    @property
    def machine_name(self) -> str:
        return self.machine.get("gpu") or self.machine["cpu"]

    def save(self, rows: list[dict], **extra) -> None:
        write_json(self.json_path, self.machine, rows, **extra)

    def table(self, title: str, columns: Sequence[Column], rows: Sequence[dict]) -> None:
        print_table(title, columns, rows)

    def goals(self, goals: Sequence[dict]) -> None:
        if goals:
            print_table("Goals", GOAL_COLUMNS, goals)

    def done(self) -> None:
        self.console.print(f"wrote {self.json_path} and {self.png_path}")


@dataclass
class Column:
    """A table column: `key` into each row, `fmt` turns the value into text."""

    key: str
    header: str
    fmt: Callable[[object], str] = str
    justify: str = "right"


GOAL_COLUMNS = [
    Column("goal", "goal", justify="left"),
    Column("value", "value", lambda v: f"{v:.3f}"),
    Column("target", "target"),
    Column("met", "met", lambda v: "yes" if v else "NO"),
]  # for rows {"goal", "value", "target", "met"}


def goal(name: str, value: float, target: float, unit: str = "", lower_is_better: bool = False) -> dict:
    """One row of a benchmark's goals: did `value` reach `target` (>= by default, <= if lower is better)?"""
    met = value <= target if lower_is_better else value >= target
    bound = f"{'<=' if lower_is_better else '>='} {target:g}" + (f" {unit}" if unit else "")
    return {"goal": name, "value": value, "target": bound, "met": met}


def make_console():
    """A rich console at least 120 columns wide (pipes and logs default to 80)."""
    from rich.console import Console

    console = Console()
    console.width = max(console.width, 120)
    return console


def print_table(title: str, columns: Sequence[Column], rows: Sequence[dict]) -> None:
    """A rich table of `rows`; columns whose values are all missing are left out."""
    from rich.table import Table

    shown = [c for c in columns if any(row.get(c.key) is not None for row in rows)]
    table = Table(title=title)
    for column in shown:
        table.add_column(column.header, justify=column.justify)
    for row in rows:
        table.add_row(*("—" if row.get(c.key) is None else c.fmt(row[c.key]) for c in shown))
    make_console().print(table)


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]
    style: dict = field(default_factory=dict)  # matplotlib keyword arguments


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    logx: bool = True
    logy: bool = True
    note: str = ""  # small text under the title
    xticks: dict[float, str] = field(default_factory=dict)  # value -> label, replacing the default ticks


def plot_panels(path: Path, panels: Sequence[Panel], title: str, columns: int | None = None) -> None:
    """Panels side by side (`columns` per row; default all in one), one line (with markers) per series, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cols = columns or len(panels)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        for s in panel.series:
            if s.x:
                ax.plot(s.x, s.y, label=s.label, **{"marker": "o", **s.style})
        ax.set_xscale("log" if panel.logx else "linear")
        ax.set_yscale("log" if panel.logy else "linear")
        plain_numbers = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
        for axis, log in ((ax.xaxis, panel.logx), (ax.yaxis, panel.logy)):
            if log:
                axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(plain_numbers)
                axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if panel.xticks:
            ax.set_xticks(list(panel.xticks), list(panel.xticks.values()))
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title + (f"\n{panel.note}" if panel.note else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if any(s.x for s in panel.series):
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
