"""Post-processing filters: each rule removes exactly what it should, in physical units."""

from __future__ import annotations

import numpy as np
import pytest

from CMBDetectLib.candidates import extract_candidates
from CMBDetectLib.postprocessing import (
    PostprocessingParameters,
    apply_postprocessing,
    component_ellipticities,
    edge_distance_mm,
    ellipticity,
)

ISO = (0.8, 0.8, 0.8)


def ball(shape, centre_mm, radius_mm, spacing, stretch=(1.0, 1.0, 1.0)):
    grid = np.indices(shape).astype(float)
    distance2 = sum(((grid[a] * spacing[a] - centre_mm[a]) / stretch[a]) ** 2 for a in range(3))
    return distance2 <= radius_mm ** 2


def test_defaults_are_the_papers_voxel_values_on_the_working_grid():
    params = PostprocessingParameters()
    assert params.min_volume_mm3 == pytest.approx(5 * 0.8 ** 3)
    assert params.max_ellipticity == 0.2
    assert params.min_edge_distance_mm == pytest.approx(5 * 0.8)


def test_each_rule_removes_exactly_what_it_should():
    shape = (40, 60, 60)
    brain = np.zeros(shape, bool)
    brain[2:38, 2:58, 2:58] = True
    prob = np.zeros(shape, np.float32)
    prob[ball(shape, (20 * 0.8, 30 * 0.8, 30 * 0.8), 2.0, ISO)] = 0.9     # sphere in the middle: kept
    prob[10, 15, 10:13] = 0.9                                            # 3 voxels: too small
    prob[30, 45, 10:30] = 0.9                                            # a long thin rod (16 mm)
    prob[ball(shape, (20 * 0.8, 5.5 * 0.8, 30 * 0.8), 1.7, ISO)] = 0.9   # sphere near the edge
    labels, candidates = extract_candidates(prob, 0.5, ISO)
    assert len(candidates) == 4
    distance = edge_distance_mm(brain, ISO)
    reasons, shapes = apply_postprocessing(candidates, labels, distance, ISO, PostprocessingParameters())

    by_place = {}
    for c in candidates:
        k, j, i = (round(v) for v in c.centroid_kji)
        by_place[("middle" if (j, i) == (30, 30) else "small" if c.volume_voxels == 3
                  else "rod" if c.volume_voxels == 20 else "edge")] = c.label
    assert reasons[by_place["middle"]] is None
    assert reasons[by_place["small"]] == "volume"
    assert reasons[by_place["rod"]] == "ellipticity"
    assert reasons[by_place["edge"]] == "edge_distance"

    # each removed candidate fails only its own rule (the others would keep it)
    rod, edge, middle = shapes[by_place["rod"]], shapes[by_place["edge"]], shapes[by_place["middle"]]
    assert rod.ellipticity > 0.8 and rod.edge_distance_mm > 4.0 and rod.volume_mm3 > 2.56
    assert edge.ellipticity < 0.1 and edge.volume_mm3 > 2.56
    assert edge.edge_distance_mm == pytest.approx((5.5 - 1) * 0.8, abs=0.1)   # to the voxel j = 1
    assert middle.ellipticity < 0.05 and middle.edge_distance_mm > 10
    small = shapes[by_place["small"]]
    assert small.edge_distance_mm > 4.0


