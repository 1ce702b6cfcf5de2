"""Learning curves of autoencoder recipes: held-out quality against samples seen and wall-clock time.

For each run (a `infd train-ae` folder that kept its checkpoints, `"keep_checkpoints"`
large), every checkpoint (or every `--every`-th) is evaluated on the held-out
wallpapers with `infd.evaluation.evaluate_autoencoders` at `--scales` (default 512):
PSNR, detail (spectral distance), colour error, rim and blockiness, the last also at a
4x zoom of the largest scale (at 512: a window of the 2048 render, 16 px per cell of a
128² phi). The model-free floors (the latent's worth of thumbnail and the encoder's
input, bicubic up) are drawn as horizontal lines. Wall-clock time is the run's own
training time (`elapsed_s` in its log.jsonl, or derived from the logged rates for older
runs), so the curves say what 30 or 120 minutes of the machine buys.

    python benchmarks/train_ae.py --run anchored=runs/ae-cpu --run plain=runs/ae-plain \\
        --data ../shared/data/wallpapers --holdout
    python benchmarks/train_ae.py --recipe anchored=configs/ae-wallpapers-cpu.json --minutes 30 ...

`--recipe LABEL=CONFIG --minutes N` first trains the recipe for N minutes (a fresh run
in `--runs-dir`, checkpoints every `--checkpoint-every` steps), then evaluates it.
Evaluation is not timed: run it when the machine is otherwise idle only for the
training half.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BenchmarkRun, Column, Panel, Series, plot_panels  # noqa: E402

from infd import evaluation, rendering, store  # noqa: E402
from infd.data import WALLPAPER_HOLDOUT  # noqa: E402
from infd.store import checkpoint_dirs  # noqa: E402
from infd.training.autoencoder import AETrainConfig, train_autoencoder  # noqa: E402

MARKS_MIN = (30, 120)  # the wall-clock points the issue asks about


def parse_labelled(text: str, what: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise SystemExit(f"{what} '{text}' must be LABEL=PATH.")
    return label, Path(path)


def run_times(run: Path) -> dict[int, float]:
    """Training seconds at each logged step of a run: `elapsed_s`, else derived from the logged rates.

    A rate is averaged since its session's start, so a session's elapsed time at step s is
    (s - first step) * batch / rate; sessions follow each other (`stopped` records).
    """
    config = json.loads((run / "train_config.json").read_text())
    batch = config["batch_size"]
    times, offset, session_first, last = {}, 0.0, 0, (0, 0.0)
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "stopped" in record:  # the next session starts from this step, after this session's time
            offset, session_first = last[1], record["step"]
            continue
        if "elapsed_s" in record:
            seconds = record["elapsed_s"]
        elif "images_per_s" in record:
            seconds = offset + (record["step"] - session_first) * batch / record["images_per_s"]
        else:
            continue
        times[record["step"]] = seconds
        last = (record["step"], seconds)
    return times


def time_at(times: dict[int, float], step: int) -> float | None:
    """Training seconds at `step`, interpolated between logged steps."""
    if not times:
        return None
    steps = sorted(times)
    if step <= steps[0]:
        return times[steps[0]] * step / steps[0]
    for a, b in zip(steps, steps[1:]):
        if a <= step <= b:
            return times[a] + (times[b] - times[a]) * (step - a) / (b - a)
    return times[steps[-1]]


def train_recipe(label: str, config_path: Path, data: Path, runs_dir: Path, minutes: float, checkpoint_every: int, holdout: bool) -> Path:
    config = AETrainConfig.load(config_path)
    config.time_limit, config.checkpoint_every, config.keep_checkpoints = minutes, checkpoint_every, 10_000
    config.sample_every = 10**9
    out = runs_dir / label
    resume = bool(checkpoint_dirs(out))
    train_autoencoder(config, data, out, resume=resume, exclude=WALLPAPER_HOLDOUT if holdout else (), progress=True)
    return out


def continued_from(config: dict, run: Path) -> tuple[float, int]:
    """(seconds, samples) a run started with `--init` from another run's checkpoint had already
    had there, so that the continuation extends that run's curve (give both runs one label).
    The init path is as it was given to train-ae: relative to here, or to the runs' parent."""
    if not config.get("init"):
        return 0.0, 0
    init = next((p for p in (Path(config["init"]), run.parent.parent / config["init"]) if p.is_dir()), None)
    if init is not None:
        init = store.find_checkpoint(init)  # a run folder: its newest checkpoint, what --init took
    parent = init.parent.parent if init is not None else None
    if parent is None or not (parent / "log.jsonl").is_file() or not init.name.startswith("step_"):
        return 0.0, 0
    step = int(init.name.split("_")[1])
    parent_config = json.loads((parent / "train_config.json").read_text())
    seconds, samples = continued_from(parent_config, parent)
    own = time_at(run_times(parent), step) or 0.0
    return seconds + own, samples + step * parent_config["batch_size"]


