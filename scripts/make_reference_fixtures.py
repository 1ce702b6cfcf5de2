"""Make the reference-parity fixtures: tiny checkpoints in the reference trainer's format,
and the reference code's own outputs on them.

    PYTHONPATH=/tmp/refdeps .venv/bin/python scripts/make_reference_fixtures.py \\
        --reference /tmp/infd-ref [--commit HASH] [--out tests/fixtures/reference]

--reference is a checkout of https://github.com/yinboc/infd (the paper's code). This
script imports that code from there and runs it, on the CPU, in float32; nothing of it is
copied into infd, and only the outputs of running it are written. Its extra
dependencies (einops, omegaconf) must be importable, e.g. from
`pip install --target /tmp/refdeps einops omegaconf` with PYTHONPATH=/tmp/refdeps.
Nothing touches the network: the LPIPS VGG download and the discriminator are stubbed.

Why: the converter (released reference .pth -> infd) and infd's own autoencoder, renderer,
patchwise rendering and DDIM sampler are tested against these numbers, without the
reference code, its weights or a GPU at test time.

Writes into --out:
  ae_stage.pth       a tiny AE-stage checkpoint exactly as trainers/base_trainer.py
                     save_ckpt writes it (cfg, model{name,args,sd}, optimizers, iter, ...),
                     for cfgs/ae_ffhq.yaml with small sizes in model.args; random
                     non-trivial weights; a codebook with exact duplicate rows that the
                     encoder output actually picks (ties: the first index wins).
  dm_stage.pth       the DM-stage checkpoint of cfgs/dm_ffhq.yaml: the same autoencoder,
                     a small openai_unet z_dm and a perturbed z_dm_ema; the spec keeps
                     load_ckpt: save/ae_ffhq/last-model.pth, which is never opened.
  input.png          a deterministic 320x300 RGB test image.
  outputs.safetensors  the reference's outputs (see the report printed at the end).
  real_sizes.json    key -> shape of the released models at their real sizes, built on
                     the meta device from the reference yamls.
  README.md          what these files are and how they were made.

Both .pth files hold only dicts, lists, str, int, float, bool, None and tensors, so that
torch.load(path, weights_only=True) reads them.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

RELEASED_CKPT = 'save/ae_ffhq/last-model.pth'
T0 = time.time()


def log(msg):
    print(f'[{time.time() - T0:6.1f}s] {msg}', file=sys.stderr, flush=True)

AE_SMALL = {'ch': 32, 'ch_mult': [1, 1, 2], 'num_res_blocks': 1}
UNET_SMALL = {'model_channels': 32, 'channel_mult': [1, 2], 'num_res_blocks': 1,
              'attention_resolutions': [2], 'num_head_channels': 16}
DISC_NDF_TINY = 8           # the tiny files' discriminator: the real layout, fewer filters
RENDER_TARGET_STD = 0.45    # the tiny renderer's output is scaled to this std at 256
N_TIE_CODES = 100           # codebook rows 100..199 are set to z vectors, copied to 8000..8099
TIE_SRC, TIE_DST = 100, 8000
SAMPLE_SEED = 1234
UNET_X_SEED = 42
UNET_KAPPA = 0.96       # see denoiser_path_
UNET_REST_SCALE = 0.1
STEP_NOISE_SEED = 0         # the noise of DDIM step i (0 = first, t=995) is seeded i + this


# ----------------------------------------------------------------------------- setup

def import_reference(ref: Path):
    """Put the checkout first on sys.path and import the modules this script runs."""
    sys.path.insert(0, str(ref))
    try:
        import tensorboardX  # noqa: F401  (utils/utils.py imports it; only logging uses it)
    except ImportError:
        stub = types.ModuleType('tensorboardX')
        stub.SummaryWriter = None
        sys.modules['tensorboardX'] = stub
    import diffusion
    import diffusion.gaussian_diffusion
    import gen_samples
    import models  # noqa: F401 (registers everything)
    import models.infd
    import models.models
    import models.vqgan.discriminator
    import models.vqgan.lpips
    import models.vqgan.quantizer
    import utils
    import utils.geometry
    for mod in (models, diffusion, utils, gen_samples):
        assert Path(mod.__file__).resolve().is_relative_to(ref.resolve()), mod.__file__
    return types.SimpleNamespace(
        models=models, mm=models.models, infd=models.infd, lpips=models.vqgan.lpips,
        quantizer=models.vqgan.quantizer, disc=models.vqgan.discriminator,
        diffusion=diffusion, gd=diffusion.gaussian_diffusion, utils=utils,
        geometry=utils.geometry, gen_samples=gen_samples)


def load_cfg(ref: Path, rel: str):
    """A reference yaml with its `_base_` files merged, as run.py's parse_cfg does,
    but with the base paths resolved against the checkout instead of the cwd."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(ref / rel)
    if cfg.get('_base_') is not None:
        names = cfg.pop('_base_')
        names = [names] if isinstance(names, str) else list(names)
        cfg = OmegaConf.merge(OmegaConf.merge(*[load_cfg(ref, n) for n in names]), cfg)
    return cfg


