"""Anatomical regions: a phantom warped by a known affine, CMBs at known atlas regions."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nilearn")

from CMBDetectLib.anatomy.atlas import REGIONS, load_atlas, region_centres_mni  # noqa: E402
from CMBDetectLib.anatomy.phantom import known_transform, make_head_phantom  # noqa: E402
from CMBDetectLib.anatomy.regions import Parcellation, assign_regions, read_parcellation_table  # noqa: E402
from CMBDetectLib.anatomy.registration import register_to_atlas  # noqa: E402
from CMBDetectLib.errors import InputError  # noqa: E402
from CMBDetectLib.volume import Volume  # noqa: E402

FLIP = np.array([-1.0, -1.0, 1.0])


def _mni_to_scan(transform, points_mni: np.ndarray) -> np.ndarray:
    inverse = transform.GetInverse()
    return np.array([inverse.TransformPoint([float(v) for v in p * FLIP]) for p in points_mni]) * FLIP


@pytest.fixture(scope="module")
def atlas():
    return load_atlas()


@pytest.fixture(scope="module")
def centres(atlas):
    return region_centres_mni(atlas)


def test_atlas_has_every_region_on_both_sides(atlas, centres):
    for region in REGIONS:
        for side in ("left", "right"):
            assert f"{side}_{region.key}" in centres, f"{side} {region.key} missing from the atlas"
    # The rules are symmetric (the ICBM 2009a *sym* template): mirrored centres agree to a few mm.
    for region in REGIONS:
        left, right = centres[f"left_{region.key}"], centres[f"right_{region.key}"]
        assert np.linalg.norm(left * [-1, 1, 1] - right) < 12.0, region.key
    # Spot checks of textbook MNI coordinates.
    from CMBDetectLib.anatomy.atlas import mni_to_index

    labels = __import__("SimpleITK").GetArrayFromImage(atlas.labels)
    expected = {(-12, -18, 8): "thalamus", (24, 4, 2): "basal_ganglia", (-40, 30, 30): "frontal",
                (0, -55, -35): "cerebellum", (2, -28, -30): "brainstem", (50, -20, -15): "temporal",
                (-35, -55, 50): "parietal", (15, -95, 5): "occipital", (0, 0, 22): "corpus_callosum",
                (40, -5, 5): "insula"}
    for point, key in expected.items():
        k, j, i = np.rint(mni_to_index(atlas.labels, np.array(point, float))[0]).astype(int)
        assert atlas.region(labels[k, j, i]).key.startswith(key), (point, atlas.region(labels[k, j, i]).key)


@pytest.mark.parametrize("modality", ["t2s", "qsm"])
def test_phantom_cmbs_get_the_right_region(atlas, centres, modality):
    # UK Biobank-like grid (0.8 x 0.8 x 3 mm, 256 x 288 x 48), rotated, scaled and shifted.
    truth = known_transform(rotation_deg=(9.0, -6.0, 7.0), scale=(1.07, 0.94, 1.03),
                            translation_mm=(7, -10, 12))
    scan, _ = make_head_phantom(truth, modality=modality, spacing=(0.8, 0.8, 3.0), size=(256, 288, 48),
                                noise=0.05, seed=3, atlas=atlas)
    result = register_to_atlas(scan, atlas=atlas)
    assert result.dice > 0.9 and result.structure > 0.3
    assert result.seconds < 30

    names = sorted(centres)
    mni_truth = np.array([centres[n] for n in names])
    scan_points = _mni_to_scan(truth, mni_truth)
    # Registration accuracy at the region centres: well below the 2 mm atlas voxel.
    error_mm = np.linalg.norm(result.scan_to_mni(scan_points) - mni_truth, axis=1)
    assert error_mm.mean() < 1.5 and error_mm.max() < 3.0, error_mm
    regions = assign_regions(scan_points, result)
    wrong = [(n, r.side, r.region) for n, r in zip(names, regions) if f"{r.side}_{r.region}" != n]
    assert not wrong, wrong
    # The same answer from the atlas warped onto the scan grid (the report's overlay path).
    warped = result.warp_to_scan(scan, "labels")
    again = assign_regions(scan_points, warped, registration=result)
    agree = np.mean([a.region == b.region for a, b in zip(regions, again)])
    assert agree > 0.9


def test_point_just_outside_the_brain_takes_nearest_region_or_unknown(atlas):
    import SimpleITK as sitk

    from CMBDetectLib.anatomy.registration import RegistrationResult

    identity = RegistrationResult(sitk.AffineTransform(3), 1.0, 1.0, atlas, 0.0)
    near, far = assign_regions(np.array([[0.0, 0.0, 78.0], [0.0, 0.0, 140.0]]), identity)
    assert near.category == "lobar" and 0 < near.distance_mm <= 6.0
    assert far.category == "unknown"


def test_user_parcellation_with_table(tmp_path):
    labels = np.zeros((20, 30, 40), np.int16)
    labels[:, :, :20] = 3      # array axis 2 is i; with identity LPS geometry low i = patient right
    labels[:, :, 20:] = 4
    labels[:5] = 7
    volume = Volume(labels, spacing=(1.0, 1.0, 2.0))
    table = tmp_path / "table.csv"
    table.write_text("label,region,category\n3,Right-Putamen,deep\n4,Left_Frontal_Lobe,lobar\n"
                     "7,Brain-Stem,infratentorial\n", encoding="utf-8")
    parcellation = Parcellation(volume, read_parcellation_table(table))
    ras = volume.index_to_ras(np.array([[10, 15, 5], [10, 15, 30], [2, 15, 30], [10, 15, 60]], float))
    infos = assign_regions(ras, parcellation)
    assert [(i.region, i.category, i.side) for i in infos[:3]] == [
        ("Right-Putamen", "deep", "right"), ("Left_Frontal_Lobe", "lobar", "left"),
        ("Brain-Stem", "infratentorial", "unknown")]
    assert infos[0].name == "Putamen" and infos[0].label == "right Putamen"
    assert infos[3].category == "unknown"   # outside the grid


def test_bad_parcellation_table_is_refused(tmp_path):
    table = tmp_path / "bad.csv"
    table.write_text("label,region,category\n1,Thalamus,subcortical\n", encoding="utf-8")
    with pytest.raises(InputError, match="category"):
        read_parcellation_table(table)
    table.write_text("id,name\n1,x\n", encoding="utf-8")
    with pytest.raises(InputError, match="columns"):
        read_parcellation_table(table)
