"""Any-scale inversion: find a latent whose field satisfies conditions on chosen regions.

    pipe = load_pipeline("runs/ldm")                            # or an autoencoder alone, without pipeline=
    result = invert(pipe.autoencoder, load_spec("examples/super-resolve.json"), pipeline=pipe)
    result.z                                                    # (1, C, h, w): render it at any size

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

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from infd import geometry
from infd.diffusion import check_seed
from infd.errors import InfdError, check_choice, quote_error
from infd.geometry import Box, Size
from infd.inversion.conditions import Condition, Critics, TextRegion, condition_from_dict, condition_to_dict
from infd.models import NeuralFieldAutoencoder
from infd.rendering import render_prepared

SOLVERS = ("optimize", "guided")
PRIORS = ("auto", "ddim", "norm")
DEFAULT_CANVAS = (1024, 1024)


# ---------------------------------------------------------------- configuration


@dataclass
class SolverConfig:
    """How to solve; the JSON spec's top-level keys besides canvas, conditions and model paths."""

    solver: str = "optimize"  # "optimize" or "guided"
    steps: int = 100  # optimize: Adam steps; guided: denoising steps
    seed: int = 0
    lr: float = 0.05  # Adam's learning rate (optimize)
    prior: str = "auto"  # optimize: "ddim" (needs a pipeline), "norm", or "auto" (ddim when there is a pipeline)
    prior_weight: float = 0.01  # the norm prior's weight on mean(to_diffusion(z)²) / 2
    ddim_steps: int = 10  # denoising steps of the ddim prior
    guidance_scale: float = 1.0  # guided: gradient scale on the predicted noise
    recurrence: int = 1  # guided: repeats of each step (self-recurrence)
    tile: int = 512  # region renders above this side are tiled under gradient checkpointing

    def check(self) -> SolverConfig:
        check_choice(self.solver, SOLVERS, "solver")
        check_choice(self.prior, PRIORS, "prior")
        for name in ("steps", "ddim_steps", "recurrence", "tile"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InfdError(f"{name} must be a whole number >= 1, got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InfdError(f"seed must be a whole number, got {self.seed!r}.")
        check_seed(self.seed, what="seed")
        for name in ("lr", "prior_weight", "guidance_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InfdError(f"{name} must be a number >= 0, got {value!r}.")
        return self


@dataclass
class InversionSpec:
    """A whole problem: the canvas (final image size), the conditions and how to solve."""

    conditions: list[Condition]
    canvas: Size = DEFAULT_CANVAS
    solver: SolverConfig = field(default_factory=SolverConfig)
    clip: str | None = None  # local CLIP (see infd.inversion.clip.load_clip)
    clip_arch: str | None = None
    lpips_vgg: str | None = None  # local VGG16 weights for "lpips" image losses
    init: str | None = None  # an image whose encoding starts z (norm prior only)

    @property
    def needs_clip(self) -> bool:
        return any(isinstance(c, TextRegion) for c in self.conditions)

    @property
    def needs_lpips(self) -> bool:
        return any(getattr(c, "loss_type", None) == "lpips" for c in self.conditions)


SPEC_PATHS = ("clip", "lpips_vgg", "init")
SOLVER_KEYS = {f.name for f in fields(SolverConfig)}
SPEC_KEYS = {"canvas", "conditions", "clip_arch", *SPEC_PATHS, *SOLVER_KEYS}


def spec_from_dict(data: dict, base: Path | None = None, require_conditions: bool = True) -> InversionSpec:
    """A spec from its JSON form; relative paths are relative to `base` (the spec's folder).

    {"canvas": "2048x2048", "solver": "optimize", "steps": 200, "seed": 0,
     "conditions": [{"type": "text", "box": [-1, -1, 0, 0], "prompt": "a red boat"}, ...]}
    """
    if not isinstance(data, dict):
        raise InfdError("an inversion spec must be a JSON object with \"canvas\" and \"conditions\".")
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise InfdError(f"the spec has unknown keys {', '.join(sorted(unknown))}; it takes {', '.join(sorted(SPEC_KEYS))}.")
    entries = data.get("conditions", [])
    if not isinstance(entries, list):
        raise InfdError("the spec's \"conditions\" must be a list of condition objects.")
    if require_conditions and not entries:
        raise InfdError("the spec has no conditions; add at least one to \"conditions\".")
    conditions = [condition_from_dict(entry, base, i) for i, entry in enumerate(entries)]
    solver = SolverConfig(**{k: v for k, v in data.items() if k in SOLVER_KEYS}).check()
    paths = {k: _resolve(data[k], base, k) for k in SPEC_PATHS if data.get(k) is not None}
    return InversionSpec(conditions, parse_canvas(data.get("canvas", DEFAULT_CANVAS)), solver, clip_arch=data.get("clip_arch"), **paths)


def _resolve(value, base: Path | None, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise InfdError(f"the spec's \"{key}\" must be a path, got {value!r}.")
    path = Path(value).expanduser()
    return str(path if path.is_absolute() or base is None else base / path)


def parse_canvas(value) -> Size:
    """"WIDTHxHEIGHT", one number, or [height, width] -> (height, width)."""
    if isinstance(value, str):
        return geometry.parse_size(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return geometry.check_size((value, value), "canvas")
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return geometry.check_size(tuple(value), "canvas")
    raise InfdError(f"canvas {value!r} must be \"WIDTHxHEIGHT\", one number or [height, width] in pixels.")


def load_spec(path: str | Path) -> InversionSpec:
    path = Path(path)
    if not path.is_file():
        raise InfdError(f"spec file '{path}' does not exist; pass a JSON file (see examples/).")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InfdError(f"spec file '{path}' is not valid JSON ({quote_error(error)}).") from None
    except RecursionError:
        raise InfdError(f"spec file '{path}' nests lists or objects too deeply to be a spec (see examples/).") from None
    return spec_from_dict(data, path.parent)


def spec_to_dict(spec: InversionSpec) -> dict:
    """What the log records of a spec."""
    h, w = spec.canvas
    paths = {k: getattr(spec, k) for k in (*SPEC_PATHS, "clip_arch") if getattr(spec, k) is not None}
    return {"canvas": f"{w}x{h}", **asdict(spec.solver), **paths, "conditions": [condition_to_dict(c) for c in spec.conditions]}


# ---------------------------------------------------------------- region rendering


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


# ---------------------------------------------------------------- DDIM, as the equations read


@dataclass(frozen=True)
class DDIMStep:
    t: int  # training timestep the UNet is asked about
    alpha: float  # cumulative alpha at t
    alpha_prev: float  # cumulative alpha of the step it goes to (1 after the last)


def ddim_schedule(scheduler_config, steps: int) -> list[DDIMStep]:
    """The DDIM steps of a training noise schedule (diffusers' DDIMScheduler spacing)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    if not 1 <= steps <= scheduler.config.num_train_timesteps:
        raise InfdError(f"the number of DDIM steps must be from 1 to {scheduler.config.num_train_timesteps}, got {steps}.")
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    alphas = [float(scheduler.alphas_cumprod[t]) for t in timesteps]
    return [DDIMStep(t, a, p) for t, a, p in zip(timesteps, alphas, alphas[1:] + [float(scheduler.final_alpha_cumprod)])]


def predict_noise_and_clean(unet, x: torch.Tensor, step: DDIMStep, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) from the UNet's prediction at x_t: x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    t = torch.full((x.shape[0],), step.t, device=x.device, dtype=torch.long)
    out = unet(x, t).sample.float()
    a, s = math.sqrt(step.alpha), math.sqrt(1 - step.alpha)
    if prediction_type == "epsilon":
        return out, (x - s * out) / a
    if prediction_type == "v_prediction":
        return s * x + a * out, a * x - s * out
    raise InfdError(f"guidance supports epsilon and v_prediction models, not '{prediction_type}'.")


def ddim_update(x0: torch.Tensor, eps: torch.Tensor, alpha_prev: float) -> torch.Tensor:
    """Deterministic DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
    return math.sqrt(alpha_prev) * x0 + math.sqrt(1 - alpha_prev) * eps


def ddim_clean_latent(unet, schedule: list[DDIMStep], noise: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 from x_T = noise by deterministic DDIM, differentiable, one UNet's activations alive at a time."""
    x = noise

    def one_step(x, step=None):
        eps, x0 = predict_noise_and_clean(unet, x, step, prediction_type)
        return ddim_update(x0, eps, step.alpha_prev)

    for step in schedule:
        x = torch.utils.checkpoint.checkpoint(one_step, x, step, use_reentrant=False)
    return x


# ---------------------------------------------------------------- solvers


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


MAX_CONDITIONS = 64  # each condition renders its region at every step
MAX_TEXT_ASPECT = 16  # a text region is scored by CLIP windows along its long side: at most this many


def check_bounds(spec: InversionSpec) -> None:
    """Refuse, before any work, a spec whose regions would cost unbounded renders (too many, or too thin)."""
    if len(spec.conditions) > MAX_CONDITIONS:
        raise InfdError(f"the spec has {len(spec.conditions)} conditions, more than the {MAX_CONDITIONS} one inversion may have; merge or drop some.")
    for condition in spec.conditions:
        if isinstance(condition, TextRegion):
            height, width = condition.box.height * spec.canvas[0], condition.box.width * spec.canvas[1]
            if max(height, width) > MAX_TEXT_ASPECT * min(height, width):
                raise InfdError(f"the box of {condition.describe()} is more than {MAX_TEXT_ASPECT} times longer than wide on the canvas; give it a squarer box.")


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
        schedule = ddim_schedule(pipeline.scheduler.config, config.ddim_steps)
        prediction_type = pipeline.scheduler.config.prediction_type
        variable = torch.randn(shape, generator=generator).to(param.device)
        radius = math.sqrt(variable.numel())

        def latent_of(noise):
            return model.from_diffusion(ddim_clean_latent(pipeline.unet, schedule, noise, prediction_type))
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
    schedule = ddim_schedule(pipeline.scheduler.config, config.steps)
    prediction_type = pipeline.scheduler.config.prediction_type
    x = torch.randn((1, *model.latent_shape), generator=generator).to(param.device)
    history: list[dict] = []
    for i, step in enumerate(_bar(schedule, len(schedule), "guided sampling", progress)):
        for repeat in range(config.recurrence):
            x_t = x.detach().requires_grad_(True)
            eps, x0 = predict_noise_and_clean(pipeline.unet, x_t, step, prediction_type)
            losses = condition_losses(model, model.from_diffusion(x0), conditions, critics, canvas, config.tile)
            (grad,) = torch.autograd.grad(weighted_total(losses, conditions), [x_t])
            if repeat == 0:
                _check_finite(_record(history, i, losses.detach(), conditions), i)
            direction = grad / grad.pow(2).mean().sqrt().clamp_min(1e-12)
            noise = eps.detach() + config.guidance_scale * math.sqrt(1 - step.alpha) * direction
            clean = (x_t.detach() - math.sqrt(1 - step.alpha) * noise) / math.sqrt(step.alpha)
            x = ddim_update(clean, noise, step.alpha_prev)
            if repeat < config.recurrence - 1:  # back to x_t with fresh noise, then the step again
                ratio = step.alpha / step.alpha_prev
                fresh = torch.randn(x.shape, generator=generator).to(x.device)
                x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * fresh
    z = model.from_diffusion(x)
    with torch.no_grad():
        _record(history, len(schedule), condition_losses(model, z, conditions, critics, canvas, config.tile), conditions)
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
