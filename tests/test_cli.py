"""The command line: outputs, and one-line errors with a non-zero exit and no partial files."""

import numpy as np
import pytest
from conftest import write_pattern_image
from PIL import Image
from typer.testing import CliRunner

from infd.cli import app

runner = CliRunner()


@pytest.fixture
def ckpt(make_tiny_model, tmp_path):
    folder = tmp_path / "ckpt"
    make_tiny_model("clif").save_pretrained(folder)
    return folder


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    write_pattern_image(path, 40, 60)
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train-ae", "reconstruct", "info"):
        assert command in result.output


def test_reconstruct_any_size_and_box(ckpt, picture, tmp_path):
    out = tmp_path / "out.png"
    result = invoke("reconstruct", picture, "--ckpt", ckpt, "--size", "70x30", "--out", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (70, 30)
    zoom = tmp_path / "zoom.png"
    result = invoke("reconstruct", picture, "--ckpt", ckpt, "--size", "32", "--box", "-0.5,-0.5,0,0", "--out", zoom)
    assert result.exit_code == 0, result.output
    assert Image.open(zoom).size == (32, 21)  # one number is the long side of the box, at its shape in the 60x40 image
    default = tmp_path / "native.jpg"
    assert invoke("reconstruct", picture, "--ckpt", ckpt, "--out", default).exit_code == 0
    assert Image.open(default).size == (60, 40)


def test_one_number_is_the_long_side_at_the_image_aspect(ckpt, tmp_path):
    photo = tmp_path / "photo.jpg"
    write_pattern_image(photo, 48, 64)  # 4:3
    out = tmp_path / "wide.png"
    result = invoke("reconstruct", photo, "--ckpt", ckpt, "--size", "2048", "--tile", "1024", "--out", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (2048, 1536)
    portrait = tmp_path / "portrait.png"
    write_pattern_image(portrait, 64, 48)
    result = invoke("reconstruct", portrait, "--ckpt", ckpt, "--size", "40", "--out", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (30, 40)
    result = invoke("reconstruct", photo, "--ckpt", ckpt, "--size", "20x20", "--out", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (20, 20)  # WIDTHxHEIGHT stays exact


def test_reconstruct_tile_size_does_not_change_the_output(ckpt, picture, tmp_path):
    outs = []
    for tile in (7, 512):
        out = tmp_path / f"t{tile}.png"
        assert invoke("reconstruct", picture, "--ckpt", ckpt, "--size", "45x33", "--tile", tile, "--out", out).exit_code == 0
        outs.append(np.asarray(Image.open(out)))
    assert np.array_equal(outs[0], outs[1])


def test_info(ckpt):
    result = invoke("info", ckpt)
    assert result.exit_code == 0, result.output
    assert "3x8x8" in result.output and "clif" in result.output


def bad_files(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    truncated = tmp_path / "truncated.png"
    write_pattern_image(truncated, 64, 64)
    truncated.write_bytes(truncated.read_bytes()[:300])
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    return {"corrupt": corrupt, "truncated": truncated, "tiny": tiny, "missing": tmp_path / "missing.png"}


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "tiny", "missing"])
def test_bad_images_give_one_clear_error(ckpt, tmp_path, kind):
    out = tmp_path / "out.png"
    result = invoke("reconstruct", bad_files(tmp_path)[kind], "--ckpt", ckpt, "--out", out)
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("size", ["0x10", "-5x5", "abc", "100000x100000"])
def test_nonsense_sizes_give_one_clear_error(ckpt, picture, tmp_path, size):
    out = tmp_path / "out.png"
    result = invoke("reconstruct", picture, "--ckpt", ckpt, "--size", size, "--out", out)
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("args", [["--box", "0,0,0,0"], ["--box", "1,2"], ["--device", "cuda:7"]])
def test_other_bad_options(ckpt, picture, tmp_path, args):
    import torch

    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out.png"
    result = invoke("reconstruct", picture, "--ckpt", ckpt, "--out", out, *args)
    assert result.exit_code == 1 and "error:" in result.output
    assert not out.exists()


def test_missing_checkpoint_and_bad_suffix(picture, ckpt, tmp_path):
    result = invoke("reconstruct", picture, "--ckpt", tmp_path / "nope", "--out", tmp_path / "o.png")
    assert result.exit_code == 1 and "does not exist" in result.output
    result = invoke("reconstruct", picture, "--ckpt", ckpt, "--out", tmp_path / "o.gifx")
    assert result.exit_code == 1 and "must end in" in result.output


def test_rgba_and_16bit_inputs_work(ckpt, tmp_path):
    rgba = tmp_path / "rgba.png"
    write_pattern_image(rgba, 30, 30, mode="RGBA")
    deep = tmp_path / "deep.png"
    Image.fromarray((np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)).save(deep)
    for path in (rgba, deep):
        out = tmp_path / f"{path.stem}-out.png"
        result = invoke("reconstruct", path, "--ckpt", ckpt, "--size", "16", "--out", out)
        assert result.exit_code == 0, result.output
        assert Image.open(out).mode == "RGB"


def test_train_ae_command_and_bad_data(image_folder, tmp_path):
    import json

    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({
        "model": {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "renderer_hidden": 16},
        "data": {"input_size": 32, "crop_size": 24},
        "gan_weight": 0.0, "num_workers": 0, "checkpoint_every": 3, "sample_every": 3,
    }))
    run = tmp_path / "run"
    result = invoke("train-ae", "--data", image_folder, "--out", run, "--config", config, "--steps", 3, "--no-progress")
    assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "step_0000003" / "config.json").is_file()
    assert invoke("info", run).exit_code == 0
    # --resume continues with the run's own config (not the default one, whose model differs) ...
    result = invoke("train-ae", "--data", image_folder, "--out", run, "--resume", "--steps", 4, "--no-progress")
    assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "step_0000004" / "config.json").is_file()
    # ... and refuses a --config that describes another training.
    other = tmp_path / "other.json"
    other.write_text(config.read_text().replace('"renderer_hidden": 16', '"renderer_hidden": 8'))
    result = invoke("train-ae", "--data", image_folder, "--out", run, "--resume", "--config", other, "--steps", 5)
    assert result.exit_code == 1 and "differs from the run's own train_config.json in model" in result.output, result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("train-ae", "--data", empty, "--out", tmp_path / "run2", "--config", config, "--steps", 3)
    assert result.exit_code == 1 and "error:" in result.output
