"""The detection pipeline with cached stages: networks once, cheap re-filtering, stable ids, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from CMBDetectLib.errors import InputError
from CMBDetectLib.pipeline import DetectionParameters, DetectionSession


@pytest.fixture(scope="module")
def session_and_result(tiny_model, phantom_volume):
    session = DetectionSession(tiny_model, device="cpu")
    # A low Th_Cdet so that the random-weight network still yields candidates to play with.
    result = session.run(phantom_volume.image, "swi", params=DetectionParameters(th_det=0.3, th_disc=0.0))
    return session, result


def _count_calls(monkeypatch, session):
    calls = {"student": 0}
    original = session._score

    def counting(centres):
        calls["student"] += len(centres)
        return original(centres)

    monkeypatch.setattr(session, "_score", counting)
    return calls


def _record_views(session) -> list[tuple[int, bool]]:
    """Wrap ``session._score``: each call is recorded as (number of centres, preview)."""
    views = []
    original = session._score

    def recording(centres, preview=False):
        views.append((len(centres), preview))
        return original(centres, preview=preview)

    session._score = recording
    return views


def test_labels_are_on_the_input_grid(session_and_result, phantom_volume):
    _, result = session_and_result
    assert result.candidate_labels.same_grid(phantom_volume.image)
    ids = {c.id for c in result.candidates}
    assert set(np.unique(result.candidate_labels.array)) - {0} <= ids
    final = result.final_labels().array
    assert set(np.unique(final)) - {0} == {c.id for c in result.final_candidates}


def test_th_disc_change_runs_no_network(session_and_result, monkeypatch):
    session, result = session_and_result
    if not result.candidates:
        pytest.skip("random network produced no candidate")
    calls = _count_calls(monkeypatch, session)
    monkeypatch.setattr(session.model, "network", lambda *a, **k: pytest.fail("network must not be rebuilt"))
    strict = session.refilter(DetectionParameters(th_det=0.3, th_disc=1.0))
    assert calls["student"] == 0
    assert all(not c.final and c.reason == "discrimination" for c in strict.candidates)
    assert [c.id for c in strict.candidates] == [c.id for c in result.candidates]


def test_th_det_change_scores_only_new_candidates_and_keeps_ids(session_and_result, monkeypatch):
    session, result = session_and_result
    calls = _count_calls(monkeypatch, session)
    before = {c.id: c for c in result.candidates}
    higher = session.refilter(DetectionParameters(th_det=0.6, th_disc=0.0))
    again = session.refilter(DetectionParameters(th_det=0.3, th_disc=0.0))
    assert [c.id for c in again.candidates] == [c.id for c in result.candidates]
    assert calls["student"] <= len(higher.candidates)  # only centroids never seen before
    for candidate in higher.candidates:
        assert candidate.p_det >= 0.6 - 1e-6
    # a candidate that survives a stricter threshold keeps its id when its peak is the same
    for candidate in again.candidates:
        assert candidate.p_disc == pytest.approx(before[candidate.id].p_disc)


def test_th_det_preview_scores_new_candidates_once_then_refines_to_the_real_scores(tiny_model, phantom_volume):
    params = DetectionParameters(th_det=0.3, th_disc=0.5)
    real = DetectionSession(tiny_model, device="cpu")
    real.set_student_flips(True)
    expected = real.run(phantom_volume.image, "swi", params=params)
    if not expected.candidates:
        pytest.skip("random network produced no candidate")

    session = DetectionSession(tiny_model, device="cpu")
    session.run(phantom_volume.image, "swi", params=params)
    session.set_student_flips(True)           # forgets every score: all candidates are new again
    views = _record_views(session)
    preview = session.refilter(params, preview=True)
    n = len(expected.candidates)
    assert preview.provisional == n == session.provisional_count(0.3) and views == [(n, True)]
    assert session.refilter(params, preview=True).provisional == n and len(views) == 1   # nothing re-scored
    assert session.score_provisional(0.3, limit=1) == n - 1
    while session.score_provisional(0.3, limit=2):
        pass
    assert session.provisional_count(0.3) == 0
    final = session.refilter(params)
    assert final.provisional == 0
    key = lambda c: c.centroid_ijk  # noqa: E731 - ids differ between sessions, centroids do not
    assert [(c.p_disc, c.final) for c in sorted(final.candidates, key=key)] == \
        [(c.p_disc, c.final) for c in sorted(expected.candidates, key=key)]
    # without test-time flips a preview is already the real score
    session.set_student_flips(False)
    assert session.refilter(params, preview=True).provisional == 0


def test_postprocessing_reasons_follow_parameters(session_and_result):
    session, _ = session_and_result
    huge = session.refilter(DetectionParameters(th_det=0.3, th_disc=0.0, min_volume_mm3=1e9))
    assert all(c.reason in ("volume",) for c in huge.candidates)
    relaxed = session.refilter(DetectionParameters(th_det=0.3, th_disc=0.0, min_volume_mm3=0,
                                                   max_ellipticity=1.0, min_edge_distance_mm=0))
    assert all(c.final for c in relaxed.candidates)


def test_save_and_load_give_identical_results(session_and_result, tmp_path):
    session, _ = session_and_result
    params = DetectionParameters(th_det=0.3, th_disc=0.2)
    expected = session.refilter(params)
    path = session.save(tmp_path / "scan_session.npz")
    loaded = DetectionSession.load(path)  # no model: review-only
    got = loaded.refilter(params)
    assert [c.to_dict() for c in got.candidates] == [c.to_dict() for c in expected.candidates]
    np.testing.assert_array_equal(got.candidate_labels.array, expected.candidate_labels.array)
    assert got.model_info["name"] == "tiny-test"


def test_invalid_parameters_are_refused():
    with pytest.raises(InputError, match="th_disc"):
        DetectionParameters(th_disc=1.5).validate()
    with pytest.raises(InputError, match="min_volume_mm3"):
        DetectionParameters(min_volume_mm3=-1).validate()


def test_json_record_has_the_contract_fields(session_and_result):
    _, result = session_and_result
    record = result.to_json_dict("scan.nii.gz", "swi")
    assert record["schema"] == "cmbdetect.candidates/1"
    assert {"path", "shape", "spacing", "modality"} <= set(record["image"])
    assert {"name", "version", "sha256"} <= set(record["model"])
    for candidate in record["candidates"]:
        assert {"id", "centroid_ijk", "centroid_ras", "volume_mm3", "p_det", "p_disc", "ellipticity",
                "edge_distance_mm", "final", "reason"} <= set(candidate)


def _crafted_probability(shape) -> np.ndarray:
    """A stage-1 map whose components change with Th_Cdet: a blob with a faint tail (its centroid moves when
    the tail drops out) and two cores joined by a faint bridge (one component at 0.3, two at 0.45)."""
    probability = np.zeros(shape, np.float32)
    k, j, i = (n // 2 for n in shape)
    probability[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2] = 0.9
    probability[k, j, i + 2:i + 9] = 0.35
    for dj in (8, 14):
        probability[k - 1:k + 2, j + dj - 1:j + dj + 2, i - 1:i + 2] = 0.8 + 0.01 * dj
    probability[k, j + 10:j + 13, i] = 0.35
    return probability


def _crafted_session(tiny_model, phantom_volume, params) -> DetectionSession:
    """A session on the phantom whose stage-1 map is replaced by ``_crafted_probability``."""
    session = DetectionSession(tiny_model, device="cpu")
    session.set_student_flips(True)
    session.run(phantom_volume.image, "swi", params=params)
    session.probability = _crafted_probability(session.probability.shape)
    for cache in (session._extractions, session._scores, session._preview_scores):   # the phantom's own
        cache.clear()
    return session


def test_th_det_preview_borrows_the_nested_component_score_without_the_network(tiny_model, phantom_volume):
    params, higher = DetectionParameters(th_det=0.3, th_disc=0.5), DetectionParameters(th_det=0.45, th_disc=0.5)
    session = _crafted_session(tiny_model, phantom_volume, params)
    assert len(session.refilter(params).candidates) == 2
    views = _record_views(session)
    preview = session.refilter(higher, preview=True)
    # Every component above 0.45 lies inside one above 0.3: none needs the network while the slider moves ...
    assert views == [] and len(preview.candidates) == 3 and preview.provisional == 3
    # ... and a provisional score is the score of the 0.3 component that holds the new component's peak
    lower, now = session._extractions[0.3], session._extractions[0.45]
    for candidate, key in zip(now.candidates, now.keys):
        holder = lower.keys[int(lower.labels[candidate.peak_kji]) - 1]
        assert session._preview_scores[key] == session._scores[holder]
    assert session.score_provisional(0.45, limit=8) == 0 and views == [(3, False)]
    refined = session.refilter(higher)
    expected = _crafted_session(tiny_model, phantom_volume, higher).refilter(higher)
    key = lambda c: c.centroid_ijk  # noqa: E731
    assert refined.provisional == 0
    assert [(c.p_disc, c.final) for c in sorted(refined.candidates, key=key)] == \
        [(c.p_disc, c.final) for c in sorted(expected.candidates, key=key)]


def test_th_det_cache_is_bounded_and_an_evicted_threshold_comes_back_the_same(session_and_result, monkeypatch):
    from CMBDetectLib.pipeline import MAX_CACHED_THRESHOLDS

    session, _ = session_and_result
    first = session.refilter(DetectionParameters(th_det=0.31, th_disc=0.0))
    for step in range(MAX_CACHED_THRESHOLDS + 4):      # a slider dragged over many 0.01 steps
        session.refilter(DetectionParameters(th_det=0.4 + 0.01 * step, th_disc=0.0))
    assert len(session._extractions) == MAX_CACHED_THRESHOLDS and 0.31 not in session._extractions
    calls = _count_calls(monkeypatch, session)
    again = session.refilter(DetectionParameters(th_det=0.31, th_disc=0.0))
    assert calls["student"] == 0                        # its scores are still known
    assert [(c.id, c.p_disc, c.final) for c in again.candidates] == \
        [(c.id, c.p_disc, c.final) for c in first.candidates]
    assert np.array_equal(again.candidate_labels.array, first.candidate_labels.array)
