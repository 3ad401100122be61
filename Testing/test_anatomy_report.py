"""Clinical summary and report: the numbers match the candidate list, and the report renders."""

from __future__ import annotations

import base64
import csv
import json

import numpy as np
import pytest

from CMBDetectLib.anatomy.regions import RegionInfo
from CMBDetectLib.anatomy.summary import equivalent_diameter_mm, summarise, summary_csv_text


def _candidate(cid, volume, p_disc, final=True):
    return {"id": cid, "centroid_ras": [0.0, 0.0, 0.0], "centroid_ijk": [0, 0, 0], "volume_mm3": volume,
            "p_disc": p_disc, "final": final, "reason": None if final else "discrimination"}


FRONTAL = RegionInfo("frontal_cortex", "frontal lobe, cortex / grey-white junction", "lobar", "left",
                     "frontal")
OCCIPITAL = RegionInfo("occipital_wm", "occipital lobe, subcortical white matter", "lobar", "right",
                       "occipital")
THALAMUS = RegionInfo("thalamus", "thalamus", "deep", "left")
CEREBELLUM = RegionInfo("cerebellum", "cerebellum", "infratentorial", "right")


def test_equivalent_diameter():
    assert equivalent_diameter_mm(4.0 / 3.0 * np.pi * 8) == pytest.approx(4.0)


def test_strictly_lobar_facts_and_counts():
    candidates = [_candidate(1, 20, 0.95), _candidate(2, 100, 0.6), _candidate(3, 30, 0.9),
                  _candidate(4, 10, 0.2, final=False)]
    summary = summarise(candidates, [FRONTAL, OCCIPITAL, FRONTAL, THALAMUS], th_definite=0.8)
    assert summary.total == 3     # the non-final candidate is not counted
    assert summary.by_category == {"lobar": 3, "deep": 0, "infratentorial": 0}
    assert summary.by_size == {"< 5 mm": 2, "5-10 mm": 1, "> 10 mm": 0}   # 100 mm3 -> 5.8 mm
    assert summary.by_certainty == {"definite": 2, "possible": 1}
    assert summary.by_side == {"left": 2, "right": 1, "midline": 0}
    assert summary.facts[0].startswith("3 CMBs strictly lobar (frontal, occipital), no deep CMBs")
    assert "Not a diagnosis" in summary.note
    text = summary_csv_text(summary)
    assert "category,lobar,3" in text and "certainty,definite,2" in text


def test_mixed_and_cerebellar_facts():
    candidates = [_candidate(1, 20, 0.95), _candidate(2, 20, 0.95), _candidate(3, 20, 0.5)]
    summary = summarise(candidates, [FRONTAL, THALAMUS, CEREBELLUM], th_definite=0.9)
    joined = " ".join(summary.facts)
    assert "1 lobar CMB" in joined and "1 deep CMB" in joined and "Mixed distribution" in joined
    assert "1 cerebellar CMB (counted as neither lobar nor deep" in joined
    assert summarise([], []).facts == ["No CMB was detected."]


