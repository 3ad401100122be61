"""3D fast radial symmetry transform: round blobs peak at their centre, tubes score lower."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from CMBDetectLib.frst import frst_3d


def _scene(spacing, shape, radius_mm=2.4, blob_value=0.1, background=0.6):
    """A dark sphere and a dark tube of the same radius (raw SWI-like), both physically round."""
    sp = np.asarray(spacing, float)
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp)], indexing="ij")
    centre = (np.array(shape) - 1) // 2 * sp
    sphere_centre = centre + np.array([0.0, 0.0, -9.0])
    sphere = sum((g - c) ** 2 for g, c in zip(grids, sphere_centre)) <= radius_mm ** 2
    tube = ((grids[0] - centre[0]) ** 2 + (grids[1] - centre[1] - 8.0) ** 2 <= radius_mm ** 2) \
        & (np.abs(grids[2] - centre[2] - 4.0) < 12.0)
    image = np.full(shape, background, np.float32)
    image[sphere | tube] = blob_value
    image = ndimage.gaussian_filter(image, 0.5 / sp).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 0.01, shape).astype(np.float32)
    return image, np.round(sphere_centre / sp).astype(int), sphere, tube


@pytest.mark.parametrize("spacing,shape", [((0.8, 0.8, 0.8), (41, 49, 49)), ((3.0, 0.8, 0.8), (13, 49, 49))])
def test_dark_sphere_peaks_at_centre_and_beats_tube(spacing, shape):
    image, centre, sphere, tube = _scene(spacing, shape)
    response = frst_3d(image, spacing, polarity="dark", normalise=None)
    assert response.shape == image.shape and response.dtype == np.float32
    peak = np.unravel_index(np.argmax(response), response.shape)
    # within one voxel of the centre on every axis
    assert np.all(np.abs(np.array(peak) - centre) <= 1), (peak, centre)
    assert response[sphere].max() > 2.0 * response[tube].max()
    # bright polarity on the raw (dark-blob) image gives nothing comparable at the centre
    bright = frst_3d(image, spacing, polarity="bright", normalise=None)
    assert bright[tuple(centre)] < 0.2 * response[tuple(centre)]


@pytest.mark.parametrize("spacing,shape", [((0.8, 0.8, 0.8), (41, 49, 49)), ((3.0, 0.8, 0.8), (13, 49, 49))])
def test_bright_after_inversion_matches_dark(spacing, shape):
    image, centre, sphere, tube = _scene(spacing, shape)
    inverted = 1.0 - image
    bright = frst_3d(inverted, spacing, polarity="bright", normalise=None)
    dark = frst_3d(image, spacing, polarity="dark", normalise=None)
    np.testing.assert_allclose(bright, dark, rtol=1e-4, atol=1e-6)
    normalised = frst_3d(inverted, spacing)
    assert normalised.min() >= 0 and normalised.max() <= 1
    assert normalised[tuple(centre)] > 0.9
    assert np.percentile(normalised, 95) < 0.1


def test_anisotropic_response_is_close_to_isotropic():
    """A physically round sphere gives a similar peak on 0.8 mm and on 0.8 x 0.8 x 2.4 mm grids."""
    iso, _, s_iso, _ = _scene((0.8, 0.8, 0.8), (41, 49, 49))
    aniso, _, s_aniso, _ = _scene((2.4, 0.8, 0.8), (15, 49, 49))
    r_iso = frst_3d(iso, (0.8, 0.8, 0.8), polarity="dark", normalise=None)[s_iso].max()
    r_aniso = frst_3d(aniso, (2.4, 0.8, 0.8), polarity="dark", normalise=None)[s_aniso].max()
    assert 0.4 < r_aniso / r_iso < 2.5


def test_radius_selectivity_and_edge_cases():
    spacing = (0.8, 0.8, 0.8)
    image, centre, _, _ = _scene(spacing, (41, 49, 49), radius_mm=2.4)
    matched = frst_3d(image, spacing, radii=(3,), polarity="dark", normalise=None)[tuple(centre)]
    mismatched = frst_3d(image, spacing, radii=(8,), polarity="dark", normalise=None)[tuple(centre)]
    assert matched > 3 * mismatched
    assert np.all(frst_3d(np.zeros((12, 12, 12)), spacing) == 0)
    with pytest.raises(ValueError):
        frst_3d(image, spacing, polarity="round")
