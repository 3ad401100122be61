"""Physical forward model of a gradient-echo scan: susceptibility -> field -> complex signal -> SWI/T2*/QSM.

Conventions: susceptibility ``chi`` in ppm (SI), field perturbation ``dB/B0`` in ppm, Lorentz-corrected
dipole model ``dB/B0 = IFFT[(1/3 - (k.b)^2/|k|^2) FFT[chi]]``. Phase ``phi = -gamma B0 TE dB/B0`` (the
common SWI display convention: paramagnetic veins and CMBs give *negative* phase where the field rises).

Extended sources use that FFT; spheres (CMBs, calcifications) and tubes (veins) use the exact analytic
solutions of the same equation, evaluated on sub-voxel samples and averaged **as complex numbers** over
each voxel: intravoxel dephasing is what makes a 1 mm CMB "bloom" to 2-3x its size on SWI/T2*, and what
makes thick slices lose more signal.
"""

from __future__ import annotations

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage

GAMMA_HZ_PER_T = 42.577478e6


def radians_per_ppm(b0_tesla: float, te_ms: float) -> float:
    """Phase accrued at echo time ``te_ms`` per ppm of field perturbation."""
    return 2.0 * np.pi * GAMMA_HZ_PER_T * b0_tesla * 1e-6 * te_ms * 1e-3


