"""Overlay pictures of detections on a scan (PNG), for the demo, reports and quick looks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from CMBDetectLib.volume import Volume


def _display_window(image: np.ndarray) -> tuple[float, float]:
    values = image[image != 0]
    if values.size == 0:
        return 0.0, 1.0
    return float(np.percentile(values, 1)), float(np.percentile(values, 99.5))


def render_detection_overlay(image: Volume, detections: Volume, path: str | Path, truth: Volume | None = None,
                             title: str = "", max_panels: int = 8) -> Path:
    """Axial slices through each CMB: detections outlined in colour, ground truth (if given) in cyan.

    Detections that hit a ground-truth CMB are green, the others red; ground-truth outlines are cyan, so a
    cyan outline without green inside is a missed CMB.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    detected = detections.array > 0
    true = truth.array > 0 if truth is not None else np.zeros_like(detected)
    centres: list[tuple[int, str]] = []
    det_labels, n_det = ndimage.label(detected, structure=np.ones((3, 3, 3)))
    for index, centre in enumerate(ndimage.center_of_mass(detected, det_labels, range(1, n_det + 1)), start=1):
        hit = bool(np.any(true[det_labels == index]))
        centres.append((int(round(centre[0])), "TP" if truth is not None and hit else
                        ("FP" if truth is not None else "CMB")))
    if truth is not None:
        gt_labels, n_gt = ndimage.label(true, structure=np.ones((3, 3, 3)))
        for index, centre in enumerate(ndimage.center_of_mass(true, gt_labels, range(1, n_gt + 1)), start=1):
            if not np.any(detected[gt_labels == index]):
                centres.append((int(round(centre[0])), "FN"))
    slices: dict[int, list[str]] = {}
    for k, kind in centres:
        slices.setdefault(k, []).append(kind)
    chosen = sorted(slices)[:max_panels] or [image.array.shape[0] // 2]
    columns = min(4, len(chosen))
    rows = int(np.ceil(len(chosen) / columns))
    aspect = image.spacing[1] / image.spacing[0]
    figure = Figure(figsize=(4 * columns, 4.4 * rows), dpi=100)
    FigureCanvasAgg(figure)
    low, high = _display_window(image.array)
    for panel, k in enumerate(chosen):
        axes = figure.add_subplot(rows, columns, panel + 1)
        axes.imshow(image.array[k], cmap="gray", vmin=low, vmax=high, aspect=aspect, origin="lower")
        if truth is not None and true[k].any():
            axes.contour(true[k], levels=[0.5], colors="cyan", linewidths=0.8)
        if detected[k].any():
            if truth is None:
                axes.contour(detected[k], levels=[0.5], colors="lime", linewidths=1.2)
            else:
                near_truth = ndimage.binary_dilation(true[k], iterations=1)
                for colour, part in (("lime", detected[k] & near_truth), ("red", detected[k] & ~near_truth)):
                    if part.any():
                        axes.contour(part, levels=[0.5], colors=colour, linewidths=1.2)
        axes.set_title(f"slice k={k}: " + ", ".join(sorted(slices.get(k, []))), fontsize=9)
        axes.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
