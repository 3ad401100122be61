"""The whole review with the REAL engine in a headless Slicer scene (slicer-core), no stand-ins:

synthetic SWI scan (``CMBDetectLib.synth``) -> ``DetectionSession`` (tiny random-weight model package, CPU)
-> segments and table -> accept / reject / edit / add missed -> change thresholds -> every decision and edit
still there -> save -> load into a fresh scene -> identical state; and the same from a session written by
the real command line (``python -m CMBDetectLib detect --save-prob --progress json`` through the
``ProcessRunner`` the Slicer module uses), loaded for review in the scene.

The random-weight networks give a nearly flat stage-1 map, so the thresholds are chosen from the map itself
(the top few dozen voxels) rather than fixed numbers: the test is about plumbing and state, not accuracy.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from CMBDetectLib.pipeline import DetectionParameters, DetectionSession, replace_parameters
from CMBDetectLib.review import ADDED_ID_BASE, Decision
from CMBDetectLib.volume import image_stem, write_volume_atomic

pytestmark = pytest.mark.slicer
slicer = pytest.importorskip("slicer")

from CMBDetectLib.mrml import segments  # noqa: E402
from CMBDetectLib.mrml.review_session import ReviewSession  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[1] / "CMBDetect"


def threshold_above(probability: np.ndarray, n_voxels: int) -> float:
    """A ``th_det`` keeping about the ``n_voxels`` highest voxels (the map is float16: use its levels)."""
    levels = np.unique(probability[probability > 0])[::-1]
    counts = np.cumsum([(probability == level).sum() for level in levels])
    index = int(np.searchsorted(counts, n_voxels))
    index = min(max(index, 0), len(levels) - 1)
    return float(levels[index])


@pytest.fixture(scope="module")
def engine_case(tiny_model, tmp_path_factory):
    """One small synthetic scan, detected once in this process (module scope: ~15 s in all)."""
    from CMBDetectLib.synth.generator import SynthConfig, generate_case

    started = time.perf_counter()
    case = generate_case(7, "swi", n_cmbs=3, config=SynthConfig(
        in_plane_range_mm=(0.9, 0.9), slice_thickness_mm=3.0, fov_mm=(120.0, 140.0),
        fov_z_range_mm=(60.0, 60.0)))
    generated = time.perf_counter() - started
    folder = tmp_path_factory.mktemp("engine_case")
    image_path = write_volume_atomic(case.image, folder / "synth_swi.nii.gz")
    session = DetectionSession(tiny_model, device="cpu")
    started = time.perf_counter()
    everything = DetectionParameters(th_det=0.99, th_disc=0.0, min_volume_mm3=0.0, max_ellipticity=1.0,
                                     min_edge_distance_mm=0.0)
    session.run(case.image, "swi", params=everything)
    detected = time.perf_counter() - started
    th_det = threshold_above(session.probability, 20)
    first = session.refilter(replace_parameters(everything, th_det=th_det))
    p_disc = sorted({c.p_disc for c in first.candidates})
    params = DetectionParameters(th_det=th_det, th_disc=max(p_disc[0] - 0.01, 0.0), min_volume_mm3=0.0,
                                 max_ellipticity=1.0, min_edge_distance_mm=0.0)
    result = session.refilter(params)
    assert 3 <= len(result.final_candidates) <= 80, "the chosen th_det should give a reviewable handful"
    return SimpleNamespace(case=case, image_path=image_path, session=session, params=params, result=result,
                           timings={"generate_s": round(generated, 1), "detect_s": round(detected, 1)})


def load_volume_node(scene, path: Path, name: str):
    """The scan read from its NIfTI file by Slicer's own volume storage node (as File > Add Data does)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.CreateDefaultDisplayNodes()
    return node


def segment_indices(session, cmb_id):
    segment = session.segmentation_node.GetSegmentation().GetSegment(f"CMB_{cmb_id}")
    return segments.segment_flat_indices(segment, session._ijk_to_ras, session._shape)


