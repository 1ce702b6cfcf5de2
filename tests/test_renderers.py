"""Renderer variants: residual and anchored starts, the detail fade, the bilinear lookup, seam-free tiles for each."""


import pytest
import torch
import torch.nn.functional as F

from infd import geometry, rendering
from infd.evaluation import metrics
from infd.geometry import Box
from infd.models import renderers
from infd.models.renderers import FixedResolutionRenderer, detail_weight

ANCHORED = dict(residual_renderer=True, latent_anchor=True, renderer_lookup="bilinear", detail_fade_cell=0.5)
VARIANTS = {
    "clif": dict(renderer="clif"),
    "clif-bilinear": dict(renderer="clif", renderer_lookup="bilinear"),
    "liif-ensemble": dict(renderer="liif"),
    "fixed": dict(renderer="fixed"),
    "residual": dict(renderer="clif", residual_renderer=True),
    "anchored": dict(renderer="clif", **ANCHORED),
    "anchored-sr-trunk": dict(renderer="clif", trunk_type="sr", **ANCHORED),
    "anchored-liif": dict(renderer="liif", trunk_type="sr", decoder_padding="replicate", **ANCHORED),
}


def perturbed(model, seed: int = 1):
    """The model with every weight moved off its initialisation (zero-initialised residuals included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def pattern(h: int, w: int) -> torch.Tensor:
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    return torch.stack([0.5 + 0.4 * torch.sin(7 * y) * torch.cos(5 * x), y.expand(h, w), (x * y).expand(h, w)])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("box", [Box.full(), Box(-0.3, -0.9, 0.1, 0.2), Box(-0.05, -0.05, 0.05, 0.05)])
def test_every_renderer_variant_tiles_without_seams(make_tiny_model, variant, box):
    options = dict(VARIANTS[variant])
    model = perturbed(make_tiny_model(options.pop("renderer"), **options))
    z = torch.randn(2, *model.latent_shape)
    size = (45, 70)
    whole = rendering.render(model, z, size, box=box, tile=None)
    for tile in (7, (33, 9), 16):
        assert (rendering.render(model, z, size, box=box, tile=tile) - whole).abs().max().item() <= 1e-5, f"seam at tile {tile}"


@pytest.mark.parametrize("detail", ["clif", "liif"])
def test_residual_renderer_starts_as_fixed_plus_bicubic(make_tiny_model, detail):
    model = make_tiny_model(detail, residual_renderer=True)
    z = torch.randn(1, *model.latent_shape)
    for size, box in (((40, 56), None), ((64, 64), Box(-0.5, -0.5, 0.2, 0.3))):
        residual = rendering.render(model, z, size, box=box)
        fixed = rendering.render(model, z, size, box=box, renderer="fixed")
        assert torch.equal(residual, fixed)
    perturbed(model)  # once trained, CLIF (or LIIF) adds to the base
    assert not torch.equal(rendering.render(model, z, (40, 56)), rendering.render(model, z, (40, 56), renderer="fixed"))


@pytest.mark.parametrize("trunk", ["vae", "sr"])
def test_anchored_autoencoder_starts_as_its_thumbnail(make_tiny_model, trunk):
    model = make_tiny_model("clif", trunk_type=trunk, **ANCHORED)
    image = pattern(48, 80)
    z = rendering.encode(model, image[None])
    s = model.config.input_size
    x = F.interpolate(image[None], size=(s, s), mode="bicubic", antialias=True).clamp(0, 1) * 2 - 1
    assert torch.allclose(z, F.adaptive_avg_pool2d(x, model.latent_shape[1:]), atol=1e-6)  # z *is* the thumbnail
    assert model.feature_shape == (model.config.block_out_channels[0] + 3, s, s)

    size = (48, 80)
    render = rendering.render(model, z, size)
    base = F.interpolate(z, size=(s, s), mode="bicubic", align_corners=False)
    ys, xs = geometry.window_centers(Box.full(), size)
    cell = torch.tensor(geometry.cell_size(Box.full(), size), dtype=torch.float64)
    expected = ((FixedResolutionRenderer.resample(base, ys, xs, cell) + 1) / 2).clamp(0, 1)
    assert (render - expected).abs().max().item() < 1e-5
    floor = F.interpolate((z + 1) / 2, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    truth = F.interpolate(image[None], size=size, mode="bicubic", antialias=True).clamp(0, 1)
    assert abs(metrics.psnr(render, truth).item() - metrics.psnr(floor, truth).item()) < 1.0  # the floor, to the double resampling


def test_detail_weight_fades_over_two_octaves_below_the_trained_cell():
    feature = (16, 16)
    cells = torch.tensor([[2 / 16, 2 / 16], [2 / 32, 2 / 32], [2 / 64, 2 / 64], [2 / 128, 2 / 128], [2 / 64, 2 / 256]], dtype=torch.float64)
    weights = detail_weight(cells, feature, fade_cell=0.5).flatten().tolist()  # cells in feature units: 1, 0.5, 0.25, 0.125; anisotropic: the finer axis
    assert weights == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])
    assert detail_weight(cells, feature, fade_cell=0.0).flatten().tolist() == [1.0] * 5


def test_zoom_past_the_fade_renders_the_smooth_base(make_tiny_model):
    model = perturbed(make_tiny_model("clif", **ANCHORED))  # phi 32², fade below 0.5 feature cells per pixel
    z = torch.randn(1, *model.latent_shape)
    deep = Box(-0.1, -0.1, 0.1, 0.1)  # 64 px over 3.2 cells: 0.05 cells per pixel, past the fade
    assert torch.equal(rendering.render(model, z, (64, 64), box=deep), rendering.render(model, z, (64, 64), box=deep, renderer="fixed"))
    assert not torch.equal(rendering.render(model, z, (40, 40)), rendering.render(model, z, (40, 40), renderer="fixed"))


def test_bilinear_lookup_has_no_steps_at_cell_edges(make_tiny_model):
    """Continuity at a cell edge: queries moved across it by 2e-6 change the bilinear render by O(2e-6), the nearest one by a step.

    (A blockiness ratio over random weights is not a property of the lookup: it passed with
    one seed and failed with another.) The middle column of an 8-pixel grid sits on the edge
    x = 0 between cells 15 and 16 of the 32² phi; the two boxes put it 1e-6 left and right of it.
    """
    jumps = {}
    for lookup in ("nearest", "bilinear"):
        model = perturbed(make_tiny_model("clif", renderer_lookup=lookup))
        z = torch.randn(1, *model.latent_shape)
        left, right = (rendering.render(model, z, (8, 8), box=Box(-0.04, -0.035 + shift, 0.04, 0.045 + shift), tile=None) for shift in (-1e-6, 1e-6))
        jumps[lookup] = (left - right).abs().max().item()
    assert jumps["bilinear"] < 1e-4 and jumps["nearest"] > 1e-3, jumps


def test_sr_trunk_shapes_and_refusals(make_tiny_model):
    model = make_tiny_model("clif", trunk_type="sr")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, logvar = model.encode_moments(x)
    assert mean.shape == logvar.shape == (2, *model.latent_shape)
    assert model.decode_features(mean).shape == (2, *model.feature_shape)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())  # normalisation-free
    from infd.errors import InfdError

    with pytest.raises(InfdError, match="trunk_type"):
        make_tiny_model("clif", trunk_type="unet")


@pytest.mark.parametrize("lookup", ["nearest", "bilinear"])
def test_clif_first_conv_on_phis_grid_equals_the_conv_of_the_layout(make_tiny_model, lookup, monkeypatch):
    """Zoomed in, CLIF's first conv runs as matrix products on phi's grid (`renderers.first_conv`): the conv's pixels, seam-free."""
    model = perturbed(make_tiny_model("clif", renderer_lookup=lookup))
    field = rendering.LatentField(model, torch.randn(1, *model.latent_shape), box=Box(-0.3, -0.9, 0.1, 0.2))
    size, window = (96, 160), geometry.Window(10, 20, 40, 48)
    calls, separable = [], renderers._separable_first_conv
    monkeypatch.setattr(renderers, "_separable_first_conv", lambda *args: calls.append(1) or separable(*args))
    fast = [field.image(size, tile=tile) for tile in (None, 32, (40, 24))]
    several = field.render([(size, window), ((120, 200), window)])  # two grids in one call
    assert len(calls) > 0
    monkeypatch.setattr(renderers, "separable_pays", lambda *args: False)  # the conv over the query layout
    plain = field.image(size, tile=None)
    for image in fast:
        assert (image - plain).abs().max().item() <= 1e-5
    assert (several - field.render([(size, window), ((120, 200), window)])).abs().max().item() <= 1e-5


def test_the_fixed_heads_bicubic_is_grid_samples_on_a_separable_grid():
    rgb = torch.randn(2, 3, 9, 14)
    ys, xs = torch.linspace(-1.3, 1.2, 41, dtype=torch.float64), torch.linspace(-1.1, 1.4, 23, dtype=torch.float64)
    gy, gx = torch.meshgrid(ys.float(), xs.float(), indexing="ij")
    expected = F.grid_sample(rgb, torch.stack([gx, gy], -1)[None].expand(2, -1, -1, -1), mode="bicubic", padding_mode="border", align_corners=False)
    got = FixedResolutionRenderer.resample(rgb, ys, xs, torch.tensor([2 / 41, 2 / 23]))
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5
