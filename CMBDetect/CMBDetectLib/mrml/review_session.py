"""Review of one case in a Slicer scene: the object the Widget and the Python console drive.

``ReviewSession`` owns one segmentation node (one segment per shown CMB, referencing the input volume) and
one table node, both kept in sync with a :class:`CMBDetectLib.review.CaseReview`. A new
:class:`DetectionResult` (threshold change) is applied *in place*: segments whose candidate is still shown
keep their id, decision and any manual shape edit; only pending, unedited candidates are added, reshaped or
removed. The scene is the user's: nodes are built completely before they are added, and removed again if
anything fails half-way.

Things the user may do behind our back in Slicer are picked up by :meth:`ReviewSession.sync_from_scene`
(called before every change): a segment reshaped in the Segment Editor becomes ``edited`` and is never
overwritten, a status set in the segment list becomes a decision, a deleted detector segment becomes a
rejection, and a segment painted from scratch is adopted as an ``added`` CMB.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from scipy import ndimage

from CMBDetectLib.errors import InputError
from CMBDetectLib.mrml import geometry, navigation, segments, table
from CMBDetectLib.mrml.region_growing import grow_from_seed
from CMBDetectLib.review import CandidateReview, CaseReview, Decision
from CMBDetectLib.volume import atomic_write_text

SEGMENTATION_SUFFIX = ".seg.nrrd"
REVIEW_SUFFIX = ".review.json"
CANDIDATES_SUFFIX = "_candidates.json"


def _modification_stamp(segment) -> int:
    """Changes whenever the segment's voxels may have changed (cheap; confirmed with a fingerprint)."""
    image = segment.GetRepresentation(segments.BINARY_LABELMAP)
    if image is None:
        return -1
    scalars = image.GetPointData().GetScalars() if image.GetPointData() else None
    return max(image.GetMTime(), scalars.GetMTime() if scalars is not None else 0)


