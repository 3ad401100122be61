"""Grow a CMB from one clicked voxel ("Add missed CMB"); pure numpy / scipy, no Slicer.

A microbleed is a small blob darker (SWI, T2*-GRE) or brighter (QSM) than the tissue around it. From the
click we snap to the most extreme voxel nearby, take the local background from a shell around it, and keep
the connected voxels more than half-way from background to the extreme. When there is no clear blob
(contrast too low) or growing leaks into a vessel (too many voxels), a small sphere at the click is used so
that the reviewer's decision is recorded anyway; they can refine the shape in the Segment Editor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from CMBDetectLib.errors import InputError


@dataclass
class GrownRegion:
    mask: np.ndarray                 # bool, cropped, [k, j, i]
    offset_kji: tuple[int, int, int]  # position of mask[0, 0, 0] on the full grid
    method: str                      # "region_growing" or "sphere"

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())


def grow_from_seed(array: np.ndarray, seed_kji, spacing_zyx, modality: str = "swi",
                   max_radius_mm: float = 5.0, snap_radius_mm: float = 1.5,
                   fallback_radius_mm: float = 1.5, min_contrast: float = 0.1) -> GrownRegion:
    """Region of a CMB around ``seed_kji`` (voxel index, ``[k, j, i]``) of ``array``."""
    shape = np.asarray(array.shape)
    seed = np.round(np.asarray(seed_kji, dtype=float)).astype(int)
    if np.any(seed < 0) or np.any(seed >= shape):
        raise InputError("the clicked point is outside the image; click inside the brain")
    spacing = np.asarray(spacing_zyx, dtype=float)
    radius_vox = np.maximum(np.ceil(max_radius_mm / spacing).astype(int), 1)
    low = np.maximum(seed - radius_vox, 0)
    high = np.minimum(seed + radius_vox + 1, shape)
    window = np.asarray(array[low[0]:high[0], low[1]:high[1], low[2]:high[2]], dtype=np.float64)
    if modality != "qsm":
        window = -window          # CMBs are dark on SWI / T2*-GRE: make them bright
    grid = np.meshgrid(*[(np.arange(lo, hi) - s) * sp for lo, hi, s, sp in zip(low, high, seed, spacing)],
                       indexing="ij")
    distance = np.sqrt(sum(g * g for g in grid))
    local_seed = tuple(seed - low)

    near = distance <= max(snap_radius_mm, float(spacing.min()))
    peak_index = np.unravel_index(np.argmax(np.where(near, window, -np.inf)), window.shape)
    peak = window[peak_index]
    shell = (distance > 0.6 * max_radius_mm) & (distance <= max_radius_mm)
    background = float(np.median(window[shell])) if shell.any() else float(np.median(window))
    spread = float(np.subtract(*np.percentile(window, [95, 5]))) or 1.0
    if (peak - background) / spread >= min_contrast:
        threshold = background + 0.5 * (peak - background)
        components, _ = ndimage.label((window >= threshold) & (distance <= max_radius_mm),
                                      structure=np.ones((3, 3, 3), bool))
        mask = components == components[peak_index]
        # A region touching the search sphere's border is a vessel or sulcus, not a round microbleed.
        limit = np.pi * 4.0 / 3.0 * (0.8 * max_radius_mm) ** 3 / float(np.prod(spacing))
        touches_border = (mask & shell & (distance > 0.95 * max_radius_mm)).any()
        if mask.any() and mask.sum() <= limit and not touches_border:
            return _cropped(mask, low, "region_growing")
    sphere = distance <= max(fallback_radius_mm, 0.5 * float(spacing.max()))
    sphere[local_seed] = True
    return _cropped(sphere, low, "sphere")


def _cropped(mask: np.ndarray, low: np.ndarray, method: str) -> GrownRegion:
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    offset = tuple(int(lo + s.start) for lo, s in zip(low, box))
    return GrownRegion(mask[box].copy(), offset, method)  # type: ignore[arg-type]