def paint_dilated(session, cmb_id):
    """A Segment Editor edit: grow the segment by one voxel through Slicer's own logic."""
    from scipy import ndimage

    mask = np.zeros(session._shape, bool)
    mask.ravel()[segment_indices(session, cmb_id)] = True
    mask = ndimage.binary_dilation(mask)
    image = segments.oriented_image_from_mask(mask.astype(np.uint8), (0, 0, 0), session._ijk_to_ras)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, session.segmentation_node, f"CMB_{cmb_id}",
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    return np.flatnonzero(mask.ravel())


def review_workflow(session: ReviewSession, result, params: DetectionParameters, missed_ras) -> dict:
    """accept / reject / edit / add missed, then thresholds up and down: returns what must survive."""
    final = sorted(c.id for c in result.final_candidates)
    assert session.ids() == final
    accepted, rejected, edited = final[:3]
    session.accept(accepted)
    session.reject(rejected)
    edited_voxels = paint_dilated(session, edited)
    added = session.add_missed(missed_ras)
    assert added.decision is Decision.ADDED
    added_voxels = segment_indices(session, added.id)
    assert added_voxels.size > 0
    counts = session.counts()
    assert (counts["accepted"], counts["rejected"], counts["added"]) == (1, 1, 1)
    assert session.review.get(edited).edited
    decided = {accepted: Decision.ACCEPTED, rejected: Decision.REJECTED, added.id: Decision.ADDED}

    # Th_Cdisc above every student score: only decided or edited CMBs stay, exactly as they were.
    top = max(c.p_disc for c in result.candidates)
    session.set_parameters(replace_parameters(params, th_disc=min(top + 0.01, 1.0)))
    assert session.ids() == sorted([accepted, rejected, edited, added.id])
    assert not any(c.final for c in session.result.candidates)
    np.testing.assert_array_equal(segment_indices(session, edited), edited_voxels)
    np.testing.assert_array_equal(segment_indices(session, added.id), added_voxels)
    # Th_Cdet down (more, larger components; new ones scored by the student), then back.
    lower = threshold_above(session.detection_session.probability, 400)
    assert lower < params.th_det
    session.set_parameters(replace_parameters(params, th_det=lower))
    assert len(session.result.candidates) > len(result.candidates)
    assert set(decided) | {edited} <= set(session.ids())
    np.testing.assert_array_equal(segment_indices(session, edited), edited_voxels)
    session.set_parameters(params)
    assert set(session.ids()) == set(final) | {added.id}
    for cmb_id, decision in decided.items():
        assert session.review.get(cmb_id).decision is decision
        colour = session.segmentation_node.GetSegmentation().GetSegment(f"CMB_{cmb_id}").GetColor()
        assert colour == pytest.approx(segments.DECISION_COLOURS[decision])
    np.testing.assert_array_equal(segment_indices(session, edited), edited_voxels)
    statuses = {row["id"]: row["status"] for row in session.table_rows()}
    assert statuses[accepted] == "accepted" and statuses[rejected] == "rejected"
    assert statuses[added.id] == "added" and statuses[edited] == "pending"
    return {"accepted": accepted, "rejected": rejected, "edited": edited, "added": added.id,
            "edited_voxels": edited_voxels}


def check_segments_match_the_engine(session: ReviewSession, result) -> None:
    """Each segment = the engine's candidate voxels, and its centroid = the engine's centroid_ras."""
    labels = result.candidate_labels.array
    ijk_to_ras = session._ijk_to_ras
    for record in result.final_candidates:
        voxels = segment_indices(session, record.id)
        np.testing.assert_array_equal(voxels, np.flatnonzero(labels.ravel() == record.id))
        kji = np.array(np.unravel_index(voxels, session._shape), dtype=float).mean(axis=1)
        centroid = (ijk_to_ras @ np.r_[kji[::-1], 1.0])[:3]
        # Same place in Slicer's RAS as the engine says (a RAS/LPS or i/k mix-up would be centimetres off).
        assert np.linalg.norm(centroid - np.asarray(record.centroid_ras)) < 1.5
        tags = segments.read_tags(session.segmentation_node.GetSegmentation().GetSegment(f"CMB_{record.id}"))
        assert float(tags["p_disc"]) == pytest.approx(record.p_disc, abs=1e-5)
    rows = session.table_rows()
    assert [row["id"] for row in rows] == session.ids()


