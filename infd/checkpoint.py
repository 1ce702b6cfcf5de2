"""Training state as safetensors + JSON (never pickle).

A checkpoint folder holds the model as diffusers writes it (config.json +
diffusion_pytorch_model.safetensors, what every `--ckpt` loads) and, for resuming,
`training_state.safetensors` (optimizer moments, discriminator, EMA, RNG states) with
`training_state.json` (everything that is not a tensor, and where each tensor goes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from infd.errors import InfdError

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
        raise InfdError(f"the training state in '{folder}' is missing or damaged ({error}); resume from an earlier checkpoint.") from None
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
