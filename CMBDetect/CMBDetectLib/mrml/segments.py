"""One segment per CMB: masks, tags, colours and Slicer segment status.

Segments are written directly as small cropped ``vtkOrientedImageData`` labelmaps on the input volume's
grid (extent = the candidate's bounding box), which is what keeps a threshold change well under 100 ms:
no full-size labelmap import, no resampling. Segment ids are stable (``CMB_<id>``), so decisions and manual
edits survive re-thresholding, saving and loading.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from CMBDetectLib.review import Decision

BINARY_LABELMAP = "Binary labelmap"
TAG_PREFIX = "CMBDetect."
REGION_TAG_KEYS = ("region", "category", "side")   # written once the CMBs are located (mrml.anatomy)
TAG_KEYS = ("id", "decision", "p_det", "p_disc", "volume_mm3", "final", "reason", "edited", "fingerprint",
            "centroid_ras") + REGION_TAG_KEYS

# Colours by decision (RGB 0..1): chosen to stay distinguishable for red-green colour-blind readers by
# differing in brightness too (pending bright yellow, accepted mid green, rejected dark red, added cyan).
DECISION_COLOURS: dict[Decision, tuple[float, float, float]] = {
    Decision.PENDING: (1.0, 0.85, 0.0),
    Decision.ACCEPTED: (0.1, 0.8, 0.2),
    Decision.REJECTED: (0.75, 0.05, 0.05),
    Decision.ADDED: (0.0, 0.75, 1.0),
}


def segment_status_for(decision: Decision) -> int:
    """Slicer's own review status (shown in the Segment Editor list) for a decision."""
    import slicer

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    return {Decision.PENDING: logic.NotStarted, Decision.ACCEPTED: logic.Completed,
            Decision.REJECTED: logic.Flagged, Decision.ADDED: logic.Completed}[decision]


def decision_from_status(status: int, current: Decision) -> Decision:
    """Map a status the user set in Slicer's segment list back to a decision (``added`` stays ``added``)."""
    import slicer

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if status == logic.Completed:
        return Decision.ADDED if current is Decision.ADDED else Decision.ACCEPTED
    if status == logic.Flagged:
        return Decision.REJECTED
    if status == logic.NotStarted:
        return Decision.ADDED if current is Decision.ADDED else Decision.PENDING
    return current  # "in progress" says nothing about the decision


def get_tag(segment, key: str) -> str | None:
    import vtk

    value = vtk.reference("")
    return str(value) if segment.GetTag(TAG_PREFIX + key, value) else None


def set_tags(segment, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if value is None:
            segment.RemoveTag(TAG_PREFIX + key)
        elif isinstance(value, bool):
            segment.SetTag(TAG_PREFIX + key, "1" if value else "0")
        elif isinstance(value, float):
            segment.SetTag(TAG_PREFIX + key, f"{value:.6g}")
        elif isinstance(value, (tuple, list)):
            segment.SetTag(TAG_PREFIX + key, " ".join(f"{float(v):.4f}" for v in value))
        else:
            segment.SetTag(TAG_PREFIX + key, str(value))


def region_label(name: str, side: str) -> str:
    """What the table shows for a region (``left thalamus``; the same rule as ``RegionInfo.label``)."""
    return name if side in ("midline", "unknown", "") else f"{side} {name}"


def read_tags(segment) -> dict[str, str]:
    return {key: value for key in TAG_KEYS if (value := get_tag(segment, key)) is not None}


def apply_decision(segment, decision: Decision) -> None:
    """Colour, status and decision tag of a segment (one place, so they can never disagree)."""
    import slicer

    segment.SetColor(*DECISION_COLOURS[decision])
    slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(segment, segment_status_for(decision))
    set_tags(segment, {"decision": decision.value})


def oriented_image_from_mask(mask: np.ndarray, offset_kji: tuple[int, int, int], ijk_to_ras: np.ndarray):
    """Cropped binary labelmap: ``mask`` (``[k, j, i]``) placed at ``offset_kji`` of the reference grid."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    from CMBDetectLib.mrml.geometry import vtk_matrix_from_array

    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    k0, j0, i0 = (int(v) for v in offset_kji)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i0 + mask.shape[2] - 1, j0, j0 + mask.shape[1] - 1, k0, k0 + mask.shape[0] - 1)
    scalars = numpy_support.numpy_to_vtk(mask.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(vtk_matrix_from_array(ijk_to_ras))
    return image


def set_segment_mask(segment, mask: np.ndarray, offset_kji: tuple[int, int, int],
                     ijk_to_ras: np.ndarray) -> None:
    """Replace a segment's voxels (its own layer: we never rewrite other segments' shared labelmaps)."""
    image = oriented_image_from_mask(mask, offset_kji, ijk_to_ras)
    segment.RemoveAllRepresentations()
    segment.AddRepresentation(BINARY_LABELMAP, image)
    segment.SetLabelValue(1)


def segment_flat_indices(segment, ijk_to_ras: np.ndarray, shape_kji: tuple[int, int, int]) -> np.ndarray:
    """Sorted flat indices (on the reference grid) of a segment's voxels, whatever layer it lives in."""
    import slicer
    from vtk.util import numpy_support

    from CMBDetectLib.mrml.geometry import array_from_vtk_matrix, vtk_matrix_from_array

    image = segment.GetRepresentation(BINARY_LABELMAP)
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return np.zeros(0, dtype=np.int64)
    import vtk

    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    if not np.allclose(array_from_vtk_matrix(matrix), ijk_to_ras, atol=1e-4):
        # Edited on another grid (e.g. the Segment Editor with a different source volume): resample onto ours.
        reference = slicer.vtkOrientedImageData()
        reference.SetExtent(0, shape_kji[2] - 1, 0, shape_kji[1] - 1, 0, shape_kji[0] - 1)
        reference.SetImageToWorldMatrix(vtk_matrix_from_array(ijk_to_ras))
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, reference, resampled, False)
        image = resampled
    extent = image.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return np.zeros(0, dtype=np.int64)
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    values = values.reshape(extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    k, j, i = np.nonzero(values == segment.GetLabelValue())
    k, j, i = k + extent[4], j + extent[2], i + extent[0]
    inside = ((k >= 0) & (k < shape_kji[0]) & (j >= 0) & (j < shape_kji[1]) & (i >= 0) & (i < shape_kji[2]))
    return np.sort(np.ravel_multi_index((k[inside], j[inside], i[inside]), shape_kji).astype(np.int64))


def fingerprint(flat_indices: np.ndarray) -> str:
    """Short content hash of a voxel set: tells a manual edit from our own writes, also after save/load."""
    data = np.ascontiguousarray(np.sort(np.asarray(flat_indices, dtype=np.int64)))
    return f"{data.size}:{hashlib.sha1(data.tobytes()).hexdigest()[:16]}"


def mask_fingerprint(mask: np.ndarray, offset_kji: tuple[int, int, int],
                     shape_kji: tuple[int, int, int]) -> str:
    k, j, i = np.nonzero(mask)
    flat = np.ravel_multi_index((k + offset_kji[0], j + offset_kji[1], i + offset_kji[2]), shape_kji)
    return fingerprint(flat)
