"""Conditions and region rendering: a region render is the crop of a full render, specs fail clearly, CLIP loads offline."""

import json
import string

import pytest
import torch
from conftest import write_pattern_image

from infd.errors import InfdError
from infd.geometry import Box, crop_box
from infd.inversion import condition_losses, load_spec, render_region, spec_from_dict
from infd.inversion.clip import CLIPScorer, load_clip
from infd.inversion.conditions import Critics, ImageRegion, MaskedRegion, TextRegion, check_box, condition_from_dict, square_windows
from infd.rendering import render, render_prepared

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_CLIP_SIZE = 32


def write_tiny_clip(folder) -> None:
    """A random transformers CLIP (32² images) with a character-level tokenizer, saved as a local folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text = dict(tiny, vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(tiny, image_size=TINY_CLIP_SIZE, patch_size=8), projection_dim=16))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    write_tiny_clip(folder)
    return folder


@pytest.fixture
def model(make_tiny_model):
    return make_tiny_model()


def random_latent(model, seed=0):
    return torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- region rendering


@pytest.mark.parametrize("top, left, height, width", [(0, 0, 64, 64), (8, 20, 24, 16), (45, 3, 19, 40), (63, 63, 1, 1)])
def test_a_region_render_equals_that_crop_of_the_full_canvas_render(model, top, left, height, width):
    z = random_latent(model)
    canvas = (64, 64)
    full = render(model, z, canvas, tile=None)
    box = crop_box(canvas, top, left, (height, width))
    with torch.no_grad():
        region = render_region(model, model.prepare_render(z), box, (height, width))
    torch.testing.assert_close(region.clamp(0, 1), full[..., top : top + height, left : left + width], atol=1e-5, rtol=0)


def test_tiled_checkpointed_region_render_is_the_same_render_with_the_same_gradient(model):
    z = random_latent(model).requires_grad_(True)
    box, size = Box(-0.7, -0.2, 0.1, 0.9), (40, 56)
    whole = render_region(model, model.prepare_render(z), box, size)
    tiled = render_region(model, model.prepare_render(z), box, size, tile=16)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    target = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    (grad_whole,) = torch.autograd.grad((whole - target).abs().mean(), z)
    (grad_tiled,) = torch.autograd.grad((tiled - target).abs().mean(), z)
    torch.testing.assert_close(grad_tiled, grad_whole, atol=1e-6, rtol=1e-4)


def test_region_only_gradients_equal_those_of_rendering_the_canvas_and_cropping(model):
    """Same loss, same gradient with respect to z, whether the canvas is rendered or only the regions."""
    canvas = (64, 64)
    crops = [(0, 0, (16, 16)), (30, 8, (24, 16)), (40, 40, (24, 24))]
    targets = [torch.rand(3, *size, generator=torch.Generator().manual_seed(i)) for i, (_, _, size) in enumerate(crops)]
    conditions = [ImageRegion(crop_box(canvas, top, left, size), target) for (top, left, size), target in zip(crops, targets)]
    z = random_latent(model).requires_grad_(True)
    regional = condition_losses(model, z, conditions, Critics(), canvas).sum()
    (grad_regional,) = torch.autograd.grad(regional, z)
    full = (render_prepared(model, model.prepare_render(z), Box.full(), canvas) + 1) / 2
    naive = sum((full[..., top : top + s[0], left : left + s[1]] - target[None]).abs().mean() for (top, left, s), target in zip(crops, targets))
    (grad_naive,) = torch.autograd.grad(naive, z)
    torch.testing.assert_close(regional.detach(), naive.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_regional, grad_naive, atol=1e-7, rtol=1e-4)


def test_a_tiny_high_zoom_box_of_an_8192_canvas_matches_the_crop_of_a_render_at_the_same_pixel_size(model):
    """16 pixels of an 8192² canvas (a 512x zoom): the same pixels as cropped from a larger render at that cell."""
    z = random_latent(model)
    canvas = (8192, 8192)
    box = crop_box(canvas, 5000, 1234, (16, 16))
    around = crop_box(canvas, 4990, 1230, (48, 40))
    with torch.no_grad():
        region = render_region(model, model.prepare_render(z), box, (16, 16))
    larger = render(model, z, (48, 40), box=around, tile=None)
    torch.testing.assert_close(region.clamp(0, 1), larger[..., 10:26, 4:20], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- conditions


def test_masked_region_ignores_the_hole_and_counts_the_kept_pixels():
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(16, 16)
    mask[4:12, 4:12] = 1
    condition = MaskedRegion(Box.full(), image, mask)
    wrong_hole = image.clone()
    wrong_hole[:, 4:12, 4:12] = 1 - wrong_hole[:, 4:12, 4:12]
    assert float(condition.loss(wrong_hole[None], Critics())) == 0
    wrong_kept = image.clone()
    wrong_kept[:, 0, :] += 0.5
    assert float(condition.loss(wrong_kept[None], Critics())) == pytest.approx(0.5 * 16 * 3 / (3 * (256 - 64)), rel=1e-5)


def test_text_region_renders_at_clip_size_with_square_canvas_pixels_and_scores_the_whole_box(clip_folder):
    clip = load_clip(clip_folder)
    critics = Critics(clip=clip)
    square = TextRegion(Box(-0.5, -0.5, 0.5, 0.5), "a red boat")
    wide = TextRegion(Box(-0.2, -1.0, 0.2, 0.6), "a red boat")  # 4x as wide as tall
    assert square.render_size((2048, 2048), critics) == (TINY_CLIP_SIZE, TINY_CLIP_SIZE)
    assert square.render_size((1024, 2048), critics) == (TINY_CLIP_SIZE, 2 * TINY_CLIP_SIZE)  # wide canvas pixels
    assert wide.render_size((512, 512), critics) == (TINY_CLIP_SIZE, 4 * TINY_CLIP_SIZE)
    region = torch.rand(1, 3, 32, 100, generator=torch.Generator().manual_seed(0))
    windows = square_windows(region, 32)
    assert windows.shape == (4, 3, 32, 32)
    torch.testing.assert_close(windows[0], region[0, :, :, :32])
    torch.testing.assert_close(windows[-1], region[0, :, :, -32:])
    region.requires_grad_(True)
    loss = wide.loss(region, critics)
    assert loss.shape == () and 0 <= float(loss.detach()) <= 2
    (grad,) = torch.autograd.grad(loss, region)
    assert grad[..., :10].abs().sum() > 0 and grad[..., -10:].abs().sum() > 0  # both ends of the box are judged


def test_clip_loads_from_a_transformers_folder_and_gives_cosine_losses_with_gradients(clip_folder):
    clip = load_clip(clip_folder)
    assert isinstance(clip, CLIPScorer) and clip.image_size == TINY_CLIP_SIZE
    assert not any(p.requires_grad for p in clip.parameters())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = clip.loss(images, "a lighthouse")
    expected = 1 - clip.embed_images(images) @ clip.embed_text("a lighthouse")
    torch.testing.assert_close(loss, expected)
    assert loss.shape == (2,)
    assert torch.autograd.grad(loss.sum(), images)[0].abs().sum() > 0
    assert not torch.allclose(clip.embed_text("a lighthouse"), clip.embed_text("a red boat"))


def test_clip_loads_from_an_open_clip_folder(tmp_path):
    import safetensors.torch
    from open_clip.model import CLIP

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    folder = tmp_path / "open-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    torch.manual_seed(0)
    safetensors.torch.save_file(CLIP(**config).state_dict(), str(folder / "open_clip_model.safetensors"))
    clip = load_clip(folder)
    assert clip.image_size == 32
    loss = clip.loss(torch.rand(1, 3, 32, 32), "a red boat")
    assert loss.shape == (1,) and torch.isfinite(loss).all()


def test_missing_or_wrong_clip_paths_say_what_to_pass(tmp_path, clip_folder):
    with pytest.raises(InfdError, match="--clip PATH"):
        load_clip(None)
    with pytest.raises(InfdError, match="does not exist"):
        load_clip(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InfdError, match="not a CLIP model"):
        load_clip(tmp_path / "empty")
    checkpoint = tmp_path / "clip.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(InfdError, match="--clip-arch"):
        load_clip(checkpoint)
    with pytest.raises(InfdError, match="could not load the open_clip model"):
        load_clip(checkpoint, arch="ViT-B-32")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((clip_folder / name).read_bytes())
    with pytest.raises(InfdError, match="tokenizer"):
        load_clip(no_tokenizer)
    with pytest.raises(InfdError, match="--clip PATH"):
        TextRegion(Box.full(), "a boat").render_size((64, 64), Critics())


# ---------------------------------------------------------------- specs


@pytest.fixture
def spec_folder(tmp_path):
    write_pattern_image(tmp_path / "obs.png", 24, 24)
    write_pattern_image(tmp_path / "mask.png", 24, 24, seed=3, mode="L")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return tmp_path


def test_a_spec_loads_conditions_with_paths_relative_to_it(spec_folder):
    spec_file = spec_folder / "spec.json"
    spec_file.write_text(json.dumps({
        "canvas": "4096x2048", "solver": "guided", "steps": 7, "seed": 3,
        "conditions": [
            {"type": "text", "box": "-1,-1,0,0", "prompt": "a boat", "weight": 2},
            {"type": "image", "box": [-0.5, -0.5, 0.5, 0.5], "image": "obs.png"},
            {"type": "masked", "image": "obs.png", "mask": "mask.png"},
        ],
    }))
    spec = load_spec(spec_file)
    assert spec.canvas == (2048, 4096) and spec.solver.solver == "guided" and spec.solver.steps == 7 and spec.solver.seed == 3
    text, image, masked = spec.conditions
    assert isinstance(text, TextRegion) and text.weight == 2 and text.box == Box(-1, -1, 0, 0)
    assert isinstance(image, ImageRegion) and image.image.shape == (3, 24, 24) and image.loss_type == "l1"
    assert isinstance(masked, MaskedRegion) and masked.box == Box.full() and masked.mask.shape == (1, 24, 24)
    assert spec.needs_clip and not spec.needs_lpips


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"type": "text", "box": [-1.5, -1, 0, 0], "prompt": "x"}, "outside the image"),
        ({"type": "text", "box": [0, 0, 0, 0.5], "prompt": "x"}, "empty"),
        ({"type": "text", "box": [0.5, 0, 0.2, 0.5], "prompt": "x"}, "empty"),
        ({"type": "text", "box": [0, 0, 1], "prompt": "x"}, "four numbers"),
        ({"type": "text", "box": "0,0,1,nan", "prompt": "x"}, "non-finite"),
        ({"type": "sketch", "box": [0, 0, 1, 1]}, "unknown type 'sketch'"),
        ({"type": "text", "box": [0, 0, 1, 1], "prompt": "x", "colour": "red"}, "unknown keys colour"),
        ({"type": "text", "box": [0, 0, 1, 1]}, "needs a \"prompt\""),
        ({"type": "text", "prompt": "  "}, "non-empty prompt"),
        ({"type": "text", "prompt": "x", "weight": -1}, "weight"),
        ({"type": "image", "image": "missing.png"}, "does not exist"),
        ({"type": "image", "image": "broken.png"}, "broken.png"),
        ({"type": "image"}, "needs \"image\""),
        ({"type": "image", "image": "obs.png", "loss": "l2"}, "unknown image loss 'l2'"),
        ({"type": "masked", "image": "obs.png"}, "needs \"mask\""),
        ("a boat", "JSON object"),
    ],
)
def test_bad_conditions_fail_with_a_clear_message(spec_folder, entry, message):
    with pytest.raises(InfdError, match=message):
        condition_from_dict(entry, spec_folder)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"conditions": []}, "no conditions"),
        ({"conditions": {"type": "text"}}, "must be a list"),
        ({"canvas": "0x12", "conditions": [{"type": "text", "prompt": "x"}]}, "WIDTHxHEIGHT"),
        ({"canvas": [1, 2, 3], "conditions": [{"type": "text", "prompt": "x"}]}, "canvas"),
        ({"solver": "annealing", "conditions": [{"type": "text", "prompt": "x"}]}, "unknown solver 'annealing'"),
        ({"prior": "sds", "conditions": [{"type": "text", "prompt": "x"}]}, "unknown prior 'sds'"),
        ({"steps": 0, "conditions": [{"type": "text", "prompt": "x"}]}, "steps must be"),
        ({"lr": float("nan"), "conditions": [{"type": "text", "prompt": "x"}]}, "lr must be"),
        ({"seeds": 3, "conditions": [{"type": "text", "prompt": "x"}]}, "unknown keys seeds"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_specs_fail_with_a_clear_message(data, message):
    with pytest.raises(InfdError, match=message):
        spec_from_dict(data)


def test_bad_observations_fail_with_a_clear_message(spec_folder):
    image = torch.rand(3, 16, 16)
    with pytest.raises(InfdError, match="NaN"):
        ImageRegion(Box.full(), torch.full((3, 16, 16), float("nan")))
    with pytest.raises(InfdError, match="at least 8"):
        ImageRegion(Box.full(), torch.rand(3, 4, 16))
    with pytest.raises(InfdError, match=r"\(3, H, W\)"):
        ImageRegion(Box.full(), torch.rand(16, 16))
    with pytest.raises(InfdError, match="same size"):
        MaskedRegion(Box.full(), image, torch.zeros(8, 8))
    with pytest.raises(InfdError, match="whole image"):
        MaskedRegion(Box.full(), image, torch.ones(16, 16))
    with pytest.raises(InfdError, match="not valid JSON"):
        (spec_folder / "bad.json").write_text("{conditions: ")
        load_spec(spec_folder / "bad.json")
    with pytest.raises(InfdError, match="does not exist"):
        load_spec(spec_folder / "none.json")
    assert check_box("-1,-1,1,1") == Box.full()
