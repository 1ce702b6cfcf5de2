"""Learning curves of autoencoder recipes: held-out quality against training samples seen and wall-clock time.

    python benchmarks/train_ae.py --data ../shared/data/wallpapers --holdout --run anchored=runs/ae-cpu --run plain=runs/ae-plain
    python benchmarks/train_ae.py --data ../shared/data/wallpapers --holdout --recipe anchored=configs/ae-wallpapers-cpu.json --minutes 30
    python benchmarks/train_ae.py --smoke        # a tiny recipe on generated images, seconds

Every kept checkpoint of each run (`"keep_checkpoints"` large), evaluated with `infd.evaluation`
beside the model-free floors; time is the run's own training time (`elapsed_s` in log.jsonl).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from harness import TINY_AE, Benchmark, Panel, Table, hline, lines
from PIL import Image

from infd import evaluation, store
from infd.data import WALLPAPER_HOLDOUT
from infd.training.autoencoder import AETrainConfig, train_autoencoder

MARKS_MIN = (30, 120)  # the wall-clock points the issue asked about
METRICS = ("scale", "psnr", "spectral_db", "colour", "rim_db", "blockiness", "zoom_blockiness")
COLUMNS = dict(recipe="recipe", step="step", samples="samples", minutes="minutes", scale="scale", psnr="PSNR (dB)", spectral_db="spectral (dB)", colour="colour (/255)", rim_db="rim (dB)")
COLUMNS.update(blockiness="blockiness", zoom_blockiness=f"blockiness {evaluation.ZOOM}x", at_minutes="at minutes", reached="run got there", over_thumbnail_db="over thumbnail (dB)")
TABLES = [Table("Autoencoder learning curves (held out)", COLUMNS, "curve"), Table("Model-free floors", COLUMNS, "floor"), Table("After 30 and 120 training minutes", COLUMNS, "mark")]
SMOKE_CONFIG = dict(model={k: v for k, v in TINY_AE.items() if k != "input_size"}, data={"input_size": 32, "crop_size": 24}, steps=4, batch_size=2, perceptual="ffl", gan_weight=0, num_workers=0)


def labelled(text: str, what: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise SystemExit(f"{what} '{text}' must be LABEL=PATH.")
    return label, Path(path)


def run_times(run: Path) -> dict[int, float]:
    """Training seconds at each logged step: `elapsed_s`, or for older logs (s - the session's first step) * batch / rate,
    sessions following each other (`stopped` records)."""
    batch = json.loads((run / "train_config.json").read_text())["batch_size"]
    times, offset, first, last = {}, 0.0, 0, 0.0
    for record in map(json.loads, (run / "log.jsonl").read_text().splitlines()):
        if "stopped" in record:
            offset, first = last, record["step"]
        elif "elapsed_s" in record or "images_per_s" in record:
            last = times[record["step"]] = record.get("elapsed_s", offset + (record["step"] - first) * batch / record.get("images_per_s", 1))
    return times


def time_at(times: dict[int, float], step: int) -> float | None:
    """Training seconds at `step`, interpolated between logged steps (and from 0 at step 0)."""
    return float(np.interp(step, [0, *sorted(times)], [0.0, *(times[s] for s in sorted(times))])) if times else None


def continued_from(config: dict, run: Path) -> tuple[float, int]:
    """(seconds, samples) a run started with `--init` from another run's checkpoint had already had there, so that
    the continuation extends that run's curve (give both one label). The init path is as train-ae was given it."""
    init = next((p for p in (Path(config.get("init") or "-"), run.parent.parent / (config.get("init") or "-")) if p.is_dir()), None)
    init = store.find_checkpoint(init) if init else None
    parent = init.parent.parent if init else None
    if parent is None or not (parent / "log.jsonl").is_file() or not init.name.startswith("step_"):
        return 0.0, 0
    step, parent_config = int(init.name.split("_")[1]), json.loads((parent / "train_config.json").read_text())
    seconds, samples = continued_from(parent_config, parent)
    return seconds + (time_at(run_times(parent), step) or 0.0), samples + step * parent_config["batch_size"]


def evaluate(bench: Benchmark, label: str, folder: Path, paths, scales, floors: bool, **where) -> None:
    """Rows of one checkpoint (and the floors, once)."""
    entry = evaluation.EvalModel(label, store.load_autoencoder(folder, bench.device), None, str(folder))
    for row in evaluation.evaluate_autoencoders(paths, [entry], scales, progress=False, floors=floors)["rows"]:
        floor = row["renderer"] == "floor"
        bench.add_row({"section": "floor" if floor else "curve", "recipe": f"{row['model']} (floor)" if floor else label, **({} if floor else where), **{k: row[k] for k in METRICS}})


def evaluate_run(bench: Benchmark, label: str, run: Path, paths, scales, every: int) -> None:
    config = json.loads((run / "train_config.json").read_text())
    times, (seconds_before, samples_before) = run_times(run), continued_from(config, run)
    for folder in store.checkpoint_dirs(run)[::-1][::every][::-1]:  # always the last one
        step, seconds = int(folder.name.split("_")[1]), time_at(times, int(folder.name.split("_")[1]))
        minutes = None if seconds is None else (seconds_before + seconds) / 60
        evaluate(bench, label, folder, paths, scales, not any(r["section"] == "floor" for r in bench.rows), step=step, samples=samples_before + step * config["batch_size"], minutes=minutes)


def marks(rows: list[dict]) -> list[dict]:
    """Where each recipe stands after 30 and 120 minutes (its last checkpoint at or before them)."""
    out = []
    curves = [r for r in rows if r["section"] == "curve" and r.get("minutes") is not None]
    for recipe in dict.fromkeys(r["recipe"] for r in curves):
        for scale in sorted({r["scale"] for r in curves}):
            points = sorted((r for r in curves if r["recipe"] == recipe and r["scale"] == scale), key=lambda r: r["minutes"])
            floor = next((r["psnr"] for r in rows if r["recipe"] == "thumbnail (floor)" and r["scale"] == scale), None)
            for minutes in MARKS_MIN:
                row = ([r for r in points if r["minutes"] <= minutes + 1e-9] or [None])[-1]
                psnr, reached = row and row["psnr"], points[-1]["minutes"] >= minutes - 1
                over = psnr - floor if psnr and floor else None
                out.append(dict(section="mark", recipe=recipe, scale=scale, at_minutes=minutes, reached=reached, step=row and row["step"], psnr=psnr, over_thumbnail_db=over))
    return out


def panels(rows: list[dict], scale: int) -> list[Panel]:
    curves = [r for r in rows if r["section"] == "curve" and r["scale"] == scale]
    floors = {r["recipe"]: r for r in rows if r["section"] == "floor" and r["scale"] == scale}
    out = []
    metrics = (("psnr", f"held-out PSNR at {scale}", "dB"), ("spectral_db", f"detail: spectral distance at {scale}", "dB, lower is better"))
    for key, title, unit in (*metrics, ("zoom_blockiness", f"blockiness at {evaluation.ZOOM}x zoom of {scale}", "1 = smooth")):
        for x, xlabel in (("samples", "training samples seen"), ("minutes", "training wall-clock (minutes)")):
            xs = [r[x] for r in curves if r.get(x) is not None]
            greys = (("thumbnail (floor)", "0.4"), ("input (floor)", "0.7"))
            reference = [hline(name, xs, floor[key], color=grey, linestyle="--") for name, grey in greys if xs and (floor := floors.get(name)) and floor.get(key) is not None]
            out.append(Panel(title, xlabel, unit, lines(curves, x, key, "recipe") + reference, logx=False, logy=False, note="marks: 30 and 120 minutes" if x == "minutes" else ""))
    return out


def smoke_inputs(folder: Path) -> tuple[Path, Path]:
    """Three small generated images and a tiny recipe (a few steps, a checkpoint each)."""
    (folder / "images").mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
    (folder / "tiny.json").write_text(json.dumps(SMOKE_CONFIG))
    return folder / "images", folder / "tiny.json"


def main() -> None:
    bench = Benchmark("train_ae", __doc__)
    bench.add("--run", action="append", default=[], help="LABEL=RUN: an existing training run to evaluate")
    bench.add("--recipe", action="append", default=[], help="LABEL=CONFIG: train this recipe for --minutes first (in --runs-dir)")
    bench.add("--reference", action="append", default=[], help="LABEL=CKPT@MINUTES@SAMPLES: a trained model shown as one point (e.g. an older recipe's weights)")
    bench.add("--minutes", type=float, default=30.0)
    bench.add("--checkpoint-every", type=int, default=250)
    bench.add("--runs-dir", type=Path, default=Path("runs/learning-curves"))
    bench.add("--data", type=Path, help="the image folder (the wallpapers)")
    bench.add("--holdout", action="store_true", help="evaluate on the held-out split (and train without it)")
    bench.add("--limit", type=int, help="evaluate on the first N images only")
    bench.add("--scales", default="512")
    bench.add("--every", type=int, default=1, help="evaluate every N-th checkpoint (the last always)")
    args = bench.parse()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.data, config = smoke_inputs(Path(tmp))
            args.recipe, args.runs_dir, args.checkpoint_every, args.scales, args.minutes = [f"tiny={config}"], Path(tmp) / "runs", 2, "64", 1.0
        if args.data is None or not (args.run or args.recipe):
            bench.parser.error("pass --data FOLDER and --run LABEL=RUN or --recipe LABEL=CONFIG")
        runs = [labelled(text, "--run") for text in args.run]
        for label, path in (labelled(text, "--recipe") for text in args.recipe):
            config = AETrainConfig.load(path)
            config.time_limit, config.checkpoint_every, config.keep_checkpoints, config.sample_every = args.minutes, args.checkpoint_every, 10_000, 10**9
            resume = bool(store.checkpoint_dirs(args.runs_dir / label))
            train_autoencoder(config, args.data, args.runs_dir / label, resume=resume, exclude=WALLPAPER_HOLDOUT if args.holdout else (), progress=not args.smoke)
            runs.append((label, args.runs_dir / label))
        scales = evaluation.parse_scales(args.scales)
        paths, _ = evaluation.select_images(args.data, args.holdout, args.limit)
        bench.start("autoencoder learning curves", TABLES, scales=scales, images=[p.name for p in paths], runs=[[label, str(run)] for label, run in runs], every=args.every)
        with bench.interruptible():
            for label, run in runs:
                evaluate_run(bench, label, run, paths, scales, args.every)
            for label, spec in (labelled(text, "--reference") for text in args.reference):
                if len(parts := str(spec).split("@")) != 3:
                    bench.parser.error(f"--reference {label}={spec} must be LABEL=CKPT@MINUTES@SAMPLES")
                evaluate(bench, label, Path(parts[0]), paths, scales, False, step=None, minutes=float(parts[1]), samples=int(parts[2]))
    bench.rows += marks(bench.rows)
    bench.finish(panels=panels(bench.rows, scales[0]), columns=2)


if __name__ == "__main__":
    main()
