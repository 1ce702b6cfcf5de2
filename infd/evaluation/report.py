"""What an evaluation writes: the machine it ran on, markdown tables, goals, JSON and plots over scales, each written atomically."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

import infd
from infd import system
from infd.files import atomic_path

METRIC_TITLES = {
    "psnr": ("PSNR", "dB, higher is better"),
    "ssim": ("SSIM", "higher is better"),
    "lpips": ("LPIPS", "lower is better"),
    "spectral_db": ("spectral distance (detail)", "dB, lower is better"),
    "consistency_db": ("scale consistency", "PSNR vs the largest render, dB"),
    "colour": ("colour error", "|channel mean difference|, /255, lower is better"),
    "rim_db": ("rim", "interior minus border PSNR, dB, lower is better"),
    "blockiness": ("blockiness", "cell-edge step / other steps, 1 = smooth"),
    "zoom_blockiness": ("blockiness at 4x zoom", "of the largest scale; 1 = smooth"),
    "fid": ("FID / patch-FID (Inception)", "lower is better"),
    "rfid": ("random-feature Fréchet distance", "lower is better"),
}


def machine_summary(device: torch.device) -> dict:
    """What the numbers were measured on: `infd.system.machine_record` and infd's version."""
    return {**system.machine_record(device), "infd": infd.__version__}


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def number_text(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def with_ci(mean, ci, digits: int) -> str:
    return number_text(mean, digits) + ("" if ci is None or mean is None else f" ± {ci:.{digits}f}")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass
class Series:
    """One line of a plot panel: y (with error bars if `err`) over x; `style`: matplotlib keywords."""

    label: str
    x: list[float]
    y: list[float]
    err: list[float | None] = field(default_factory=list)
    style: dict = field(default_factory=dict)


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


def plot_panels(path: Path, panels: list[Panel], title: str, columns: int | None = None) -> None:
    """Panels side by side (`columns` per row; default all, at most 4), a line with markers per series, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker

    panels = [panel for panel in panels if any(s.x for s in panel.series)] or panels[:1]
    cols = columns or max(1, min(len(panels), 4))
    grid_rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(grid_rows, cols, figsize=(5.6 * cols, 4.4 * grid_rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels, strict=False):
        for s in (s for s in panel.series if s.x):
            err = [e if e is not None else 0 for e in s.err] if s.err else None
            ax.errorbar(s.x, s.y, yerr=err, label=s.label, capsize=3 if err else 0, **{"marker": "o", **s.style})
        for axis, log, set_scale in ((ax.xaxis, panel.logx, ax.set_xscale), (ax.yaxis, panel.logy, ax.set_yscale)):
            set_scale("log" if log else "linear")
            if log:
                axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
                axis.set_minor_formatter(ticker.NullFormatter())
        if panel.xticks:
            ax.set_xticks(list(panel.xticks), list(panel.xticks.values()))
            ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.set_title(panel.title + (f"\n{panel.note}" if panel.note else ""), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if any(s.x for s in panel.series):
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def goal_row(goal: str, value: float, target: str, met: bool) -> dict:
    return {"goal": goal, "value": value, "target": target, "met": bool(met)}


def goals_markdown(goals: list[dict]) -> str:
    rows = [[g["goal"], number_text(g["value"], 3), g["target"], "yes" if g["met"] else "**no**"] for g in goals]
    return markdown_table(["goal", "value", "target", "met"], rows)


def machine_line(machine: dict) -> str:
    where = machine.get("gpu") or f"{machine.get('cpu')} ({machine.get('cpu_count')} cores)"
    return f"{where}, torch {machine.get('torch')}, {str(machine.get('date', ''))[:10]}"


def metric_panels(rows: list[dict], names: tuple[str, ...], series_key: str, scales: list[int]) -> list[Panel]:
    """A panel per metric over the scales (log x), a line per `series_key` value; floors dashed and grey, without markers."""
    panels = []
    for name in names:
        lines = []
        for label in dict.fromkeys(r[series_key] for r in rows):
            points = [r for r in rows if r[series_key] == label and r.get(name) is not None and math.isfinite(r[name])]
            floor = any(r.get("renderer") == "floor" for r in points)
            style = {"linestyle": "--", "marker": "", "color": "0.45" if label == "thumbnail" else "0.7"} if floor else {}
            x, y = [r["scale"] for r in points], [r[name] for r in points]
            lines.append(Series(f"{label} (floor)" if floor else label, x, y, [] if floor else [r.get(f"{name}_ci") for r in points], style))
        panels.append(Panel(METRIC_TITLES[name][0], "scale (px)", METRIC_TITLES[name][1], lines, logy=False, xticks={s: str(s) for s in scales}))
    return panels
