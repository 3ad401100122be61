"""The whole review in a headless Slicer scene (slicer-core): detect -> segments and table -> accept /
reject / edit / add missed -> change thresholds -> every decision and edit still there -> save -> load into a
fresh scene -> identical state."""

from __future__ import annotations

import numpy as np
import pytest
from review_fakes import FakeDetectionSession, add_slice_views, default_parameters, make_case

from CMBDetectLib.errors import InputError
from CMBDetectLib.review import ADDED_ID_BASE, Decision
from CMBDetectLib.volume import Volume

pytestmark = pytest.mark.slicer
slicer = pytest.importorskip("slicer")

from CMBDetectLib.mrml import geometry, navigation, segments  # noqa: E402
from CMBDetectLib.mrml.review_session import ReviewSession  # noqa: E402


def nodes_in(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def fresh_scene():
    scene = slicer.vtkMRMLScene()
    return scene


@pytest.fixture
def case(slicer_scene):
    volume, spec, missed = make_case()
    node = geometry.volume_to_node(volume, "sub-01_swi", scene=slicer_scene.scene)
    fake = FakeDetectionSession(volume, spec)
    return volume, spec, missed, node, fake


def segment_indices(session, cmb_id):
    segment = session.segmentation_node.GetSegmentation().GetSegment(f"CMB_{cmb_id}")
    return segments.segment_flat_indices(segment, session._ijk_to_ras, session._shape)


def label_indices(result, cmb_id):
    return np.flatnonzero(result.candidate_labels.array.ravel() == cmb_id)


def paint(session, cmb_id, flat_indices):
    """What the Segment Editor does: replace a segment's labelmap through Slicer's own logic."""
    mask = np.zeros(session._shape, np.uint8)
    mask.ravel()[flat_indices] = 1
    image = segments.oriented_image_from_mask(mask, (0, 0, 0), session._ijk_to_ras)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, session.segmentation_node, f"CMB_{cmb_id}",
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)


def dilate(session, flat_indices):
    from scipy import ndimage

    mask = np.zeros(session._shape, bool)
    mask.ravel()[flat_indices] = True
    return np.flatnonzero(ndimage.binary_dilation(mask).ravel())


def test_detection_result_becomes_segments_and_table(case):
    volume, spec, _missed, node, fake = case
    result = fake.refilter(default_parameters())
    session = ReviewSession.create(node, result, "swi", case="sub-01", detection_session=fake)
    final = sorted(c.id for c in result.candidates if c.final)
    assert 2 <= len(final) < len(result.candidates)        # some candidates are filtered: a real test
    assert session.ids() == final
    segmentation = session.segmentation_node.GetSegmentation()
    assert sorted(segmentation.GetSegmentIDs()) == sorted(f"CMB_{i}" for i in final)
    assert session.segmentation_node.GetNodeReference(
        session.segmentation_node.GetReferenceImageGeometryReferenceRole()) is node
    records = {c.id: c for c in result.candidates}
    for cmb_id in final:
        segment = segmentation.GetSegment(f"CMB_{cmb_id}")
        assert segment.GetName() == f"CMB {cmb_id}"
        tags = segments.read_tags(segment)
        assert float(tags["p_disc"]) == pytest.approx(records[cmb_id].p_disc)
        assert float(tags["p_det"]) == pytest.approx(records[cmb_id].p_det)
        assert tags["decision"] == "pending" and tags["id"] == str(cmb_id)
        assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentStatus(segment) == \
            slicer.vtkSlicerSegmentationsModuleLogic.NotStarted
        assert segment.GetColor() == pytest.approx(segments.DECISION_COLOURS[Decision.PENDING])
        # Exactly the candidate's voxels, on the input grid.
        np.testing.assert_array_equal(segment_indices(session, cmb_id), label_indices(result, cmb_id))
        # Segment voxel centre (through Slicer's IJK->RAS) = the engine's RAS centroid (RAS vs LPS check).
        kji = np.array(np.unravel_index(segment_indices(session, cmb_id), session._shape), float).mean(axis=1)
        ras = geometry.node_ijk_to_ras(node) @ np.r_[kji[::-1], 1.0]
        np.testing.assert_allclose(ras[:3], records[cmb_id].centroid_ras, atol=1e-6)
    rows = session.table_rows()
    assert [r["id"] for r in rows] == final
    assert all(r["status"] == "pending" for r in rows)
    assert rows[0]["p_disc"] == pytest.approx(round(records[final[0]].p_disc, 3))


