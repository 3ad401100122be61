"""The optimisation loop shared by the three networks (paper section 2.5).

Adam (eps 1e-4), learning rate decayed x0.1 every 2 epochs down to 1e-6, early stopping on a
validation loss with patience, budgets in steps and minutes, resumable checkpoints at every epoch end,
a JSON-lines log, a progress callback and a cancel check.

Reproducibility: the random generators of epoch ``e`` are seeded from ``(seed, stage, e)``, not carried
over from the previous epoch, so a run resumed from the checkpoint of epoch ``e`` continues exactly as
the uninterrupted run would have.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from CMBDetectLib.errors import CancelledError, InputError
from CMBDetectLib.progress import ProgressCallback, no_progress
from CMBDetectLib.training.checkpoint import copy_state, load_checkpoint, save_checkpoint
from CMBDetectLib.training.config import StageConfig
from CMBDetectLib.training.log import JsonLinesLog

TrainStep = Callable[[nn.Module, np.random.Generator], torch.Tensor]
Validate = Callable[[nn.Module], float]
# Budget options can change between a run and its resumption; everything else must not.
_BUDGET_KEYS = ("epochs", "patience", "max_steps", "max_minutes")


@dataclass
class StageResult:
    name: str
    epochs: int = 0
    steps: int = 0
    best_validation: float = float("inf")
    best_epoch: int = -1
    stopped: str = ""
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        values = asdict(self)
        values.pop("history")
        return values


def learning_rate(config: StageConfig, epoch: int) -> float:
    """Step decay of the paper: ``lr * decay ** (epoch // every)``, never below ``min_lr``."""
    return max(config.lr * config.lr_decay ** (epoch // max(config.lr_decay_every, 1)), config.min_lr)


def epoch_generator(seed: int, stage: str, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(stage.encode()), int(epoch)])


def seed_initialisation(seed: int, stage: str) -> None:
    """Seed torch's generator for the random initial weights of ``stage``'s network, so that they depend only on
    (seed, stage): otherwise they depend on how much randomness the earlier stages drew, and a run that resumes
    after stage 1 (which then draws none) builds a different teacher and student than an uninterrupted run."""
    torch.manual_seed(int(np.random.default_rng([int(seed), zlib.crc32(stage.encode()), 7]).integers(2 ** 62)))


def make_deterministic(seed: int) -> None:
    """Seed torch and ask for deterministic kernels (exact on CPU; best effort on GPUs)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


def as_cancel_check(cancel) -> Callable[[], bool]:
    """Accept ``None``, a callable returning bool, or a ``threading.Event``."""
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    return cancel


#: stage settings added after checkpoints existed, with the value those checkpoints were trained with: left
#: out of the fingerprint at that value, so the older checkpoints still resume (and are reused by variants)
_LATER_SETTINGS = {"cmb_size_balance": 0.0}
_LATER_AUGMENTATION_SETTINGS = {"rotate_in_plane_probability": 0.0}


def _without_later_defaults(values: dict, later: dict) -> dict:
    return {k: v for k, v in values.items() if not (k in later and v == later[k])}


def _fingerprint(config: StageConfig, extra: dict | None) -> str:
    values = _without_later_defaults({k: v for k, v in asdict(config).items() if k not in _BUDGET_KEYS},
                                     _LATER_SETTINGS)
    if isinstance(values.get("augmentation"), dict):
        values["augmentation"] = _without_later_defaults(values["augmentation"], _LATER_AUGMENTATION_SETTINGS)
    return json.dumps({"stage": values, "extra": extra or {}}, sort_keys=True, default=str)


def train_stage(name: str, model: nn.Module, config: StageConfig, train_step: TrainStep, validate: Validate,
                *, seed: int, checkpoint_path: Path | None = None, log: JsonLinesLog | None = None,
                progress: ProgressCallback | None = None, cancel=None,
                parameters: list[nn.Parameter] | None = None, fingerprint_extra: dict | None = None
                ) -> StageResult:
    """Train ``model`` in place and leave it holding its best (lowest validation loss) weights.

    ``train_step(model, rng)`` returns the loss of one sampled batch (the loop does backward and the
    optimiser step); ``validate(model)`` returns the validation loss (called in eval mode, no grad).
    ``parameters``: what to optimise (default: all of ``model``). A checkpoint at
    ``checkpoint_path`` is resumed; a finished one just restores the best weights.
    """
    log = log or JsonLinesLog(None)
    report = progress or no_progress
    is_cancelled = as_cancel_check(cancel)
    fingerprint = _fingerprint(config, fingerprint_extra)
    optimiser = torch.optim.Adam(parameters if parameters is not None else model.parameters(),
                                 lr=config.lr, eps=config.adam_eps)
    result = StageResult(name)
    best_state = copy_state(model)
    bad_epochs, start_epoch, elapsed_before = 0, 0, 0.0

    saved = load_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    if saved is not None:
        if saved.get("fingerprint") != fingerprint:
            raise InputError(f"the {name} checkpoint {checkpoint_path} was made with different settings; "
                             "start again without --resume or use the same options")
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as error:    # another architecture (e.g. inputs with or without vessel_context)
            raise InputError(f"the {name} checkpoint {checkpoint_path} holds another network than this run "
                             "trains; start again without --resume or use the same options") from error
        optimiser.load_state_dict(saved["optimizer"])
        best_state = saved["best_state"]
        result = StageResult(name, saved["epoch"], saved["steps"], float(saved["best"]), saved["best_epoch"],
                             saved["stopped"], float(saved["elapsed"]), list(saved["history"]))
        bad_epochs, start_epoch, elapsed_before = saved["bad_epochs"], saved["epoch"], float(saved["elapsed"])
        if saved.get("done"):
            model.load_state_dict(best_state)
            log("stage_skipped", stage=name, reason="already finished in the resumed run")
            report(1.0, f"{name}: already trained")
            return result
        log("stage_resumed", stage=name, epoch=start_epoch, steps=result.steps)

    planned = config.epochs * config.steps_per_epoch
    if config.max_steps is not None:
        planned = min(planned, config.max_steps)
    started = time.perf_counter()
    stopped = "epochs"

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    def out_of_budget() -> str | None:
        if config.max_steps is not None and result.steps >= config.max_steps:
            return "max_steps"
        if config.max_minutes is not None and elapsed() >= 60.0 * config.max_minutes:
            return "max_minutes"
        return None

    log("stage_start", stage=name, config=asdict(config), start_epoch=start_epoch)
    for epoch in range(start_epoch, config.epochs):
        budget = out_of_budget()
        if budget:
            stopped = budget
            break
        rate = learning_rate(config, epoch)
        for group in optimiser.param_groups:
            group["lr"] = rate
        rng = epoch_generator(seed, name, epoch)
        torch.manual_seed(int(rng.integers(2 ** 62)))  # dropout masks of this epoch
        model.train()
        losses = []
        for _ in range(config.steps_per_epoch):
            if is_cancelled():
                log("cancelled", stage=name, epoch=epoch, steps=result.steps)
                raise CancelledError(f"training cancelled during {name}")
            loss = train_step(model, rng)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            result.steps += 1
            fraction = result.steps / max(planned, 1)
            if config.max_minutes:
                fraction = max(fraction, elapsed() / (60.0 * config.max_minutes))
            report(min(fraction, 0.999), f"{name}: epoch {epoch + 1}, step {result.steps}, "
                                         f"loss {losses[-1]:.4f}")
            if out_of_budget():
                break
        model.eval()
        with torch.no_grad():
            validation = float(validate(model))
        improved = validation < result.best_validation
        if improved:
            result.best_validation, result.best_epoch = validation, epoch
            best_state = copy_state(model)
            bad_epochs = 0
        else:
            bad_epochs += 1
        result.epochs = epoch + 1
        record = {"epoch": epoch, "steps": result.steps, "lr": rate,
                  "train_loss": float(np.mean(losses)) if losses else None, "validation_loss": validation,
                  "best": improved, "seconds": round(elapsed(), 2)}
        result.history.append(record)
        log("epoch", stage=name, **record)
        stop = out_of_budget() or ("patience" if bad_epochs >= config.patience else None)
        _save(checkpoint_path, model, optimiser, best_state, result, bad_epochs, elapsed(), fingerprint,
              done=False)
        if stop:
            stopped = stop
            break

    model.load_state_dict(best_state)
    result.stopped = stopped
    result.seconds = elapsed()
    _save(checkpoint_path, model, optimiser, best_state, result, bad_epochs, result.seconds, fingerprint,
          done=True)
    log("stage_done", stage=name, **result.summary())
    report(1.0, f"{name}: done ({result.steps} steps, best validation loss {result.best_validation:.4f})")
    return result


def _save(path: Path | None, model: nn.Module, optimiser: torch.optim.Optimizer, best_state: dict,
          result: StageResult, bad_epochs: int, elapsed: float, fingerprint: str, done: bool) -> None:
    if path is None:
        return
    save_checkpoint(path, {
        "fingerprint": fingerprint, "model": copy_state(model), "optimizer": optimiser.state_dict(),
        "best_state": best_state, "epoch": result.epochs, "steps": result.steps,
        "best": result.best_validation, "best_epoch": result.best_epoch, "bad_epochs": bad_epochs,
        "stopped": result.stopped, "elapsed": elapsed, "history": result.history, "done": done,
    })
