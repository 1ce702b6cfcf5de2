"""Runs and checkpoints on disk: finding them, loading their models, and training state.

One place answers "which folder does this path name?" for every command:

    RUN/train_config.json                 the run's resolved training config
    RUN/checkpoints/step_0001000/         a checkpoint: the autoencoder as diffusers writes it
        config.json + diffusion_pytorch_model.safetensors     (what every `--ckpt` loads)
        training_state.safetensors + training_state.json      (for resuming)
    LDM_RUN/checkpoints/step_*/           pipeline folders (model_index.json, autoencoder/, unet/, scheduler/)

Training state is safetensors + JSON, never pickle: `training_state.safetensors` holds
the optimizer moments, discriminator, EMA and RNG states, `training_state.json`
everything that is not a tensor and where each tensor goes. Training configs are JSON
objects that may extend another file through a `base` key (`read_config_file`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from infd.errors import InfdError, quote_error
from infd.models import NeuralFieldAutoencoder
from infd.rendering import pick_device

MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "diffusion_pytorch_model.safetensors"
PIPELINE_INDEX = "model_index.json"
CONFIG_BASE_KEY = "base"

# ---------------------------------------------------------------- runs and checkpoints


def checkpoint_dirs(run: str | Path, marker: str | None = MODEL_CONFIG) -> list[Path]:
    """A run's complete checkpoints, oldest first (`marker`: a file every one of them holds; None: any step folder)."""
    steps = (Path(run) / "checkpoints").glob("step_*")
    return sorted(p for p in steps if p.is_dir() and (marker is None or (p / marker).is_file()))


def _autoencoder_in(folder: Path) -> Path | None:
    """The autoencoder checkpoint a folder is or holds (a pipeline's `autoencoder/`), if any."""
    for candidate in (folder, folder / "autoencoder"):
        if (candidate / MODEL_CONFIG).is_file():
            return candidate
    return None


def find_checkpoint(path: str | Path) -> Path:
    """The autoencoder checkpoint folder (config.json + safetensors) that `path` names.

    Accepts a checkpoint folder, a training run folder (its newest checkpoint) or a
    pipeline folder (its `autoencoder/`); an `infd train-ldm` run's checkpoints are
    pipeline folders, so such a run gives its newest checkpoint's autoencoder.
    """
    path = Path(path)
    if not path.exists():
        raise InfdError(f"checkpoint '{path}' does not exist; pass a run folder from `infd train-ae` or a folder holding config.json.")
    found = _autoencoder_in(path) or next(filter(None, map(_autoencoder_in, reversed(checkpoint_dirs(path, None)))), None)
    if found is None:
        raise InfdError(f"'{path}' holds no checkpoint (no config.json, autoencoder/ or checkpoints/step_*); pass a run or checkpoint folder.")
    return found


