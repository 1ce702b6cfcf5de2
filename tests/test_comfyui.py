"""The ComfyUI nodes (comfyui/infd_nodes), called as ComfyUI calls them: INPUT_TYPES, then FUNCTION with those inputs.

ComfyUI itself is not installed: `run_node` does what its executor does for one node (fills
every widget from its INPUT_TYPES default unless given, refuses a missing link or an input the
node does not declare, calls FUNCTION on a fresh instance) and checks the outputs against
RETURN_TYPES (IMAGE: B x H x W x 3 float in [0, 1]).
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from infd.errors import InfdError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FOLDER = Path(__file__).resolve().parent.parent / "comfyui" / "infd_nodes"
WIDGETS = {"STRING", "INT", "FLOAT", "BOOLEAN"}


def import_as_comfyui_does():
    """ComfyUI imports custom_nodes/<folder>/__init__.py as a package under the folder's name."""
    spec = importlib.util.spec_from_file_location("infd_nodes", FOLDER / "__init__.py", submodule_search_locations=[str(FOLDER)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["infd_nodes"] = module
    spec.loader.exec_module(module)
    return module


nodes = import_as_comfyui_does()


def run_node(name: str, **inputs):
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    declared = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
    assert not set(inputs) - set(declared), f"{name} takes no {set(inputs) - set(declared)}"
    kwargs = {}
    for key, spec in declared.items():
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if key in inputs:
            kwargs[key] = inputs[key]
        elif isinstance(kind, list):
            kwargs[key] = options.get("default", kind[0])
        elif kind in WIDGETS:
            kwargs[key] = options["default"]
        else:
            raise AssertionError(f"{name} needs its {kind} input '{key}' linked")
    result = getattr(cls(), cls.FUNCTION)(**kwargs)
    assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    for kind, value in zip(cls.RETURN_TYPES, result):
        if kind == "IMAGE":
            assert value.ndim == 4 and value.shape[-1] == 3 and value.dtype == torch.float32
            assert 0 <= value.min() and value.max() <= 1
        elif kind == "INFD_LATENT":
            assert value["z"].ndim == 4 and value["aspect"] > 0
    return result


def test_every_node_follows_comfyuis_conventions():
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        assert set(inputs) <= {"required", "optional", "hidden"}, name
        for spec in inputs["required"].values():
            assert isinstance(spec, tuple) and isinstance(spec[0], (list, str))
        assert isinstance(cls.RETURN_TYPES, tuple) and isinstance(cls.RETURN_NAMES, tuple)
        assert callable(getattr(cls(), cls.FUNCTION)) and cls.CATEGORY == "infd"


@pytest.fixture
def pipeline_folder(make_tiny_pipeline, tmp_path):
    folder = tmp_path / "pipe"
    make_tiny_pipeline().save_pretrained(folder)
    return folder


def test_sample_then_render_a_region(pipeline_folder):
    (model,) = run_node("InfdLoadModel", path=str(pipeline_folder), device="cpu")
    image, latent = run_node("InfdSample", model=model, seed=3, steps=2, width=40, height=24, batch_size=2)
    assert image.shape == (2, 24, 40, 3) and latent["z"].shape == (2, 3, 8, 8)
    again, _ = run_node("InfdSample", model=model, seed=4, steps=2, width=40, height=24)
    assert torch.allclose(again[0], image[1], atol=1e-5)  # image i has seed + i, as `infd sample`
    (zoom,) = run_node("InfdRenderRegion", model=model, latent=latent, y0=-0.5, x0=0.0, y1=0.5, x1=1.0, size="20")
    assert zoom.shape == (2, 20, 20, 3)
    (whole,) = run_node("InfdRenderRegion", model=model, latent=latent, size="40x24")
    assert torch.allclose(whole, image, atol=1e-5)


def test_encode_an_image_keeps_its_aspect(make_tiny_model, tmp_path):
    make_tiny_model("clif").save_pretrained(tmp_path / "ae")
    (model,) = run_node("InfdLoadModel", path=str(tmp_path / "ae"))
    picture = torch.rand(1, 30, 40, 3)  # 4:3
    (latent,) = run_node("InfdEncodeImage", model=model, image=picture)
    assert latent["aspect"] == pytest.approx(4 / 3)
    (image,) = run_node("InfdRenderRegion", model=model, latent=latent, size="64")
    assert image.shape == (1, 48, 64, 3)  # the long side; the short one at the picture's aspect
    with pytest.raises(InfdError, match="cannot sample"):
        run_node("InfdSample", model=model, width=16, height=16, steps=1)


def test_decode_a_stable_diffusion_latent_at_any_size(tmp_path):
    from infd.stable_diffusion.convert import convert_autoencoder, load_ldm_autoencoder

    torch.manual_seed(0)
    kl = dict(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, sample_size=32)
    AutoencoderKL(**kl, latent_channels=4).eval().save_pretrained(tmp_path / "vae")
    vae = load_ldm_autoencoder(tmp_path / "vae")
    convert_autoencoder(vae).save_pretrained(tmp_path / "converted")  # what `infd convert-vae` writes
    (model,) = run_node("InfdLoadModel", path=str(tmp_path / "converted"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        samples = vae.encode(x).latent_dist.mean  # ComfyUI's LATENT: the raw VAE latent
        original = (vae.decode(samples).sample.clamp(-1, 1) + 1) / 2
    (native,) = run_node("InfdDecodeSDLatent", model=model, samples={"samples": samples}, size="32")
    assert (native.permute(0, 3, 1, 2) - original).abs().max() < 1e-4  # at its own size: SD's decoder, unchanged
    (large,) = run_node("InfdDecodeSDLatent", model=model, samples={"samples": samples}, size="96x64")
    assert large.shape == (2, 64, 96, 3)
    with pytest.raises(InfdError, match="this decoder takes 16x16 latents"):
        run_node("InfdDecodeSDLatent", model=model, samples={"samples": torch.zeros(1, 4, 24, 16)})


@pytest.mark.parametrize(
    "node, inputs, message",
    [
        ("InfdLoadModel", {"path": "/nonexistent"}, "does not exist"),
        ("InfdLoadModel", {"path": "PIPE", "device": "tpu"}, "unknown device"),
        ("InfdRenderRegion", {"size": "0"}, "positive pixels"),
        ("InfdRenderRegion", {"size": "9000x10"}, "longer than the 8192"),
        ("InfdRenderRegion", {"y0": 0.5, "y1": 0.5}, "empty"),
        ("InfdEncodeImage", {"image": torch.rand(1, 3, 8, 8)}, "batch x height x width"),
        ("InfdSample", {"steps": 5000}, "sampling steps"),
    ],
)
def test_bad_inputs_are_one_sentence(pipeline_folder, node, inputs, message):
    model = nodes.nodes.load_model(str(pipeline_folder), "cpu")
    latent = {"z": torch.zeros(1, 3, 8, 8), "aspect": 1.0}
    links = {"model": model, "latent": latent, "width": 16, "height": 16}
    cls = nodes.NODE_CLASS_MAPPINGS[node]
    declared = cls.INPUT_TYPES()["required"]
    given = {**{k: v for k, v in links.items() if k in declared}, **{k: str(pipeline_folder) if isinstance(v, str) and v == "PIPE" else v for k, v in inputs.items()}}
    with pytest.raises(InfdError, match=message):
        run_node(node, **given)
