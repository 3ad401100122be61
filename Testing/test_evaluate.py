"""``cmbdetect evaluate`` on real files: label maps, candidate JSON, dataset layout, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from CMBDetectLib.errors import InputError
from CMBDetectLib.evaluate import evaluate, format_report, recall_by, write_froc_png
from CMBDetectLib.volume import Volume, write_volume_atomic

SHAPE = (20, 30, 30)
GEOMETRY = dict(spacing=(0.8, 0.8, 2.0), origin=(10.0, -5.0, 3.0))


def volume(array: np.ndarray) -> Volume:
    return Volume(array, **GEOMETRY)


def candidate(cid, kji, p_det, p_disc, final, reason, volume_mm3=10.0, ellipticity=0.05, edge=10.0):
    ras = volume(np.zeros(SHAPE)).index_to_ras(np.asarray(kji, float))[0]
    return {"id": cid, "centroid_ijk": list(map(float, kji[::-1])), "centroid_ras": ras.tolist(),
            "volume_mm3": volume_mm3, "volume_voxels": 8, "p_det": p_det, "p_disc": p_disc,
            "ellipticity": ellipticity, "edge_distance_mm": edge, "final": final, "reason": reason}


def write_candidates(path: Path, modality: str, candidates: list) -> None:
    path.write_text(json.dumps({
        "schema": "cmbdetect.candidates/1",
        "image": {"path": "x.nii.gz", "shape": list(SHAPE[::-1]), "spacing": [0.8, 0.8, 2.0],
                  "modality": modality},
        "model": {}, "timings": {},
        "parameters": {"th_det": 0.5, "th_disc": 0.5, "min_volume_mm3": 2.56, "max_ellipticity": 0.2,
                       "min_edge_distance_mm": 4.0},
        "candidates": candidates}))


def scan_a() -> tuple[np.ndarray, np.ndarray, list]:
    """3 CMBs (one missed), 1 FP in the label map, 6 stage-1 candidates."""
    gt = np.zeros(SHAPE, np.uint8)
    gt[5:7, 5:7, 5:7] = 1            # g1, found
    gt[12, 19:22, 19:22] = 1         # g2, found
    gt[15, 8, 25] = 1                # g3, missed (rejected by the student)
    pred = np.zeros(SHAPE, np.uint16)
    pred[5:7, 5:7, 5:7] = 1
    pred[12, 21:23, 21] = 2          # touches g2 by one voxel
    pred[3, 25, 3] = 4               # a false positive
    candidates = [
        candidate(1, (5.5, 5.5, 5.5), 0.9, 0.8, True, None),
        candidate(2, (12.0, 21.5, 21.0), 0.8, 0.7, True, None),
        candidate(3, (16.0, 8.0, 26.0), 0.6, 0.2, False, "discrimination"),     # 1 voxel from g3
        candidate(4, (3.0, 25.0, 3.0), 0.7, 0.9, True, None),
        candidate(5, (10.0, 2.0, 15.0), 0.55, 0.6, False, "edge_distance", edge=1.0),
        candidate(6, (17.0, 25.0, 25.0), 0.52, 0.1, False, "discrimination", ellipticity=0.9),
    ]
    return gt, pred, candidates


@pytest.fixture
def plain_folders(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    gt, pred, candidates = scan_a()
    write_volume_atomic(volume(gt), gt_dir / "a.nii.gz")
    write_volume_atomic(volume(pred), pred_dir / "a_cmb.nii.gz")
    write_candidates(pred_dir / "a_candidates.json", "swi", candidates)
    write_volume_atomic(volume(np.zeros(SHAPE, np.uint8)), gt_dir / "b.nii.gz")     # a scan without CMBs
    write_volume_atomic(volume(np.zeros(SHAPE, np.uint16)), pred_dir / "b_cmb.nii.gz")
    write_candidates(pred_dir / "b_candidates.json", "qsm", [])
    return pred_dir, gt_dir


def test_final_and_per_stage_counts(plain_folders):
    report = evaluate(*plain_folders)
    groups = report.groups(by_modality=True)
    assert sorted(groups) == ["qsm", "swi", "total"]
    a = next(s for s in report.scans if s.stem == "a")
    assert (a.clusterwise.tp, a.clusterwise.fp, a.clusterwise.fn, a.n_gt) == (2, 1, 1, 3)
    assert (a.valdo.tp, a.valdo.fp, a.valdo.fn) == (2, 1, 1)
    # per CMB (ids of the 26-connected clusters, in scan order): g1 and g2 found, g3 lost to the student
    assert (a.gt_ids, a.found_ids) == ([1, 2, 3], [1, 2])
    assert a.cmb_fates == {1: "kept", 2: "kept", 3: "discrimination"}
    by_z = recall_by(report.scans, lambda scan, gt_id: "upper" if gt_id < 3 else "lower")
    assert by_z == {"upper": {"n": 2, "found": 2, "not_a_candidate": 0},
                    "lower": {"n": 1, "found": 0, "not_a_candidate": 0}}
    stages = report.stage_summary()
    table = [(stages[s]["tp"], stages[s]["fp"], stages[s]["fn"]) for s in stages]
    assert table == [(3, 3, 0), (2, 2, 1), (2, 1, 1)]      # detection, discrimination, post-processing
    assert stages["postprocessing"]["fp_avg"] == pytest.approx(0.5)      # 1 FP over 2 scans

    curves = report.froc_curves()
    final_curve = curves["discrimination + post-processing (th_disc)"]
    # candidates 5 (edge) and 6 (ellipticity) never pass post-processing, whatever th_disc
    assert [(p.tp, p.fp) for p in final_curve] == [(0, 0), (0, 1), (1, 1), (2, 1), (3, 1)]
    assert final_curve[-1].tpr == 1.0 and final_curve[-1].fp_avg == 0.5
    assert curves["candidate detection (th_det)"][-1].fp == 3

    text = format_report(report, verbose=True, by_modality=True)
    assert "after post-processing" in text and "total" in text and "swi" in text
    total_line = next(line for line in text.splitlines() if line.startswith("total"))
    assert total_line.split()[1:6] == ["2", "3", "2", "1", "1"]          # scans, CMBs, TP, FP, FN

    data = report.to_json_dict()
    json.dumps(data, allow_nan=False)                                   # NaN (empty qsm group) -> null
    assert data["clusterwise"]["qsm"]["tpr"] is None
    assert data["clusterwise"]["total"]["tpr"] == pytest.approx(2 / 3)


def test_froc_png(plain_folders, tmp_path):
    path = write_froc_png(evaluate(*plain_folders), tmp_path / "froc.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_without_candidates_json_only_final_metrics(plain_folders, tmp_path):
    pred_dir, gt_dir = plain_folders
    (pred_dir / "b_candidates.json").unlink()
    report = evaluate(pred_dir, gt_dir)
    assert not report.has_stages and report.froc_curves() == {}
    assert "no per-stage table" in format_report(report)
    with pytest.raises(InputError, match="candidates.json"):
        write_froc_png(report, tmp_path / "froc.png")


def test_clear_errors_for_unmatched_and_mismatched_files(plain_folders, tmp_path):
    pred_dir, gt_dir = plain_folders
    write_volume_atomic(volume(np.zeros(SHAPE, np.uint8)), gt_dir / "c.nii.gz")
    with pytest.raises(InputError, match="no detection .* for 1 ground-truth case.*c"):
        evaluate(pred_dir, gt_dir)
    assert [s.stem for s in evaluate(pred_dir, gt_dir, allow_missing=True).scans] == ["a", "b"]

    write_volume_atomic(volume(np.zeros(SHAPE, np.uint16)), pred_dir / "zzz_cmb.nii.gz")
    with pytest.raises(InputError, match="no ground truth .* zzz"):
        evaluate(pred_dir, gt_dir, allow_missing=True)
    (pred_dir / "zzz_cmb.nii.gz").unlink()

    write_volume_atomic(volume(np.zeros((5, 5, 5), np.uint16)), pred_dir / "b_cmb.nii.gz")
    with pytest.raises(InputError, match="same grid"):
        evaluate(pred_dir, gt_dir, allow_missing=True)
    (pred_dir / "b_candidates.json").write_text("{}")
    with pytest.raises(InputError):
        evaluate(pred_dir, gt_dir, allow_missing=True)
    with pytest.raises(InputError, match="not found"):
        evaluate(tmp_path / "nowhere", gt_dir)
    with pytest.raises(InputError, match="no detections"):
        evaluate(gt_dir, gt_dir)


def write_dataset(root: Path) -> None:
    """Dataset layout; case c1 has two touching annotated CMBs (one instance each)."""
    gt, pred, _ = scan_a()
    instances = np.zeros(SHAPE, np.uint16)
    instances[5:7, 5:7, 5:7] = 1
    instances[5:7, 5:7, 7] = 2          # touches instance 1: one cluster, but two CMBs
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "t2s"}, "labels": {"background": 0, "cmb": 1}, "numTraining": 1,
        "file_ending": ".nii.gz"}))
    write_volume_atomic(volume((instances > 0).astype(np.uint8)), root / "labelsTr" / "c1.nii.gz")
    write_volume_atomic(volume(instances), root / "cmbdetect" / "instances" / "c1.nii.gz")


def test_dataset_layout_through_a_real_subprocess(tmp_path):
    root, pred_dir = tmp_path / "Dataset001", tmp_path / "pred"
    write_dataset(root)
    pred = np.zeros(SHAPE, np.uint16)
    pred[5, 5, 5] = 3                   # hits instance 1 only
    pred[10, 10, 10] = 4                # FP
    write_volume_atomic(volume(pred), pred_dir / "c1_0000_cmb.nii.gz")      # detect ran on imagesTr/c1_0000
    out_json, out_png = tmp_path / "m.json", tmp_path / "froc.png"
    completed = subprocess.run(
        [sys.executable, "-m", "CMBDetectLib", "evaluate", str(pred_dir), str(root), "--json", str(out_json),
         "--by-modality", "-v"], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "c1_0000" in completed.stdout and "t2s" in completed.stdout
    data = json.loads(out_json.read_text())
    scan = data["scans"][0]
    assert scan["case"] == "c1" and scan["modality"] == "t2s" and scan["n_gt"] == 2
    assert scan["clusterwise"] == {"tp": 1, "fp": 1, "fn": 1, "tp_pred": 1}
    assert data["clusterwise"]["total"]["tpr"] == pytest.approx(0.5)
    assert math.isclose(data["clusterwise"]["total"]["fp_avg"], 1.0)

    # --froc without candidate JSON: a clear one-line error, exit status 1, no PNG
    completed = subprocess.run(
        [sys.executable, "-m", "CMBDetectLib", "evaluate", str(pred_dir), str(root), "--froc", str(out_png)],
        capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1
    assert completed.stderr.strip().startswith("cmbdetect evaluate: error:")
    assert "Traceback" not in completed.stderr and len(completed.stderr.strip().splitlines()) == 1
    assert not out_png.exists()


def test_inconsistent_dataset_instances_are_refused(tmp_path):
    root, pred_dir = tmp_path / "Dataset002", tmp_path / "pred"
    write_dataset(root)
    write_volume_atomic(volume(np.zeros(SHAPE, np.uint8)), root / "labelsTr" / "c1.nii.gz")
    write_volume_atomic(volume(np.zeros(SHAPE, np.uint16)), pred_dir / "c1_cmb.nii.gz")
    with pytest.raises(InputError, match="disagree"):
        evaluate(pred_dir, root)


def test_removals_say_where_each_cmb_and_false_candidate_was_lost():
    from CMBDetectLib.evaluate import cmb_fates, removals

    candidates = [{"final": False, "reason": "discrimination"},   # CMB 1, also reached ellipticity below
                  {"final": False, "reason": "ellipticity"},      # CMB 1
                  {"final": True, "reason": None},                # CMB 2 found
                  {"final": False, "reason": "volume"},           # false candidate
                  {"final": True, "reason": None},                # false positive kept
                  {"final": False, "reason": "discrimination"}]   # false candidate
    hits = [[1], [1], [2], [], [], []]
    assert cmb_fates(hits, candidates, [1, 2, 3]) == {1: "ellipticity", 2: "kept", 3: "not a candidate"}
    result = removals(hits, candidates, [1, 2, 3])                # CMB 3 was never a candidate
    assert result["cmbs"] == {"not a candidate": 1, "discrimination": 0, "volume": 0, "ellipticity": 1,
                              "edge_distance": 0, "kept": 1}
    assert result["false_candidates"] == {"discrimination": 1, "volume": 1, "ellipticity": 0,
                                          "edge_distance": 0, "kept": 1}
