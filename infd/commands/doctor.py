"""`infd doctor`: what a bug report needs: versions, OS, CPU and its vector instructions, GPUs, precision, local weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import typer

from infd.commands.common import reports_errors


@dataclass(frozen=True)
class LocalWeights:
    """Weights infd never downloads: a command takes their local path."""

    key: str  # the field of the report (and of inversion specs / training configs, where they take it)
    what: str
    option: str  # the option of `infd doctor` (and of the commands below) that names the path
    set_by: str  # where infd reads the path; no environment variable names any of them
    packages: tuple[str, ...]  # the Python packages that load them (any one suffices)


LOCAL_WEIGHTS = (
    LocalWeights("clip", "CLIP (text conditions)", "--clip", '`infd invert --clip`, or "clip" in an inversion spec', ("open_clip", "transformers")),
    LocalWeights("lpips_vgg", "VGG16 for LPIPS", "--lpips-vgg", '`infd train-ae/eval-ae/invert --lpips-vgg`, or "lpips_vgg" in a training config or inversion spec', ("lpips",)),
    LocalWeights("inception", "InceptionV3 for FID", "--inception", "`infd eval-gen --inception`", ("torch_fidelity",)),
    LocalWeights("stable_diffusion", "Stable Diffusion", "--sd", "`infd txt2img --sd`; its VAE: `infd convert-vae --vae`", ("diffusers", "transformers")),
)


def package_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_weights(entry: LocalWeights, path: Path | None) -> dict:
    """{"what", "status", "path", "set_by", "packages"}: status is "not configured", "configured" or "missing" (a path that does not exist)."""
    from importlib.util import find_spec

    status = "not configured" if path is None else ("configured" if path.exists() else "missing")
    return {
        "what": entry.what,
        "status": status,
        "path": None if path is None else str(path),
        "set_by": f"{entry.option} PATH: {entry.set_by}",
        "packages": {name: find_spec(name) is not None for name in entry.packages},
    }


def doctor_report(weights: dict[str, Path | None] | None = None) -> dict:
    """Everything `infd doctor` prints, as one JSON-ready dict; `weights`: key -> path, for LOCAL_WEIGHTS."""
    import os
    import platform
    import sys

    import torch

    from infd import __version__, system

    gpus = system.gpus()
    cpu = system.cpu_info()
    return {
        "versions": {
            "infd": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": package_version("diffusers"),
            "cuda": torch.version.cuda,
        },
        "os": platform.platform(),
        "python_executable": sys.executable,
        "cpu": {
            "model": cpu.model,
            "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "vector_instructions": system.vector_extensions(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
        },
        "bf16_fast": {"cpu": system.fast_bf16(torch.device("cpu")), "cuda": system.fast_bf16(torch.device("cuda")) if gpus else None},
        "allocator": system.allocator_description(),
        "gpus": gpus,
        "local_weights": {entry.key: describe_weights(entry, (weights or {}).get(entry.key)) for entry in LOCAL_WEIGHTS},
    }


def report_lines(report: dict) -> list[str]:
    """The report as "label  value" lines for a terminal or a bug report."""
    versions, cpu, bf16 = report["versions"], report["cpu"], report["bf16_fast"]
    rows = [
        ("infd", versions["infd"]),
        ("python", f"{versions['python']} ({report['python_executable']})"),
        ("torch", f"{versions['torch']}" + (f", CUDA {versions['cuda']}" if versions["cuda"] else ", no CUDA")),
        ("diffusers", versions["diffusers"] or "not installed"),
        ("os", report["os"]),
        ("cpu", f"{cpu['model']}, {cpu['usable_cores']} of {cpu['cores']} cores usable"),
        ("vector instructions", f"{' '.join(cpu['vector_instructions']) or 'none known'} (torch uses {cpu['torch_capability']})"),
        ("torch threads", str(cpu["torch_threads"])),
        ("bf16 fast", f"cpu: {'yes' if bf16['cpu'] else 'no (--bf16 renders in float32)'}" + ("" if bf16["cuda"] is None else f"; cuda: {'yes' if bf16['cuda'] else 'no'}")),
        ("allocator", report["allocator"]),
    ]
    gpus = report["gpus"]
    rows += [(f"gpu {i}", f"{gpu['name']}, {gpu['memory_gib']} GiB, compute {gpu['capability']}") for i, gpu in enumerate(gpus)] or [("gpus", "none")]
    for key, entry in report["local_weights"].items():
        shown = entry["status"] + (f": {entry['path']}" if entry["path"] else "")
        missing = [name for name, found in entry["packages"].items() if not found]
        if len(missing) == len(entry["packages"]):
            shown += f"; needs {' or '.join(missing)} (not installed)"
        rows.append((f"{key}", f"{shown} (set with {entry['set_by']})"))
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {value}" for label, value in rows]


@reports_errors
def doctor(
    clip: Path | None = typer.Option(None, "--clip", help="The CLIP you pass to `infd invert`: checked and reported."),
    lpips_vgg: Path | None = typer.Option(None, "--lpips-vgg", help="The VGG16 weights you pass for LPIPS: checked and reported."),
    inception: Path | None = typer.Option(None, "--inception", help="The InceptionV3 weights you pass to `infd eval-gen`: checked and reported."),
    sd: Path | None = typer.Option(None, "--sd", help="The Stable Diffusion folder you pass to `infd txt2img`: checked and reported."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Print what a bug report needs: versions, OS, CPU and its vector instructions, GPUs, whether bfloat16 is fast, local weights."""
    report = doctor_report({"clip": clip, "lpips_vgg": lpips_vgg, "inception": inception, "stable_diffusion": sd})
    typer.echo(json.dumps(report, indent=2) if as_json else "\n".join(report_lines(report)))
