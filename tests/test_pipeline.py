"""INFDPipeline: diffusers save/load, any size from the same latents, output types, the fixed baseline."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from PIL import Image

from infd import rendering, store
from infd.diffusion.pipeline import INFDPipeline, load_pipeline
from infd.errors import InfdError
from infd.geometry import Box
from infd.store import find_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_save_and_load_round_trip_reproduces_the_output(make_tiny_pipeline, tmp_path):
    pipe = make_tiny_pipeline()
    pipe.autoencoder.register_to_config(scaling_factor=0.7)
    before = pipe(num_images=2, height=24, width=40, num_inference_steps=3, generator=seeded(0, 1), output_type="pt").images
    pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["autoencoder", "infd_pipeline.py", "model_index.json", "scheduler", "unet"]
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "INFDPipeline" and index["autoencoder"][1] == "NeuralFieldAutoencoder"
    again = INFDPipeline.from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    assert again.scaling_factor == 0.7
    after = again(num_images=2, height=24, width=40, num_inference_steps=3, generator=seeded(0, 1), output_type="pt").images
    assert torch.equal(before, after)
    assert torch.equal(load_pipeline(tmp_path / "pipe")(num_inference_steps=3, generator=seeded(0, 1), num_images=2, height=24, width=40, output_type="pt").images, before)
    # diffusers' own loader, through its custom-pipeline mechanism (the folder's pipeline.py).
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", custom_pipeline="infd_pipeline", trust_remote_code=True)
    assert type(loaded) is INFDPipeline
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded(num_images=2, height=24, width=40, num_inference_steps=3, generator=seeded(0, 1), output_type="pt").images, before)


def test_one_sample_renders_at_every_size_and_aspect(make_tiny_pipeline):
    pipe = make_tiny_pipeline()
    z = pipe(num_images=2, num_inference_steps=3, generator=seeded(3, 4), output_type="latent").images
    assert z.shape == (2, 3, 8, 8)
    sizes = [(32, 32), (20, 50), (64, 24)]
    renders = {size: pipe.render(z, *size, output_type="pt") for size in sizes}
    for (h, w), images in renders.items():
        assert images.shape == (2, 3, h, w)
    # The same field at every size: a 2x render, averaged down, is close to the 1x render.
    big = pipe.render(z, 64, 64, output_type="pt")
    assert (torch.nn.functional.avg_pool2d(big, 2) - renders[(32, 32)]).abs().mean() < 0.1
    # And the pipeline call renders exactly what rendering its latents gives.
    direct = pipe(num_images=2, height=20, width=50, num_inference_steps=3, generator=seeded(3, 4), output_type="pt").images
    assert torch.equal(direct, renders[(20, 50)])
    zoom = pipe.render(z, 16, 16, box=Box(-0.5, -0.5, 0.5, 0.5), output_type="pt")
    assert torch.allclose(zoom, renders[(32, 32)][..., 8:24, 8:24], atol=1e-5)


def test_same_seed_same_images_and_other_seeds_differ(make_tiny_pipeline):
    pipe = make_tiny_pipeline()
    a = pipe(num_images=1, num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="np").images
    b = pipe(num_images=1, num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="np").images
    c = pipe(num_images=1, num_inference_steps=3, generator=torch.Generator().manual_seed(6), output_type="np").images
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_output_types(make_tiny_pipeline):
    pipe = make_tiny_pipeline()

    def run(**kwargs):  # fresh generators each time: a generator's stream moves on as it is used
        return pipe(num_images=2, height=12, width=20, num_inference_steps=2, generator=seeded(0, 1), **kwargs)

    pil = run().images
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (20, 12) and im.mode == "RGB" for im in pil)
    array = run(output_type="np").images
    assert array.shape == (2, 12, 20, 3) and array.dtype == np.float32 and 0 <= array.min() <= array.max() <= 1
    assert np.abs(np.asarray(pil[1]).astype(float) - array[1] * 255).max() <= 0.5 + 1e-3
    tensor = run(output_type="pt").images
    assert tensor.shape == (2, 3, 12, 20)
    (images,) = run(output_type="pt", return_dict=False)
    assert torch.equal(images, tensor)


def test_schedulers_swap_like_in_any_diffusers_pipeline(make_tiny_pipeline):
    pipe = make_tiny_pipeline()

    def run():
        return pipe(num_images=1, num_inference_steps=4, generator=seeded(0), output_type="pt").images

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim = run()
    pipe.use_sampler("ddpm").use_sampler("ddim")
    assert torch.equal(run(), ddim)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert not torch.equal(run(), ddim)
    assert isinstance(pipe.use_sampler("ddpm").scheduler, type(pipe.scheduler))


def test_fixed_resolution_baseline_is_one_argument_away(make_tiny_pipeline):
    pipe = make_tiny_pipeline()
    z = pipe(num_images=1, num_inference_steps=2, generator=seeded(0), output_type="latent").images
    native = pipe.render(z, 32, 32, renderer="fixed", output_type="pt")
    expected = rendering.render(pipe.autoencoder, z, (32, 32), renderer="fixed")
    assert torch.equal(native, expected)
    big = pipe.render(z, 96, 64, renderer="fixed", output_type="pt")
    lanczos = pipe.render(z, 96, 64, renderer="fixed", upsample="lanczos", output_type="pt")
    assert big.shape == lanczos.shape == (1, 3, 96, 64)
    assert (big - lanczos).abs().mean() < 0.05  # two upsamplings of the same 32² image
    assert not torch.equal(pipe.render(z, 32, 32, output_type="pt"), native)  # CLIF is another renderer


def test_bad_inputs_are_clear_errors(make_tiny_pipeline, make_tiny_model, tmp_path):
    pipe = make_tiny_pipeline()
    for kwargs, message in [
        (dict(height=0), "not a positive"),
        (dict(width=-4), "not a positive"),
        (dict(num_inference_steps=0), "sampling steps"),
        (dict(num_images=0), "num_images"),
        (dict(output_type="jpeg"), "output type"),
        (dict(renderer="liif"), "no 'liif' renderer"),
        (dict(upsample="lanczos"), "fixed-resolution renderer only"),
        (dict(eta=0.3), "eta applies to the ddim sampler only"),
        (dict(num_images=2, generator=seeded(0)), "one generator per image"),
    ]:
        with pytest.raises(InfdError, match=message):
            pipe(num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)
    with pytest.raises(InfdError, match="autoencoder's latents are 4x8x8"):
        INFDPipeline(make_tiny_model(latent_channels=4), pipe.unet, pipe.scheduler)
    with pytest.raises(InfdError, match="fixed_head"):
        rendering.render(make_tiny_model(), torch.zeros(1, 3, 8, 8), (8, 8), renderer="fixed")


def test_finding_pipelines_and_clear_errors(make_tiny_pipeline, make_tiny_model, tmp_path):
    with pytest.raises(InfdError, match="does not exist"):
        load_pipeline(tmp_path / "nope")
    make_tiny_model().save_pretrained(tmp_path / "ae")
    with pytest.raises(InfdError, match="is an autoencoder"):
        load_pipeline(tmp_path / "ae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InfdError, match="holds no pipeline"):
        load_pipeline(tmp_path / "empty")
    run = tmp_path / "run" / "checkpoints"
    for step in ("step_0000010", "step_0000020"):
        make_tiny_pipeline().save_pretrained(run / step)
    assert find_pipeline(tmp_path / "run") == run / "step_0000020"
    assert store.find_checkpoint(tmp_path / "run") == run / "step_0000020" / "autoencoder"
    # A pipeline whose autoencoder was swapped for one with other latents is refused.
    make_tiny_model(latent_channels=4).save_pretrained(run / "step_0000020" / "autoencoder")
    with pytest.raises(InfdError, match="use the autoencoder the LDM was trained with"):
        load_pipeline(tmp_path / "run")