def to_plain(cfg):
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True)


class stubs:
    """Patch the INFD constructor's LPIPS and discriminator so that nothing is downloaded.

    tiny=True: LPIPS keeps its scaling layer and its five 1x1 'lin' layers (loaded from
    the checkout's load/vgg_lpips.pth, 7 KB) but gets no VGG, and the discriminator is the
    reference's NLayerDiscriminator with ndf=8: the state dict keeps a few perc_loss.* and
    disc.* keys (the converter must ignore them) without their 15M+2.8M parameters.
    tiny=False: the real layout (torchvision vgg16 without weights, ndf=64), for key names
    and shapes on the meta device.
    """

    def __init__(self, R, ref: Path, tiny: bool):
        self.R, self.ref, self.tiny = R, ref, tiny

    def __enter__(self):
        R, lp = self.R, self.R.lpips
        self.saved = (R.infd.LPIPS, R.infd.make_discriminator, lp.vgg16, lp.LPIPS.load_from_pretrained,
                      lp.models)
        if self.tiny:
            lp.vgg16 = lambda requires_grad=False, pretrained=True: nn.Module()
            R.infd.make_discriminator = functools.partial(self.saved[1], ndf=DISC_NDF_TINY)
        else:
            # lpips.vgg16 builds torchvision's vgg16 with IMAGENET1K_V1 weights (a download):
            # give it one whose weights argument is dropped (same modules, same keys).
            import torchvision
            lp.models = types.SimpleNamespace(
                vgg16=lambda weights=None, **kw: torchvision.models.vgg16(weights=None, **kw),
                VGG16_Weights=torchvision.models.VGG16_Weights)
            lp.LPIPS.load_from_pretrained = lambda self_, ckpt: None
        lpips_ckpt = str(self.ref / 'load' / 'vgg_lpips.pth')
        R.infd.LPIPS = lambda: lp.LPIPS(ckpt=lpips_ckpt)
        return self

    def __exit__(self, *exc):
        R, lp = self.R, self.R.lpips
        (R.infd.LPIPS, R.infd.make_discriminator, lp.vgg16, lp.LPIPS.load_from_pretrained,
         lp.models) = self.saved


class simulated_load_ckpt:
    """models.make(spec) with spec['load_ckpt'] reads the AE-stage file's model sd. Supply
    that sd from memory instead (and fail if any other path is asked for): the path in the
    spec is kept as the released file has it, and never opened."""

    def __init__(self, R, sd):
        self.R, self.sd = R, sd
        self.calls = 0

    def __enter__(self):
        self.saved = self.R.mm.load_sd_from_ckpt

        def fake(ckpt, pop_keys=None):
            assert ckpt == RELEASED_CKPT and pop_keys is None, (ckpt, pop_keys)
            self.calls += 1
            return {k: v.clone() for k, v in self.sd.items()}
        self.R.mm.load_sd_from_ckpt = fake
        return self

    def __exit__(self, *exc):
        self.R.mm.load_sd_from_ckpt = self.saved


class module_torch_proxy:
    """Replace a reference module's `torch`/`th` global by a proxy that forwards everything
    to torch except the names given, for the duration of a with-block."""

    def __init__(self, module, attr, **overrides):
        self.module, self.attr, self.overrides = module, attr, overrides

    def __enter__(self):
        self.saved = getattr(self.module, self.attr)
        assert self.saved is torch
        overrides = self.overrides

        class Proxy:
            def __getattr__(self, name):
                return overrides[name] if name in overrides else getattr(torch, name)
        setattr(self.module, self.attr, Proxy())
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.attr, self.saved)


# ----------------------------------------------------------------------------- weights

NORMS = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)


@torch.no_grad()
def reinit_(module: nn.Module, gen: torch.Generator, skip=()):
    """Every parameter non-constant and non-zero, including the zero-initialised ones:
    norm weights 1 + 0.2 randn, norm and layer biases 0.1 randn, conv/linear weights
    randn / sqrt(fan_in). Embeddings (the codebook) are left to the caller."""
    for mname, m in module.named_modules():
        if isinstance(m, nn.Embedding) or mname in skip or any(mname.startswith(s + '.') for s in skip):
            continue
        for pname, p in m.named_parameters(recurse=False):
            r = torch.randn(p.shape, generator=gen)
            if isinstance(m, NORMS):
                p.copy_(1 + 0.2 * r if pname == 'weight' else 0.1 * r)
            elif p.dim() >= 2:
                p.copy_(r / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * r)


