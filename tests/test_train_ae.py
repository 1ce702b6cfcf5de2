import json

import pytest
import torch
from conftest import TEST_SEED, TINY_MODEL
from safetensors.torch import load_file

from infd.errors import InfdError
from infd.store import checkpoint_dirs
from infd.training.autoencoder import AETrainConfig, train_autoencoder


def tiny_config(**overrides) -> AETrainConfig:
    values = dict(
        model={k: v for k, v in TINY_MODEL.items() if k != "input_size"},
        data={"input_size": 32, "crop_size": 24},
        steps=50,
        batch_size=4,
        lr=2e-3,
        perceptual="ffl",
        gan_weight=0.5,
        gan_start=30,
        num_workers=0,
        log_every=5,
        checkpoint_every=25,
        sample_every=50,
        seed=TEST_SEED,
    )
    values.update(overrides)
    return AETrainConfig.from_dict(values)


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_checkpoints(image_folder, tmp_path):
    run = tmp_path / "run"
    last = train_autoencoder(tiny_config(steps=100, gan_start=80, checkpoint_every=50, sample_every=100), image_folder, run, progress=False)
    log = read_log(run)
    assert log[-1]["step"] == 100
    first, final = (log[0]["l1"] + log[1]["l1"]) / 2, (log[-4]["l1"] + log[-5]["l1"]) / 2
    assert final < 0.85 * first, f"l1 went from {first} to {final}"
    assert "d" in log[-1] and "g" in log[-1], "the GAN terms should be active after gan_start"
    files = sorted(p.name for p in last.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors", "training_state.json", "training_state.safetensors"]
    assert not list(run.rglob("*.bin")) and not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))
    assert (run / "samples" / "step_0000100.png").is_file()
    assert [p.name for p in checkpoint_dirs(run)] == ["step_0000050", "step_0000100"]


def test_resume_continues_exactly(image_folder, tmp_path):
    options = dict(gan_start=3, ema_decay=0.9, checkpoint_every=4, sample_every=100)
    straight = train_autoencoder(tiny_config(steps=8, **options), image_folder, tmp_path / "a", progress=False)
    train_autoencoder(tiny_config(steps=4, **options), image_folder, tmp_path / "b", progress=False)
    resumed = train_autoencoder(tiny_config(steps=8, **options), image_folder, tmp_path / "b", resume=True, progress=False)
    for name in ("diffusion_pytorch_model.safetensors", "training_state.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"


def test_existing_run_needs_resume_and_resume_needs_a_run(image_folder, tmp_path):
    train_autoencoder(tiny_config(steps=2, checkpoint_every=2), image_folder, tmp_path / "run", progress=False)
    with pytest.raises(InfdError, match="--resume"):
        train_autoencoder(tiny_config(steps=4), image_folder, tmp_path / "run", progress=False)
    with pytest.raises(InfdError, match="no checkpoint"):
        train_autoencoder(tiny_config(steps=4), image_folder, tmp_path / "fresh", resume=True, progress=False)


def test_config_file_errors(tmp_path):
    with pytest.raises(InfdError, match="unknown training option"):
        AETrainConfig.from_dict({"stepz": 3})
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(InfdError, match="not valid JSON"):
        AETrainConfig.load(bad)
    with pytest.raises(InfdError, match="does not exist"):
        AETrainConfig.load(tmp_path / "missing.json")


def test_shipped_configs_parse():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("ae-*.json"))
    assert configs
    for path in configs:
        AETrainConfig.load(path).validate()


def test_vq_latent_trains(image_folder, tmp_path):
    cfg = tiny_config(steps=4, gan_weight=0.0, model={**tiny_config().model, "latent_type": "vq", "vq_codebook_size": 64})
    last = train_autoencoder(cfg, image_folder, tmp_path / "vq", progress=False)
    assert json.loads((last / "config.json").read_text())["latent_type"] == "vq"


def test_time_limit_checkpoints_and_image_cache_changes_nothing(image_folder, tmp_path):
    """A run stopped by --time-limit resumes exactly; caching decoded images gives the same batches."""
    options = dict(ema_decay=0.9, gan_start=3, checkpoint_every=100, sample_every=100)
    straight = train_autoencoder(tiny_config(steps=6, **options), image_folder, tmp_path / "a", progress=False)
    stopped = train_autoencoder(tiny_config(steps=6, time_limit=1e-9, cache_images=True, **options), image_folder, tmp_path / "b", progress=False)
    assert stopped.name == "step_0000001"
    assert read_log(tmp_path / "b")[-1] == {"step": 1, "stopped": "time_limit"}
    resumed = train_autoencoder(tiny_config(steps=6, cache_images=True, **options), image_folder, tmp_path / "b", resume=True, progress=False)
    a, b = load_file(str(straight / "training_state.safetensors")), load_file(str(resumed / "training_state.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_time_limit_must_be_a_non_negative_number():
    with pytest.raises(InfdError, match="time_limit"):
        tiny_config(time_limit=-1).validate()


def test_init_takes_the_configs_padding_and_frozen_encoder(image_folder, tmp_path):
    """--init keeps the checkpoint's weights and architecture but builds it with the config's
    weight-free options (decoder padding here); a frozen encoder keeps its weights bit for bit."""
    parent = train_autoencoder(tiny_config(steps=4, gan_weight=0.0), image_folder, tmp_path / "parent", progress=False)
    model = {**tiny_config().model, "decoder_padding": "replicate", "block_out_channels": [4, 4, 4]}  # shapes: the checkpoint's
    child = train_autoencoder(
        tiny_config(steps=4, gan_weight=0.0, model=model, init=str(parent), freeze_encoder=True), image_folder, tmp_path / "child", progress=False
    )
    config = json.loads((child / "config.json").read_text())
    assert config["decoder_padding"] == "replicate" and config["encoder_padding"] == "zeros"
    assert config["block_out_channels"] == [8, 16, 16]
    before, after = load_file(str(parent / "diffusion_pytorch_model.safetensors")), load_file(str(child / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def test_padding_reaches_every_padded_conv_and_changes_the_features(make_tiny_model):
    import torch.nn as nn

    from infd.store import load_autoencoder

    zeros = make_tiny_model("clif", trunk_type="sr", residual_renderer=True, latent_anchor=True)
    replicate = make_tiny_model("clif", trunk_type="sr", residual_renderer=True, latent_anchor=True, decoder_padding="replicate")
    replicate.load_state_dict(zeros.state_dict())
    padded = [m for m in replicate.decoder.modules() if isinstance(m, nn.Conv2d) and any(m.padding)] + [replicate.renderer.base.head]
    assert padded and all(m.padding_mode == "replicate" for m in padded)
    assert all(m.padding_mode == "zeros" for m in replicate.encoder.modules() if isinstance(m, nn.Conv2d))
    z = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        a, b = zeros.decode_features(z), replicate.decode_features(z)
    assert not torch.allclose(a, b)
    with pytest.raises(InfdError, match="decoder_padding"):
        make_tiny_model("clif", decoder_padding="circular")
    with pytest.raises(InfdError, match="not block_out_channels"):
        load_autoencoder("weights/demo-ae", overrides={"block_out_channels": [8, 8]})
