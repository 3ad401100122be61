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


def test_the_report_says_which_kinds_of_cmb_are_missed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generated scan whose "prediction" is its ground truth without CMB 1: the table counts that CMB as missed in
    the bands of its own susceptibility and radius, and every other CMB as found."""
    import numpy as np

    from CMBDetectLib.volume import read_volume, write_volume_atomic

    monkeypatch.setattr(evaluate_model, "MODALITIES", ("qsm",))
    monkeypatch.setattr(evaluate_model, "THICKNESSES", (3.0,))
    data = tmp_path / "test"
    evaluate_model.make_test_set(data, 1, seed=12)
    image = next((data / "imagesTr").glob("*.nii.gz"))
    stem = evaluate_model.image_stem(image)
    instances = read_volume(data / "cmbdetect" / "instances" / f"{stem[:-len('_0000')]}.nii.gz")
    predictions = tmp_path / "pred"
    predictions.mkdir()
    pred = ((instances.array > 0) & (instances.array != 1)).astype(np.uint8)
    write_volume_atomic(instances.with_array(pred), predictions / f"{stem}_cmb.nii.gz")
    report = evaluate_model.evaluate_selected(predictions, data, [image])
    info = evaluate_model.case_info(data)
    record = info[report.scans[0].case]["cmbs"]
    n = len(record)
    assert n >= evaluate_model.MIN_CMBS and report.scans[0].found_ids == list(range(2, n + 1))

    lines = evaluate_model.attribute_table(report, info)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    chi_edges = evaluate_model.CMB_ATTRIBUTE_BANDS["chi_ppm"][2]
    missed_band = evaluate_model.band_index(record[1]["chi_ppm"], chi_edges)
    chi_rows = [name for name in rows if name.startswith("susceptibility")]
    assert len(chi_rows) == 3
    in_band = [sum(evaluate_model.band_index(c["chi_ppm"], chi_edges) == i for c in record.values()) for i in range(3)]
    for i, name in enumerate(chi_rows):
        qsm, total = rows[name][0], rows[name][1].rstrip(" |")
        assert qsm == total
        if in_band[i] == 0:
            assert qsm == "-"
        else:
            found = in_band[i] - (i == missed_band)
            assert qsm == f"{found} / {in_band[i]} ({found / in_band[i]:.2f}) [0]"   # no candidates JSON: [0]


def test_the_kd_ablation_pairs_a_model_with_its_twin_whichever_was_distilled(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Since 1.11.0 the default is the CE-only student and its distilled twin is the ablation; before, the other
    way round. The report finds the twin by the model's own training record and labels the two arms by it."""
    import json
    from types import SimpleNamespace

    from conftest import make_tiny_model

    from CMBDetectLib.metrics import Counts
    from CMBDetectLib.model_package import ModelPackage

    monkeypatch.chdir(tmp_path)
    distilled = make_tiny_model(tmp_path / "kd", version="2.0.0")
    ce_only = make_tiny_model(tmp_path / "ce", version="2.0.0")
    manifest = json.loads((ce_only.path / "model.json").read_text())
    manifest["networks"].pop("teacher")
    manifest["training"]["distillation"] = False
    (ce_only.path / "model.json").write_text(json.dumps(manifest))
    ce_only = ModelPackage.load(ce_only.path)
    assert evaluate_model.distilled(distilled) and not evaluate_model.distilled(ce_only)
    assert evaluate_model.default_ablation_path(ce_only) == Path("build/model/tiny-test-kd-2.0.0")
    assert evaluate_model.default_ablation_path(distilled) == Path("build/model/tiny-test-nokd-2.0.0")

    def report(tp: int, fp: int) -> SimpleNamespace:
        scan = SimpleNamespace(case="synth_swi_00000", modality="swi", n_gt=10, clusterwise=Counts(tp, fp, 10 - tp),
                               valdo=Counts(tp, fp, 10 - tp))
        return SimpleNamespace(scans=[scan], stage_summary=dict)
    ce_report, kd_report = report(9, 1), report(7, 2)
    lines = evaluate_model.ablation_lines(ce_only, ce_report, kd_report, Path("build/model/tiny-test-kd-2.0.0"), {})
    rows = [line for line in lines if line.startswith("| with KD") or line.startswith("| without KD")]
    assert rows[0].startswith("| with KD | `tiny-test-kd-2.0.0` | 10 | 7 | 2 |")
    assert rows[1].startswith("| without KD (CE only) | `tiny-test-2.0.0` (this report's model) | 10 | 9 | 1 |")
