"""The LIIF baseline renderer: feature unfolding, local ensemble, seam-free tiles."""

import copy

import pytest
import torch
import torch.nn.functional as F

from infd import geometry, rendering
from infd.geometry import Box
from infd.models import NeuralFieldAutoencoder
from infd.models.renderers import LIIFRenderer, ensemble_lookup, make_renderer, query_layout


def tiny_liif_model() -> NeuralFieldAutoencoder:
    torch.manual_seed(0)
    return NeuralFieldAutoencoder(
        input_size=32,
        latent_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        renderer_type="liif",
        renderer_hidden=16,
        renderer_blocks=1,
    ).eval()


def renderer_pair(channels: int = 4, hidden: int = 16) -> tuple[LIIFRenderer, LIIFRenderer]:
    """The same random LIIF weights with and without the local ensemble."""
    torch.manual_seed(0)
    full = LIIFRenderer(channels, hidden, num_layers=2)
    plain = LIIFRenderer(channels, hidden, num_layers=2, local_ensemble=False)
    plain.load_state_dict(full.state_dict())
    return full, plain


def render_grid(renderer: LIIFRenderer, phi: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: tuple[float, float]) -> torch.Tensor:
    """phi (1, C, h, w) read at the separable grid ys (N,) x xs (M,) -> (3, N, M)."""
    with torch.no_grad():
        return renderer(renderer.prepare(phi), ys[None], xs[None], torch.tensor([cell], dtype=torch.float64))[0]


def liif_reference(renderer: LIIFRenderer, state: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: tuple[float, float]) -> torch.Tensor:
    """LIIF's own recipe on a 2-D grid: shift the query by +-half a cell (+eps), nearest
    grid_sample, relative offsets, diagonally swapped rectangle areas. state (1, C, h, w)."""
    h, w = state.shape[-2:]
    query = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)  # (N, M, 2) as (y, x)
    scale = torch.tensor([h / 2, w / 2], dtype=torch.float64)  # [-1, 1] units -> feature cells
    centers = torch.stack(torch.meshgrid(geometry.axis_centers(-1, 1, h, 0, h), geometry.axis_centers(-1, 1, w, 0, w), indexing="ij"))
    preds, areas = [], []
    for dy in (-1, 1):
        for dx in (-1, 1):
            shifted = (query + torch.tensor([dy / h, dx / w], dtype=torch.float64) + 1e-6).clamp(-1 + 1e-6, 1 - 1e-6)
            grid = shifted.flip(-1)[None]  # grid_sample reads (x, y)
            feature = F.grid_sample(state, grid, mode="nearest", align_corners=False)[0]
            center = F.grid_sample(centers[None], grid, mode="nearest", align_corners=False)[0].permute(1, 2, 0)
            rel = (query - center) * scale
            cell_f = (torch.tensor(cell, dtype=torch.float64) * scale).expand_as(rel)
            inputs = torch.cat([feature, rel.permute(2, 0, 1), cell_f.permute(2, 0, 1)])[None]
            preds.append(renderer.conv_out(F.silu(renderer.mlp(inputs)))[0])
            areas.append((rel[..., 0] * rel[..., 1]).abs() + 1e-9)
    total = sum(areas)
    return sum(pred * areas[3 - k] / total for k, pred in enumerate(preds))


def test_prepare_unfolds_3x3_neighbourhoods_with_zero_border():
    renderer = LIIFRenderer(3, 8)
    phi = torch.randn(2, 3, 5, 7)
    state = renderer.prepare(phi)
    assert state.shape == (2, 27, 5, 7)
    padded = F.pad(phi, (1, 1, 1, 1))
    for i in range(5):
        for j in range(7):
            assert torch.equal(state[:, :, i, j].reshape(2, 3, 3, 3), padded[:, :, i : i + 3, j : j + 3])
    corner = state[:, :, 0, 0].reshape(2, 3, 3, 3)
    assert (corner[:, :, 0, :] == 0).all() and (corner[:, :, :, 0] == 0).all()
    assert torch.equal(corner[:, :, 1, 1], phi[:, :, 0, 0])
    assert renderer.mlp[0].in_channels == 9 * 3 + 4
    assert LIIFRenderer(3, 8, unfold=False).prepare(phi) is phi


def test_make_renderer_builds_the_full_liif_from_the_config_signature():
    renderer = make_renderer("liif", 8, 16, 1, "bilinear")  # lookup is CLIF's option; LIIF ignores it
    assert isinstance(renderer, LIIFRenderer) and renderer.unfold and renderer.local_ensemble
    assert renderer.mlp[0].in_channels == 9 * 8 + 4 and renderer.halo == 0
    assert renderer.last_layer_weight() is renderer.conv_out.weight


