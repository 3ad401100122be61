"""compute_features: the shared input (intensity, FRST; optionally the image before vessel suppression) on the
working grid, with its geometry."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from CMBDetectLib.errors import InputError
from CMBDetectLib.features import ScanFeatures, compute_features
from CMBDetectLib.volume import Volume


def _phantom(shape=(24, 72, 64), spacing_zyx=(3.0, 0.8, 0.8), skull=True, qsm=False, direction=None):
    """Head with scalp/skull, brain, one vein, two CMBs (dark on SWI, bright on QSM)."""
    rng = np.random.default_rng(0)
    sp = np.asarray(spacing_zyx, float)
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, sp)], indexing="ij")
    semi = 0.48 * np.array(shape) * sp
    r = sum((g / a) ** 2 for g, a in zip(grids, semi))
    brain = r <= (0.6 if skull else 0.9)
    image = np.zeros(shape, np.float32)
    if skull:
        image[r <= 1.0] = 0.9
        image[r <= 0.85] = 0.1
    tissue, lesion = (0.02, 0.6) if qsm else (0.6, 0.1)
    image[brain] = tissue
    # deep grey nuclei: iron-rich (QSM 0.15 ppm, darker on SWI), gives the intensity range a realistic top
    nuclei = brain & (((grids[1] - 8.0) / 6.0) ** 2 + ((np.abs(grids[2]) - 10.0) / 4.0) ** 2
                      + (grids[0] / 8.0) ** 2 <= 1.0)
    image[nuclei] = 0.15 if qsm else 0.45
    vein = brain & ((grids[0] - 1.0) ** 2 + (grids[1] + 6.0) ** 2 <= 1.0) & (np.abs(grids[2]) < 14)
    image[vein] = 0.5 if qsm else 0.2
    cmbs_mm = [np.array([0.0, -9.0, -5.0]), np.array([3.0, -3.0, 9.0])]
    cmbs = []
    for c in cmbs_mm:
        image[sum((g - x) ** 2 for g, x in zip(grids, c)) <= 2.2 ** 2] = lesion
        cmbs.append(tuple(np.round(c / sp + (np.array(shape) - 1) / 2).astype(int)))
    image = ndimage.gaussian_filter(image, 0.4 / sp)
    image = image + rng.normal(0, 0.015, shape)
    if not qsm:
        image = np.abs(image) * 1000
    else:
        image[~ndimage.binary_dilation(brain)] = 0
    spacing = tuple(float(s) for s in sp[::-1])
    volume = Volume(image.astype(np.float32), spacing, (-30.0, 20.0, 5.0),
                    tuple(np.asarray(direction if direction is not None else np.eye(3), float).ravel()))
    return volume, brain, cmbs, vein


def _check_basic(features: ScanFeatures, volume: Volume):
    k, j, i = features.grid.working_shape
    assert features.channels.shape == (2, k, j, i) and features.channels.dtype == np.float32
    assert features.brain_mask.shape == (k, j, i) and features.brain_mask.dtype == bool
    assert features.vessel_mask.shape == (k, j, i)
    assert features.channels.min() >= 0 and features.channels.max() <= 1
    assert np.all(features.channels[:, ~features.brain_mask] == 0)
    assert features.spacing_zyx == features.grid.working_spacing_zyx
    assert features.grid.labels_to_input(features.brain_mask).shape == volume.array.shape


def _working_index(features: ScanFeatures, input_kji) -> np.ndarray:
    """Working voxel nearest to an input voxel (inverse of grid.working_index_to_input_index)."""
    grid = features.grid
    basis = grid.working_index_to_input_index(np.vstack([np.zeros(3), np.eye(3)]))
    matrix = (basis[1:] - basis[0]).T
    return np.round(np.linalg.solve(matrix, np.asarray(input_kji, float) - basis[0])).astype(int)


def test_swi_skull_on():
    volume, brain, cmbs, vein = _phantom()
    messages = []
    features = compute_features(volume, "SWI", progress=lambda f, m: messages.append((f, m)))
    _check_basic(features, volume)
    assert features.modality == "swi"
    # cropped to the brain (+ margin), never cutting it
    assert np.prod(features.grid.working_shape) < volume.array.size
    mask_in = features.grid.labels_to_input(features.brain_mask)
    assert 2 * (mask_in & brain).sum() / (mask_in.sum() + brain.sum()) > 0.85
    intensity, frst = features.channels
    for cmb in cmbs:
        w = tuple(_working_index(features, cmb))
        assert intensity[w] > 0.75        # inverted: CMB bright
        assert frst[w] > 0.5
        assert not features.vessel_mask[w]
    # The strongest radial symmetry away from the mask's edge is at a CMB. (The mask may take in a sliver of
    # dark skull at the thick slices' poles; what responds there lies < 4 mm from the edge, where the edge
    # filter removes candidates.)
    from scipy import ndimage

    edge_mm = ndimage.distance_transform_edt(features.brain_mask, sampling=features.spacing_zyx)
    peak = np.unravel_index(np.argmax(np.where(edge_mm >= 4.0, frst, 0)), frst.shape)
    assert min(np.abs(np.array(peak) - _working_index(features, c)).max() for c in cmbs) <= 1
    stronger = (frst > frst[peak]) & features.brain_mask
    assert np.all(edge_mm[stronger] < 4.0)
    # the vein is suppressed: dimmer than before suppression
    plain = compute_features(volume, "swi", vessel_suppression=False)
    assert not plain.vessel_mask.any()
    assert plain.grid == features.grid
    vein_working = np.zeros(features.grid.working_shape, bool)
    for kji in np.argwhere(vein):
        w = _working_index(features, kji)
        if np.all(w >= 0) and np.all(w < features.grid.working_shape):
            vein_working[tuple(w)] = True
    assert features.vessel_mask[vein_working].mean() > 0.3
    assert intensity[vein_working].mean() < plain.channels[0][vein_working].mean() - 0.05
    # timings and progress
    for key in ("validate", "brain_mask", "n4", "normalise", "vessel_suppression", "frst", "total"):
        assert key in features.timings
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_vessel_context_adds_the_image_before_vessel_suppression():
    volume, brain, cmbs, vein = _phantom()
    features = compute_features(volume, "swi")
    context = compute_features(volume, "swi", vessel_context=True)
    plain = compute_features(volume, "swi", vessel_suppression=False)
    assert context.channels.shape == (3, *features.grid.working_shape)
    np.testing.assert_array_equal(context.channels[:2], features.channels)   # stage 1's input is unchanged
    np.testing.assert_array_equal(context.channels[2], plain.channels[0])    # the veins, before inpainting
    vessels = context.vessel_mask
    assert vessels.any() and context.channels[2][vessels].mean() > context.channels[0][vessels].mean() + 0.02
    assert np.all(context.channels[:, ~context.brain_mask] == 0)
    with pytest.raises(ValueError, match="needs vessel_suppression"):
        compute_features(volume, "swi", vessel_suppression=False, vessel_context=True)


def test_thick_slices_interpolated_to_the_models_largest_spacing_keep_the_cmbs():
    volume, brain, cmbs, vein = _phantom()                       # 3 mm slices
    native = compute_features(volume, "swi")
    fine = compute_features(volume, "swi", max_spacing_mm=1.7)   # 3 mm -> 2 x 1.5 mm
    _check_basic(fine, volume)
    assert native.spacing_zyx[0] == pytest.approx(3.0) and fine.spacing_zyx[0] == pytest.approx(1.5)
    assert fine.spacing_zyx[1:] == pytest.approx(native.spacing_zyx[1:])
    assert fine.grid.full_size[2] == 2 * native.grid.full_size[2] - 1   # every native slice, one between each two
    for cmb in cmbs:                     # still the bright, radially symmetric spots of the native features
        k, j, i = _working_index(fine, cmb)
        window = fine.channels[:, k - 1:k + 2, j - 2:j + 3, i - 2:i + 3]
        assert window[0].max() > np.percentile(fine.channels[0][fine.brain_mask], 99)
        assert window[1].max() > np.percentile(fine.channels[1][fine.brain_mask], 99)


def test_qsm_with_given_mask_is_not_inverted_and_skips_n4():
    volume, brain, cmbs, _ = _phantom(skull=False, qsm=True)
    mask = volume.with_array(brain.astype(np.uint8))
    features = compute_features(volume, "qsm", mask=mask)
    _check_basic(features, volume)
    assert "n4" not in features.timings
    np.testing.assert_array_equal(features.grid.labels_to_input(features.brain_mask), brain)
    for cmb in cmbs:
        w = tuple(_working_index(features, cmb))
        assert features.channels[0][w] > 0.8
        assert features.channels[1][w] > 0.5
    assert np.median(features.channels[0][features.brain_mask]) < 0.6


def test_oblique_fine_grid_maps_back_to_the_cmb():
    angle = np.radians(15)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rotation @ np.diag([-1.0, -1.0, 1.0])  # RAS-like, oblique
    volume, _, cmbs, _ = _phantom(shape=(40, 100, 90), spacing_zyx=(1.0, 0.5, 0.5), direction=direction)
    features = compute_features(volume, "t2*")
    _check_basic(features, volume)
    assert features.grid.resampled
    assert sorted(features.spacing_zyx) == pytest.approx([0.8, 0.8, 1.0])
    frst = features.channels[1]
    labels, n = ndimage.label(frst > 0.5)
    assert n >= 2
    # centre of mass of each FRST blob (the reference voxel itself is rounded from mm by up to 0.5 voxel)
    centres = np.array(ndimage.center_of_mass(frst, labels, range(1, n + 1)), float)
    in_input = features.grid.working_index_to_input_index(centres)
    for cmb in cmbs:
        distance_mm = np.min(np.linalg.norm((in_input - cmb) * np.array(volume.spacing_zyx), axis=1))
        assert distance_mm < 1.0


def test_bad_inputs_raise_input_error():
    volume, brain, _, _ = _phantom()
    labels = volume.with_array((brain * 2).astype(np.uint8))
    with pytest.raises(InputError, match="label map"):
        compute_features(labels, "swi")
    with pytest.raises(InputError, match="modality"):
        compute_features(volume, "flair")
    wrong = Volume(brain[:, :, :-1].astype(np.uint8), volume.spacing)
    with pytest.raises(InputError, match="grid"):
        compute_features(volume, "swi", mask=wrong)
    with pytest.raises(InputError, match="empty"):
        compute_features(volume, "swi", mask=volume.with_array(np.zeros(brain.shape, np.uint8)))


def test_a_per_modality_brain_mask_uses_the_method_named_for_the_scans_modality():
    volume, _, _, _ = _phantom()
    # a dark notch into one side of the brain (SWI's phase mask darkens regions next to air and bone like this)
    array = volume.array.copy()
    array[:, 30:42, 50:] = np.minimum(array[:, 30:42, 50:], 120.0)
    volume = volume.with_array(array)
    per_modality = {"swi": "otsu-hull", "t2s": "otsu", "qsm": "otsu"}
    settings = {"vessel_suppression": False, "crop": False}
    swi = compute_features(volume, "swi", brain_mask=per_modality, **settings).brain_mask
    t2s = compute_features(volume, "t2s", brain_mask=per_modality, **settings).brain_mask
    assert np.array_equal(swi, compute_features(volume, "swi", brain_mask="otsu-hull", **settings).brain_mask)
    assert np.array_equal(t2s, compute_features(volume, "t2s", brain_mask="otsu", **settings).brain_mask)
    assert swi.sum() > t2s.sum()                   # the hull restored the notch on SWI only
    with pytest.raises(ValueError, match="names no method for qsm"):
        compute_features(volume, "swi", brain_mask={"swi": "otsu", "t2s": "otsu"}, **settings)
