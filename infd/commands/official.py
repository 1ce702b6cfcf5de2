"""`infd convert-official`: the paper's released checkpoints as infd pipeline folders."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from infd.commands.common import report, reports_errors


@reports_errors
def convert_official(
    ckpt: Path = typer.Argument(..., help="A checkpoint written by the paper's code (github yinboc/infd): a released DM-stage file (FFHQ, FFHQ 6K-Mix) or an AE-stage last-model.pth."),
    out: Path = typer.Option(..., "--out", help="New pipeline folder: model_index.json, autoencoder/ and, for DM-stage files, unet/ and scheduler/."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the UNet's EMA weights where the file has them (the reference samples with them)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier `infd convert-official` output at --out (never a folder holding anything else)."),
):
    """Convert a checkpoint of the paper's code into a pipeline folder that every --ckpt takes."""
    from infd.official import convert_official as convert

    start = time.perf_counter()
    summary = convert(ckpt, out, ema=ema, overwrite=overwrite)
    summary.pop("steps", None), summary.pop("eta", None)
    for key, value in summary.items():
        report(f"{key}:", f"{value:,}" if isinstance(value, int) else str(value), "cyan")
    what = "sample with `infd sample --ckpt " + str(out) + " --size 1024`" if summary["stage"] == "DM" else "reconstruct with `infd reconstruct IMAGE --ckpt " + str(out) + "`"
    report("wrote", f"{out} in {time.perf_counter() - start:.1f} s; {what}")
