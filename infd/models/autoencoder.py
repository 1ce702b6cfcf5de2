"""The neural-field autoencoder: image -> z -> feature map phi -> renderer -> RGB anywhere.

Encoder and decoder trunk are diffusers' VAE `Encoder`/`Decoder` (the blocks of Stable
Diffusion's AutoencoderKL), so an SD-style autoencoder converts by keeping its weights and
dropping the decoder's last RGB conv: what the trunk outputs is phi. Saved and loaded with
diffusers' `save_pretrained`/`from_pretrained`: a folder of config.json + safetensors.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, Encoder, VectorQuantizer
from diffusers.models.modeling_utils import ModelMixin

from infd.errors import InfdError, check_choice
from infd.models.normalized_clif import NormalizedCLIFRenderer
from infd.models.renderers import LOOKUPS, RENDERERS, FixedResolutionRenderer, Renderer, ResidualDetail, make_renderer
from infd.models.trunks import PADDINGS, SRDecoder, SREncoder, set_padding

LATENT_TYPES = ("kl", "vq")
VQ_DISTANCES = ("cdist", "expanded")  # diffusers' search, or |z|² + |e|² - 2 z.e in float32 with the first index on ties (the paper's code)
INPUT_RESAMPLINGS = ("antialias", "lanczos")  # how rendering.encode resizes an image to the encoder's input
TRUNKS = ("vae", "sr")  # diffusers' VAE Encoder/Decoder (SD's blocks), or infd.models.trunks' normalisation-free SR trunk


class NeuralFieldAutoencoder(ModelMixin, ConfigMixin):
    """Encoder to a fixed-size latent z; decoder to a feature map; renderer to any grid.

    Defaults follow the paper: a 256² input gives z of 3x64x64 and phi of 128x256x256,
    rendered by CLIF with 256 hidden channels. `fixed_head=True` adds the fixed-resolution
    baseline (module `fixed_renderer`: an RGB conv at phi's resolution, upsampled) on the
    same trunk, trained jointly, so that INFD and "fixed decoder + upsampling" are one
    argument apart: `renderer="fixed"` in `prepare_render`/`render_window` (and rendering).

    `residual_renderer=True` (what `infd convert-vae` builds) makes CLIF (or LIIF) add detail to such a
    head's bicubic upsampling instead (`ResidualCLIFRenderer`, `ResidualLIIFRenderer`; the head is then also the
    "fixed" renderer). `scaling_factor` and `shift_factor` map z to the latents an LDM
    denoises: (z - shift_factor) * scaling_factor, as in diffusers' AutoencoderKL.

    `latent_anchor=True` (with `residual_renderer`) anchors the whole model to a thumbnail:
    z's first 3 channels are the encoder input's area average on the latent grid plus a
    learned, zero-initialised residual, and the decoder hands the renderer that thumbnail
    upsampled beside its features, which the RGB head corrects. At initialisation the model
    *is* "a thumbnail with as many numbers as the latent, bicubic up", the floor every
    model must beat; training only adds to it, and the latents stay image-like.
    `trunk_type="sr"` replaces the VAE trunk by a normalisation-free super-resolution
    trunk (infd.models.trunks) for models trained from scratch on small budgets; SD
    conversion keeps the VAE trunk. `renderer_lookup="bilinear"` makes CLIF read interpolated features (no steps at
    feature-cell edges) and `detail_fade_cell` fades a residual renderer's detail for
    pixels finer than the trained scales (both in infd.models.renderers).
    `encoder_padding` / `decoder_padding` ("zeros", "replicate", "reflect") set what the
    padded convs read beyond the border: the encoder's, and the decoder's with the RGB
    head's. Weight-free, like `detail_fade_cell` and the latent scale: `WEIGHT_FREE_OPTIONS`
    may differ between a checkpoint and a run that starts from it (`train-ae --init`).
    """

    WEIGHT_FREE_OPTIONS = ("encoder_padding", "decoder_padding", "detail_fade_cell", "scaling_factor", "shift_factor", "renderer_statistics", "input_resampling")

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 3,
        input_size: int = 256,
        block_out_channels: tuple[int, ...] = (128, 256, 256),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        latent_type: str = "kl",
        vq_codebook_size: int = 8192,
        renderer_type: str = "clif",
        renderer_hidden: int = 256,
        renderer_blocks: int = 2,
        scaling_factor: float = 1.0,
        fixed_head: bool = False,
        shift_factor: float = 0.0,
        residual_renderer: bool = False,
        latent_anchor: bool = False,
        renderer_lookup: str = "nearest",
        detail_fade_cell: float = 0.0,
        trunk_type: str = "vae",
        encoder_padding: str = "zeros",
        decoder_padding: str = "zeros",
        decoder_norm_out: bool = True,
        vq_distance: str = "cdist",
        renderer_norm_groups: int | None = None,
        renderer_statistics: str = "scale",
        input_resampling: str = "antialias",
    ):
        super().__init__()
        check_choice(trunk_type, TRUNKS, "trunk_type")
        check_choice(latent_type, LATENT_TYPES, "latent type")
        check_choice(vq_distance, VQ_DISTANCES, "vq_distance")
        check_choice(input_resampling, INPUT_RESAMPLINGS, "input_resampling")
        check_choice(renderer_type, RENDERERS, "renderer")
        depth = len(block_out_channels)
        if input_size % 2 ** (depth - 1):
            raise InfdError(f"input size {input_size} must be divisible by {2 ** (depth - 1)} for {depth} encoder blocks.")
        moments = 2 * latent_channels if latent_type == "kl" else latent_channels
        trunk = dict(
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=mid_block_add_attention,
        )
        # (Modules are created in this order so that a seed gives the weights it always gave.)
        if trunk_type == "vae":
            self.encoder = Encoder(
                in_channels, latent_channels, down_block_types=("DownEncoderBlock2D",) * depth, double_z=latent_type == "kl", **trunk
            )
        else:
            self.encoder = SREncoder(in_channels, moments, tuple(block_out_channels), layers_per_block)
        self.quant_conv = nn.Conv2d(moments, moments, 1)
        quantizer = FirstIndexQuantizer if vq_distance == "expanded" else VectorQuantizer
        self.quantizer = quantizer(vq_codebook_size, latent_channels, beta=0.25, legacy=False) if latent_type == "vq" else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        if trunk_type == "vae":
            self.decoder = Decoder(latent_channels, in_channels, up_block_types=("UpDecoderBlock2D",) * depth, **trunk)
            self.decoder.conv_out = nn.Identity()  # phi is the trunk's last feature map
            if not decoder_norm_out:  # ... before the final GroupNorm and SiLU too (the paper's models)
                self.decoder.conv_norm_out = self.decoder.conv_act = nn.Identity()
        else:
            self.decoder = SRDecoder(latent_channels, tuple(block_out_channels), layers_per_block)
        if residual_renderer and (renderer_type in ("fixed", "clif_groupnorm") or fixed_head):
            raise InfdError("residual_renderer needs renderer_type 'clif' or 'liif' and no fixed_head (its RGB head already is the fixed renderer).")
        if latent_anchor and not (residual_renderer and latent_channels >= in_channels):
            raise InfdError(f"latent_anchor needs residual_renderer: true and latent_channels >= {in_channels} (the thumbnail's channels).")
        check_choice(renderer_lookup, LOOKUPS, "renderer_lookup")
        if not detail_fade_cell >= 0:
            raise InfdError(f"detail_fade_cell {detail_fade_cell} must be >= 0 (0: no fade).")
        features = block_out_channels[0] + (in_channels if latent_anchor else 0)  # anchored: + the upsampled thumbnail
        if renderer_type == "clif_groupnorm":
            self.renderer = NormalizedCLIFRenderer(
                features, renderer_hidden, renderer_blocks, renderer_norm_groups or norm_num_groups, statistics=renderer_statistics, native_size=(input_size, input_size)
            )
        else:
            self.renderer = make_renderer(renderer_type, features, renderer_hidden, renderer_blocks, renderer_lookup, residual_renderer, detail_fade_cell, latent_anchor)
        self.fixed_renderer = FixedResolutionRenderer(features) if fixed_head else None
        check_choice(encoder_padding, PADDINGS, "encoder_padding")
        check_choice(decoder_padding, PADDINGS, "decoder_padding")
        for module in self.encoding_modules():
            set_padding(module, encoder_padding)
        for module in filter(None, (self.decoder, self.renderer, self.fixed_renderer)):
            set_padding(module, decoder_padding)  # the trunk and the RGB head (CLIF's own convs are unpadded)
        if latent_anchor:  # start as the thumbnail: zero residual on z, a small posterior variance
            nn.init.zeros_(self.quant_conv.weight)
            nn.init.zeros_(self.quant_conv.bias)
            if latent_type == "kl":
                nn.init.constant_(self.quant_conv.bias[latent_channels:], -10.0)

    def encoding_modules(self) -> tuple[nn.Module, ...]:
        """What maps an image to z: frozen together (`freeze_encoder`), and what must match for two models' latents to be the same."""
        return (self.encoder, self.quant_conv)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.config.input_size // 2 ** (len(self.config.block_out_channels) - 1)
        return (self.config.latent_channels, side, side)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """Shape of phi, the decoder's feature map (with an anchored model's thumbnail channels)."""
        channels = self.config.block_out_channels[0] + (self.config.in_channels if self.config.latent_anchor else 0)
        return (channels, self.config.input_size, self.config.input_size)

    def thumbnail(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) -> its area average on the latent grid, (B, 3, h, w): an anchored z's base."""
        return F.adaptive_avg_pool2d(x, self.latent_shape[1:])

    def anchor_features(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, h, w) -> its thumbnail channels bicubically upsampled to phi's grid, (B, 3, S, S)."""
        s = self.config.input_size
        return F.interpolate(z[:, : self.config.in_channels], size=(s, s), mode="bicubic", align_corners=False)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, 3, S, S) in [-1, 1] -> (mean, logvar) of z, each (B, C, h, w); logvar is None for VQ."""
        s = self.config.input_size
        if x.shape[-2:] != (s, s):
            raise InfdError(f"encoder input must be {s}x{s}, got {tuple(x.shape[-2:])}; resize with infd.rendering.encode.")
        moments = self.quant_conv(self.encoder(x))
        if self.config.latent_anchor:
            thumb = self.thumbnail(x)
            moments = torch.cat([moments[:, :3] + thumb.to(moments.dtype), moments[:, 3:]], dim=1)
        if self.quantizer is not None:
            return moments, None
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: (B, 3, S, S) in [-1, 1] -> z: (B, C, h, w) (the posterior mean unless `sample`)."""
        mean, logvar = self.encode_moments(x)
        if not sample or logvar is None:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VQ: nearest codebook entries and the codebook loss; KL: z unchanged and 0."""
        if self.quantizer is None:
            return z, z.new_zeros(())
        z_q, loss, _ = self.quantizer(z)
        return z_q, loss

    def to_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """z -> the latents an LDM denoises, (z - shift_factor) * scaling_factor (the one place this scale is applied)."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_diffusion(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_diffusion`: an LDM's latents -> z, x / scaling_factor + shift_factor."""
        return x / self.config.scaling_factor + self.config.shift_factor

    def decode_features(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, h, w) -> phi: (B, F, S, S), the feature map the renderer reads."""
        z, _ = self.quantize(z)
        return self.features_of(z)

    def features_of(self, z_q: torch.Tensor) -> torch.Tensor:
        phi = self.decoder(self.post_quant_conv(z_q))
        if self.config.latent_anchor:
            phi = torch.cat([phi, self.anchor_features(z_q).to(phi.dtype)], dim=1)
        return phi

    def get_renderer(self, name: str | None = None) -> Renderer:
        """The renderer called `name` ("clif", "liif", "fixed"); None: the model's own."""
        if name is None or name == self.config.renderer_type:
            return self.renderer
        if name == "fixed" and self.fixed_renderer is not None:
            return self.fixed_renderer
        if name == "fixed" and isinstance(self.renderer, ResidualDetail):
            return self.renderer.base
        check_choice(name, RENDERERS, "renderer")
        hint = " (train it with the model option fixed_head: true)" if name == "fixed" else ""
        raise InfdError(f"this autoencoder has no '{name}' renderer{hint}; it renders with '{self.config.renderer_type}'.")

    def prepare_render(self, z: torch.Tensor, renderer: str | None = None) -> torch.Tensor:
        """Everything that is computed once per latent; pass the result to `render_window`."""
        return self.get_renderer(renderer).prepare(self.decode_features(z))

    def render_window(self, state: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor, renderer: str | None = None) -> torch.Tensor:
        """RGB (B, 3, h, w) at query centers ys (B, h + 2 halo), xs (B, w + 2 halo), cell (B, 2).

        The halo is that of the renderer used (`get_renderer(renderer).halo`).
        """
        return self.get_renderer(renderer)(state, ys, xs, cell)

    @property
    def halo(self) -> int:
        return self.renderer.halo

    def forward(self, x: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor, sample: bool = True) -> dict:
        """Training pass: encode x, sample z, render the query window.

        Returns pred (B, 3, h, w), mean/logvar of z, and the VQ codebook loss; with a fixed
        head also pred_fixed (B, 3, h, w), its render of the same window (its halo is 0,
        so it reads the centers without the main renderer's halo); with a residual renderer
        also base (B, 3, S, S), its smooth base image at phi's resolution.
        """
        mean, logvar = self.encode_moments(x)
        z = mean
        if sample and logvar is not None:
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        z_q, vq_loss = self.quantize(z)
        phi = self.features_of(z_q)
        state = self.renderer.prepare(phi)
        pred = self.renderer(state, ys, xs, cell)
        out = {"pred": pred, "mean": mean, "logvar": logvar, "vq_loss": vq_loss}
        if isinstance(self.renderer, ResidualDetail):
            out["base"] = state[:, -3:]  # the smooth base's RGB at phi's grid: the whole image at S²
        if self.fixed_renderer is not None:
            halo = self.renderer.halo
            ys0, xs0 = ys[:, halo : ys.shape[1] - halo], xs[:, halo : xs.shape[1] - halo]
            out["pred_fixed"] = self.fixed_renderer(self.fixed_renderer.prepare(phi), ys0, xs0, cell)
        return out


class FirstIndexQuantizer(VectorQuantizer):
    """diffusers' VectorQuantizer with the nearest-code search of the paper's code.

    Distances are |z|² + |e|² - 2 z.e in float32 and the first index wins a tie, where
    `torch.cdist` rounds differently: with 8192 codes, near-ties are common enough that the
    two searches pick different codes for some latents of the released models.
    """

    def forward(self, z: torch.Tensor):
        """z: (B, C, h, w) -> (z_q, loss, (None, None, indices)) like the parent."""
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.vq_embed_dim)
        codes = self.embedding.weight
        distance = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * torch.einsum("bd,dn->bn", flat, codes.t())
        indices = torch.argmin(distance, dim=1)
        z_q = self.embedding(indices).view(z.shape)
        loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, (None, None, indices)