def test_whole_review_keeps_decisions_and_edits_through_thresholds_and_save_load(case, tmp_path):
    volume, spec, missed, node, fake = case
    result = fake.refilter(default_parameters())
    session = ReviewSession.create(node, result, "swi", case="sub-01", detection_session=fake)
    accepted, rejected, edited = session.ids()[:3]
    session.accept(accepted)
    session.reject(rejected)
    edited_voxels = dilate(session, segment_indices(session, edited))
    paint(session, edited, edited_voxels)

    added = session.add_missed(volume.index_to_ras(missed[0])[0])
    assert added.id == ADDED_ID_BASE + 1 and added.decision is Decision.ADDED
    added_voxels = segment_indices(session, added.id)
    assert np.ravel_multi_index(missed[0], session._shape) in added_voxels
    assert 3 <= added_voxels.size <= 200        # grown around the dark blob, not a leak
    counts = session.counts()
    assert counts["accepted"] == 1 and counts["rejected"] == 1 and counts["added"] == 1
    assert session.review.get(edited).edited     # the Segment Editor change was noticed

    # Th_Cdisc up: every undecided, unedited candidate goes; decisions and the edit stay exactly as they were.
    session.set_parameters(default_parameters(th_disc=0.99))
    assert session.ids() == sorted([accepted, rejected, edited, added.id])
    np.testing.assert_array_equal(segment_indices(session, edited), edited_voxels)
    np.testing.assert_array_equal(segment_indices(session, added.id), added_voxels)
    assert session.review.get(accepted).decision is Decision.ACCEPTED
    assert session.review.get(rejected).decision is Decision.REJECTED
    assert session.review.get(accepted).final is False      # the detector's verdict is still reported

    # Th_Cdet down: components grow. Unedited ones follow the detector, the edited one does not move.
    result_low = fake.refilter(default_parameters(th_det=0.3, th_disc=0.99))
    changes = session.apply_result(result_low)
    assert changes["reshaped"] >= 2
    np.testing.assert_array_equal(segment_indices(session, accepted), label_indices(result_low, accepted))
    assert segment_indices(session, accepted).size > label_indices(result, accepted).size
    np.testing.assert_array_equal(segment_indices(session, edited), edited_voxels)

    # Back to the defaults: the pending candidates return, decisions untouched.
    session.set_parameters(default_parameters(th_disc=0.5))
    final = {c.id for c in session.result.candidates if c.final}
    assert set(session.ids()) == final | {accepted, rejected, edited, added.id}
    colours = {cmb_id: session.segmentation_node.GetSegmentation().GetSegment(f"CMB_{cmb_id}").GetColor()
               for cmb_id in (accepted, rejected, added.id)}
    assert colours[accepted] == pytest.approx(segments.DECISION_COLOURS[Decision.ACCEPTED])
    assert colours[rejected] == pytest.approx(segments.DECISION_COLOURS[Decision.REJECTED])
    assert colours[added.id] == pytest.approx(segments.DECISION_COLOURS[Decision.ADDED])
    statuses = {row["id"]: row["status"] for row in session.table_rows()}
    assert statuses[accepted] == "accepted" and statuses[rejected] == "rejected"
    assert statuses[added.id] == "added"

    before = session.state()
    cache = tmp_path / "work" / "scan_session.npz"       # the detection cache the thresholds come from
    cache.parent.mkdir()
    cache.write_bytes(b"cache")
    session.session_file = cache
    paths = session.save(tmp_path, case="sub-01")
    assert (tmp_path / "sub-01_session.npz").read_bytes() == b"cache"   # kept with the review
    assert paths["segmentation"].name == "sub-01.seg.nrrd" and paths["review"].name == "sub-01.review.json"
    assert paths["candidates"].is_file()
    assert not list(tmp_path.glob(".*"))        # no temporary files left

    # Resume in a fresh scene, on the same image loaded again.
    scene = fresh_scene()
    node2 = geometry.volume_to_node(volume, "sub-01_swi", scene=scene)
    resumed = ReviewSession.load(node2, paths["review"], detection_session=FakeDetectionSession(volume, spec))
    assert resumed.state() == before
    assert resumed.session_file == tmp_path / "sub-01_session.npz"
    assert resumed.review.get(edited).edited
    # ... and the resumed review keeps behaving: a threshold change still keeps every decision and edit.
    resumed.set_parameters(default_parameters(th_disc=0.99))
    np.testing.assert_array_equal(segment_indices(resumed, edited), edited_voxels)
    assert resumed.ids() == sorted([accepted, rejected, edited, added.id])
    # An edit made after loading is detected too (fingerprints survive the file round trip).
    paint(resumed, accepted, dilate(resumed, segment_indices(resumed, accepted)))
    resumed.sync_from_scene()
    assert resumed.review.get(accepted).edited
    scene.Clear(1)


