"""Synthetic data generator: requested CMBs, geometry, determinism, contrast, dataset layout, --into, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from CMBDetectLib.synth import CMBSpec, SynthConfig, generate_case
from CMBDetectLib.synth.anatomy import REGION_CODES, REGION_GROUPS, build_anatomy
from CMBDetectLib.synth.dataset_writer import write_case
from CMBDetectLib.synth.insert import insert_cmbs
from CMBDetectLib.synth.signal import field_from_chi, sphere_field_ppm
from CMBDetectLib.volume import Volume, read_volume, write_volume_atomic

REPO = Path(__file__).resolve().parents[1]

# Small and fast: procedural phantom on a 2 mm head grid, 1 mm in-plane, a few veins.
FAST = dict(anatomy="procedural", head_spacing_mm=2.0, in_plane_range_mm=(1.0, 1.0), slice_thickness_mm=1.5,
            fov_mm=(170.0, 200.0), fov_z_range_mm=(110.0, 110.0), vessel_density=0.3, max_rotation_deg=6.0)
REGIONS = ["subcortical_wm", "cortex_gwj", "basal_ganglia", "thalamus", "cerebellum"]


@pytest.fixture(scope="module")
def requested_cases():
    """The same five requested 2 mm CMBs rendered as T2*, SWI and QSM."""
    specs = [CMBSpec(radius_mm=2.0, region=region, touch_vessel=False) for region in REGIONS]
    return {modality: generate_case(11, modality, config=SynthConfig(**FAST, calcification_rate=0.0),
                                    cmbs=specs) for modality in ("t2s", "swi", "qsm")}


def _instance_stats(case):
    labels = case.instances.array
    ids = [int(v) for v in np.unique(labels) if v]
    centroids = ndimage.center_of_mass(np.ones_like(labels), labels, ids)
    return ids, {i: np.asarray(c) for i, c in zip(ids, centroids)}


@pytest.mark.parametrize("modality", ["t2s", "swi", "qsm"])
def test_requested_cmbs_count_size_location(requested_cases, modality):
    case = requested_cases[modality]
    ids, centroids = _instance_stats(case)
    assert ids == [1, 2, 3, 4, 5]
    assert [c.region for c in case.cmbs] == REGIONS
    assert all(c.region_group == REGION_GROUPS[c.region] for c in case.cmbs)
    sphere_mm3 = 4.0 / 3.0 * np.pi * 2.0 ** 3
    voxel_mm3 = float(np.prod(case.image.spacing))
    for record in case.cmbs:
        assert record.radius_mm == pytest.approx(2.0)
        volume_mm3 = float((case.instances.array == record.id).sum()) * voxel_mm3
        assert volume_mm3 == pytest.approx(record.volume_mm3, rel=1e-3)
        if modality == "qsm":   # the sphere itself, up to partial volume
            assert 0.6 * sphere_mm3 <= volume_mm3 <= 1.6 * sphere_mm3
        else:                   # dark blob: the sphere plus blooming, never a huge smear
            assert 0.8 * sphere_mm3 <= volume_mm3 <= 12.0 * sphere_mm3
        centroid_ras = case.image.index_to_ras(centroids[record.id])[0]
        assert np.linalg.norm(centroid_ras - np.array(record.centre_ras)) < 1.0
        kji = np.rint(record.centre_kji).astype(int)
        assert case.instances.array[tuple(kji)] == record.id


def test_geometry_and_label_grid(requested_cases, tmp_path):
    case = requested_cases["swi"]
    assert case.image.spacing[2] == pytest.approx(1.5)
    assert case.image.spacing[0] == pytest.approx(1.0) and case.image.spacing[1] == pytest.approx(1.0)
    assert case.image.array.shape == (int(round(110 / 1.5)), 200, 170)
    for volume in (case.label, case.instances, case.brain_mask):
        assert volume.same_grid(case.image)
    assert case.label.array.dtype == np.uint8 and case.instances.array.dtype == np.uint16
    np.testing.assert_array_equal(case.label.array, (case.instances.array > 0).astype(np.uint8))
    paths = write_case(case, tmp_path, "synth_swi_00000")
    for key in ("image", "label", "instances"):
        back = read_volume(paths[key])
        assert back.same_grid(case.image, tolerance=1e-6)
        assert np.allclose(back.origin, case.image.origin) and np.allclose(back.spacing, case.image.spacing)
    np.testing.assert_array_equal(read_volume(paths["instances"]).array, case.instances.array)


@pytest.mark.parametrize("modality", ["swi", "t2s"])
def test_cmbs_are_dark_on_magnitude(requested_cases, modality):
    case = requested_cases[modality]
    image = case.image.array
    for record in case.cmbs:
        blob = case.instances.array == record.id
        ring = ndimage.binary_dilation(blob, iterations=4) & ~ndimage.binary_dilation(blob, iterations=2)
        ring &= case.brain_mask.array > 0
        assert image[blob].mean() < 0.6 * np.median(image[ring]), record


def test_cmbs_are_bright_on_qsm(requested_cases):
    case = requested_cases["qsm"]
    for record in case.cmbs:
        blob = case.instances.array == record.id
        ring = ndimage.binary_dilation(blob, iterations=4) & ~ndimage.binary_dilation(blob, iterations=2)
        assert case.image.array[blob].mean() > np.median(case.image.array[ring]) + 0.15


def test_calcifications_dark_on_swi_and_negative_on_qsm():
    config = SynthConfig(**FAST, calcification_rate=8.0, iron_rate=0.0)
    qsm = generate_case(5, "qsm", config=config, n_cmbs=0)
    swi = generate_case(5, "swi", config=config, n_cmbs=0)
    calcifications = [m for m in qsm.mimics if m.kind == "calcification" and m.radius_mm >= 1.5]
    assert calcifications, "the high calcification rate should place some"
    assert [m.centre_kji for m in swi.mimics] == [m.centre_kji for m in qsm.mimics]
    for mimic in calcifications:
        k, j, i = np.rint(mimic.centre_kji).astype(int)
        qsm_local = qsm.image.array[k, j - 8:j + 9, i - 8:i + 9]
        assert qsm.image.array[k, j, i] < np.median(qsm_local) - 0.1
        swi_local = swi.image.array[k, j - 8:j + 9, i - 8:i + 9]
        assert swi.image.array[k, j, i] < 0.6 * np.median(swi_local)
    assert len(qsm.cmbs) == 0 and not qsm.instances.array.any()


def test_same_seed_identical_other_seed_different():
    config = SynthConfig(**FAST)
    a = generate_case(3, "swi", config=config, index=2, n_cmbs=3)
    b = generate_case(3, "swi", config=config, index=2, n_cmbs=3)
    c = generate_case(4, "swi", config=config, index=2, n_cmbs=3)
    np.testing.assert_array_equal(a.image.array, b.image.array)
    np.testing.assert_array_equal(a.instances.array, b.instances.array)
    assert [r.to_dict() for r in a.cmbs] == [r.to_dict() for r in b.cmbs]
    assert a.parameters == b.parameters
    assert a.image.array.shape != c.image.array.shape or not np.array_equal(a.image.array, c.image.array)
    assert [r.centre_ras for r in a.cmbs] != [r.centre_ras for r in c.cmbs]


def test_procedural_anatomy_without_nilearn(monkeypatch):
    import CMBDetectLib.synth.anatomy as anatomy_module

    monkeypatch.setattr(anatomy_module, "_template_directory", lambda: None)
    anatomy = build_anatomy(np.random.default_rng(0), "auto", spacing=2.0)
    assert anatomy.source == "procedural"
    for name, code in REGION_CODES.items():
        assert (anatomy.region == code).sum() > 5, name
    assert anatomy.ventricles.any() and (anatomy.nuclei > 0).any()
    other = build_anatomy(np.random.default_rng(1), "procedural", spacing=2.0)
    assert not np.array_equal(anatomy.gm, other.gm)


def test_sphere_field_matches_fft_dipole():
    """The analytic sphere field used for CMBs equals the k-space dipole convolution."""
    n, h, radius = 64, 0.25, 2.0
    axis = (np.arange(n) - n / 2) * h
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    chi = ((z ** 2 + y ** 2 + x ** 2) <= radius ** 2).astype(np.float32)
    numeric = field_from_chi(chi, (h, h, h), pad_fraction=0.5)
    points = np.array([[3.0, 0, 0], [0, 3.0, 0], [2.5, 2.5, 0], [0, 0, 4.0], [-3.5, 0, 0]])
    exact = sphere_field_ppm(points, radius, 1.0)
    index = np.rint(points / h + n / 2).astype(int)
    measured = numeric[tuple(index.T)]
    # A voxelised sphere differs from the exact one by a few per cent.
    np.testing.assert_allclose(measured, exact, rtol=0.08, atol=0.005)
    assert exact[0] > 0 and exact[1] < 0   # along B0 positive, in-plane negative


def _phantom(shape=(48, 96, 96), spacing=(1.0, 1.0, 1.5)) -> Volume:
    rng = np.random.default_rng(0)
    k, j, i = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape) - 1) / 2
    inside = (((k - centre[0]) / 20) ** 2 + ((j - centre[1]) / 40) ** 2 + ((i - centre[2]) / 38) ** 2) <= 1
    array = np.where(inside, 800.0, 0.0) + np.abs(rng.normal(0, 15, shape))
    return Volume(array.astype(np.float32), spacing, (-70.0, -50.0, 10.0))


def test_insert_adds_exactly_k_cmbs_inside_brain_and_keeps_far_voxels():
    volume = _phantom()
    result = insert_cmbs(volume, 3, modality="swi", seed=2)
    ids = [int(v) for v in np.unique(result.instances.array) if v]
    assert ids == [1, 2, 3] and len(result.cmbs) == 3
    assert result.image.same_grid(volume) and result.instances.same_grid(volume)
    labelled = result.instances.array > 0
    assert np.all(result.brain_mask.array[labelled] > 0)
    assert result.image.array[labelled].mean() < 0.5 * np.median(volume.array[result.brain_mask.array > 0])
    # Far from every inserted CMB (beyond its field box) the image is bit-for-bit unchanged.
    distance = np.full(volume.array.shape, np.inf)
    grid = np.indices(volume.array.shape).reshape(3, -1).T * np.asarray(volume.spacing_zyx)
    for record in result.cmbs:
        centre = np.asarray(record.centre_kji) * np.asarray(volume.spacing_zyx)
        distance = np.minimum(distance, np.linalg.norm(grid - centre, axis=1).reshape(volume.array.shape))
    far = distance > 35.0
    assert far.sum() > 1000
    np.testing.assert_array_equal(result.image.array[far], volume.array[far])
    # QSM: added, positive.
    qsm = Volume(np.where(volume.array > 100, rng_noise(volume.array.shape), 0).astype(np.float32),
                 volume.spacing, volume.origin)
    added = insert_cmbs(qsm, 2, modality="qsm", seed=1, mask=result.brain_mask)
    blobs = added.instances.array > 0
    assert blobs.any() and (added.image.array - qsm.array)[blobs].min() > 0.1


def rng_noise(shape):
    return np.random.default_rng(1).normal(0.0, 0.01, shape)


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "CMBDetect") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "CMBDetectLib", "synth", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def test_cli_writes_valid_dataset(tmp_path):
    out = tmp_path / "dataset"
    done = _run_cli("--out", str(out), "--n", "2", "--seed", "7", "--modality", "mixed", "--anatomy",
                    "procedural", "--anatomy-spacing", "2", "--slice-thickness", "3", "--in-plane", "1.0",
                    "1.0", "--min-cmbs", "1", "--max-cmbs", "4")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("wrote 2 cases")
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 2 and dataset["labels"] == {"background": 0, "cmb": 1}
    assert dataset["file_ending"] == ".nii.gz"
    for case in dataset["cmbdetect"]["cases"]:
        assert case.startswith("synth_") and case[-5:].isdigit()
        image = read_volume(out / "imagesTr" / f"{case}_0000.nii.gz")
        label = read_volume(out / "labelsTr" / f"{case}.nii.gz")
        instances = read_volume(out / "cmbdetect" / "instances" / f"{case}.nii.gz")
        review = json.loads((out / "cmbdetect" / "reviews" / f"{case}.json").read_text())
        assert label.array.dtype == np.uint8 and instances.array.dtype == np.uint16
        assert label.same_grid(image) and instances.same_grid(image)
        assert image.spacing[2] == pytest.approx(3.0)
        assert review["schema"] == "cmbdetect.review/1" and review["source"] == "synthetic"
        assert review["modality"] in ("swi", "t2s", "qsm") and f"_{review['modality']}_" in case
        ids = sorted(int(v) for v in np.unique(instances.array) if v)
        assert [c["id"] for c in review["cmbs"]] == ids and 1 <= len(ids) <= 4
        assert all(c["decision"] == "synthetic" and len(c["centroid_ras"]) == 3 and c["radius_mm"] > 0
                   and c["region"] in REGION_CODES for c in review["cmbs"])
        assert {n["kind"] for n in review["hard_negatives"]} <= {"calcification", "vein", "iron"}
        assert review["generator"]["seed"] == 7
    assert not list(out.rglob("*.partial*"))
    # a mixed-modality synthetic dataset passes the dataset validator (each case records its modality)
    from CMBDetectLib.dataset import validate_dataset

    assert validate_dataset(out) == []


def test_cli_into_real_scan(tmp_path):
    image_path = tmp_path / "patient_swi.nii.gz"
    write_volume_atomic(_phantom(), image_path)
    out = tmp_path / "inserted"
    done = _run_cli("--into", str(image_path), "--out", str(out), "--n-cmbs", "2", "--modality", "swi",
                    "--seed", "3", "--progress", "json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["type"] == "summary" and summary["cmbs"] == 2
    instances = read_volume(out / "cmbdetect" / "instances" / "patient_swi_synthcmb.nii.gz")
    assert sorted(int(v) for v in np.unique(instances.array) if v) == [1, 2]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1


def test_cli_rejects_bad_arguments(tmp_path):
    done = _run_cli("--out", str(tmp_path / "x"), "--min-cmbs", "5", "--max-cmbs", "2", timeout=60)
    assert done.returncode == 1 and "error" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_balanced_modality_takes_each_in_turn(tmp_path):
    from CMBDetectLib.commands.synth import _modality_for

    assert [_modality_for(5, i, "balanced") for i in range(6)] == ["swi", "t2s", "qsm"] * 2
    # the same (seed, index, modality) is the same case whichever mode chose the modality
    out = tmp_path / "balanced"
    done = _run_cli("--out", str(out), "--n", "3", "--start-index", "4", "--seed", "7", "--modality", "balanced",
                    "--anatomy", "procedural", "--anatomy-spacing", "2", "--slice-thickness", "3",
                    "--in-plane", "1.0", "1.0", "--min-cmbs", "1", "--max-cmbs", "2")
    assert done.returncode == 0, done.stderr
    cases = json.loads((out / "dataset.json").read_text())["cmbdetect"]["cases"]
    assert sorted(cases) == ["synth_qsm_00005", "synth_swi_00006", "synth_t2s_00004"]
    from CMBDetectLib.dataset import validate_dataset

    assert validate_dataset(out) == []


def test_radius_prior_follows_the_requested_mean_within_the_clinical_range():
    from CMBDetectLib.synth.cmbs import sample_radius

    rng = np.random.default_rng(0)
    clinical = np.array([sample_radius(rng) for _ in range(4000)])
    wide = np.array([sample_radius(rng, mean=3.0, sd=1.0) for _ in range(4000)])
    # (truncation to 1-5 mm moves the means a little: up for the clinical prior, down for the wide one)
    assert 1.5 <= clinical.mean() < 1.6 and (clinical > 3.0).mean() < 0.01
    assert 2.8 < wide.mean() <= 3.0 and (wide > 3.0).mean() > 0.35
    assert wide.min() >= 1.0 and wide.max() <= 5.0          # 2-10 mm diameter either way


def test_cli_radius_prior_is_used_and_recorded(tmp_path):
    out = tmp_path / "large"
    done = _run_cli("--out", str(out), "--n", "1", "--seed", "4", "--modality", "qsm", "--anatomy", "procedural",
                    "--anatomy-spacing", "2", "--min-cmbs", "6", "--max-cmbs", "6", "--radius-mean", "3.5",
                    "--radius-sd", "0.3")
    assert done.returncode == 0, done.stderr
    review = json.loads(next((out / "cmbdetect" / "reviews").glob("*.json")).read_text())
    assert review["generator"]["config"]["radius_mean_mm"] == 3.5
    radii = [c["radius_mm"] for c in review["cmbs"]]
    assert len(radii) == 6 and min(radii) > 2.4
    bad = _run_cli("--out", str(tmp_path / "x"), "--radius-mean", "8", timeout=60)
    assert bad.returncode == 1 and "--radius-mean" in bad.stderr
