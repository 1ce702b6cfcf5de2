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
class Line:
    """One line of a plot panel: y (and error bars) over the scales."""

    label: str
    x: list[float]
    y: list[float]
    err: list[float] = field(default_factory=list)
    floor: bool = False  # a model-free reference: drawn dashed, without markers


def plot_scales(path: Path, panels: list[tuple[str, str, list[Line]]], scales: list[int], title: str) -> None:
    """Panels (title, y label, lines) side by side, x = scale on a log axis, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [panel for panel in panels if any(line.x for line in panel[2])]
    cols = max(1, min(len(panels), 4))
    grid_rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(grid_rows, cols, figsize=(4.6 * cols, 4.0 * grid_rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (name, ylabel, lines) in zip(axes.flat, panels):
        for line in lines:
            if line.x and line.floor:
                ax.plot(line.x, line.y, linestyle="--", color="0.45" if line.label == "thumbnail" else "0.7", label=f"{line.label} (floor)")
            elif line.x:
                err = [e if e is not None else 0 for e in line.err] if line.err else None
                ax.errorbar(line.x, line.y, yerr=err, marker="o", capsize=3, label=line.label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(scales, [str(s) for s in scales])
        ax.minorticks_off()
        ax.set_xlabel("scale (px)")
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
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


def metric_panels(rows: list[dict], names: tuple[str, ...], series_key: str) -> list[tuple[str, str, list[Line]]]:
    panels = []
    for name in names:
        lines = []
        for label in dict.fromkeys(r[series_key] for r in rows):
            points = [r for r in rows if r[series_key] == label and r.get(name) is not None and math.isfinite(r[name])]
            floor = any(r.get("renderer") == "floor" for r in points)
            lines.append(Line(label, [r["scale"] for r in points], [r[name] for r in points], [r.get(f"{name}_ci") for r in points], floor))
        panels.append((METRIC_TITLES[name][0], METRIC_TITLES[name][1], lines))
    return panels

