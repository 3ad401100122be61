"""A one-page HTML report for clinical meetings: summary tables, key slices, atlas overlay, 3D view.

Images are drawn with matplotlib (Agg, no display) in radiological convention (patient right on the
left of axial and coronal views) on the scan reoriented to LPS, and embedded as base64 PNGs so the page
is a single file that can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from scipy import ndimage  # noqa: E402

from CMBDetectLib.anatomy.registration import RegistrationResult  # noqa: E402
from CMBDetectLib.anatomy.summary import ClinicalSummary  # noqa: E402
from CMBDetectLib.volume import Volume, atomic_write_text, volume_from_sitk, volume_to_sitk  # noqa: E402

CATEGORY_COLOURS = {"lobar": "#e6550d", "deep": "#3182bd", "infratentorial": "#31a354", "unknown": "#888888"}


@dataclass
class ReportImages:
    key_slices: bytes
    atlas_overlay: bytes
    view_3d: bytes


def _to_lps(volume: Volume, interpolator: int = sitk.sitkLinear) -> Volume:
    """The volume reoriented so that axis 0 is inferior->superior, 1 anterior->posterior, 2 right->left."""
    return volume_from_sitk(sitk.DICOMOrient(volume_to_sitk(volume), "LPS"))


def _window(array: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    values = array[mask] if mask is not None and mask.any() else array[array != 0]
    if values.size == 0:
        values = array.ravel()
    low, high = np.percentile(values, [1, 99.5])
    return float(low), float(max(high, low + 1e-6))


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight", facecolor=figure.get_facecolor())
    plt.close(figure)
    return buffer.getvalue()


def _aspect(spacing_rows: float, spacing_cols: float) -> float:
    return spacing_rows / spacing_cols


def render_key_slices(scan: Volume, summary: ClinicalSummary, max_panels: int = 8) -> bytes:
    """Axial slices through the CMBs (one panel per slice, every CMB on it circled and numbered)."""
    display = _to_lps(scan)
    array = np.asarray(display.array, dtype=float)
    low, high = _window(array)
    sz, sy, sx = display.spacing_zyx
    positions = {e.id: display.ras_to_index(np.asarray(e.centroid_ras))[0] for e in summary.entries}
    slices: dict[int, list] = {}
    for entry in sorted(summary.entries, key=lambda e: (-e.p_disc, e.id)):
        k = int(np.clip(round(positions[entry.id][0]), 0, array.shape[0] - 1))
        slices.setdefault(k, []).append(entry)
    chosen = sorted(slices)[:max_panels] if slices else [array.shape[0] // 2]
    columns = min(4, len(chosen))
    rows = int(np.ceil(len(chosen) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False,
                                facecolor="black")
    for ax in axes.flat:
        ax.axis("off")
    for ax, k in zip(axes.flat, chosen):
        ax.imshow(array[k], cmap="gray", vmin=low, vmax=high, aspect=_aspect(sy, sx),
                  interpolation="bilinear")
        for entry in slices.get(k, []):
            _, j, i = positions[entry.id]
            radius_px = max(entry.diameter_mm, 6.0) / sx
            colour = CATEGORY_COLOURS.get(entry.region.category, "#888888")
            ax.add_patch(matplotlib.patches.Ellipse((i, j), 2 * radius_px, 2 * radius_px * sx / sy,
                                                    fill=False, edgecolor=colour, linewidth=1.5))
            ax.text(i + radius_px + 2, j, str(entry.id), color=colour, fontsize=9, weight="bold")
        ax.set_title(f"axial slice {k + 1} (S {display.index_to_ras([[k, 0, 0]])[0, 2]:.0f} mm)",
                     color="white", fontsize=8)
        ax.text(2, array.shape[1] - 4, "R", color="white", fontsize=8)
    figure.suptitle("Key slices (circles: CMBs; colour = lobar / deep / infratentorial)", color="white",
                    fontsize=10)
    return _png(figure)


def _boundaries(labels: np.ndarray) -> np.ndarray:
    grown = ndimage.grey_dilation(labels, size=(3, 3))
    shrunk = ndimage.grey_erosion(labels, size=(3, 3))
    return grown != shrunk


def render_atlas_overlay(scan: Volume, labels: Volume, brain: Volume | None = None,
                         title: str = "Atlas regions registered to the scan") -> bytes:
    """Region outlines (and the brain outline in yellow) over axial, coronal and sagittal slices: the
    visual check of the registration."""
    display = _to_lps(scan)
    label_display = _to_lps(labels)
    array = np.asarray(display.array, dtype=float)
    region_labels = np.asarray(label_display.array).astype(np.int32)
    brain_display = (np.asarray(_to_lps(brain).array) > 0) if brain is not None else region_labels > 0
    low, high = _window(array, brain_display)
    sz, sy, sx = display.spacing_zyx
    inside = np.argwhere(brain_display) if brain_display.any() else np.argwhere(np.ones_like(array, bool))
    k0, k1 = np.percentile(inside[:, 0], [25, 60]).astype(int)
    j_mid, i_mid = np.median(inside[:, 1]).astype(int), np.median(inside[:, 2]).astype(int)
    i_side = int(np.percentile(inside[:, 2], 30))
    views = [("axial", lambda a: a[k0], _aspect(sy, sx)), ("axial", lambda a: a[k1], _aspect(sy, sx)),
             ("coronal", lambda a: a[::-1, j_mid, :], _aspect(sz, sx)),
             ("sagittal", lambda a: a[::-1, :, i_mid], _aspect(sz, sy)),
             ("sagittal", lambda a: a[::-1, :, i_side], _aspect(sz, sy))]
    figure, axes = plt.subplots(1, len(views), figsize=(3.3 * len(views), 3.6), facecolor="black")
    cmap = plt.get_cmap("tab20")
    for ax, (name, cut, aspect) in zip(axes, views):
        ax.axis("off")
        ax.imshow(cut(array), cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="bilinear")
        edges = _boundaries(cut(region_labels)) & (cut(region_labels) > 0)
        colours = cmap((cut(region_labels) % 20) / 19.0)
        colours[..., 3] = edges * 0.9
        ax.imshow(colours, aspect=aspect, interpolation="nearest")
        outline = _boundaries(cut(brain_display).astype(np.int32))
        ax.imshow(np.ma.masked_where(~outline, outline), cmap=ListedColormap(["yellow"]), aspect=aspect,
                  interpolation="nearest")
        ax.set_title(name, color="white", fontsize=8)
    figure.suptitle(title, color="white", fontsize=10)
    return _png(figure)


def render_3d_view(scan_brain: Volume | None, summary: ClinicalSummary) -> bytes:
    """The CMBs as spheres (scaled by diameter, coloured by category) in a point cloud of the brain
    surface, seen from above and from the left, in scan RAS millimetres."""
    figure = plt.figure(figsize=(10, 4.6))
    surface = np.zeros((0, 3))
    if scan_brain is not None and np.asarray(scan_brain.array).any():
        mask = np.asarray(scan_brain.array) > 0
        shell = mask & ~ndimage.binary_erosion(mask)
        points = np.argwhere(shell)
        if len(points) > 6000:
            points = points[np.random.default_rng(0).choice(len(points), 6000, replace=False)]
        surface = scan_brain.index_to_ras(points.astype(float))
    cmbs = np.array([e.centroid_ras for e in summary.entries]).reshape(-1, 3)
    for index, (elevation, azimuth, name) in enumerate(((90, -90, "from above"), (0, 180, "from the left"))):
        ax = figure.add_subplot(1, 2, index + 1, projection="3d")
        if len(surface):
            ax.scatter(*surface.T, s=1, c="#777777", alpha=0.15, depthshade=False)
        for category, colour in CATEGORY_COLOURS.items():
            chosen = [e for e in summary.entries if e.region.category == category]
            if chosen:
                xyz = np.array([e.centroid_ras for e in chosen])
                ax.scatter(*xyz.T, s=[3 * max(e.diameter_mm, 3.0) ** 2 for e in chosen], c=colour,
                           edgecolors="black", linewidths=0.5, alpha=0.95, depthshade=False)
        for entry in summary.entries:
            ax.text(*entry.centroid_ras, f" {entry.id}", fontsize=7)
        reference = surface if len(surface) else cmbs
        if len(reference):
            centre = (reference.max(axis=0) + reference.min(axis=0)) / 2
            half = max(float((reference.max(axis=0) - reference.min(axis=0)).max()) / 2, 10.0)
            for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
                setter(c - half, c + half)
        ax.set_box_aspect((1, 1, 1))
        ax.view_init(elev=elevation, azim=azimuth)
        ax.set_xlabel("R (mm)", fontsize=7)
        ax.set_ylabel("A (mm)", fontsize=7)
        ax.set_zlabel("S (mm)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_title(name, fontsize=9)
        if index == 0 and summary.entries:
            handles = [Line2D([], [], marker="o", linestyle="", color=colour, label=category)
                       for category, colour in CATEGORY_COLOURS.items()
                       if any(e.region.category == category for e in summary.entries)]
            ax.legend(handles=handles, loc="upper left", fontsize=7)
    figure.suptitle("CMBs in the brain (3D)", fontsize=10)
    return _png(figure)


def _table(rows: list[tuple], header: tuple) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def render_html(summary: ClinicalSummary, images: ReportImages, *, title: str, scan_info: dict,
                location_info: str) -> str:
    counts = [("total", summary.total)] + [(k, v) for k, v in summary.by_category.items()]
    sizes = list(summary.by_size.items())
    certainty = [(f"{k} (p_disc {'>=' if k == 'definite' else '<'} {summary.th_definite:g})", v)
                 for k, v in summary.by_certainty.items()]
    sides = list(summary.by_side.items())
    regions = list(summary.by_region.items())
    cmb_rows = [(e.id, e.region.side, e.region.name, e.region.category, e.certainty, f"{e.p_disc:.2f}",
                 f"{e.diameter_mm:.1f}", f"{e.volume_mm3:.1f}",
                 "({:.0f}, {:.0f}, {:.0f})".format(*e.centroid_ras)) for e in summary.entries]
    facts = "".join(f"<li>{html.escape(f)}</li>" for f in summary.facts)
    info = " &middot; ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in scan_info.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 18px; color: #222; max-width: 1100px; }}
h1 {{ font-size: 20px; margin: 0 0 4px 0; }} h2 {{ font-size: 15px; margin: 14px 0 4px 0; }}
.info {{ color: #555; font-size: 12px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 14px; }}
table {{ border-collapse: collapse; font-size: 12px; }} td, th {{ border: 1px solid #ccc; padding: 2px 6px; }}
th {{ background: #f0f0f0; }}
.note {{ background: #fff4e5; border: 1px solid #f0a030; padding: 6px 10px; font-size: 12px; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="info">{info}</div>
<div class="note"><b>{html.escape(summary.note)}</b></div>
<h2>Findings</h2><ul>{facts}</ul>
<div class="grid">
<div><h2>Count</h2>{_table(counts, ("category", "CMBs"))}</div>
<div><h2>Size (equivalent diameter)</h2>{_table(sizes, ("size", "CMBs"))}</div>
<div><h2>Certainty</h2>{_table(certainty, ("certainty", "CMBs"))}</div>
<div><h2>Side</h2>{_table(sides, ("side", "CMBs"))}</div>
<div><h2>Region</h2>{_table(regions, ("region", "CMBs"))}</div>
</div>
<h2>Key slices</h2>{_img(images.key_slices, "key slices")}
<h2>CMBs in 3D</h2>{_img(images.view_3d, "3D view")}
<h2>Microbleeds</h2>
{_table(cmb_rows, ("id", "side", "region", "category", "certainty", "p_disc", "diameter mm", "volume mm3",
                   "RAS mm"))}
<h2>Anatomical location: registration check</h2>
<div class="info">{html.escape(location_info)}</div>
{_img(images.atlas_overlay, "atlas overlay")}
</body></html>
"""


