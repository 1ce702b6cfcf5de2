"""The generative demo weights (weights/wallpapers): safetensors + JSON only, fp16 on disk,
and they sample and re-render deterministically on the CPU."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from infd.diffusion.pipeline import load_pipeline
from infd.geometry import Box

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "weights" / "wallpapers"


def test_shipped_pipeline_is_safetensors_and_json_only_in_fp16():
    files = [p for p in PIPELINE.rglob("*") if p.is_file() and p.name != "infd_pipeline.py"]
    assert {p.suffix for p in files} == {".json", ".safetensors"}
    # The one other file is diffusers' custom-pipeline entry: nothing but an import of infd's class.
    code = [line for line in (PIPELINE / "infd_pipeline.py").read_text().splitlines() if line and not line.startswith((" ", '"""', "diffusers'"))]
    assert code == ["from infd.diffusion.pipeline import INFDPipeline  # noqa: F401"]
    assert sum(p.stat().st_size for p in ROOT.joinpath("weights").rglob("*") if p.is_file()) <= 40 * 2**20
    for path in (p for p in files if p.suffix == ".safetensors"):
        with safe_open(str(path), "pt") as weights:
            assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}, path
    assert json.loads((PIPELINE / "model_index.json").read_text())["_class_name"] == "INFDPipeline"


def test_shipped_pipeline_samples_and_rerenders_deterministically():
    pipe = load_pipeline(PIPELINE)
    assert pipe.unet.dtype == torch.float32  # fp16 on disk, computed in fp32 on the CPU
    z = pipe.sample_latents(1, num_inference_steps=4, generator=torch.Generator().manual_seed(3))
    again = pipe.sample_latents(1, num_inference_steps=4, generator=torch.Generator().manual_seed(3))
    assert z.shape[1:] == pipe.autoencoder.latent_shape and torch.isfinite(z).all()
    assert torch.equal(z, again)
    image = pipe.render(z, 256, 256, output_type="pt")
    assert image.shape == (1, 3, 256, 256) and 0 <= image.min() and image.max() <= 1
    assert image.std() > 0.01, "a sample should not be a flat colour"
    assert torch.equal(image, pipe.render(z.clone(), 256, 256, output_type="pt"))
    # The centre quarter rendered at 128² equals the same pixels of the 256² render.
    zoom = pipe.render(z, 128, 128, box=Box(-0.5, -0.5, 0.5, 0.5), output_type="pt")
    torch.testing.assert_close(zoom, image[..., 64:192, 64:192], atol=1e-5, rtol=0)
