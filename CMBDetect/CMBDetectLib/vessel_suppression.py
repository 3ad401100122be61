"""Removal of vessels and sulci [paper 2.1.1] on the preprocessed (CMB-bright) image.

Steps: multi-scale Frangi vesselness for bright tubes + structure-tensor eigenvalues -> 2-cluster k-means
on the voxels with some vesselness -> vessel mask; voxels that look like round blobs at some scale (Hessian
eigenvalues all negative and of similar size) are protected so that a CMB touching a vessel survives; mask
components that are compact rather than elongated are dropped; the remaining voxels are inpainted with the
mean of their unmasked 26-neighbours, layer by layer inward.

Spacing: every derivative is a Gaussian derivative with per-axis sigma ``sigma_mm / spacing`` and is
expressed per mm, so a 0.8 x 0.8 x 3 mm grid is handled physically. ``skimage.filters.frangi`` assumes
isotropic voxels and a full eigen-decomposition per voxel; here the Hessian is built with
``scipy.ndimage.gaussian_filter(order=...)`` and the eigenvalues of the symmetric 3 x 3 matrices come from
a vectorised closed-form (trigonometric) solver, evaluated only inside the brain mask, in float32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.cluster.vq import kmeans2, vq

_MIN_SIGMA_VOXELS = 0.5  # below this a sampled Gaussian derivative is meaningless (thick-slice axis)


@dataclass
class VesselSuppressionResult:
    image: np.ndarray                 # float32, vessels inpainted
    vessel_mask: np.ndarray           # bool, what was inpainted
    timings: dict[str, float] = field(default_factory=dict)
    protected_mask: np.ndarray | None = None  # bool, blob-like voxels never put in the mask


def symmetric_eigenvalues(a11, a22, a33, a12, a13, a23) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenvalues (descending, e1 >= e2 >= e3) of many symmetric 3 x 3 matrices, closed form.

    Smith (1961) trigonometric solution; ~10x faster than ``np.linalg.eigvalsh`` on stacked matrices and
    works in float32 on flat arrays.
    """
    q = (a11 + a22 + a33) / 3.0
    p1 = a12 * a12 + a13 * a13 + a23 * a23
    b11, b22, b33 = a11 - q, a22 - q, a33 - q
    p2 = b11 * b11 + b22 * b22 + b33 * b33 + 2.0 * p1
    p = np.sqrt(p2 / 6.0)
    safe_p = np.where(p > 1e-12, p, 1.0)
    det = (b11 * (b22 * b33 - a23 * a23) - a12 * (a12 * b33 - a23 * a13) + a13 * (a12 * a23 - b22 * a13))
    r = np.clip(det / (2.0 * safe_p ** 3), -1.0, 1.0)
    phi = np.arccos(r) / 3.0
    e1 = q + 2.0 * p * np.cos(phi)
    e3 = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    e2 = 3.0 * q - e1 - e3
    return e1, e2, e3


def _voxel_sigma(sigma_mm: float, spacing: np.ndarray) -> np.ndarray:
    return np.maximum(sigma_mm / spacing, _MIN_SIGMA_VOXELS)


