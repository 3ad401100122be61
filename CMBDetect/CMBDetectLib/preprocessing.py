"""Preprocessing [paper 2.1]: working grid, brain mask, N4 bias correction, intensity normalisation.

``ScanGrid`` owns the geometry: the input grid (any orientation, spacing, oblique direction) and the working
grid (LPS-oriented; axes finer than the working spacing resampled to it, coarser axes kept native;
optionally cropped to the brain). Everything downstream works on working-grid arrays indexed ``[k, j, i]``;
results go back to the input grid through ``ScanGrid.labels_to_input``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk  # noqa: N813  (the universal SimpleITK alias)
from scipy import ndimage

from CMBDetectLib.errors import InputError
from CMBDetectLib.validation import MODALITIES
from CMBDetectLib.volume import Volume

#: an axis whose spacing is within this fraction of the working spacing is not resampled (avoids
#: interpolating a 0.78 mm scan onto 0.8 mm for no benefit)
_NATIVE_TOLERANCE = 0.03
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _geometry_of(image: sitk.Image) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    return (tuple(int(s) for s in image.GetSize()), np.array(image.GetSpacing(), dtype=float),
            np.array(image.GetOrigin(), dtype=float), direction)


def _reference_image(size_ijk, spacing, origin, direction, pixel=sitk.sitkUInt8) -> sitk.Image:
    reference = sitk.Image([int(s) for s in size_ijk], pixel)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetOrigin([float(o) for o in origin])
    reference.SetDirection([float(d) for d in np.asarray(direction).ravel()])
    return reference


@dataclass(frozen=True)
class ScanGrid:
    """Maps between an input image grid and the (LPS, resampled, cropped) working grid."""

    input_size: tuple[int, int, int]          # (i, j, k) as SimpleITK
    input_spacing: tuple[float, float, float]
    input_origin: tuple[float, float, float]
    input_direction: tuple[float, ...]
    oriented_size: tuple[int, int, int]       # the input after DICOMOrient("LPS"), before resampling
    full_size: tuple[int, int, int]           # working grid before cropping, (i, j, k)
    spacing: tuple[float, float, float]       # working spacing (i, j, k), mm
    full_origin: tuple[float, float, float]
    direction: tuple[float, ...]
    resampled: bool                           # False: working voxels are exactly the input voxels
    crop_start_kji: tuple[int, int, int] = (0, 0, 0)
    crop_stop_kji: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_image(cls, image: sitk.Image, working_spacing_mm: float = 0.8,
                   max_spacing_mm: float | None = None) -> ScanGrid:
        """``max_spacing_mm``: an axis coarser than this (thick slices) is interpolated by the smallest whole
        factor that brings it to or below it, keeping every native slice as a working slice (so candidates map
        back onto the acquired slices exactly); ``None`` keeps thick slices native."""
        if working_spacing_mm <= 0:
            raise InputError(f"the working spacing must be positive, got {working_spacing_mm}")
        if max_spacing_mm is not None and max_spacing_mm < working_spacing_mm:
            raise InputError(f"the largest working spacing ({max_spacing_mm} mm) must not be below the working "
                             f"spacing ({working_spacing_mm} mm)")
        size, spacing, origin, direction = _geometry_of(image)
        # DICOMOrient only permutes/flips axes (no interpolation); run it on a byte image with the same
        # geometry to learn the oriented grid without copying the voxels.
        oriented = sitk.DICOMOrient(_reference_image(size, spacing, origin, direction), "LPS")
        o_size, o_spacing, o_origin, o_direction = _geometry_of(oriented)
        fine = o_spacing < working_spacing_mm * (1.0 - _NATIVE_TOLERANCE)
        coarse = (np.zeros(3, dtype=bool) if max_spacing_mm is None
                  else o_spacing > max_spacing_mm * (1.0 + _NATIVE_TOLERANCE))
        needs = fine | coarse
        o_size_arr = np.array(o_size, dtype=float)
        w_spacing = np.where(fine, working_spacing_mm, o_spacing)
        w_size = np.where(fine, np.maximum(1, np.round(o_size_arr * o_spacing / working_spacing_mm)), o_size_arr)
        # Keep the field-of-view centre where it was.
        shift = (o_size_arr - 1) / 2 * o_spacing - (w_size - 1) / 2 * w_spacing
        if coarse.any():
            factor = np.ceil(o_spacing / (max_spacing_mm or 1.0) - _NATIVE_TOLERANCE)
            w_spacing = np.where(coarse, o_spacing / factor, w_spacing)
            # first and last working slices on the first and last native ones: no extrapolation
            w_size = np.where(coarse, factor * (o_size_arr - 1) + 1, w_size)
            shift = np.where(coarse, 0.0, shift)
        w_origin = o_origin + o_direction @ shift
        return cls(size, tuple(spacing), tuple(origin), tuple(direction.ravel()), o_size,
                   tuple(int(s) for s in w_size), tuple(float(s) for s in w_spacing),
                   tuple(float(o) for o in w_origin), tuple(o_direction.ravel()), bool(needs.any()))

    def cropped(self, start_kji, stop_kji) -> ScanGrid:
        """The same grid restricted to ``[start, stop)`` (indices relative to THIS grid's working array)."""
        start = np.asarray(start_kji, dtype=int) + np.asarray(self.crop_start_kji)
        stop = np.asarray(stop_kji, dtype=int) + np.asarray(self.crop_start_kji)
        full = np.array(self.full_size[::-1])
        start = np.clip(start, 0, full)
        stop = np.clip(stop, start + 1, full)
        return replace(self, crop_start_kji=tuple(int(v) for v in start),
                       crop_stop_kji=tuple(int(v) for v in stop))

    # ------------------------------------------------------------------ working-grid properties
    @property
    def _stop_kji(self) -> tuple[int, int, int]:
        return self.crop_stop_kji if self.crop_stop_kji is not None else tuple(self.full_size[::-1])

    @property
    def working_shape(self) -> tuple[int, int, int]:
        """Shape of working arrays, ``[k, j, i]`` order."""
        return tuple(int(b - a) for a, b in zip(self.crop_start_kji, self._stop_kji))  # type: ignore

    @property
    def working_spacing_zyx(self) -> tuple[float, float, float]:
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def working_origin(self) -> tuple[float, float, float]:
        """LPS position of working voxel ``[0, 0, 0]`` (after cropping)."""
        offset = np.array(self.crop_start_kji[::-1], dtype=float) * np.array(self.spacing)
        origin = np.array(self.full_origin) + np.array(self.direction).reshape(3, 3) @ offset
        return tuple(float(o) for o in origin)

    @property
    def _crop_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.crop_start_kji, self._stop_kji))  # type: ignore

    def working_reference(self, pixel=sitk.sitkUInt8) -> sitk.Image:
        return _reference_image(self.working_shape[::-1], self.spacing, self.working_origin, self.direction,
                                pixel)

    def input_reference(self, pixel=sitk.sitkUInt8) -> sitk.Image:
        return _reference_image(self.input_size, self.input_spacing, self.input_origin, self.input_direction,
                                pixel)

    def working_volume_like(self, array: np.ndarray) -> Volume:
        if tuple(array.shape) != self.working_shape:
            raise ValueError(f"array shape {array.shape} does not match the working grid "
                             f"{self.working_shape}")
        return Volume(array, self.spacing, self.working_origin, self.direction)

    def input_volume_like(self, array: np.ndarray) -> Volume:
        if tuple(array.shape) != tuple(self.input_size[::-1]):
            raise ValueError(f"array shape {array.shape} does not match the input grid "
                             f"{self.input_size[::-1]}")
        return Volume(array, self.input_spacing, self.input_origin, self.input_direction)

    # ------------------------------------------------------------------ resampling
    def _check_input(self, image: sitk.Image) -> None:
        size, spacing, origin, direction = _geometry_of(image)
        if (size != tuple(self.input_size)
                or not np.allclose(spacing, self.input_spacing, rtol=1e-4, atol=1e-5)
                or not np.allclose(origin, self.input_origin, atol=1e-3)
                or not np.allclose(direction.ravel(), self.input_direction, atol=1e-5)):
            raise InputError(f"an image on grid {size} / spacing {tuple(np.round(spacing, 4))} does not lie "
                             f"on the scan grid {tuple(self.input_size)} / "
                             f"{tuple(np.round(self.input_spacing, 4))}")

    def to_working(self, image: sitk.Image, interpolator: int = sitk.sitkLinear) -> np.ndarray:
        """Input-grid image -> working-grid array ``[k, j, i]``.

        Use ``sitk.sitkLinear`` / ``sitk.sitkBSpline`` for the MRI (float32 result) and
        ``sitk.sitkNearestNeighbor`` for masks and label maps (pixel type kept).
        """
        self._check_input(image)
        if not self.resampled:
            # Pure axis permutation/flip: exact, no interpolation.
            return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))[self._crop_slices]
        nearest = interpolator == sitk.sitkNearestNeighbor
        pixel = image.GetPixelID() if nearest else sitk.sitkFloat32
        if not nearest and image.GetPixelID() != sitk.sitkFloat32:
            image = sitk.Cast(image, sitk.sitkFloat32)
        out = sitk.Resample(image, self.working_reference(pixel), sitk.Transform(), interpolator, 0.0, pixel)
        return sitk.GetArrayFromImage(out)

    def labels_to_input(self, labels_working: np.ndarray) -> np.ndarray:
        """Working-grid label map -> input-grid array ``[k, j, i]`` (nearest neighbour, dtype kept)."""
        labels_working = np.asarray(labels_working)
        if labels_working.shape != self.working_shape:
            raise ValueError(f"label array {labels_working.shape} does not match the working grid "
                             f"{self.working_shape}")
        dtype = labels_working.dtype
        is_bool = dtype == np.bool_
        source = labels_working.astype(np.uint8) if is_bool else labels_working
        image = sitk.GetImageFromArray(np.ascontiguousarray(source))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.working_origin)
        image.SetDirection(self.direction)
        pixel = image.GetPixelID()
        out = sitk.Resample(image, self.input_reference(pixel), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                            pixel)
        array = sitk.GetArrayFromImage(out)
        return array.astype(bool) if is_bool else array

    def _input_to_working_axes(self) -> list[tuple[int, np.ndarray]] | None:
        """Per input axis (k, j, i): ``(working axis, nearest working index of every input index)``.

        The working grid is the input grid with its axes permuted / flipped (DICOMOrient) and rescaled, so
        nearest-neighbour mapping is separable by axis; ``None`` if the geometry says otherwise.
        """
        spacing = np.array(self.input_spacing)
        direction = np.array(self.input_direction).reshape(3, 3)
        to_working = np.linalg.inv(np.array(self.direction).reshape(3, 3) * np.array(self.spacing))
        # working continuous index (i, j, k) = offset + matrix @ input index (i, j, k)
        matrix = to_working @ (direction * spacing)
        offset = to_working @ (np.array(self.input_origin) - np.array(self.working_origin))
        dominant = np.argmax(np.abs(matrix), axis=0)
        if sorted(dominant) != [0, 1, 2]:
            return None
        off_axis = matrix.copy()
        off_axis[dominant, range(3)] = 0.0
        if np.abs(off_axis).max() > 1e-6 * np.abs(matrix).max():
            return None
        shape_w = self.working_shape[::-1]               # (i, j, k)
        axes = []
        for a in range(3):                                # input axis a in (i, j, k) order
            w = int(dominant[a])
            continuous = offset[w] + matrix[w, a] * np.arange(self.input_size[a], dtype=np.float64)
            nearest = np.floor(continuous + 0.5).astype(np.int64)   # ITK's RoundHalfIntegerUp
            nearest[(nearest < 0) | (nearest >= shape_w[w])] = -1    # outside the working grid
            axes.append((2 - w, nearest))                 # working axis in [k, j, i] array order
        return axes[::-1]                                 # input axes in [k, j, i] array order

    def sparse_labels_to_input(self, labels_working: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        """``labels_to_input`` for a label map of a few small objects (candidates): only the input voxels
        around each object are filled, so the cost follows the objects, not the 10-40 M input voxels.
        ``values``: write label ``v`` as ``values[v]`` (``values[0]`` must be 0; dtype of the result).

        Nearest neighbour like ``labels_to_input`` (checked voxel for voxel in the tests; a voxel exactly
        half-way between two working voxels may round the other way).
        """
        labels_working = np.asarray(labels_working)
        if labels_working.shape != self.working_shape:
            raise ValueError(f"label array {labels_working.shape} does not match the working grid "
                             f"{self.working_shape}")
        if values is not None and (len(values) <= int(labels_working.max(initial=0)) or values[0] != 0):
            raise ValueError("values must map every label of the map, and 0 to 0")
        axes = self._input_to_working_axes()
        if axes is None:                                  # not separable: resample the whole grid
            full = self.labels_to_input(labels_working)
            return full if values is None else values[full]
        out = np.zeros(tuple(self.input_size[::-1]), dtype=labels_working.dtype if values is None else values.dtype)
        boxes = self._object_boxes(labels_working)
        if not boxes:
            return out
        # Input axis n reads working axis permutation[n]; only input indices whose nearest working index lies
        # in the object's box are read, so none falls outside the working grid.
        source = labels_working.transpose([working_axis for working_axis, _ in axes])
        for box in boxes:
            ranges = []
            for working_axis, nearest in axes:
                window = box[working_axis]
                hits = np.flatnonzero((nearest >= window.start) & (nearest < window.stop))
                ranges.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else None)
            if any(r is None for r in ranges):
                continue
            block = source[np.ix_(*[nearest[r] for (_, nearest), r in zip(axes, ranges)])]
            if values is not None:
                block = values[block]
            np.copyto(out[tuple(ranges)], block, where=block > 0)
        return out

    @staticmethod
    def _object_boxes(labels: np.ndarray) -> list[tuple[slice, slice, slice]]:
        """Bounding boxes of the labelled objects (one per label value present)."""
        from scipy import ndimage

        values = labels if labels.dtype.kind in "iu" and labels.dtype != np.bool_ else labels.astype(np.uint8)
        return [box for box in ndimage.find_objects(values) if box]

    # ------------------------------------------------------------------ point mapping
    def working_index_to_lps(self, kji) -> np.ndarray:
        kji = np.atleast_2d(np.asarray(kji, dtype=float))
        direction = np.array(self.direction).reshape(3, 3)
        return (direction @ (kji[:, ::-1] * np.array(self.spacing)).T).T + np.array(self.working_origin)

    def working_index_to_ras(self, kji) -> np.ndarray:
        """Continuous working ``[k, j, i]`` indices (N x 3 or 3) -> RAS mm (N x 3)."""
        return self.working_index_to_lps(kji) * _LPS_TO_RAS

    def working_index_to_input_index(self, kji) -> np.ndarray:
        """Continuous working ``[k, j, i]`` -> continuous input ``[k, j, i]`` (N x 3)."""
        lps = self.working_index_to_lps(kji)
        direction = np.array(self.input_direction).reshape(3, 3)
        ijk = np.linalg.solve(direction, (lps - np.array(self.input_origin)).T).T
        return (ijk / np.array(self.input_spacing))[:, ::-1]