def test_first_failing_rule_wins_and_thresholds_are_parameters():
    shape = (20, 20, 30)
    brain = np.zeros(shape, bool)
    brain[1:19, 1:19, 1:29] = True
    prob = np.zeros(shape, np.float32)
    prob[10, 2, 3:6] = 0.9          # small, elongated and at the edge: "volume" wins
    labels, candidates = extract_candidates(prob, 0.5, ISO)
    distance = edge_distance_mm(brain, ISO)
    reasons, shapes = apply_postprocessing(candidates, labels, distance, ISO)
    assert reasons == {1: "volume"}
    loose = PostprocessingParameters(min_volume_mm3=0.0)
    reasons, _ = apply_postprocessing(candidates, labels, distance, ISO, loose, shapes=shapes)
    assert reasons == {1: "ellipticity"}
    looser = PostprocessingParameters(min_volume_mm3=0.0, max_ellipticity=1.0)
    assert apply_postprocessing(candidates, labels, distance, ISO, looser)[0] == {1: "edge_distance"}
    off = PostprocessingParameters(min_volume_mm3=0.0, max_ellipticity=1.0, min_edge_distance_mm=0.0)
    assert apply_postprocessing(candidates, labels, distance, ISO, off)[0] == {1: None}
    # a boolean brain mask is accepted in place of the distance map
    assert apply_postprocessing(candidates, labels, brain, ISO)[0] == {1: "volume"}


def test_exactly_five_voxels_pass_the_volume_rule():
    prob = np.zeros((12, 12, 12), np.float32)
    prob[6, 5:8, 6] = prob[6, 6, 5] = prob[6, 6, 7] = 0.9      # a plus sign, 5 voxels
    labels, candidates = extract_candidates(prob, 0.5, ISO)
    reasons, _ = apply_postprocessing(candidates, labels, np.full(prob.shape, 100.0), ISO)
    assert reasons == {1: None}


def test_sphere_is_round_and_rods_are_elongated():
    assert ellipticity(ball((21, 21, 21), (8, 8, 8), 3.0, ISO), ISO) < 0.02
    rod = np.zeros((5, 5, 20), bool)
    rod[2, 2, 2:18] = True
    assert ellipticity(rod, ISO) == pytest.approx(1 - 1 / 16, abs=0.01)  # 1 - width / length
    thick_rod = np.zeros((6, 6, 20), bool)
    thick_rod[2:4, 2:4, 2:12] = True
    assert ellipticity(thick_rod, ISO) == pytest.approx(0.8, abs=0.01)   # 2 voxels wide, 10 long
    # an in-plane ellipse with axes 2:1 (the paper's 0.2 rejects it)
    assert 0.4 < ellipticity(ball((21, 31, 31), (8, 12, 12), 2.5, ISO, stretch=(1, 1, 2)), ISO) < 0.6


def test_tiny_components_are_well_defined():
    one = np.zeros((3, 3, 3), bool)
    one[1, 1, 1] = True
    assert ellipticity(one, ISO) == 0.0
    assert ellipticity(np.zeros((3, 3, 3), bool), ISO) == 0.0
    two = np.zeros((3, 3, 3), bool)
    two[1, 1, 1:3] = True
    assert ellipticity(two, ISO) == pytest.approx(0.5)        # sqrt((0.64/12) / (0.64/4 + 0.64/12))
    for value in (ellipticity(one, (3.0, 0.9, 0.8)), ellipticity(two, (5.0, 0.8, 0.8))):
        assert 0.0 <= value <= 1.0


def test_ellipticity_is_spacing_aware_on_thick_slices():
    thick = (3.0, 0.8, 0.8)
    shape = (9, 31, 31)
    for radius in (1.5, 2.0, 2.5, 3.0, 4.0, 5.0):
        for offset in (0.0, 1.5):                              # centred on a slice, or between two
            round_blob = ball(shape, (12.0 + offset, 12.0, 12.0), radius, thick)
            assert ellipticity(round_blob, thick) < 0.2, (radius, offset)
    # In-plane millimetres count, not voxels: round in voxels, 2:1 in mm when i is sampled twice as coarsely.
    voxel_round = ball((13, 13, 13), (6, 6, 6), 2.5, (1, 1, 1))
    assert ellipticity(voxel_round, (1, 1, 1)) < 0.05
    assert ellipticity(voxel_round, (0.8, 0.8, 1.6)) > 0.4
    # A vessel lying in the plane is caught on thick slices too.
    vessel = np.zeros((3, 5, 25), bool)
    vessel[1, 2, 2:22] = True
    assert ellipticity(vessel, thick) > 0.9


