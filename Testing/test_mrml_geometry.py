"""Volume node <-> engine Volume with exact geometry (RAS vs LPS), and bad-input checks."""

from __future__ import annotations

import numpy as np
import pytest
from review_fakes import OBLIQUE

from CMBDetectLib.errors import InputError
from CMBDetectLib.volume import Volume, read_volume, write_volume_atomic

pytestmark = pytest.mark.slicer
slicer = pytest.importorskip("slicer")

from CMBDetectLib.mrml import geometry  # noqa: E402


def oblique_volume() -> Volume:
    rng = np.random.default_rng(0)
    array = rng.normal(100, 20, (6, 7, 9)).astype(np.float32)
    return Volume(array, (0.8, 0.9, 3.0), (12.5, -30.0, 7.25), OBLIQUE)


def test_volume_round_trip_is_exact(slicer_scene):
    volume = oblique_volume()
    node = geometry.volume_to_node(volume, "swi", scene=slicer_scene.scene)
    back = geometry.volume_from_node(node)
    assert back.same_grid(volume, tolerance=1e-9)
    np.testing.assert_array_equal(back.array, volume.array)


def test_voxel_positions_agree_with_slicer_ras(slicer_scene):
    """Slicer's IJK->RAS and the engine's Volume.index_to_ras (LPS inside) put a voxel at the same point."""
    import vtk

    volume = oblique_volume()
    node = geometry.volume_to_node(volume, "swi", scene=slicer_scene.scene)
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    for kji in ((0, 0, 0), (5, 6, 8), (2, 3, 4)):
        slicer_ras = matrix.MultiplyPoint((kji[2], kji[1], kji[0], 1.0))[:3]
        np.testing.assert_allclose(slicer_ras, volume.index_to_ras(kji)[0], atol=1e-9)
    # RAS is LPS with the first two axes flipped: the origin shows it directly.
    np.testing.assert_allclose(node.GetOrigin(), (-12.5, 30.0, 7.25))


def test_same_geometry_as_a_file_read_by_slicer(slicer_scene, tmp_path):
    """A NIfTI written by the engine and read by Slicer's own storage node lands on our computed matrix."""
    volume = oblique_volume()
    path = write_volume_atomic(volume, tmp_path / "scan.nii.gz")
    node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = slicer_scene.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    np.testing.assert_allclose(geometry.node_ijk_to_ras(node), geometry.ijk_to_ras_from_volume(volume),
                               atol=1e-5)
    from_node = geometry.volume_from_node(node)
    assert from_node.same_grid(read_volume(path))
    np.testing.assert_allclose(from_node.array, volume.array)


def test_bad_inputs_are_clear_messages(slicer_scene):
    scene = slicer_scene.scene
    with pytest.raises(InputError, match="no input volume is selected"):
        geometry.volume_from_node(None)
    labels = geometry.volume_to_node(oblique_volume().with_array(np.ones((6, 7, 9), np.uint8)), "seg",
                                     labelmap=True, scene=scene)
    with pytest.raises(InputError, match="label map"):
        geometry.volume_from_node(labels)
    flat = geometry.volume_to_node(Volume(np.ones((1, 20, 20), np.float32)), "slice", scene=scene)
    with pytest.raises(InputError, match="2D image"):
        geometry.volume_from_node(flat)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(InputError, match="no voxels"):
        geometry.volume_from_node(empty)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(InputError, match="segmentation"):
        geometry.check_scalar_volume_node(segmentation)
