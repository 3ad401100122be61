"""The one feature pipeline shared by inference, training and checks [paper 2.1, 2.1.1, 2.2].

``compute_features`` turns an input volume into the network input on the working grid:
validate -> reorient to LPS + resample (``ScanGrid``) -> brain mask (given or estimated) -> crop to the
brain -> N4 (SWI / T2*-GRE only) -> normalise (+ invert SWI / T2*) -> vessel suppression -> FRST.

The channels are always in the order of ``CHANNELS``; a network reads the leading ``in_channels`` of them
(``networks.blocks.ShallowEncoder``). With ``vessel_context`` a third channel holds the normalised image
*before* vessel suppression: stage 1 still sees only the suppressed image and FRST (the paper's input),
while the discrimination networks can also see the veins that were inpainted around a candidate. Without
it, a vein bend or junction that survives suppression as a round remnant looks like a CMB on its own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk  # noqa: N813  (the universal SimpleITK alias)

from CMBDetectLib.errors import InputError
from CMBDetectLib.frst import frst_3d
from CMBDetectLib.preprocessing import (
    QSM_SCALINGS,
    ScanGrid,
    brain_mask_method,
    brain_mask_setting,
    estimate_brain_mask,
    n4_bias_correct,
    normalise_intensity,
)
from CMBDetectLib.progress import ProgressCallback, no_progress
from CMBDetectLib.validation import normalise_modality, validate_image, validate_mask
from CMBDetectLib.vessel_suppression import suppress_vessels
from CMBDetectLib.volume import Volume, volume_to_sitk

#: brain bounding box margin kept around the mask when cropping (mm)
CROP_MARGIN_MM = 6.0
FRST_RADII = (2, 3, 4, 6)
#: ``qsm_scaling`` of packages whose model.json does not record it (up to 1.4.0)
LEGACY_QSM_SCALING = "clip"
#: ``brain_mask`` of packages whose model.json does not record it (the bundled 1.4.0 and 1.5.0)
LEGACY_BRAIN_MASK = "otsu"
#: ``vessel_context`` of packages whose model.json does not record it (up to 1.5.0: two channels)
LEGACY_VESSEL_CONTEXT = False
#: the feature channels, in order (the third only with ``vessel_context``)
CHANNELS = ("intensity", "frst", "intensity_before_vessel_suppression")
#: the channels stage 1 is trained on (and the discrimination networks without ``vessel_context``)
BASE_CHANNELS = 2


@dataclass
class ScanFeatures:
    """Network input and geometry of one scan, all on the (cropped) working grid."""

    channels: np.ndarray          # float32 [C, K, J, I] in the order of CHANNELS: 0 = intensity (CMB bright,
    #                               vessels suppressed), 1 = FRST, 2 (vessel_context) = intensity with vessels
    brain_mask: np.ndarray        # bool [K, J, I]
    vessel_mask: np.ndarray       # bool [K, J, I]
    spacing_zyx: tuple[float, float, float]
    grid: ScanGrid
    modality: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def intensity(self) -> np.ndarray:
        return self.channels[0]

    @property
    def frst(self) -> np.ndarray:
        return self.channels[1]


def _crop_box(mask: np.ndarray, spacing_zyx, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    coords = np.nonzero(mask.any(axis=(1, 2))), np.nonzero(mask.any(axis=(0, 2))), \
        np.nonzero(mask.any(axis=(0, 1)))
    start = np.array([c[0][0] for c in coords])
    stop = np.array([c[0][-1] + 1 for c in coords])
    margin = np.ceil(margin_mm / np.asarray(spacing_zyx)).astype(int)
    shape = np.array(mask.shape)
    return np.maximum(start - margin, 0), np.minimum(stop + margin, shape)


def feature_settings(preprocessing: dict) -> dict:
    """``compute_features`` keyword arguments from a model's ``preprocessing`` record (model.json).

    A key a package does not record takes the value the packages of its time were trained with.
    """
    max_spacing = preprocessing.get("max_spacing_mm")
    return {"working_spacing_mm": float(preprocessing.get("working_spacing_mm", 0.8)),
            "max_spacing_mm": None if max_spacing is None else float(max_spacing),
            "vessel_suppression": bool(preprocessing.get("vessel_suppression", True)),
            "qsm_scaling": str(preprocessing.get("qsm_scaling", LEGACY_QSM_SCALING)),
            "brain_mask": brain_mask_setting(preprocessing.get("brain_mask", LEGACY_BRAIN_MASK)),
            "vessel_context": bool(preprocessing.get("vessel_context", LEGACY_VESSEL_CONTEXT))}


def discriminator_channels(vessel_context: bool) -> int:
    """Input channels of the teacher and the student for a ``vessel_context`` setting."""
    return BASE_CHANNELS + 1 if vessel_context else BASE_CHANNELS


def compute_features(volume: Volume, modality: str, mask: Volume | None = None,
                     working_spacing_mm: float = 0.8, vessel_suppression: bool = True,
                     progress: ProgressCallback | None = None, crop: bool = True,
                     qsm_scaling: str = "compress", brain_mask: str | Mapping[str, str] = "otsu",
                     vessel_context: bool = False, max_spacing_mm: float | None = None) -> ScanFeatures:
    """Preprocess ``volume`` into the network input (see module docstring).

    ``mask``: an optional brain mask on the image grid (non-zero = brain); estimated when ``None``.
    ``crop``: restrict the working grid to the brain bounding box (+6 mm); ``grid`` maps back either way.
    ``brain_mask``: how the mask is estimated when none is given (``preprocessing.BRAIN_MASK_METHODS``), one
    method or one per modality (``preprocessing.brain_mask_method``).
    ``vessel_context``: add the image before vessel suppression as a third channel (needs suppression).
    ``max_spacing_mm``: interpolate thick slices to this spacing (``None``: keep them native).
    """
    report = progress or no_progress
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    report(0.0, "Checking the image")
    if qsm_scaling not in QSM_SCALINGS:
        raise ValueError(f"qsm_scaling must be one of {QSM_SCALINGS}, not {qsm_scaling!r}")
    if vessel_context and not vessel_suppression:
        raise ValueError("vessel_context adds the image before vessel suppression: it needs vessel_suppression")
    modality = normalise_modality(modality)
    mask_method = brain_mask_method(brain_mask, modality)
    validate_image(volume)
    mask_bool = validate_mask(mask, volume) if mask is not None else None
    image = volume_to_sitk(volume.with_array(np.asarray(volume.array, dtype=np.float32)))
    grid = ScanGrid.from_image(image, working_spacing_mm, max_spacing_mm)
    lap("validate")

    report(0.05, "Resampling to the working grid")
    array = grid.to_working(image, sitk.sitkLinear).astype(np.float32, copy=False)
    spacing = grid.working_spacing_zyx
    if mask_bool is not None:
        mask_image = volume_to_sitk(volume.with_array(mask_bool.astype(np.uint8)))
        brain = grid.to_working(mask_image, sitk.sitkNearestNeighbor) > 0
        if not brain.any():
            raise InputError("the brain mask is empty after resampling to the working grid")
    else:
        lap("resample")
        report(0.15, "Estimating the brain mask")
        brain = estimate_brain_mask(array, spacing, method=mask_method)
    lap("brain_mask" if mask_bool is None else "resample")

    if crop:
        start, stop = _crop_box(brain, spacing, CROP_MARGIN_MM)
        grid = grid.cropped(start, stop)
        box = tuple(slice(a, b) for a, b in zip(start, stop))
        array = np.ascontiguousarray(array[box])
        brain = np.ascontiguousarray(brain[box])
        lap("crop")

    if modality in ("swi", "t2s"):
        report(0.25, "Correcting the bias field (N4)")
        array = n4_bias_correct(array, brain, spacing)
        lap("n4")

    report(0.4, "Normalising intensities")
    intensity = normalise_intensity(array, brain, modality, qsm_scaling=qsm_scaling)
    del array
    lap("normalise")

    before_suppression = intensity if vessel_context else None
    if vessel_suppression:
        report(0.45, "Suppressing vessels")
        suppressed = suppress_vessels(intensity, brain, spacing)
        intensity, vessels = suppressed.image, suppressed.vessel_mask
        timings.update({f"vessels.{k}": v for k, v in suppressed.timings.items()})
        lap("vessel_suppression")
    else:
        vessels = np.zeros(brain.shape, dtype=bool)

    report(0.8, "Radial symmetry transform (FRST)")
    frst = frst_3d(intensity, spacing, radii=FRST_RADII, polarity="bright", mask=brain)
    frst[~brain] = 0.0
    lap("frst")

    planes = [intensity, frst] if before_suppression is None else [intensity, frst, before_suppression]
    channels = np.stack(planes).astype(np.float32, copy=False)
    timings["total"] = sum(v for k, v in timings.items() if "." not in k)
    report(1.0, "Features ready")
    return ScanFeatures(channels, brain, vessels, spacing, grid, modality, timings)
