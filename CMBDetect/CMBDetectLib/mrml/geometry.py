"""Volume nodes <-> :class:`CMBDetectLib.volume.Volume` with exact geometry.

Slicer stores geometry as an IJK-to-RAS matrix; the engine (like SimpleITK / ITK / NIfTI readers in LPS)
keeps spacing, origin and direction in LPS. The two differ by a flip of the first two world axes, which is
the classic source of left-right mirrored results, so every conversion goes through the two functions
below and is tested with oblique, anisotropic grids.
"""

from __future__ import annotations

import numpy as np

from CMBDetectLib.errors import InputError
from CMBDetectLib.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def ijk_to_ras_from_volume(volume: Volume) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of an engine volume (index order i, j, k = columns of the matrix)."""
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(np.asarray(volume.spacing, dtype=float))
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(volume.origin, dtype=float)
    return matrix


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in SimpleITK's LPS convention from an IJK-to-RAS matrix."""
    matrix = np.asarray(matrix, dtype=float)
    lps = LPS_TO_RAS @ matrix[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing <= 0):
        raise InputError("the volume's IJK-to-RAS matrix is singular; its geometry is broken")
    direction = lps / spacing
    origin = LPS_TO_RAS @ matrix[:3, 3]
    return (tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
            tuple(float(d) for d in direction.ravel()))


def vtk_matrix_from_array(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def array_from_vtk_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def node_ijk_to_ras(node) -> np.ndarray:
    """IJK-to-RAS matrix of a volume node as a numpy array (local coordinates, no parent transform)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return array_from_vtk_matrix(matrix)


def check_scalar_volume_node(node) -> None:
    """Raise ``InputError`` with a clear sentence for anything that is not a single 3D grey-level volume."""
    if node is None:
        raise InputError("no input volume is selected; select the SWI / T2*-GRE / QSM volume")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{node.GetName()}' is a label map; select the MRI volume, not a segmentation")
    if node.IsA("vtkMRMLSegmentationNode"):
        raise InputError(f"'{node.GetName()}' is a segmentation; select the MRI volume")
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLDiffusionWeightedVolumeNode"):
        raise InputError(f"'{node.GetName()}' is a {node.GetClassName()}; select a scalar (grey-level) "
                         "3D MRI volume")
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"'{node.GetName()}' has no voxels loaded")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"'{node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel "
                         "(colour or vector image); select a single-channel MRI volume")
    dims = image.GetDimensions()
    if min(dims) <= 1:
        raise InputError(f"'{node.GetName()}' is a 2D image ({dims[0]} x {dims[1]} x {dims[2]} voxels); "
                         "CMB detection needs a 3D volume")


def array_from_node(node) -> np.ndarray:
    """A view of the node's voxels, indexed ``[k, j, i]`` (no copy)."""
    from vtk.util import numpy_support

    image = node.GetImageData()
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return scalars.reshape(dims[2], dims[1], dims[0])


def volume_from_node(node, copy: bool = True) -> Volume:
    """Engine volume (array ``[k, j, i]`` + LPS geometry) of a scalar volume node, checked first."""
    check_scalar_volume_node(node)
    array = array_from_node(node)
    spacing, origin, direction = geometry_from_ijk_to_ras(node_ijk_to_ras(node))
    return Volume(np.array(array, copy=True) if copy else array, spacing, origin, direction)


def image_data_from_array(array: np.ndarray):
    """vtkImageData (origin 0, spacing 1: geometry lives in the node's matrix) holding a copy of ``array``."""
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def volume_to_node(volume: Volume, name: str, labelmap: bool = False, scene=None):
    """A new volume node with the volume's voxels and geometry; added to ``scene`` only if given."""
    import slicer

    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    update_node_from_volume(node, volume)
    if scene is not None:
        scene.AddNode(node)
        node.CreateDefaultDisplayNodes()
    return node


def update_node_from_volume(node, volume: Volume) -> None:
    node.SetIJKToRASMatrix(vtk_matrix_from_array(ijk_to_ras_from_volume(volume)))
    node.SetAndObserveImageData(image_data_from_array(volume.array))
