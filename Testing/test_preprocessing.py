"""ScanGrid geometry round trips, brain mask, N4 and intensity normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813  (the universal SimpleITK alias)
from scipy import ndimage

from CMBDetectLib.preprocessing import (
    ScanGrid,
    estimate_brain_mask,
    n4_bias_correct,
    normalise_intensity,
    to_working_grid,
)
from CMBDetectLib.volume import Volume


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _image(size_ijk, spacing, direction, origin=(10.0, -20.0, 30.0), array=None) -> sitk.Image:
    if array is None:
        array = np.zeros(size_ijk[::-1], np.uint16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, float).ravel().tolist())
    return image


# direction matrices that are NOT LPS: RAS-flipped, sagittal/coronal acquisitions, oblique
GEOMETRIES = {
    "lps": (np.eye(3), (0.8, 0.8, 3.0)),
    "ras_flipped": (np.diag([-1.0, -1.0, 1.0]), (0.8, 0.8, 3.0)),
    "sagittal": (np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float), (0.9, 1.0, 4.0)),
    "coronal_flipped": (np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], float), (0.8, 2.0, 0.8)),
    "oblique": (_rotation([1, 2, 3], 20) @ np.diag([1.0, -1.0, 1.0]), (0.8, 0.8, 3.0)),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_native_grid_label_round_trip_is_exact(name):
    direction, spacing = GEOMETRIES[name]
    size = (20, 17, 11)
    grid = ScanGrid.from_image(_image(size, spacing, direction))
    assert not grid.resampled  # every axis is >= 0.8 mm: no interpolation
    rng = np.random.default_rng(1)
    labels = np.zeros(size[::-1], np.uint16)
    voxels = [tuple(int(rng.integers(0, n)) for n in size[::-1]) for _ in range(5)]
    for value, kji in enumerate(voxels, start=1):
        labels[kji] = value
    image = _image(size, spacing, direction, array=labels)
    working = grid.to_working(image, sitk.sitkNearestNeighbor)
    assert working.shape == grid.working_shape
    assert sorted(np.unique(working)) == list(range(6))
    back = grid.labels_to_input(working)
    assert back.dtype == labels.dtype
    np.testing.assert_array_equal(back, labels)
    input_volume = Volume(labels, spacing, image.GetOrigin(), image.GetDirection())
    for value, kji in enumerate(voxels, start=1):
        w = np.argwhere(working == value)[0]
        np.testing.assert_allclose(grid.working_index_to_input_index(w)[0], kji, atol=1e-6)
        np.testing.assert_allclose(grid.working_index_to_ras(w)[0], input_volume.index_to_ras(kji)[0],
                                   atol=1e-6)


@pytest.mark.parametrize("name", ["ras_flipped", "sagittal", "oblique"])
def test_working_grid_is_lps(name):
    direction, spacing = GEOMETRIES[name]
    grid = ScanGrid.from_image(_image((20, 17, 11), spacing, direction))
    # DICOMOrient: each working axis points (mostly) along +L, +P, +S
    working_direction = np.array(grid.direction).reshape(3, 3)
    assert np.all(np.argmax(np.abs(working_direction), axis=0) == [0, 1, 2])
    assert np.all(np.diag(working_direction) > 0.5)


def test_cropped_grid_round_trip():
    direction, spacing = GEOMETRIES["oblique"]
    size = (20, 17, 11)
    labels = np.zeros(size[::-1], np.uint8)
    labels[5, 8, 9] = 1
    image = _image(size, spacing, direction, array=labels)
    grid = ScanGrid.from_image(image)
    working = grid.to_working(image, sitk.sitkNearestNeighbor)
    where = np.argwhere(working)[0]
    start = np.maximum(where - 2, 0)
    cropped = grid.cropped(start, where + 3)
    assert cropped.working_shape == tuple(int(v) for v in (where + 3 - start))
    small = cropped.to_working(image, sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(small, working[tuple(slice(a, b) for a, b in zip(start, where + 3))])
    np.testing.assert_array_equal(cropped.labels_to_input(small), labels)
    np.testing.assert_allclose(cropped.working_index_to_input_index(where - start)[0], (5, 8, 9), atol=1e-6)


@pytest.mark.parametrize("name", ["lps", "ras_flipped", "oblique"])
def test_fine_grid_is_resampled_and_maps_back(name):
    direction, _ = GEOMETRIES[name]
    spacing = (0.45, 0.45, 1.0)
    size = (60, 56, 24)
    grid = ScanGrid.from_image(_image(size, spacing, direction), working_spacing_mm=0.8)
    assert grid.resampled
    np.testing.assert_allclose(sorted(grid.spacing), [0.8, 0.8, 1.0])
    # field of view preserved
    extent_in = np.sort(np.array(size) * spacing)
    extent_w = np.sort(np.array(grid.working_shape[::-1]) * np.array(grid.spacing))
    np.testing.assert_allclose(extent_w, extent_in, atol=0.8)
    # a 2 mm blob: same physical place after to_working (linear) and labels_to_input (nearest)
    k, j, i = np.meshgrid(*[np.arange(n) * s for n, s in zip(size[::-1], spacing[::-1])], indexing="ij")
    centre = np.array([11.0, 12.3, 14.1])  # mm in k, j, i
    blob = ((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2) <= 2.0 ** 2
    image = _image(size, spacing, direction, array=blob.astype(np.float32) * 100)
    working = grid.to_working(image, sitk.sitkLinear)
    assert working.dtype == np.float32
    back = grid.labels_to_input((working > 50).astype(np.uint8)).astype(bool)
    c_in = np.array(ndimage.center_of_mass(blob)) * spacing[::-1]
    c_back = np.array(ndimage.center_of_mass(back)) * spacing[::-1]
    assert np.linalg.norm(c_in - c_back) < 0.4
    assert 2 * (back & blob).sum() / (back.sum() + blob.sum()) > 0.75
    # point mapping agrees with the resampled image
    w_centre = np.array(ndimage.center_of_mass(working))
    c_mapped = grid.working_index_to_input_index(w_centre)[0] * spacing[::-1]
    assert np.linalg.norm(c_mapped - c_in) < 0.4


def test_to_working_grid_and_volume_like():
    image = _image((12, 10, 9), (1.0, 1.0, 1.0), np.diag([-1.0, 1.0, 1.0]),
                   array=np.arange(12 * 10 * 9, dtype=np.float32).reshape(9, 10, 12))
    array, grid = to_working_grid(image)
    assert array.shape == grid.working_shape == (9, 10, 12)
    np.testing.assert_array_equal(array, sitk.GetArrayFromImage(image)[:, :, ::-1])  # L-R flip
    volume = grid.input_volume_like(grid.labels_to_input(array))
    assert volume.spacing == (1.0, 1.0, 1.0) and volume.direction == image.GetDirection()


def _head(shape=(40, 64, 56), spacing=(3.0, 0.8, 0.8), skull=True):
    sp = np.array(spacing)
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, sp)], indexing="ij")
    semi = 0.45 * np.array(shape) * sp
    r = sum((g / a) ** 2 for g, a in zip(grids, semi))
    image = np.zeros(shape, np.float32)
    brain = r <= (0.6 if skull else 1.0)
    if skull:
        image[r <= 1.0] = 700.0   # scalp
        image[r <= 0.85] = 80.0   # skull (~5 mm)
    image[brain] = 500.0
    image += np.random.default_rng(0).normal(0, 15, shape).astype(np.float32)
    if skull:
        image = np.abs(image)
    else:
        image[~brain] = 0
    return image, brain


@pytest.mark.parametrize("skull", [True, False])
def test_estimate_brain_mask(skull):
    image, brain = _head(skull=skull)
    mask = estimate_brain_mask(image, (3.0, 0.8, 0.8))
    assert mask.dtype == bool
    dice = 2 * (mask & brain).sum() / (mask.sum() + brain.sum())
    assert dice > (0.9 if skull else 0.99)


def test_brain_mask_keeps_a_dark_lesion_at_the_brain_surface():
    """A blooming CMB just under the cortex is as dark as bone on SWI; the mask must still cover it."""
    from CMBDetectLib.features import LEGACY_BRAIN_MASK, feature_settings

    spacing = (1.0, 0.8, 0.8)
    image, brain = _head(shape=(64, 80, 72), spacing=spacing)
    sp = np.array(spacing)
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(image.shape, sp)], indexing="ij")
    brain_voxels = np.argwhere(brain)
    # the lesion's centre: 2 mm inside the brain surface, on the left-right axis
    centre_row = brain_voxels[brain_voxels[:, 2].argmin()] + np.array([0, 0, int(round(2.0 / sp[2]))])
    centre = centre_row * sp
    lesion = sum((g - c) ** 2 for g, c in zip(grids, centre)) <= 3.5 ** 2
    image[lesion & brain] = 60.0 + np.abs(np.random.default_rng(1).normal(0, 15, (lesion & brain).sum()))
    legacy = estimate_brain_mask(image, spacing, method=LEGACY_BRAIN_MASK)
    closed = estimate_brain_mask(image, spacing, method="otsu-closed")
    inside = lesion & brain
    k, j, i = centre_row
    assert legacy[inside].mean() < 0.5 and not legacy[k, j, i]   # the old threshold cut the lesion out
    assert closed[inside].mean() > 0.9 and closed[k, j, i]
    for mask in (legacy, closed):                # and neither reaches the scalp
        dice = 2 * (mask & brain).sum() / (mask.sum() + brain.sum())
        assert dice > 0.9
    with pytest.raises(ValueError, match="brain mask method"):
        estimate_brain_mask(image, spacing, method="bet")
    # packages that do not record the method were trained with the legacy mask
    assert feature_settings({})["brain_mask"] == LEGACY_BRAIN_MASK == "otsu"


def test_n4_removes_smooth_bias():
    shape, spacing = (24, 64, 64), (3.0, 0.8, 0.8)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    bias = (1.0 + 0.35 * grids[1] + 0.25 * grids[2] ** 2 - 0.15 * grids[0]).astype(np.float32)
    truth = np.full(shape, 400.0, np.float32)
    truth += np.random.default_rng(0).normal(0, 4, shape).astype(np.float32)
    mask = np.ones(shape, bool)
    mask[:, :4] = mask[:, -4:] = False
    corrected = n4_bias_correct(truth * bias, mask, spacing)
    assert corrected.shape == shape and corrected.dtype == np.float32

    def cv(a):
        return a[mask].std() / a[mask].mean()

    assert cv(truth * bias) > 0.15
    assert cv(corrected) < 0.5 * cv(truth * bias)


def test_normalisation_inverts_swi_not_qsm():
    rng = np.random.default_rng(0)
    image = (rng.normal(500, 20, (16, 16, 16))).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[2:14, 2:14, 2:14] = True
    image[8, 8, 8] = 50.0    # a dark (SWI) spot
    image[5, 5, 5] = 900.0   # a bright spot
    image[3, 3, 3] = 1e6     # one hot voxel must not squash the contrast
    for modality in ("swi", "t2s", "SWI"):
        out = normalise_intensity(image, mask, modality)
        assert out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 1 and np.all(out[~mask] == 0)
        assert out[8, 8, 8] > 0.85
        assert out[5, 5, 5] < 0.05
        assert 0.02 < np.median(out[mask]) < 0.3  # not near 1 despite the 1e6 voxel
    qsm = normalise_intensity(image, mask, "qsm")
    assert qsm[5, 5, 5] > 0.9 and qsm[8, 8, 8] < 0.05
    assert np.all(qsm[~mask] == 0) and qsm.max() <= 1 and qsm.min() >= 0
    assert 0.2 < np.median(qsm[mask]) < 0.8


def test_qsm_compression_keeps_how_paramagnetic_a_bright_spot_is():
    from CMBDetectLib.features import LEGACY_QSM_SCALING, feature_settings

    rng = np.random.default_rng(1)
    image = rng.normal(0.0, 0.05, (16, 16, 16)).astype(np.float32)   # ppm
    mask = np.ones(image.shape, bool)
    image[4, 4, 4], image[8, 8, 8], image[12, 12, 12] = 0.3, 0.6, 1.2  # vein-like, CMB, strong CMB
    clipped = normalise_intensity(image, mask, "qsm", qsm_scaling="clip")
    compressed = normalise_intensity(image, mask, "qsm", qsm_scaling="compress")
    # "clip" reads all three as the same 1.0; "compress" keeps their order and stays below 1.
    assert clipped[4, 4, 4] == clipped[8, 8, 8] == clipped[12, 12, 12] == 1.0
    assert compressed[4, 4, 4] < compressed[8, 8, 8] < compressed[12, 12, 12] < 1.0
    assert compressed.min() >= 0.0 and np.all(np.diff(np.sort(compressed[mask])) >= 0)
    # Tissue below the high percentile keeps its linear contrast (scaled by the knee).
    tissue = clipped < 1.0
    np.testing.assert_allclose(compressed[tissue], 0.75 * clipped[tissue], atol=1e-6)
    # SWI / T2*-GRE ignore the option.
    swi = np.abs(image) + 1.0
    np.testing.assert_array_equal(normalise_intensity(swi, mask, "swi", qsm_scaling="clip"),
                                  normalise_intensity(swi, mask, "swi", qsm_scaling="compress"))
    with pytest.raises(ValueError, match="qsm_scaling"):
        normalise_intensity(image, mask, "qsm", qsm_scaling="log")
    # A model package that does not record the option was trained with the legacy one.
    assert feature_settings({})["qsm_scaling"] == LEGACY_QSM_SCALING == "clip"
    assert feature_settings({"qsm_scaling": "compress", "working_spacing_mm": 0.7}) == {
        "working_spacing_mm": 0.7, "vessel_suppression": True, "qsm_scaling": "compress", "brain_mask": "otsu",
        "vessel_context": False, "max_spacing_mm": None}
    assert feature_settings({"max_spacing_mm": 1.6})["max_spacing_mm"] == 1.6


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("spacing", [(0.45, 0.45, 1.0), (0.8, 0.8, 3.0), (0.5, 0.7, 0.6)])
def test_sparse_label_mapping_equals_the_full_resample(name, spacing, monkeypatch):
    direction, _ = GEOMETRIES[name]
    grid = ScanGrid.from_image(_image((70, 64, 40), spacing, direction), working_spacing_mm=0.8)
    grid = grid.cropped((1, 2, 3), np.array(grid.working_shape) - (2, 1, 3))     # cropped like detection
    rng = np.random.default_rng(3)
    labels = np.zeros(grid.working_shape, np.int32)
    shape = np.array(grid.working_shape)
    for n in range(1, 25):                     # small objects, some touching the grid's faces
        centre = rng.integers(0, shape)
        radius = rng.integers(0, 3, 3)
        labels[tuple(slice(max(0, c - r), c + r + 1) for c, r in zip(centre, radius))] = n
    full = grid.labels_to_input(labels)
    np.testing.assert_array_equal(grid.sparse_labels_to_input(labels), full)
    ids = np.zeros(25, np.uint16)
    ids[1:] = rng.permutation(np.arange(100, 124))
    mapped = grid.sparse_labels_to_input(labels, values=ids)
    assert mapped.dtype == np.uint16
    np.testing.assert_array_equal(mapped, ids[full])
    # A geometry that is not axis-separable falls back to the full resample, values still applied.
    with monkeypatch.context() as patch:
        patch.setattr(ScanGrid, "_input_to_working_axes", lambda self: None)
        np.testing.assert_array_equal(grid.sparse_labels_to_input(labels, values=ids), ids[full])
    empty = grid.sparse_labels_to_input(np.zeros(grid.working_shape, np.int32))
    assert empty.shape == full.shape and not empty.any()
    with pytest.raises(ValueError, match="values must map"):
        grid.sparse_labels_to_input(labels, values=ids[:5])


def test_slice_hull_restores_a_dark_band_of_brain():
    """SWI's phase mask darkens whole regions next to air and bone; "otsu" cuts them, "otsu-hull" keeps them."""
    spacing = (2.0, 0.8, 0.8)
    image, brain = _head(shape=(40, 80, 72), spacing=spacing)
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(image.shape, spacing)], indexing="ij")
    # a dark notch 11 mm deep and 16 mm wide into one side of the brain (the outline stays convex without it)
    columns = np.argwhere(brain)[:, 2]
    middle = image.shape[1] / 2 * spacing[1]
    band = brain & (grids[2] >= (columns.max() - 14) * spacing[2]) & (np.abs(grids[1] - middle) <= 8.0)
    image[band] = 60.0 + np.abs(np.random.default_rng(2).normal(0, 15, band.sum()))
    otsu = estimate_brain_mask(image, spacing, method="otsu")
    hull = estimate_brain_mask(image, spacing, method="otsu-hull")
    assert otsu[band].mean() < 0.3                          # the threshold cut the dark band out
    assert hull[band].mean() > 0.5 and hull[brain].mean() > otsu[brain].mean()   # all but the rim beyond the chord
    dice = 2 * (hull & brain).sum() / (hull.sum() + brain.sum())
    assert dice > 0.9                                       # and the hull does not reach the scalp
    # a skull-stripped image keeps its support: the hull is only for skull-on images
    stripped, stripped_brain = _head(skull=False)
    assert np.array_equal(estimate_brain_mask(stripped, (3.0, 0.8, 0.8), method="otsu-hull"),
                          estimate_brain_mask(stripped, (3.0, 0.8, 0.8), method="otsu"))


