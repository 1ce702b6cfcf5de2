"""The step loop every infd trainer shares (autoencoder, latent diffusion).

`StepTrainer` sets a run up (`start_run`: config, run folder, accelerator, seed), runs the
step loop (progress bar and `out/log.jsonl`) and writes checkpoints (`save`: atomic,
pruned, with the progress every resume needs). A trainer subclass provides `batches()`,
`train_step(batch) -> logs`, `write_samples()`, `ema_weights()`, `training_state()` and
`write_models(folder)`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from infd.errors import InfdError
from infd.files import atomic_directory, atomic_path
from infd.store import MODEL_CONFIG, checkpoint_dirs, restore_rng_states, rng_states, save_training_state


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


def resolve_precision(mixed_precision: str) -> str:
    """accelerate's mixed precision for a config's choice: "auto" is bf16 on a GPU that has it, else none."""
    if mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return mixed_precision


class StepTrainer:
    name = "train"  # progress-bar label
    checkpoint_marker = MODEL_CONFIG  # the file every complete checkpoint of this kind holds
    rate_name = "images_per_s"
    host_keys: tuple[str, ...] = ()  # batch entries that stay on the CPU (not moved to the device)
    seconds_before = 0.0  # training time of the earlier sessions of a resumed run (from its checkpoint)
    _session_start: float | None = None

    def train_seconds(self) -> float:
        """Wall-clock seconds of training so far, over every session of the run (for learning curves)."""
        now = time.perf_counter()
        return self.seconds_before + (now - self._session_start if self._session_start is not None else 0.0)

    def start_run(self, config, out: str | Path, resume: bool, progress: bool) -> str:
        """The setup every trainer shares: check the config and the run folder, then make the
        accelerator and seed this process. Returns the mixed precision in use."""
        config.validate()
        self.config, self.out, self.progress = config, Path(out), progress
        existing = self.checkpoints()
        if resume and not existing:
            raise InfdError(f"--resume was given but '{self.out}' has no checkpoint to resume from.")
        if not resume and existing:
            raise InfdError(f"'{self.out}' already holds checkpoints; pass --resume to continue it or choose a new --out.")
        precision = resolve_precision(config.mixed_precision)
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        torch.manual_seed(config.seed + self.accelerator.process_index)
        return precision

    def checkpoints(self) -> list[Path]:
        """The run's complete checkpoints, oldest first."""
        return checkpoint_dirs(self.out, self.checkpoint_marker)

    def last_checkpoint(self) -> Path:
        return self.checkpoints()[-1]

    def progress_state(self) -> dict[str, Any]:
        """What every checkpoint stores beside the models: step, counters, time, RNG, grad scaler."""
        state: dict[str, Any] = {"step": self.step, "failed_images": self.failed_images, "elapsed_s": self.train_seconds(), **rng_states()}
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def restore_progress(self, state: dict[str, Any]) -> None:
        """Undo `progress_state` (the grad scaler is restored after `accelerator.prepare`)."""
        self.step, self.failed_images = int(state["step"]), int(state.get("failed_images", 0))
        self.seconds_before = float(state.get("elapsed_s", 0.0))
        restore_rng_states(state)

    def save(self) -> None:
        """checkpoints/step_NNNNNNN, written atomically by the main process: the models with
        their EMA weights (`write_models`) and the training state (`progress_state` and the
        trainer's `training_state`); then only the newest `keep_checkpoints` are kept."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        state = {**self.progress_state(), **self.training_state()}
        target = self.out / "checkpoints" / f"step_{self.step:07d}"
        with atomic_directory(target) as tmp:
            with self.ema_weights():
                self.write_models(Path(tmp))
            save_training_state(Path(tmp), state)
        for old in self.checkpoints()[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def training_state(self) -> dict[str, Any]:
        """The trainer's own part of a checkpoint's state: optimizers, EMA, raw weights."""
        raise NotImplementedError

    def write_models(self, folder: Path) -> None:
        """Save the models into a checkpoint folder (called with the EMA weights in place)."""
        raise NotImplementedError

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

