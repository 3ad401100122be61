"""Offscreen rendering of a slice view with the review overlay (Slicer's own segmentation displayable
manager): each candidate's decision colour is drawn at the candidate's position, and nowhere without it."""

from __future__ import annotations

import os

import numpy as np
import pytest
from review_fakes import FakeDetectionSession, add_slice_views, default_parameters, make_case

pytestmark = pytest.mark.slicer
slicer = pytest.importorskip("slicer")
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

from CMBDetectLib.mrml import geometry, rendering  # noqa: E402
from CMBDetectLib.mrml.review_session import ReviewSession  # noqa: E402


def pixel_at(rgb, slice_node, ras):
    x, y = rendering.xy_of_ras(slice_node, ras)
    row, column = int(round(rgb.shape[0] - 1 - y)), int(round(x))
    return rgb[row - 1:row + 2, column - 1:column + 2].reshape(-1, 3).astype(int).mean(axis=0)


def test_candidate_colour_is_drawn_at_the_candidate(slicer_scene, tmp_path):
    volume, spec, _missed = make_case()
    scene = slicer_scene.scene
    node = geometry.volume_to_node(volume, "swi", scene=scene)
    views = add_slice_views(scene)
    fake = FakeDetectionSession(volume, spec)
    session = ReviewSession.create(node, fake.refilter(default_parameters(th_det=0.3)), "swi",
                                   detection_session=fake)
    accepted, rejected = session.ids()[:2]
    session.accept(accepted)
    session.reject(rejected)
    red = views["Red"]
    display = session.segmentation_node.GetDisplayNode()

    for cmb_id, channel in ((accepted, 1), (rejected, 0)):   # green for accepted, red for rejected
        position = session.select(cmb_id).centroid_ras
        with_overlay = rendering.render_slice_view(scene, red, node, size=(256, 256),
                                                   app_logic=slicer_scene.app)
        display.SetVisibility(False)
        without = rendering.render_slice_view(scene, red, node, size=(256, 256), app_logic=slicer_scene.app)
        display.SetVisibility(True)
        drawn, plain = pixel_at(with_overlay, red, position), pixel_at(without, red, position)
        others = [c for c in range(3) if c != channel]
        assert drawn[channel] > drawn[others].max() + 40, f"CMB {cmb_id}: wrong colour {drawn}"
        assert abs(plain[0] - plain[1]) < 10 and abs(plain[1] - plain[2]) < 10   # grey without the overlay
        assert plain.mean() < 150     # the volume layer shows the dark microbleed under the overlay
        # Far from any candidate, the overlay changes nothing.
        corner = np.array(position) + np.array([12.0, 12.0, 0.0])
        np.testing.assert_allclose(pixel_at(with_overlay, red, corner), pixel_at(without, red, corner),
                                   atol=1)
    path = rendering.save_png(with_overlay, tmp_path / "overlay.png")
    assert path.stat().st_size > 1000
