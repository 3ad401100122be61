"""Operating-point calibration: the sweep counts like the pipeline filters, the choice follows its objective,
and a real calibration run (tiny model, real files) writes a model.json the pipeline then uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_dataset import write_dataset

from CMBDetectLib.calibration import (
    CalibrationGrid,
    CandidateTable,
    OperatingPoint,
    ScanCandidates,
    by_modality,
    choose,
    choose_by_modality,
    choose_for_modalities,
    collect,
    cross_validate,
    measurement_keys,
    sweep,
    write_calibration,
)
from CMBDetectLib.model_package import ModelPackage
from CMBDetectLib.pipeline import DetectionParameters


def _scan(p_disc, volume, ellipticity, edge, hits, n_gt, th_det=0.5):
    table = CandidateTable(np.array(p_disc, float), np.array(volume, float), np.array(ellipticity, float),
                           np.array(edge, float), hits)
    return ScanCandidates("case", "swi", n_gt, {th_det: table})


def _grid(**overrides):
    values = {"th_det": (0.5,), "th_disc": (0.5, 0.9), "min_volume_mm3": (2.56,), "max_ellipticity": (0.2, 1.0),
              "min_edge_distance_mm": (4.0,)}
    values.update(overrides)
    return CalibrationGrid(**values)


def test_sweep_counts_like_the_filters():
    # CMB 1: elongated true candidate (p 0.95, ellipticity 0.4); CMB 2: round (p 0.6); two false candidates:
    # p 0.92 round (FP at any th_disc), p 0.7 too close to the edge (removed by the edge filter)
    scan = _scan(p_disc=[0.95, 0.6, 0.92, 0.7], volume=[10, 10, 10, 10], ellipticity=[0.4, 0.1, 0.1, 0.1],
                 edge=[20, 20, 20, 1.0], hits=[[1], [2], [], []], n_gt=2)
    points = {(p.th_disc, p.max_ellipticity): (p.tp, p.fp) for p in sweep([scan], _grid())}
    assert points[(0.5, 0.2)] == (1, 1)        # CMB 1 removed by ellipticity, edge FP removed
    assert points[(0.5, 1.0)] == (2, 1)
    assert points[(0.9, 0.2)] == (0, 1)        # CMB 2 below th_disc, CMB 1 elongated
    assert points[(0.9, 1.0)] == (1, 1)


def test_two_candidates_of_one_cmb_count_once():
    scan = _scan(p_disc=[0.9, 0.8], volume=[10, 10], ellipticity=[0, 0], edge=[9, 9], hits=[[1], [1]], n_gt=1)
    point = sweep([scan], _grid(th_disc=(0.5,), max_ellipticity=(0.2,)))[0]
    assert (point.tp, point.fp, point.tpr) == (1, 0, 1.0)


def test_the_chosen_point_is_reported_per_modality():
    swi = _scan(p_disc=[0.95, 0.92], volume=[10, 10], ellipticity=[0.1, 0.1], edge=[20, 20], hits=[[1], []], n_gt=2)
    qsm = ScanCandidates("q", "qsm", 1, _scan(p_disc=[0.6], volume=[10], ellipticity=[0.1], edge=[20],
                                              hits=[[1]], n_gt=1).by_th_det)
    chosen = OperatingPoint(0.5, 0.9, 2.56, 1.0, 4.0, 1, 1, 3, 2)
    counts = by_modality([swi, qsm], chosen)
    assert {m: (c["tp"], c["fp"], c["n_gt"], c["n_scans"]) for m, c in counts.items()} == {
        "qsm": (0, 0, 1, 1), "swi": (1, 1, 2, 1)}


def _modality_scans():
    # SWI: its CMB scores 0.9, a mimic 0.6; QSM: its CMB scores 0.6 (less sharp), no mimic above 0.3.
    swi = ScanCandidates("s", "swi", 1, _scan(p_disc=[0.9, 0.6], volume=[10, 10], ellipticity=[0.1, 0.1],
                                              edge=[20, 20], hits=[[1], []], n_gt=1).by_th_det)
    qsm = ScanCandidates("q", "qsm", 1, _scan(p_disc=[0.6, 0.3], volume=[10, 10], ellipticity=[0.1, 0.1],
                                              edge=[20, 20], hits=[[1], []], n_gt=1).by_th_det)
    return [swi, qsm]


def test_each_modality_gets_its_own_discrimination_threshold():
    scans = _modality_scans()
    grid = _grid(th_disc=(0.2, 0.5, 0.7, 0.9), max_ellipticity=(1.0,))
    # With no false positive allowed, one shared th_disc must choose between SWI's mimic and QSM's CMB.
    joint = choose(sweep(scans, grid), max_fp_per_scan=0.0)
    assert (joint.tp, joint.fp, joint.th_disc) == (1, 0, 0.9)
    own = choose_by_modality(scans, joint, grid, max_fp_per_scan=0.0)
    # SWI keeps the shared value (ties go to it), QSM gets the lower one that finds its CMB.
    assert {m: (p.th_disc, p.tp, p.fp) for m, p in own.items()} == {"swi": (0.9, 1, 0), "qsm": (0.5, 1, 0)}
    assert all(p.th_det == joint.th_det and p.max_ellipticity == joint.max_ellipticity for p in own.values())


def test_per_modality_thresholds_reach_detection_and_follow_a_modality_switch(tmp_path, tiny_model):
    import shutil

    package = tmp_path / "model"
    shutil.copytree(tiny_model.path, package)
    scans = _modality_scans()
    grid = _grid(th_disc=(0.2, 0.5, 0.7, 0.9), max_ellipticity=(1.0,))
    points = sweep(scans, grid)
    joint = choose(points, max_fp_per_scan=0.0)
    own = choose_by_modality(scans, joint, grid, max_fp_per_scan=0.0)
    record = write_calibration(package, joint, points, scans, {"seed": 1}, max_fp_per_scan=0.0,
                               per_modality=own)
    assert record["with_th_disc_by_modality"]["tp"] == 2 and record["with_th_disc_by_modality"]["fp"] == 0
    model = ModelPackage.load(package)
    assert model.thresholds["th_disc_by_modality"] == {"qsm": 0.5, "swi": 0.9}
    assert DetectionParameters.for_model(model, "QSM").th_disc == 0.5
    assert DetectionParameters.for_model(model, "swi").th_disc == 0.9
    assert DetectionParameters.for_model(model).th_disc == joint.th_disc            # modality unknown: shared
    assert DetectionParameters.for_model(model, "qsm", th_disc=0.8).th_disc == 0.8  # the user's value wins
    # Switching SWI -> QSM moves th_disc only while it still is the model's SWI value.
    swi = DetectionParameters.for_model(model, "swi")
    assert swi.following_modality(model, "swi", "qsm").th_disc == 0.5
    chosen_by_user = DetectionParameters(**{**swi.to_dict(), "th_disc": 0.65})
    assert chosen_by_user.following_modality(model, "swi", "qsm").th_disc == 0.65


def test_the_shared_setting_is_chosen_for_the_per_modality_thresholds():
    """th_det 0.5 is the best shared point, but at th_det 0.3 QSM finds one more CMB with its own th_disc."""
    def scan(name, modality, by_th_det, n_gt):
        return ScanCandidates(name, modality, n_gt, {
            th: CandidateTable(np.array(p, float), np.full(len(p), 10.0), np.full(len(p), 0.1),
                               np.full(len(p), 20.0), hits) for th, (p, hits) in by_th_det.items()})

    # scores of (CMB, CMB, mimic) on SWI and QSM at each th_det; QSM's second CMB appears only at 0.3
    swi = scan("s", "swi", {0.5: ([0.9, 0.9, 0.5], [[1], [2], []]), 0.3: ([0.9, 0.9, 0.4], [[1], [2], []])}, 2)
    qsm = scan("q", "qsm", {0.5: ([0.6, 0.55], [[1], []]), 0.3: ([0.5, 0.35, 0.3], [[1], [2], []])}, 2)
    grid = _grid(th_det=(0.3, 0.5), th_disc=(0.35, 0.45, 0.6, 0.9), max_ellipticity=(1.0,))
    # No false positive allowed. Shared: 3 CMBs at either th_det (0.5 is closer to the paper's default).
    shared_only = choose(sweep([swi, qsm], grid), max_fp_per_scan=0.0)
    assert (shared_only.th_det, shared_only.th_disc, shared_only.tp, shared_only.fp) == (0.5, 0.6, 3, 0)
    # Per modality: 3 CMBs at th_det 0.5 (QSM's mimic outscores nothing but its CMB), 4 at th_det 0.3.
    shared, own = choose_for_modalities([swi, qsm], grid, max_fp_per_scan=0.0)
    assert (shared.th_det, shared.th_disc, shared.tp, shared.fp) == (0.3, 0.45, 3, 0)
    assert {m: (p.th_disc, p.tp, p.fp) for m, p in own.items()} == {"swi": (0.45, 2, 0), "qsm": (0.35, 2, 0)}


def _volume_scans():
    # SWI: a blooming CMB (20 mm3) and a one-voxel noise blob that the student likes (0.5 mm3, p 0.95);
    # QSM: a CMB at its true size on a thick slice (1.5 mm3) and no mimic.
    swi = ScanCandidates("s", "swi", 1, _scan(p_disc=[0.9, 0.95], volume=[20, 0.5], ellipticity=[0.1, 0.1],
                                              edge=[20, 20], hits=[[1], []], n_gt=1).by_th_det)
    qsm = ScanCandidates("q", "qsm", 1, _scan(p_disc=[0.8], volume=[1.5], ellipticity=[0.1], edge=[20],
                                              hits=[[1]], n_gt=1).by_th_det)
    return [swi, qsm]


def test_each_modality_gets_its_own_minimum_volume():
    grid = _grid(th_disc=(0.5, 0.9), min_volume_mm3=(0.0, 2.56, 4.0), max_ellipticity=(1.0,))
    shared, own = choose_for_modalities(_volume_scans(), grid, max_fp_per_scan=0.0)
    # one shared limit cannot both drop SWI's noise blob and keep QSM's small CMB: 1 CMB at best
    assert (shared.tp, shared.fp) == (1, 0)
    assert {m: (p.min_volume_mm3, p.tp, p.fp) for m, p in own.items()} == {"qsm": (0.0, 1, 0), "swi": (2.56, 1, 0)}


def test_per_modality_volumes_reach_detection_and_follow_a_modality_switch(tmp_path, tiny_model):
    import shutil

    package = tmp_path / "model"
    shutil.copytree(tiny_model.path, package)
    scans = _volume_scans()
    grid = _grid(th_disc=(0.5, 0.9), min_volume_mm3=(0.0, 2.56, 4.0), max_ellipticity=(1.0,))
    points = sweep(scans, grid)
    shared, own = choose_for_modalities(scans, grid, max_fp_per_scan=0.0, points=points)
    write_calibration(package, shared, points, scans, {"seed": 1}, max_fp_per_scan=0.0, per_modality=own)
    model = ModelPackage.load(package)
    assert model.postprocessing["min_volume_mm3_by_modality"] == {"qsm": 0.0, "swi": 2.56}
    assert DetectionParameters.for_model(model, "swi").min_volume_mm3 == 2.56
    assert DetectionParameters.for_model(model, "QSM").min_volume_mm3 == 0.0
    assert DetectionParameters.for_model(model).min_volume_mm3 == shared.min_volume_mm3   # modality unknown
    assert DetectionParameters.for_model(model, "swi", min_volume_mm3=9.0).min_volume_mm3 == 9.0
    # a switch moves each per-modality value only while it still is the model's value for the old modality
    swi = DetectionParameters.for_model(model, "swi")
    assert swi.following_modality(model, "swi", "qsm").min_volume_mm3 == 0.0
    mine = DetectionParameters(**{**swi.to_dict(), "min_volume_mm3": 7.0})
    moved = mine.following_modality(model, "swi", "qsm")
    assert moved.min_volume_mm3 == 7.0 and moved.th_disc == DetectionParameters.for_model(model, "qsm").th_disc


def test_cross_validation_counts_each_choice_on_the_scans_it_did_not_see():
    def swi(name, p_mimic):
        return ScanCandidates(name, "swi", 1, _scan(p_disc=[0.9, p_mimic], volume=[10, 10], ellipticity=[0.1, 0.1],
                                                    edge=[20, 20], hits=[[1], []], n_gt=1).by_th_det)

    easy, hard = [swi("a", 0.6)], [swi("b", 0.95)]
    grid = _grid(th_disc=(0.5, 0.7, 0.97), max_ellipticity=(1.0,))
    folds = cross_validate([easy, hard], grid, max_fp_per_scan=0.0)
    # chosen on the hard scan: only 0.97 keeps its mimic out (and its CMB too); counted on the easy one
    assert folds[0]["fit"]["swi"]["th_disc"] == 0.97 and (folds[0]["held_out"]["swi"]["tp"],
                                                          folds[0]["held_out"]["swi"]["fp"]) == (0, 0)
    # chosen on the easy scan: 0.7 finds its CMB without its mimic; on the hard scan the mimic gets through
    assert folds[1]["fit"]["swi"]["th_disc"] == 0.7 and (folds[1]["fit"]["swi"]["tp"], folds[1]["fit"]["swi"]["fp"]) \
        == (1, 0)
    assert (folds[1]["held_out"]["swi"]["tp"], folds[1]["held_out"]["swi"]["fp"]) == (1, 1)


def _point(tp, fp, th_disc=0.5, max_ellipticity=0.2, n_gt=10, n_scans=2):
    return OperatingPoint(0.5, th_disc, 2.56, max_ellipticity, 4.0, tp, fp, n_gt, n_scans)


def test_choose_most_found_within_the_false_positive_budget():
    points = [_point(9, 5), _point(8, 2), _point(8, 1), _point(6, 0)]
    assert choose(points, max_fp_per_scan=1.0) == _point(8, 1)       # 9 found costs 2.5 FP/scan
    assert choose(points, max_fp_per_scan=3.0) == _point(9, 5)


def test_choose_prefers_the_paper_filters_on_ties():
    relaxed, paper = _point(8, 1, max_ellipticity=0.5), _point(8, 1, max_ellipticity=0.2)
    assert choose([relaxed, paper]) == paper


def test_choose_with_an_unreachable_budget_takes_the_fewest_false_positives():
    assert choose([_point(9, 9), _point(7, 6)], max_fp_per_scan=1.0) == _point(7, 6)


@pytest.mark.slow
def test_calibration_of_a_real_model_on_real_files(tmp_path, tiny_model):
    dataset = write_dataset(tmp_path / "dev", n_cases=2, seed=7)
    cases = [(image.name[:-12], image, dataset / "cmbdetect" / "instances" / image.name.replace("_0000", ""),
              "swi") for image in sorted((dataset / "imagesTr").glob("*_0000.nii.gz"))]
    grid = CalibrationGrid(th_det=(0.4, 0.5), th_disc=(0.1, 0.5, 0.9))
    scans = collect(tiny_model, cases, grid)[False]
    assert [s.n_gt for s in scans] == [3, 3]
    assert all(set(s.by_th_det) == {0.4, 0.5} for s in scans)
    points = sweep(scans, grid)
    assert len(points) == 2 * 3 * 3 * 5 * 3
    # a lower th_disc never finds fewer CMBs (same th_det and filters)
    by_key = {(p.th_det, p.min_volume_mm3, p.max_ellipticity, p.min_edge_distance_mm, p.th_disc): p.tp
              for p in points}
    assert all(by_key[k[:4] + (0.1,)] >= by_key[k[:4] + (0.9,)] for k in by_key)

    package = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_model.path, package)
    chosen = choose(points)
    record = write_calibration(package, chosen, points, scans, {"seed": 7}, max_fp_per_scan=1.0)
    manifest = json.loads((package / "model.json").read_text())
    assert manifest["calibration"]["chosen"]["tp"] == chosen.tp == record["chosen"]["tp"]
    reloaded = ModelPackage.load(package)            # weights still verify; the pipeline uses the new point
    params = DetectionParameters.for_model(reloaded)
    assert (params.th_det, params.th_disc, params.max_ellipticity) == (chosen.th_det, chosen.th_disc,
                                                                       chosen.max_ellipticity)


def test_collected_measurements_are_cached_and_reused_without_a_network(tmp_path, tiny_model, monkeypatch):
    from CMBDetectLib import pipeline

    dataset = write_dataset(tmp_path / "dev", n_cases=2, seed=7)
    cases = [(image.name[:-12], image, dataset / "cmbdetect" / "instances" / image.name.replace("_0000", ""),
              "swi") for image in sorted((dataset / "imagesTr").glob("*_0000.nii.gz"))]
    grid = CalibrationGrid(th_det=(0.4, 0.5), th_disc=(0.1, 0.5, 0.9))
    cache = tmp_path / "measurements"
    first = collect(tiny_model, cases, grid, flip_options=(False, True), cache_dir=cache)
    assert len(list(cache.glob("*.json"))) == 4                     # 2 scans x 2 flip settings

    def no_network(*args, **kwargs):
        raise AssertionError("the networks ran although every measurement was cached")

    monkeypatch.setattr(pipeline.DetectionSession, "run", no_network)
    again = collect(tiny_model, cases, grid, flip_options=(False, True), cache_dir=cache)
    for flips in (False, True):
        assert [s.case for s in again[flips]] == [s.case for s in first[flips]]
        assert sweep(again[flips], grid) == sweep(first[flips], grid)
    # another th_det grid, or another ground truth in the same file, is another measurement: not from the cache
    with pytest.raises(AssertionError, match="networks ran"):
        collect(tiny_model, cases, CalibrationGrid(th_det=(0.3,)), cache_dir=cache)
    case, image, truth, modality = cases[0]
    before = measurement_keys(tiny_model, image, truth, modality, grid.th_det, (False, True))
    assert before[False] != before[True]
    truth.write_bytes(cases[1][2].read_bytes())
    assert measurement_keys(tiny_model, image, truth, modality, grid.th_det, (False,))[False] != before[False]


def test_student_test_time_flips_are_orientation_invariant():
    import torch

    from CMBDetectLib.networks.discriminator import student_probabilities

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 6 ** 3, 2))
    x = torch.randn(4, 2, 8, 8, 8)
    with torch.inference_mode():
        plain = student_probabilities(student, x)
        flipped_input = student_probabilities(student, x.flip((2, 4)))
        averaged = student_probabilities(student, x, flips=True)
        averaged_flipped = student_probabilities(student, x.flip((2, 4)), flips=True)
        by_hand = torch.stack([torch.softmax(student(x.flip(d) if d else x), 1)[:, 1]
                               for d in ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))]).mean(0)
    assert not torch.allclose(plain, flipped_input, atol=1e-4)   # the network alone depends on orientation
    assert torch.allclose(averaged, averaged_flipped, atol=1e-6)   # the 8-view average does not
    assert torch.allclose(averaged, by_hand, atol=1e-6)


def test_a_session_rescored_with_flips_uses_the_8_view_average(tiny_model, phantom_volume):
    import torch

    from CMBDetectLib.candidates import extract_patches
    from CMBDetectLib.networks.discriminator import student_probabilities
    from CMBDetectLib.pipeline import DetectionSession

    assert tiny_model.student_flips is False                 # models without the key: no flips
    session = DetectionSession(tiny_model, device="cpu")
    params = DetectionParameters.for_model(tiny_model, th_det=0.3, th_disc=0.0)
    plain = session.run(phantom_volume.image, "swi", params=params)
    session.set_student_flips(True)
    flipped = session.refilter(params)
    assert plain.candidates and [c.id for c in plain.candidates] == [c.id for c in flipped.candidates]
    # the phantom's grid is coarser than 0.8 mm, so the working grid is the input grid
    centres = np.array([np.round(c.centroid_ijk[::-1]) for c in flipped.candidates])
    patches = torch.from_numpy(extract_patches(session.features.channels, centres, 24).astype(np.float32))
    with torch.inference_mode():
        expected = student_probabilities(tiny_model.network("student"), patches, flips=True).numpy()
    assert np.allclose([c.p_disc for c in flipped.candidates], expected, atol=1e-5)
