"""Stage-1 candidate extraction and patch cropping."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from CMBDetectLib.candidates import extract_candidates, extract_patches


def test_components_are_26_connected_and_described():
    prob = np.zeros((10, 12, 14), dtype=np.float32)
    prob[2, 2, 2] = 0.9
    prob[3, 3, 3] = 0.7           # touches (2, 2, 2) only by a corner: same component with 26-connectivity
    prob[7, 8, 9:12] = [0.6, 0.95, 0.6]
    prob[0, 11, 13] = 0.4         # below the threshold
    labels, candidates = extract_candidates(prob, 0.5, (3.0, 0.8, 0.8))

    assert labels.dtype == np.int32
    assert len(candidates) == 2
    first, second = candidates
    assert first.label == 1 and second.label == 2
    assert first.volume_voxels == 2
    assert first.centroid_kji == pytest.approx((2.5, 2.5, 2.5))
    assert first.peak_kji == (2, 2, 2)
    assert first.p_det == pytest.approx(0.9)
    assert first.bbox == ((2, 4), (2, 4), (2, 4))
    assert second.volume_voxels == 3
    assert second.volume_mm3 == pytest.approx(3 * 3.0 * 0.8 * 0.8)
    assert second.peak_kji == (7, 8, 10)
    assert second.centroid_kji == pytest.approx((7.0, 8.0, 10.0))
    assert np.array_equal(labels[second.slices] == 2, prob[second.slices] >= 0.5)
    assert labels[0, 11, 13] == 0


def test_threshold_is_inclusive_and_empty_map_gives_no_candidates():
    prob = np.zeros((4, 4, 4), dtype=np.float32)
    labels, candidates = extract_candidates(prob, 0.5, (1, 1, 1))
    assert candidates == [] and not labels.any()
    prob[1, 1, 1] = 0.5
    assert len(extract_candidates(prob, 0.5, (1, 1, 1))[1]) == 1


def test_peak_ties_resolve_to_the_lowest_index():
    prob = np.zeros((3, 3, 5), dtype=np.float32)
    prob[1, 1, 1:4] = 0.8
    _, candidates = extract_candidates(prob, 0.5, (1, 1, 1))
    assert candidates[0].peak_kji == (1, 1, 1)


def test_statistics_match_scipy_on_a_ukbb_sized_map():
    rng = np.random.default_rng(0)
    prob = (rng.uniform(0, 0.3, (48, 288, 256))).astype(np.float32)
    for _ in range(220):
        k, j, i = rng.integers([2, 5, 5], [46, 283, 251])
        r = int(rng.integers(1, 3))
        prob[k - 1:k + 1, j - r:j + r, i - r:i + r] = rng.uniform(0.5, 1.0, (2, 2 * r, 2 * r))
    labels, candidates = extract_candidates(prob, 0.5, (3.0, 0.8, 0.8))
    assert len(candidates) > 150
    index = range(1, len(candidates) + 1)
    centres = ndimage.center_of_mass(labels > 0, labels, index)
    assert np.allclose(centres, [c.centroid_kji for c in candidates])
    maxima = ndimage.maximum(prob, labels, index)
    assert np.allclose(maxima, [c.p_det for c in candidates])
    assert all(labels[c.peak_kji] == c.label and prob[c.peak_kji] == c.p_det for c in candidates)
    # Speed is measured by benchmarks/bench_detect.py (Th_Cdet re-filter), not asserted here.


def test_patches_are_centred_and_zero_padded():
    channels = np.arange(2 * 10 * 11 * 12, dtype=np.float32).reshape(2, 10, 11, 12) + 1
    patches = extract_patches(channels, [[5.0, 5.4, 5.5], [0, 0, 0], [100, 100, 100]], size=6)
    assert patches.shape == (3, 2, 6, 6, 6)
    # centre (5, 5, 6) (half rounds up) sits at index size // 2 = 3
    assert patches[0, 1, 3, 3, 3] == channels[1, 5, 5, 6]
    assert np.array_equal(patches[0], channels[:, 2:8, 2:8, 3:9])
    # at the corner, the part before the image is zero and the rest is the image
    assert not patches[1, :, :3].any() and not patches[1, :, :, :3].any()
    assert np.array_equal(patches[1, :, 3:, 3:, 3:], channels[:, :3, :3, :3])
    assert not patches[2].any()


def test_patches_of_no_centres():
    assert extract_patches(np.zeros((2, 5, 5, 5)), np.zeros((0, 3)), size=4).shape == (0, 2, 4, 4, 4)
