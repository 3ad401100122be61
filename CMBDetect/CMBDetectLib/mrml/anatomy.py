"""Anatomical location of the reviewed CMBs in the scene, the clinical summary and the report.

:func:`locate_and_summarise` registers the MNI atlas to the reviewed volume (``anatomy.registration``, 5-10 s
on a laptop CPU), names the region of every CMB shown in the review (``anatomy.regions``), writes the region
into the segment tags (``CMBDetect.region`` / ``CMBDetect.category`` / ``CMBDetect.side``) and the
candidate table (``region`` column), adds the registered atlas outline as a hidden segmentation overlay
(the visual check of the registration) and returns the :class:`ReviewSummary`. The summary counts the CMBs
of the *review*: accepted + added + pending candidates the detector keeps (final); rejected ones and pending
ones the detector filtered out are not counted.

Nothing in the scene changes until the registration has succeeded: a non-brain image raises ``InputError``
and leaves tags, table and nodes exactly as they were. :func:`export_report` writes the CSV files and the
one-page HTML report (``anatomy.report.write_report``) of a summary into a folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from CMBDetectLib.anatomy.regions import RegionInfo
from CMBDetectLib.anatomy.summary import DEFAULT_TH_DEFINITE, NOT_A_DIAGNOSIS, ClinicalSummary
from CMBDetectLib.errors import InputError
from CMBDetectLib.mrml import geometry, segments
from CMBDetectLib.progress import ProgressCallback, no_progress
from CMBDetectLib.review import Decision

OUTLINE_REFERENCE_ROLE = "CMBDetect.atlasOutline"

# Segments of the atlas outline overlay: (segment id, name, atlas region codes, colour). Lobes, deep and
# infratentorial structures in distinct hues; the template brain outline in yellow as in the HTML report.
OUTLINE_GROUPS: tuple[tuple[str, str, tuple[int, ...], tuple[float, float, float]], ...] = (
    ("brain", "template brain", (), (1.0, 0.9, 0.1)),
    ("frontal", "frontal lobe", (1, 2), (0.35, 0.6, 1.0)),
    ("parietal", "parietal lobe", (3, 4), (0.6, 0.4, 1.0)),
    ("temporal", "temporal lobe", (5, 6), (1.0, 0.45, 0.7)),
    ("occipital", "occipital lobe", (7, 8), (0.2, 0.85, 0.85)),
    ("insula", "insula", (9,), (1.0, 0.6, 0.2)),
    ("deep", "deep grey and white matter", (10, 11, 12, 13, 14, 15), (0.3, 0.5, 0.95)),
    ("infratentorial", "brainstem and cerebellum", (16, 17), (0.3, 0.8, 0.35)),
)

_UNREVIEWED = "automatically detected, unreviewed candidate microbleeds"
REVIEW_NOTE = NOT_A_DIAGNOSIS.replace(
    _UNREVIEWED, "microbleeds confirmed or added by the reviewer (plus detected candidates not yet reviewed, "
                 "if any)") if _UNREVIEWED in NOT_A_DIAGNOSIS else NOT_A_DIAGNOSIS


def region_tags(region: RegionInfo) -> dict[str, str]:
    """Segment tags of a region (``CMBDetect.region`` / ``.category`` / ``.side``)."""
    return {"region": region.name, "category": region.category, "side": region.side}


def counted_in_summary(entry) -> bool:
    """Accepted + added + pending candidates the detector keeps at the current thresholds."""
    return entry.decision.is_cmb or (entry.decision is Decision.PENDING and entry.final)


def summary_candidates(session) -> list[dict]:
    """The review's CMBs as ``cmbdetect.candidates/1``-like dicts for ``anatomy.summary.summarise``.

    CMBs added by the reviewer have no network probability; they are listed without ``p_disc`` and so
    count as *definite* (the reviewer marked them).
    """
    inverse = np.linalg.inv(session._ijk_to_ras)
    candidates = []
    for entry in session.review.cmbs:
        if not counted_in_summary(entry):
            continue
        ras = [float(v) for v in entry.centroid_ras]
        ijk = (inverse @ np.r_[ras, 1.0])[:3]
        candidate = {"id": entry.id, "centroid_ras": ras, "centroid_ijk": [float(v) for v in ijk],
                     "volume_mm3": float(entry.volume_mm3), "final": True, "decision": entry.decision.value}
        if entry.p_disc is not None:
            candidate["p_disc"] = float(entry.p_disc)
        candidates.append(candidate)
    return candidates


@dataclass
class ReviewSummary:
    """Where the reviewed CMBs are, their clinical summary, and the registration it rests on."""

    summary: ClinicalSummary
    regions: dict[int, RegionInfo]           # every CMB shown in the review (also rejected ones)
    candidates: list[dict]                   # the CMBs counted in the summary
    decisions: dict[str, int]                # counted CMBs by decision (accepted / added / pending)
    registration: Any = None                 # anatomy.registration.RegistrationResult
    outline_node: Any = None                 # vtkMRMLSegmentationNode (hidden by default)
    location_info: str = ""
    files: dict[str, Path] = field(default_factory=dict)

    def region_counts(self) -> list[tuple[str, str, int]]:
        """(region label, category, count) rows for the panel's table, most CMBs first."""
        categories = {e.region.label: e.region.category for e in self.summary.entries}
        rows = [(label, categories.get(label, ""), count) for label, count in self.summary.by_region.items()]
        return sorted(rows, key=lambda row: (-row[2], row[0]))

    def text(self) -> str:
        """The summary as plain text for the panel (facts, counts, registration quality, the note)."""
        s = self.summary
        decided = ", ".join(f"{count} {name}" for name, count in self.decisions.items() if count) or "none"
        lines = [f"{s.total} CMB{'s' if s.total != 1 else ''} ({decided}).",
                 "By category: " + ", ".join(f"{k} {v}" for k, v in s.by_category.items()) + "."]
        if s.by_lobe:
            lines.append("Lobar, by lobe: " + ", ".join(f"{k} {v}" for k, v in s.by_lobe.items()) + ".")
        lines.append("Side: " + ", ".join(f"{k} {v}" for k, v in s.by_side.items()) + ".")
        sizes = ", ".join(f"{k} {v}" for k, v in s.by_size.items())
        lines.append(f"Size (equivalent diameter): {sizes}.")
        lines.append(f"Certainty: definite {s.by_certainty.get('definite', 0)}, possible "
                     f"{s.by_certainty.get('possible', 0)} (p_disc >= {s.th_definite:g} is definite; CMBs "
                     "added by the reviewer count as definite).")
        lines += [f"- {fact}" for fact in s.facts]
        if self.location_info:
            lines.append(f"Location: {self.location_info}")
        lines.append(s.note)
        return "\n".join(lines)


