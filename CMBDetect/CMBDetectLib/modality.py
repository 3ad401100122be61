"""Guess the modality of a scan from its name and intensities (the user can always override)."""

from __future__ import annotations

import re

import numpy as np

_NAME_PATTERNS = (
    ("qsm", re.compile(r"qsm|chi|suscept", re.IGNORECASE)),
    ("swi", re.compile(r"swi|swan|sw_", re.IGNORECASE)),
    ("t2s", re.compile(r"t2\*|t2s|t2star|gre|t2_?star|ffe|hemo", re.IGNORECASE)),
)


def guess_modality(name: str, array: np.ndarray | None = None) -> tuple[str, str]:
    """Return ``(modality, why)``.

    The name decides when it says so; otherwise the intensities: QSM maps are signed (susceptibility in ppm,
    roughly half the brain negative) while SWI / T2*-GRE magnitudes are non-negative.
    """
    for modality, pattern in _NAME_PATTERNS:
        if pattern.search(name or ""):
            return modality, f"from the name '{name}'"
    if array is not None:
        finite = array[np.isfinite(array)]
        nonzero = finite[finite != 0]
        if nonzero.size and float(np.mean(nonzero < 0)) > 0.2:
            return "qsm", "signed intensities (negative susceptibilities)"
    return "swi", "non-negative magnitude intensities (SWI and T2*-GRE are processed alike)"