def test_ellipticity_ignores_the_blooming_along_b0():
    """A CMB blooms along B0 (k, S-I): stretched 3x along k it is still round; a rod in the plane is not."""
    bloom = ball((41, 21, 21), (16, 8, 8), 2.5, ISO, stretch=(3.0, 1.0, 1.0))
    assert ellipticity(bloom, ISO) < 0.05
    on_thick_slices = ball((15, 31, 31), (21, 12, 12), 2.5, (3.0, 0.8, 0.8), stretch=(3.0, 1.0, 1.0))
    assert ellipticity(on_thick_slices, (3.0, 0.8, 0.8)) < 0.2
    # The price (documented): a vessel running along B0 is a dot in every slice, left to the discriminator.
    along_b0 = np.zeros((20, 5, 5), bool)
    along_b0[2:18, 2, 2] = True
    assert ellipticity(along_b0, ISO) < 0.05


def test_a_coarse_in_plane_axis_is_judged_like_thick_slices():
    """Coronal thick slices (j coarse): a small blob crossing <= 3 of them is judged along i only."""
    coronal = (0.8, 3.0, 0.8)
    blob = ball((31, 9, 31), (12.0, 12.0, 12.0), 2.5, coronal)
    assert ellipticity(blob, coronal) < 0.2
    rod = np.zeros((5, 12, 5), bool)
    rod[2, 1:11, 2] = True                                     # 30 mm along the coarse axis: still a rod
    assert ellipticity(rod, coronal) > 0.9


def test_vectorised_ellipticities_match_single_component_ones():
    rng = np.random.default_rng(3)
    labels = np.zeros((20, 30, 30), np.int32)
    for label in range(1, 8):
        k, j, i = rng.integers([1, 1, 1], [17, 25, 25])
        labels[k:k + rng.integers(1, 4), j:j + rng.integers(1, 5), i:i + rng.integers(1, 6)] = label
    spacing = (3.0, 0.9, 0.8)
    vectorised = component_ellipticities(labels, spacing)
    for label in range(1, 8):
        if (labels == label).any():
            assert vectorised[label - 1] == pytest.approx(ellipticity(labels == label, spacing))


def test_edge_distance_is_in_millimetres():
    brain = np.zeros((10, 10, 30), bool)
    brain[1:9, 1:9, 1:29] = True
    distance = edge_distance_mm(brain, (3.0, 0.8, 0.8))
    assert distance[0, 5, 15] == 0
    assert distance[1, 5, 15] == pytest.approx(3.0)        # one thick slice to the boundary
    assert distance[5, 5, 1] == pytest.approx(0.8)         # one in-plane voxel
    assert distance[5, 5, 15] == pytest.approx(3.2)        # 4 in-plane voxels < 2 slices (6 mm)
    full = edge_distance_mm(np.ones((5, 5, 5), bool), ISO)          # no boundary inside: the image border
    assert np.isfinite(full).all() and full[2, 2, 2] == pytest.approx(3 * 0.8) and full[0, 2, 2] == 0.8


def test_the_vectorised_filter_agrees_with_removal_reason():
    from CMBDetectLib.postprocessing import (
        CandidateShape,
        PostprocessingParameters,
        passes_shape_filters,
        removal_reason,
    )

    params = PostprocessingParameters()
    # 5 voxels x 0.512 mm^3 is exactly the paper's minimum, whatever the float rounding
    volumes = np.array([5 * 0.8 ** 3, 2.0, 10.0, 10.0, 10.0])
    ellipticities = np.array([0.0, 0.0, 0.2, 0.21, 0.0])
    edges = np.array([5.0, 5.0, 5.0, 5.0, 3.9])
    mask = passes_shape_filters(volumes, ellipticities, edges, params)
    expected = [removal_reason(CandidateShape(i, v, e, d), params) is None
                for i, (v, e, d) in enumerate(zip(volumes, ellipticities, edges))]
    assert mask.tolist() == expected == [True, False, True, False, False]
