"""Converting a released-size reference checkpoint: time and peak memory of `infd convert-official`.

    python benchmarks/convert_official.py                 # a synthetic DM-stage file of the released shapes (~2.5 GB)
    python benchmarks/convert_official.py --ckpt FILE     # a real released file
    python benchmarks/convert_official.py --smoke         # the tiny test fixture, seconds

The synthetic file has every key and shape of the released DM-stage models (tests/fixtures/
reference/real_sizes.json) with random values; the conversion runs in a fresh process.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from harness import MIB, REPO_ROOT, Benchmark, Panel, Series, Table, goal, measure_fresh

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "reference"
COLUMNS = dict(file="file", file_mib="file MiB", median_s="convert s", peak_mib="peak RSS MiB", peak_over_file="peak / file", output_mib="output MiB")


def synthetic_checkpoint(path: Path) -> None:
    """A DM-stage file with the released models' keys and shapes (random values; the released files carry no optimizer state)."""
    spec, generator = json.loads((FIXTURES / "real_sizes.json").read_text())["dm_stage"], torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in spec["keys"].items()}
    torch.save({"model": {"name": "infd", "args": spec["args"], "sd": state, "load_ckpt": "save/ae_ffhq/last-model.pth"}, "iter": 600000}, path)


def conversion(ckpt: str, out: str):
    """In a fresh process: the conversion, timed from start to the renamed folder (harness.measure_fresh)."""
    from infd.official import convert_official

    return functools.partial(convert_official, ckpt, out)


def main() -> None:
    bench = Benchmark("convert_official", __doc__)
    bench.add("--ckpt", type=Path, help="a real reference checkpoint (default: a synthetic one of the released shapes)")
    args = bench.parse()
    bench.start("convert-official benchmark", [Table("Converting a reference checkpoint (fresh process, CPU)", COLUMNS)], device="cpu", ckpt=str(args.ckpt or "synthetic"))
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        ckpt = args.ckpt or Path(tmp) / "dm-stage.pth"
        if args.smoke and not args.ckpt:
            shutil.copy(FIXTURES / "dm_stage.pth", ckpt)
        elif not args.ckpt:
            synthetic_checkpoint(ckpt)
        result = measure_fresh(conversion, str(ckpt), str(Path(tmp) / "converted"), preload=("torch", "infd.official"))
        if "median_s" not in result:
            raise SystemExit(f"the conversion failed: {result.get('note')}")
        output = sum(p.stat().st_size for p in (Path(tmp) / "converted").rglob("*") if p.is_file())
        name = ckpt.name if args.ckpt or args.smoke else "synthetic (released shapes)"
        row = bench.add_row(dict(result, file=name, file_mib=ckpt.stat().st_size / MIB, peak_over_file=result["peak_mib"] * MIB / ckpt.stat().st_size, output_mib=output / MIB))
    goals = [goal("conversion time (s)", row["median_s"], 120, "s", True), goal("peak memory (GiB)", row["peak_mib"] / 1024, 4, "GiB", True)]
    goals.append(goal("peak / file size", row["peak_over_file"], 1.5, lower_is_better=True))
    marks = (("file", "file_mib", "s"), ("peak RSS", "peak_mib", "o"), ("output", "output_mib", "^"))
    series = [Series(label, [1], [row[key]], style=dict(marker=marker, linestyle="")) for label, key, marker in marks]
    bench.finish(goals, [Panel("memory of the conversion", "", "MiB", series, logx=False, logy=False, xticks={1: row["file"]})])


if __name__ == "__main__":
    main()