class ReviewSession:
    """Segmentation + table + review state of one case (see the module docstring)."""

    def __init__(self, volume_node, segmentation_node, table_node, review: CaseReview,
                 detection_session: Any = None, result: Any = None):
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.table_node = table_node
        self.review = review
        self.detection_session = detection_session
        self.result = result
        self.current_id: int | None = None
        # The detection cache (``<stem>_session.npz``) this review re-thresholds from; copied next to a saved
        # review so that a resumed review can still move thresholds without re-running the networks.
        self.session_file: Path | None = None
        self._ijk_to_ras = geometry.node_ijk_to_ras(volume_node)
        dims = volume_node.GetImageData().GetDimensions()
        self._shape = (int(dims[2]), int(dims[1]), int(dims[0]))
        self._voxel_mm3 = float(abs(np.linalg.det(self._ijk_to_ras[:3, :3])))
        self._written: dict[int, tuple[str, int]] = {}   # id -> (fingerprint we wrote, modification stamp)
        self._boxes_for: tuple[Any, list] | None = None    # (label array, find_objects boxes), cached
        # Anatomical region of each CMB as its segment tags ({"region", "category", "side"}), once located
        # (``mrml.anatomy.locate_and_summarise``); kept across threshold changes, saved in the segment tags.
        self.regions: dict[int, dict[str, str]] = {}
        self.anatomy: Any = None   # the last mrml.anatomy.ReviewSummary

    # ================================================================== creation
    @classmethod
    def create(cls, volume_node, result, modality: str = "swi", case: str | None = None,
               detection_session: Any = None, image_info: dict | None = None,
               reviewer: str | None = None) -> ReviewSession:
        """New segmentation + table for ``result`` on ``volume_node`` (added to the scene once complete)."""
        geometry.check_scalar_volume_node(volume_node)
        scene = volume_node.GetScene()
        if scene is None:
            raise InputError("the input volume is no longer in the scene")
        labels = result.candidate_labels.array
        dims = volume_node.GetImageData().GetDimensions()
        if tuple(labels.shape) != (dims[2], dims[1], dims[0]):
            raise InputError(f"the detection result grid {labels.shape[::-1]} does not match the volume "
                             f"'{volume_node.GetName()}' {tuple(dims)}; did the volume change during "
                             "detection?")
        name = volume_node.GetName()
        review = CaseReview(case=case or name, modality=modality, subject=case or name,
                            image=dict(image_info or {"name": name, "shape": list(dims)}),
                            model=dict(getattr(result, "model_info", {}) or {}),
                            parameters=result.parameters.to_dict())
        if reviewer:
            review.reviewer = reviewer
        segmentation_node = cls._new_segmentation_node(scene, f"{name} CMBs")
        table_node = table.new_table_node(f"{name} CMB candidates")
        session = cls(volume_node, segmentation_node, table_node, review, detection_session, result)
        session._build(lambda: session.apply_result(result, sync=False))
        session.review.log("detect", count=len(session.review.cmbs))
        return session

    @staticmethod
    def _new_segmentation_node(scene, name: str):
        import slicer

        node = slicer.vtkMRMLSegmentationNode()
        node.SetName(scene.GenerateUniqueName(name))
        return node

    def _build(self, fill) -> None:
        """Fill the nodes outside the scene, then add them; on any error the scene is left as it was."""
        scene = self.volume_node.GetScene()
        added = []
        try:
            fill()
            for node in (self.segmentation_node, self.table_node):
                scene.AddNode(node)
                added.append(node)
            self.table_node.SetName(scene.GenerateUniqueName(self.table_node.GetName()))
            self._attach_to_volume()
        except BaseException:
            for node in added:
                display = node.GetDisplayNode() if hasattr(node, "GetDisplayNode") else None
                if display is not None:
                    scene.RemoveNode(display)
                scene.RemoveNode(node)
            raise

    def _attach_to_volume(self) -> None:
        """Reference the input volume, same parent transform and subject-hierarchy folder, display node."""
        node = self.segmentation_node
        node.SetReferenceImageGeometryParameterFromVolumeNode(self.volume_node)
        transform = self.volume_node.GetParentTransformNode()
        node.SetAndObserveTransformNodeID(transform.GetID() if transform else None)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetOpacity2DFill(0.6)
        display.SetOpacity2DOutline(1.0)
        display.SetSliceIntersectionThickness(2)
        node.SetAttribute("CMBDetect.review", "1")
        node.SetNodeReferenceID("CMBDetect.candidateTable", self.table_node.GetID())
        self.table_node.SetNodeReferenceID("CMBDetect.segmentation", node.GetID())
        self._place_in_subject_hierarchy()

    def _place_in_subject_hierarchy(self) -> None:
        import slicer

        scene = self.volume_node.GetScene()
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        if hierarchy is None:
            return
        volume_item = hierarchy.GetItemByDataNode(self.volume_node)
        parent = hierarchy.GetItemParent(volume_item) if volume_item else 0
        for node in (self.segmentation_node, self.table_node):
            item = hierarchy.GetItemByDataNode(node)
            if item and parent:
                hierarchy.SetItemParent(item, parent)

    def remove_nodes(self) -> None:
        """Remove the segmentation, table and atlas outline from the scene (e.g. "discard review")."""
        outline = self.segmentation_node.GetNodeReference("CMBDetect.atlasOutline")
        for node in (outline, self.segmentation_node, self.table_node):
            if node is None:
                continue
            scene = node.GetScene()
            if scene is not None:
                scene.RemoveNode(node)

    # ================================================================== results
    def _boxes(self, labels: np.ndarray) -> list:
        if self._boxes_for is None or self._boxes_for[0] is not labels:
            self._boxes_for = (labels, ndimage.find_objects(labels))
        return self._boxes_for[1]

    def _candidate_mask(self, labels: np.ndarray,
                        cmb_id: int) -> tuple[np.ndarray, tuple[int, int, int]] | None:
        boxes = self._boxes(labels)
        if cmb_id < 1 or cmb_id > len(boxes) or boxes[cmb_id - 1] is None:
            return None
        box = boxes[cmb_id - 1]
        return labels[box] == cmb_id, (box[0].start, box[1].start, box[2].start)

    def apply_result(self, result, sync: bool = True) -> dict[str, int]:
        """Show ``result`` in place, keeping every decision and manual edit. Returns what changed."""
        if sync:
            self.sync_from_scene()
        labels = result.candidate_labels.array
        if tuple(labels.shape) != self._shape:
            raise InputError("the detection result does not lie on the input volume's grid")
        records = {int(c.id): c for c in result.candidates}
        keep = {cmb.id for cmb in self.review.cmbs if cmb.decision is not Decision.PENDING or cmb.edited}
        shown = sorted(keep | {cmb_id for cmb_id, c in records.items() if c.final})
        changes = {"added": 0, "removed": 0, "reshaped": 0}
        segmentation = self.segmentation_node.GetSegmentation()
        was_modifying = self.segmentation_node.StartModify()
        try:
            for entry in list(self.review.cmbs):
                if entry.id not in shown:
                    segmentation.RemoveSegment(entry.segment_id)
                    self.review.remove(entry.id)
                    self._written.pop(entry.id, None)
                    changes["removed"] += 1
            for cmb_id in shown:
                record = records.get(cmb_id)
                entry = self.review.get(cmb_id)
                if entry is None:
                    entry = self.review.upsert(CandidateReview(id=cmb_id))
                    changes["added"] += 1
                self._update_entry(entry, record)
                if self._write_candidate_mask(entry, labels) == "reshaped":
                    changes["reshaped"] += 1
        finally:
            self.segmentation_node.EndModify(was_modifying)
        self.review.cmbs.sort(key=lambda c: c.id)
        self.result = result
        self.review.parameters = result.parameters.to_dict()
        if getattr(result, "model_info", None):
            self.review.model = dict(result.model_info)
        if self.current_id is not None and self.review.get(self.current_id) is None:
            self.current_id = None
        self._update_table()
        return changes

    def _update_entry(self, entry: CandidateReview, record) -> None:
        if record is None:
            # Still shown because of a decision, but no longer a stage-1 candidate at this th_det.
            entry.final, entry.reason = False, entry.reason or "detection"
            return
        entry.p_det, entry.p_disc = float(record.p_det), float(record.p_disc)
        entry.final, entry.reason = bool(record.final), record.reason
        if not entry.edited:
            entry.volume_mm3 = float(record.volume_mm3)
            entry.centroid_ras = tuple(float(v) for v in record.centroid_ras)

    def _write_candidate_mask(self, entry: CandidateReview, labels: np.ndarray) -> str:
        """Create or reshape the segment of a detector candidate unless the user edited its shape."""
        segmentation = self.segmentation_node.GetSegmentation()
        segment = segmentation.GetSegment(entry.segment_id)
        if segment is not None and entry.edited:
            self._write_tags(segment, entry)
            return "kept"
        candidate = self._candidate_mask(labels, entry.id)
        if candidate is None:   # decided candidate that vanished at this th_det: keep its last shape
            if segment is not None:
                self._write_tags(segment, entry)
            return "kept"
        mask, offset = candidate
        wanted = segments.mask_fingerprint(mask, offset, self._shape)
        outcome = "kept"
        if segment is None:
            import slicer

            segment = slicer.vtkSegment()
            segment.SetName(f"CMB {entry.id}")
            segments.set_segment_mask(segment, mask, offset, self._ijk_to_ras)
            segmentation.AddSegment(segment, entry.segment_id)
            outcome = "created"
        elif self._written.get(entry.id, ("",))[0] != wanted:
            segments.set_segment_mask(segment, mask, offset, self._ijk_to_ras)
            outcome = "reshaped"
        if outcome != "kept" or entry.id not in self._written:
            self._written[entry.id] = (wanted, _modification_stamp(segment))
        segments.set_tags(segment, {"fingerprint": self._written[entry.id][0]})
        self._write_tags(segment, entry)
        return outcome

    def _write_tags(self, segment, entry: CandidateReview) -> None:
        segments.set_tags(segment, {"id": entry.id, "p_det": entry.p_det, "p_disc": entry.p_disc,
                                    "volume_mm3": float(entry.volume_mm3), "final": entry.final,
                                    "reason": entry.reason, "edited": entry.edited,
                                    "centroid_ras": entry.centroid_ras})
        if entry.id in self.regions:   # a segment re-created after a threshold change keeps its region
            segments.set_tags(segment, self.regions[entry.id])
        segments.apply_decision(segment, entry.decision)

    def set_parameters(self, parameters, preview: bool = False) -> dict[str, int]:
        """New thresholds / post-processing: re-filter from the cached networks' output and apply in place.

        ``preview`` (while a slider is dragged): new candidates get a quick provisional score; then call
        :meth:`refine_scores` until it returns 0 so that they get the model's real score.
        """
        if self.detection_session is None:
            raise InputError("thresholds cannot change: this review has no cached detection; "
                             "run Detect again")
        return self.apply_result(self.detection_session.refilter(parameters, preview=preview))

    @property
    def provisional(self) -> int:
        """Candidates shown with a provisional score (after ``set_parameters(..., preview=True)``)."""
        if self.result is None or not getattr(self.result, "provisional", 0):
            return 0
        return self.detection_session.provisional_count(self.result.parameters.th_det)

    def refine_scores(self, limit: int = 32) -> int:
        """Score up to ``limit`` provisional candidates for real; when none is left, re-apply the current
        parameters with the real scores. Returns how many are still provisional (0: done)."""
        if self.detection_session is None or not self.provisional:
            return 0
        parameters = self.result.parameters
        remaining = self.detection_session.score_provisional(parameters.th_det, limit)
        if remaining == 0:
            self.set_parameters(parameters)
        return remaining

    # ================================================================== scene -> review
    def sync_from_scene(self) -> None:
        """Pick up edits made in Slicer (Segment Editor shapes, segment status, deleted or new segments)."""
        segmentation = self.segmentation_node.GetSegmentation()
        changed = False
        for entry in list(self.review.cmbs):
            segment = segmentation.GetSegment(entry.segment_id)
            if segment is None:
                changed = True
                self._written.pop(entry.id, None)
                if entry.decision is Decision.ADDED:
                    self.review.remove(entry.id)
                    self.review.log("delete", entry.id)
                else:   # deleting a detector candidate means "not a CMB": keep it as a hard negative
                    entry.decision = Decision.REJECTED
                    self.review.log("delete", entry.id)
                    self._recreate_deleted(entry)
                continue
            import slicer

            status = slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentStatus(segment)
            decision = segments.decision_from_status(status, entry.decision)
            if decision is not entry.decision:
                self.review.set_decision(entry.id, decision, action="status")
                segments.apply_decision(segment, decision)
                changed = True
            if not entry.edited and self._detect_edit(entry, segment):
                changed = True
        changed |= self._adopt_manual_segments()
        if changed:
            self._update_table()

    def _detect_edit(self, entry: CandidateReview, segment) -> bool:
        stamp = _modification_stamp(segment)
        written = self._written.get(entry.id)
        if written is not None and written[1] == stamp:
            return False
        indices = segments.segment_flat_indices(segment, self._ijk_to_ras, self._shape)
        current = segments.fingerprint(indices)
        reference = written[0] if written is not None else segments.get_tag(segment, "fingerprint")
        self._written[entry.id] = (reference or current, stamp)
        if reference is None or current == reference:
            return False
        entry.edited = True
        self._measure(entry, indices)
        self._write_tags(segment, entry)
        self.review.log("edit", entry.id)
        return True

    def _measure(self, entry: CandidateReview, flat_indices: np.ndarray) -> None:
        entry.volume_mm3 = float(flat_indices.size) * self._voxel_mm3
        if flat_indices.size:
            kji = np.array(np.unravel_index(flat_indices, self._shape), dtype=float).mean(axis=1)
            entry.centroid_ras = tuple(float(v) for v in (self._ijk_to_ras @ np.r_[kji[::-1], 1.0])[:3])

    def _recreate_deleted(self, entry: CandidateReview) -> None:
        if self.result is None:
            return
        candidate = self._candidate_mask(self.result.candidate_labels.array, entry.id)
        if candidate is None:
            self.review.remove(entry.id)
            return
        self._write_candidate_mask(entry, self.result.candidate_labels.array)

    def _adopt_manual_segments(self) -> bool:
        segmentation = self.segmentation_node.GetSegmentation()
        known = {cmb.segment_id for cmb in self.review.cmbs}
        adopted = False
        for segment_id in list(segmentation.GetSegmentIDs()):
            if segment_id in known:
                continue
            segment = segmentation.GetSegment(segment_id)
            indices = segments.segment_flat_indices(segment, self._ijk_to_ras, self._shape)
            if indices.size == 0:
                continue   # an empty segment just created in the Segment Editor: wait until it is painted
            entry = CandidateReview(id=self.review.next_added_id(self._stage1_ids()), decision=Decision.ADDED,
                                    segment_id=segment_id, edited=True, final=False, reason="manual")
            self._measure(entry, indices)
            self.review.upsert(entry)
            self._written[entry.id] = (segments.fingerprint(indices), _modification_stamp(segment))
            segments.set_tags(segment, {"fingerprint": self._written[entry.id][0]})
            self._write_tags(segment, entry)
            self.review.log("adopt", entry.id, segment_id=segment_id)
            adopted = True
        if adopted:
            self.review.cmbs.sort(key=lambda c: c.id)
        return adopted

    def _stage1_ids(self) -> Iterable[int]:
        return [int(c.id) for c in self.result.candidates] if self.result is not None else []

    # ================================================================== decisions
    def set_decision(self, cmb_id: int, decision: Decision | str) -> CandidateReview:
        self.sync_from_scene()
        entry = self.review.get(cmb_id)
        if entry is None:
            raise InputError(f"there is no CMB {cmb_id} in this review")
        decision = Decision.parse(decision)
        if entry.decision is Decision.ADDED and decision is Decision.ACCEPTED:
            decision = Decision.ADDED   # accepting an added CMB keeps it "added" (the detector missed it)
        self.review.set_decision(cmb_id, decision)
        segment = self.segmentation_node.GetSegmentation().GetSegment(entry.segment_id)
        if segment is not None:
            segments.apply_decision(segment, decision)
        self.current_id = entry.id
        self._update_table()
        return entry

    def accept(self, cmb_id: int | None = None) -> CandidateReview:
        return self.set_decision(self._id_or_current(cmb_id), Decision.ACCEPTED)

    def reject(self, cmb_id: int | None = None) -> CandidateReview:
        return self.set_decision(self._id_or_current(cmb_id), Decision.REJECTED)

    def reset(self, cmb_id: int | None = None) -> CandidateReview:
        cmb_id = self._id_or_current(cmb_id)
        entry = self.review.get(cmb_id)
        was_added = entry is not None and entry.decision is Decision.ADDED
        decision = Decision.ADDED if was_added else Decision.PENDING
        return self.set_decision(cmb_id, decision)

    def _id_or_current(self, cmb_id: int | None) -> int:
        if cmb_id is None:
            if self.current_id is None:
                raise InputError("no CMB is selected; select a row of the candidate table first")
            return self.current_id
        return int(cmb_id)

    def counts(self) -> dict[str, int]:
        self.sync_from_scene()
        return self.review.counts()

    # ================================================================== navigation
    def ids(self) -> list[int]:
        """Candidate ids in table order."""
        return self.review.ids()

    def select(self, cmb_id: int, jump: bool = True) -> CandidateReview:
        entry = self.review.get(cmb_id)
        if entry is None:
            raise InputError(f"there is no CMB {cmb_id} in this review")
        self.current_id = entry.id
        if jump:
            self.jump_to(entry.id)
        return entry

    def next(self, step: int = 1, pending_only: bool = False, jump: bool = True) -> int | None:
        """Select the next (``step=-1``: previous) CMB in table order, wrapping around; ``None`` if none."""
        ids = [c.id for c in self.review.cmbs if not pending_only or c.decision is Decision.PENDING]
        if not ids:
            return None
        order = self.ids()
        if self.current_id is None or self.current_id not in order:
            target = ids[0] if step > 0 else ids[-1]
        else:
            position = order.index(self.current_id)
            sequence = order[position + 1:] + order[:position + 1] if step > 0 else \
                list(reversed(order[:position])) + list(reversed(order[position:]))
            target = next((cmb_id for cmb_id in sequence if cmb_id in ids), ids[0])
        self.select(target, jump=jump)
        return target

    def previous(self, pending_only: bool = False, jump: bool = True) -> int | None:
        return self.next(step=-1, pending_only=pending_only, jump=jump)

    def candidate_position(self, cmb_id: int) -> np.ndarray:
        """World RAS position of a CMB (its centroid, through the volume's parent transform)."""
        entry = self.review.get(cmb_id)
        if entry is None:
            raise InputError(f"there is no CMB {cmb_id} in this review")
        return navigation.local_to_world(self.volume_node, entry.centroid_ras)

    def jump_to(self, cmb_id: int) -> np.ndarray:
        position = self.candidate_position(cmb_id)
        navigation.jump_slices(self.volume_node.GetScene(), position)
        return position

    # ================================================================== add missed
    def ras_to_kji(self, ras_world) -> np.ndarray:
        ras = np.asarray(ras_world, dtype=float).reshape(3)
        parent = self.volume_node.GetParentTransformNode()
        if parent is not None:
            ras = np.asarray(parent.GetTransformFromWorld().TransformPoint(*ras), dtype=float)
        ijk = np.linalg.solve(self._ijk_to_ras, np.r_[ras, 1.0])[:3]
        return ijk[::-1]

    def add_missed(self, ras_world, modality: str | None = None) -> CandidateReview:
        """A CMB the detector missed, grown from the clicked point; returns its (new) review entry.

        Clicking on a shown CMB just selects it; clicking on a candidate the detector filtered out shows that
        candidate as ``added`` (its probabilities are kept, which is what retraining needs).
        """
        self.sync_from_scene()
        kji = self.ras_to_kji(ras_world)
        voxel = tuple(int(v) for v in np.round(kji))
        if any(v < 0 or v >= s for v, s in zip(voxel, self._shape)):
            raise InputError("the clicked point is outside the input volume")
        for entry in self.review.cmbs:
            segment = self.segmentation_node.GetSegmentation().GetSegment(entry.segment_id)
            flat = np.ravel_multi_index(voxel, self._shape)
            if segment is not None and flat in set(segments.segment_flat_indices(
                    segment, self._ijk_to_ras, self._shape).tolist()):
                return self.select(entry.id, jump=False)
        if self.result is not None:
            label = int(self.result.candidate_labels.array[voxel])
            if label and self.review.get(label) is None:
                entry = self.review.upsert(CandidateReview(id=label, decision=Decision.ADDED))
                record = next((c for c in self.result.candidates if int(c.id) == label), None)
                self._update_entry(entry, record)
                self._write_candidate_mask(entry, self.result.candidate_labels.array)
                return self._finish_add(entry, "add")
        volume = geometry.volume_from_node(self.volume_node, copy=False)
        region = grow_from_seed(volume.array, kji, volume.spacing_zyx, modality or self.review.modality)
        entry = CandidateReview(id=self.review.next_added_id(self._stage1_ids()), decision=Decision.ADDED,
                                final=False, reason="missed")
        self.review.upsert(entry)
        import slicer

        segment = slicer.vtkSegment()
        segment.SetName(f"CMB {entry.id}")
        segments.set_segment_mask(segment, region.mask, region.offset_kji, self._ijk_to_ras)
        self.segmentation_node.GetSegmentation().AddSegment(segment, entry.segment_id)
        k, j, i = np.nonzero(region.mask)
        flat = np.ravel_multi_index((k + region.offset_kji[0], j + region.offset_kji[1],
                                     i + region.offset_kji[2]), self._shape)
        self._measure(entry, np.sort(flat))
        self._written[entry.id] = (segments.fingerprint(flat), _modification_stamp(segment))
        segments.set_tags(segment, {"fingerprint": self._written[entry.id][0]})
        self._write_tags(segment, entry)
        return self._finish_add(entry, "add", method=region.method)

    def _finish_add(self, entry: CandidateReview, action: str, **details: Any) -> CandidateReview:
        self.review.cmbs.sort(key=lambda c: c.id)
        self.review.log(action, entry.id, **details)
        self.current_id = entry.id
        self._update_table()
        return entry

    # ================================================================== table
    def _update_table(self) -> None:
        table.update_table(self.table_node, self.review.cmbs, self.region_labels())

    def region_labels(self) -> dict[int, str]:
        """``{id: "left thalamus"}`` for the CMBs whose region is known."""
        return {cmb_id: segments.region_label(tags.get("region", ""), tags.get("side", ""))
                for cmb_id, tags in self.regions.items() if tags.get("region")}

    def table_rows(self) -> list[dict]:
        return table.table_rows(self.table_node)

    # ================================================================== save / load
    def save(self, directory: str | os.PathLike, case: str | None = None) -> dict[str, Path]:
        """``<case>.seg.nrrd`` + ``<case>_candidates.json`` + ``<case>.review.json`` (written last)."""
        while self.refine_scores(limit=256):     # never save a provisional score
            pass
        self.sync_from_scene()
        case = case or self.review.case
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"segmentation": directory / f"{case}{SEGMENTATION_SUFFIX}",
                 "review": directory / f"{case}{REVIEW_SUFFIX}"}
        _write_segmentation_atomic(self.segmentation_node, paths["segmentation"])
        files = {"segmentation": paths["segmentation"].name}
        if self.result is not None:
            import json

            paths["candidates"] = directory / f"{case}{CANDIDATES_SUFFIX}"
            data = self.result.to_json_dict(self.review.image.get("path"), self.review.modality)
            atomic_write_text(paths["candidates"], json.dumps(data, indent=1) + "\n")
            files["candidates"] = paths["candidates"].name
        if self.session_file is not None and Path(self.session_file).is_file():
            target = directory / f"{case}_session.npz"
            if Path(self.session_file).resolve() != target.resolve():
                _copy_atomic(Path(self.session_file), target)
            files["session"] = target.name
        self.review.case = case
        self.review.extra["files"] = files
        self.review.log("save")
        self.review.save(paths["review"])
        return paths

    @classmethod
    def load(cls, volume_node, review_path: str | os.PathLike,
             detection_session: Any = None) -> ReviewSession:
        """Resume a saved review on ``volume_node`` (nodes added to the scene only once fully read)."""

        geometry.check_scalar_volume_node(volume_node)
        review_path = Path(review_path)
        review = CaseReview.load(review_path)
        files = review.extra.get("files") or {}
        segmentation_path = review_path.parent / files.get("segmentation",
                                                           f"{review.case}{SEGMENTATION_SUFFIX}")
        if not segmentation_path.is_file():
            raise InputError(f"the review's segmentation file is missing: {segmentation_path}")
        dims = volume_node.GetImageData().GetDimensions()
        shape = review.image.get("shape")
        if shape and [int(v) for v in shape] != [int(v) for v in dims]:
            raise InputError(f"this review was made on an image of {tuple(shape)} voxels, but "
                             f"'{volume_node.GetName()}' has {tuple(dims)}; select the reviewed volume")
        segmentation_node = _read_segmentation(segmentation_path)
        segmentation_node.SetName(volume_node.GetScene().GenerateUniqueName(f"{volume_node.GetName()} CMBs"))
        segmentation = segmentation_node.GetSegmentation()
        missing = [c.segment_id for c in review.cmbs if segmentation.GetSegment(c.segment_id) is None]
        if missing:
            raise InputError(f"the review file lists {len(missing)} CMB(s) that the segmentation file "
                             f"does not contain ({', '.join(missing[:5])}); the two files do not belong "
                             "together")
        table_node = table.new_table_node(f"{volume_node.GetName()} CMB candidates")
        result = None
        if detection_session is not None:
            from CMBDetectLib.pipeline import DetectionParameters

            result = detection_session.refilter(DetectionParameters.from_dict(review.parameters))
        session = cls(volume_node, segmentation_node, table_node, review, detection_session, result)
        for entry in review.cmbs:   # the fingerprint tag is what we wrote: later edits stay detectable
            segment = segmentation.GetSegment(entry.segment_id)
            written = segments.get_tag(segment, "fingerprint")
            if written:
                session._written[entry.id] = (written, -1)
            region = {key: value for key in segments.REGION_TAG_KEYS
                      if (value := segments.get_tag(segment, key)) is not None}
            if region.get("region"):
                session.regions[entry.id] = region
        if files.get("session") and (review_path.parent / files["session"]).is_file():
            session.session_file = review_path.parent / files["session"]
        session._build(session._update_table)
        review.log("load")
        return session

    # ================================================================== comparison helpers
    def state(self) -> dict:
        """Everything a reviewer would see, in plain Python (tests compare two sessions with it)."""
        import slicer

        segmentation = self.segmentation_node.GetSegmentation()
        state: dict[str, Any] = {"counts": self.review.counts(), "table": self.table_rows(), "segments": {}}
        for entry in self.review.cmbs:
            segment = segmentation.GetSegment(entry.segment_id)
            state["segments"][entry.segment_id] = {
                "name": segment.GetName(),
                "color": tuple(round(c, 3) for c in segment.GetColor()),
                "status": slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentStatus(segment),
                "tags": segments.read_tags(segment),
                "voxels": segments.fingerprint(segments.segment_flat_indices(segment, self._ijk_to_ras,
                                                                             self._shape)),
                "review": {k: v for k, v in entry.to_dict().items()},
            }
        return state


