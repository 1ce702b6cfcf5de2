"""The paper's checkpoints through infd: conversion equals the reference code's own outputs.

tests/fixtures/reference holds tiny checkpoints written in the reference trainer's format
with random weights, and the reference code's outputs on them (scripts/make_reference_fixtures.py,
run on a checkout of github yinboc/infd). Any wrong key, transposed weight, missing norm or
off-by-half coordinate changes these numbers far beyond the tolerances.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from infd import rendering
from infd.cli import app
from infd.errors import InfdError
from infd.geometry import Box
from infd.models import normalized_clif
from infd.official import build_models, convert_official, read_reference_checkpoint, reference_checkpoint
from infd.official.convert import IGNORED_PREFIXES
from infd.store import load_autoencoder

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1]."""
    return float(-10 * torch.log10(((a.detach() - b) / 2).pow(2).mean()))


@pytest.fixture(scope="module")
def outputs():
    return load_file(FIXTURES / "outputs.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both fixtures converted by the command, as a user would."""
    root = tmp_path_factory.mktemp("official")
    for stage in ("ae", "dm"):
        run_infd("convert-official", str(FIXTURES / f"{stage}_stage.pth"), "--out", str(root / stage))
    return root


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def run_infd(*args) -> str:
    code, output = invoke(*args)
    assert code == 0, output
    return output


def test_the_autoencoder_encodes_quantises_and_renders_as_the_reference(converted, outputs):
    model = load_autoencoder(converted / "ae")
    z = rendering.encode(model, FIXTURES / "input.png")  # PIL Lanczos to 256², as the reference prepares inputs
    assert (z - outputs["z"]).abs().max() < 1e-4
    z_q, _ = model.quantize(outputs["z"])
    assert torch.equal(z_q, outputs["z_q"]), "the nearest-code search must pick the reference's codes, ties included"
    assert int(outputs["ties"]) > 0, "the fixture must exercise ties"
    state = model.prepare_render(outputs["z"])
    native = rendering.render_prepared(model, state, Box.full(), (256, 256))
    assert psnr(native, outputs["recon_256"]) >= 80  # the goal is 48 dB (PNG rounding); float32 gives ~119
    tiled = rendering.render(model, outputs["z"], (256, 256), tile=48) * 2 - 1
    assert psnr(tiled, outputs["recon_256"].clamp(-1, 1)) >= 80


@pytest.mark.parametrize(
    "key, size, mode, patch",
    [("recon_100", 100, "scale", None), ("recon_100", 100, "whole", None), ("recon_384", 384, "whole", None), ("recon_patch_320", 320, "patch", 256), ("recon_patch_320_p64", 320, "patch", 64)],
)
def test_each_statistics_mode_reproduces_its_reference_render(converted, outputs, key, size, mode, patch):
    model = load_autoencoder(converted / "ae", overrides={"renderer_statistics": mode})
    if patch:
        model.renderer.patch_size = patch
    image = rendering.render(model, outputs["z"], (size, size), tile=(70, 90))
    assert psnr(image * 2 - 1, outputs[key].clamp(-1, 1)) >= 70


def test_statistics_gathered_in_one_pass_equal_those_run_again_for_each_norm(converted, outputs, monkeypatch):
    model = load_autoencoder(converted / "ae", overrides={"renderer_statistics": "whole"})
    one_pass = rendering.render(model, outputs["z"], (384, 384), tile=(70, 90))  # every window paused at each norm
    monkeypatch.setattr(normalized_clif, "KEEP_BYTES", 0)  # as for grids too large to keep: each norm's pass starts again
    assert torch.equal(rendering.render(model, outputs["z"], (384, 384), tile=(70, 90)), one_pass)


def test_the_default_mode_is_seam_free_at_any_size_and_aspect(converted, outputs):
    model = load_autoencoder(converted / "ae")
    assert model.renderer.statistics == "scale"
    z = outputs["z"]
    for size, box in (((300, 520), None), ((96, 64), Box(-0.3, -0.9, 0.1, 0.2))):
        whole = rendering.render(model, z, size, box=box, tile=None)
        for tile in (37, (64, 100)):
            assert (rendering.render(model, z, size, box=box, tile=tile) - whole).abs().max() <= 1e-5
    full = rendering.render(model, z, (640, 640), tile=None)  # a zoom is the crop of the whole image at its scale
    zoom = rendering.render(model, z, (320, 320), box=Box(-0.5, -0.5, 0.5, 0.5), tile=96)
    assert (zoom - full[..., 160:480, 160:480]).abs().max() <= 1e-5
    assert psnr(full * 2 - 1, rendering.render(load_autoencoder(converted / "ae", overrides={"renderer_statistics": "whole"}), z, (640, 640)) * 2 - 1) >= 28
    patchwise = load_autoencoder(converted / "ae", overrides={"renderer_statistics": "patch"})
    patchwise.renderer.patch_size = 64
    a, b = rendering.render(patchwise, z, (160, 160), tile=None), rendering.render(model, z, (160, 160), tile=None)
    assert (a - b).abs().max() > 1e-3, "the patch mode has its own statistics per patch (the reference's seams)"


def test_the_unet_and_the_sampler_are_the_reference_ones(converted, outputs):
    from infd.diffusion.pipeline import INFDPipeline

    pipe = INFDPipeline.from_pretrained(converted / "dm")
    assert (pipe.default_steps, pipe.default_eta) == (200, 1.0)
    with torch.no_grad():
        eps = pipe.unet(outputs["unet_x"], outputs["unet_t"]).sample
    assert (eps - outputs["unet_out_ema"]).abs().max() <= 1e-4 * outputs["unet_out_ema"].std()
    scheduler = pipe.scheduler
    scheduler.set_timesteps(200)
    assert torch.equal(scheduler.timesteps.long(), outputs["ddim_timesteps"])
    assert torch.allclose(scheduler.alphas_cumprod.double()[scheduler.timesteps], outputs["ddim_alphas_cumprod"], atol=1e-7)
    assert torch.allclose(scheduler.betas.double(), outputs["betas"], atol=1e-8)
    x, steps = outputs["sample_xT"].clone(), 0
    with torch.no_grad():  # the reference's first DDIM eta-1 step, with its noise
        eps = pipe.unet(x, scheduler.timesteps[0]).sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        x = scheduler.step(eps, scheduler.timesteps[0], x, eta=1.0, variance_noise=noise).prev_sample
    assert (x - outputs["sample_step1"]).abs().max() <= 1e-4 * outputs["sample_step1"].std()
    del steps


def test_the_whole_reference_sampling_chain(converted, outputs):
    """200 DDIM eta-1 steps with the reference's noise, then quantised, decoded and rendered."""
    from infd.diffusion.pipeline import INFDPipeline

    pipe = INFDPipeline.from_pretrained(converted / "dm")
    scheduler = pipe.scheduler
    scheduler.set_timesteps(200)
    x = outputs["sample_xT"].clone()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
            x = scheduler.step(pipe.unet(x, t).sample, t, x, eta=1.0, variance_noise=noise).prev_sample
    assert (x - outputs["sample_z"]).abs().max() <= 1e-4 * outputs["sample_z"].std()
    image = rendering.render(pipe.autoencoder, outputs["sample_z"], (256, 256), tile=128) * 2 - 1
    assert psnr(image, outputs["sample_render_256"].clamp(-1, 1)) >= 70


def test_raw_weights_without_ema(tmp_path, outputs):
    ae, unet, _, summary = build_models(read_reference_checkpoint(FIXTURES / "dm_stage.pth"), ema=False)
    assert summary["UNet weights"].startswith("raw")
    with torch.no_grad():
        eps = unet(outputs["unet_x"], outputs["unet_t"]).sample
    assert (eps - outputs["unet_out"]).abs().max() <= 1e-4 * outputs["unet_out"].std()
    assert (eps - outputs["unet_out_ema"]).abs().max() > 1e-2, "EMA and raw weights must differ in the fixture"


def test_a_converted_model_samples_non_square_through_the_cli_and_diffusers(converted, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "samples"
    run_infd("sample", "--ckpt", str(converted / "dm"), "--n", "1", "--steps", "3", "--size", "96x64", "--out", str(out), "--no-progress")
    from PIL import Image

    assert Image.open(out / "sample_0000.png").size == (96, 64)
    pipe = DiffusionPipeline.from_pretrained(converted / "dm", custom_pipeline="infd_pipeline", trust_remote_code=True)
    images = pipe(num_images=1, height=40, width=72, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 40, 72) and torch.isfinite(images).all()


def test_an_autoencoder_only_folder_renders_but_does_not_sample(converted, tmp_path):
    code, output = invoke("sample", "--ckpt", converted / "ae", "--n", "1", "--out", tmp_path / "s")
    assert code == 1 and "autoencoder only" in output and "Traceback" not in output
    run_infd("reconstruct", str(FIXTURES / "input.png"), "--ckpt", str(converted / "ae"), "--size", "80x64", "--out", str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").is_file()


@pytest.mark.parametrize("case", ["truncated", "not a reference file", "code inside", "wrong shape", "missing"])
def test_bad_files_are_one_sentence_and_leave_nothing(tmp_path, case):
    source = FIXTURES / "ae_stage.pth"
    bad = tmp_path / "bad.pth"
    if case == "truncated":
        bad.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    elif case == "not a reference file":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    elif case == "code inside":
        torch.save({"model": {"name": "infd", "sd": {}, "args": {}}, "hook": Box.full()}, bad)  # a class: refused by weights_only
    elif case == "wrong shape":
        raw = torch.load(source, weights_only=True)
        key = next(k for k in raw["model"]["sd"] if k.startswith("renderer.") and k.endswith("weight") and raw["model"]["sd"][k].ndim == 4)
        raw["model"]["sd"][key] = raw["model"]["sd"][key][:, :-1]
        torch.save(raw, bad)
    out = tmp_path / "out"
    code, output = invoke("convert-official", bad, "--out", out)
    assert code == 1, output
    message = output.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == (["bad.pth"] if case != "missing" else [])


def test_the_mapping_at_the_released_models_real_sizes():
    """Every key of the released files used once, every shape right (on the meta device: nothing is allocated)."""
    real = json.loads((FIXTURES / "real_sizes.json").read_text())
    for stage in ("ae_stage", "dm_stage"):
        spec = real[stage]
        state = {k: torch.empty(shape, device="meta") for k, shape in spec["keys"].items()}
        ckpt = reference_checkpoint({"model": {"name": "infd", "args": spec["args"], "sd": state}}, Path(stage))
        ae, unet, _, summary = build_models(ckpt)
        assert ae.latent_shape == (3, 64, 64) and ae.feature_shape == (128, 256, 256)
        assert ae.renderer.conv_in.in_channels == 132 and ae.renderer.conv_in.out_channels == 256
        trained = [k for k in state if not k.startswith(IGNORED_PREFIXES)]
        ae_keys = [k for k in trained if not k.startswith(("z_dm.", "z_dm_ema."))]
        assert len(ae_keys) == len(ae.state_dict()), "each autoencoder weight of the file is used exactly once"
        if stage == "dm_stage":
            ema = [k for k in trained if k.startswith("z_dm_ema.")]
            split = sum(".qkv." in k for k in ema)  # each qkv weight and bias becomes q, k and v
            assert len(ema) + 2 * split == len(unet.state_dict())
            assert unet.config.block_out_channels == (224, 448, 672, 896) and summary["UNet weights"] == "EMA"


def test_convert_official_writes_a_pipeline_folder_every_command_takes(converted):
    dm = converted / "dm"
    assert {p.name for p in dm.iterdir()} >= {"model_index.json", "autoencoder", "unet", "scheduler", "infd_pipeline.py"}
    assert json.loads((dm / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    ae = load_autoencoder(dm)
    assert ae.config.renderer_type == "clif_groupnorm" and not ae.config.decoder_norm_out and ae.config.vq_distance == "expanded"
    with pytest.raises(InfdError, match="already exists"):
        convert_official(FIXTURES / "ae_stage.pth", converted / "ae")
