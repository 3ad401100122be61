"""Acquisition of a synthetic scan: grid, sequence parameters, head pose/shape, bias field and noise.

The scanner grid has an identity LPS direction, array axis 0 = slices (inferior -> superior), and B0 along
that axis. The *head* is rotated (<= 10 degrees), scaled, sheared and smoothly warped relative to it, which
is physically what happens (the subject lies tilted in a scanner whose slices follow B0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

MODALITIES = ("swi", "t2s", "qsm")


@dataclass
class AcquisitionParameters:
    """Everything random about one acquisition (stored in the review JSON for provenance)."""

    modality: str
    spacing_xyz: tuple[float, float, float]   # SimpleITK order (in-plane x, in-plane y, slice)
    shape_zyx: tuple[int, int, int]
    origin_lps: tuple[float, float, float]
    b0_tesla: float
    te_ms: float
    snr: float                                 # white-matter signal / noise sigma on the magnitude
    bias_strength: float                       # std of the log multiplicative bias field
    rotation_deg: tuple[float, float, float]   # head rotation about x, y, z (scanner frame)
    head_scale: tuple[float, float, float]     # anisotropic head size (x, y, z)
    air_artefact: float                        # 0..1 strength of air-tissue susceptibility (shim quality)
    swi_hp_fraction: float = 0.125             # SWI homodyne filter size as a fraction of the matrix
    swi_mask_power: int = 4
    qsm_smoothing_vox: float = 0.6
    qsm_noise_ppm: float = 0.01
    warp: dict = field(default_factory=dict)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return (self.spacing_xyz[2], self.spacing_xyz[1], self.spacing_xyz[0])

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("warp", None)
        return data


def sample_acquisition(rng: np.random.Generator, modality: str, *,
                       in_plane_range_mm: tuple[float, float] = (0.5, 1.0),
                       slice_range_mm: tuple[float, float] = (1.0, 5.0),
                       slice_thickness_mm: float | None = None,
                       fov_mm: tuple[float, float] = (180.0, 216.0),
                       fov_z_range_mm: tuple[float, float] = (100.0, 150.0),
                       max_rotation_deg: float = 10.0,
                       air_artefact_probability: float = 0.5) -> AcquisitionParameters:
    """Random but realistic sequence and grid parameters (1.5 T / 3 T clinical and research SWI / GRE)."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    in_plane = float(rng.uniform(*in_plane_range_mm))
    # Clinical scans often have slightly rectangular pixels (e.g. 0.9 x 0.8 mm).
    in_plane_y = float(np.clip(in_plane * rng.choice([1.0, 1.0, rng.uniform(0.88, 1.12)]),
                               in_plane_range_mm[0], in_plane_range_mm[1]))
    if slice_thickness_mm is not None:
        thickness = float(slice_thickness_mm)
    else:
        # Favour the common clinical/biobank values (1, 1.5, 2, 2.5, 3, 5 mm) but keep a continuum.
        common = np.array([1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0])
        common = common[(common >= slice_range_mm[0]) & (common <= slice_range_mm[1])]
        if common.size and rng.random() < 0.7:
            thickness = float(rng.choice(common))
        else:
            thickness = float(rng.uniform(*slice_range_mm))
    spacing = (round(in_plane, 4), round(in_plane_y, 4), round(thickness, 4))
    fov_z = float(rng.uniform(*fov_z_range_mm))
    shape = (max(8, int(round(fov_z / spacing[2]))), int(round(fov_mm[1] / spacing[1])),
             int(round(fov_mm[0] / spacing[0])))
    # An arbitrary scanner origin, as real files have; the brain sits near the middle of the FOV.
    centre_offset = rng.uniform(-40.0, 40.0, 3)
    origin = tuple(float(round(centre_offset[a] - (shape[2 - a] - 1) / 2.0 * spacing[a], 4))
                   for a in range(3))
    b0 = float(rng.choice([1.5, 3.0], p=[0.35, 0.65]))
    if modality == "t2s":
        te = float(rng.uniform(15.0, 25.0) if b0 > 2 else rng.uniform(20.0, 40.0))
    else:
        te = float(rng.uniform(15.0, 30.0) if b0 > 2 else rng.uniform(25.0, 40.0))
    # Smaller voxels -> lower SNR; clinical SWI WM SNR is ~15-60.
    voxel_volume = spacing[0] * spacing[1] * spacing[2]
    snr = float(rng.uniform(12.0, 35.0) * (voxel_volume / 1.9) ** 0.35 * (b0 / 3.0) ** 0.5)
    return AcquisitionParameters(
        modality=modality, spacing_xyz=spacing, shape_zyx=shape, origin_lps=origin, b0_tesla=b0, te_ms=te,
        snr=float(np.clip(snr, 6.0, 80.0)), bias_strength=float(rng.uniform(0.03, 0.2)),
        rotation_deg=tuple(float(v) for v in rng.uniform(-max_rotation_deg, max_rotation_deg, 3)),
        head_scale=tuple(float(v) for v in rng.uniform(0.9, 1.08, 3) * rng.uniform(0.95, 1.05)),
        air_artefact=float(rng.uniform(0.4, 1.0) if rng.random() < air_artefact_probability
                           else rng.uniform(0.0, 0.2)),
        swi_hp_fraction=float(rng.uniform(0.08, 0.16)),
        qsm_smoothing_vox=float(rng.uniform(0.4, 0.9)),
        qsm_noise_ppm=float(rng.uniform(0.005, 0.02)),
    )


