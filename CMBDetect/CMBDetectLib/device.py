"""Compute device choice (CUDA, then Apple MPS, then CPU) and graceful GPU out-of-memory handling."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from CMBDetectLib.errors import InputError

T = TypeVar("T")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(preference: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA if present, else MPS, else CPU. An explicit device that is not available
    raises ``InputError`` rather than silently running somewhere else."""
    if isinstance(preference, torch.device):
        preference = str(preference)
    name = (preference or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":", 1)[0]
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device 'cuda' was requested but no CUDA GPU is available to this torch build "
                             f"(torch {torch.__version__}); use --device auto or cpu")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} does not exist; this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        return device
    if kind == "mps":
        if not _mps_available():
            raise InputError("device 'mps' was requested but Apple Metal (MPS) is not available; "
                             "use --device auto or cpu")
        return torch.device("mps")
    raise InputError(f"unknown device {preference!r}; choose one of {', '.join(DEVICE_CHOICES)}")


def describe_device(device: torch.device | str) -> str:
    """A short human-readable description, e.g. ``"CUDA GPU 0: NVIDIA H200 (139 GiB)"``."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        return f"CUDA GPU {index}: {properties.name} ({properties.total_memory / 2 ** 30:.0f} GiB)"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({torch.get_num_threads()} threads) - slower than a GPU"


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/MPS allocation failures (MPS reports them as a RuntimeError message)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _free_cached_memory(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and _mps_available():
        torch.mps.empty_cache()


def run_with_oom_fallback(fn: Callable[[int, torch.device], T], batch_size: int,
                          device: torch.device | str,
                          log: Callable[[str], None] | None = None) -> T:
    """Call ``fn(batch_size, device)``; on out-of-memory halve the batch and retry, and when even a
    batch of one does not fit on the GPU, run on the CPU. Every fallback is reported through ``log``
    so the user knows why it is slower. Errors that are not out-of-memory propagate unchanged."""
    log = log or (lambda message: None)
    device = torch.device(device)
    batch_size = original_batch_size = max(1, int(batch_size))
    while True:
        try:
            return fn(batch_size, device)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error) or device.type == "cpu":
                raise
            del error  # drop the traceback, which pins the tensors that did not fit
            _free_cached_memory(device)
            if batch_size > 1:
                batch_size //= 2
                log(f"out of GPU memory on {device}; retrying with batch size {batch_size}")
            else:
                log(f"out of GPU memory on {device} even with batch size 1; falling back to the CPU "
                    "(slower)")
                device = torch.device("cpu")
                batch_size = original_batch_size  # host memory is not the limit the GPU was
