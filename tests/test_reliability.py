"""Issue 15: no lost data, no silent garbage, and messages printed verbatim."""

import json

import pytest
import torch
from conftest import write_pattern_image
from typer.testing import CliRunner

from infd.cli import app
from infd.errors import InfdError
from infd.latents import LATENT_SPACE_KEY, latent_space_fingerprint, load_latent, save_latent
from infd.models import NeuralFieldAutoencoder
from infd.rendering import render

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def snapshot(folder):
    """Every file under `folder` with its bytes, to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(result, message):
    """Exit status 1, one error line holding `message` verbatim, no traceback."""
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output, result.output
    assert message in result.output, result.output


@pytest.fixture
def ae(make_tiny_model, tmp_path):
    """(model, checkpoint folder, a saved z of it, an input image)."""
    model = make_tiny_model()
    model.save_pretrained(tmp_path / "ae")
    z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    save_latent(tmp_path / "z.safetensors", z, {LATENT_SPACE_KEY: latent_space_fingerprint(model)})
    write_pattern_image(tmp_path / "in.png", 32, 32)
    return model, tmp_path / "ae", tmp_path / "z.safetensors", tmp_path / "in.png"


# ---------------------------------------------------------------- 1. lost data


def invert_args(tmp_path, ckpt, out):
    write_pattern_image(tmp_path / "target.png", 32, 32)
    spec = {"canvas": "32", "steps": 2, "conditions": [{"type": "image", "box": [-1, -1, 1, 1], "image": "target.png", "loss": "l1"}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    return ["invert", "--ckpt", ckpt, "--spec", tmp_path / "spec.json", "--out", out, "--no-progress"]


def test_invert_refuses_an_existing_folder_and_leaves_it_as_it_was(ae, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = invoke(*invert_args(tmp_path, ae[1], out))
    assert_refused(result, f"'{out}' already exists; pass --overwrite to replace an earlier `infd invert` output there, or choose another --out.")
    assert snapshot(out) == {"notes.txt": b"keep me"}


def test_invert_overwrite_replaces_its_own_output_only(ae, tmp_path):
    out = tmp_path / "out"
    args = invert_args(tmp_path, ae[1], out)
    assert invoke(*args).exit_code == 0
    assert invoke(*args, "--overwrite").exit_code == 0  # an earlier invert output: replaced
    (out / "regions" / "notes.txt").write_text("keep me")
    before = snapshot(out)
    result = invoke(*args, "--overwrite")
    assert_refused(result, f"--overwrite replaces only what `infd invert` writes, and '{out / 'regions' / 'notes.txt'}' is not that")
    assert snapshot(out) == before


def test_deep_zoom_export_never_deletes_a_folder_it_did_not_write(ae, tmp_path):
    _, ckpt, z_file, _ = ae
    tiles = tmp_path / "view_files"
    tiles.mkdir()
    (tiles / "thesis.pdf").write_bytes(b"%PDF precious")
    for extra in ([], ["--overwrite"]):
        result = invoke("render", z_file, "--ckpt", ckpt, "--size", "40", "--out", tmp_path / "view.dzi", "--no-progress", *extra)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert str(tiles) in result.output or str(tiles / "thesis.pdf") in result.output, result.output
        assert snapshot(tiles) == {"thesis.pdf": b"%PDF precious"} and not (tmp_path / "view.dzi").exists()
    (tiles / "thesis.pdf").unlink()
    for extra in ([], ["--overwrite"]):  # an empty folder, then an earlier export
        result = invoke("render", z_file, "--ckpt", ckpt, "--size", "40", "--out", tmp_path / "view.dzi", "--no-progress", *extra)
        assert result.exit_code == 0, result.output
    result = invoke("render", z_file, "--ckpt", ckpt, "--size", "40", "--out", tmp_path / "view.dzi", "--no-progress")
    assert_refused(result, f"'{tmp_path / 'view.dzi'}' already exists; pass --overwrite")


# ---------------------------------------------------------------- 2. silent garbage

FAR_BOX = "--box=-1e300,-1e300,1e300,1e300"
FAR_BOX_MESSAGE = "reaches too far from the image [-1, 1]²; keep every coordinate in [-8, 8]."


def test_a_far_box_is_refused_by_reconstruct_render_and_sample(ae, make_tiny_pipeline, tmp_path):
    _, ckpt, z_file, picture = ae
    make_tiny_pipeline().save_pretrained(tmp_path / "pipe")
    commands = [
        ["reconstruct", picture, "--ckpt", ckpt, "--out", tmp_path / "out" / "x.png"],
        ["render", z_file, "--ckpt", ckpt, "--out", tmp_path / "out" / "x.jpg"],
        ["sample", "--ckpt", tmp_path / "pipe", "--n", 1, "--steps", 2, "--out", tmp_path / "out", "--no-progress"],
    ]
    for command in commands:
        assert_refused(invoke(*command, FAR_BOX), FAR_BOX_MESSAGE)
        assert not (tmp_path / "out").exists()


def test_a_box_beyond_the_image_renders_the_extended_field(ae, tmp_path):
    _, ckpt, z_file, _ = ae
    result = invoke("render", z_file, "--ckpt", ckpt, "--size", "16", "--box=2,2,8,8", "--out", tmp_path / "beyond.png", "--no-progress")
    assert result.exit_code == 0, result.output


@pytest.fixture
def broken_renderer(monkeypatch):
    """Every window renders as NaN, as a diverged or mismatched model would."""
    original = NeuralFieldAutoencoder.render_window

    def nan_window(self, *args, **kwargs):
        return torch.full_like(original(self, *args, **kwargs), float("nan"))

    monkeypatch.setattr(NeuralFieldAutoencoder, "render_window", nan_window)


NAN_MESSAGE = "the render has NaN or infinite pixels, so nothing was written"


@pytest.mark.parametrize("name", ["x.jpg", "x.png", "x.tif", "x.dzi"])
def test_a_non_finite_render_is_an_error_and_writes_nothing(ae, broken_renderer, tmp_path, name):
    _, ckpt, z_file, _ = ae
    out = tmp_path / "out"
    result = invoke("render", z_file, "--ckpt", ckpt, "--size", "32", "--out", out / name, "--tile", 16, "--no-progress")
    assert_refused(result, NAN_MESSAGE)
    assert not out.exists() or list(out.iterdir()) == []


def test_reconstruct_refuses_a_non_finite_render(ae, broken_renderer, tmp_path):
    _, ckpt, _, picture = ae
    assert_refused(invoke("reconstruct", picture, "--ckpt", ckpt, "--out", tmp_path / "r.png"), NAN_MESSAGE)
    assert not (tmp_path / "r.png").exists()


def test_the_viewer_answers_a_non_finite_tile_with_the_sentence(make_tiny_model, broken_renderer):
    from fastapi.testclient import TestClient

    from infd.viewer.app import create_app
    from infd.viewer.service import LatentBook, TileService

    model, book = make_tiny_model(), LatentBook()
    latent = book.add(torch.zeros(1, *model.latent_shape), "zeros", "a test latent", (64, 64))
    with TileService(model, book, 30, 1) as service:
        response = TestClient(create_app(service, latent.zid), raise_server_exceptions=False).get(f"/dzi/{latent.zid}_files/0/0_0.png")
    assert response.status_code == 500 and response.json()["detail"].startswith(NAN_MESSAGE), response.text


def test_render_raises_on_non_finite_pixels(make_tiny_model):
    model = make_tiny_model()
    z = torch.full((1, *model.latent_shape), 3e38)  # finite, but beyond anything the network can carry
    with pytest.raises(InfdError, match="NaN or infinite"):
        render(model, z, (16, 16))


def test_a_z_of_another_autoencoder_is_refused(ae, make_tiny_model, make_tiny_pipeline, tmp_path):
    _, _, z_file, _ = ae
    other = make_tiny_model(seed=1)  # the same latent shape, another latent space
    other.save_pretrained(tmp_path / "other")
    result = invoke("render", z_file, "--ckpt", tmp_path / "other", "--out", tmp_path / "o.png", "--no-progress")
    assert_refused(result, f"'{z_file}' was made by another autoencoder than this one")
    assert not (tmp_path / "o.png").exists()
    # `infd sample` records the latent space it sampled in, so its z is checked too.
    make_tiny_pipeline().save_pretrained(tmp_path / "pipe")
    assert invoke("sample", "--ckpt", tmp_path / "pipe", "--n", 1, "--steps", 2, "--size", 16, "--out", tmp_path / "s", "--no-progress").exit_code == 0
    sampled = tmp_path / "s" / "sample_0000.z.safetensors"
    assert LATENT_SPACE_KEY in load_latent(sampled)[1]
    assert_refused(invoke("render", sampled, "--ckpt", tmp_path / "other", "--out", tmp_path / "o.png"), "was made by another autoencoder")


def test_a_finetuned_renderer_still_renders_the_same_latent_space(ae, make_tiny_model, tmp_path):
    model, _, z_file, _ = ae
    finetuned = make_tiny_model(seed=1)
    for name, module in (("encoder", model.encoder), ("quant_conv", model.quant_conv)):
        getattr(finetuned, name).load_state_dict(module.state_dict())
    finetuned.save_pretrained(tmp_path / "finetuned")
    result = invoke("render", z_file, "--ckpt", tmp_path / "finetuned", "--size", "16", "--out", tmp_path / "f.png", "--no-progress")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- 4. messages verbatim


def test_paths_with_brackets_are_printed_verbatim(ae, tmp_path):
    _, ckpt, _, picture = ae
    out = tmp_path / "odd[" / "]name [draft].png"  # the path holds "[/]"
    result = invoke("reconstruct", picture, "--ckpt", ckpt, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.is_file() and f"wrote {out} (32x32" in result.output, result.output
    missing = tmp_path / "photo [draft].png"
    result = invoke("reconstruct", missing, "--ckpt", ckpt, "--out", tmp_path / "x.png")
    assert_refused(result, f"{missing} does not exist.")


def test_the_projects_own_bracketed_words_survive_in_messages(ae, tmp_path):
    _, ckpt, _, _ = ae
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"conditions": [{"type": "text", "box": [0, 0, 1], "prompt": "x"}]}))
    result = invoke("invert", "--ckpt", ckpt, "--spec", spec, "--out", tmp_path / "o")
    assert_refused(result, "must be four numbers [y0, x0, y1, x1] in [-1, 1] units")
    spec.write_text(json.dumps({"canvas": [1, 2, 3], "conditions": [{"type": "text", "box": [-1, -1, 1, 1], "prompt": "x"}]}))
    assert_refused(invoke("invert", "--ckpt", ckpt, "--spec", spec, "--out", tmp_path / "o"), "[height, width]")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 3. bounded work


def test_a_tiff_tile_past_the_bound_is_refused_before_allocating(ae, tmp_path):
    _, ckpt, z_file, _ = ae
    result = invoke("render", z_file, "--ckpt", ckpt, "--out", tmp_path / "x.tif", "--tile", 2**20, "--no-progress")
    assert_refused(result, "the tile size must be from 1 to 4096 pixels, got 1048576.")
    assert not (tmp_path / "x.tif").exists()


def test_invert_refuses_a_thin_text_box_and_too_many_regions_before_loading(tmp_path):
    base = ["invert", "--ckpt", tmp_path / "none", "--out", tmp_path / "out", "--size", "64"]
    assert_refused(invoke(*base, "--text", "0,-1,1e-9,1:boat"), "more than 16 times longer than wide on the canvas")
    spec = {"conditions": [{"type": "text", "box": [-1, -1, 1, 1], "prompt": f"thing {i}"} for i in range(65)]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert_refused(invoke(*base, "--spec", tmp_path / "spec.json"), "the spec has 65 conditions, more than the 64 one inversion may have")


# ---------------------------------------------------------------- 5. hidden partial files


def test_sigterm_is_handled_like_ctrl_c_and_removes_the_temporary(tmp_path):
    import os
    import signal

    from infd.commands.common import sigterm_as_interrupt
    from infd.files import atomic_path

    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt(), atomic_path(tmp_path / "out.png") as tmp:
        tmp.write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_temporaries_of_killed_writers_are_cleared_by_the_next_write(tmp_path):
    import os
    import subprocess
    import sys

    from infd.files import atomic_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale_file, stale_folder = tmp_path / f".out.tmp-{dead}-0123abcd.png", tmp_path / f".step_00010.tmp-{dead}-89abcdef"
    recent, live = tmp_path / f".other.tmp-{dead}-00000000.png", tmp_path / f".live.tmp-{os.getpid()}-11111111.png"
    user = tmp_path / ".notes.tmp-1-x.txt"  # not our naming
    stale_file.write_bytes(b"half")
    (stale_folder / "sub").mkdir(parents=True)
    for path in (recent, live, user):
        path.write_bytes(b"x")
    for path in (stale_file, stale_folder, live, user):
        os.utime(path, (0, 0))
    with atomic_path(tmp_path / "new.png") as tmp:
        tmp.write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([recent.name, live.name, user.name, "new.png"])


# ---------------------------------------------------------------- 6. one sentence, before the work


def test_a_full_disk_is_one_sentence_and_leaves_nothing(monkeypatch, tmp_path):
    import errno

    from PIL import Image

    from infd.images import save_image

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(InfdError, match="the disk filled up while writing"):
        save_image(torch.zeros(3, 8, 8), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": "fast"}, 'training option lr must be a number, got "fast".'),
        ({"model": {"latent_chanels": 4}}, "unknown model option(s) latent_chanels; known: "),
        ({"data": {"input_size": [1]}}, "training option input_size must be a whole number, got [1]."),
    ],
)
def test_training_configs_of_the_wrong_shape_are_named_in_one_sentence(values, message):
    from infd.training.autoencoder import AETrainConfig

    with pytest.raises(InfdError) as error:
        AETrainConfig.from_dict(values)
    assert message in str(error.value)


def test_convert_vae_never_replaces_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_refused(invoke("convert-vae", "--vae", tmp_path / "none", "--out", out), f"'{out}' already exists; pass --overwrite")
    result = invoke("convert-vae", "--vae", tmp_path / "none", "--out", out, "--overwrite")
    assert_refused(result, f"--overwrite replaces only what `infd convert-vae` writes, and '{out / 'notes.txt'}' is not that")
    assert snapshot(out) == {"notes.txt": b"keep me"}


def test_sample_refuses_a_seed_past_64_bits_before_loading(tmp_path):
    result = invoke("sample", "--ckpt", tmp_path / "none", "--out", tmp_path / "out", "--n", 2, "--seed", 2**64 - 1)
    assert_refused(result, f"--seed must be a whole number from 0 to {2**64 - 2}, got {2**64 - 1}.")


# ---------------------------------------------------------------- 8. small gaps


@pytest.mark.parametrize(
    "options, message",
    [
        (["--scaling-factor", "nan"], "the scaling factor must be a positive finite number, got nan."),
        (["--input-size", "0"], "the input size must be a positive number of pixels, got 0."),
    ],
)
def test_convert_vae_refuses_meaningless_numbers(tmp_path, options, message):
    assert_refused(invoke("convert-vae", "--vae", tmp_path / "none", "--out", tmp_path / "out", *options), message)


def test_a_tile_of_zero_is_refused_like_a_negative_one_or_a_huge_one(ae, tmp_path):
    _, ckpt, _, image = ae
    for tile in (0, -1, 2**20):
        assert_refused(invoke("reconstruct", image, "--ckpt", ckpt, "--out", tmp_path / "out.png", "--tile", tile), "tile size")
    assert not (tmp_path / "out.png").exists()


def test_serve_refuses_a_negative_cache(tmp_path):
    assert_refused(invoke("serve", "--ckpt", tmp_path / "none", "--cache-mib=-1"), "--cache-mib must be 0 (no cache) or more, got -1.")


def test_lpips_weights_with_another_perceptual_loss_are_refused():
    from infd.training.autoencoder import AETrainConfig

    with pytest.raises(InfdError, match='set "perceptual" to "lpips" or "auto"'):
        AETrainConfig.from_dict({"perceptual": "ffl", "lpips_vgg": "vgg.pth"}).validate()


def test_a_symlink_loop_is_reported_as_one(tmp_path):
    from infd.images import ImageError, load_image

    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nothing.png")
    with pytest.raises(ImageError, match="is a loop of symbolic links"):
        load_image(tmp_path / "a.png")
    with pytest.raises(ImageError, match="which does not exist"):
        load_image(tmp_path / "gone.png")


def test_resuming_drops_log_records_after_the_checkpoint(tmp_path):
    from infd.training.loop import drop_log_after

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 10, "l1": 1}\n{"step": 20, "l1": 0.5}\n{"step": 20, "stopped": "time_limit"}\n{"step": 30, "l1": 0.4}\n{"step": 4')
    drop_log_after(log, 20)
    assert log.read_text() == '{"step": 10, "l1": 1}\n{"step": 20, "l1": 0.5}\n{"step": 20, "stopped": "time_limit"}\n'


def test_optimizer_state_of_a_model_built_in_another_order_is_refused(tmp_path):
    import torch

    from infd.store import load_optimizer_state

    a, b = torch.nn.Linear(3, 5), torch.nn.Conv2d(2, 4, 3)
    saved = torch.optim.Adam([*a.parameters(), *b.parameters()])
    (a.weight.sum() + b.weight.sum() + a.bias.sum() + b.bias.sum()).backward()
    saved.step()
    same = torch.optim.Adam([*a.parameters(), *b.parameters()])
    load_optimizer_state(same, saved.state_dict(), tmp_path)  # the same order loads
    assert torch.equal(same.state_dict()["state"][0]["exp_avg"], saved.state_dict()["state"][0]["exp_avg"])
    swapped = torch.optim.Adam([*b.parameters(), *a.parameters()])
    with pytest.raises(InfdError, match="another order"):
        load_optimizer_state(swapped, saved.state_dict(), tmp_path)