def dipole_kernel(shape: tuple[int, int, int], spacing_zyx: tuple[float, float, float],
                  b0_zyx: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> np.ndarray:
    """Unit dipole kernel ``1/3 - (k.b)^2/|k|^2`` in ``rfftn`` layout (k = 0 set to 0)."""
    b = np.asarray(b0_zyx, dtype=float)
    b = b / np.linalg.norm(b)
    kz = sp_fft.fftfreq(shape[0], spacing_zyx[0])[:, None, None]
    ky = sp_fft.fftfreq(shape[1], spacing_zyx[1])[None, :, None]
    kx = sp_fft.rfftfreq(shape[2], spacing_zyx[2])[None, None, :]
    k2 = kz ** 2 + ky ** 2 + kx ** 2
    kb = kz * b[0] + ky * b[1] + kx * b[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = 1.0 / 3.0 - kb ** 2 / k2
    kernel[0, 0, 0] = 0.0
    return kernel.astype(np.float32)


def field_from_chi(chi: np.ndarray, spacing_zyx: tuple[float, float, float],
                   b0_zyx: tuple[float, float, float] = (1.0, 0.0, 0.0), pad_fraction: float = 0.25
                   ) -> np.ndarray:
    """Field perturbation (ppm) of a susceptibility map by FFT, zero-padded to limit wrap-around."""
    pads = [int(np.ceil(n * pad_fraction)) for n in chi.shape]
    shape = tuple(sp_fft.next_fast_len(n + 2 * p, real=True) for n, p in zip(chi.shape, pads))
    padded = np.zeros(shape, np.float32)
    # The mean is removed so the zero padding does not act as a large susceptibility step at the box edge.
    mean = float(chi.mean())
    padded[pads[0]:pads[0] + chi.shape[0], pads[1]:pads[1] + chi.shape[1],
           pads[2]:pads[2] + chi.shape[2]] = chi - mean
    spectrum = sp_fft.rfftn(padded, workers=-1)
    spectrum *= dipole_kernel(shape, spacing_zyx, b0_zyx)
    field = sp_fft.irfftn(spectrum, s=shape, workers=-1)
    return field[pads[0]:pads[0] + chi.shape[0], pads[1]:pads[1] + chi.shape[1],
                 pads[2]:pads[2] + chi.shape[2]].astype(np.float32)


def sphere_field_ppm(offsets_zyx: np.ndarray, radius_mm: float, delta_chi_ppm: float,
                     b0_zyx: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> np.ndarray:
    """Exact field of a uniformly magnetised sphere (Lorentz-corrected: 0 inside).

    ``offsets_zyx``: (..., 3) millimetres from the sphere centre.
    """
    b = np.asarray(b0_zyx, dtype=np.float32)
    b = b / np.linalg.norm(b)
    r2 = np.sum(offsets_zyx ** 2, axis=-1)
    r2 = np.maximum(r2, 1e-12)
    cos2 = (offsets_zyx @ b) ** 2 / r2
    field = delta_chi_ppm / 3.0 * radius_mm ** 3 / r2 ** 1.5 * (3.0 * cos2 - 1.0)
    return np.where(r2 <= radius_mm ** 2, 0.0, field).astype(np.float32)


def cylinder_field_ppm(r_vectors: np.ndarray, tangents: np.ndarray, radius_mm: np.ndarray,
                       delta_chi_ppm: np.ndarray, b0_zyx: tuple[float, float, float] = (1.0, 0.0, 0.0)
                       ) -> np.ndarray:
    """Exact field of an infinite cylinder, per point.

    ``r_vectors`` (N, 3): perpendicular vectors from the axis; ``tangents`` (N, 3) unit axis directions.
    Inside ``dchi/6 (3 cos^2 theta - 1)``; outside ``dchi/2 (a/r)^2 sin^2 theta cos 2 psi``, written here as
    ``dchi/2 (a/r)^2 (2 (r_hat.b)^2 - sin^2 theta)`` (theta: axis to B0, psi: r to B0's projection).
    """
    b = np.asarray(b0_zyx, dtype=np.float32)
    b = b / np.linalg.norm(b)
    cos_theta = tangents @ b
    sin2 = 1.0 - cos_theta ** 2
    r2 = np.maximum(np.sum(r_vectors ** 2, axis=-1), 1e-12)
    rb2 = (r_vectors @ b) ** 2 / r2
    a2 = radius_mm ** 2
    outside = delta_chi_ppm / 2.0 * a2 / r2 * (2.0 * rb2 - sin2)
    inside = delta_chi_ppm / 6.0 * (3.0 * cos_theta ** 2 - 1.0)
    return np.where(r2 <= a2, inside, outside).astype(np.float32)


def subvoxel_offsets(spacing_zyx: tuple[float, float, float], counts_zyx: tuple[int, int, int]) -> np.ndarray:
    """(S, 3) offsets (mm) of a regular sub-sampling of one voxel, centred on the voxel centre."""
    axes = [((np.arange(n) + 0.5) / n - 0.5) * s for n, s in zip(counts_zyx, spacing_zyx)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1).astype(np.float32)


def render_sphere(shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float],
                  centre_kji: np.ndarray, radius_mm: float, delta_chi_ppm: float, delta_r2s: float,
                  te_ms: float, rad_per_ppm: float, b0_zyx=(1.0, 0.0, 0.0), max_box_mm: float = 30.0,
                  sub_step_mm: float = 0.3) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]:
    """Voxel-averaged complex signal factor and volume fraction of one sphere, in a box around it.

    Returns ``(box, factor, fraction)``: multiply the background complex signal by ``factor`` (1 far away),
    add ``fraction * delta_chi`` to the susceptibility map. The box extends until the dipole phase drops
    below ~0.1 rad, so blooming is complete. Voxels near the sphere are sampled finely (the phase varies
    within them); far ones only along the slice direction, where thick slices integrate the field.
    """
    spacing = np.asarray(spacing_zyx, dtype=float)
    diag = float(np.linalg.norm(spacing))
    surface_phase = abs(rad_per_ppm * delta_chi_ppm) * 2.0 / 3.0
    reach = radius_mm * max(1.5, (surface_phase / 0.1) ** (1.0 / 3.0)) + float(spacing.max())
    reach = min(reach, max(max_box_mm, radius_mm + 2 * float(spacing.max())))
    centre = np.asarray(centre_kji, dtype=float)
    lo = np.maximum(np.floor(centre - reach / spacing).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach / spacing).astype(int) + 1, np.array(shape_zyx))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    if np.any(hi <= lo):
        return box, np.ones((0, 0, 0), np.complex64), np.zeros((0, 0, 0), np.float32)
    box_shape = tuple(int(b - a) for a, b in zip(lo, hi))
    kk, jj, ii = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    centres = ((np.stack([kk, jj, ii], axis=-1).reshape(-1, 3) - centre) * spacing).astype(np.float32)
    distance = np.linalg.norm(centres, axis=1)
    factor = np.ones(centres.shape[0], np.complex64)
    fraction = np.zeros(centres.shape[0], np.float32)
    decay = np.float32(np.exp(-delta_r2s * te_ms * 1e-3))
    step = min(sub_step_mm, radius_mm / 2.5)
    near_counts = tuple(int(np.clip(np.ceil(s / step), 1, 24)) for s in spacing)
    far_counts = (int(np.clip(np.ceil(spacing[0] / 0.5), 1, 12)), 1, 1)
    near = distance <= 2.5 * radius_mm + diag
    for selection, counts in ((near, near_counts), (~near & (distance <= reach), far_counts)):
        ids = np.flatnonzero(selection)
        if ids.size == 0:
            continue
        offsets = subvoxel_offsets(tuple(spacing), counts)
        chunk = max(1, 400_000 // offsets.shape[0])
        for start in range(0, ids.size, chunk):
            part = ids[start:start + chunk]
            points = centres[part][:, None, :] + offsets[None]
            field = sphere_field_ppm(points, radius_mm, delta_chi_ppm, b0_zyx)
            inside = np.sum(points ** 2, axis=-1) <= radius_mm ** 2
            magnitude = np.where(inside, decay, np.float32(1.0))
            factor[part] = (magnitude * np.exp(-1j * rad_per_ppm * field)).mean(axis=1)
            fraction[part] = inside.mean(axis=1)
    return box, factor.reshape(box_shape), fraction.reshape(box_shape)


def swi_phase_mask(phase: np.ndarray, power: int = 4) -> np.ndarray:
    """Haacke's negative-phase mask: 1 for phi >= 0, (1 + phi/pi) for -pi < phi < 0, raised to ``power``."""
    mask = np.clip(1.0 + phase / np.pi, 0.0, 1.0)
    return (mask ** power).astype(np.float32)


def highpass_phase(signal: np.ndarray, fraction: float = 0.125) -> np.ndarray:
    """Homodyne high-pass phase, slice by slice: ``angle(S / lowpass(S))`` with a Hann k-space window.

    ``fraction`` is the filter size relative to the in-plane matrix (e.g. 32 of 256 = 0.125), as on the
    scanner; it removes the slowly varying background field (air-tissue, coil) but keeps veins and CMBs.
    """
    ny, nx = signal.shape[1:]
    wy = max(3, int(round(ny * fraction)))
    wx = max(3, int(round(nx * fraction)))
    window = np.zeros((ny, nx), np.float32)
    hann = np.outer(np.hanning(wy), np.hanning(wx)).astype(np.float32)
    window[:wy, :wx] = hann
    window = np.roll(window, (-(wy // 2), -(wx // 2)), axis=(0, 1))
    spectrum = sp_fft.fft2(signal, axes=(1, 2), workers=-1)
    lowpass = sp_fft.ifft2(spectrum * window[None], axes=(1, 2), workers=-1)
    return np.angle(signal * np.conj(lowpass)).astype(np.float32)


def swi_from_complex(signal: np.ndarray, power: int = 4, fraction: float = 0.125) -> np.ndarray:
    """SWI = magnitude x (negative phase mask)^power."""
    return (np.abs(signal) * swi_phase_mask(highpass_phase(signal, fraction), power)).astype(np.float32)


def qsm_from_chi(chi: np.ndarray, brain: np.ndarray, smoothing_vox: float, noise_ppm: float,
                 rng: np.random.Generator, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """A QSM-like map: the true susceptibility, smoothed (dipole inversion regularisation), noisy, masked.

    Real QSM pipelines erode the brain mask and reference the map to a tissue mean; both are mimicked.
    """
    in_plane = min(spacing_zyx[1:])
    sigma = [smoothing_vox * min(1.0, in_plane / s) for s in spacing_zyx]
    smooth = ndimage.gaussian_filter(chi.astype(np.float32), sigma)
    noise = ndimage.gaussian_filter(rng.standard_normal(chi.shape, dtype=np.float32), 0.6)
    noise *= np.float32(noise_ppm / max(float(noise.std()), 1e-9))
    qsm = smooth + noise
    qsm -= np.float32(np.median(qsm[brain])) if brain.any() else np.float32(0)
    return np.where(brain, qsm, 0.0).astype(np.float32)