def test_ensemble_weights_are_liif_area_weights():
    n = 6
    centers = torch.linspace(-1.2, 1.2, 301, dtype=torch.float64)[None]
    index, offset, weight = ensemble_lookup(centers, n)
    assert index.shape == offset.shape == weight.shape == (2, 1, 301)
    assert index.min() >= 0 and index.max() <= n - 1 and (weight >= 0).all()
    assert torch.allclose(weight.sum(0), torch.ones(1, 301, dtype=torch.float64))
    # offsets are from the (clamped) feature's own center, in feature cells
    feature_centers = geometry.axis_centers(-1, 1, n, 0, n)
    assert torch.allclose(offset, (centers - feature_centers[index]) * n / 2)
    # between the outer centers: each weight is the distance to the other center (LIIF's areas in 1-D)
    inside = (centers[0] > feature_centers[0]) & (centers[0] < feature_centers[-1])
    lower, upper = offset[0, 0, inside].abs(), offset[1, 0, inside].abs()
    assert torch.allclose(weight[0, 0, inside], upper / (lower + upper))
    assert torch.allclose(weight[1, 0, inside], lower / (lower + upper))
    # beyond them: the border feature alone
    outside = ~inside
    border = (weight[:, 0, outside] * (index[:, 0, outside] == torch.where(centers[0, outside] < 0, 0, n - 1))).sum(0)
    assert torch.allclose(border, torch.ones_like(border))


def test_ensemble_at_feature_centers_is_the_nearest_feature():
    n = 5
    centers = geometry.axis_centers(-1, 1, n, 0, n)[None]
    index, _, weight = ensemble_lookup(centers, n)
    nearest, _ = geometry.feature_lookup(centers, n)
    assert torch.allclose((weight * (index == nearest)).sum(0), torch.ones(1, n, dtype=torch.float64))
    full, plain = renderer_pair()
    phi = torch.randn(1, 4, 5, 5)
    ys, xs = centers[0], centers[0]
    at_centers = render_grid(full, phi, ys, xs, (0.1, 0.1))
    assert (at_centers - render_grid(plain, phi, ys, xs, (0.1, 0.1))).abs().max() <= 1e-5
    off_centers = render_grid(full, phi, ys + 0.07, xs + 0.05, (0.1, 0.1))
    assert (off_centers - render_grid(plain, phi, ys + 0.07, xs + 0.05, (0.1, 0.1))).abs().max() > 1e-3


def test_local_ensemble_matches_liif_reference_recipe():
    full, _ = renderer_pair()
    full = copy.deepcopy(full).double()
    generator = torch.Generator().manual_seed(1)
    phi = torch.randn(1, 4, 6, 9, dtype=torch.float64, generator=generator)
    ys = torch.rand(23, dtype=torch.float64, generator=generator) * 2.1 - 1.05  # a few queries beyond the image
    xs = torch.rand(31, dtype=torch.float64, generator=generator) * 2.1 - 1.05
    with torch.no_grad():
        expected = liif_reference(full, full.prepare(phi), ys, xs, (0.07, 0.03))
        assert (render_grid(full, phi, ys, xs, (0.07, 0.03)) - expected).abs().max() <= 1e-6


def test_without_unfold_and_ensemble_it_is_the_nearest_feature_mlp():
    torch.manual_seed(0)
    renderer = LIIFRenderer(4, 16, num_layers=2, unfold=False, local_ensemble=False)
    phi = torch.randn(2, 4, 6, 6)
    ys = torch.rand(2, 11, dtype=torch.float64) * 2 - 1
    xs = torch.rand(2, 13, dtype=torch.float64) * 2 - 1
    cell = torch.tensor([[0.1, 0.2], [0.05, 0.05]], dtype=torch.float64)
    with torch.no_grad():
        expected = renderer.conv_out(F.silu(renderer.mlp(query_layout(phi, ys, xs, cell))))
        assert torch.equal(renderer(renderer.prepare(phi), ys, xs, cell), expected)


def test_local_ensemble_has_no_steps_at_cell_edges():
    full, plain = renderer_pair(hidden=32)
    torch.manual_seed(2)
    phi = torch.randn(1, 4, 8, 8)
    n = 4096
    xs = geometry.axis_centers(-1, 1, n, 0, n)
    ys = torch.tensor([0.123], dtype=torch.float64)
    edges = geometry.cell_edges(xs, 8)
    lower, _ = ensemble_lookup(xs[None], 8)[0]
    switches = edges | (lower[0, 1:] != lower[0, :-1])  # where the nearest or the ensemble's features change

    def steps(renderer):
        rgb = render_grid(renderer, phi, ys, xs, (2 / 64, 2 / n))[:, 0]
        diff = (rgb[:, 1:] - rgb[:, :-1]).abs().amax(0)
        return diff[switches].max() / diff[~switches].max()

    assert steps(full) <= 2.0
    assert steps(plain) >= 20.0  # the metric sees the nearest-feature steps


@pytest.mark.parametrize("box", [Box.full(), Box(-0.3, -0.2, 0.4, 0.5)])
def test_tiled_liif_render_equals_whole_render(box):
    model = tiny_liif_model()
    assert model.renderer.unfold and model.renderer.local_ensemble
    z = torch.randn(2, *model.latent_shape)
    size = (37, 53)
    whole = rendering.render(model, z, size, box=box, tile=None)
    tiled = rendering.render(model, z, size, box=box, tile=16)
    assert whole.shape == (2, 3, 37, 53)
    assert (tiled - whole).abs().max().item() <= 1e-5