def test_changes_made_directly_in_slicer_are_picked_up(case):
    volume, spec, _missed, node, fake = case
    session = ReviewSession.create(node, fake.refilter(default_parameters()), "swi", detection_session=fake)
    first, second = session.ids()[:2]
    segmentation = session.segmentation_node.GetSegmentation()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    logic.SetSegmentStatus(segmentation.GetSegment(f"CMB_{first}"), logic.Completed)   # status set in the GUI
    segmentation.RemoveSegment(f"CMB_{second}")                                       # deleted in the GUI
    # A segment painted from scratch in the Segment Editor.
    mask = np.zeros((3, 3, 3), np.uint8)
    mask[1, 1, 1] = 1
    manual = slicer.vtkSegment()
    manual.SetName("my CMB")
    segments.set_segment_mask(manual, mask, (10, 30, 30), session._ijk_to_ras)
    segmentation.AddSegment(manual, "Segment_1")

    counts = session.counts()
    assert session.review.get(first).decision is Decision.ACCEPTED
    assert session.review.get(second).decision is Decision.REJECTED                 # kept as a hard negative
    assert segmentation.GetSegment(f"CMB_{second}") is not None
    adopted = [c for c in session.review.cmbs if c.segment_id == "Segment_1"]
    assert len(adopted) == 1 and adopted[0].decision is Decision.ADDED and adopted[0].id > ADDED_ID_BASE
    assert counts["added"] == 1
    assert {r["status"] for r in session.table_rows() if r["id"] == first} == {"accepted"}


def test_navigation_moves_slice_views_to_the_candidate(case):
    volume, spec, _missed, node, fake = case
    views = add_slice_views(node.GetScene())
    session = ReviewSession.create(node, fake.refilter(default_parameters()), "swi", detection_session=fake)
    ids = session.ids()
    assert session.next(jump=True) == ids[0]
    assert session.next() == ids[1]
    assert session.previous() == ids[0]
    assert session.previous() == ids[-1]       # wraps around
    target = session.select(ids[1])
    r, a, s = target.centroid_ras
    assert views["Red"].GetSliceOffset() == pytest.approx(s, abs=1e-6)       # axial offset = S
    for view in views.values():   # the candidate lies in every view's plane
        assert navigation.distance_to_plane(view, target.centroid_ras) == pytest.approx(0, abs=1e-6)
        assert view.GetSliceOffset() == pytest.approx(navigation.slice_offset_for(view, (r, a, s)), abs=1e-6)
    session.accept()                              # acts on the selected CMB
    assert session.next(pending_only=True) not in (None, ids[1])


def test_bad_inputs_leave_the_scene_unchanged(case, tmp_path):
    volume, spec, _missed, node, fake = case
    scene = node.GetScene()
    result = fake.refilter(default_parameters())
    before = nodes_in(scene)
    labelmap = geometry.volume_to_node(volume.with_array(np.ones(volume.array.shape, np.uint8)), "lab",
                                       labelmap=True, scene=scene)
    before = nodes_in(scene)
    with pytest.raises(InputError, match="label map"):
        ReviewSession.create(labelmap, result, "swi")
    with pytest.raises(InputError, match="no input volume"):
        ReviewSession.create(None, result, "swi")
    other = geometry.volume_to_node(Volume(volume.array[:, :-2].copy(), volume.spacing, volume.origin,
                                          volume.direction), "cropped", scene=scene)
    before = nodes_in(scene)
    with pytest.raises(InputError, match="does not match"):
        ReviewSession.create(other, result, "swi")
    assert nodes_in(scene) == before

    # A failure half-way through building removes what was added.
    session = ReviewSession.create(node, result, "swi", detection_session=None)
    with pytest.raises(InputError, match="no cached detection"):
        session.set_parameters(default_parameters(th_disc=0.9))
    with pytest.raises(InputError, match="outside the input volume"):
        session.add_missed((1e4, 1e4, 1e4))
    with pytest.raises(InputError, match="no CMB is selected"):
        session.accept()
    paths = session.save(tmp_path)
    before = nodes_in(scene)
    with pytest.raises(InputError, match="select the reviewed volume"):
        ReviewSession.load(other, paths["review"])
    paths["segmentation"].unlink()
    with pytest.raises(InputError, match="segmentation file is missing"):
        ReviewSession.load(node, paths["review"])
    assert nodes_in(scene) == before


def test_build_failure_removes_partially_added_nodes(case, monkeypatch):
    volume, spec, _missed, node, fake = case
    scene = node.GetScene()
    before = nodes_in(scene)

    def broken(self):
        raise RuntimeError("simulated failure while attaching")

    monkeypatch.setattr(ReviewSession, "_attach_to_volume", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        ReviewSession.create(node, fake.refilter(default_parameters()), "swi")
    assert nodes_in(scene) == before
