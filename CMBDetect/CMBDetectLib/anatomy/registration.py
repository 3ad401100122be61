"""Register the MNI template (``atlas.py``) to a scan, and refuse a registration that is not credible.

Contrast robustness: SWI, T2*-GRE and QSM look nothing like the T1 template (grey/white contrast is
inverted or absent, veins are dark, QSM is signed), so the registration is driven first by the *shape*
of the brain (template brain mask vs. the scan's brain mask: mean squares on smoothed masks, which has
no contrast at all), then refined on intensities with Mattes mutual information, which only assumes a
statistical relation between the two contrasts. Everything runs on a ~3 mm isotropic copy of the scan,
which suits 3-5 mm slices and keeps it to seconds on a laptop CPU.

Quality is measured, not assumed, and a poor result raises ``InputError``:
* ``dice``: overlap of the warped template brain mask with the scan's brain mask (inside the scan's field
  of view) -- catches gross failures and images that are not a head;
* ``structure``: correlation ratio (eta squared) of the scan intensity explained by the warped template
  tissue classes (CSF, cortex, white matter, deep grey matter, posterior fossa). It is contrast-agnostic
  (any ordering of the class means scores the same) and is ~0 when no brain anatomy lines up, e.g. a
  water phantom or an ellipsoid with noise whose outline might still overlap a brain mask.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from CMBDetectLib.anatomy.atlas import Atlas, load_atlas
from CMBDetectLib.errors import InputError
from CMBDetectLib.progress import ProgressCallback, no_progress
from CMBDetectLib.volume import Volume, volume_from_sitk, volume_to_sitk

MIN_DICE = 0.80
MIN_STRUCTURE = 0.10

_FLIP_LPS_RAS = np.array([-1.0, -1.0, 1.0])


@dataclass
class RegistrationResult:
    """An affine map between a scan and MNI space, with its measured quality."""

    transform: sitk.Transform     # maps scan physical (LPS) points to template physical (LPS) points
    dice: float
    structure: float
    atlas: Atlas
    seconds: float
    scan_mask: Volume | None = None      # the scan brain mask used (registration grid)
    details: dict = field(default_factory=dict)

    @property
    def quality(self) -> dict:
        return {"dice": round(self.dice, 3), "structure": round(self.structure, 3),
                "min_dice": MIN_DICE, "min_structure": MIN_STRUCTURE, "seconds": round(self.seconds, 2),
                **self.details}

    def scan_to_mni(self, points_ras: np.ndarray) -> np.ndarray:
        """Scan RAS millimetres (N x 3) -> MNI RAS millimetres (N x 3)."""
        points = np.atleast_2d(np.asarray(points_ras, dtype=float)) * _FLIP_LPS_RAS
        mapped = [self.transform.TransformPoint([float(v) for v in p]) for p in points]
        return np.asarray(mapped, dtype=float).reshape(-1, 3) * _FLIP_LPS_RAS

    def mni_to_scan(self, points_ras: np.ndarray) -> np.ndarray:
        """MNI RAS millimetres (N x 3) -> scan RAS millimetres (N x 3) (the inverse affine)."""
        inverse = self.transform.GetInverse()
        points = np.atleast_2d(np.asarray(points_ras, dtype=float)) * _FLIP_LPS_RAS
        mapped = [inverse.TransformPoint([float(v) for v in p]) for p in points]
        return np.asarray(mapped, dtype=float).reshape(-1, 3) * _FLIP_LPS_RAS

    def warp_to_scan(self, reference: Volume, what: str = "labels") -> Volume:
        """An atlas image (``labels``, ``brain_mask``, ``template``, ``gm``, ``wm``) on the scan grid."""
        image = getattr(self.atlas, what)
        interpolator = sitk.sitkNearestNeighbor if what in ("labels", "brain_mask") else sitk.sitkLinear
        reference_image = volume_to_sitk(Volume(np.zeros(reference.array.shape, np.uint8), reference.spacing,
                                                reference.origin, reference.direction))
        warped = sitk.Resample(image, reference_image, self.transform, interpolator, 0.0, image.GetPixelID())
        return volume_from_sitk(warped)


def _registration_grid(scan: sitk.Image, spacing_mm: float) -> sitk.Image:
    """The scan smoothed and resampled to an isotropic grid of ``spacing_mm`` (same orientation)."""
    spacing = np.asarray(scan.GetSpacing(), dtype=float)
    # Smooth only the axes finer than the target, so thick slices are not blurred further.
    # (The recursive filter needs sigma > 0 on every axis: a tenth of a voxel changes nothing.)
    sigma = [max(float(np.sqrt(max(spacing_mm ** 2 - s ** 2, 0.0)) / 2.355), 0.1 * s) for s in spacing]
    smoothed = sitk.SmoothingRecursiveGaussian(scan, sigma)
    size = [max(int(np.ceil(n * s / spacing_mm)), 8) for n, s in zip(scan.GetSize(), spacing)]
    return sitk.Resample(smoothed, size, sitk.Transform(), sitk.sitkLinear, scan.GetOrigin(),
                         [spacing_mm] * 3, scan.GetDirection(), 0.0, sitk.sitkFloat32)


def _scan_brain_mask(grid: sitk.Image, mask: Volume | None, scan: sitk.Image) -> np.ndarray:
    if mask is not None:
        mask_image = volume_to_sitk(mask.with_array((np.asarray(mask.array) > 0).astype(np.uint8))
                                    if mask.array.shape == tuple(scan.GetSize()[::-1]) else mask)
        mask_image = sitk.Cast(mask_image > 0, sitk.sitkUInt8)
        resampled = sitk.Resample(mask_image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        array = sitk.GetArrayFromImage(resampled) > 0
        if not array.any():
            raise InputError("the brain mask does not overlap the image")
        return array
    from CMBDetectLib.preprocessing import estimate_brain_mask

    # Resample without smoothing: a skull-stripped image (QSM) keeps its exact zeros outside the brain,
    # which is what the mask estimator recognises.
    array = sitk.GetArrayFromImage(sitk.Resample(scan, grid, sitk.Transform(), sitk.sitkLinear, 0.0))
    spacing = grid.GetSpacing()
    # The registration's quality thresholds (structure, Dice) were set with the "otsu" mask; "otsu-closed"
    # (which keeps dark lesions at the brain surface) lowers the structure score of noisy thick-slice scans
    # towards the refusal threshold, and the atlas fit does not need those lesions.
    return estimate_brain_mask(array, (spacing[2], spacing[1], spacing[0]), method="otsu")


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.CopyInformation(reference)
    return image


def _run(method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image,
         transform: sitk.Transform) -> sitk.Transform:
    method.SetInitialTransform(transform, inPlace=False)
    return method.Execute(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32))


def _shape_stage(fixed_mask: sitk.Image, moving_mask: sitk.Image, initial: sitk.Transform,
                 iterations: int) -> sitk.Transform:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMeanSquares()
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(0.5, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3,
                                                    numberOfIterations=iterations,
                                                    gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return _run(method, fixed_mask, moving_mask, initial)


def _intensity_stage(fixed: sitk.Image, fixed_region: sitk.Image, moving: sitk.Image,
                     initial: sitk.Transform, iterations: int) -> sitk.Transform:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=24)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.5, seed=1)
    method.SetMetricFixedMask(fixed_region)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=0.5, minStep=1e-3,
                                                    numberOfIterations=iterations,
                                                    gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return _run(method, fixed, moving, initial)


def _tissue_classes(atlas: Atlas) -> sitk.Image:
    """0 outside, 1 CSF, 2 cortical grey, 3 white matter, 4 deep grey, 5 posterior fossa (template grid)."""
    gm = sitk.GetArrayFromImage(atlas.gm)
    wm = sitk.GetArrayFromImage(atlas.wm)
    labels = sitk.GetArrayFromImage(atlas.labels)
    brain = sitk.GetArrayFromImage(atlas.brain_mask) > 0
    classes = np.where(gm >= wm, 2, 3).astype(np.uint8)
    classes[gm + wm < 0.5] = 1
    classes[np.isin(labels, (10, 11)) & (gm >= wm)] = 4
    classes[np.isin(labels, (16, 17))] = 5
    classes[~brain] = 0
    image = sitk.GetImageFromArray(classes)
    image.CopyInformation(atlas.labels)
    return image


def _high_pass(values: np.ndarray, mask: np.ndarray, spacing_mm: float, sigma_mm: float = 8.0) -> np.ndarray:
    """Remove smooth intensity trends (bias field, coil shading) inside the mask.

    A smooth trend can correlate with the tissue layout by chance (a radial shading in an ellipsoid looks
    like 'darker centre, brighter rim'); anatomy has edges at the 3-10 mm scale, so subtracting a local
    mean (normalised convolution inside the mask) keeps the anatomy and drops the trend.
    """
    sigma = sigma_mm / spacing_mm
    weight = ndimage.gaussian_filter(mask.astype(float), sigma)
    local_mean = ndimage.gaussian_filter(np.where(mask, values, 0.0), sigma) / np.maximum(weight, 1e-3)
    return values - local_mean


def _quality(transform: sitk.Transform, grid: sitk.Image, scan_mask: np.ndarray, atlas: Atlas,
             classes: sitk.Image) -> tuple[float, float]:
    warped_mask = sitk.GetArrayFromImage(sitk.Resample(atlas.brain_mask, grid, transform,
                                                       sitk.sitkNearestNeighbor, 0)) > 0
    total = warped_mask.sum() + scan_mask.sum()
    dice = float(2.0 * (warped_mask & scan_mask).sum() / total) if total else 0.0
    warped_classes = sitk.GetArrayFromImage(sitk.Resample(classes, grid, transform,
                                                          sitk.sitkNearestNeighbor, 0))
    values = _high_pass(sitk.GetArrayFromImage(grid).astype(float), scan_mask, grid.GetSpacing()[0])
    inside = scan_mask & (warped_classes > 0)
    if inside.sum() < 100:
        return dice, 0.0
    x = values[inside]
    c = warped_classes[inside]
    # Rank-transform so one very bright vein or a QSM outlier cannot dominate the variance.
    x = np.argsort(np.argsort(x)).astype(float)
    total_variance = x.var() * x.size
    if total_variance <= 0:
        return dice, 0.0
    between = sum(x[c == k].size * (x[c == k].mean() - x.mean()) ** 2 for k in np.unique(c))
    return dice, float(between / total_variance)


def register_to_atlas(scan: Volume, mask: Volume | None = None, *, atlas: Atlas | None = None,
                      spacing_mm: float = 3.0, min_dice: float = MIN_DICE,
                      min_structure: float = MIN_STRUCTURE, iterations: int = 100,
                      progress: ProgressCallback | None = None) -> RegistrationResult:
    """Affine registration of the MNI template to ``scan``; raises ``InputError`` if quality is poor.

    ``mask`` (optional) is a brain mask on the scan grid (or any grid in the same physical space);
    without it a rough mask is estimated from the image. ``spacing_mm`` is the isotropic working grid.
    """
    progress = progress or no_progress
    started = time.perf_counter()
    atlas = atlas or load_atlas()
    progress(0.05, "preparing the scan for atlas registration")
    scan_image = sitk.Cast(volume_to_sitk(scan.with_array(np.nan_to_num(np.asarray(scan.array, np.float32)))),
                           sitk.sitkFloat32)
    grid = _registration_grid(scan_image, spacing_mm)
    scan_mask = ndimage.binary_fill_holes(_scan_brain_mask(grid, mask, scan_image))
    if scan_mask.sum() * spacing_mm ** 3 < 200_000:   # < 200 mL: not a whole brain (adult ~1100-1500 mL)
        covered = scan_mask.sum() * spacing_mm ** 3 / 1000
        raise InputError(f"atlas registration refused: the brain found in the image is only "
                         f"{covered:.0f} mL; the image does not look like a head scan "
                         "(or the brain mask is wrong)")

    # Normalise the scan inside the brain to [0, 1] (robust percentiles) for a stable MI histogram.
    values = sitk.GetArrayFromImage(grid)
    low, high = np.percentile(values[scan_mask], [1, 99])
    normalised = _like(np.clip((values - low) / max(high - low, 1e-6), 0, 1) * scan_mask, grid)
    fixed_mask = _like(scan_mask.astype(np.float32), grid)
    moving_mask = sitk.Cast(atlas.brain_mask, sitk.sitkFloat32)
    fixed_region = sitk.Cast(_like(ndimage.binary_dilation(scan_mask, iterations=1).astype(np.float32), grid),
                             sitk.sitkUInt8)

    # Initialise: centres of mass of the masks, and the isotropic scale from their volumes.
    similarity = sitk.Similarity3DTransform()
    initial = sitk.CenteredTransformInitializer(fixed_mask, moving_mask, similarity,
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    similarity = sitk.Similarity3DTransform(initial)
    template_volume = float(sitk.GetArrayFromImage(atlas.brain_mask).sum()
                            * np.prod(atlas.brain_mask.GetSpacing()))
    similarity.SetScale(float(np.cbrt(template_volume / (scan_mask.sum() * spacing_mm ** 3))))

    progress(0.2, "registering the brain outline to the template")
    similarity = _flatten(_shape_stage(fixed_mask, moving_mask, similarity, iterations))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    affine = _flatten(_shape_stage(fixed_mask, moving_mask, affine, iterations // 2))

    classes = _tissue_classes(atlas)
    candidates = {"shape": affine}
    progress(0.55, "refining the registration on image intensities (mutual information)")
    try:
        candidates["intensity"] = _flatten(_intensity_stage(normalised, fixed_region, atlas.template, affine,
                                                            iterations))
    except RuntimeError:
        pass  # e.g. too few samples in a tiny mask: keep the shape-only result, the quality check decides
    scores = {name: _quality(transform, normalised, scan_mask, atlas, classes)
              for name, transform in candidates.items()}
    # Prefer the intensity refinement unless it lost more brain overlap than it gained structure.
    best = max(scores, key=lambda name: scores[name][0] + scores[name][1])
    dice, structure = scores[best]
    seconds = time.perf_counter() - started
    progress(1.0, f"atlas registration: Dice {dice:.2f}, structure {structure:.2f}")
    result = RegistrationResult(
        transform=candidates[best], dice=dice, structure=structure, atlas=atlas, seconds=seconds,
        scan_mask=volume_from_sitk(_like(scan_mask.astype(np.uint8), grid)),
        details={"stage": best, "spacing_mm": spacing_mm,
                 "stages": {k: [round(v[0], 3), round(v[1], 3)] for k, v in scores.items()}})
    if dice < min_dice or structure < min_structure:
        raise InputError(
            f"atlas registration failed its quality check (brain overlap Dice {dice:.2f}, "
            f"needs >= {min_dice:.2f}; "
            f"anatomical structure {structure:.2f}, needs >= {min_structure:.2f}): the image may not be a "
            "brain scan, or the brain mask is wrong; supply a parcellation or a brain mask instead")
    return result


def _flatten(transform: sitk.Transform) -> sitk.Transform:
    """The registration method returns a composite of one transform; unwrap it to its concrete type."""
    if isinstance(transform, sitk.CompositeTransform) or transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() == 1:
            transform = composite.GetNthTransform(0)
    name = transform.GetName()
    if name == "Similarity3DTransform":
        return sitk.Similarity3DTransform(transform)
    if name == "AffineTransform":
        return sitk.AffineTransform(transform)
    return transform
