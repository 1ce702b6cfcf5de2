"""An inversion's spec: the canvas, the conditions and the solver settings, read from and written to JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from infd import geometry
from infd.diffusion import check_seed
from infd.errors import InfdError, check_choice, quote_error
from infd.geometry import Size
from infd.inversion.conditions import Condition, TextRegion, condition_from_dict, condition_to_dict

SOLVERS = ("optimize", "guided")


PRIORS = ("auto", "ddim", "norm")


DEFAULT_CANVAS = (1024, 1024)


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

