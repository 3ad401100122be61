"""Input checks that turn bad images, masks and modality names into one clear ``InputError``.

Every check runs before any heavy processing so that the user learns in a second, not after a minute of
computation, that they selected a label map, a 2D slice or a corrupted file.
"""

from __future__ import annotations

import numpy as np

from CMBDetectLib.errors import InputError
from CMBDetectLib.volume import Volume

MODALITIES = ("swi", "t2s", "qsm")

_MODALITY_ALIASES = {
    "swi": "swi",
    "susceptibility": "swi",
    "susceptibilityweighted": "swi",
    "t2s": "t2s",
    "t2*": "t2s",
    "t2star": "t2s",
    "t2*gre": "t2s",
    "t2sgre": "t2s",
    "t2stargre": "t2s",
    "gre": "t2s",
    "t2gre": "t2s",
    "gret2*": "t2s",
    "qsm": "qsm",
    "chi": "qsm",
    "susceptibilitymap": "qsm",
}

MIN_AXIS_VOXELS = 8
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0
MAX_LABEL_VALUES = 16


def normalise_modality(name: str) -> str:
    """Map a user-facing modality name ("SWI", "T2*", "t2s-gre", "QSM", ...) to "swi", "t2s" or "qsm"."""
    if not isinstance(name, str):
        raise InputError(f"modality must be a text such as 'swi', got {name!r}")
    key = "".join(ch for ch in name.strip().lower() if ch not in " -_.")
    if key in _MODALITY_ALIASES:
        return _MODALITY_ALIASES[key]
    raise InputError(f"unknown modality {name!r}; choose one of: swi, t2s (T2*-GRE), qsm")


def validate_image(volume: Volume) -> None:
    """Raise ``InputError`` if ``volume`` cannot be an SWI / T2*-GRE / QSM brain scan."""
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"the image has {array.ndim} dimension(s) {array.shape}; CMB detection needs a 3D "
                         "volume (it looks 2D or 4D)")
    if min(array.shape) < MIN_AXIS_VOXELS:
        raise InputError(f"the image grid {array.shape[::-1]} (i, j, k) has an axis with fewer than "
                         f"{MIN_AXIS_VOXELS} voxels; it looks 2D, select a 3D volume")
    if array.dtype.kind not in "iufb":
        raise InputError(f"the image has voxel type {array.dtype}; expected a scalar (grey-level) MRI volume")

    spacing = np.asarray(volume.spacing, dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)):
        raise InputError(f"the image spacing {tuple(volume.spacing)} is not a finite 3D spacing; "
                         "the file header is broken")
    if np.any(spacing <= MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        raise InputError(f"the image spacing {tuple(round(float(s), 4) for s in spacing)} mm is outside "
                         f"({MIN_SPACING_MM}, {MAX_SPACING_MM}] mm on some axis; the file header is probably "
                         "wrong (check the voxel size unit)")
    direction = np.asarray(volume.direction, dtype=float)
    if direction.size != 9 or not np.all(np.isfinite(direction)) or \
            abs(np.linalg.det(direction.reshape(3, 3))) < 1e-6:
        raise InputError("the image direction matrix is not a valid rotation; the file header is broken")

    if array.dtype.kind == "f":
        n_bad = int(np.count_nonzero(~np.isfinite(array)))
        if n_bad:
            raise InputError(f"the image contains {n_bad} NaN/Inf voxel(s) out of {array.size}; "
                             "the file is corrupted or was saved from a failed reconstruction")

    low, high = np.min(array), np.max(array)
    if low == high:
        what = "empty (all zero)" if high == 0 else f"constant (every voxel is {high})"
        raise InputError(f"the image is {what}; select the MRI volume")

    if array.dtype.kind in "iub":
        # Cheap check first: a label map has a small range; only then count the distinct values.
        if int(high) - int(low) < 4096:
            n_values = len(np.unique(array))
            if n_values <= MAX_LABEL_VALUES:
                raise InputError(f"the image has only {n_values} distinct integer values; it looks like a "
                                 "label map/segmentation, select the MRI volume")


def validate_mask(mask: Volume, image: Volume) -> np.ndarray:
    """Check that ``mask`` lies on the image grid and is not empty; return it as a bool array."""
    if not mask.same_grid(image):
        raise InputError(
            f"the brain mask grid (shape {mask.array.shape[::-1]}, spacing "
            f"{tuple(round(float(s), 4) for s in mask.spacing)} mm) differs from the image grid (shape "
            f"{image.array.shape[::-1]}, spacing {tuple(round(float(s), 4) for s in image.spacing)} mm, "
            "or a different origin/direction); resample the mask onto the image")
    array = np.asarray(mask.array)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InputError("the brain mask contains NaN/Inf voxels")
    boolean = array > 0 if array.dtype.kind != "b" else array.astype(bool)
    if not boolean.any():
        raise InputError("the brain mask is empty (no voxel > 0); select a mask that covers the brain")
    return boolean
