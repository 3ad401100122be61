"""Render the README screenshot of the review overlay (Resources/Screenshots/overlay.png), headless.

A synthetic SWI-like scan with several microbleeds in one axial slice goes through the real review layer
(``CMBDetectLib.mrml``): one candidate accepted (green), one rejected (red), one pending (yellow), one
missed CMB added by a click (cyan); then Slicer's own slice-view pipeline draws it offscreen (EGL).

    python scripts/render_screenshot.py [--out Resources/Screenshots/overlay.png]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "CMBDetect"), str(ROOT / "Testing")]   # the engine, and the test case generator
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def headless_scene():
    import slicer

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    for name, logic in (("Volumes", slicer.vtkSlicerVolumesLogic()),
                        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic())):
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
    return SimpleNamespace(scene=scene, app=app)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "Resources" / "Screenshots" / "overlay.png"))
    parser.add_argument("--size", type=int, default=600)
    args = parser.parse_args(argv)

    import numpy as np
    from CMBDetectLib.mrml import geometry, rendering
    from CMBDetectLib.mrml.review_session import ReviewSession
    from CMBDetectLib.volume import Volume
    from review_fakes import FakeDetectionSession, add_slice_views, default_parameters

    rng = np.random.default_rng(4)
    shape, spacing = (30, 220, 190), (0.9, 0.9, 2.0)
    k, j, i = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape) - 1) / 2
    brain = (((j - centre[1]) / 95) ** 2 + ((i - centre[2]) / 80) ** 2 + ((k - centre[0]) / 20) ** 2) <= 1
    ventricles = (((j - centre[1] + 8) / 28) ** 2 + ((i - centre[2]) / 10) ** 2) <= 1
    image = np.where(brain, 620.0, 40.0) + rng.normal(0, 18, shape)
    image[ventricles & brain] = 700.0
    centres = [(15, 70, 60), (15, 150, 130), (15, 120, 50), (15, 60, 140), (15, 160, 70)]
    spacing_zyx = np.array(spacing[::-1])
    for c in centres:
        d2 = sum(((g - v) * s) ** 2 for g, v, s in zip((k, j, i), c, spacing_zyx))
        image -= 480.0 * np.exp(-d2 / (2 * 1.5 ** 2))
    volume = Volume(image.astype(np.float32), spacing)
    spec = [{"id": n + 1, "centre": np.array(c), "p_det": p, "p_disc": q}
            for n, (c, p, q) in enumerate(zip(centres[:4], (0.95, 0.9, 0.85, 0.8), (0.93, 0.6, 0.55, 0.2)))]

    env = headless_scene()
    node = geometry.volume_to_node(volume, "SWI", scene=env.scene)
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(700, 380)
    views = add_slice_views(env.scene)
    fake = FakeDetectionSession(volume, spec, sigma_mm=1.5)
    session = ReviewSession.create(node, fake.refilter(default_parameters(th_det=0.35, th_disc=0.5)), "swi",
                                   detection_session=fake)
    session.accept(1)
    session.reject(2)
    session.add_missed(volume.index_to_ras(centres[4])[0])
    session.select(1)
    red = views["Red"]
    rgb = rendering.render_slice_view(env.scene, red, node, size=(args.size, args.size), app_logic=env.app)
    path = rendering.save_png(rgb, args.out)
    print(f"{path}  ({', '.join(f'{k}={v}' for k, v in session.counts().items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