@torch.no_grad()
def perturb_(module: nn.Module, gen: torch.Generator, rel=0.1):
    # relative to a robust spread (1.4826 MAD), which the few large weights that
    # denoiser_path_ adds do not inflate
    for p in module.parameters():
        s = 1.4826 * (p - p.median()).abs().median() if p.numel() > 1 else p.abs().mean()
        p.add_(rel * float(s) * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def denoiser_path_(unet: nn.Module, kappa: float, in_gain=3.0, skip_gain=30.0, gn_w=0.5, gn_b=3.0,
                   rest_scale=0.1):
    """Give the random UNet an eps-prediction that follows its input: without it, eps is
    uncorrelated with x_t and DDIM multiplies x by 1/sqrt(alphas_cumprod[T]) ~ 190 on the
    way down (sample_z of std ~300). Added on top of the random weights: conv_in's channel
    c reads x_c (centre tap + in_gain), the last output block's 1x1 skip carries that
    channel of the long skip to its channel c (+ skip_gain), the final GroupNorm puts
    channels 0..2 into SiLU's nearly linear range (weight gn_w, bias gn_b) and the final
    conv reads them back with gain kappa / slope (the random weights of the final conv and
    of conv_in's channels 0..2 scaled by rest_scale),
    its bias cancelling the channels' means. So eps_c ~ kappa * x_c / std(x_c) + (the
    random rest)."""
    C = unet.in_channels
    conv_in = unet.input_blocks[0][0]
    skip = unet.output_blocks[-1][0].skip_connection
    gn, conv_out = unet.out[0], unet.out[2]
    assert isinstance(conv_in, nn.Conv2d) and conv_in.kernel_size == (3, 3)
    assert isinstance(skip, nn.Conv2d) and skip.kernel_size == (1, 1)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == gn.num_channels
    assert isinstance(conv_out, nn.Conv2d) and conv_out.out_channels == C
    n_h = skip.in_channels - conv_in.out_channels   # cat([h, hs.pop()]): the long skip is last
    zs, ws = np.polynomial.hermite_e.hermegauss(64)
    ws = ws / ws.sum()

    def silu_moments(b, w):
        """E[SiLU(b + w z)] and E[d/dz SiLU(b + w z)], z ~ N(0, 1)."""
        u = b + w * zs
        sig = 1 / (1 + np.exp(-u))
        return float((ws * u * sig).sum()), float((ws * (sig + u * sig * (1 - sig))).sum()) * w

    conv_out.weight.mul_(rest_scale)
    conv_in.weight[:C].mul_(rest_scale)
    for c in range(C):
        conv_in.weight[c, c, 1, 1] += in_gain
        skip.weight[c, n_h + c, 0, 0] += skip_gain
        gn.weight[c] = gn_w
        gn.bias[c] = gn_b
        conv_out.weight[c, c, 1, 1] += kappa / silu_moments(gn_b, gn_w)[1]
    # GroupNorm makes every channel mean 0, std 1: cancel the constant each channel's
    # SiLU mean puts into every output through all taps.
    means = torch.tensor([silu_moments(float(b), float(w))[0] for w, b in zip(gn.weight, gn.bias)])
    conv_out.bias.sub_((conv_out.weight.sum(dim=(2, 3)) * means).sum(dim=1))


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- specs

def ae_small_spec(ref: Path) -> dict:
    """cfgs/models/ae-d4vq.yaml's model, with the small sizes written into its args
    (and nothing the yaml leaves out: defaults come from the reference's code)."""
    spec = to_plain(load_cfg(ref, 'cfgs/models/ae-d4vq.yaml').model)
    a = spec['args']
    a['encoder']['args'] = dict(AE_SMALL)
    a['decoder']['args'] = dict(AE_SMALL)
    a['renderer']['args']['z_dec_channels'] = AE_SMALL['ch'] * AE_SMALL['ch_mult'][0]
    a['renderer']['args']['net']['args'] = {'hidden_channels': 32}
    assert a['z_shape'] == [3, 64, 64] and a['quantizer'] is True and a['n_embed'] == 8192
    assert a['renderer']['name'] == 'renderer_concat_wrapper'
    assert a['renderer']['args']['net']['name'] == 'simple_renderer_net'
    return spec


def dm_small_spec(ref: Path, ae_spec: dict) -> dict:
    cfg = load_cfg(ref, 'cfgs/dm_ffhq.yaml')
    spec = to_plain(cfg.model)
    assert spec['load_ckpt'] == RELEASED_CKPT
    spec['args'].update(copy.deepcopy(ae_spec['args']))
    spec['args']['z_dm']['args'] = dict(UNET_SMALL)
    assert spec['args']['z_dm']['name'] == 'openai_unet'
    assert spec['args']['z_dp'] == {'linear_beta_start': 0.0015, 'linear_beta_end': 0.0195}
    return spec


def trainer_cfg(ref: Path, rel: str, model_spec: dict, exp_name: str) -> dict:
    """self.cfg_dict as BaseTrainer holds it: the merged yaml (model replaced by the small
    spec), plus run.py's random_seed and _env."""
    cfg = to_plain(load_cfg(ref, rel))
    cfg['model'] = copy.deepcopy(model_spec)
    cfg['random_seed'] = None
    cfg['_env'] = {'exp_name': exp_name, 'save_dir': os.path.join('save', exp_name),
                   'wandb': False, 'resume_mode': 'replace'}
    return cfg


def make_model(R, spec):
    # models.make mutates its spec (the renderer wrapper writes net.args.in_channels,
    # make_diffusion_train_components pops z_dp keys): always hand it a copy.
    return R.models.make(copy.deepcopy(spec))


def checkpoint(R, cfg, spec, model, it, epoch, select_v):
    """What base_trainer.save_ckpt writes (optimizers fresh, as infd_trainer makes them)."""
    model_spec = copy.deepcopy(spec)
    model_spec['sd'] = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    optimizers = {}
    for name, ospec in cfg['optimizers'].items():
        o = copy.deepcopy(ospec)
        o['sd'] = R.utils.make_optimizer(model.get_params(name), ospec).state_dict()
        optimizers[name] = o
    return {'cfg': cfg, 'model': model_spec, 'optimizers': optimizers,
            'iter': it, 'train_loader_epoch': epoch, 'ckpt_select_v': select_v}


# ----------------------------------------------------------------------------- image

def make_input_png(path: Path):
    """320x300 (W x H) RGB: smooth gradients, a few sharp shapes, mild seeded noise."""
    H, W = 300, 320
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    u, v = x / (W - 1), y / (H - 1)
    img = np.stack([
        0.15 + 0.7 * u,
        0.2 + 0.6 * v,
        0.5 + 0.35 * np.sin(2 * np.pi * (0.8 * u + 0.5 * v)),
    ], axis=-1)
    disk = (x - 90) ** 2 + (y - 110) ** 2 <= 45 ** 2
    img[disk] = (0.95, 0.9, 0.1)
    rect = (x >= 180) & (x < 290) & (y >= 40) & (y < 95)
    img[rect] = (0.05, 0.1, 0.6)
    tri = (y >= 170) & (y < 280) & (x >= 150) & (x - 150 <= (y - 170) * 1.2)
    img[tri] = (0.85, 0.15, 0.2)
    stripes = (x >= 20) & (x < 130) & (y >= 200) & (y < 280) & ((x // 6) % 2 == 0)
    img[stripes] = (0.02, 0.02, 0.02)
    line = np.abs((y - 20) - 0.85 * (x - 10)) < 1.5
    img[line] = (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    img = img * 255 + rng.normal(0, 3.0, size=img.shape)
    arr = np.clip(np.round(img), 0, 255).astype(np.uint8)
    from PIL import Image
    Image.fromarray(arr, 'RGB').save(path)


def preprocess(path: Path):
    """datasets/wrapper_cae.py's `inp`: resize((256, 256), LANCZOS), ToTensor,
    Normalize(0.5, 0.5). (Its process() asserts a square image; the steps are the same
    for this non-square one, which is squashed to 256x256.)"""
    from PIL import Image
    from torchvision import transforms
    img = Image.open(path).convert('RGB')
    assert img.size == (320, 300)
    inp = img.resize((256, 256), Image.LANCZOS)
    t = transforms.Compose([transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])
    return t(inp).unsqueeze(0)


# ----------------------------------------------------------------------------- main

def capture_quantizer(R, model, z):
    """Run the reference quantizer and capture the distance matrix it computed (its
    argmin goes through a proxy that records its argument)."""
    seen = {}

    def argmin(d, dim=None, **kw):
        seen['d'] = d.detach().clone()
        return torch.argmin(d, dim=dim, **kw)
    with module_torch_proxy(R.quantizer, 'torch', argmin=argmin):
        z_q, _, (_, _, idx) = model.quantizer(z)
    d = seen['d']
    dmin = d.min(dim=1, keepdim=True).values
    n_min = (d == dmin).sum(dim=1)
    first = (d == dmin).int().argmax(dim=1)
    assert torch.equal(first, idx), 'argmin is not the first minimum'
    return z_q, idx, d, n_min


@torch.no_grad()
def build_ae(R, ref, spec, inp, gen):
    with stubs(R, ref, tiny=True):
        model = make_model(R, spec)
    model.eval()
    reinit_(model, gen)

    # The codebook: randn around z's statistics; rows 100..199 = z vectors of 100 spread
    # positions, copied to rows 8000..8099: those z vectors' nearest code exists twice.
    z = model.encode_z(inp)
    zf = z.permute(0, 2, 3, 1).reshape(-1, 3)
    mu, sd = zf.mean(0), zf.std(0)
    cb = mu + sd * torch.randn((8192, 3), generator=gen)
    pos = torch.randperm(zf.shape[0], generator=gen)[:N_TIE_CODES].sort().values
    cb[TIE_SRC:TIE_SRC + N_TIE_CODES] = zf[pos]
    cb[TIE_DST:TIE_DST + N_TIE_CODES] = cb[TIE_SRC:TIE_SRC + N_TIE_CODES]
    model.quantizer.embedding.weight.copy_(cb)

    # Scale the renderer's last conv so that the 256 render has std RENDER_TARGET_STD.
    coord, cell = R.geometry.make_coord_cell_grid((256, 256), bs=1)
    out = model.run_renderer(model.decode_z(z), coord, cell)
    s = RENDER_TARGET_STD / float(out.std())
    conv_out = model.renderer.net.conv_out
    conv_out.weight.mul_(s)
    conv_out.bias.mul_(s)
    return model, pos


@torch.no_grad()
def build_dm(R, ref, spec, ae_model, gen, kappa=UNET_KAPPA, rest_scale=UNET_REST_SCALE):
    with stubs(R, ref, tiny=True), simulated_load_ckpt(R, ae_model.state_dict()) as sim:
        model = make_model(R, spec)
    assert sim.calls == 1
    model.eval()
    ae_sd = ae_model.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith(('z_dm.', 'z_dm_ema.')):
            assert torch.equal(v, ae_sd[k]), k
    assert set(ae_sd) == {k for k in model.state_dict() if not k.startswith(('z_dm.', 'z_dm_ema.'))}
    reinit_(model.z_dm, gen)
    denoiser_path_(model.z_dm, kappa, rest_scale=rest_scale)
    model.z_dm_ema.load_state_dict(model.z_dm.state_dict())
    perturb_(model.z_dm_ema, gen)
    return model


def git_head(ref: Path) -> str:
    try:
        return subprocess.run(['git', '-C', str(ref), 'rev-parse', 'HEAD'],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def real_sizes(R, ref: Path):
    from omegaconf import OmegaConf
    ae_args = to_plain(load_cfg(ref, 'cfgs/models/ae-d4vq.yaml').model)['args']
    dm_model = to_plain(OmegaConf.merge(load_cfg(ref, 'cfgs/models/ae-d4vq.yaml').model,
                                        load_cfg(ref, 'cfgs/models/dm.yaml').model))
    result = {}
    for stage, args in (('ae_stage', ae_args), ('dm_stage', dm_model['args'])):
        with stubs(R, ref, tiny=False), torch.device('meta'):
            m = make_model(R, {'name': 'infd', 'args': args})
        keys = {k: list(v.shape) for k, v in m.state_dict().items()}
        nparams = {name: count_params(c) for name, c in m.named_children()}
        nparams['total'] = count_params(m)
        result[stage] = {'args': args, 'keys': keys, 'num_params': nparams}
        del m
    result['dm_stage']['load_ckpt'] = RELEASED_CKPT
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--reference', required=True, type=Path,
                    help='checkout of github.com/yinboc/infd (imported and run, never copied)')
    ap.add_argument('--out', type=Path, default=Path('tests/fixtures/reference'))
    ap.add_argument('--commit', default=None,
                    help='the checkout\'s commit, recorded in README.md and the safetensors metadata '
                         '(default: git -C REFERENCE rev-parse HEAD; give it for an exported tree)')
    args = ap.parse_args()
    ref = args.reference.resolve()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)

    commit = args.commit or git_head(ref)
    R = import_reference(ref)
    import safetensors.torch

    # ------------------------------------------------------------------ AE stage
    make_input_png(out / 'input.png')
    inp = preprocess(out / 'input.png')

    gen = torch.Generator().manual_seed(0)
    ae_spec = ae_small_spec(ref)
    ae_model, tie_pos = build_ae(R, ref, ae_spec, inp, gen)
    ae_cfg = trainer_cfg(ref, 'cfgs/ae_ffhq.yaml', ae_spec, 'ae_ffhq')
    ae_ckpt = checkpoint(R, ae_cfg, ae_spec, ae_model, it=1000000, epoch=143, select_v=0.2315)
    torch.save(ae_ckpt, out / 'ae_stage.pth')

    log('AE stage written')
    # ------------------------------------------------------------------ DM stage
    dm_spec = dm_small_spec(ref, ae_spec)
    dm_model = build_dm(R, ref, dm_spec, ae_model, gen)
    dm_cfg = trainer_cfg(ref, 'cfgs/dm_ffhq.yaml', dm_spec, 'dm_ffhq')
    dm_ckpt = checkpoint(R, dm_cfg, dm_spec, dm_model, it=600000, epoch=125, select_v=0.0871)
    torch.save(dm_ckpt, out / 'dm_stage.pth')

    log('DM stage written')
    # ------------------------------------------------------------------ AE outputs
    ae_out = {}
    with torch.no_grad():
        model = ae_model
        ae_out['inp'] = inp
        z = model.encode_z(inp)
        ae_out['z'] = z
        z_q, idx, d, n_min = capture_quantizer(R, model, z)
        ae_out['z_q'] = z_q
        ae_out['indices'] = idx.reshape(1, 64, 64).to(torch.int64)
        ae_out['z_q_lookup'] = model.quantizer.embedding.weight[idx].reshape(1, 64, 64, 3).permute(0, 3, 1, 2).contiguous()
        ae_out['ties'] = torch.tensor((n_min > 1).sum().item(), dtype=torch.int64)
        n_dup_picked = int(((idx >= TIE_SRC) & (idx < TIE_SRC + N_TIE_CODES)).sum())
        assert int(ae_out['ties']) > 0 and n_dup_picked > 0
        assert not ((idx >= TIE_DST) & (idx < TIE_DST + N_TIE_CODES)).any()

        z_dec = model.decode_z(z)
        ae_out['z_dec_shape'] = torch.tensor(list(z_dec.shape), dtype=torch.int64)
        for res in (256, 100, 384):
            coord, cell = R.geometry.make_coord_cell_grid((res, res), bs=1)
            ae_out[f'recon_{res}'] = model.run_renderer(z_dec, coord, cell)
        ae_out['recon_patch_320'] = R.gen_samples.render_output_patchwise(z, model, 320, patch_size=256, patch_padding=8)
        ae_out['recon_patch_320_p64'] = R.gen_samples.render_output_patchwise(z, model, 320, patch_size=64, patch_padding=8)

    log('AE outputs done')
    # ------------------------------------------------------------------ UNet / sampler
    with torch.no_grad():
        model = dm_model
        ae_out['unet_x'] = torch.randn((2, 3, 64, 64), generator=torch.Generator().manual_seed(UNET_X_SEED))
        ae_out['unet_t'] = torch.tensor([999, 437], dtype=torch.int64)
        ae_out['unet_out'] = model.z_dm(ae_out['unet_x'], ae_out['unet_t'])
        ae_out['unet_out_ema'] = model.z_dm_ema(ae_out['unet_x'], ae_out['unet_t'])

        dp, _, dps = R.diffusion.make_diffusion_train_components(copy.deepcopy(dm_spec['args']['z_dp']))
        ae_out['betas'] = torch.from_numpy(np.asarray(dp.betas, dtype=np.float64).copy())
        named = R.gd.get_named_beta_schedule('linear', 1000, 0.0015, 0.0195)
        ae_out['betas_schedule'] = torch.from_numpy(named.copy())
        dps_m = model.z_dp_sampling
        assert dps_m.timestep_map == dps.timestep_map
        assert np.array_equal(dps_m.alphas_cumprod, dps.alphas_cumprod)
        ae_out['ddim_timesteps'] = torch.tensor(dps_m.timestep_map[::-1], dtype=torch.int64)
        ae_out['ddim_alphas_cumprod'] = torch.from_numpy(dps_m.alphas_cumprod[::-1].copy())
        ae_out['ddim_alphas_cumprod_prev'] = torch.from_numpy(dps_m.alphas_cumprod_prev[::-1].copy())

        eta = model.z_ddim_eta
        assert eta == 1.0
        dm = model.z_dm_ema                   # gen_samples.py default: --ema true
        shape = (1, *model.z_shape)
        ae_out['sample_xT'] = torch.randn(shape, generator=torch.Generator().manual_seed(SAMPLE_SEED))

        def seeded_noise():
            calls = []

            def randn_like(x, **kw):
                assert not kw and x.shape == shape and x.dtype == torch.float32, (x.shape, kw)
                g = torch.Generator().manual_seed(STEP_NOISE_SEED + len(calls))
                calls.append(1)
                return torch.randn(shape, generator=g)

            def randn(*a, **kw):
                raise AssertionError('the loop was given its initial noise')
            return calls, module_torch_proxy(R.gd, 'th', randn_like=randn_like, randn=randn)

        calls, patch = seeded_noise()
        with patch:
            gen_iter = dps_m.ddim_sample_loop_progressive(
                dm, shape, noise=ae_out['sample_xT'].clone(), model_kwargs={}, eta=eta, clip_denoised=False)
            ae_out['sample_step1'] = next(gen_iter)['sample']
            gen_iter.close()
        assert len(calls) == 1

        log('step 1 done')
        calls, patch = seeded_noise()
        with patch:
            # exactly gen_samples.py's call, with the initial noise given
            sample_z = dps_m.ddim_sample_loop(dm, shape, noise=ae_out['sample_xT'].clone(), model_kwargs={},
                                              eta=eta, clip_denoised=False)
        # The loop draws noise at all 200 steps; at the last one (t=0) it is multiplied by
        # nonzero_mask = 0 (and sigma = 0 there too, alphas_cumprod_prev = 1).
        assert len(calls) == 200, len(calls)
        ae_out['sample_z'] = sample_z
        coord, cell = R.geometry.make_coord_cell_grid((256, 256), bs=1)
        z_dec = model.decode_z(sample_z)
        ae_out['sample_render_256'] = model.run_renderer(z_dec, coord, cell)
        _, s_idx, _, s_nmin = capture_quantizer(R, model, sample_z)
        ae_out['sample_indices'] = s_idx.reshape(1, 64, 64).to(torch.int64)

    log('sampling done')
    tensors = {}
    for k, v in ae_out.items():
        v = v.detach().contiguous()
        if v.is_floating_point() and v.dtype != torch.float64:
            v = v.to(torch.float32)
        tensors[k] = v
    meta = {'reference_commit': commit, 'torch': torch.__version__,
            'ties': str(int(ae_out['ties'])), 'tie_rows': f'{TIE_SRC}..{TIE_SRC + N_TIE_CODES - 1} == '
            f'{TIE_DST}..{TIE_DST + N_TIE_CODES - 1}', 'step_noise': f'seed {STEP_NOISE_SEED} + step index',
            'sample_xT_seed': str(SAMPLE_SEED), 'unet_x_seed': str(UNET_X_SEED)}
    safetensors.torch.save_file(tensors, str(out / 'outputs.safetensors'), metadata=meta)

    # ------------------------------------------------------------------ real sizes
    sizes = real_sizes(R, ref)
    with open(out / 'real_sizes.json', 'w') as f:
        json.dump(sizes, f, indent=1)
        f.write('\n')

    # ------------------------------------------------------------------ README
    write_readme(out, commit)

    # ------------------------------------------------------------------ verify + summary
    summary(out, tensors, sizes, n_dup_picked, tie_pos, s_nmin)


def write_readme(out: Path, commit: str):
    from PIL import __version__ as pil_version
    # One markdown line per item; adjacent string literals join into one line.
    lines = [
        f"# Reference fixtures (outputs of the paper's code, github.com/yinboc/infd @ {commit})",
        "- `ae_stage.pth`: tiny AE-stage checkpoint in the reference trainer's save_ckpt format (cfg, model{name,args,sd}, optimizers, iter, ...); "
        "small sizes in model.args, random non-trivial weights, codebook rows 100..199 duplicated at 8000..8099 (ties), LPIPS/discriminator stubbed to a few keys.",
        "- `dm_stage.pth`: tiny DM-stage checkpoint (cfgs/dm_ffhq.yaml): the same autoencoder + small openai_unet z_dm and a perturbed z_dm_ema; "
        "spec keeps load_ckpt `save/ae_ffhq/last-model.pth` (never opened).",
        "- `input.png`: deterministic 320x300 test image; `inp` in outputs is its wrapper_cae preprocessing (LANCZOS 256, Normalize 0.5).",
        "- `outputs.safetensors`: the reference's own outputs on these files (CPU, float32): z, z_q, indices, ties, renders at 256/100/384, patchwise 320 renders, "
        "UNet outputs, DDIM-200 schedule and an eta=1 sample with seeded noise (step i's noise = randn seeded i).",
        "- `real_sizes.json`: key -> shape (and parameter counts) of the released models at real size, built on the meta device from cfgs/models/ae-d4vq.yaml (+ dm.yaml).",
        f"- Regenerate: `git -C MIRROR archive {commit} | tar -x -C /tmp/infd-ref`, then `PYTHONPATH=/tmp/refdeps .venv/bin/python scripts/make_reference_fixtures.py "
        f"--reference /tmp/infd-ref --commit {commit} --out tests/fixtures/reference` "
        f"(einops, omegaconf in /tmp/refdeps; made with torch {torch.__version__}, Pillow {pil_version}; ~5 min on 2 CPU cores).",
        "- The UNet's random weights carry an added eps ~ 0.96 x_t / std(x_t) path (denoiser_path_ in the script) so that DDIM does not multiply x by ~190; "
        "sample_z still drifts (std ~22), as a random denoiser does.",
        "- Licence: the reference code is the authors' (Yinbo Chen et al., BSD 3-Clause); none of it is stored here, "
        "only outputs of running it (every parameter in the .pth files is drawn at random, the LPIPS stub's included).",
        "- Nothing here is a trained model: all weights are random; the numbers test parity only.",
    ]
    text = "\n".join(lines) + "\n"
    (out / 'README.md').write_text(text)


def summary(out: Path, tensors, sizes, n_dup_picked, tie_pos, s_nmin):
    allowed = (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor)

    def check_types(x, path='ckpt'):
        assert isinstance(x, allowed), (path, type(x))
        if isinstance(x, dict):
            for k, v in x.items():
                assert isinstance(k, (str, int)), (path, k)
                check_types(v, f'{path}.{k}')
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                check_types(v, f'{path}[{i}]')

    print('== files')
    total = 0
    for p in sorted(out.iterdir()):
        total += p.stat().st_size
        print(f'  {p.name:24s} {p.stat().st_size / 1e6:7.3f} MB')
    print(f'  {"total":24s} {total / 1e6:7.3f} MB')

    for name in ('ae_stage.pth', 'dm_stage.pth'):
        ck = torch.load(out / name, weights_only=True)
        check_types(ck)
        sd = ck['model']['sd']
        groups = {}
        for k, v in sd.items():
            g = k.split('.')[0]
            groups.setdefault(g, [0, 0])
            groups[g][0] += 1
            groups[g][1] += v.numel()
            if v.is_floating_point() and v.numel() > 1 and g not in ('perc_loss',):
                assert v.dtype == torch.float32, k
        print(f'== {name}: keys {sorted(ck)}; iter {ck["iter"]}; optimizers {list(ck["optimizers"])}')
        print(f'   model.name {ck["model"]["name"]}; load_ckpt {ck["model"].get("load_ckpt")}')
        print(f'   model.args {json.dumps(ck["model"]["args"])}')
        for g, (n, c) in groups.items():
            print(f'   sd {g:10s} {n:4d} tensors {c:9d} values')
        const = [k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1 and
                 'running_' not in k and float(v.std()) == 0]
        print(f'   constant float tensors: {const}')

    print('== outputs.safetensors')
    for k, v in tensors.items():
        extra = ''
        if v.is_floating_point() and v.numel() > 1:
            extra = f' mean {v.double().mean():+.4f} std {v.double().std():.4f} min {v.min():+.4f} max {v.max():+.4f}'
        elif v.numel() == 1:
            extra = f' = {v.item()}'
        print(f'  {k:26s} {str(v.dtype):14s} {list(v.shape)}{extra}')
    print(f'  ties: {int(tensors["ties"])} z vectors have a tied minimum distance; '
          f'{n_dup_picked} pick a row in {TIE_SRC}..{TIE_SRC + N_TIE_CODES - 1}; '
          f'sample ties: {int((s_nmin > 1).sum())}')
    zq, zl = tensors['z_q'], tensors['z_q_lookup']
    print(f'  z_q vs codebook rows: max |diff| {float((zq - zl).abs().max()):.3g} '
          f'(straight-through z + (e - z) in float32), exact {int((zq == zl).all(1).sum())}/4096 positions')
    print(f'  betas (base process) vs schedule: max |diff| {float((tensors["betas"] - tensors["betas_schedule"]).abs().max()):.3g}')
    p256 = tensors['recon_patch_320']
    print(f'  ddim t: {tensors["ddim_timesteps"][:3].tolist()} ... {tensors["ddim_timesteps"][-3:].tolist()}')
    print(f'  patch 256 vs patch 64 at 320: max |diff| {float((p256 - tensors["recon_patch_320_p64"]).abs().max()):.3g}')

    print('== real-size models (parameters per component)')
    for stage, v in sizes.items():
        print(f'  {stage}: ' + ', '.join(f'{k} {n:,}' for k, n in v['num_params'].items())
              + f'; {len(v["keys"])} keys')


if __name__ == '__main__':
    main()