def rotation_matrix(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation about x, then y, then z (scanner LPS frame)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class SubjectTransform:
    """Maps scanner LPS mm <-> head (anatomy) LPS mm: rotation, anisotropic scale and a smooth warp.

    ``head = head_centre + inverse_linear @ (scanner - scanner_centre) + warp(scanner)``; the warp is a sum
    of a few separable low-frequency products, cheap to evaluate on a whole grid by broadcasting.
    """

    linear: np.ndarray              # head -> scanner 3x3
    head_centre: np.ndarray         # LPS mm in head space
    scanner_centre: np.ndarray      # LPS mm in scanner space
    warp_amplitude: np.ndarray      # (3 components, M modes) mm
    warp_frequency: np.ndarray      # (3 components, M modes, 3 axes) cycles per mm
    warp_phase: np.ndarray          # (3 components, M modes, 3 axes)

    @property
    def inverse_linear(self) -> np.ndarray:
        return np.linalg.inv(self.linear)

    def b0_direction_head(self) -> np.ndarray:
        """B0 (scanner z) expressed in head coordinates, unit vector (x, y, z)."""
        vector = self.inverse_linear @ np.array([0.0, 0.0, 1.0])
        return vector / np.linalg.norm(vector)

    def _warp_points(self, scanner: np.ndarray) -> np.ndarray:
        rel = scanner - self.scanner_centre
        out = np.zeros_like(rel)
        for c in range(3):
            for m in range(self.warp_amplitude.shape[1]):
                term = np.full(rel.shape[0], self.warp_amplitude[c, m])
                for a in range(3):
                    term = term * np.cos(2 * np.pi * self.warp_frequency[c, m, a] * rel[:, a]
                                         + self.warp_phase[c, m, a])
                out[:, c] += term
        return out

    def scanner_to_head(self, scanner: np.ndarray) -> np.ndarray:
        scanner = np.atleast_2d(np.asarray(scanner, dtype=float))
        return (self.head_centre + (scanner - self.scanner_centre) @ self.inverse_linear.T
                + self._warp_points(scanner))

    def head_to_scanner(self, head: np.ndarray) -> np.ndarray:
        """Inverse by fixed-point iteration (the warp is small and smooth, so this converges fast)."""
        head = np.atleast_2d(np.asarray(head, dtype=float))
        scanner = self.scanner_centre + (head - self.head_centre) @ self.linear.T
        for _ in range(6):
            unwarped = head - self.head_centre - self._warp_points(scanner)
            scanner = self.scanner_centre + unwarped @ self.linear.T
        return scanner

    def head_coordinates_on_grid(self, origin_lps, spacing_xyz, shape_zyx) -> list[np.ndarray]:
        """Head LPS mm (x, y, z arrays, each ``shape_zyx``) of every voxel centre of the scanner grid."""
        axes = [origin_lps[a] + spacing_xyz[a] * np.arange(shape_zyx[2 - a]) - self.scanner_centre[a]
                for a in range(3)]
        # Broadcast shapes: x varies along axis 2, y along axis 1, z along axis 0.
        views = [axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None]]
        inv = self.inverse_linear
        out = []
        for c in range(3):
            value = (self.head_centre[c] + inv[c, 0] * views[0] + inv[c, 1] * views[1]
                     + inv[c, 2] * views[2]).astype(np.float32)
            for m in range(self.warp_amplitude.shape[1]):
                term = np.float32(self.warp_amplitude[c, m])
                for a in range(3):
                    term = term * np.cos(2 * np.pi * self.warp_frequency[c, m, a] * views[a]
                                         + self.warp_phase[c, m, a]).astype(np.float32)
                value = value + term
            out.append(np.broadcast_to(value, shape_zyx))
        return out


