"""The solvers: find a latent whose field satisfies the conditions, rendering only their regions.

Every step decodes the feature map phi once and renders only the conditions' boxes, each
at the resolution its condition needs (`render_region`); the canvas is never rendered
while solving, whatever its size. Two solvers:

- "optimize": Adam on the starting noise of a short deterministic DDIM run (the prior
  "ddim", with a pipeline), or on z itself with a Gaussian norm prior (the prior "norm",
  the only one an autoencoder alone offers). Noise-space optimisation keeps z on what
  the diffusion model generates: the result is always a DDIM sample, and the noise is
  kept on the sphere of radius sqrt(dim) where Gaussian noise lives, so the solver
  cannot wander off into latents the decoder never saw. A score-distillation prior
  would be cheaper per step but only nudges z towards the data and needs many steps
  and tuning to stay there; a handful of DDIM steps (with gradient checkpointing, so
  memory does not grow with them) gives a prior that holds by construction.
- "guided": DDIM sampling where every step adds the gradient of the conditions' losses,
  evaluated on the step's estimate of the clean latent, to the predicted noise
  (universal guidance's forward guidance, Bansal et al. 2023), optionally repeating
  each step `recurrence` times with fresh noise (their self-recurrence).

Region renders larger than `tile` pixels a side are rendered in tiles under gradient
checkpointing, so memory stays flat in the region's size too (tiling is seam-free, so
the result is the same).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from infd import geometry
from infd.diffusion import check_sampling, make_sampler
from infd.errors import InfdError
from infd.geometry import Box, Size
from infd.inversion.conditions import Condition, Critics, condition_to_dict
from infd.inversion.spec import InversionSpec, SolverConfig, spec_to_dict
from infd.models import NeuralFieldAutoencoder
from infd.rendering import render_prepared


def render_region(model: NeuralFieldAutoencoder, state: torch.Tensor, box: Box, size: Size, tile: int | None = None) -> torch.Tensor:
    """Differentiable render of `box` at `size` pixels: (B, 3, h, w) in about [0, 1] (not clamped).

    state: model.prepare_render(z). Larger than `tile` a side, the region is rendered tile
    by tile under gradient checkpointing (seam-free, so the same pixels), keeping only
    one tile's activations alive.
    """
    size = geometry.check_size(size, "region size")
    if tile is None or max(size) <= tile:
        return (render_prepared(model, state, box, size) + 1) / 2
    rows: dict[int, list[torch.Tensor]] = {}
    for window in geometry.tiles(size, tile):
        piece = torch.utils.checkpoint.checkpoint(render_prepared, model, state, box, size, window, use_reentrant=False)
        rows.setdefault(window.top, []).append(piece)
    return (torch.cat([torch.cat(row, dim=-1) for row in rows.values()], dim=-2) + 1) / 2


def condition_losses(
    model: NeuralFieldAutoencoder, z: torch.Tensor, conditions: list[Condition], critics: Critics, canvas: Size, tile: int | None = None
) -> torch.Tensor:
    """Each condition's loss on its own region of z's field: (len(conditions),).

    z: (1, C, h, w). phi is decoded once; only the conditions' boxes are rendered.
    """
    state = model.prepare_render(z)
    return torch.stack([c.loss(render_region(model, state, c.box, c.render_size(canvas, critics), tile), critics) for c in conditions])


def render_conditions(
    model: NeuralFieldAutoencoder, z: torch.Tensor, conditions: list[Condition], critics: Critics, canvas: Size, tile: int = 512
) -> list[torch.Tensor]:
    """Each condition's region render (3, h, w) in [0, 1] on the CPU, as the condition saw it."""
    with torch.no_grad():
        state = model.prepare_render(z)
        return [render_region(model, state, c.box, c.render_size(canvas, critics), tile)[0].clamp(0, 1).cpu() for c in conditions]


def ddim_stepper(scheduler_config, steps: int) -> DDIMScheduler:
    """The pipeline's noise schedule as a deterministic DDIM of `steps` steps, stepping on predicted noise.

    The same diffusers DDIMScheduler that `infd.diffusion.sample` steps with (the pipeline's
    saved config: timestep spacing, final alpha), so inversion samples as `infd sample` does;
    it is told the noise, whatever the UNet predicts (`predict_noise_and_clean` converts),
    because guidance changes the noise.
    """
    scheduler = make_sampler("ddim", {**scheduler_config, "prediction_type": "epsilon"})
    check_sampling(scheduler, steps)
    scheduler.set_timesteps(steps)
    return scheduler


def previous_alpha(scheduler: DDIMScheduler, t: int) -> float:
    """The cumulative alpha of the timestep DDIMScheduler.step goes to from t (final_alpha_cumprod after the last)."""
    previous = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return float(scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod)