def test_brain_mask_method_per_modality():
    from CMBDetectLib.preprocessing import brain_mask_method

    per_modality = {"swi": "otsu-hull", "t2s": "otsu", "qsm": "otsu"}
    assert brain_mask_method("otsu-closed", "qsm") == "otsu-closed"
    assert brain_mask_method(per_modality, "swi") == "otsu-hull"
    assert brain_mask_method(per_modality, "t2s") == "otsu"
    with pytest.raises(ValueError, match="names no method for qsm"):
        brain_mask_method({"swi": "otsu-hull", "t2s": "otsu"}, "swi")
    with pytest.raises(ValueError, match="brain mask method"):
        brain_mask_method({**per_modality, "swi": "bet"}, "swi")


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_thick_slices_interpolated_to_a_cap_keep_every_native_slice(name):
    direction, spacing = GEOMETRIES[name]
    size = (40, 36, 12)
    native = ScanGrid.from_image(_image(size, spacing, direction), working_spacing_mm=0.8)
    grid = ScanGrid.from_image(_image(size, spacing, direction), working_spacing_mm=0.8, max_spacing_mm=1.6)
    thick = int(np.argmax(spacing))                       # input axis (i, j, k) of the thick slices
    factor = int(np.ceil(spacing[thick] / 1.6 - 0.03))    # 3 mm -> 2 x 1.5 mm, 4 mm -> 3 x 1.33 mm
    assert grid.resampled and max(grid.spacing) <= 1.6
    np.testing.assert_allclose(sorted(grid.spacing), sorted([s if s < 1.6 else s / factor for s in spacing]))
    slices = factor * (size[thick] - 1) + 1              # first and last working slices are native ones
    assert np.prod(grid.working_shape) == np.prod(native.working_shape) // size[thick] * slices
    # every native slice is a working slice: a one-slice object maps back onto exactly its slice
    array = np.zeros(size[::-1], np.float32)
    index = [20, 18, 6]
    index[thick] = 5
    array[tuple(index[::-1])] = 100.0
    working = grid.to_working(_image(size, spacing, direction, array=array), sitk.sitkLinear)
    assert working.max() == pytest.approx(100.0, rel=1e-4)          # the native voxel itself, not a blend
    back = grid.labels_to_input((working > 99).astype(np.uint8))
    np.testing.assert_array_equal(np.argwhere(back), [index[::-1]])
    # the values between two native slices are interpolated, not copied
    assert ((working > 1) & (working < 99)).any()


def test_a_cap_below_the_working_spacing_is_refused():
    from CMBDetectLib.errors import InputError

    with pytest.raises(InputError, match="largest working spacing"):
        ScanGrid.from_image(_image((8, 8, 4), (0.8, 0.8, 3.0), np.eye(3)), working_spacing_mm=0.8, max_spacing_mm=0.5)