def find_pipeline(path: str | Path) -> Path:
    """The pipeline folder `path` names: a pipeline folder, or an LDM run (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise InfdError(f"checkpoint '{path}' does not exist; pass a run folder from `infd train-ldm`, one of its checkpoints or a pipeline folder.")
    if (path / PIPELINE_INDEX).is_file():
        check_has_diffusion_model(path)
        return path
    steps = checkpoint_dirs(path, PIPELINE_INDEX)
    if steps:
        return steps[-1]
    if (path / MODEL_CONFIG).is_file() or checkpoint_dirs(path):
        raise InfdError(f"'{path}' is an autoencoder, not a latent diffusion model; pass a run from `infd train-ldm` or a pipeline folder.")
    raise InfdError(f"'{path}' holds no pipeline ({PIPELINE_INDEX} or checkpoints/step_*/{PIPELINE_INDEX}); pass a run from `infd train-ldm` or a pipeline folder.")


def check_has_diffusion_model(folder: Path) -> None:
    """Refuse, in one sentence, a pipeline folder that holds an autoencoder only (`infd convert-official` of an AE-stage file)."""
    try:
        index = json.loads((folder / PIPELINE_INDEX).read_text())
    except (OSError, ValueError):
        return  # the pipeline loader reports an unreadable index
    if isinstance(index, dict) and "autoencoder" in index and "unet" not in index:
        raise InfdError(f"'{folder}' holds an autoencoder only, no diffusion model; it reconstructs and renders (--ckpt), but sampling needs a pipeline with a UNet (convert a DM-stage checkpoint).")


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu", overrides: dict[str, Any] | None = None) -> NeuralFieldAutoencoder:
    """The autoencoder `path` names (see `find_checkpoint`) on `device`, in eval mode; errors are one sentence.

    `overrides`: options of `NeuralFieldAutoencoder.WEIGHT_FREE_OPTIONS` to build it with
    instead of the checkpoint's own (the weights load unchanged).
    """
    folder = find_checkpoint(path)
    _check_model_kind(folder)
    overrides = overrides or {}
    foreign = sorted(set(overrides) - set(NeuralFieldAutoencoder.WEIGHT_FREE_OPTIONS))
    if foreign:
        raise InfdError(f"only {', '.join(NeuralFieldAutoencoder.WEIGHT_FREE_OPTIONS)} may replace a checkpoint's own options, not {', '.join(foreign)}.")
    try:
        model = NeuralFieldAutoencoder.from_pretrained(folder, **overrides)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise InfdError(f"could not load the autoencoder from '{folder}': {quote_error(error)}") from None
    device = pick_device(device) if isinstance(device, str) else device
    return model.to(device).eval()


def _check_model_kind(folder: Path) -> None:
    """Refuse, in one sentence, a checkpoint of another model (a UNet, a VAE) before loading it."""
    try:
        kind = json.loads((folder / MODEL_CONFIG).read_text()).get("_class_name", NeuralFieldAutoencoder.__name__)
    except (OSError, ValueError, AttributeError):
        raise InfdError(f"'{folder / MODEL_CONFIG}' is not a readable JSON object; pass an autoencoder checkpoint folder.") from None
    if kind != NeuralFieldAutoencoder.__name__:
        raise InfdError(f"'{folder}' holds a {kind}, not an infd autoencoder; pass a run, pipeline or autoencoder checkpoint folder.")


# ---------------------------------------------------------------- training configs


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The training options in a JSON config file, with its `base` (if any) resolved.

    `"base": "ae-wallpapers.json"` (relative to the file) starts from that file's options;
    the file's own keys replace the base's, and a nested dict (`model`, `data`) is merged
    key by key. A missing or malformed file, or a base that includes itself, is an InfdError.
    """
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise InfdError(f"config file '{path}' does not exist.") from None
    except json.JSONDecodeError as error:
        raise InfdError(f"config file '{path}' is not valid JSON ({quote_error(error)}).") from None
    except OSError as error:
        raise InfdError(f"config file '{path}' could not be read: {quote_error(error)}") from None
    if not isinstance(values, dict):
        raise InfdError(f"config file '{path}' must hold a JSON object of training options, like the files in configs/.")
    base = values.pop(CONFIG_BASE_KEY, None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise InfdError(f"\"{CONFIG_BASE_KEY}\" in config file '{path}' must be the path of another config file.")
    base_path = (path.parent / base).resolve()
    if base_path in _seen or base_path == path.resolve():
        raise InfdError(f"config file '{path}' extends '{base}', which extends it again; remove the loop of \"{CONFIG_BASE_KEY}\" keys.")
    return merge_options(read_config_file(base_path, (*_seen, path.resolve())), values)


def merge_options(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """`own` over `base`: own keys win, nested dicts are merged key by key."""
    merged = dict(base)
    for key, value in own.items():
        merged[key] = merge_options(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


# ---------------------------------------------------------------- training state

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], name: str = "s") -> Any:
    """Replace every tensor in a nested structure by a reference, collecting the tensors.

    Dicts with non-string keys (optimizer states are keyed by int) become item lists, so
    the skeleton is plain JSON.
    """
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: flatten_state(v, tensors, f"{name}.{k}") for k, v in obj.items()}}
        return {"__items__": [[k, flatten_state(v, tensors, f"{name}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten_state(v, tensors, f"{name}.{i}") for i, v in enumerate(obj)], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training state")


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"].items()}
        if "__items__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__items__"]}
        if "__list__" in skeleton:
            items = [unflatten_state(v, tensors) for v in skeleton["__list__"]]
            return tuple(items) if skeleton["tuple"] else items
    return skeleton


def save_training_state(folder: Path, state: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(state, tensors)
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(skeleton, indent=1))


def load_training_state(folder: Path) -> dict[str, Any]:
    try:
        skeleton = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError) as error:
        raise InfdError(f"the training state in '{folder}' is missing or damaged ({quote_error(error)}); resume from an earlier checkpoint.") from None
    return unflatten_state(skeleton, tensors)


def rng_states() -> dict[str, torch.Tensor]:
    """The global RNG states a checkpoint stores for an exact resume (CPU, and CUDA when present)."""
    states = {"rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["rng_cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(state: dict[str, Any]) -> None:
    """Undo `rng_states` from a loaded training state."""
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng_cuda"])


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, folder: Path) -> None:
    """Restore `optimizer` from a checkpoint's state dict, refusing one that does not fit its parameters.

    torch keys optimizer moments by parameter position, so a checkpoint written by code
    that created the model's modules in another order would load silently and fail (or
    worse, train on swapped moments) at the next step; the shapes tell.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = state.get("state", {})
    for index, param in enumerate(params):
        moments = saved.get(index, {})
        shape = next((tuple(v.shape) for k, v in moments.items() if k != "step" and isinstance(v, torch.Tensor)), None)
        if shape is not None and shape != tuple(param.shape):
            raise InfdError(
                f"the optimizer state in '{folder}' does not fit this model's parameters (parameter {index} is "
                f"{tuple(param.shape)}, its moments {shape}): the run was written by code that built the model in "
                "another order; continue it as a new run with --init pointing at that checkpoint."
            )
    optimizer.load_state_dict(state)