def predict_noise_and_clean(unet, x: torch.Tensor, t: torch.Tensor, alpha: float, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) from the UNet's prediction at x_t, timestep t of cumulative alpha a: x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    out = unet(x, torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)).sample.float()
    a, s = math.sqrt(alpha), math.sqrt(1 - alpha)
    if prediction_type == "epsilon":
        return out, (x - s * out) / a
    if prediction_type == "v_prediction":
        return s * x + a * out, a * x - s * out
    raise InfdError(f"guidance supports epsilon and v_prediction models, not '{prediction_type}'.")


def ddim_clean_latent(unet, scheduler: DDIMScheduler, noise: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 from x_T = noise by the deterministic DDIM `scheduler`, differentiable, one UNet's activations alive at a time."""
    x = noise

    def one_step(x, t):
        eps, _ = predict_noise_and_clean(unet, x, t, float(scheduler.alphas_cumprod[t]), prediction_type)
        return scheduler.step(eps, t, x, eta=0.0).prev_sample

    for t in scheduler.timesteps:
        x = torch.utils.checkpoint.checkpoint(one_step, x, t, use_reentrant=False)
    return x


@dataclass
class InversionResult:
    z: torch.Tensor  # (1, C, h, w) on the model's device, what the autoencoder decodes
    history: list[dict]  # per step: {"step", "total", "losses": [...], "prior"?}
    conditions: list[Condition]

    def final_losses(self) -> list[float]:
        return self.history[-1]["losses"]

    def log(self, spec: InversionSpec | None = None) -> dict:
        entry = {"conditions": [condition_to_dict(c) for c in self.conditions], "steps": self.history}
        return {"spec": spec_to_dict(spec), **entry} if spec is not None else entry


def weighted_total(losses: torch.Tensor, conditions: list[Condition]) -> torch.Tensor:
    """Sum of the conditions' losses (len(conditions),) times their weights: a scalar."""
    return (torch.tensor([c.weight for c in conditions], device=losses.device) * losses).sum()


def _record(history: list[dict], step: int, losses: torch.Tensor, conditions: list[Condition], prior: torch.Tensor | None = None) -> torch.Tensor:
    total = weighted_total(losses, conditions) + (prior if prior is not None else 0)
    entry = {"step": step, "total": float(total), "losses": [float(v) for v in losses]}
    if prior is not None:
        entry["prior"] = float(prior)
    history.append(entry)
    return total


def _check_finite(total: torch.Tensor, step: int) -> None:
    if not torch.isfinite(total):
        raise InfdError(f"the loss became {float(total)} at step {step}; lower lr or guidance_scale.")


def _bar(iterable, total: int, desc: str, progress: bool):
    return tqdm(iterable, total=total, desc=desc, unit="step", disable=not progress)


def resolve_prior(config: SolverConfig, pipeline) -> str:
    if config.prior == "auto":
        return "ddim" if pipeline is not None else "norm"
    if config.prior == "ddim" and pipeline is None:
        raise InfdError("the ddim prior needs a diffusion model: pass a pipeline folder (an `infd train-ldm` run), or use prior 'norm'.")
    return config.prior


def check_solvable(config: SolverConfig, pipeline, has_init: bool) -> None:
    """Refuse solver settings the model cannot serve, before any work."""
    if config.solver == "guided":
        if pipeline is None:
            raise InfdError("guided sampling needs a diffusion model: pass a pipeline folder (an `infd train-ldm` run), or use solver 'optimize'.")
        if has_init:
            raise InfdError("guided sampling starts from noise; an init image applies to solver 'optimize' with prior 'norm'.")
    elif resolve_prior(config, pipeline) == "ddim" and has_init:
        raise InfdError("an init image starts z directly, which the ddim prior does not optimise; use prior 'norm' with init.")


def optimize_latent(
    model: NeuralFieldAutoencoder,
    conditions: list[Condition],
    critics: Critics,
    canvas: Size,
    config: SolverConfig,
    pipeline=None,
    init_z: torch.Tensor | None = None,
    progress: bool = False,
) -> InversionResult:
    """Adam on the DDIM starting noise (prior "ddim") or on z (prior "norm"); see the module docstring.

    The history has steps + 1 entries: the losses before each update and after the last.
    """
    prior = resolve_prior(config, pipeline)
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(config.seed)
    shape = (1, *model.latent_shape)
    if prior == "ddim":
        stepper = ddim_stepper(pipeline.scheduler.config, config.ddim_steps)
        prediction_type = pipeline.scheduler.config.prediction_type
        variable = torch.randn(shape, generator=generator).to(param.device)
        radius = math.sqrt(variable.numel())

        def latent_of(noise):
            return model.from_diffusion(ddim_clean_latent(pipeline.unet, stepper, noise, prediction_type))
    else:
        variable = (init_z.detach().float() if init_z is not None else model.from_diffusion(torch.randn(shape, generator=generator))).to(param.device)

        def latent_of(z):
            return z

    variable.requires_grad_(True)
    optimizer = torch.optim.Adam([variable], lr=config.lr)
    history: list[dict] = []
    for step in _bar(range(config.steps + 1), config.steps + 1, "invert", progress):
        z = latent_of(variable)
        losses = condition_losses(model, z, conditions, critics, canvas, config.tile)
        prior_term = config.prior_weight * 0.5 * model.to_diffusion(z).pow(2).mean() if prior == "norm" else None
        total = _record(history, step, losses.detach(), conditions, None if prior_term is None else prior_term.detach())
        _check_finite(total, step)
        if step == config.steps:
            break
        objective = weighted_total(losses, conditions) + (prior_term if prior_term is not None else 0)
        (variable.grad,) = torch.autograd.grad(objective, [variable])
        optimizer.step()
        if prior == "ddim":
            with torch.no_grad():
                variable.mul_(radius / variable.norm())  # stay where Gaussian noise lives
    return InversionResult(z.detach(), history, conditions)


def guided_sample(pipeline, conditions: list[Condition], critics: Critics, canvas: Size, config: SolverConfig, progress: bool = False) -> InversionResult:
    """DDIM sampling with forward universal guidance from the conditions' losses.

    At each step, with g = grad_{x_t} L(from_diffusion(x0_hat(x_t))) (through the UNet):
    eps' = eps + guidance_scale * sqrt(1 - a_t) * g / rms(g), then a DDIM update with eps'.
    Normalising g makes guidance_scale mean the same for any loss scale. The history has
    one entry per step (the losses of that step's clean estimate) and one for the final
    latent.
    """
    model = pipeline.autoencoder
    param = next(pipeline.unet.parameters())
    generator = torch.Generator().manual_seed(config.seed)
    stepper = ddim_stepper(pipeline.scheduler.config, config.steps)
    prediction_type = pipeline.scheduler.config.prediction_type
    x = torch.randn((1, *model.latent_shape), generator=generator).to(param.device)
    history: list[dict] = []
    for i, t in enumerate(_bar(stepper.timesteps, len(stepper.timesteps), "guided sampling", progress)):
        alpha = float(stepper.alphas_cumprod[t])
        for repeat in range(config.recurrence):
            x_t = x.detach().requires_grad_(True)
            eps, x0 = predict_noise_and_clean(pipeline.unet, x_t, t, alpha, prediction_type)
            losses = condition_losses(model, model.from_diffusion(x0), conditions, critics, canvas, config.tile)
            (grad,) = torch.autograd.grad(weighted_total(losses, conditions), [x_t])
            if repeat == 0:
                _check_finite(_record(history, i, losses.detach(), conditions), i)
            direction = grad / grad.pow(2).mean().sqrt().clamp_min(1e-12)
            noise = eps.detach() + config.guidance_scale * math.sqrt(1 - alpha) * direction
            x = stepper.step(noise, t, x_t.detach(), eta=0.0).prev_sample
            if repeat < config.recurrence - 1:  # back to x_t with fresh noise, then the step again
                ratio = alpha / previous_alpha(stepper, t)
                fresh = torch.randn(x.shape, generator=generator).to(x.device)
                x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * fresh
    z = model.from_diffusion(x)
    with torch.no_grad():
        _record(history, len(stepper.timesteps), condition_losses(model, z, conditions, critics, canvas, config.tile), conditions)
    return InversionResult(z.detach(), history, conditions)


def invert(
    model: NeuralFieldAutoencoder,
    spec: InversionSpec,
    critics: Critics | None = None,
    pipeline=None,
    init_z: torch.Tensor | None = None,
    progress: bool = False,
) -> InversionResult:
    """Solve `spec` with its solver: model is the autoencoder (pipeline.autoencoder with a pipeline)."""
    config = spec.solver.check()
    critics = critics or Critics()
    if spec.needs_clip and critics.clip is None:
        from infd.inversion.clip import MISSING_CLIP

        raise InfdError(MISSING_CLIP)
    device = next(model.parameters()).device
    conditions = [c.to(device) for c in spec.conditions]
    if not conditions:
        raise InfdError("there are no conditions to invert; add some to the spec or pass --text.")
    check_solvable(config, pipeline, init_z is not None)
    if config.solver == "guided":
        return guided_sample(pipeline, conditions, critics, spec.canvas, config, progress)
    return optimize_latent(model, conditions, critics, spec.canvas, config, pipeline, init_z, progress)

