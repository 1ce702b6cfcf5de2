"""Converting a released-size reference checkpoint: time and peak memory of `infd convert-official`.

    python benchmarks/convert_official.py                 # a synthetic DM-stage file of the real shapes (~2.5 GB)
    python benchmarks/convert_official.py --ckpt FILE     # a real released file
    python benchmarks/convert_official.py --quick         # a small file (smoke test, seconds)

The synthetic file has every key and shape of the released DM-stage models
(tests/fixtures/reference/real_sizes.json: autoencoder, LPIPS, discriminator, UNet and its
EMA) with random values: the released files' size (about 2.5 GB; they carry no optimizer
state). A 4.5 GB file with the UNet's Adam moments converted in 8.7 s at 1.98 GB peak. The conversion runs in a fresh process
(its peak RSS is the conversion's alone) and is timed from start to the renamed folder.
Goals: under 2 minutes and under 4 GB peak on 2 CPU cores, and under 1.5x the file's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import MIB, BenchmarkRun, Column, Panel, Series, goal, peak_rss_bytes, plot_panels, run_in_fresh_process

REAL_SIZES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "reference" / "real_sizes.json"
COLUMNS = [
    Column("file", "file", justify="left"),
    Column("file_mib", "file MiB", lambda v: f"{v:,.0f}"),
    Column("seconds", "convert s", lambda v: f"{v:.1f}"),
    Column("peak_mib", "peak RSS MiB", lambda v: f"{v:,.0f}"),
    Column("peak_over_file", "peak / file", lambda v: f"{v:.2f}"),
    Column("output_mib", "output MiB", lambda v: f"{v:,.0f}"),
]


def synthetic_checkpoint(path: Path, quick: bool) -> None:
    """A DM-stage file with the released models' keys and shapes (random values) and UNet Adam moments."""
    spec = json.loads(REAL_SIZES.read_text())["dm_stage"]
    generator = torch.Generator().manual_seed(0)
    if quick:  # the tiny fixture's file instead: the same code path in seconds
        shutil.copy(REAL_SIZES.parent / "dm_stage.pth", path)
        return
    state = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in spec["keys"].items()}
    model = {"name": "infd", "args": spec["args"], "sd": state, "load_ckpt": "save/ae_ffhq/last-model.pth"}
    torch.save({"model": model, "iter": 600000}, path)  # the released files carry no optimizer state (~2.5 GB)


def convert_in_this_process(ckpt: str, out: str) -> dict:
    """Run in a fresh process: convert, return seconds and this process's peak RSS."""
    from infd.official import convert_official

    start = time.perf_counter()
    convert_official(ckpt, out)
    return {"seconds": time.perf_counter() - start, "peak_bytes": peak_rss_bytes()}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="A real reference checkpoint (default: a synthetic one of the released shapes).")
    parser.add_argument("--quick", action="store_true", help="Convert the tiny test fixture instead (smoke test).")
    parser.add_argument("--out", type=Path, default=None, help="Results folder (default benchmarks/results).")
    args = parser.parse_args()
    run = BenchmarkRun("convert_official", torch.device("cpu"), "quick" if args.quick else "", args.out, "convert-official benchmark")
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        ckpt = args.ckpt or Path(tmp) / "synthetic-dm-stage.pth"
        if args.ckpt is None:
            start = time.perf_counter()
            synthetic_checkpoint(ckpt, args.quick)
            run.console.print(f"wrote the synthetic checkpoint ({ckpt.stat().st_size / MIB:,.0f} MiB) in {time.perf_counter() - start:.0f} s")
        out = Path(tmp) / "converted"
        result = run_in_fresh_process(convert_in_this_process, str(ckpt), str(out))
        if "error" in result:
            raise SystemExit(f"the conversion failed: {result['error']}")
        size = ckpt.stat().st_size
        row = {
            "file": "synthetic (released shapes)" if args.ckpt is None and not args.quick else str(ckpt.name),
            "file_mib": size / MIB,
            "seconds": result["seconds"],
            "peak_mib": result["peak_bytes"] / MIB,
            "peak_over_file": result["peak_bytes"] / size,
            "output_mib": folder_bytes(out) / MIB,
        }
    rows = [row]
    run.save(rows)
    run.table("Converting a reference checkpoint (fresh process, CPU)", COLUMNS, rows)
    goals = [
        goal("conversion time (s)", row["seconds"], 120, "s", lower_is_better=True),
        goal("peak memory (GiB)", row["peak_mib"] / 1024, 4, "GiB", lower_is_better=True),
        goal("peak / file size", row["peak_over_file"], 1.5, lower_is_better=True),
    ]
    run.goals(goals)
    series = [Series(label, [1], [row[key]], dict(marker=marker, linestyle="")) for label, key, marker in (("file", "file_mib", "s"), ("peak RSS", "peak_mib", "o"), ("output", "output_mib", "^"))]
    panel = Panel("memory of the conversion", "", "MiB", series, logx=False, logy=False, xticks={1: row["file"]})
    plot_panels(run.png_path, [panel], f"convert-official: {row['seconds']:.1f} s on {run.machine_name}")
    run.done()


if __name__ == "__main__":
    main()
