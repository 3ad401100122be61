"""3D fast radial symmetry transform (Loy & Zelinsky 2002/2003) [paper 2.2], spacing-aware.

Every voxel with a significant gradient votes for the voxel ``n`` mm away along (bright polarity) or
against (dark polarity) its gradient: the centre of a round blob of radius ``n`` collects votes from its
whole surface, the axis of a tube only from a ring, an edge from nobody in particular. Votes are counted
(orientation projection ``O_n``) and gradient magnitudes summed (magnitude projection ``M_n``) with
``np.bincount``; ``F_n = (M_n / k_n) * (|O~_n| / k_n) ** alpha`` is smoothed by a Gaussian and averaged over
the radii.

Anisotropic voxels: gradients are taken in mm, radii given in voxels of the finest axis are converted to mm,
and each vote's displacement is converted back to voxels per axis, so a physically round blob on a
0.8 x 0.8 x 3 mm grid gets the same response as on an isotropic one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Fraction of the ideal number of votes (a full sphere surface) at which the orientation term saturates.
_SATURATION = 0.5
#: Lower bound of the normalisation scale (1/mm of the normalised intensity): in a scan without any
#: round structure the 99.9th percentile is just noise, and dividing by it would make noise look like CMBs.
_MIN_SCALE = 0.02


def _vote_normaliser(radius_mm: float, spacing_zyx: np.ndarray) -> float:
    """``k_n``: about half the number of voxels on a sphere of ``radius_mm`` (3D analogue of Loy's 9.9).

    In 2D Loy & Zelinsky saturate ``O_n`` at a constant; in 3D the votes a centre can receive grow with the
    surface (``4 pi n^2`` voxels), so a constant would saturate for every radius and lose the
    sphere-versus-tube contrast (a tube's axis voxel gets only ``~2 pi n`` votes).
    """
    voxel_area = float(np.prod(spacing_zyx)) ** (2.0 / 3.0)
    return max(8.0, _SATURATION * 4.0 * np.pi * radius_mm ** 2 / voxel_area)


def frst_3d(image: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0), radii=(2, 3, 4, 6), alpha: float = 2.0,
            beta: float = 0.1, polarity: str = "bright", normalise: str | None = "robust",
            mask: np.ndarray | None = None) -> np.ndarray:
    """Mean FRST over ``radii`` (voxels of the finest axis); float32, same shape as ``image``.

    ``polarity="bright"`` responds to bright round blobs (the preprocessed, CMB-bright image), ``"dark"``
    to dark ones (a raw SWI). ``beta``: gradients below ``beta * max |g|`` do not vote.

    ``normalise``:
      * ``"robust"`` (default): divided by ``max(P99.9, 0.02)`` where P99.9 is the 99.9th percentile of the
        response inside ``mask`` (or the non-zero voxels of ``image``), then clipped to [0, 1]. The
        percentile makes the channel comparable between scans; the floor keeps noise in a scan
        without round structures from being stretched to 1.
      * ``None``: the raw mean response (units: intensity / mm).
    """
    if polarity not in ("bright", "dark"):
        raise ValueError(f"polarity must be 'bright' or 'dark', got {polarity!r}")
    image = np.asarray(image, dtype=np.float32)
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    shape = image.shape
    # Gradient in intensity per mm along each array axis.
    gradients = np.gradient(image, *spacing)
    magnitude = np.sqrt(sum(g.astype(np.float32) ** 2 for g in gradients))
    g_max = float(magnitude.max())
    result = np.zeros(shape, dtype=np.float32)
    if g_max <= 0:
        return result
    voting = magnitude > beta * g_max
    points = np.nonzero(voting)
    mag = magnitude[voting]
    sign = 1.0 if polarity == "bright" else -1.0
    # Unit direction in physical space, then mm -> voxels per axis.
    steps = [sign * g[voting] / mag / s for g, s in zip(gradients, spacing)]
    del gradients
    finest = float(spacing.min())
    size = int(np.prod(shape))
    for n in radii:
        radius_mm = float(n) * finest
        flat = np.zeros(mag.shape, dtype=np.int64)
        inside = np.ones(mag.shape, dtype=bool)
        for axis in range(3):
            target = points[axis] + np.rint(radius_mm * steps[axis]).astype(np.int64)
            inside &= (target >= 0) & (target < shape[axis])
            flat = flat * shape[axis] + np.clip(target, 0, shape[axis] - 1)
        flat = flat[inside]
        orientation = np.bincount(flat, minlength=size).astype(np.float32).reshape(shape)
        magnitude_projection = np.bincount(flat, weights=mag[inside], minlength=size).astype(np.float32)
        magnitude_projection = magnitude_projection.reshape(shape)
        k_n = _vote_normaliser(radius_mm, spacing)
        orientation = np.minimum(orientation, k_n) / k_n
        f_n = (magnitude_projection / k_n) * orientation ** alpha
        sigma = 0.25 * radius_mm / spacing
        result += ndimage.gaussian_filter(f_n, sigma=sigma, mode="constant")
    result /= len(radii)
    if normalise is None:
        return result
    if normalise != "robust":
        raise ValueError(f"normalise must be 'robust' or None, got {normalise!r}")
    region = np.asarray(mask, dtype=bool) if mask is not None else image != 0
    values = result[region] if region.any() else result.ravel()
    scale = max(float(np.percentile(values, 99.9)), _MIN_SCALE)
    return np.clip(result / scale, 0.0, 1.0).astype(np.float32)