def write_report(out_dir: str | os.PathLike, stem: str, scan: Volume, summary: ClinicalSummary, *,
                 region_labels: Volume, brain_mask: Volume | None = None,
                 registration: RegistrationResult | None = None, scan_info: dict | None = None,
                 location_info: str = "") -> dict[str, Path]:
    """Write ``<stem>_report.html`` (self-contained) and the PNGs it embeds; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_title = "Atlas regions registered to the scan (yellow: template brain outline)"
    if registration is not None:
        overlay_title += f" - Dice {registration.dice:.2f}, structure {registration.structure:.2f}"
    brain = brain_mask if brain_mask is not None else \
        region_labels.with_array(np.asarray(region_labels.array) > 0)
    images = ReportImages(key_slices=render_key_slices(scan, summary),
                          atlas_overlay=render_atlas_overlay(scan, region_labels, brain_mask, overlay_title),
                          view_3d=render_3d_view(brain, summary))
    paths = {}
    for name in ("key_slices", "atlas_overlay", "view_3d"):
        path = out_dir / f"{stem}_{name}.png"
        temporary = path.with_name(path.name + ".partial")
        temporary.write_bytes(getattr(images, name))
        os.replace(temporary, path)
        paths[name] = path
    report = out_dir / f"{stem}_report.html"
    atomic_write_text(report, render_html(summary, images, title=f"Cerebral microbleeds: {stem}",
                                          scan_info=scan_info or {}, location_info=location_info))
    paths["report"] = report
    return paths
