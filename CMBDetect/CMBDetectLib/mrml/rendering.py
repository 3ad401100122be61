"""Offscreen rendering of a slice view (volume + segmentation overlay) to an RGB array or a PNG.

Uses the same pieces as a Slicer slice view (``vtkMRMLSliceLogic`` for the volume layers and the
``vtkMRMLSegmentationsDisplayableManager2D`` for the overlay) without Qt, so screenshots for the README and
rendering tests run headless. On Linux without a display, VTK renders through EGL (set
``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow``; needs the ``libegl1`` and ``libgl1-mesa-dri`` packages).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def render_slice_view(scene, slice_node, background_volume, size: tuple[int, int] = (512, 512),
                      app_logic=None, field_of_view_mm: float | None = None,
                      centre_ras=None) -> np.ndarray:
    """RGB image (rows top to bottom) of ``slice_node`` showing ``background_volume`` and segmentations.

    By default the whole volume is fitted into the view; ``field_of_view_mm`` (width) zooms in, centred on
    ``centre_ras`` (e.g. a candidate) if given.
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    width, height = int(size[0]), int(size[1])
    slice_node.SetDimensions(width, height, 1)
    # Displayable managers draw only in views that are part of the layout (hidden views are skipped).
    slice_node.SetMappedInLayout(1)

    slice_logic = slicer.vtkMRMLSliceLogic()
    if app_logic is not None:
        slice_logic.SetMRMLApplicationLogic(app_logic)
    slice_logic.SetMRMLScene(scene)
    slice_logic.SetSliceNode(slice_node)
    composite = slice_logic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(background_volume.GetID())
    offset = slice_node.GetSliceOffset()
    slice_logic.FitSliceToBackground()   # "reset field of view", which also re-centres the slice ...
    slice_node.SetSliceOffset(offset)    # ... so go back to the slice the caller chose (e.g. a candidate)
    if field_of_view_mm:
        depth = slice_node.GetFieldOfView()[2]
        slice_node.SetFieldOfView(float(field_of_view_mm), float(field_of_view_mm) * height / width, depth)
    if centre_ras is not None:
        r, a, s = (float(v) for v in centre_ras)
        slice_node.JumpSliceByCentering(r, a, s)
    slice_logic.UpdateSliceNode()

    render_window = vtk.vtkRenderWindow()
    render_window.SetOffScreenRendering(1)
    render_window.SetSize(width, height)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0, 0, 0)
    render_window.AddRenderer(renderer)
    # Displayable managers expect an interactor (as in a real view), even when nobody interacts.
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetRenderWindow(render_window)

    # Volume layers: the slice logic's blended 2D image, shown in the view's XY pixel coordinates.
    slice_logic.UpdatePipeline()
    image_actor = vtk.vtkImageActor()
    image_actor.GetMapper().SetInputConnection(slice_logic.GetImageDataConnection())
    renderer.AddActor(image_actor)

    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    name = "vtkMRMLSegmentationsDisplayableManager2D"
    if not factory.IsDisplayableManagerRegistered(name):
        factory.RegisterDisplayableManager(name)
    if app_logic is not None:
        factory.SetMRMLApplicationLogic(app_logic)
    group = factory.InstantiateDisplayableManagers(renderer)
    group.SetMRMLDisplayableNode(slice_node)
    # Move the slice away and back: the managers recompute which segments cross the plane on a slice change.
    offset = slice_node.GetSliceOffset()
    slice_node.SetSliceOffset(offset + 1.0)
    slice_node.SetSliceOffset(offset)

    camera = renderer.GetActiveCamera()
    camera.ParallelProjectionOn()
    camera.SetFocalPoint(width / 2.0, height / 2.0, 0.0)
    camera.SetPosition(width / 2.0, height / 2.0, 1000.0)
    camera.SetViewUp(0, 1, 0)
    camera.SetParallelScale(height / 2.0)
    renderer.ResetCameraClippingRange(-2000, 2000, -2000, 2000, -2000, 2000)
    render_window.Render()
    render_window.Render()

    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(render_window)
    grabber.SetInputBufferTypeToRGB()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    output = grabber.GetOutput()
    dims = output.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(dims[1], dims[0], -1)
    group.SetMRMLDisplayableNode(None)
    render_window.Finalize()
    return np.ascontiguousarray(pixels[::-1, :, :3])   # VTK rows go bottom-up


def xy_of_ras(slice_node, ras) -> tuple[float, float]:
    """Pixel (x right, y up) of a RAS point in the slice view, as rendered by :func:`render_slice_view`."""
    import vtk

    ras_to_xy = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(slice_node.GetXYToRAS(), ras_to_xy)
    x, y, _z, _w = ras_to_xy.MultiplyPoint((float(ras[0]), float(ras[1]), float(ras[2]), 1.0))
    return x, y


def save_png(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an RGB array as PNG (through VTK, so no imaging library is needed)."""
    import vtk
    from vtk.util import numpy_support

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flipped = np.ascontiguousarray(rgb[::-1])   # VTK images start at the bottom row
    image = vtk.vtkImageData()
    image.SetDimensions(flipped.shape[1], flipped.shape[0], 1)
    scalars = numpy_support.numpy_to_vtk(flipped.reshape(-1, 3), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
    return path
