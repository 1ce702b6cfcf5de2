import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

from infd.errors import InfdError
from infd.models.discriminator import PatchDiscriminator
from infd.training.losses import FocalFrequencyLoss, LPIPSLoss, adaptive_gan_weight, generator_loss, hinge_d_loss, kl_loss, l1_loss, make_perceptual_loss


def striped_image(size: int = 32) -> torch.Tensor:
    """(2, 3, size, size) in [-1, 1]: a vertical ramp plus period-4 stripes (fine texture)."""
    ramp = torch.linspace(-1, 1, size)[:, None].expand(size, size)
    stripes = torch.sin(torch.arange(size).float() * math.pi / 2)[None, :].expand(size, size)
    img = 0.4 * ramp + 0.4 * stripes
    return img[None, None].repeat(2, 3, 1, 1) + torch.tensor([0.1, -0.1]).view(2, 1, 1, 1)


def box_blur(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (2, 1, 2, 1), mode="replicate"), 4, stride=1)


@pytest.fixture(scope="module")
def random_lpips() -> LPIPSLoss:
    torch.manual_seed(0)
    return LPIPSLoss(vgg_path=None, random_backbone=True)


def vgg16_features_state() -> dict[str, torch.Tensor]:
    """A random torchvision-style vgg16 state dict (features only; builds no classifier)."""
    return {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}


def test_l1_is_zero_for_identical_and_grows_with_noise():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn_like(x)
    assert l1_loss(x, x) == 0
    assert 0 < l1_loss(x + 0.1 * noise, x) < l1_loss(x + 0.5 * noise, x)


def test_focal_frequency_loss_zero_for_identical_positive_otherwise():
    ffl = FocalFrequencyLoss()
    x = striped_image()
    assert ffl(x, x) == 0
    assert ffl(box_blur(x), x) > 0


def test_focal_frequency_loss_penalises_blur_beyond_l1():
    # Blur removes the stripes: the error sits in a few high frequencies, which FFL
    # weights fully. Noise and a constant offset with the *same* L1 error are spread
    # thin over the spectrum or sit in the DC term alone; L1 cannot tell them apart.
    ffl = FocalFrequencyLoss()
    x = striped_image()
    blurred = box_blur(x)
    err = l1_loss(blurred, x)
    noisy = x + err * torch.randn_like(x).sign()
    offset = x + err
    assert torch.allclose(l1_loss(noisy, x), err) and torch.allclose(l1_loss(offset, x), err)
    assert ffl(blurred, x) > 2 * ffl(noisy, x)
    assert ffl(blurred, x) > 1.5 * ffl(offset, x)


def test_focal_frequency_loss_accepts_bfloat16():
    x = striped_image().bfloat16()
    value = FocalFrequencyLoss()(box_blur(x), x)
    assert value.dim() == 0 and torch.isfinite(value) and value > 0


def test_lpips_random_backbone_zero_positive_and_differentiable(random_lpips):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    pred = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    assert random_lpips(x, x).item() == pytest.approx(0.0, abs=1e-6)
    loss = random_lpips(pred, x)
    assert loss.dim() == 0 and loss > 0
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_lpips_is_frozen_and_stays_in_eval(random_lpips):
    random_lpips.train()
    assert not random_lpips.training and not random_lpips.model.training
    assert not any(p.requires_grad for p in random_lpips.parameters())