def _read_segmentation(path: Path):
    """Read ``.seg.nrrd`` into a new node that is not in the user's scene yet.

    The storage node wants its node in a scene (it creates display nodes), so it reads into a scratch scene
    and the segments are copied into a fresh node; the user's scene only ever sees the complete node.
    """
    import slicer

    scratch = slicer.vtkMRMLScene()
    loaded = scratch.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scratch.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(loaded):
        scratch.Clear(1)
        raise InputError(f"cannot read the review segmentation {path.name}")
    node = slicer.vtkMRMLSegmentationNode()
    node.GetSegmentation().DeepCopy(loaded.GetSegmentation())
    scratch.Clear(1)
    return node


def _copy_atomic(source: Path, target: Path) -> None:
    import shutil

    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def session_file_of(review_path: str | os.PathLike) -> Path | None:
    """The detection cache saved with a review (``None`` if the review was saved without one)."""
    review_path = Path(review_path)
    name = (CaseReview.load(review_path).extra.get("files") or {}).get("session")
    path = review_path.parent / name if name else None
    return path if path is not None and path.is_file() else None


def _write_segmentation_atomic(node, path: Path) -> None:
    """Write ``.seg.nrrd`` through a temporary sibling then rename (never a half-written review)."""
    import slicer

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=SEGMENTATION_SUFFIX, dir=path.parent)
    os.close(handle)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    try:
        storage.SetFileName(temporary)
        if not storage.WriteData(node):
            raise OSError(f"cannot write the segmentation {path}")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