def to_working_grid(image: sitk.Image, working_spacing_mm: float = 0.8,
                    interpolator: int = sitk.sitkLinear) -> tuple[np.ndarray, ScanGrid]:
    """Convenience: the working-grid array of ``image`` and its ``ScanGrid``."""
    grid = ScanGrid.from_image(image, working_spacing_mm)
    return grid.to_working(image, interpolator), grid


# ====================================================================== brain mask
#: How skull-on images are masked (``preprocessing.brain_mask`` in model.json).
#: "otsu" (models up to 1.5.0): head = smoothed image above its Otsu threshold, 2 mm closing. A CMB or calcification
#: near the brain surface or the bottom of the field of view is as dark as bone on SWI / T2*-GRE; it fell below
#: the threshold and opened a notch in the outline, so it was never searched (3 of the 4 SWI CMBs that stage 1
#: missed on the 54-scan test set of 1.5.0; on the development scans the mask left out 3.1 % of the true brain,
#: mostly cerebellum and temporal lobes next to air-tissue artefacts).
#: "otsu-closed": 0.7 x the Otsu threshold and a 6 mm closing with the holes filled before eroding back, so notches
#: narrower than ~12 mm are closed (development scans: 1.4 % of the brain left out instead of 3.1 %, 1 of 89 CMBs
#: outside instead of 2; training scans: 7 of 323 instead of 23), at the price of slivers of dark skull at the
#: poles of thick-slice scans (they lie < 4 mm from the mask's edge, where the edge filter acts). A model trained
#: with it (1.6.0, not shipped: see scripts/make_model.py) was no more accurate than 1.5.0, so "otsu" stayed the
#: default; ``preprocessing.brain_mask`` / ``TrainingConfig.brain_mask`` choose it.
#: "otsu-hull": "otsu", then each slice's convex hull. Meant for SWI: its phase mask darkens whole regions of
#: brain next to air and bone (bands at the skull base, the temporal poles and the frontal sinus, tens of mm
#: wide; a region darkened at the end of the brain is no concavity and stays out), and the threshold cut them
#: out: on 20 skull-on training scans "otsu" left out 10.7 % of the generator's brain on SWI (5 of 37 CMB
#: centres outside) but 0.7 % on T2*-GRE. The hull leaves out 3.4 % on SWI (0 of 37 centres) and adds 2.8 % of
#: non-brain more than 3 mm outside it; on T2*-GRE it would add 5.2 %, so it is chosen per modality (see
#: ``brain_mask_method``; the default from 1.8.0 uses it on SWI only).
_BRAIN_MASK_SETTINGS = {
    "otsu": {"threshold_scale": 1.0, "closing_mm": 2.0, "fill_before_erode": False, "slice_hull": False},
    "otsu-closed": {"threshold_scale": 0.7, "closing_mm": 6.0, "fill_before_erode": True, "slice_hull": False},
    "otsu-hull": {"threshold_scale": 1.0, "closing_mm": 2.0, "fill_before_erode": False, "slice_hull": True}}
