"""Issue 15: the CLI, run as a user runs it, over hostile inputs.

Each case must exit non-zero with exactly one line on stderr and no traceback, leave no
file at or beside its output, and change nothing that was there before.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import write_pattern_image

SEED_PAST_64_BITS = str(2**64)


def hostile_cases(tmp_path, ckpt):
    """name -> (arguments, output path, words the one sentence must hold) over the inputs `workspace` made in `tmp_path`."""
    image, folder, file = tmp_path / "in.png", tmp_path / "folder", tmp_path / "file"
    unet = tmp_path / "unet"
    reconstruct = ["reconstruct", image, "--ckpt", ckpt, "--out"]
    return {
        # checked before the checkpoint is even looked for, so before any work
        "output is a folder": (["reconstruct", image, "--ckpt", tmp_path / "none", "--out", folder], folder, "is a folder"),
        "parent of the output is a file": (reconstruct + [file / "out.png"], file / "out.png", "is a file"),
        "checkpoint of another model": (["reconstruct", image, "--ckpt", unet, "--out", tmp_path / "o.png"], tmp_path / "o.png", "holds a UNet2DModel"),
        "training config not an object": (["train-ae", "--data", tmp_path, "--out", tmp_path / "run", "--config", tmp_path / "list.json"], tmp_path / "run", "JSON object"),
        "spec nested 100,000 deep": (["invert", "--ckpt", ckpt, "--spec", tmp_path / "deep.json", "--out", tmp_path / "inv"], tmp_path / "inv", "too deeply"),
        "seed of 2^64": (["invert", "--ckpt", ckpt, "--spec", tmp_path / "spec.json", "--seed", SEED_PAST_64_BITS, "--out", tmp_path / "inv"], tmp_path / "inv", "seed"),
        "truncated --init checkpoint": (
            ["train-ae", "--data", tmp_path / "data", "--out", tmp_path / "run", "--init", tmp_path / "truncated", "--steps", "1", "--num-workers", "0"],
            tmp_path / "run",
            "could not load the autoencoder",
        ),
        "scaling factor nan": (["convert-vae", "--vae", tmp_path / "none", "--scaling-factor", "nan", "--out", tmp_path / "vae"], tmp_path / "vae", "scaling factor"),
    }


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from conftest import TINY_MODEL

    from infd.models import NeuralFieldAutoencoder

    root = tmp_path_factory.mktemp("hostile")
    NeuralFieldAutoencoder(**TINY_MODEL).save_pretrained(root / "ae")
    write_pattern_image(root / "in.png", 32, 32)
    (root / "folder").mkdir()
    (root / "folder" / "keep.txt").write_text("keep me")
    (root / "file").write_text("keep me too")
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    (root / "list.json").write_text("[1, 2]")
    (root / "data").mkdir()
    write_pattern_image(root / "data" / "big.png", 300, 300)
    (root / "truncated").mkdir()
    (root / "truncated" / "config.json").write_bytes((root / "ae" / "config.json").read_bytes())
    (root / "truncated" / "diffusion_pytorch_model.safetensors").write_bytes((root / "ae" / "diffusion_pytorch_model.safetensors").read_bytes()[:1000])
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    spec = {"canvas": "32", "steps": 1, "conditions": [{"type": "image", "box": [-1, -1, 1, 1], "image": "in.png", "loss": "l1"}]}
    (root / "spec.json").write_text(json.dumps(spec))
    return root


CASES = [
    "output is a folder", "parent of the output is a file", "checkpoint of another model", "training config not an object",
    "spec nested 100,000 deep", "seed of 2^64", "scaling factor nan", "truncated --init checkpoint",
]


@pytest.mark.parametrize("name", CASES)
def test_a_hostile_input_gets_one_sentence_and_changes_nothing(workspace, name):
    args, out, words = hostile_cases(workspace, workspace / "ae")[name]
    before = snapshot(workspace)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    result = subprocess.run([sys.executable, "-c", "from infd.cli import main; main()", *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, result.stderr
    assert words in lines[0], lines[0]
    assert not os.path.lexists(out) or out.name == "folder", f"{out} was left behind"
    assert snapshot(workspace) == before
