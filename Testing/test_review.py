"""Engine-level review state (schema cmbdetect.review/1): decisions, counts, save / load."""

from __future__ import annotations

import json

import pytest

from CMBDetectLib.errors import InputError
from CMBDetectLib.review import (
    ADDED_ID_BASE,
    REVIEW_SCHEMA,
    CandidateReview,
    CaseReview,
    Decision,
    segment_id_for,
)


def make_review() -> CaseReview:
    review = CaseReview(case="sub-01", modality="swi", reviewer="tester",
                        parameters={"th_det": 0.5, "th_disc": 0.5})
    for cmb_id, p_disc in ((1, 0.9), (4, 0.7), (7, 0.6)):
        review.upsert(CandidateReview(id=cmb_id, centroid_ras=(1.0, 2.0, 3.0), volume_mm3=8.0, p_det=0.8,
                                      p_disc=p_disc))
    return review


def test_decisions_counts_and_history():
    review = make_review()
    assert review.counts()["pending"] == 3
    review.set_decision(1, "accepted")
    review.set_decision(4, Decision.REJECTED)
    review.upsert(CandidateReview(id=review.next_added_id(), decision="added"))
    counts = review.counts()
    assert counts == {"pending": 1, "accepted": 1, "rejected": 1, "added": 1, "total": 4, "cmbs": 2}
    assert [h["action"] for h in review.history] == ["accepted", "rejected"]
    assert review.get(ADDED_ID_BASE + 1).segment_id == "CMB_60001"
    with pytest.raises(InputError, match="not part of this review"):
        review.set_decision(99, "accepted")
    with pytest.raises(InputError, match="unknown review decision"):
        review.set_decision(1, "maybe")


def test_added_ids_never_collide_with_detector_ids():
    review = make_review()
    first = review.next_added_id(taken=[ADDED_ID_BASE + 1])
    assert first == ADDED_ID_BASE + 2
    assert segment_id_for(first) == f"CMB_{first}"


def test_json_round_trip_and_schema(tmp_path):
    review = make_review()
    review.set_decision(4, "rejected")
    review.extra["files"] = {"segmentation": "sub-01.seg.nrrd"}
    path = review.save(tmp_path / "sub-01.review.json")
    data = json.loads(path.read_text())
    assert data["schema"] == REVIEW_SCHEMA
    assert data["hard_negatives"] == [{"id": 4, "centroid_ras": [1.0, 2.0, 3.0], "kind": "rejected"}]
    assert {c["decision"] for c in data["cmbs"]} == {"pending", "rejected"}
    loaded = CaseReview.load(path)
    assert loaded.to_json_dict() == review.to_json_dict()
    assert loaded.extra["files"]["segmentation"] == "sub-01.seg.nrrd"
    assert not list(tmp_path.glob(".*partial*"))   # atomic write left no temporary file


def test_bad_review_files_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        CaseReview.load(tmp_path / "nope.review.json")
    bad = tmp_path / "bad.review.json"
    bad.write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        CaseReview.load(bad)
    bad.write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(InputError, match="not a CMBDetect review"):
        CaseReview.load(bad)
    bad.write_text(json.dumps({"schema": REVIEW_SCHEMA, "cmbs": [{"decision": "accepted"}]}))
    with pytest.raises(InputError, match="malformed"):
        CaseReview.load(bad)
