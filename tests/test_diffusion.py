"""LDM training (loss, exact resume, scaling factor, sources) and the sampling loop."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_UNET
from diffusers import UNet2DModel
from safetensors.torch import load_file

from infd import diffusion
from infd.errors import InfdError
from infd.latents import encode_folder
from infd.store import checkpoint_dirs
from infd.training.ldm import LDMTrainConfig, build_unet, train_ldm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def ae_and_latents(make_tiny_model, image_folder, tmp_path):
    """A saved tiny autoencoder and the latent cache of the six test images."""
    model = make_tiny_model("clif", fixed_head=True)
    model.save_pretrained(tmp_path / "ae")
    encode_folder(model, image_folder, tmp_path / "latents", shard_size=4, num_workers=0, progress=False)
    return tmp_path / "ae", tmp_path / "latents"


def tiny_config(**overrides) -> LDMTrainConfig:
    values = dict(
        unet=dict(TINY_UNET),
        steps=40,
        batch_size=8,
        lr=2e-3,
        ema_decay=0.99,
        num_workers=0,
        log_every=1,
        checkpoint_every=20,
        sample_every=1000,
        sample_count=2,
        sample_sizes=[16, 40],
        sample_steps=3,
    )
    values.update(overrides)
    return LDMTrainConfig.from_dict(values)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_checkpoints_are_pipelines(ae_and_latents, tmp_path):
    ae, latents = ae_and_latents
    run = tmp_path / "run"
    last = train_ldm(tiny_config(steps=40, sample_every=40), run, ae, latents=latents, progress=False)
    losses = [row["loss"] for row in read_log(run)]
    first, final = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert final < 0.75 * first, f"loss went from {first:.3f} to {final:.3f}"
    assert sorted(p.name for p in last.iterdir()) == ["autoencoder", "infd_pipeline.py", "model_index.json", "scheduler", "training_state.json", "training_state.safetensors", "unet"]
    assert [p.name for p in checkpoint_dirs(run, "model_index.json")] == ["step_0000020", "step_0000040"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000040_16.png", "step_0000040_40.png"]
    assert not list(run.rglob("*.bin")) and not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))
    scheduler = json.loads((last / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["num_train_timesteps"]) == (0.0015, 0.0195, 1000)
    assert scheduler["beta_schedule"] == "linear" and scheduler["prediction_type"] == "epsilon"


def test_scaling_factor_is_one_over_the_latent_std_and_stored_with_the_autoencoder(ae_and_latents, tmp_path):
    from infd.latents import LatentCache

    ae, latents = ae_and_latents
    last = train_ldm(tiny_config(steps=1, checkpoint_every=1, sample_every=1), tmp_path / "run", ae, latents=latents, progress=False)
    stored = json.loads((last / "autoencoder" / "config.json").read_text())["scaling_factor"]
    assert stored == pytest.approx(1 / LatentCache.open(latents).std())
    assert json.loads((ae / "config.json").read_text())["scaling_factor"] == 1.0  # the source is untouched


def test_resume_continues_exactly(ae_and_latents, tmp_path):
    ae, latents = ae_and_latents
    options = dict(checkpoint_every=4, lr_warmup_steps=3, prediction_type="v_prediction")
    straight = train_ldm(tiny_config(steps=8, **options), tmp_path / "a", ae, latents=latents, progress=False)
    train_ldm(tiny_config(steps=4, **options), tmp_path / "b", ae, latents=latents, progress=False)
    resumed = train_ldm(tiny_config(steps=8, **options), tmp_path / "b", latents=latents, resume=True, progress=False)
    for name in ("unet/diffusion_pytorch_model.safetensors", "training_state.safetensors", "autoencoder/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    assert [row["loss"] for row in read_log(tmp_path / "a")] == [row["loss"] for row in read_log(tmp_path / "b")]


def test_training_encodes_images_on_the_fly(make_tiny_model, image_folder, tmp_path):
    model = make_tiny_model()
    model.save_pretrained(tmp_path / "ae")
    (image_folder / "broken.png").write_bytes(b"not an image")
    last = train_ldm(tiny_config(steps=3, checkpoint_every=3, sample_every=100, batch_size=4), tmp_path / "run", tmp_path / "ae", data=image_folder, progress=False)
    assert (last / "model_index.json").is_file()
    assert read_log(tmp_path / "run")[-1]["step"] == 3


def test_run_and_data_errors(ae_and_latents, make_tiny_model, tmp_path):
    ae, latents = ae_and_latents
    with pytest.raises(InfdError, match="exactly one"):
        train_ldm(tiny_config(), tmp_path / "r", ae, progress=False)
    with pytest.raises(InfdError, match="no checkpoint"):
        train_ldm(tiny_config(), tmp_path / "r", ae, latents=latents, resume=True, progress=False)
    other = tmp_path / "other-ae"
    make_tiny_model(seed=5).save_pretrained(other)
    with pytest.raises(InfdError, match="another autoencoder"):
        train_ldm(tiny_config(), tmp_path / "r", other, latents=latents, progress=False)
    wide = tmp_path / "wide-ae"
    make_tiny_model(latent_channels=4).save_pretrained(wide)
    with pytest.raises(InfdError, match="another autoencoder"):
        train_ldm(tiny_config(), tmp_path / "r", wide, latents=latents, progress=False)
    with pytest.raises(InfdError, match="does not match"):
        train_ldm(tiny_config(unet={**TINY_UNET, "in_channels": 4}), tmp_path / "r", ae, latents=latents, progress=False)
    with pytest.raises(InfdError, match="invalid UNet options"):
        train_ldm(tiny_config(unet={**TINY_UNET, "no_such_option": 1}), tmp_path / "r", ae, latents=latents, progress=False)
    train_ldm(tiny_config(steps=1, checkpoint_every=1, sample_every=1), tmp_path / "done", ae, latents=latents, progress=False)
    with pytest.raises(InfdError, match="--resume"):
        train_ldm(tiny_config(steps=2), tmp_path / "done", ae, latents=latents, progress=False)
    with pytest.raises(InfdError, match="not the autoencoder"):
        train_ldm(tiny_config(steps=2), tmp_path / "done", other, latents=latents, resume=True, progress=False)


def test_config_errors(tmp_path):
    with pytest.raises(InfdError, match="unknown training option"):
        LDMTrainConfig.from_dict({"stepz": 3})
    for bad in ({"prediction_type": "x0"}, {"sample_sampler": "euler"}, {"beta_start": 0.1, "beta_end": 0.01}, {"scaling_factor": -1.0}):
        with pytest.raises(InfdError):
            LDMTrainConfig.from_dict(bad).validate()
    with pytest.raises(InfdError, match="does not exist"):
        LDMTrainConfig.load(tmp_path / "missing.json")


def test_shipped_ldm_configs_parse():
    configs = sorted((Path(__file__).parent.parent / "configs").glob("ldm-*.json"))
    assert configs
    for path in configs:
        config = LDMTrainConfig.load(path)
        config.validate()
        assert config.beta_start == 0.0015 and config.beta_end == 0.0195 and config.num_train_timesteps == 1000


def test_paper_config_builds_the_papers_unet():
    config = LDMTrainConfig.load(Path(__file__).parent.parent / "configs" / "ldm-paper.json")
    with torch.device("meta"):  # shapes only: no memory, no time
        unet = build_unet(config.unet, (3, 64, 64))
    assert 270e6 < sum(p.numel() for p in unet.parameters()) < 280e6  # LDM-4's 274M UNet


# ---------------------------------------------------------------- sampling


@pytest.fixture
def unet_and_schedule():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, **TINY_UNET).eval()
    return unet, diffusion.make_training_scheduler()


@pytest.mark.parametrize("name", list(diffusion.SAMPLERS))
def test_samplers_are_deterministic_per_seed(unet_and_schedule, name):
    unet, schedule = unet_and_schedule
    sampler = diffusion.make_sampler(name, schedule.config)
    eta = 0.5 if name == "ddim" else 0.0  # stochastic steps still follow the generator

    def run(seeds):
        return diffusion.sample(unet, sampler, (len(seeds), 3, 8, 8), 4, [torch.Generator().manual_seed(s) for s in seeds], eta=eta)

    a, b, c = run([1, 2]), run([1, 2]), run([3, 2])
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], c[0]) and torch.allclose(a[1], c[1], atol=1e-5)  # each image follows its own seed
    assert torch.isfinite(a).all()


def test_sampling_does_not_change_the_schedulers_state(unet_and_schedule):
    unet, schedule = unet_and_schedule
    sampler = diffusion.make_sampler("dpm++", schedule.config)
    first = diffusion.sample(unet, sampler, (1, 3, 8, 8), 5, torch.Generator().manual_seed(0))
    diffusion.sample(unet, sampler, (1, 3, 8, 8), 3, torch.Generator().manual_seed(9))
    assert torch.equal(first, diffusion.sample(unet, sampler, (1, 3, 8, 8), 5, torch.Generator().manual_seed(0)))


def test_bad_sampling_requests_are_clear_errors(unet_and_schedule):
    unet, schedule = unet_and_schedule
    with pytest.raises(InfdError, match="unknown sampler"):
        diffusion.make_sampler("euler", schedule.config)
    ddim = diffusion.make_sampler("ddim", schedule.config)
    for steps in (0, -3, 1001, 2.5):
        with pytest.raises(InfdError, match="sampling steps"):
            diffusion.sample(unet, ddim, (1, 3, 8, 8), steps)
    with pytest.raises(InfdError, match="eta"):
        diffusion.sample(unet, diffusion.make_sampler("dpm++", schedule.config), (1, 3, 8, 8), 2, eta=0.5)
    with pytest.raises(InfdError, match="eta"):
        diffusion.sample(unet, ddim, (1, 3, 8, 8), 2, eta=-1.0)
    with pytest.raises(InfdError, match="prediction type"):
        diffusion.make_training_scheduler("x0")


def test_v_target_matches_its_definition():
    schedule = diffusion.make_training_scheduler("v_prediction")
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    a = schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(diffusion.training_target(schedule, x0, noise, t), a * noise - s * x0, atol=1e-6)
    assert torch.equal(diffusion.training_target(diffusion.make_training_scheduler(), x0, noise, t), noise)
