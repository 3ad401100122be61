"""What a training run was made from and on: digests of its data and a description of the machine.

A from-scratch ``make model`` on another machine can train different weights from the same seed: the same
data, but oneDNN / MKL pick other kernels on another CPU (AVX2 vs AVX-512, and MKL's code path by CPU model
unless its conditional numerical reproducibility, ``MKL_CBWR``, is set), so floating-point sums round
differently and training diverges. Even the generated images differ: numpy dispatches its vectorised math to the
best SIMD level the CPU has (``X86_V3`` = AVX2 or ``X86_V4`` = AVX-512), and the last bits of its results feed the
generator's nonlinear signal model (on one case, 54 % of the voxels differed between ``X86_V3`` and ``X86_V2``).
On one machine type a rerun is bit-identical. With these records in
``model.json`` a rerun can tell *where* it parted from the bundled model: the generated images, the labels, the
computed features, or only the training, and on which CPUs.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

#: Libraries whose numerics shape the data, the features or the training.
NUMERIC_PACKAGES = ("numpy", "scipy", "SimpleITK", "scikit-image", "monai", "torch")


#: CPU flags that decide which kernels oneDNN / MKL / torch run (a name like "AMD EPYC" does not).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile",
                "amx_bf16")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _cpu_name(info: dict[str, str]) -> str:
    return info.get("model name") or platform.processor() or platform.machine()


def _cpu_model(info: dict[str, str]) -> str | None:
    """``family/model/stepping``: two CPUs sold under one name can differ here (and in their kernels)."""
    if "cpu family" not in info:
        return None
    return "/".join(info.get(key, "?") for key in ("cpu family", "model", "stepping"))


def numpy_simd() -> list[str] | None:
    """The SIMD targets numpy dispatches to on this machine (after ``NPY_DISABLE_CPU_FEATURES``); None where this
    numpy does not say (its private module moved between 1.x and 2.x, and Slicer may ship either)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
        except ImportError:
            return None
    return [target for target in __cpu_dispatch__ if __cpu_features__.get(target)]


def machine_record() -> dict:
    """CPU (name, family/model/stepping, kernel-relevant flags), the SIMD level torch's kernels use on it, MKL's
    reproducibility setting, thread count and the numeric libraries' versions."""
    versions = {}
    for name in NUMERIC_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"cpu": _cpu_name(info), "cpu_model": _cpu_model(info),
            "cpu_flags": [flag for flag in KERNEL_FLAGS if flag in flags] if flags else None,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "numpy_simd": numpy_simd(),
            "mkl_cbwr": os.environ.get("MKL_CBWR"), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "packages": versions}


def _update_with_file(digest, path: Path, chunk: int = 1 << 20) -> None:
    """Feed a file's content to ``digest``, decompressed when gzipped (so the zlib version does not matter),
    in chunks rather than whole-file reads."""
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as stream:
        while block := stream.read(chunk):
            digest.update(block)


def data_digests(image_paths: Sequence[Path], cases: Sequence) -> dict[str, str]:
    """sha256 of the input images (files, in case order), of the labels and of the computed features.

    ``cases``: ``TrainingCase``-like objects with ``case``, ``labels``, ``instances`` and ``channels``.
    """
    images, labels, features = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for path in image_paths:
        _update_with_file(images, Path(path))
    for case in cases:
        for digest in (labels, features):
            digest.update(case.case.encode("utf-8"))
        labels.update(np.ascontiguousarray(case.labels).tobytes())
        labels.update(np.ascontiguousarray(case.instances).tobytes())
        features.update(np.ascontiguousarray(case.channels).tobytes())
    return {"images": images.hexdigest(), "labels": labels.hexdigest(), "features": features.hexdigest()}