def missed_point(case, result) -> np.ndarray:
    """RAS of a synthetic CMB (ground truth) to click as 'missed' (any: a click on a shown one selects it)."""
    shown = {int(v) for v in np.unique(result.candidate_labels.array) if v}
    for cmb in case.cmbs:
        kji = tuple(int(round(v)) for v in cmb.centre_kji)
        if int(result.candidate_labels.array[kji]) not in shown:
            return case.image.index_to_ras(np.asarray(kji, dtype=float))[0]
    pytest.skip("every synthetic CMB lies inside a shown candidate")


def test_real_detection_review_thresholds_save_and_resume(engine_case, slicer_scene, tmp_path, tiny_model):
    started = time.perf_counter()
    node = load_volume_node(slicer_scene.scene, engine_case.image_path, "synth_swi")
    before = {slicer_scene.scene.GetNthNode(i).GetID() for i in range(slicer_scene.scene.GetNumberOfNodes())}
    session = ReviewSession.create(node, engine_case.result, "swi", case="synth",
                                   detection_session=engine_case.session)
    created = time.perf_counter() - started
    after = {slicer_scene.scene.GetNthNode(i).GetID() for i in range(slicer_scene.scene.GetNumberOfNodes())}
    assert {session.segmentation_node.GetID(), session.table_node.GetID()} <= after - before
    check_segments_match_the_engine(session, engine_case.result)

    kept = review_workflow(session, engine_case.result, engine_case.params,
                           missed_point(engine_case.case, engine_case.result))
    cache = tmp_path / "work" / "synth_session.npz"
    engine_case.session.save(cache)
    session.session_file = cache
    state = session.state()
    paths = session.save(tmp_path / "review", case="synth")
    assert {p.name for p in (tmp_path / "review").iterdir()} == {
        "synth.seg.nrrd", "synth.review.json", "synth_candidates.json", "synth_session.npz"}
    saved = json.loads(paths["review"].read_text())
    assert saved["parameters"] == engine_case.params.to_dict()
    assert {c["id"] for c in saved["hard_negatives"]} == {kept["rejected"]}

    # A fresh scene, the image read from disk again, the detection cache from the saved review.
    scene2 = slicer.vtkMRMLScene()      # as after restarting Slicer
    node2 = load_volume_node(scene2, engine_case.image_path, "synth_swi")
    cached = DetectionSession.load(tmp_path / "review" / "synth_session.npz", model=tiny_model)
    resumed = ReviewSession.load(node2, paths["review"], detection_session=cached)
    assert resumed.state() == state
    # Thresholds stay live after resuming, and still keep every decision and the edit.
    top = max(c.p_disc for c in engine_case.result.candidates)
    resumed.set_parameters(replace_parameters(engine_case.params, th_disc=min(top + 0.01, 1.0)))
    assert resumed.ids() == sorted([kept["accepted"], kept["rejected"], kept["edited"], kept["added"]])
    np.testing.assert_array_equal(segment_indices(resumed, kept["edited"]), kept["edited_voxels"])
    scene2.Clear(1)
    print(f"timings: {engine_case.timings}, review nodes created in {created:.2f} s")


