"""The weights the demo ships: loadable, safetensors + JSON only, and they reconstruct."""

from pathlib import Path

import torch

from infd import rendering, store

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "weights" / "demo-ae"


def test_demo_weights_are_safetensors_and_json_only():
    assert sorted(p.name for p in DEMO.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_demo_weights_reconstruct_the_sample_better_than_a_flat_image():
    model = store.load_autoencoder(DEMO)
    image = rendering.image_to_tensor(ROOT / "assets" / "sample.jpg")
    z = rendering.encode(model, image)
    assert tuple(z.shape[1:]) == model.latent_shape
    size = (96, 96)
    from infd.images import resize

    truth = resize(image, size)
    rec = rendering.render(model, z, size)
    error = (rec - truth).abs().mean()
    flat = (truth.mean(dim=(-2, -1), keepdim=True) - truth).abs().mean()
    assert torch.isfinite(rec).all()
    assert error < 0.8 * flat, f"reconstruction error {error:.3f} vs flat-colour error {flat:.3f}"