def locate_and_summarise(session, *, mask=None, registration=None, th_definite: float = DEFAULT_TH_DEFINITE,
                         show_outline: bool = False,
                         progress: ProgressCallback | None = None) -> ReviewSummary:
    """Register the atlas to the reviewed volume (on this thread), name every CMB's region, summarise.

    ``mask``: optional brain mask (engine ``Volume`` on the scan) to help the registration;
    ``registration``: a ``RegistrationResult`` of this volume from an earlier call (skips the 5-10 s
    registration, e.g. after a threshold change). Raises ``InputError`` (scene unchanged) when the image is
    not a credible head scan for the atlas.
    """
    from CMBDetectLib.anatomy.regions import assign_regions
    from CMBDetectLib.anatomy.registration import register_to_atlas
    from CMBDetectLib.anatomy.summary import summarise

    progress = progress or no_progress
    if not 0.0 <= float(th_definite) <= 1.0:
        raise InputError(f"th_definite must be between 0 and 1, got {th_definite}")
    session.sync_from_scene()
    volume = geometry.volume_from_node(session.volume_node)
    if registration is None:
        registration = register_to_atlas(volume, mask, progress=lambda f, m: progress(0.8 * f, m))
    progress(0.8, "naming the region of each CMB")
    entries = list(session.review.cmbs)
    points = np.array([entry.centroid_ras for entry in entries], dtype=float).reshape(-1, 3)
    regions = dict(zip((entry.id for entry in entries), assign_regions(points, registration)))
    candidates = summary_candidates(session)
    th_disc = (session.review.parameters or {}).get("th_disc")
    summary = summarise(candidates, [regions[c["id"]] for c in candidates], th_definite=th_definite,
                        th_disc=th_disc)
    summary.note = REVIEW_NOTE
    decisions = {"accepted": 0, "added": 0, "pending": 0}
    for candidate in candidates:
        decisions[candidate["decision"]] += 1
    atlas = registration.atlas
    location = (f"{atlas.name}, affine registration: brain-mask Dice {registration.dice:.2f}, structure "
                f"{registration.structure:.2f} (refused below {registration.quality['min_dice']} / "
                f"{registration.quality['min_structure']}); lobe borders are approximate (~1 gyrus).")
    progress(0.85, "drawing the atlas outline")
    outline = build_outline_node(session, registration, volume)   # not in the scene yet
    result = ReviewSummary(summary, regions, candidates, decisions, registration, outline, location)

    # Everything is computed: now change the scene, in one go (and undo the outline if that fails).
    scene = session.volume_node.GetScene()
    old_outline = outline_node_of(session)
    scene.AddNode(outline)
    try:
        _finish_outline_node(session, outline, visible=show_outline)
        apply_regions(session, regions)
    except BaseException:
        _remove_node(outline)
        raise
    if old_outline is not None:
        _remove_node(old_outline)
    session.review.extra["anatomy"] = {
        "source": "atlas", "atlas": atlas.name, "registration": registration.quality,
        "th_definite": float(th_definite), "counted": [c["id"] for c in candidates],
        "summary": summary.to_dict()}
    session.review.log("locate", count=len(candidates))
    session.anatomy = result
    progress(1.0, f"{summary.total} CMBs located")
    return result


