"""Where a candidate is, and moving the slice views there."""

from __future__ import annotations

import numpy as np


def local_to_world(node, ras_local) -> np.ndarray:
    """Apply the node's parent transform(s) (a volume may sit under a registration transform)."""
    ras_local = np.asarray(ras_local, dtype=float).reshape(3)
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return ras_local
    transform = parent.GetTransformToWorld()
    return np.asarray(transform.TransformPoint(*ras_local), dtype=float)


def slice_offset_for(slice_node, ras_world) -> float:
    """Slice offset that puts ``ras_world`` in the plane of ``slice_node`` (any orientation, also oblique)."""
    matrix = slice_node.GetSliceToRAS()
    normal = np.array([matrix.GetElement(row, 2) for row in range(3)])
    return float(normal @ np.asarray(ras_world, dtype=float) / np.linalg.norm(normal))


def distance_to_plane(slice_node, ras_world) -> float:
    """Distance (mm) from ``ras_world`` to the plane currently shown by ``slice_node``."""
    matrix = slice_node.GetSliceToRAS()
    normal = np.array([matrix.GetElement(row, 2) for row in range(3)])
    origin = np.array([matrix.GetElement(row, 3) for row in range(3)])
    return float(abs(normal @ (np.asarray(ras_world, dtype=float) - origin)) / np.linalg.norm(normal))


def jump_slices(scene, ras_world, centered: bool = True) -> None:
    """Move every slice view so that it shows ``ras_world`` (centred in the view if ``centered``)."""
    import slicer

    mode = slicer.vtkMRMLSliceNode.CenteredJumpSlice if centered else slicer.vtkMRMLSliceNode.OffsetJumpSlice
    r, a, s = (float(v) for v in ras_world)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, mode)