@pytest.mark.parametrize("path", [None, "does/not/exist.safetensors"])
def test_lpips_without_weights_says_what_to_pass(path):
    with pytest.raises(InfdError, match="--lpips-vgg PATH"):
        LPIPSLoss(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_lpips_loads_torchvision_vgg16_weights(tmp_path, suffix):
    state = vgg16_features_state()
    path = tmp_path / f"vgg16{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        safetensors.torch.save_file(state, str(path))
    loss = LPIPSLoss(path)
    backbone = loss.model.net.state_dict()  # lpips keeps vgg.features' indices as names
    assert torch.equal(backbone["slice1.0.weight"], state["features.0.weight"])
    assert torch.equal(backbone["slice3.14.bias"], state["features.14.bias"])
    assert torch.equal(backbone["slice5.28.weight"], state["features.28.weight"])


def test_lpips_rejects_wrong_keys_and_unknown_formats(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(InfdError, match="vgg16 state dict"):
        LPIPSLoss(wrong)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"")
    with pytest.raises(InfdError, match=".safetensors or .pth"):
        LPIPSLoss(other)


def test_lpips_rejects_wrong_shapes(tmp_path):
    state = vgg16_features_state()
    state["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    path = tmp_path / "gray.safetensors"
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(InfdError, match="VGG16's conv shapes"):
        LPIPSLoss(path)


def test_lpips_pth_refuses_unrestricted_pickle(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module, not a state dict
    with pytest.raises(InfdError, match="state dict"):
        LPIPSLoss(path)


def test_make_perceptual_loss_choices():
    assert isinstance(make_perceptual_loss(), FocalFrequencyLoss)
    assert isinstance(make_perceptual_loss("ffl"), FocalFrequencyLoss)
    assert make_perceptual_loss("none") is None
    with pytest.raises(InfdError, match="--lpips-vgg"):
        make_perceptual_loss("lpips")
    with pytest.raises(InfdError, match="auto, lpips, ffl, none"):
        make_perceptual_loss("mssim")


def test_hinge_and_generator_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2 -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert generator_loss(fake).item() == pytest.approx(1 / 3)


def test_adaptive_gan_weight_is_ratio_of_gradient_norms():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    y = layer(x)  # (5, 3); d mean(f(y)) / dW = (f'(y) / y.numel()).T @ x
    rec, g = y.abs().mean(), -(y**2).mean()
    with torch.no_grad():
        rec_grad = (torch.sign(y) / y.numel()).T @ x
        g_grad = (-2 * y / y.numel()).T @ x
    expected = (rec_grad.norm() / (g_grad.norm() + 1e-4)).item()

    weight = adaptive_gan_weight(rec, g, layer.weight)
    assert not weight.requires_grad
    assert weight.item() == pytest.approx(expected, rel=1e-5)
    reduced = adaptive_gan_weight(rec, g, layer.weight, reduce=lambda grad: 3 * grad)
    assert reduced.item() == pytest.approx(expected, rel=1e-3)  # both scaled: ratio kept
    assert adaptive_gan_weight(rec, g, layer.weight, max_weight=1e-3).item() == pytest.approx(1e-3)
    (rec + g).backward()  # the graph was retained


def test_kl_loss_zero_at_prior_and_matches_closed_form():
    assert kl_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)) == 0
    mean = torch.full((2, 1, 2, 2), 1.0)
    logvar = torch.full((2, 1, 2, 2), math.log(2.0))
    per_element = 0.5 * (1.0 + 2.0 - 1.0 - math.log(2.0))  # 0.5 (mu^2 + s^2 - 1 - log s^2)
    assert kl_loss(mean, logvar).item() == pytest.approx(4 * per_element)


@pytest.mark.parametrize("size, logits", [(32, 2), (64, 6)])
def test_patch_discriminator_shapes_and_gradients(size, logits):
    torch.manual_seed(0)
    disc = PatchDiscriminator(base_channels=8)
    x = torch.randn(2, 3, size, size, requires_grad=True)
    out = disc(x)
    assert out.shape == (2, 1, logits, logits)
    out.mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in disc.parameters())


def test_patch_discriminator_default_widths_init_and_small_input_error():
    disc = PatchDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert convs[1].weight.std().item() == pytest.approx(0.02, rel=0.05)
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(abs(n.weight.mean().item() - 1) < 0.01 for n in norms)
    with pytest.raises(InfdError, match="at least 24 px"):
        disc(torch.zeros(1, 3, 16, 16))


def test_band_l1_sees_only_the_outer_band():
    from infd.geometry import border_band
    from infd.training.losses import band_l1_loss

    target = torch.zeros(2, 3, 100, 100)
    inside = target.clone()
    inside[..., 10:90, 10:90] = 1.0  # errors away from the 3-px band only
    assert band_l1_loss(inside, target).item() == 0.0
    edge = target.clone()
    edge[..., 0, :] = 1.0  # the top row: 100 of the band's pixels
    assert abs(band_l1_loss(edge, target).item() - 100 / border_band((100, 100)).sum().item()) < 1e-6
