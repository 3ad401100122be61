"""A tiny synthetic CMB dataset in the exported-dataset layout (ARCHITECTURE.md), for training tests.

Made with numpy + SimpleITK only so the training tests do not depend on the synthetic generator.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813 - the name every SimpleITK user knows

SPACING = (0.9, 0.9, 1.5)  # (x, y, z) mm: coarser than 0.8 mm, so the working grid is the input grid
SHAPE = (24, 48, 48)       # [k, j, i]


def _image(array: np.ndarray, origin: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(origin)
    return image


def _ras(image: sitk.Image, kji) -> list[float]:
    lps = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in kji[::-1]])
    return [-lps[0], -lps[1], lps[2]]


def make_case(rng: np.random.Generator, n_cmbs: int) -> tuple[np.ndarray, np.ndarray, list, list]:
    """SWI-like magnitude (CMBs dark), instance labels, CMB centres and mimic centres ``[k, j, i]``."""
    k, j, i = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]].astype(float)
    brain = ((k - 12) / 11) ** 2 + ((j - 24) / 21) ** 2 + ((i - 24) / 21) ** 2 < 1
    image = np.where(brain, 600.0 + 25.0 * rng.standard_normal(SHAPE), 40.0)
    instances = np.zeros(SHAPE, dtype=np.uint16)
    centres: list = []
    while len(centres) < n_cmbs:
        centre = np.array([rng.integers(8, 16), rng.integers(14, 34), rng.integers(14, 34)])
        if any(np.abs(centre - c).max() < 6 for c in centres):
            continue
        blob = ((k - centre[0]) / 1.2) ** 2 + ((j - centre[1]) / 1.8) ** 2 + ((i - centre[2]) / 1.8) ** 2 <= 1
        image[blob] = 120.0
        instances[blob] = len(centres) + 1
        centres.append(centre)
    mimics: list = []
    for _ in range(2):  # a faint, larger blob: a mimic, listed as a hard negative
        centre = np.array([rng.integers(8, 16), rng.integers(14, 34), rng.integers(14, 34)])
        if any(np.abs(centre - c).max() < 6 for c in centres + mimics):
            continue
        blob = ((k - centre[0]) / 2.0) ** 2 + ((j - centre[1]) / 3.0) ** 2 + ((i - centre[2]) / 3.0) ** 2 <= 1
        image[blob] = 420.0
        mimics.append(centre)
    return image.astype(np.float32), instances, centres, mimics


def write_dataset(root: Path, n_cases: int = 4, seed: int = 0, cmbs_per_case: int = 3, prefix: str = "case") -> Path:
    rng = np.random.default_rng(seed)
    for folder in ("imagesTr", "labelsTr", "cmbdetect/instances", "cmbdetect/reviews"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(n_cases):
        name = f"{prefix}{index:03d}"
        names.append(name)
        image, instances, centres, mimics = make_case(rng, cmbs_per_case)
        origin = (-20.0 + index, -20.0, -18.0)
        reference = _image(image, origin)
        sitk.WriteImage(reference, str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(_image((instances > 0).astype(np.uint8), origin),
                        str(root / "labelsTr" / f"{name}.nii.gz"))
        sitk.WriteImage(_image(instances, origin), str(root / "cmbdetect/instances" / f"{name}.nii.gz"))

        review = {"schema": "cmbdetect.review/1", "case": name, "modality": "swi",
                  "subject": f"subject{index}", "source": "test",
                  "cmbs": [{"id": n + 1, "decision": "synthetic", "centroid_ras": _ras(reference, c)}
                           for n, c in enumerate(centres)],
                  "hard_negatives": [{"id": 100 + n, "kind": "mimic", "centroid_ras": _ras(reference, c)}
                                     for n, c in enumerate(mimics)]}
        (root / "cmbdetect/reviews" / f"{name}.json").write_text(json.dumps(review))
    description = {"channel_names": {"0": "swi"}, "labels": {"background": 0, "cmb": 1},
                   "numTraining": n_cases, "file_ending": ".nii.gz",
                   "cmbdetect": {"modality": "swi", "cases": names}}
    (root / "dataset.json").write_text(json.dumps(description))
    return root