def apply_regions(session, regions: dict[int, RegionInfo]) -> None:
    """Region tags on each CMB's segment and the table's region column (CMBs not listed keep theirs)."""
    segmentation = session.segmentation_node.GetSegmentation()
    for cmb_id, region in regions.items():
        entry = session.review.get(cmb_id)
        if entry is None:
            continue
        session.regions[cmb_id] = region_tags(region)
        segment = segmentation.GetSegment(entry.segment_id)
        if segment is not None:
            segments.set_tags(segment, session.regions[cmb_id])
    session._update_table()


def outline_node_of(session):
    node = session.segmentation_node.GetNodeReference(OUTLINE_REFERENCE_ROLE)
    return node if node is not None and node.GetScene() is not None else None


def build_outline_node(session, registration, volume=None):
    """The registered atlas as a segmentation (template brain + lobes / deep / infratentorial), outlines only.

    Built outside the scene; each segment is a cropped labelmap on the reviewed volume's grid.
    """
    import slicer
    from scipy import ndimage

    volume = volume if volume is not None else geometry.volume_from_node(session.volume_node, copy=False)
    labels = np.asarray(registration.warp_to_scan(volume, "labels").array)
    brain = np.asarray(registration.warp_to_scan(volume, "brain_mask").array) > 0
    node = slicer.vtkMRMLSegmentationNode()
    scene = session.volume_node.GetScene()
    node.SetName(scene.GenerateUniqueName(f"{session.volume_node.GetName()} atlas outline"))
    segmentation = node.GetSegmentation()
    for segment_id, name, codes, colour in OUTLINE_GROUPS:
        mask = brain if not codes else np.isin(labels, codes)
        boxes = ndimage.find_objects(mask.astype(np.uint8))
        if not boxes or boxes[0] is None:
            continue
        box = boxes[0]
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.SetColor(*colour)
        segments.set_segment_mask(segment, mask[box], tuple(s.start for s in box), session._ijk_to_ras)
        segmentation.AddSegment(segment, segment_id)
    if segmentation.GetNumberOfSegments() == 0:
        raise InputError("the registered atlas does not overlap the volume")
    return node


def _finish_outline_node(session, node, visible: bool) -> None:
    node.SetReferenceImageGeometryParameterFromVolumeNode(session.volume_node)
    transform = session.volume_node.GetParentTransformNode()
    node.SetAndObserveTransformNodeID(transform.GetID() if transform else None)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetVisibility2DFill(False)      # outlines only: the scan stays readable underneath
    display.SetVisibility2DOutline(True)
    display.SetSliceIntersectionThickness(1)
    display.SetOpacity3D(0.15)
    display.SetVisibility(bool(visible))
    node.SetAttribute("CMBDetect.atlasOutline", "1")
    session.segmentation_node.SetNodeReferenceID(OUTLINE_REFERENCE_ROLE, node.GetID())


def set_outline_visible(session, visible: bool) -> bool:
    """Show / hide the atlas outline in the slice views; ``False`` if there is none (run locate first)."""
    node = outline_node_of(session)
    if node is None or node.GetDisplayNode() is None:
        return False
    node.GetDisplayNode().SetVisibility(bool(visible))
    return True


def _remove_node(node) -> None:
    scene = node.GetScene()
    if scene is None:
        return
    display = node.GetDisplayNode()
    if display is not None:
        scene.RemoveNode(display)
    scene.RemoveNode(node)


def export_report(session, result: ReviewSummary, out_dir: str | os.PathLike,
                  stem: str | None = None) -> dict[str, Path]:
    """``<stem>_summary.csv``, ``<stem>_cmbs.csv``, ``<stem>_report.html`` (+ its PNGs) into ``out_dir``."""
    from CMBDetectLib.anatomy.report import write_report
    from CMBDetectLib.anatomy.summary import write_cmb_table_csv, write_summary_csv

    if result.registration is None:
        raise InputError("the summary has no atlas registration; run locate_and_summarise first")
    stem = stem or session.review.case
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    volume = geometry.volume_from_node(session.volume_node)
    registration = result.registration
    paths = {"summary_csv": out_dir / f"{stem}_summary.csv", "cmbs_csv": out_dir / f"{stem}_cmbs.csv"}
    write_summary_csv(result.summary, paths["summary_csv"])
    write_cmb_table_csv(result.summary, paths["cmbs_csv"])
    counted = ", ".join(f"{v} {k}" for k, v in result.decisions.items() if v) or "none"
    model = session.review.model or {}
    paths.update(write_report(
        out_dir, stem, volume, result.summary, region_labels=registration.warp_to_scan(volume, "labels"),
        brain_mask=registration.warp_to_scan(volume, "brain_mask"), registration=registration,
        location_info=result.location_info,
        scan_info={"volume": session.volume_node.GetName(), "modality": session.review.modality,
                   "grid": "x".join(str(v) for v in volume.shape_ijk),
                   "spacing (mm)": "x".join(f"{s:.2f}" for s in volume.spacing),
                   "model": model.get("name", "?"), "reviewer": session.review.reviewer,
                   "counted CMBs": counted}))
    result.files = paths
    return paths