def evaluate_run(label: str, run: Path, paths: list[Path], scales: list[int], every: int, device: torch.device, floors: dict) -> list[dict]:
    """One row per evaluated checkpoint of `run` (and floor rows in `floors`, once)."""
    config = json.loads((run / "train_config.json").read_text())
    batch = config["batch_size"]
    times = run_times(run)
    seconds_before, samples_before = continued_from(config, run)
    checkpoints = checkpoint_dirs(run)
    chosen = checkpoints[::-1][::every][::-1]  # always the last one
    rows = []
    for folder in chosen:
        step = int(folder.name.split("_")[1])
        model = store.load_autoencoder(folder, device)
        entry = evaluation.EvalModel(label, model, None, str(folder))
        with_floors = not floors
        result = evaluation.evaluate_autoencoders(paths, [entry], scales, progress=False, floors=with_floors)
        for row in result["rows"]:
            if row["renderer"] == "floor":
                floors[(row["model"], row["scale"])] = row
                continue
            seconds = time_at(times, step)
            rows.append(
                {
                    "recipe": label,
                    "step": step,
                    "samples": samples_before + step * batch,
                    "minutes": None if seconds is None else (seconds_before + seconds) / 60,
                    **{k: row[k] for k in ("scale", "psnr", "spectral_db", "colour", "rim_db", "blockiness", "zoom_blockiness")},
                }
            )
        print(f"{label} step {step}: " + ", ".join(f"{r['scale']}: {r['psnr']:.2f} dB" for r in rows if r["step"] == step), flush=True)
    return rows


def evaluate_reference(text: str, paths: list[Path], scales: list[int], device: torch.device) -> list[dict]:
    """`LABEL=CKPT@MINUTES@SAMPLES`: one trained model placed on the curves as a single point (e.g. an older recipe's shipped weights)."""
    label, path = parse_labelled(text, "--reference")
    parts = str(path).split("@")
    if len(parts) != 3:
        raise SystemExit(f"--reference '{text}' must be LABEL=CKPT@MINUTES@SAMPLES.")
    folder, minutes, samples = Path(parts[0]), float(parts[1]), int(parts[2])
    entry = evaluation.EvalModel(label, store.load_autoencoder(folder, device), None, str(folder))
    result = evaluation.evaluate_autoencoders(paths, [entry], scales, progress=False, floors=False)
    keys = ("scale", "psnr", "spectral_db", "colour", "rim_db", "blockiness", "zoom_blockiness")
    return [{"recipe": label, "step": None, "samples": samples, "minutes": minutes, **{k: row[k] for k in keys}} for row in result["rows"]]


def curve_panels(rows: list[dict], floors: dict, scale: int) -> list[Panel]:
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    mine = [r for r in rows if r["scale"] == scale]
    panels = []
    for key, title, ylabel in (
        ("psnr", f"held-out PSNR at {scale}", "dB"),
        ("spectral_db", f"detail: spectral distance at {scale}", "dB, lower is better"),
        ("zoom_blockiness", f"blockiness at {evaluation.ZOOM}x zoom of {scale}", "1 = smooth"),
    ):
        for x_key, xlabel in (("samples", "training samples seen"), ("minutes", "training wall-clock (minutes)")):
            series = []
            for recipe in recipes:
                points = sorted((r[x_key], r[key]) for r in mine if r["recipe"] == recipe and r[x_key] is not None and r[key] is not None)
                series.append(Series(recipe, [p[0] for p in points], [p[1] for p in points]))
            xs = [r[x_key] for r in mine if r[x_key] is not None]
            if xs and key in ("psnr", "spectral_db"):
                for name, colour in (("thumbnail", "0.4"), ("input", "0.7")):
                    floor = floors.get((name, scale))
                    if floor is not None and floor.get(key) is not None:
                        series.append(Series(f"{name} (floor)", [min(xs), max(xs)], [floor[key]] * 2, {"linestyle": "--", "marker": "", "color": colour}))
            note = "marks: 30 and 120 minutes" if x_key == "minutes" else ""
            panels.append(Panel(title, xlabel, ylabel, series, logx=False, logy=False, note=note))
    return panels