def _hessian_eigenvalues(image: np.ndarray, where: tuple[np.ndarray, ...], sigma_mm: float,
                         spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale-normalised Hessian eigenvalues at the voxels ``where``.

    Returns the 3D eigenvalues sorted by magnitude (N x 3) and the eigenvalues of the 2 x 2 in-plane
    block (the two finest axes; N x 2, sorted by magnitude), which describe a CMB that lies in a single
    thick slice better than the 3D ones.
    """
    sigma = _voxel_sigma(sigma_mm, spacing)
    components = {}
    for a in range(3):
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            derivative = ndimage.gaussian_filter(image, sigma=sigma, order=order, mode="nearest")
            # per mm, then scale-normalised (sigma^2) so that scales are comparable
            components[a, b] = derivative[where] * np.float32(sigma_mm ** 2 / (spacing[a] * spacing[b]))
    e = np.stack(symmetric_eigenvalues(components[0, 0], components[1, 1], components[2, 2],
                                       components[0, 1], components[0, 2], components[1, 2]), axis=1)
    order = np.argsort(np.abs(e), axis=1)
    a, b = sorted(int(x) for x in np.argsort(spacing, kind="stable")[:2])
    mean = (components[a, a] + components[b, b]) / 2
    half = np.sqrt(((components[a, a] - components[b, b]) / 2) ** 2 + components[a, b] ** 2)
    plane = np.stack([mean - half, mean + half], axis=1)
    plane = np.take_along_axis(plane, np.argsort(np.abs(plane), axis=1), axis=1)
    return np.take_along_axis(e, order, axis=1), plane


def _structure_tensor_eigenvalues(image: np.ndarray, where: tuple[np.ndarray, ...], spacing: np.ndarray,
                                  derivative_mm: float, integration_mm: float) -> np.ndarray:
    """Structure-tensor eigenvalues (descending, N x 3), gradients per mm."""
    sigma_d = _voxel_sigma(derivative_mm, spacing)
    gradients = []
    for axis in range(3):
        order = [0, 0, 0]
        order[axis] = 1
        gradients.append(ndimage.gaussian_filter(image, sigma=sigma_d, order=order, mode="nearest")
                         / np.float32(spacing[axis]))
    sigma_i = _voxel_sigma(integration_mm, spacing)
    tensor = {}
    for a in range(3):
        for b in range(a, 3):
            tensor[a, b] = ndimage.gaussian_filter(gradients[a] * gradients[b], sigma=sigma_i,
                                                   mode="nearest")[where]
    return np.stack(symmetric_eigenvalues(tensor[0, 0], tensor[1, 1], tensor[2, 2],
                                          tensor[0, 1], tensor[0, 2], tensor[1, 2]), axis=1)


def _kmeans_vessel_cluster(features: np.ndarray, vesselness: np.ndarray, seed: int,
                           max_fit: int = 50000) -> np.ndarray:
    """2-cluster k-means on standardised features; True for the cluster with the higher vesselness."""
    if len(features) < 4:
        return np.ones(len(features), dtype=bool)
    mean, std = features.mean(axis=0), features.std(axis=0)
    std[std == 0] = 1.0
    data = ((features - mean) / std).astype(np.float64)
    rng = np.random.default_rng(seed)
    fit = data if len(data) <= max_fit else data[rng.choice(len(data), max_fit, replace=False)]
    # Deterministic initial centroids (low / high vesselness quantiles) instead of random ones.
    order = np.argsort(fit[:, 0])
    init = np.stack([fit[order[len(order) // 10]], fit[order[(9 * len(order)) // 10]]])
    centroids, _ = kmeans2(fit, init, iter=20, minit="matrix")
    labels, _ = vq(data, centroids)
    means = [vesselness[labels == c].mean() if np.any(labels == c) else -np.inf for c in range(2)]
    return labels == int(np.argmax(means))


def _elongated_components(mask: np.ndarray, spacing: np.ndarray, min_elongation: float,
                          min_length_mm: float, min_voxels: int, max_fill: float = 0.25) -> np.ndarray:
    """Keep only the 26-connected components that are long and thin (vessels), not round ones (CMBs).

    Elongated = ``length / width >= min_elongation`` (principal extents) OR ``fill < max_fill``, where
    ``fill`` is the component volume over the volume of the ball with the same principal length (1 for a
    ball, 0.44 for a 1.5:1 ovoid, ~0.05 for a 1 x 11 mm vessel). The fill criterion matters on thick
    slices, where the Hessian smears a thin vessel over two slices and inflates its "width".
    """
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return mask
    coords = np.nonzero(labels)
    lab = labels[coords]
    points = np.stack(coords, axis=1).astype(np.float64) * spacing
    counts = np.bincount(lab, minlength=n + 1).astype(np.float64)
    safe = np.maximum(counts, 1)
    means = np.stack([np.bincount(lab, weights=points[:, a], minlength=n + 1) / safe for a in range(3)], 1)
    centred = points - means[lab]
    cov = np.empty((n + 1, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            value = np.bincount(lab, weights=centred[:, a] * centred[:, b], minlength=n + 1) / safe
            cov[:, a, b] = cov[:, b, a] = value
    # a voxel is not a point: add its own extent so 1-voxel-thick components have a width
    cov += np.diag(spacing ** 2 / 12.0)
    eig = np.linalg.eigvalsh(cov)  # ascending
    length = np.sqrt(12.0 * np.maximum(eig[:, 2], 0))   # full length of a uniform rod
    width = np.sqrt(12.0 * np.maximum(eig[:, 1], 1e-12))
    volume = counts * float(np.prod(spacing))
    ball = 4.0 / 3.0 * np.pi * (length / np.sqrt(12.0 / 5.0)) ** 3  # a ball of radius r has length 1.55 r
    fill = volume / np.maximum(ball, 1e-12)
    elongated = (length / width >= min_elongation) | (fill < max_fill)
    keep = (counts >= min_voxels) & (length >= min_length_mm) & elongated
    keep[0] = False
    return keep[labels]


def inpaint_mean_of_neighbours(image: np.ndarray, masked: np.ndarray, valid: np.ndarray,
                               max_iterations: int = 50) -> np.ndarray:
    """Replace ``masked`` voxels by the mean of their known 26-neighbours, peeling thick masks inward.

    Known = ``valid & ~masked`` (so brain voxels only, never the zero background).
    """
    out = image.astype(np.float32, copy=True)
    known = valid & ~masked
    todo = masked.copy()
    for _ in range(max_iterations):
        if not todo.any():
            break
        weight = ndimage.uniform_filter(known.astype(np.float32), size=3, mode="constant")
        total = ndimage.uniform_filter(np.where(known, out, 0.0).astype(np.float32), size=3, mode="constant")
        ready = todo & (weight > 1e-6)
        if not ready.any():
            break
        out[ready] = total[ready] / weight[ready]
        known |= ready
        todo &= ~ready
    if todo.any():  # isolated masked voxels with no known neighbour at all
        out[todo] = float(np.median(out[known])) if known.any() else 0.0
    return out


def suppress_vessels(image: np.ndarray, mask: np.ndarray, spacing_zyx, sigmas_mm=(0.6, 1.0, 1.5),
                     frangi_alpha: float = 0.5, frangi_beta: float = 0.5, min_vesselness: float = 0.1,
                     blob_ratio: float = 0.5, protect_margin_mm: float = 1.0, min_elongation: float = 2.5,
                     min_length_mm: float = 4.0, min_voxels: int = 4,
                     seed: int = 0) -> VesselSuppressionResult:
    """Inpaint bright elongated structures (vessels, sulci) of a CMB-bright image inside ``mask``.

    ``sigmas_mm``: Hessian scales (vessels of ~1-3 mm diameter). ``min_vesselness``: voxels below it never
    enter the k-means. ``blob_ratio``: a voxel whose Hessian eigenvalues are all negative with
    ``|l1| / |l3| >= blob_ratio`` at some scale is blob-like; it and ``protect_margin_mm`` around it are
    protected. Components shorter than ``min_length_mm`` or with ``length / width < min_elongation`` are
    not vessels.
    """
    timings: dict[str, float] = {}
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    empty = np.zeros(image.shape, dtype=bool)
    if mask.sum() < 27:
        return VesselSuppressionResult(image.copy(), empty, timings, empty)

    start = time.perf_counter()
    where = np.nonzero(mask)
    n = len(where[0])
    vesselness = np.zeros(n, dtype=np.float32)
    blob = np.zeros(n, dtype=bool)
    hessians = [_hessian_eigenvalues(image, where, s, spacing) for s in sigmas_mm]
    eigen_per_scale = [h[0] for h in hessians]
    norms = [np.sqrt((e ** 2).sum(axis=1)) for e in eigen_per_scale]
    # Thick slices: a small CMB may occupy one slice, so it is judged on its in-plane shape.
    thick = float(spacing.max()) > 1.5 * float(spacing.min())
    # Frangi's c: half the (robust) maximum Hessian norm, as in the original paper.
    c = max(0.5 * float(np.percentile(np.concatenate(norms), 99.9)), 1e-6)
    for (e, plane), s_norm in zip(hessians, norms):
        l1, l2, l3 = np.abs(e[:, 0]), np.abs(e[:, 1]), np.abs(e[:, 2])
        bright_tube = (e[:, 1] < 0) & (e[:, 2] < 0)
        ra = l2 / np.maximum(l3, 1e-12)
        rb = l1 / np.sqrt(np.maximum(l2 * l3, 1e-24))
        v = ((1 - np.exp(-ra ** 2 / (2 * frangi_alpha ** 2))) * np.exp(-rb ** 2 / (2 * frangi_beta ** 2))
             * (1 - np.exp(-s_norm ** 2 / (2 * c ** 2))))
        vesselness = np.maximum(vesselness, np.where(bright_tube, v, 0).astype(np.float32))
        blob |= (e < 0).all(axis=1) & (l1 >= blob_ratio * l3) & (s_norm > 0.25 * c)
        if thick:
            blob |= ((plane < 0).all(axis=1) & (np.abs(plane[:, 0]) >= blob_ratio * np.abs(plane[:, 1]))
                     & (s_norm > 0.25 * c))
    del hessians, eigen_per_scale, norms
    timings["hessian"] = time.perf_counter() - start

    start = time.perf_counter()
    candidates = vesselness > min_vesselness
    vessel_mask = empty.copy()
    protected = empty.copy()
    protected[tuple(w[blob] for w in where)] = True
    if protect_margin_mm > 0 and protected.any():
        protected = ndimage.distance_transform_edt(~protected, sampling=spacing) <= protect_margin_mm
    if candidates.sum() >= 4:
        cand_where = tuple(w[candidates] for w in where)
        # structure tensor only where it is needed (the candidates), derivative at the finest scale
        st = _structure_tensor_eigenvalues(image, cand_where, spacing, sigmas_mm[0], 2.0 * sigmas_mm[-1])
        timings["structure_tensor"] = time.perf_counter() - start
        start = time.perf_counter()
        total = np.maximum(st.sum(axis=1), 1e-12)
        features = np.stack([vesselness[candidates],
                             (st[:, 1] - st[:, 2]) / total,        # two strong directions: tube
                             (st[:, 0] - st[:, 1]) / total,        # one strong direction: sheet / edge
                             image[cand_where]], axis=1)
        is_vessel = _kmeans_vessel_cluster(features, vesselness[candidates], seed)
        vessel_mask[tuple(w[is_vessel] for w in cand_where)] = True
        timings["kmeans"] = time.perf_counter() - start
    start = time.perf_counter()
    vessel_mask &= ~protected
    if vessel_mask.any():
        # Hysteresis: the k-means cluster holds the strongest vessel voxels; the weaker voxels of the
        # same vessel (candidates connected to them) belong to it too, otherwise a vessel breaks into
        # short pieces that the shape test below would then discard.
        weak = empty.copy()
        weak[tuple(w[candidates] for w in where)] = True
        vessel_mask = ndimage.binary_propagation(vessel_mask, structure=np.ones((3, 3, 3), bool),
                                                 mask=weak & ~protected)
    vessel_mask = _elongated_components(vessel_mask, spacing, min_elongation, min_length_mm, min_voxels)
    if vessel_mask.any():
        # Partial-volume rim: the mask covers the vessel core; one more voxel layer of bright rim
        # (brighter than the local tissue) is added so the inpainting reads real background.
        rim = ndimage.binary_dilation(vessel_mask) & mask & ~protected & ~vessel_mask
        if rim.any():
            tissue = (mask & ~vessel_mask).astype(np.float32)
            size = np.maximum(3, 2 * np.round(2.0 / spacing) + 1).astype(int)  # ~4 mm window
            weight = ndimage.uniform_filter(tissue, size=size, mode="constant")
            local = ndimage.uniform_filter(image * tissue, size=size, mode="constant")
            background = local / np.maximum(weight, 1e-6)
            vessel_mask |= rim & (image > background)
    timings["components"] = time.perf_counter() - start

    start = time.perf_counter()
    result = inpaint_mean_of_neighbours(image, vessel_mask, mask) if vessel_mask.any() else image.copy()
    result[~mask] = image[~mask]
    timings["inpaint"] = time.perf_counter() - start
    return VesselSuppressionResult(result, vessel_mask, timings, protected)
