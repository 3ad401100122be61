"""Veins -- the main CMB mimic: cortical veins on the brain surface, medullary veins radiating from the
ventricles through the white matter, deep veins (internal cerebral, basal, thalamostriate) and sinuses.

Veins are tortuous tubes (radius 0.2-2 mm, sinuses 2.5-4.5 mm) generated in head space and rendered on the
scanner grid with the exact infinite-cylinder field, sub-voxel sampled: a vein that crosses a thick slice
becomes a round dark dot -- exactly what the discriminator must learn to reject.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from CMBDetectLib.synth.anatomy import Anatomy, ras_to_lps
from CMBDetectLib.synth.signal import cylinder_field_ppm, subvoxel_offsets


@dataclass
class Vessel:
    points: np.ndarray   # (N, 3) LPS mm (x, y, z), head space until transformed to the scanner
    radius: np.ndarray   # (N,) mm
    kind: str            # "cortical", "medullary", "deep", "sinus"


def _interpolate_polyline(nodes_ras: np.ndarray, step: float) -> np.ndarray:
    nodes = ras_to_lps(nodes_ras)
    lengths = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(nodes, axis=0), axis=1))])
    samples = np.arange(0.0, lengths[-1] + 1e-6, step)
    return np.stack([np.interp(samples, lengths, nodes[:, a]) for a in range(3)], axis=1)


def _sampler(anatomy: Anatomy, volume: np.ndarray):
    """Trilinear lookup at a few hundred points (numpy gathers: far cheaper than map_coordinates per call)."""
    upper = np.array(volume.shape) - 1.001

    def sample(points_lps: np.ndarray) -> np.ndarray:
        kji = np.clip(anatomy.lps_to_index(points_lps), 0, upper)
        base = np.floor(kji).astype(int)
        w = kji - base
        k, j, i = base.T
        wk, wj, wi = w.T
        result = np.zeros(len(kji))
        for dk in (0, 1):
            for dj in (0, 1):
                for di in (0, 1):
                    weight = ((wk if dk else 1 - wk) * (wj if dj else 1 - wj) * (wi if di else 1 - wi))
                    result += weight * volume[k + dk, j + dj, i + di]
        return result
    return sample


def _gradient(sample, points: np.ndarray, h: float = 1.0) -> np.ndarray:
    grad = np.zeros_like(points)
    for a in range(3):
        offset = np.zeros(3)
        offset[a] = h
        grad[:, a] = (sample(points + offset) - sample(points - offset)) / (2 * h)
    norm = np.linalg.norm(grad, axis=1, keepdims=True)
    return grad / np.maximum(norm, 1e-6)


def _walk(rng: np.random.Generator, starts: np.ndarray, directions: np.ndarray, lengths: np.ndarray,
          step: float, steer, wiggle: float = 0.12) -> list[np.ndarray]:
    """Advance many random walkers at once; ``steer(points, directions) -> (directions, points, alive)``."""
    count = starts.shape[0]
    n_steps = int(np.ceil(lengths.max() / step)) if count else 0
    paths = np.zeros((n_steps + 1, count, 3))
    paths[0] = starts
    alive = np.ones(count, bool)
    last = np.full(count, n_steps)
    points, dirs = starts.copy(), directions.copy()
    for s in range(1, n_steps + 1):
        dirs = dirs + rng.normal(0.0, wiggle, dirs.shape)
        dirs /= np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-9)
        points = points + step * dirs
        dirs, points, ok = steer(points, dirs)
        finished = alive & (~ok | (s * step >= lengths))
        last[finished] = s
        alive &= ~finished
        paths[s] = points
        if not alive.any():
            paths = paths[:s + 1]
            break
    return [paths[: last[v] + 1, v] for v in range(count) if last[v] >= 4]


def generate_vessels(anatomy: Anatomy, rng: np.random.Generator, density: float = 1.0,
                     step: float = 0.5) -> list[Vessel]:
    """Random venous tree of one subject in head space."""
    vessels: list[Vessel] = []
    signed = anatomy.outside_mm - anatomy.depth_mm         # < 0 inside the envelope
    sample_signed = _sampler(anatomy, signed)
    sample_vent = _sampler(anatomy, anatomy.ventricle_mm)
    sample_depth = _sampler(anatomy, anatomy.depth_mm)
    lo = anatomy.origin_lps
    hi = anatomy.origin_lps + anatomy.spacing * (np.array(anatomy.shape[::-1]) - 1)

    def inside_box(points: np.ndarray) -> np.ndarray:
        return np.all((points > lo + 2) & (points < hi - 2), axis=1)

    # Cortical veins: follow the surface (in the subarachnoid space / sulcal mouths), drain upwards.
    n_cortical = int(rng.poisson(55 * density))
    surface = np.flatnonzero(((anatomy.depth_mm > 0) & (anatomy.depth_mm <= 2.0)).ravel())
    if n_cortical and surface.size:
        chosen = rng.choice(surface, n_cortical)
        starts = anatomy.index_to_lps(np.stack(np.unravel_index(chosen, anatomy.shape), axis=1))
        target = rng.uniform(0.3, 3.0, n_cortical)
        directions = rng.normal(0, 1, (n_cortical, 3)) + np.array([0, 0, 0.8])

        def steer_cortical(points, dirs):
            normal = _gradient(sample_signed, points)
            dirs = dirs - np.sum(dirs * normal, axis=1, keepdims=True) * normal
            dirs = dirs + 0.08 * np.array([0.0, 0.0, 1.0])
            dirs /= np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-9)
            points = points - (sample_signed(points) + target)[:, None] * normal * 0.7
            return dirs, points, inside_box(points) & (sample_signed(points) < 3.0)

        paths = _walk(rng, starts, directions, rng.uniform(15.0, 70.0, n_cortical), step, steer_cortical, 0.1)
        for path in paths:
            r0 = rng.uniform(0.35, 0.9)
            radius = r0 * np.linspace(1.0, rng.uniform(1.1, 1.7), len(path))
            vessels.append(Vessel(path, radius, "cortical"))

    # Medullary veins: thin, nearly straight, radial from the ventricle walls towards the cortex.
    n_medullary = int(rng.poisson(160 * density))
    seeds = np.flatnonzero(((anatomy.ventricle_mm > 1.0) & (anatomy.ventricle_mm < 5.0)
                            & (anatomy.wm > 0.5)).ravel())
    if n_medullary and seeds.size:
        chosen = rng.choice(seeds, n_medullary)
        starts = anatomy.index_to_lps(np.stack(np.unravel_index(chosen, anatomy.shape), axis=1))
        starts = starts + rng.uniform(-0.5, 0.5, starts.shape)
        directions = _gradient(sample_vent, starts)

        def steer_medullary(points, dirs):
            away = _gradient(sample_vent, points)
            dirs = dirs + 0.25 * away
            dirs /= np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-9)
            return dirs, points, inside_box(points) & (sample_depth(points) > 2.5)

        paths = _walk(rng, starts, directions, rng.uniform(10.0, 35.0, n_medullary), step, steer_medullary,
                      0.04)
        for path in paths:
            vessels.append(Vessel(path, np.full(len(path), rng.uniform(0.2, 0.5)), "medullary"))

    # Deep veins and sinuses from jittered anatomical polylines (RAS mm).
    def polyline(nodes, radius_start, radius_end, kind):
        nodes = np.asarray(nodes, dtype=float) + rng.normal(0, 1.2, (len(nodes), 3))
        points = _interpolate_polyline(nodes, step)
        vessels.append(Vessel(points, np.linspace(radius_start, radius_end, len(points)), kind))

    for side in (1.0, -1.0):
        polyline([(side * 2.5, 4, 16), (side * 2.5, -15, 17), (side * 2.0, -30, 13), (0, -40, 8)],
                 rng.uniform(0.8, 1.1), rng.uniform(1.1, 1.4), "deep")
        polyline([(side * 20, 0, -12), (side * 24, -15, -8), (side * 18, -30, -2), (side * 6, -40, 4),
                  (0, -42, 7)], rng.uniform(0.6, 0.9), rng.uniform(0.9, 1.2), "deep")
        polyline([(side * 15, 10, 14), (side * 13, -5, 16), (side * 7, -10, 17), (side * 3, -2, 16)],
                 rng.uniform(0.5, 0.7), rng.uniform(0.7, 0.9), "deep")
        polyline([(0, -100, -8), (side * 38, -96, -14), (side * 58, -62, -28), (side * 54, -40, -46)],
                 rng.uniform(2.8, 3.6), rng.uniform(2.5, 3.2), "sinus")
    polyline([(0, -40, 8), (0, -50, 10), (0, -64, 6), (0, -82, -2), (0, -100, -8)],
             rng.uniform(1.6, 2.0), rng.uniform(2.2, 2.8), "sinus")
    # Superior sagittal sinus: along the midline just above the brain, from the frontal pole to the torcular.
    ys = np.linspace(60.0, -95.0, 32)
    top = []
    x0 = int(round((0.0 - lo[0]) / anatomy.spacing))
    for y_ras in ys:
        j = int(round((-y_ras - lo[1]) / anatomy.spacing))
        column = np.flatnonzero(anatomy.brain[:, min(max(j, 0), anatomy.shape[1] - 1), x0])
        if column.size:
            top.append((0.0, y_ras, lo[2] + anatomy.spacing * column.max() + 3.5))
    if len(top) > 4:
        nodes = np.array(top + [(0.0, -102.0, -8.0)])
        nodes[:, 2] = ndimage.uniform_filter1d(nodes[:, 2], 3, mode="nearest")
        polyline(nodes, rng.uniform(2.0, 2.8), rng.uniform(3.5, 4.5), "sinus")
    return vessels


@dataclass
class VesselRendering:
    flat_index: np.ndarray   # voxels affected (flat indices into the grid)
    factor: np.ndarray       # complex signal factor at those voxels
    fraction: np.ndarray     # blood volume fraction at those voxels


def render_vessels(vessels_kji: list[tuple[np.ndarray, np.ndarray]], shape_zyx: tuple[int, int, int],
                   spacing_zyx: tuple[float, float, float], delta_chi: float, delta_r2s: float, te_ms: float,
                   rad_per_ppm: float, b0_zyx=(1.0, 0.0, 0.0), reach_radii: float = 5.0,
                   max_reach_mm: float = 10.0, chunk_points: int = 24) -> VesselRendering:
    """Voxel-averaged complex factor of all veins (each voxel sees its nearest vein, exact cylinder field).

    ``vessels_kji``: per vein, (centreline points in continuous [k, j, i] indices of the grid, radii mm).
    The nearest centreline sample of each voxel is found chunk by chunk in small boxes around the
    centreline (cost grows with vessel length, not with the grid); the perpendicular distance and field
    are then exact, not quantised to the grid.
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float32)
    points, tangents, radii = [], [], []
    for centreline, radius in vessels_kji:
        if len(centreline) < 2:
            continue
        mm = centreline * spacing
        tangent = np.gradient(mm, axis=0)
        tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
        points.append(mm)
        tangents.append(tangent)
        radii.append(radius)
    empty = VesselRendering(np.zeros(0, np.int64), np.zeros(0, np.complex64), np.zeros(0, np.float32))
    if not points:
        return empty
    diag = float(np.linalg.norm(spacing))
    best_d2 = np.full(shape_zyx, np.inf, np.float32)
    best_id = np.full(shape_zyx, -1, np.int32)
    grid_hi = np.array(shape_zyx)
    offset = 0
    for mm, radius in zip(points, radii):
        for start in range(0, len(mm), chunk_points):
            part = mm[start:start + chunk_points + 1].astype(np.float32)
            widest = float(radius[start:start + chunk_points + 1].max())
            reach = min(widest * reach_radii, max_reach_mm) + diag
            lo = np.maximum(np.floor((part.min(axis=0) - reach) / spacing).astype(int), 0)
            hi = np.minimum(np.ceil((part.max(axis=0) + reach) / spacing).astype(int) + 1, grid_hi)
            if np.any(hi <= lo):
                continue
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            axes = [(np.arange(a, b, dtype=np.float32) * s) for a, b, s in zip(lo, hi, spacing)]
            d2 = ((axes[0][:, None, None, None] - part[:, 0]) ** 2
                  + (axes[1][None, :, None, None] - part[:, 1]) ** 2
                  + (axes[2][None, None, :, None] - part[:, 2]) ** 2)
            nearest = np.argmin(d2, axis=-1)
            nearest_d2 = np.take_along_axis(d2, nearest[..., None], axis=-1)[..., 0]
            better = nearest_d2 < best_d2[box]
            best_d2[box] = np.where(better, nearest_d2, best_d2[box])
            best_id[box] = np.where(better, nearest + offset + start, best_id[box])
        offset += len(mm)
    pts = np.concatenate(points).astype(np.float32)
    tan = np.concatenate(tangents).astype(np.float32)
    rad = np.concatenate(radii).astype(np.float32)
    band = np.flatnonzero(best_id.ravel() >= 0)
    del best_d2
    point_id = best_id.ravel()[band]
    del best_id
    voxel = np.stack(np.unravel_index(band, shape_zyx), axis=1).astype(np.float32) * spacing
    v = voxel - pts[point_id]
    along = np.sum(v * tan[point_id], axis=1)
    r_vec = v - along[:, None] * tan[point_id]
    r = np.linalg.norm(r_vec, axis=1)
    a = rad[point_id]
    in_plane = float(np.hypot(spacing[1], spacing[2]))
    near = r <= a + 0.75 * in_plane
    far = ~near & (r <= np.minimum(reach_radii * a, max_reach_mm) + diag)
    decay = np.float32(np.exp(-delta_r2s * te_ms * 1e-3))
    n_slice = int(np.clip(np.ceil(spacing[0] / 0.6), 1, 8))
    groups = [(far, (int(np.clip(np.ceil(spacing[0] / 0.75), 1, 7)), 1, 1))]
    # Near the wall the partial volume needs sub-voxel steps of ~radius/1.5 in-plane.
    step = np.clip(a / 1.5, 0.12, 0.45)
    n_in_plane = np.ceil(float(spacing[1:].max()) / step).astype(int)
    for count in np.unique(n_in_plane[near]):
        groups.append((near & (n_in_plane == count), (n_slice, int(count), int(count))))
    flat_all, factor_all, fraction_all = [], [], []
    for selection, counts in groups:
        ids = np.flatnonzero(selection)
        if ids.size == 0:
            continue
        offsets = subvoxel_offsets(tuple(spacing), counts)
        chunk = max(1, 300_000 // offsets.shape[0])
        factor = np.empty(ids.size, np.complex64)
        fraction = np.empty(ids.size, np.float32)
        for start in range(0, ids.size, chunk):
            part = ids[start:start + chunk]
            p = point_id[part]
            vv = v[part][:, None, :] + offsets[None]
            t = tan[p][:, None, :]
            al = np.sum(vv * t, axis=-1, keepdims=True)
            rv = vv - al * t
            # Beyond a centreline end the infinite-cylinder model does not apply: taper it off.
            taper = np.exp(-np.maximum(np.abs(al[..., 0]) - 0.75, 0.0) ** 2 / (a[part][:, None] ** 2 + 0.25))
            field = cylinder_field_ppm(rv, np.broadcast_to(t, rv.shape), a[part][:, None],
                                       np.float32(delta_chi), b0_zyx) * taper
            inside = (np.sum(rv ** 2, axis=-1) <= a[part][:, None] ** 2) & (taper > 0.5)
            sample = np.where(inside, decay, np.float32(1.0)) * np.exp(-1j * rad_per_ppm * field)
            factor[start:start + chunk] = sample.mean(axis=1)
            fraction[start:start + chunk] = inside.mean(axis=1)
        flat_all.append(band[ids])
        factor_all.append(factor)
        fraction_all.append(fraction)
    if not flat_all:
        return empty
    return VesselRendering(np.concatenate(flat_all), np.concatenate(factor_all), np.concatenate(fraction_all))


def through_plane_segments(vessels_kji: list[tuple[np.ndarray, np.ndarray]], spacing_zyx, inside,
                           rng: np.random.Generator, min_gap_mm: float = 12.0, limit: int = 25
                           ) -> list[tuple[np.ndarray, float]]:
    """Vein points crossing the slices (|t_z| > 0.7) inside the brain: round dots that mimic CMBs.

    ``inside(kji) -> bool array`` says which points are in the brain. Returns (kji, radius) pairs spaced at
    least ``min_gap_mm`` apart, listed as hard negatives in the review JSON.
    """
    spacing = np.asarray(spacing_zyx, dtype=float)
    picks: list[tuple[np.ndarray, float]] = []
    order = rng.permutation(len(vessels_kji))
    for v in order:
        centreline, radius = vessels_kji[v]
        if len(centreline) < 3:
            continue
        mm = centreline * spacing
        tangent = np.gradient(mm, axis=0)
        tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
        candidates = np.flatnonzero((np.abs(tangent[:, 0]) > 0.7) & inside(centreline))
        if candidates.size == 0:
            continue
        c = candidates[candidates.size // 2]
        point_mm = mm[c]
        if all(np.linalg.norm(point_mm - p * spacing) >= min_gap_mm for p, _ in picks):
            picks.append((centreline[c], float(radius[c])))
        if len(picks) >= limit:
            break
    return picks
