"""Vessel suppression: long bright tubes are inpainted, round blobs (CMBs) survive, even touching a tube."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from CMBDetectLib.vessel_suppression import (
    inpaint_mean_of_neighbours,
    suppress_vessels,
    symmetric_eigenvalues,
)

BACKGROUND, BRIGHT = 0.35, 0.9


def _scene(spacing, shape, touching=True):
    """Bright tube (radius 1 mm, along i) + bright sphere (radius 2 mm) touching it or apart."""
    sp = np.asarray(spacing, float)
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp)], indexing="ij")
    centre = (np.array(shape) - 1) / 2 * sp
    tube = (grids[0] - centre[0]) ** 2 + (grids[1] - centre[1]) ** 2 <= 1.0 ** 2
    offset = np.array([0.0, 2.6, 0.0]) if touching else np.array([0.0, 9.0, 6.0])
    sphere_centre = centre + offset
    sphere = sum((g - c) ** 2 for g, c in zip(grids, sphere_centre)) <= 2.0 ** 2
    image = np.full(shape, BACKGROUND, np.float32)
    image[tube | sphere] = BRIGHT
    image = ndimage.gaussian_filter(image, 0.5 / sp).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 0.02, shape).astype(np.float32)
    mask = np.ones(shape, bool)
    far_tube = tuple(np.round((centre + [0.0, 0.0, -12.0]) / sp).astype(int))
    return image, mask, tuple(np.round(sphere_centre / sp).astype(int)), far_tube, tube, sphere


@pytest.mark.parametrize("spacing,shape", [((0.8, 0.8, 0.8), (41, 49, 49)), ((3.0, 0.8, 0.8), (15, 49, 49))])
@pytest.mark.parametrize("touching", [True, False])
def test_tube_removed_sphere_kept(spacing, shape, touching):
    image, mask, sphere_centre, far_tube, tube, sphere = _scene(spacing, shape, touching)
    result = suppress_vessels(image, mask, spacing)
    assert result.image.shape == image.shape and result.image.dtype == np.float32
    assert result.vessel_mask.dtype == bool
    # the tube is brought down to the background ...
    assert image[far_tube] > 0.6
    assert result.image[far_tube] < BACKGROUND + 0.15 * (BRIGHT - BACKGROUND)
    assert result.vessel_mask[tube].mean() > 0.6
    # ... the sphere is not
    assert abs(result.image[sphere_centre] - image[sphere_centre]) < 0.1 * image[sphere_centre]
    assert not result.vessel_mask[sphere_centre]
    assert result.vessel_mask[sphere].mean() < 0.2
    assert np.mean(result.image[sphere]) > 0.9 * np.mean(image[sphere])
    assert set(result.timings) >= {"hessian", "inpaint"}


def test_isolated_round_blobs_and_noise_are_left_alone():
    rng = np.random.default_rng(3)
    shape, spacing = (33, 41, 41), (0.8, 0.8, 0.8)
    image = (BACKGROUND + rng.normal(0, 0.02, shape)).astype(np.float32)
    grids = np.meshgrid(*[np.arange(n) * 0.8 for n in shape], indexing="ij")
    for c, r in [((8, 10, 10), 1.6), ((14, 20, 22), 2.4), ((18, 25, 12), 1.2)]:
        image[sum((g - x) ** 2 for g, x in zip(grids, c)) <= r ** 2] = BRIGHT
    image = ndimage.gaussian_filter(image, 0.6).astype(np.float32)
    result = suppress_vessels(image, np.ones(shape, bool), spacing)
    assert result.vessel_mask.sum() < 0.002 * image.size
    assert np.abs(result.image - image).max() < 0.2


def test_deterministic_and_respects_mask():
    image, mask, *_ = _scene((0.8, 0.8, 0.8), (33, 41, 41))
    mask[:, :, :5] = False
    first = suppress_vessels(image, mask, (0.8, 0.8, 0.8))
    second = suppress_vessels(image, mask, (0.8, 0.8, 0.8))
    np.testing.assert_array_equal(first.vessel_mask, second.vessel_mask)
    np.testing.assert_array_equal(first.image, second.image)
    assert not first.vessel_mask[~mask].any()
    np.testing.assert_array_equal(first.image[~mask], image[~mask])


def test_closed_form_eigenvalues_match_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3, 3))
    sym = (a + a.transpose(0, 2, 1)) / 2
    sym[:5] = np.eye(3) * 2.0  # repeated eigenvalues
    sym[5:10] = np.diag([1.0, 1.0, -3.0])
    e1, e2, e3 = symmetric_eigenvalues(sym[:, 0, 0], sym[:, 1, 1], sym[:, 2, 2], sym[:, 0, 1], sym[:, 0, 2],
                                       sym[:, 1, 2])
    expected = np.linalg.eigvalsh(sym)[:, ::-1]
    np.testing.assert_allclose(np.stack([e1, e2, e3], 1), expected, atol=1e-6)


def test_inpainting_fills_thick_masks_from_the_outside():
    image = np.full((15, 15, 15), 0.3, np.float32)
    masked = np.zeros(image.shape, bool)
    masked[3:12, 3:12, 3:12] = True
    image[masked] = 1.0
    out = inpaint_mean_of_neighbours(image, masked, np.ones(image.shape, bool))
    np.testing.assert_allclose(out, 0.3, atol=1e-5)
