"""Anatomy in the review (headless slicer-core scene): locate the reviewed CMBs on a head phantom warped by a
known affine, regions in the segment tags and the table, the summary counts the review's CMBs (accepted +
added + pending final; not rejected), the atlas outline overlay, the report files; a non-brain image is a
clear ``InputError`` and leaves the scene exactly as it was."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from review_fakes import FakeDetectionSession, default_parameters

from CMBDetectLib.errors import InputError
from CMBDetectLib.volume import Volume

pytestmark = pytest.mark.slicer
slicer = pytest.importorskip("slicer")
pytest.importorskip("nilearn")

from CMBDetectLib.anatomy.phantom import known_transform, make_head_phantom  # noqa: E402
from CMBDetectLib.mrml import anatomy, geometry, segments  # noqa: E402
from CMBDetectLib.mrml.review_session import ReviewSession  # noqa: E402

FLIP = np.array([-1.0, -1.0, 1.0])
# MNI RAS points of textbook regions (as in test_anatomy_regions), with the expected answer.
POINTS = {  # name: (MNI RAS mm, p_disc, expected category, expected side)
    "thalamus": ((-12.0, -18.0, 8.0), 0.9, "deep", "left"),
    "frontal": ((-40.0, 30.0, 30.0), 0.85, "lobar", "left"),
    "cerebellum": ((0.0, -55.0, -35.0), 0.6, "infratentorial", "midline"),
    "temporal": ((50.0, -20.0, -15.0), 0.3, "lobar", "right"),
    "parietal": ((-35.0, -55.0, 50.0), 0.95, "lobar", "left"),
}


def nodes_in(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


@pytest.fixture(scope="module")
def phantom():
    truth = known_transform(rotation_deg=(6.0, -4.0, 5.0), scale=(1.04, 0.97, 1.02),
                            translation_mm=(5, -8, 10))
    scan, _ = make_head_phantom(truth, modality="t2s", spacing=(1.2, 1.2, 3.0), size=(150, 180, 50),
                                noise=0.03, seed=2)
    inverse = truth.GetInverse()
    spec = []
    for index, (name, (mni, p_disc, _category, _side)) in enumerate(POINTS.items(), start=1):
        ras = np.array(inverse.TransformPoint([float(v) for v in np.asarray(mni) * FLIP])) * FLIP
        kji = np.rint(scan.ras_to_index(ras)[0]).astype(int)
        spec.append({"id": index, "name": name, "centre": kji, "p_det": 0.9, "p_disc": p_disc})
    return scan, spec


@pytest.fixture
def review(phantom, slicer_scene):
    scan, spec = phantom
    node = geometry.volume_to_node(scan, "phantom_t2s", scene=slicer_scene.scene)
    fake = FakeDetectionSession(scan, spec, sigma_mm=2.0)
    session = ReviewSession.create(node, fake.refilter(default_parameters()), "t2s", case="phantom",
                                   detection_session=fake)
    ids = {item["name"]: item["id"] for item in spec}
    assert sorted(session.ids()) == sorted(ids[n] for n in ("thalamus", "frontal", "cerebellum", "parietal"))
    session.accept(ids["thalamus"])
    session.reject(ids["frontal"])
    temporal_ras = scan.index_to_ras(np.asarray(spec[3]["centre"], float))[0]
    added = session.add_missed(temporal_ras)       # filtered out by Th_Cdisc: the reviewer adds it
    assert added.id == ids["temporal"] and added.decision.value == "added"
    return session, ids, slicer_scene


def test_locate_names_regions_in_tags_and_table_and_summarises_the_review(review, tmp_path):
    session, ids, env = review
    before = nodes_in(env.scene)
    result = anatomy.locate_and_summarise(session)
    by_id = {v: k for k, v in ids.items()}

    # Regions of every shown CMB (also the rejected one), in the tags and the table.
    segmentation = session.segmentation_node.GetSegmentation()
    rows = {row["id"]: row for row in session.table_rows()}
    for cmb_id in session.ids():
        _mni, _p, category, side = POINTS[by_id[cmb_id]]
        tags = segments.read_tags(segmentation.GetSegment(f"CMB_{cmb_id}"))
        assert (tags["category"], tags["side"]) == (category, side), (by_id[cmb_id], tags)
        assert by_id[cmb_id] in tags["region"] or category != "lobar"
        assert rows[cmb_id]["region"] == segments.region_label(tags["region"], tags["side"])
    assert "thalamus" in rows[ids["thalamus"]]["region"] and "cerebell" in rows[ids["cerebellum"]]["region"]

    # The summary counts accepted + added + pending final, never the rejected candidate.
    summary = result.summary
    assert sorted(e.id for e in summary.entries) == sorted(
        ids[n] for n in ("thalamus", "cerebellum", "temporal", "parietal"))
    assert summary.by_category == {"lobar": 2, "deep": 1, "infratentorial": 1}
    assert summary.by_side == {"left": 2, "right": 1, "midline": 1}
    assert result.decisions == {"accepted": 1, "added": 1, "pending": 2}
    assert result.registration.dice > 0.85
    text = result.text()
    assert text.startswith("4 CMBs (1 accepted, 1 added, 2 pending)") and "Not a diagnosis" in text
    assert ("left thalamus", "deep", 1) in result.region_counts()

    # The atlas outline: one new node, hidden by default, on the volume's geometry; can be toggled.
    outline = anatomy.outline_node_of(session)
    assert outline is not None and outline.GetID() in nodes_in(env.scene) - before
    assert not outline.GetDisplayNode().GetVisibility()
    display = outline.GetDisplayNode()
    assert display.GetVisibility2DOutline() and not display.GetVisibility2DFill()
    assert {"brain", "deep", "infratentorial", "frontal"} <= set(outline.GetSegmentation().GetSegmentIDs())
    assert anatomy.set_outline_visible(session, True) and outline.GetDisplayNode().GetVisibility()
    # Locating again (e.g. after more review) replaces the outline instead of piling up nodes.
    count = env.scene.GetNumberOfNodes()
    again = anatomy.locate_and_summarise(session, registration=result.registration)
    assert env.scene.GetNumberOfNodes() == count and anatomy.outline_node_of(session) is not outline
    assert again.summary.to_dict() == summary.to_dict()

    # Report files.
    paths = anatomy.export_report(session, again, tmp_path / "report")
    for key in ("summary_csv", "cmbs_csv", "report", "key_slices", "atlas_overlay", "view_3d"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0, key
    with open(paths["cmbs_csv"], newline="") as stream:
        cmb_rows = list(csv.DictReader(stream))
    assert sorted(int(r["id"]) for r in cmb_rows) == sorted(e.id for e in summary.entries)
    assert "total,final CMBs,4" in paths["summary_csv"].read_text()
    assert "Not a diagnosis" in paths["report"].read_text()

    # Regions survive a threshold change (segments removed and re-created) and save / load.
    session.set_parameters(default_parameters(th_disc=0.99))
    assert ids["parietal"] not in session.ids()
    session.set_parameters(default_parameters())
    tags = segments.read_tags(segmentation.GetSegment(f"CMB_{ids['parietal']}"))
    assert (tags["category"], tags["side"]) == ("lobar", "left")
    state = session.state()
    saved = session.save(tmp_path / "review")
    scene2 = slicer.vtkMRMLScene()
    scan = geometry.volume_from_node(session.volume_node)
    node2 = geometry.volume_to_node(scan, "phantom_t2s", scene=scene2)
    resumed = ReviewSession.load(node2, saved["review"])
    assert resumed.state() == state
    assert resumed.review.extra["anatomy"]["counted"] == [c["id"] for c in again.candidates]
    scene2.Clear(1)


def test_registration_failure_is_a_clear_error_and_leaves_the_scene_unchanged(phantom, slicer_scene):
    scan, spec = phantom
    rng = np.random.default_rng(0)
    # A brain-sized ellipsoid of noise: no anatomy lines up with the atlas.
    k, j, i = np.indices(scan.array.shape, dtype=np.float32)
    centre = (np.array(scan.array.shape) - 1) / 2
    blob = (((k - centre[0]) / 20) ** 2 + ((j - centre[1]) / 65) ** 2 + ((i - centre[2]) / 55) ** 2) <= 1
    image = (blob * 500.0 + rng.normal(0, 30, blob.shape)).astype(np.float32)
    volume = Volume(image, scan.spacing, scan.origin, scan.direction)
    node = geometry.volume_to_node(volume, "not_a_brain", scene=slicer_scene.scene)
    fake = FakeDetectionSession(volume, spec, sigma_mm=2.0)
    session = ReviewSession.create(node, fake.refilter(default_parameters()), "swi", detection_session=fake)
    session.accept(session.ids()[0])
    nodes, state = nodes_in(slicer_scene.scene), session.state()
    with pytest.raises(InputError, match="atlas registration refused|registration"):
        anatomy.locate_and_summarise(session)
    assert nodes_in(slicer_scene.scene) == nodes
    assert session.state() == state
    assert all("region" not in row or row["region"] == "" for row in session.table_rows())
    assert anatomy.outline_node_of(session) is None and session.anatomy is None
    with pytest.raises(InputError, match="th_definite"):
        anatomy.locate_and_summarise(session, th_definite=1.5)
