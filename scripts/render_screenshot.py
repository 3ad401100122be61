"""Render the README screenshot of the review overlay (Resources/Screenshots/overlay.png), headless.

A realistic synthetic SWI brain (``CMBDetectLib.synth``, the same generator as the one-click sample) goes
through the real engine (``DetectionSession``) and the real review layer (``CMBDetectLib.mrml``): candidates
accepted (green), one rejected (red), one left pending (yellow), and a missed microbleed added by a click
(cyan). Slicer's own slice-view pipeline (``mrml.rendering``) draws zoomed axial views around four CMBs
offscreen (EGL), composed into one figure with an overview.

The bundled model is used when ``ModelPackage.load("default")`` works; otherwise a tiny random-weight model
with thresholds picked from its output is used and the figure title says so (its candidates are then
plumbing, not findings).

    python scripts/render_screenshot.py [--out Resources/Screenshots/overlay.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "CMBDetect"), str(ROOT / "Testing")]   # the engine, and the test model factory
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def headless_scene():
    import slicer

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    app.SetModuleLogic("Colors", app.GetColorLogic())
    for name, logic in (("Volumes", slicer.vtkSlicerVolumesLogic()),
                        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic())):
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
    return SimpleNamespace(scene=scene, app=app)


def load_model():
    """(model, note): the bundled model, else the tiny random-weight test model."""
    from CMBDetectLib.model_package import ModelPackage

    try:
        model = ModelPackage.load("default")
        return model, f"model {model.info().get('name', 'default')} {model.info().get('version', '')}"
    except Exception as error:   # no bundled model yet: say so in the figure
        from conftest import make_tiny_model

        print(f"no bundled model ({error}); using the tiny random-weight test model")
        model = make_tiny_model(Path(tempfile.mkdtemp(prefix="cmbdetect-shot-")) / "tiny-test-0.0.1")
        return model, "tiny RANDOM-WEIGHT test model, thresholds from its output: not findings"


def threshold_keeping(probability, n_voxels: int) -> float:
    import numpy as np

    levels = np.unique(probability[probability > 0])[::-1]
    counts = np.cumsum([(probability == level).sum() for level in levels])
    return float(levels[min(int(np.searchsorted(counts, n_voxels)), len(levels) - 1)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "Resources" / "Screenshots" / "overlay.png"))
    parser.add_argument("--seed", type=int, default=None, help="synthetic case seed (default: the sample's)")
    parser.add_argument("--panel", type=int, default=360, help="pixels per zoomed view")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from review_fakes import add_slice_views

    from CMBDetectLib.mrml import geometry, rendering
    from CMBDetectLib.mrml.review_session import ReviewSession
    from CMBDetectLib.pipeline import DetectionParameters, DetectionSession
    from CMBDetectLib.sample_data import SAMPLE_SEED, sample_config
    from CMBDetectLib.synth.generator import generate_case

    seed = SAMPLE_SEED if args.seed is None else args.seed
    case = generate_case(seed, "swi", n_cmbs=10, config=sample_config())
    model, model_note = load_model()
    detection = DetectionSession(model, device="cpu")
    if model.name.startswith("tiny"):
        relaxed = DetectionParameters(th_det=0.99, th_disc=0.0, min_volume_mm3=0.0, max_ellipticity=1.0,
                                      min_edge_distance_mm=0.0)
        detection.run(case.image, "swi", params=relaxed)
        params = DetectionParameters(th_det=threshold_keeping(detection.probability, 12), th_disc=0.0,
                                     min_volume_mm3=0.0, max_ellipticity=1.0, min_edge_distance_mm=0.0)
    else:
        params = DetectionParameters.for_model(model, "swi")
        detection.run(case.image, "swi", params=params)
    result = detection.refilter(params)

    env = headless_scene()
    node = geometry.volume_to_node(case.image, "SWI", scene=env.scene)
    brain = case.image.array[case.brain_mask.array > 0]
    low, high = np.percentile(brain, [1, 99.5])
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(float(high - low), float((high + low) / 2))
    views = add_slice_views(env.scene)
    session = ReviewSession.create(node, result, "swi", case="synthetic", detection_session=detection)

    # The review: a radiologist's decisions, and the CMBs the detector missed added by a click.
    truth = {int(v) for v in np.unique(case.instances.array) if v}
    hits = {}
    for cmb_id in session.ids():
        labels = result.candidate_labels.array == cmb_id
        overlap = np.unique(case.instances.array[labels])
        hits[cmb_id] = [int(v) for v in overlap if v]
    true_ids = [c for c in session.ids() if hits[c]]
    false_ids = [c for c in session.ids() if not hits[c]]
    # The last true CMB is left for the reviewer (pending) when the model made no other pending candidate.
    for cmb_id in true_ids[:-1] if len(true_ids) > 1 else true_ids:
        session.accept(cmb_id)
    rejected = false_ids[0] if false_ids else None
    if rejected is not None:
        session.reject(rejected)
    if model.name.startswith("tiny"):
        # Random weights give hundreds of pending specks: raise the minimum volume (decisions are kept, as
        # in the module) so that only the largest few stay pending.
        volumes = sorted((c.volume_mm3 for c in result.candidates), reverse=True)
        smallest = volumes[min(5, len(volumes) - 1)]
        fewer = DetectionParameters.from_dict({**params.to_dict(), "min_volume_mm3": smallest})
        session.set_parameters(fewer)
    pending_ids = [c.id for c in session.review.cmbs if c.decision.value == "pending"]
    pending = pending_ids[0] if pending_ids else None
    found = {t for ids in hits.values() for t in ids}
    added = []
    for record in case.cmbs:
        if record.id in found or record.id not in truth:
            continue
        ras = case.image.index_to_ras(np.asarray(record.centre_kji, float))[0]
        added.append(session.add_missed(ras).id)
    counts = session.counts()

    # Panels: zoomed axial views around an accepted (or added), the rejected, the pending and an added CMB.
    chosen = [(true_ids[:1], "accepted"), ([rejected] if rejected else [], "rejected"),
              ([pending] if pending else [], "pending"), (added[:1], "added")]
    # A model without false positives (or misses) leaves panels empty: show more accepted CMBs instead.
    spare = [c for c in true_ids[1:] if c != pending and session.review.get(c).decision.value == "accepted"]
    chosen = [(ids, label) for ids, label in chosen if ids]
    chosen += [([c], "accepted") for c in spare[:max(0, 4 - len(chosen))]]
    red = views["Red"]
    panels = []
    for ids, label in chosen:
        if not ids:
            continue
        centre = session.candidate_position(ids[0])
        red.SetSliceOffset(float(centre[2]))
        rgb = rendering.render_slice_view(env.scene, red, node, size=(args.panel, args.panel),
                                          app_logic=env.app, field_of_view_mm=45.0, centre_ras=centre)
        panels.append((rgb, f"CMB {ids[0]}: {label}"))
    # Overview: the axial slice crossing the most shown CMBs (within 3 mm).
    heights = np.array([session.candidate_position(c)[2] for c in session.ids()])
    best = max(heights, key=lambda h: int((np.abs(heights - h) <= 3.0).sum()))
    red.SetSliceOffset(float(best))
    overview = rendering.render_slice_view(env.scene, red, node, size=(2 * args.panel, 2 * args.panel),
                                           app_logic=env.app)

    figure = plt.figure(figsize=(13.5, 7.4), facecolor="black")
    grid = figure.add_gridspec(2, 4, width_ratios=[1, 1, 1, 1], wspace=0.03, hspace=0.12)
    ax = figure.add_subplot(grid[:, :2])
    ax.imshow(overview)
    ax.set_title("axial slice through the most CMBs; right: 45 mm views around single CMBs", color="white",
                 fontsize=10)
    ax.axis("off")
    for index, (rgb, title) in enumerate(panels[:4]):
        ax = figure.add_subplot(grid[index // 2, 2 + index % 2])
        ax.imshow(rgb)
        ax.set_title(title, color="white", fontsize=9)
        ax.axis("off")
    legend = [matplotlib.patches.Patch(color=c, label=t) for c, t in (
        ("#ffd900", "pending"), ("#1acc33", "accepted"), ("#bf0d0d", "rejected"), ("#00bfff", "added"))]
    figure.legend(handles=legend, loc="lower center", ncol=4, frameon=False, labelcolor="white", fontsize=10)
    figure.suptitle(f"CMBDetect review of a synthetic SWI scan (seed {seed}): {counts['accepted']} accepted, "
                    f"{counts['rejected']} rejected, {counts['pending']} pending, {counts['added']} added\n"
                    f"{model_note}", color="white", fontsize=10)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100, facecolor="black", bbox_inches="tight")
    print(f"{out}  ({', '.join(f'{k}={v}' for k, v in counts.items())}; {model_note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