def sample_subject_transform(rng: np.random.Generator, acquisition: AcquisitionParameters,
                             head_centre_lps: np.ndarray, warp_mm: float = 2.5) -> SubjectTransform:
    shear = np.eye(3) + np.triu(rng.normal(0.0, 0.03, (3, 3)), 1)
    linear = rotation_matrix(acquisition.rotation_deg) @ np.diag(acquisition.head_scale) @ shear
    spacing = np.array(acquisition.spacing_xyz)
    shape_xyz = np.array(acquisition.shape_zyx[::-1])
    grid_centre = np.array(acquisition.origin_lps) + (shape_xyz - 1) / 2.0 * spacing
    scanner_centre = grid_centre + np.array([rng.normal(0, 3), rng.normal(0, 3), rng.normal(0, 4)])
    modes = 2
    return SubjectTransform(
        linear=linear, head_centre=np.asarray(head_centre_lps, dtype=float), scanner_centre=scanner_centre,
        warp_amplitude=rng.normal(0.0, warp_mm / np.sqrt(modes), (3, modes)),
        warp_frequency=rng.uniform(1 / 260.0, 1 / 90.0, (3, modes, 3)),
        warp_phase=rng.uniform(0, 2 * np.pi, (3, modes, 3)))


def bias_field(rng: np.random.Generator, shape_zyx: tuple[int, int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative receive-coil bias (exp of a low-order random field, mean ~1)."""
    grids = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape_zyx]
    z, y, x = grids[0][:, None, None], grids[1][None, :, None], grids[2][None, None, :]
    log_field = np.zeros(shape_zyx, np.float32)
    for _ in range(4):
        fz, fy, fx = rng.uniform(0.2, 1.2, 3)
        pz, py, px = rng.uniform(0, 2 * np.pi, 3)
        log_field += (np.cos(np.pi * fz * z + pz) * np.cos(np.pi * fy * y + py)
                      * np.cos(np.pi * fx * x + px)).astype(np.float32)
    log_field *= np.float32(strength / max(float(log_field.std()), 1e-6))
    return np.exp(log_field)


def add_complex_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Independent Gaussian noise on the real and imaginary channels: the magnitude becomes Rician."""
    noise = rng.standard_normal(signal.shape, dtype=np.float32) + 1j * rng.standard_normal(signal.shape,
                                                                                          dtype=np.float32)
    return (signal + np.float32(sigma) * noise).astype(np.complex64)
