"""The step loop that every infd trainer shares (autoencoder, latent diffusion).

A trainer subclass holds `config` (steps, batch_size, log_every, sample_every,
checkpoint_every), `out`, `accelerator`, `step`, `failed_images` and `progress`, and
provides `batches()`, `train_step(batch) -> logs`, `write_samples()`, `save()` and
`last_checkpoint()`. The loop logs to a progress bar and `out/log.jsonl`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from infd.errors import InfdError
from infd.files import atomic_path


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


def _one_thread_per_worker(_: int) -> None:
    # Workers that also use every core oversubscribe the CPU with the training process;
    # OpenMP's spinning then slows both many times over on small machines.
    torch.set_num_threads(1)


def step_loader(dataset, sampler, num_workers: int, seed: int):
    """An iterator over the batches `sampler` names, drawing no global randomness (exact resume)."""
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=_one_thread_per_worker,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
    )
    return iter(loader)


def drop_log_after(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (the checkpoint a run resumes from), and a line cut short by a kill,
    so that a resumed run logs each step once."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if _logged_step(line) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line.rstrip("\n") + "\n" for line in kept))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class StepTrainer:
    name = "train"  # progress-bar label
    rate_name = "images_per_s"
    host_keys: tuple[str, ...] = ()  # batch entries that stay on the CPU (not moved to the device)
    seconds_before = 0.0  # training time of the earlier sessions of a resumed run (from its checkpoint)
    _session_start: float | None = None

    def train_seconds(self) -> float:
        """Wall-clock seconds of training so far, over every session of the run (for learning curves)."""
        now = time.perf_counter()
        return self.seconds_before + (now - self._session_start if self._session_start is not None else 0.0)

    def training_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def run(self) -> Path:
        """Train from `self.step` to `config.steps` (or until `config.time_limit` minutes
        have passed, checkpointing there); returns the last checkpoint folder."""
        cfg, accelerator = self.config, self.accelerator
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out / "train_config.json") as tmp:
                tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
            drop_log_after(self.out / "log.jsonl", self.step)
        self.training_module().train()
        batches = self.batches()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, disable=not (self.progress and accelerator.is_main_process))
        started, first_step = time.perf_counter(), self.step
        self._session_start = started
        deadline = started + cfg.time_limit * 60 if cfg.time_limit > 0 else math.inf
        while self.step < cfg.steps:
            batch = next(batches)
            self.failed_images += int(batch.pop("failed").sum())
            batch = {k: v if k in self.host_keys else v.to(accelerator.device) for k, v in batch.items()}
            logs = self.train_step(batch)
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                rate = (self.step - first_step) * cfg.batch_size * accelerator.num_processes / (time.perf_counter() - started)
                logs.update({"step": self.step, self.rate_name: rate, "skipped": self.failed_images, "elapsed_s": self.train_seconds()})
                bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k != "step"})
                self.log(logs)
            out_of_time = self.past(deadline)
            last = self.step == cfg.steps or out_of_time
            if self.step % cfg.sample_every == 0 or last:
                self.write_samples()
            if self.step % cfg.checkpoint_every == 0 or last:
                self.save()
            if out_of_time:
                self.log({"step": self.step, "stopped": "time_limit"})
                break
        bar.close()
        accelerator.wait_for_everyone()
        return self.last_checkpoint()

    def past(self, deadline: float) -> bool:
        """Whether any process is past `deadline`, so that all of them stop at the same step."""
        if deadline == math.inf:
            return False
        late = torch.tensor(float(time.perf_counter() > deadline), device=self.accelerator.device)
        return bool(self.accelerator.reduce(late, "max"))

    def log(self, logs: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(logs) + "\n")