def test_cli_summary_renders_and_matches_candidates(tmp_path):
    pytest.importorskip("nilearn")
    from CMBDetectLib.anatomy.atlas import load_atlas, region_centres_mni
    from CMBDetectLib.anatomy.phantom import make_head_phantom
    from CMBDetectLib.cli import main
    from CMBDetectLib.volume import write_volume_atomic

    atlas = load_atlas()
    scan, truth = make_head_phantom(spacing=(0.9, 0.9, 3.0), size=(200, 240, 50), seed=1, atlas=atlas)
    centres = region_centres_mni(atlas)
    wanted = ["left_frontal_cortex", "right_parietal_wm", "left_temporal_cortex", "right_thalamus",
              "left_basal_ganglia", "right_cerebellum", "left_insula"]
    inverse = truth.GetInverse()
    flip = np.array([-1.0, -1.0, 1.0])
    volumes = [15, 40, 200, 25, 70, 12, 30]
    p_disc = [0.95, 0.7, 0.9, 0.85, 0.6, 0.92, 0.99]
    candidates = []
    for index, key in enumerate(wanted):
        ras = np.array(inverse.TransformPoint([float(v) for v in centres[key] * flip])) * flip
        candidates.append({"id": index + 1, "centroid_ijk": scan.ras_to_index(ras)[0][::-1].tolist(),
                           "centroid_ras": ras.tolist(), "volume_mm3": volumes[index], "p_det": 0.9,
                           "p_disc": p_disc[index], "ellipticity": 0.1, "edge_distance_mm": 9.0,
                           "final": True, "reason": None})
    candidates.append({**candidates[0], "id": 50, "p_disc": 0.1, "final": False, "reason": "discrimination"})
    image = tmp_path / "case.nii.gz"
    write_volume_atomic(scan, image)
    candidates_json = tmp_path / "case_candidates.json"
    candidates_json.write_text(json.dumps({
        "schema": "cmbdetect.candidates/1", "image": {"shape": list(scan.shape_ijk), "modality": "t2s"},
        "parameters": {"th_disc": 0.5}, "model": {"name": "test"}, "candidates": candidates}))
    out = tmp_path / "out"

    assert main(["summary", str(image), str(candidates_json), "--out", str(out), "--th-definite", "0.8"]) == 0

    enriched = json.loads((out / "case_candidates_anatomy.json").read_text())
    assert [c["region"]["label"] for c in enriched["candidates"][:7]] == [
        "left frontal lobe, cortex / grey-white junction", "right parietal lobe, subcortical white matter",
        "left temporal lobe, cortex / grey-white junction", "right thalamus", "left basal ganglia",
        "right cerebellum", "left insula"]
    assert enriched["anatomy"]["registration"]["dice"] > 0.85
    rows = list(csv.DictReader(open(out / "case_cmbs.csv", encoding="utf-8")))
    assert [int(r["id"]) for r in rows] == list(range(1, 8))     # the non-final candidate is left out
    assert [r["certainty"] for r in rows] == ["definite" if p >= 0.8 else "possible" for p in p_disc]
    summary = {(r["section"], r["item"]): r["count"] for r in csv.DictReader(open(out / "case_summary.csv"))}
    assert summary[("total", "final CMBs")] == "7"
    assert summary[("category", "lobar")] == "4" and summary[("category", "deep")] == "2"
    assert summary[("category", "infratentorial")] == "1"
    assert summary[("size", "< 5 mm")] == "5" and summary[("size", "5-10 mm")] == "2"
    assert summary[("certainty", "definite")] == "5" and summary[("side", "left")] == "4"

    html = (out / "case_report.html").read_text(encoding="utf-8")
    assert "Not a diagnosis" in html and "right thalamus" in html
    assert "<td>lobar</td><td>4</td>" in html and "<td>total</td><td>7</td>" in html
    images = html.split('src="data:image/png;base64,')[1:]
    assert len(images) == 3
    for chunk in images:
        assert base64.b64decode(chunk.split('"')[0]).startswith(b"\x89PNG")
    for name in ("key_slices", "atlas_overlay", "view_3d"):
        assert (out / f"case_{name}.png").stat().st_size > 10_000
    assert (out / "case_to_mni.tfm").exists()


def test_cli_summary_refuses_mismatched_scan(tmp_path, capsys):
    pytest.importorskip("nilearn")
    from CMBDetectLib.cli import main
    from CMBDetectLib.volume import Volume, write_volume_atomic

    image = tmp_path / "x.nii.gz"
    write_volume_atomic(Volume(np.zeros((4, 5, 6), np.float32)), image)
    candidates = tmp_path / "c.json"
    candidates.write_text(json.dumps({"image": {"shape": [7, 7, 7]}, "candidates": []}))
    assert main(["summary", str(image), str(candidates), "--out", str(tmp_path / "o")]) == 1
    assert "not the same scan" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