BRAIN_MASK_METHODS = tuple(_BRAIN_MASK_SETTINGS)


def brain_mask_method(setting: str | Mapping[str, str], modality: str) -> str:
    """The mask method a ``preprocessing.brain_mask`` setting names for ``modality``.

    The setting is one method for every modality, or a mapping ``{modality: method}`` that names all of
    ``validation.MODALITIES`` (so a package never guesses how an unlisted modality was trained).
    """
    if isinstance(setting, str):
        method = setting
    else:
        missing = set(MODALITIES) - set(setting)
        if missing:
            raise ValueError(f"brain mask setting {dict(setting)} names no method for {', '.join(sorted(missing))}")
        method = setting[modality]
    if method not in BRAIN_MASK_METHODS:
        raise ValueError(f"brain mask method must be one of {BRAIN_MASK_METHODS}, not {method!r}")
    return method


def brain_mask_setting(value: str | Mapping[str, str]) -> str | dict[str, str]:
    """A ``preprocessing.brain_mask`` value as stored (a method name, or a plain dict of one per modality),
    checked for every modality: ValueError on an unknown method or a modality without one."""
    setting = {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else str(value)
    for modality in MODALITIES:
        brain_mask_method(setting, modality)
    return setting


def _slice_hulls(mask: np.ndarray) -> np.ndarray:
    # per slice, not 3D: a 3D hull would bridge the skull base between the temporal lobes and the cerebellum
    from skimage.morphology import convex_hull_image

    return np.stack([convex_hull_image(plane) if plane.sum() >= 3 else plane for plane in mask])


def _ellipsoid_radius_voxels(radius_mm: float, spacing_zyx) -> np.ndarray:
    return np.maximum(radius_mm / np.asarray(spacing_zyx, dtype=float), 0.0)


def _erode_mm(mask: np.ndarray, radius_mm: float, spacing_zyx) -> np.ndarray:
    # Euclidean distance in mm: exact and spacing-aware, and fast for any radius (unlike a big
    # structuring element).
    return ndimage.distance_transform_edt(mask, sampling=spacing_zyx) > radius_mm


def _dilate_mm(mask: np.ndarray, radius_mm: float, spacing_zyx) -> np.ndarray:
    return ndimage.distance_transform_edt(~mask, sampling=spacing_zyx) <= radius_mm


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    filled = ndimage.binary_fill_holes(mask)
    # Also fill per axial slice: ventricles/sulci open to the outside in 3D are closed in 2D.
    for k in range(filled.shape[0]):
        filled[k] = ndimage.binary_fill_holes(filled[k])
    return filled


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def estimate_brain_mask(array: np.ndarray, spacing_zyx, opening_mm: float = 4.0,
                        coarse_mm: float = 1.6, method: str = "otsu") -> np.ndarray:
    """A brain mask from the image alone (a rough, fast substitute for BET).

    * Already skull-stripped images (typical QSM, or SWI exported after BET) have a solid background of
      exact zeros: the mask is their non-zero support (largest component, holes filled).
    * Skull-on SWI / T2*: on a grid of about ``coarse_mm`` (block averages; the outline needs no finer
      detail and the morphology gets ~8x cheaper), an Otsu threshold of the smoothed image separates head
      from air; an opening of ``opening_mm`` (distance transforms, spacing-aware) cuts the links between
      brain and scalp, the largest component is kept and dilated back, holes are filled and the outline
      closed; the result is interpolated back to the full grid.

    ``method`` (``BRAIN_MASK_METHODS``) sets the threshold and the closing of skull-on images.
    """
    if method not in BRAIN_MASK_METHODS:
        raise ValueError(f"brain mask method must be one of {BRAIN_MASK_METHODS}, not {method!r}")
    array = np.asarray(array, dtype=np.float32)
    spacing = np.asarray(spacing_zyx, dtype=float)
    finite = np.isfinite(array)
    nonzero = (array != 0) & finite
    if not nonzero.any():
        raise InputError("the image is empty (all zero); cannot estimate a brain mask")
    zero = ~nonzero
    # Skull-stripped: the zeros form a solid background (almost every zero voxel has only zero
    # neighbours). Noise clipped at zero gives scattered zeros instead and must not count.
    if zero.mean() > 0.15 and ndimage.binary_erosion(zero, border_value=1).sum() > 0.8 * zero.sum():
        return _fill_holes(_largest_component(nonzero))

    factors = [max(1, int(round(coarse_mm / s))) for s in spacing]
    image = sitk.GetImageFromArray(np.where(finite, array, 0.0).astype(np.float32))
    image.SetSpacing([float(s) for s in spacing[::-1]])
    small_image = sitk.BinShrink(image, factors[::-1]) if max(factors) > 1 else image
    small = _skull_on_brain_mask(sitk.GetArrayFromImage(small_image), spacing * np.array(factors), opening_mm,
                                 **_BRAIN_MASK_SETTINGS[method])
    if max(factors) == 1:
        return small
    small_float = sitk.GetImageFromArray(small.astype(np.float32))
    small_float.CopyInformation(small_image)
    full = sitk.Resample(small_float, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask = sitk.GetArrayFromImage(full) > 0.5
    if not mask.any():
        raise InputError("could not find the brain in the image; provide a brain mask")
    return mask


def _skull_on_brain_mask(array: np.ndarray, spacing_zyx: np.ndarray, opening_mm: float, threshold_scale: float,
                         closing_mm: float, fill_before_erode: bool, slice_hull: bool) -> np.ndarray:
    spacing_zyx = tuple(float(s) for s in spacing_zyx)
    sigma = np.asarray(1.0) / np.asarray(spacing_zyx)
    smooth = ndimage.gaussian_filter(array, sigma=sigma)
    # magnitude-like images: threshold the upper part; QSM-like signed images: threshold |I|
    values = smooth if smooth.min() >= 0 else np.abs(smooth)
    low, high = np.percentile(values, [1, 99.5])
    threshold = _otsu(np.clip(values[values > low], low, high))
    head = _largest_component(values > threshold_scale * threshold)
    core = _erode_mm(head, opening_mm, spacing_zyx)
    if core.any():
        core = _largest_component(core)
        mask = _dilate_mm(core, opening_mm, spacing_zyx) & head
    else:
        mask = head
    mask = _fill_holes(mask)
    # closing in mm smooths the outline (sulci at the surface stay inside the brain); filling the holes of the
    # dilated mask first also closes the notches that dark lesions at the surface leave
    dilated = _dilate_mm(mask, closing_mm, spacing_zyx)
    mask = _erode_mm(_fill_holes(dilated) if fill_before_erode else dilated, closing_mm, spacing_zyx)
    mask = _fill_holes(mask)
    if slice_hull:
        mask = _slice_hulls(mask)
    if not mask.any():
        raise InputError("could not find the brain in the image; provide a brain mask")
    return mask


# ====================================================================== bias field
def n4_bias_correct(array: np.ndarray, mask: np.ndarray, spacing_zyx, shrink: int | None = None,
                    iterations: tuple[int, ...] = (20, 10), shrink_mm: float = 5.0) -> np.ndarray:
    """N4 bias-field correction, fitted on a shrunk image, applied at full resolution.

    The bias field varies over centimetres, so it is fitted on a grid of about ``shrink_mm`` voxels (each
    axis shrunk by ``round(shrink_mm / spacing)``; or by ``shrink`` on the finest axes if given), which
    takes ~1 s instead of minutes. The full-resolution field is then evaluated from the fitted B-spline
    (``GetLogBiasFieldAsImage``) and divided out.
    """
    array = np.asarray(array, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return array.copy()
    spacing_zyx = np.asarray(spacing_zyx, dtype=float)
    # N4 needs strictly positive intensities.
    inside = array[mask]
    floor = max(float(np.percentile(inside, 1)), 1e-6) if inside.size else 1e-6
    positive = np.maximum(array, floor * 0.5) if floor > 0 else array
    image = sitk.GetImageFromArray(positive)
    image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_image.CopyInformation(image)

    target_mm = shrink * float(spacing_zyx.min()) if shrink else shrink_mm
    factors = [int(max(1, round(target_mm / s))) for s in spacing_zyx[::-1]]
    small = sitk.Shrink(image, factors)
    small_mask = sitk.Shrink(mask_image, factors)
    if sitk.GetArrayViewFromImage(small_mask).sum() < 10:
        return array.copy()
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.SetConvergenceThreshold(1e-4)
    corrector.Execute(small, small_mask)
    log_bias = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image)).astype(np.float32)
    corrected = array * np.exp(-log_bias)
    return corrected.astype(np.float32)


# ====================================================================== normalisation
#: How QSM values above the brain's ``high_percentile`` are mapped (``preprocessing.qsm_scaling`` in model.json).
#: "clip" (models up to 1.4.0): cut at 1, so every CMB, vein and iron-rich nucleus above the 99.5th percentile
#: reads the same 1.0 (on the synthetic training scans CMB peaks lie at 1.2-5.8 x that level, veins and nuclei
#: mostly below 3.5). "compress": tissue keeps its linear scale on [0, 0.75] and the top is compressed
#: smoothly into (0.75, 1), so the networks still see how strongly paramagnetic a bright spot is.
QSM_SCALINGS = ("clip", "compress")
QSM_KNEE = 0.75          # output level of the high percentile under "compress"
QSM_SOFTNESS = 2.0       # (multiples of the percentile range) above the knee that tanh spreads over


def _compress_above_one(values: np.ndarray) -> np.ndarray:
    """Linear ``KNEE * v`` up to ``v = 1``, then ``KNEE + (1 - KNEE) * tanh((v - 1) / SOFTNESS)`` (< 1)."""
    values = np.maximum(values, 0.0)
    top = QSM_KNEE + (1.0 - QSM_KNEE) * np.tanh((values - 1.0) / QSM_SOFTNESS)
    return np.where(values <= 1.0, QSM_KNEE * values, top).astype(np.float32)


def normalise_intensity(array: np.ndarray, mask: np.ndarray, modality: str,
                        high_percentile: float = 99.5, low_percentile: float = 0.5,
                        qsm_scaling: str = "compress") -> np.ndarray:
    """float32 in [0, 1] inside ``mask``, 0 outside, CMBs bright.

    SWI / T2*-GRE: ``1 - I / I_high`` (the paper's inversion), with ``I_high`` the ``high_percentile``
    inside the brain rather than the single brightest voxel, so one hot voxel cannot squash the contrast.
    (Magnitude signal cannot go below 0, so dark CMBs are not clipped by this.)
    QSM: ``v = (I - I_low) / (I_high - I_low)``, not inverted (paramagnetic CMBs are already bright), then
    ``qsm_scaling`` (see ``QSM_SCALINGS``) maps ``v > 1``.
    """
    if qsm_scaling not in QSM_SCALINGS:
        raise ValueError(f"qsm_scaling must be one of {QSM_SCALINGS}, not {qsm_scaling!r}")
    from CMBDetectLib.validation import normalise_modality

    modality = normalise_modality(modality)
    array = np.asarray(array, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(array.shape, dtype=np.float32)
    if not mask.any():
        return out
    inside = array[mask]
    if modality in ("swi", "t2s"):
        high = float(np.percentile(inside, high_percentile))
        if high <= 0:
            high = float(inside.max()) or 1.0
        values = 1.0 - np.clip(inside / high, 0.0, 1.0)
    else:
        low, high = (float(v) for v in np.percentile(inside, [low_percentile, high_percentile]))
        if high <= low:
            low, high = float(inside.min()), float(inside.max())
        values = (inside - low) / max(high - low, 1e-12)
        values = np.clip(values, 0.0, 1.0) if qsm_scaling == "clip" else _compress_above_one(values)
    out[mask] = values
    return out
