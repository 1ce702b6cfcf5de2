"""Metrics agree with references on known inputs; bad inputs get one-sentence errors."""

import math

import pytest
import torch

from infd import evaluation, geometry
from infd.errors import InfdError
from infd.evaluation import metrics
from infd.images import resize


def pattern(h=48, w=64, seed=0):
    """A smooth image with texture, in [0.1, 0.9] so noise does not clip."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, h // 8, w // 8, generator=g)
    image = resize(base, (h, w)) * 0.6 + 0.2 + 0.1 * torch.sin(torch.arange(w) * 1.3)[None, None, None, :]
    return image.clamp(0.1, 0.9)


def test_identical_images_score_perfectly():
    x = pattern()
    assert metrics.psnr(x, x).item() == math.inf
    assert metrics.ssim(x, x).item() == pytest.approx(1.0, abs=1e-7)
    assert metrics.spectral_distance(x, x).item() == 0.0
    lpips = metrics.LPIPSMetric(random_backbone=True)
    assert lpips(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert lpips(x, (x + 0.1).clamp(0, 1)).item() > 1e-4


def test_psnr_of_a_known_noise_level():
    target = torch.full((1, 3, 64, 64), 0.5)
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 2 - 1  # +-1: MSE exactly delta^2
    assert metrics.psnr(target + 0.01 * checker, target).item() == pytest.approx(40.0, abs=0.01)
    g = torch.Generator().manual_seed(0)
    big = torch.full((1, 3, 1024, 1024), 0.5)
    noisy = big + 0.05 * torch.randn(big.shape, generator=g)  # sigma 0.05 -> 26.02 dB
    assert metrics.psnr(noisy, big).item() == pytest.approx(20 * math.log10(1 / 0.05), abs=0.01)


def test_ssim_matches_the_closed_form_and_pytorch_msssim():
    # Constant images: variances vanish, so SSIM = (2ab + C1) / (a² + b² + C1) exactly.
    a, b = 0.3, 0.6
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = metrics.ssim(torch.full((1, 3, 20, 20), a), torch.full((1, 3, 20, 20), b)).item()
    assert got == pytest.approx(expected, abs=1e-6)
    reference = pytest.importorskip("pytorch_msssim")  # Fang's implementation of Wang et al. 2004
    x = pattern(40, 56)
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    ours = metrics.ssim(torch.cat([x, y]), torch.cat([y, resize(resize(y, (20, 28)), (40, 56))]))
    theirs = reference.ssim(torch.cat([x, y]), torch.cat([y, resize(resize(y, (20, 28)), (40, 56))]), data_range=1.0, size_average=False)
    assert torch.allclose(ours, theirs.double(), atol=1e-5)


def test_spectral_distance_measures_lost_detail():
    x = 0.3 + 0.4 * torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # white noise: energy at every frequency
    distances = [metrics.spectral_distance(resize(resize(x, (s, s)), (64, 64)), x).item() for s in (48, 32, 16)]
    assert 0 < distances[0] < distances[1] < distances[2]  # more blur, more distance
    blurred, sharp = metrics.radial_power_spectrum(resize(resize(x, (32, 32)), (64, 64))), metrics.radial_power_spectrum(x)
    assert blurred.shape == (1, 31)
    assert (blurred[0, -10:] < 0.1 * sharp[0, -10:]).all()  # the top frequencies lost their energy


def test_mean_ci_uses_student_t():
    mean, half = metrics.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(3.1824 * math.sqrt(5 / 3) / 2, rel=1e-4)  # t(0.975, 3) * s / sqrt(n)
    assert metrics.mean_ci([5.0]) == (5.0, None)
    assert metrics.mean_ci([]) == (None, None)
    assert metrics.mean_ci([math.inf, 30.0]) == (math.inf, None)
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 7, 30, 31, 45, 200):
        assert metrics.t_quantile_975(dof) == pytest.approx(stats.t.ppf(0.975, dof), rel=2e-4)


def test_frechet_distance_of_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g, dtype=torch.float64)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shifted = a + torch.tensor([3.0] + [0.0] * 7, dtype=torch.float64)
    assert metrics.frechet_distance(a, shifted) == pytest.approx(9.0, rel=1e-6)  # same covariance: |mean difference|²


@pytest.mark.parametrize("n, m, dim", [(30, 20, 64), (300, 200, 16)])  # fewer samples than dimensions, and more
def test_frechet_distance_agrees_with_torch_fidelity(n, m, dim):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, dim, generator=g, dtype=torch.float64)
    b = 0.7 * torch.randn(m, dim, generator=g, dtype=torch.float64) @ torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5 + 0.3
    reference = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), verbose=False)[KEY_METRIC_FID]
    assert metrics.frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)


def test_random_features_are_fixed_by_their_seed():
    x = pattern(32, 32)
    torch.manual_seed(123)
    first = metrics.RandomConvFeatures(seed=0)(x)
    torch.manual_seed(456)
    assert torch.equal(metrics.RandomConvFeatures(seed=0)(x), first)  # the global seed does not matter
    assert not torch.equal(metrics.RandomConvFeatures(seed=1)(x), first)
    assert first.shape == (1, metrics.RandomConvFeatures().dim) and first.dtype == torch.float64


@pytest.mark.parametrize(
    "pred, target, message",
    [
        (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 20), "shapes"),
        (torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16), "RGB"),
        (torch.full((1, 3, 16, 16), math.nan), torch.rand(1, 3, 16, 16), "NaN"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "float"),
    ],
)
def test_bad_inputs_are_refused(pred, target, message):
    for metric in (metrics.psnr, metrics.ssim, metrics.spectral_distance):
        with pytest.raises(InfdError, match=message):
            metric(pred, target)


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(InfdError, match="at least 11"):
        metrics.ssim(torch.rand(1, 3, 8, 30), torch.rand(1, 3, 8, 30))


def test_missing_weights_say_what_to_pass(tmp_path):
    with pytest.raises(InfdError, match="--inception PATH"):
        metrics.InceptionFeatures(None)
    with pytest.raises(InfdError, match="does not exist"):
        metrics.InceptionFeatures(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(InfdError, match="could not read"):
        metrics.InceptionFeatures(tmp_path / "junk.pth")
    with pytest.raises(InfdError, match="--lpips-vgg"):
        metrics.LPIPSMetric(None)


# ---------------------------------------------------------------- autoencoder artefacts


def test_colour_error_is_the_channel_mean_shift_in_8_bit_levels():
    image = torch.rand(2, 3, 20, 30) * 0.8
    assert metrics.colour_error(image, image).tolist() == [0.0, 0.0]
    shifted = image.clone()
    shifted[:, 0] += 12 / 255  # red up by 12 levels, the others unchanged: mean over RGB = 4
    assert metrics.colour_error(shifted, image).tolist() == pytest.approx([4.0, 4.0], abs=1e-4)


def test_rim_compares_the_border_band_with_the_interior():
    truth = torch.rand(1, 3, 100, 100)
    noise = 0.02 * torch.randn(1, 3, 100, 100, generator=torch.Generator().manual_seed(0))
    assert abs(metrics.rim_db(truth + noise, truth).item()) < 0.5  # the same error everywhere: no rim
    band = metrics.border_band((100, 100))
    assert band[:3].all() and band[:, -3:].all() and not band[3:-3, 3:-3].any()  # 3% of 100 px
    rimmed = truth + noise
    rimmed[..., band] += 0.2  # a coloured frame
    assert metrics.rim_db(rimmed, truth).item() > 10


def test_blockiness_is_about_one_when_smooth_and_large_for_a_mosaic():
    n, size = 8, 64  # 8 features across, 8 px per cell
    ys = geometry.axis_centers(-1.0, 1.0, size, 0, size)
    edges = geometry.cell_edges(ys, n)
    assert int(edges.sum()) == n - 1
    ramp = torch.linspace(0, 1, size)
    gradient = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size), 0.5 * torch.ones(size, size)])[None]
    assert metrics.blockiness(gradient, edges, edges).item() == pytest.approx(1.0, abs=0.05)
    cells = torch.rand(1, 3, n, n, generator=torch.Generator().manual_seed(1))
    mosaic = torch.nn.functional.interpolate(cells, size=(size, size), mode="nearest")
    assert metrics.blockiness(mosaic, edges, edges).item() > 1000  # all the change sits on the cell edges
    assert metrics.blockiness(torch.full((1, 3, size, size), 0.3), edges, edges).item() == pytest.approx(1.0)  # flat


def test_floors_of_a_constant_image_are_exact():
    image = torch.full((3, 40, 60), 0.25)
    floors = [evaluation.Floor("thumbnail", (4, 4), ""), evaluation.Floor("input", (16, 16), "")]
    records, _ = evaluation.evaluate_image(image, floors, [32, 60], strip_crop=16, feature_grid=(8, 8))
    assert {(r["model"], r["scale"]) for r in records} == {(f.label, s) for f in floors for s in (32, 60)}
    for record in records:
        assert record["colour"] == pytest.approx(0.0, abs=1e-5) and record["psnr"] > 120
        if record["scale"] == 60:  # the native size: the ground truth is the image itself, and the floors are exact
            assert record["psnr"] == math.inf
