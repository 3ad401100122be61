"""The held-out test / development sets of ``scripts/evaluate_model.py``: extended, never regenerated, and a
report restricted to the scans a run uses."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import evaluate_model  # noqa: E402


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_test_set_is_extended_without_touching_its_scans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate_model, "MODALITIES", ("swi",))     # one cell keeps the test short
    monkeypatch.setattr(evaluate_model, "THICKNESSES", (3.0,))
    data = tmp_path / "test"
    evaluate_model.make_test_set(data, 1, seed=11)
    first = sorted((data / "imagesTr").glob("*.nii.gz"))
    assert [p.name for p in first] == ["synth_swi_00000_0000.nii.gz"]
    before = _digest(first[0])
    modified = first[0].stat().st_mtime_ns

    evaluate_model.make_test_set(data, 2, seed=11)
    images = sorted((data / "imagesTr").glob("*.nii.gz"))
    assert [evaluate_model.case_index(p) for p in images] == [0, 1]
    assert _digest(images[0]) == before and images[0].stat().st_mtime_ns == modified   # not rewritten
    evaluate_model.make_test_set(data, 2, seed=11)                                       # complete: nothing to do
    assert len(list((data / "imagesTr").glob("*.nii.gz"))) == 2

    # Predictions for both scans (the ground truth itself); a run on the first scan reports only that one.
    predictions = tmp_path / "pred"
    predictions.mkdir()
    for image in images:
        stem = evaluate_model.image_stem(image)
        case = stem[: -len("_0000")]
        shutil.copy(data / "labelsTr" / f"{case}.nii.gz", predictions / f"{stem}_cmb.nii.gz")
    report = evaluate_model.evaluate_selected(predictions, data, images[:1])
    assert [scan.case for scan in report.scans] == ["synth_swi_00000"]
    assert report.scans[0].clusterwise.fp == 0 and report.scans[0].clusterwise.tp == report.scans[0].n_gt
    (predictions / f"{evaluate_model.image_stem(images[1])}_cmb.nii.gz").unlink()
    with pytest.raises(SystemExit, match="no prediction"):
        evaluate_model.evaluate_selected(predictions, data, images)


def test_the_report_splits_scans_by_modality_and_slice_thickness() -> None:
    from types import SimpleNamespace

    cases = {"synth_qsm_00801": ("qsm", 5.0), "synth_swi_00000": ("swi", 1.0), "synth_qsm_00800": ("qsm", 5.0),
             "synth_swi_00100": ("swi", 3.0), "synth_t2s_00300": ("t2s", 1.0)}
    info = {case: {"modality": modality, "slice_mm": thickness} for case, (modality, thickness) in cases.items()}
    report = SimpleNamespace(scans=[SimpleNamespace(case=case, modality=modality)
                                    for case, (modality, _) in cases.items()])
    cells = evaluate_model.by_cell(report, info)
    assert list(cells) == ["swi 1 mm", "swi 3 mm", "t2s 1 mm", "qsm 5 mm"]      # the generator's cell order
    assert [scan.case for scan in cells["qsm 5 mm"]] == ["synth_qsm_00800", "synth_qsm_00801"]
    info.pop("synth_t2s_00300")                                    # no review: modality of the scan, size unknown
    assert "t2s ? mm" in evaluate_model.by_cell(report, info)
