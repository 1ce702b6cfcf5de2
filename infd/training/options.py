"""Training configs: load from JSON (with `base`), check every option's name and type, save beside the run."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from pathlib import Path
from typing import Any, ClassVar

from infd.errors import InfdError
from infd.store import read_config_file


class TrainConfig:
    """What every training config does (a dataclass mixin): load from JSON (with `base`), check, save.

    `tuple_options` are JSON lists held as tuples; `nested_options` turns nested dicts
    (the autoencoder's `data`, checked `model`) into what the dataclass holds.
    """

    tuple_options: ClassVar[tuple[str, ...]] = ("adam_betas",)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InfdError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}.")
        check_option_types(cls, values)
        values = dict(values)
        for name in cls.tuple_options:
            if name in values:
                values[name] = tuple(values[name])
        return cls(**cls.nested_options(values))

    @classmethod
    def nested_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        return values

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(read_config_file(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_common_options(config) -> None:
    """The options every training config has: steps, batch size, learning rate, precision, EMA."""
    if config.steps <= 0 or config.batch_size <= 0:
        raise InfdError("steps and batch_size must be positive.")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise InfdError(f"learning rate {config.lr} must be a positive number.")
    if config.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise InfdError(f"mixed_precision '{config.mixed_precision}' must be auto, no, bf16 or fp16.")
    if not 0 <= config.ema_decay < 1:
        raise InfdError(f"ema_decay {config.ema_decay} must be in [0, 1).")
    if config.num_workers < 0:
        raise InfdError(f"num_workers {config.num_workers} must be 0 (load in the training process) or more.")
    if not (config.time_limit >= 0 and math.isfinite(config.time_limit)):
        raise InfdError(f"time_limit {config.time_limit} must be a number of minutes >= 0 (0: no limit).")


def check_option_types(cls, values: dict[str, Any]) -> None:
    """Refuse, naming the option, a config value of another kind than its default (`{"lr": "fast"}`)."""
    for option in dataclasses.fields(cls):
        default = _default(option)
        if option.name in values and default is not None and not _same_kind(values[option.name], default):
            raise InfdError(f"training option {option.name} must be {_kind_name(default)}, got {json.dumps(values[option.name])}.")


def check_keyword_options(function, values: dict[str, Any], what: str, exclude: tuple[str, ...] = ("self",)) -> None:
    """Refuse, naming the key, an option that `function` does not take or whose kind differs from its default.

    For option dicts passed on as keywords (a config's `model`): `{"latent_channels": "3"}`
    would otherwise fail deep inside the model with a TypeError.
    """
    parameters = {name: p for name, p in inspect.signature(function).parameters.items() if name not in exclude}
    unknown = sorted(set(values) - set(parameters))
    if unknown:
        raise InfdError(f"unknown {what} option(s) {', '.join(unknown)}; known: {', '.join(sorted(parameters))}.")
    for name, value in values.items():
        default = parameters[name].default
        if default is not inspect.Parameter.empty and default is not None and not _same_kind(value, default):
            raise InfdError(f"{what} option {name} must be {_kind_name(default)}, got {json.dumps(value)}.")


def _default(option: dataclasses.Field) -> Any:
    if option.default is not dataclasses.MISSING:
        return option.default
    return option.default_factory() if option.default_factory is not dataclasses.MISSING else None


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    if isinstance(default, dict) or dataclasses.is_dataclass(default):
        return isinstance(value, dict)
    return isinstance(value, type(default))


def _kind_name(default: Any) -> str:
    kinds = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", tuple: "a list", list: "a list"}
    return kinds.get(type(default), "a JSON object")

