"""The LDM commands: encode-latents, train-ldm, sample, render; one-line errors and no partial files."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_UNET
from PIL import Image
from typer.testing import CliRunner

from infd.cli import app
from infd.latents import load_latent

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_failed_cleanly(result, out):
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir()), f"left {sorted(p.name for p in out.iterdir())}"


@pytest.fixture
def pipe_folder(make_tiny_pipeline, tmp_path):
    folder = tmp_path / "pipe"
    make_tiny_pipeline().save_pretrained(folder)
    return folder


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_help_lists_the_ldm_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("encode-latents", "train-ldm", "sample", "render"):
        assert command in result.output


def test_encode_train_sample_end_to_end(make_tiny_model, image_folder, tmp_path):
    make_tiny_model(fixed_head=True).save_pretrained(tmp_path / "ae")
    (image_folder / "broken.jpg").write_bytes(b"not a jpeg")
    result = invoke("encode-latents", "--ae", tmp_path / "ae", "--data", image_folder, "--out", tmp_path / "lat", "--num-workers", 0, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "6 latents of 3x8x8" in result.output and "skipped 1" in result.output
    config = tmp_path / "ldm.json"
    config.write_text(json.dumps({"unet": TINY_UNET, "num_workers": 0, "checkpoint_every": 2, "sample_every": 2, "sample_sizes": [16], "sample_steps": 2, "batch_size": 4}))
    run = tmp_path / "run"
    result = invoke("train-ldm", "--ae", tmp_path / "ae", "--latents", tmp_path / "lat", "--out", run, "--config", config, "--steps", 2, "--no-progress")
    assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "step_0000002" / "model_index.json").is_file()
    result = invoke("train-ldm", "--latents", tmp_path / "lat", "--out", run, "--config", config, "--steps", 3, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    out = tmp_path / "samples"
    result = invoke("sample", "--ckpt", run, "--n", 2, "--size", "24x16", "--steps", 2, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["sample_0000.png", "sample_0000.z.safetensors", "sample_0001.png", "sample_0001.z.safetensors"]
    assert Image.open(out / "sample_0000.png").size == (24, 16)
    assert invoke("info", run).exit_code == 0


def test_several_sizes_of_the_same_samples_and_z_renders_back_exactly(pipe_folder, tmp_path):
    out = tmp_path / "out"
    result = invoke("sample", "--ckpt", pipe_folder, "--n", 3, "--batch-size", 2, "--size", "24x16", "--size", "40", "--steps", 2, "--seed", 7, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"sample_{i:04d}{suffix}" for i in range(3) for suffix in ("_24x16.png", "_40x40.png", ".z.safetensors"))
    assert Image.open(out / "sample_0002_24x16.png").size == (24, 16) and Image.open(out / "sample_0002_40x40.png").size == (40, 40)
    z, metadata = load_latent(out / "sample_0002.z.safetensors")
    assert z.shape == (1, 3, 8, 8) and metadata["seed"] == "9" and metadata["sampler"] == "ddim" and metadata["steps"] == "2"
    # The saved z renders to the very pixels it was saved with, from the pipeline or from its autoencoder alone.
    for ckpt in (pipe_folder, pipe_folder / "autoencoder"):
        again = tmp_path / "again.png"
        result = invoke("render", out / "sample_0002.z.safetensors", "--ckpt", ckpt, "--size", "24x16", "--out", again)
        assert result.exit_code == 0, result.output
        assert np.array_equal(png(again), png(out / "sample_0002_24x16.png"))
    # Any region and the baseline renderer are one option away.
    zoom = tmp_path / "zoom.png"
    assert invoke("render", out / "sample_0000.z.safetensors", "--ckpt", pipe_folder, "--size", "20x20", "--box=-0.5,-0.5,0.5,0.5", "--out", zoom).exit_code == 0
    assert np.abs(png(zoom).astype(int) - png(out / "sample_0000_40x40.png")[10:30, 10:30]).max() <= 1
    for options in (["--renderer", "fixed"], ["--renderer", "fixed", "--upsample", "lanczos"]):
        result = invoke("render", out / "sample_0000.z.safetensors", "--ckpt", pipe_folder, "--size", "64x48", "--out", tmp_path / "fixed.png", *options)
        assert result.exit_code == 0, result.output
        assert Image.open(tmp_path / "fixed.png").size == (64, 48)


def test_render_one_number_is_the_long_side_at_the_latents_aspect(pipe_folder, tmp_path):
    from infd.geometry import ASPECT_KEY
    from infd.latents import save_latent

    square, wide, damaged = (tmp_path / f"{name}.z.safetensors" for name in ("square", "wide", "damaged"))
    z = torch.randn(1, 3, 8, 8)
    save_latent(square, z)
    save_latent(wide, z, {ASPECT_KEY: 4 / 3})  # what an encoded 4:3 photo's z says about itself
    save_latent(damaged, z, {ASPECT_KEY: "wide"})
    for latent, options, expected in [
        (square, ["--size", "24"], (24, 24)),
        (wide, ["--size", "24"], (24, 18)),
        (wide, [], (32, 24)),  # the encoder's input size on the long side
        (wide, ["--size", "24", "--box=-1,-1,1,0"], (16, 24)),  # the left half of a 4:3 image is 2:3
        (wide, ["--size", "24x24"], (24, 24)),
        (wide, ["--size", "24", "--format", "png"], (24, 18)),  # streamed
    ]:
        out = tmp_path / "out.png"
        result = invoke("render", latent, "--ckpt", pipe_folder, *options, "--out", out, "--no-progress")
        assert result.exit_code == 0, result.output
        assert Image.open(out).size == expected, options
    result = invoke("render", damaged, "--ckpt", pipe_folder, "--size", "24", "--out", tmp_path / "bad" / "out.png")
    assert_failed_cleanly(result, tmp_path / "bad")
    assert "aspect ratio" in result.output


def test_same_seed_same_images_whatever_the_batch(pipe_folder, tmp_path):
    runs = []
    for name, batch in (("a", 2), ("b", 2), ("c", 1)):
        result = invoke("sample", "--ckpt", pipe_folder, "--n", 2, "--batch-size", batch, "--size", 20, "--steps", 3, "--seed", 1, "--out", tmp_path / name, "--no-progress")
        assert result.exit_code == 0, result.output
        runs.append(tmp_path / name)
    a, b, c = runs
    assert np.array_equal(png(a / "sample_0001.png"), png(b / "sample_0001.png"))
    assert torch.allclose(load_latent(a / "sample_0001.z.safetensors")[0], load_latent(c / "sample_0001.z.safetensors")[0], rtol=1e-4, atol=1e-4)
    other = tmp_path / "d"
    assert invoke("sample", "--ckpt", pipe_folder, "--n", 1, "--size", 20, "--steps", 3, "--seed", 2, "--out", other, "--no-progress").exit_code == 0
    assert not np.array_equal(png(a / "sample_0000.png"), png(other / "sample_0000.png"))


def test_info_describes_both_halves_of_a_pipeline(pipe_folder):
    result = invoke("info", pipe_folder)
    assert result.exit_code == 0, result.output
    for row in ("latent z", "renderer", "diffusion UNet", "UNet2DModel", "scheduler", "latent scaling factor"):
        assert row in result.output, row


def test_sample_shards_across_processes(pipe_folder, tmp_path):
    """Two processes (torchrun, as `accelerate launch` starts them) write the same samples as one."""
    import os
    import subprocess
    import sys

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    # 4 samples (the default --n: torchrun's own parser would take "--n" for one of its options)
    options = ["--ckpt", pipe_folder, "--batch-size", 1, "--size", 20, "--steps", 3, "--seed", 4, "--device", "cpu", "--no-progress"]
    assert invoke("sample", *options, "--out", single).exit_code == 0
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "infd.cli", "sample", *map(str, options), "--out", str(sharded)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launch, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "process 1 of 2: samples 1, 3" in result.stdout + result.stderr, result.stderr[-2000:]
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    for i in range(4):
        a, b = load_latent(single / f"sample_{i:04d}.z.safetensors")[0], load_latent(sharded / f"sample_{i:04d}.z.safetensors")[0]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"sample {i} differs"


@pytest.fixture
def mismatched_pipe(make_tiny_pipeline, make_tiny_model, tmp_path):
    folder = tmp_path / "mismatched"
    make_tiny_pipeline().save_pretrained(folder)
    make_tiny_model(latent_channels=4).save_pretrained(folder / "autoencoder")
    return folder


@pytest.mark.parametrize(
    "options, message",
    [
        (["--size", "0x10"], "positive pixels"),
        (["--size", "abc"], "WIDTHxHEIGHT"),
        (["--steps", 0], "--steps"),
        (["--steps", 5000], "sampling steps"),
        (["--sampler", "euler"], "unknown sampler"),
        (["--sampler", "dpm++", "--eta", 0.5], "eta"),
        (["--n", 0], "--n"),
        (["--renderer", "liif"], "no 'liif' renderer"),
        (["--upsample", "lanczos"], "--renderer fixed"),
        (["--box", "0,0,0,0"], "empty"),
        (["--ckpt", "MISSING"], "does not exist"),
        (["--ckpt", "MISMATCHED"], "use the autoencoder the LDM was trained with"),
        (["--ckpt", "AE"], "is an autoencoder"),
    ],
)
def test_bad_sample_options_fail_cleanly(pipe_folder, mismatched_pipe, tmp_path, options, message):
    replace = {"MISSING": tmp_path / "nope", "MISMATCHED": mismatched_pipe, "AE": pipe_folder / "autoencoder"}
    options = [replace.get(o, o) if isinstance(o, str) else o for o in options]
    if "--ckpt" not in options:
        options = ["--ckpt", pipe_folder, *options]
    out = tmp_path / "out"
    result = invoke("sample", "--steps", 2, *options, "--out", out, "--no-progress")
    assert_failed_cleanly(result, out)
    assert message in result.output


def test_bad_render_inputs_fail_cleanly(pipe_folder, mismatched_pipe, tmp_path):
    z = tmp_path / "z.safetensors"
    assert invoke("sample", "--ckpt", pipe_folder, "--n", 1, "--steps", 1, "--out", tmp_path / "s", "--no-progress").exit_code == 0
    (tmp_path / "s" / "sample_0000.z.safetensors").rename(z)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage")
    out_dir = tmp_path / "renders"
    out = out_dir / "out.png"
    for args, message in [
        ([z, "--ckpt", pipe_folder, "--size", "0"], "positive pixels"),
        ([tmp_path / "missing.safetensors", "--ckpt", pipe_folder], "does not exist"),
        ([garbage, "--ckpt", pipe_folder], "not a latent file"),
        ([z, "--ckpt", tmp_path / "nope"], "does not exist"),
        ([z, "--ckpt", mismatched_pipe], "shape"),
        ([z, "--ckpt", pipe_folder, "--renderer", "liif"], "no 'liif' renderer"),
    ]:
        result = invoke("render", *args, "--out", out)
        assert_failed_cleanly(result, out_dir)
        assert message in result.output, result.output
    result = invoke("render", z, "--ckpt", pipe_folder, "--out", tmp_path / "out.gifx")
    assert result.exit_code == 1 and "must end in" in result.output


def test_bad_train_and_encode_inputs_fail_cleanly(make_tiny_model, image_folder, tmp_path):
    make_tiny_model().save_pretrained(tmp_path / "ae")
    result = invoke("encode-latents", "--ae", tmp_path / "nope", "--data", image_folder, "--out", tmp_path / "lat")
    assert_failed_cleanly(result, tmp_path / "lat")
    result = invoke("train-ldm", "--ae", tmp_path / "ae", "--latents", tmp_path / "no-latents", "--out", tmp_path / "run")
    assert_failed_cleanly(result, tmp_path / "run")
    result = invoke("train-ldm", "--ae", tmp_path / "ae", "--out", tmp_path / "run")
    assert_failed_cleanly(result, tmp_path / "run")
    assert "exactly one of --latents" in result.output