def test_session_from_the_command_line_is_reviewed_in_the_scene(engine_case, slicer_scene, tmp_path,
                                                               tiny_model):
    """What the Slicer module does: run ``cmbdetect detect`` in a background process, load its session."""
    from CMBDetectLib.runner import ProcessRunner, detect_command, engine_environment

    params = engine_case.params
    out = tmp_path / "out"
    command = detect_command(sys.executable, engine_case.image_path, out, modality="swi",
                             model=str(tiny_model.path), device="cpu", th_det=params.th_det,
                             th_disc=params.th_disc, save_prob=True)
    command += ["--min-volume-mm3", "0", "--max-ellipticity", "1", "--min-edge-distance-mm", "0"]
    started = time.perf_counter()
    runner = ProcessRunner(command, env=engine_environment(MODULE_DIR)).start()
    fractions = []
    while runner.is_running and time.perf_counter() - started < 240:
        fractions += [e.fraction for e in runner.poll() if e.type == "progress" and e.fraction is not None]
        time.sleep(0.05)
    assert runner.wait(timeout=1) == "finished", runner.error_message
    seconds = time.perf_counter() - started
    assert fractions and fractions == sorted(fractions)      # progress lines arrived, in order
    stem = image_stem(engine_case.image_path)
    outputs = runner.result["outputs"]
    assert Path(outputs["session"]) == out / f"{stem}_session.npz"
    record = json.loads((out / f"{stem}_candidates.json").read_text())

    # The CLI's session answers like the in-process one (same image, same model, same thresholds).
    cli_session = DetectionSession.load(outputs["session"], model=tiny_model)
    result = cli_session.refilter(DetectionParameters.from_dict(record["parameters"]))
    assert [c.id for c in result.candidates] == [c["id"] for c in record["candidates"]]
    assert [c.id for c in result.candidates] == [c.id for c in engine_case.result.candidates]
    np.testing.assert_array_equal(result.candidate_labels.array, engine_case.result.candidate_labels.array)

    node = load_volume_node(slicer_scene.scene, engine_case.image_path, "synth_swi")
    session = ReviewSession.create(node, result, record["image"]["modality"], case=stem,
                                   detection_session=cli_session)
    session.session_file = Path(outputs["session"])
    check_segments_match_the_engine(session, result)
    kept = review_workflow(session, result, params, missed_point(engine_case.case, result))
    state = session.state()
    paths = session.save(tmp_path / "review")
    scene2 = slicer.vtkMRMLScene()      # as after restarting Slicer
    node2 = load_volume_node(scene2, engine_case.image_path, "synth_swi")
    resumed = ReviewSession.load(node2, paths["review"], detection_session=DetectionSession.load(
        tmp_path / "review" / f"{stem}_session.npz", model=tiny_model))
    assert resumed.state() == state
    assert resumed.review.get(kept["added"]).id > ADDED_ID_BASE or \
        resumed.review.get(kept["added"]).decision is Decision.ADDED
    scene2.Clear(1)
    print(f"CLI detection (subprocess, incl. start-up) {seconds:.1f} s")


def test_th_det_preview_in_the_review_refines_to_the_real_scores(engine_case, slicer_scene, tmp_path, tiny_model):
    """A Th_Cdet drag with test-time flips: one-view scores at once, the real ones a few at a time, and a
    save in between never writes a preview score."""
    cache = engine_case.session.save(tmp_path / "synth_session.npz")

    def flipped_session() -> DetectionSession:
        session = DetectionSession.load(cache, model=tiny_model)
        session.set_student_flips(True)
        return session

    detection = flipped_session()
    node = load_volume_node(slicer_scene.scene, engine_case.image_path, "synth_swi")
    review = ReviewSession.create(node, detection.refilter(engine_case.params), "swi", case="synth",
                                  detection_session=detection)
    lower = replace_parameters(engine_case.params, th_det=threshold_above(detection.probability, 80))
    review.set_parameters(lower, preview=True)
    new = review.provisional
    assert new >= 2, "a lower Th_Cdet must bring candidates never scored"
    assert review.refine_scores(limit=1) == new - 1 == review.provisional
    reference = flipped_session()
    reference.refilter(engine_case.params)
    expected = {c.id: round(c.p_disc, 4) for c in reference.refilter(lower).candidates}
    review.save(tmp_path / "review", case="synth")                   # finishes the scoring first
    assert review.provisional == 0 and review.refine_scores() == 0
    saved = json.loads((tmp_path / "review" / "synth_candidates.json").read_text())
    assert {c["id"]: c["p_disc"] for c in saved["candidates"]} == expected
    rows = {int(row["id"]): float(row["p_disc"]) for row in review.table_rows()}
    assert rows and all(abs(value - expected[cmb_id]) < 1e-3 for cmb_id, value in rows.items())
