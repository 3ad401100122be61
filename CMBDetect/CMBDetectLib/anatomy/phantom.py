"""A head phantom built from the MNI tissue maps and placed in a scan by a known transform.

Used by the tests (does each CMB get the right region? how far off is the registration in mm?) and by
demos. The contrast mimics the susceptibility sequences, not the T1 template, so the registration is
tested across contrasts: T2*-GRE / SWI magnitude (CSF bright, grey > white, iron-rich deep grey dark,
a dark skull and a bright scalp) or QSM (brain only, deep grey bright, white slightly negative).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from CMBDetectLib.anatomy.atlas import Atlas, load_atlas
from CMBDetectLib.volume import Volume, volume_from_sitk


def known_transform(rotation_deg: tuple[float, float, float] = (8.0, -5.0, 6.0),
                    scale: tuple[float, float, float] = (1.08, 0.95, 1.02),
                    translation_mm: tuple[float, float, float] = (6.0, -9.0, 12.0)) -> sitk.AffineTransform:
    """An affine that maps scan physical (LPS) points to MNI physical points (rotation about MNI origin)."""
    rotation = sitk.Euler3DTransform((0.0, 0.0, 0.0), *[np.deg2rad(a) for a in rotation_deg])
    matrix = np.asarray(rotation.GetMatrix()).reshape(3, 3) @ np.diag(scale)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([float(v) for v in matrix.ravel()])
    affine.SetTranslation([float(t) for t in translation_mm])
    return affine


def _contrast(atlas: Atlas, modality: str) -> np.ndarray:
    gm = sitk.GetArrayFromImage(atlas.gm)
    wm = sitk.GetArrayFromImage(atlas.wm)
    labels = sitk.GetArrayFromImage(atlas.labels)
    brain = sitk.GetArrayFromImage(atlas.brain_mask) > 0
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    deep_grey = np.isin(labels, (10, 11)).astype(float) * gm
    spacing = atlas.labels.GetSpacing()[0]
    if modality == "qsm":
        image = 0.0 * csf + 0.02 * gm - 0.03 * wm + 0.12 * deep_grey
        return (image * brain).astype(np.float32)
    image = 0.95 * csf + 0.62 * gm + 0.45 * wm - 0.25 * deep_grey
    outside = ndimage.distance_transform_edt(~brain) * spacing
    image = np.where(brain, image, 0.0)
    image[(outside > 0) & (outside <= 3)] = 0.8      # CSF around the brain
    image[(outside > 3) & (outside <= 9)] = 0.05     # skull: dark in every susceptibility sequence
    image[(outside > 9) & (outside <= 15)] = 0.7     # scalp
    return image.astype(np.float32)


def make_head_phantom(transform: sitk.Transform | None = None, *, modality: str = "t2s",
                      spacing: tuple[float, float, float] = (0.9, 0.9, 3.0),
                      size: tuple[int, int, int] = (200, 240, 50), noise: float = 0.03,
                      seed: int = 0, atlas: Atlas | None = None) -> tuple[Volume, sitk.Transform]:
    """The phantom on a scan grid (``spacing``/``size`` in SimpleITK x, y, z order) and the true transform.

    The scan grid is centred on the point that maps to MNI (0, 0, 10) so the whole head is in view.
    """
    atlas = atlas or load_atlas()
    transform = transform or known_transform()
    mni = sitk.GetImageFromArray(_contrast(atlas, modality))
    mni.CopyInformation(atlas.labels)
    # Scan grid in LPS with identity direction, centred on the brain.
    centre_lps = np.asarray(transform.GetInverse().TransformPoint((0.0, 0.0, 10.0)))
    extent = np.asarray(size) * np.asarray(spacing)
    origin = centre_lps - extent / 2 + np.asarray(spacing) / 2
    reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetOrigin([float(o) for o in origin])
    # Thick slices average the anatomy across the slice: smooth along z before sampling.
    sigma_z = max(spacing[2] / 2.355, 0.01)
    smoothed = sitk.SmoothingRecursiveGaussian(mni, [0.5, 0.5, sigma_z])
    image = sitk.GetArrayFromImage(sitk.Resample(smoothed, reference, transform, sitk.sitkLinear, 0.0))
    rng = np.random.default_rng(seed)
    scale = float(np.abs(image).max()) or 1.0
    image = image + rng.normal(0.0, noise * scale, image.shape).astype(np.float32)
    if modality == "qsm":
        brain = sitk.GetArrayFromImage(sitk.Resample(atlas.brain_mask, reference, transform,
                                                     sitk.sitkNearestNeighbor, 0)) > 0
        image = np.where(brain, image, 0.0)
    else:
        image = np.abs(image)  # magnitude images are non-negative
    result = sitk.GetImageFromArray(image.astype(np.float32))
    result.CopyInformation(reference)
    return volume_from_sitk(result), transform
