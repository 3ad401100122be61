"""What a training run was made from and on: digests of its data and a description of the machine.

A from-scratch ``make model`` on another machine can train different weights from the same seed: the same
data, but oneDNN / MKL pick other kernels on another CPU (AVX2 vs AVX-512), so floating-point sums round
differently and training diverges. With these records in ``model.json`` a rerun can tell *where* it parted
from the bundled model: the generated images, the labels, the computed features, or only the training.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

#: Libraries whose numerics shape the data, the features or the training.
NUMERIC_PACKAGES = ("numpy", "scipy", "SimpleITK", "scikit-image", "monai", "torch")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_record() -> dict:
    """CPU, the SIMD level torch's kernels use on it, thread count and the numeric libraries' versions."""
    versions = {}
    for name in NUMERIC_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "platform": platform.platform(), "packages": versions}


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
