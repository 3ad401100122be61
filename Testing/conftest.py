"""Shared pytest fixtures: a tiny real model package, a synthetic sample scan, a headless MRML scene."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    """Two cores are shared by everything on CI: one torch thread keeps tests predictable."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def make_tiny_model(out_dir: Path, seed: int = 0, version: str = "0.0.1"):
    """A model package of the real architecture with tiny widths and seeded random weights."""
    import torch

    from CMBDetectLib.model_package import ModelPackage, NetworkSpec
    from CMBDetectLib.networks import build_network

    torch.manual_seed(seed)
    stage1_config = {"in_channels": 2, "width": 4, "n_classes": 2}
    student_config = {"in_channels": 2, "width": 4, "arm_channels": 4, "fc": [16, 8, 4]}
    teacher_config = {"in_channels": 2, "width": 4, "arm_channels": 4, "fc": [16, 8, 4]}
    networks = {
        "stage1": NetworkSpec(build_network("ShallowUNet", stage1_config), "ShallowUNet", stage1_config, 48),
        "teacher": NetworkSpec(build_network("TeacherNet", teacher_config), "TeacherNet", teacher_config, 24),
        "student": NetworkSpec(build_network("StudentNet", student_config), "StudentNet", student_config, 24),
    }
    # Random heads around p = 0.5 (not the CMB prior the real networks start from), with weights scaled up
    # because an untrained network is nearly constant: plumbing tests need a varied probability map (the
    # map is stored as float16, so a near-constant map collapses into a single level) and candidates.
    with torch.no_grad():
        for head in (networks["stage1"].module.head, networks["teacher"].module.unet.head):
            head.bias.zero_()
            head.weight.mul_(50.0)
    return ModelPackage.save(
        out_dir, name="tiny-test", version=version, networks=networks,
        preprocessing={"working_spacing_mm": 0.8, "vessel_suppression": True, "overlap": 0.25,
                       "evidence_threshold": 0.05},
        thresholds={"th_det": 0.5, "th_disc": 0.5},
        postprocessing={"min_volume_mm3": 2.5, "max_ellipticity": 0.2, "min_edge_distance_mm": 4.0},
        training={"note": "random weights for plumbing tests", "seed": seed},
        description="tiny random-weight model for tests")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-test-0.0.1")


def make_phantom(shape=(40, 96, 96), spacing_zyx=(2.0, 0.9, 0.9), cmbs=((20, 40, 40, 2.0), (22, 60, 55, 1.5)),
                 seed: int = 0):
    """A quick SWI-like phantom (bright brain ellipsoid, dark round CMBs) with its instance labels.

    Used where a test needs an image in milliseconds; realistic scans come from ``CMBDetectLib.synth``.
    """
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape) - 1) / 2
    radii = np.array(shape) * np.array([0.45, 0.42, 0.4])
    brain = (((k - centre[0]) / radii[0]) ** 2 + ((j - centre[1]) / radii[1]) ** 2
             + ((i - centre[2]) / radii[2]) ** 2) <= 1
    image = np.where(brain, 600.0, 20.0).astype(np.float32)
    labels = np.zeros(shape, np.uint16)
    for index, (ck, cj, ci, radius_mm) in enumerate(cmbs, start=1):
        distance = np.sqrt(((k - ck) * spacing_zyx[0]) ** 2 + ((j - cj) * spacing_zyx[1]) ** 2
                           + ((i - ci) * spacing_zyx[2]) ** 2)
        inside = distance <= radius_mm
        labels[inside] = index
        image[inside] = 150.0
    image += rng.normal(0, 10, shape).astype(np.float32)
    return image, labels, brain


@pytest.fixture(scope="session")
def phantom_volume():
    from CMBDetectLib.volume import Volume

    image, labels, brain = make_phantom()
    spacing = (0.9, 0.9, 2.0)
    return SimpleNamespace(image=Volume(image, spacing), labels=Volume(labels, spacing),
                           brain=Volume(brain.astype(np.uint8), spacing))


@pytest.fixture
def slicer_scene():
    """A fresh headless MRML scene with the module logics the CMBDetect MRML layer uses."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    app.SetModuleLogic("Colors", app.GetColorLogic())

    def register(logic, name):
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        return logic

    volumes = register(slicer.vtkSlicerVolumesLogic(), "Volumes")
    segmentations = register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
    markups = register(slicer.vtkSlicerMarkupsLogic(), "Markups")
    slicer.modules = SimpleNamespace(volumes=SimpleNamespace(logic=lambda: volumes),
                                     segmentations=SimpleNamespace(logic=lambda: segmentations),
                                     markups=SimpleNamespace(logic=lambda: markups))
    yield SimpleNamespace(scene=scene, app=app, volumes=volumes, segmentations=segmentations, markups=markups)
    scene.Clear(1)