def marks(rows: list[dict], floors: dict) -> list[dict]:
    """Where each recipe stands after 30 and 120 minutes (the last checkpoint at or before)."""
    out = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        for scale in sorted({r["scale"] for r in rows}):
            points = sorted((r for r in rows if r["recipe"] == recipe and r["scale"] == scale and r["minutes"] is not None), key=lambda r: r["minutes"])
            floor = floors.get(("thumbnail", scale), {}).get("psnr")
            for minutes in MARKS_MIN:
                before = [r for r in points if r["minutes"] <= minutes + 1e-9]
                reached = bool(points) and points[-1]["minutes"] >= minutes - 1
                row = before[-1] if before else None
                out.append(
                    {
                        "recipe": recipe,
                        "scale": scale,
                        "at_minutes": minutes,
                        "reached": reached,
                        "psnr": row["psnr"] if row else None,
                        "over_thumbnail_db": (row["psnr"] - floor) if row and floor is not None else None,
                        "step": row["step"] if row else None,
                    }
                )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], help="LABEL=RUN: an existing training run to evaluate.")
    parser.add_argument("--recipe", action="append", default=[], help="LABEL=CONFIG: train this recipe for --minutes first.")
    parser.add_argument("--reference", action="append", default=[], help="LABEL=CKPT@MINUTES@SAMPLES: a trained model shown as one point.")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/learning-curves"))
    parser.add_argument("--data", type=Path, required=True, help="The image folder (the wallpapers).")
    parser.add_argument("--holdout", action="store_true", help="Evaluate on the held-out split (and train without it).")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate on the first N images only.")
    parser.add_argument("--scales", default="512")
    parser.add_argument("--every", type=int, default=1, help="Evaluate every N-th checkpoint (the last always).")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)

    runs = [parse_labelled(text, "--run") for text in args.run]
    for text in args.recipe:
        label, config = parse_labelled(text, "--recipe")
        runs.append((label, train_recipe(label, config, args.data, args.runs_dir, args.minutes, args.checkpoint_every, args.holdout)))
    if not runs:
        raise SystemExit("pass --run LABEL=RUN or --recipe LABEL=CONFIG.")
    device = rendering.pick_device(args.device)
    bench = BenchmarkRun("train_ae", device, args.tag, title="autoencoder learning curves")
    scales = evaluation.parse_scales(args.scales)
    paths, _ = evaluation.select_images(args.data, args.holdout, args.limit)
    floors: dict = {}
    rows = []
    for label, run in runs:
        rows += evaluate_run(label, run, paths, scales, args.every, device, floors)
    for text in args.reference:
        rows += evaluate_reference(text, paths, scales, device)

    columns = [
        Column("recipe", "recipe", justify="left"),
        Column("step", "step"),
        Column("samples", "samples"),
        Column("minutes", "minutes", lambda v: f"{v:.1f}"),
        Column("scale", "scale"),
        Column("psnr", "PSNR (dB)", lambda v: f"{v:.2f}"),
        Column("spectral_db", "spectral (dB)", lambda v: f"{v:.2f}"),
        Column("colour", "colour (/255)", lambda v: f"{v:.2f}"),
        Column("rim_db", "rim (dB)", lambda v: f"{v:.2f}"),
        Column("blockiness", "blockiness", lambda v: f"{v:.2f}"),
        Column("zoom_blockiness", f"blockiness {evaluation.ZOOM}x", lambda v: f"{v:.2f}"),
    ]
    floor_rows = [{"recipe": f"{name} (floor)", **{k: row.get(k) for k in ("scale", "psnr", "spectral_db", "colour", "rim_db", "blockiness", "zoom_blockiness")}} for (name, _), row in floors.items()]
    bench.table("autoencoder learning curves (held out)", columns, rows + floor_rows)
    stand = marks(rows, floors)
    bench.table(
        "after 30 and 120 training minutes",
        [
            Column("recipe", "recipe", justify="left"),
            Column("scale", "scale"),
            Column("at_minutes", "minutes"),
            Column("reached", "run got there", lambda v: "yes" if v else "no"),
            Column("step", "step"),
            Column("psnr", "PSNR (dB)", lambda v: f"{v:.2f}"),
            Column("over_thumbnail_db", "over thumbnail (dB)", lambda v: f"{v:+.2f}"),
        ],
        stand,
    )
    bench.save(
        rows,
        floors=[{"floor": name, **row} for (name, _), row in floors.items()],
        marks=stand,
        settings={"scales": scales, "images": [p.name for p in paths], "runs": [[label, str(run)] for label, run in runs], "every": args.every},
    )
    panels = curve_panels(rows, floors, scales[0])
    plot_panels(bench.png_path, panels, "autoencoder learning curves, held-out wallpapers", columns=2)
    bench.done()


if __name__ == "__main__":
    main()
