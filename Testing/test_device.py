"""Device selection and the GPU out-of-memory fallback."""

from __future__ import annotations

import pytest
import torch

from CMBDetectLib.device import describe_device, run_with_oom_fallback, select_device
from CMBDetectLib.errors import InputError


def test_cpu_is_always_available() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    assert "CPU" in describe_device("cpu")


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("CMBDetectLib.device._mps_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    monkeypatch.setattr("CMBDetectLib.device._mps_available", lambda: True)
    assert select_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")


def test_explicit_unavailable_device_is_a_clear_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("CMBDetectLib.device._mps_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA GPU"):
        select_device("cuda")
    with pytest.raises(InputError, match="MPS"):
        select_device("mps")
    with pytest.raises(InputError, match="unknown device"):
        select_device("tpu")


def test_oom_halves_the_batch_then_succeeds() -> None:
    calls: list[tuple[int, str]] = []
    messages: list[str] = []

    def work(batch_size: int, device: torch.device) -> str:
        calls.append((batch_size, device.type))
        if batch_size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return f"done with {batch_size}"

    assert run_with_oom_fallback(work, 8, torch.device("cuda"), messages.append) == "done with 2"
    assert calls == [(8, "cuda"), (4, "cuda"), (2, "cuda")]
    assert len(messages) == 2 and "batch size 4" in messages[0]


def test_oom_at_batch_one_falls_back_to_cpu_with_the_original_batch() -> None:
    calls: list[tuple[int, str]] = []
    messages: list[str] = []

    def work(batch_size: int, device: torch.device) -> str:
        calls.append((batch_size, device.type))
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return "cpu result"

    assert run_with_oom_fallback(work, 4, "cuda", messages.append) == "cpu result"
    assert calls == [(4, "cuda"), (2, "cuda"), (1, "cuda"), (4, "cpu")]
    assert "falling back to the CPU" in messages[-1]


def test_other_errors_and_cpu_oom_propagate() -> None:
    def broken(batch_size: int, device: torch.device) -> None:
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError):
        run_with_oom_fallback(broken, 8, "cuda")

    attempts: list[int] = []

    def cpu_oom(batch_size: int, device: torch.device) -> None:
        attempts.append(batch_size)
        raise torch.cuda.OutOfMemoryError("out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_with_oom_fallback(cpu_oom, 8, "cpu")
    assert attempts == [8]  # nothing to fall back to on the CPU
