"""Data digests and the machine record written into model.json by training (training/provenance.py)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from CMBDetectLib.training.provenance import KERNEL_FLAGS, data_digests, machine_record, numpy_simd


@dataclass
class _Case:
    case: str
    labels: np.ndarray
    instances: np.ndarray
    channels: np.ndarray


def _cases() -> list[_Case]:
    rng = np.random.default_rng(0)
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 2, 3] = 1
    return [_Case(f"case_{i}", labels.copy(), labels.astype(np.int32), rng.random((2, 4, 5, 6)).astype(np.float16))
            for i in range(2)]


def _image(path: Path, payload: bytes, level: int) -> Path:
    with gzip.open(path, "wb", compresslevel=level) as stream:
        stream.write(payload)
    return path


def test_digests_are_stable_and_see_each_kind_of_change(tmp_path: Path) -> None:
    images = [_image(tmp_path / "a.nii.gz", b"image a", 9), _image(tmp_path / "b.nii.gz", b"image b", 9)]
    cases = _cases()
    first = data_digests(images, cases)
    assert first == data_digests(images, _cases())

    moved = _cases()
    moved[1].labels[1, 2, 3], moved[1].labels[0, 0, 0] = 0, 1
    changed = data_digests(images, moved)
    assert changed["labels"] != first["labels"]
    assert changed["images"] == first["images"] and changed["features"] == first["features"]

    rounded = _cases()
    rounded[0] = replace(rounded[0], channels=rounded[0].channels + np.float16(0.001))
    assert data_digests(images, rounded)["features"] != first["features"]

    _image(images[1], b"image B", 9)
    assert data_digests(images, cases)["images"] != first["images"]


def test_the_image_digest_does_not_depend_on_the_compression(tmp_path: Path) -> None:
    fast = _image(tmp_path / "fast.nii.gz", b"same voxels" * 1000, 1)
    small = _image(tmp_path / "small.nii.gz", b"same voxels" * 1000, 9)
    assert fast.read_bytes() != small.read_bytes()
    assert data_digests([fast], [])["images"] == data_digests([small], [])["images"]


def test_machine_record_names_the_cpu_and_the_numeric_libraries() -> None:
    record = machine_record()
    assert record["cpu"] and record["threads"] >= 1 and record["cpu_capability"]
    assert record["packages"]["numpy"] == np.__version__
    assert set(record["packages"]) >= {"numpy", "scipy", "SimpleITK", "torch"}
    if Path("/proc/cpuinfo").is_file():   # Linux: which CPU model and which kernel-choosing flags
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        if "cpu family" in cpuinfo:
            family, model, stepping = record["cpu_model"].split("/")
            assert family.isdigit() and model.isdigit()
        lines = [line for line in cpuinfo.splitlines() if line.startswith("flags")]
        if lines:
            flags = set(lines[0].split(":", 1)[1].split())
            assert record["cpu_flags"] == [flag for flag in KERNEL_FLAGS if flag in flags]


def test_machine_record_names_the_simd_level_numpy_dispatches_to() -> None:
    """It shapes the generated images, so a rerun elsewhere must be able to tell it; a subprocess with the top
    level switched off (as on a CPU without it) records one level less."""
    found = numpy_simd()
    assert machine_record()["numpy_simd"] == found
    if not found:
        pytest.skip("numpy dispatches to no SIMD target above its baseline on this CPU")
    code = "from CMBDetectLib.training.provenance import numpy_simd; print(','.join(numpy_simd()))"
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": found[-1],
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "CMBDetect")}
    lower = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert [target for target in lower.stdout.strip().split(",") if target] == found[:-1]
