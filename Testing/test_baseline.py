"""The classical FRST baseline: same candidates, same post-processing, same output records."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from CMBDetectLib.baseline import detect_baseline
from CMBDetectLib.errors import InputError
from CMBDetectLib.evaluate import evaluate
from CMBDetectLib.preprocessing import ScanGrid
from CMBDetectLib.volume import Volume, atomic_write_text, write_volume_atomic

SHAPE = (24, 40, 40)
SPACING = 0.8


def gaussian(centre, sigma_vox):
    grid = np.indices(SHAPE).astype(float)
    return np.exp(-sum((grid[a] - centre[a]) ** 2 for a in range(3)) / (2 * sigma_vox ** 2))


def synthetic_features():
    image = sitk.Image(SHAPE[2], SHAPE[1], SHAPE[0], sitk.sitkFloat32)
    image.SetSpacing((SPACING,) * 3)
    image.SetOrigin((4.0, -2.0, 7.0))
    grid = ScanGrid.from_image(image, SPACING)            # 0.8 mm already: working grid = input grid
    assert grid.working_shape == SHAPE
    brain = np.zeros(SHAPE, bool)
    brain[2:22, 2:38, 2:38] = True
    frst = np.zeros(SHAPE, np.float32)
    frst += gaussian((12, 20, 20), 1.5)                    # a round CMB-like blob in the middle: kept
    frst += 0.6 * gaussian((8, 10, 28), 0.5)               # a tiny response (1 voxel above 0.5): "volume"
    frst[16, 30, 8:26] = 0.9                               # a line (vessel): "ellipticity"
    frst += gaussian((12, 4, 20), 1.5)                     # round but 2 voxels from the brain edge
    frst[0:2, 0:3, 0:3] = 1.0                              # outside the brain: ignored
    channels = np.stack([np.zeros(SHAPE, np.float32), np.clip(frst, 0, 1)])
    return SimpleNamespace(channels=channels, brain_mask=brain, spacing_zyx=(SPACING,) * 3, grid=grid)


def test_baseline_finds_the_round_blob_and_filters_the_rest():
    features = synthetic_features()
    result = detect_baseline(features, th_frst=0.5)
    by_reason = {c.reason: c for c in result.candidates}
    assert len(result.candidates) == 4
    assert set(by_reason) == {None, "volume", "ellipticity", "edge_distance"}
    kept = by_reason[None]
    assert kept.final and np.allclose(kept.centroid_ijk, (20, 20, 12), atol=0.01)    # i, j, k
    assert kept.p_det == pytest.approx(1.0, abs=1e-3) and kept.p_disc == kept.p_det
    assert kept.ellipticity < 0.05 and kept.edge_distance_mm > 4.0
    expected_ras = features.grid.working_index_to_ras(np.array([[12.0, 20.0, 20.0]]))[0]
    assert np.allclose(kept.centroid_ras, expected_ras, atol=0.01)
    assert by_reason["ellipticity"].ellipticity > 0.9

    labels = result.candidate_labels
    assert labels.array.shape == SHAPE and labels.array.dtype == np.uint16
    assert labels.array[12, 20, 20] == kept.id and labels.array[0, 0, 0] == 0
    final = result.final_labels().array
    assert set(np.unique(final)) == {0, kept.id}
    data = result.to_json_dict("x.nii.gz", "swi")
    assert data["schema"] == "cmbdetect.candidates/1" and data["model"]["name"] == "baseline-frst"
    assert data["parameters"]["th_disc"] == 0.0 and data["parameters"]["th_det"] == 0.5
    json.dumps(data, allow_nan=False)


def test_threshold_controls_what_is_a_candidate():
    features = synthetic_features()
    strict = detect_baseline(features, th_frst=0.95).candidates
    assert 0 < len(strict) < 4 and all(c.p_det >= 0.95 for c in strict)
    with pytest.raises(InputError):
        detect_baseline(features, th_frst=1.5)


def test_baseline_output_goes_through_evaluate(tmp_path):
    features = synthetic_features()
    result = detect_baseline(features)
    write_volume_atomic(result.final_labels(), tmp_path / "pred" / "s1_cmb.nii.gz")
    atomic_write_text(tmp_path / "pred" / "s1_candidates.json",
                      json.dumps(result.to_json_dict("s1.nii.gz", "swi")))
    truth = (gaussian((12, 20, 20), 1.5) > 0.5).astype(np.uint8)
    reference = result.candidate_labels
    write_volume_atomic(Volume(truth, reference.spacing, reference.origin, reference.direction),
                        tmp_path / "gt" / "s1.nii.gz")
    report = evaluate(tmp_path / "pred", tmp_path / "gt")
    scan = report.scans[0]
    assert (scan.clusterwise.tp, scan.clusterwise.fp, scan.clusterwise.fn) == (1, 0, 0)
    assert report.stage_summary()["candidate_detection"]["fp"] == 3
