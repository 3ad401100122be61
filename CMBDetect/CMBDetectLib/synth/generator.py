"""One synthetic SWI / T2*-GRE / QSM case with ground truth: :func:`generate_case`.

Pipeline (each step in its own module):
1. ``acquisition``: grid (0.5-1 mm in-plane, 1-5 mm slices), B0, TE, SNR, head pose and shape.
2. ``anatomy``: tissue fractions, deep nuclei, CMB regions (MNI152 template via nilearn, or procedural).
3. ``susceptibility``: PD / R2* / chi maps of the head incl. skull, scalp and air cavities.
4. ``signal``: background field by FFT dipole convolution; complex GRE signal on the head grid, averaged
   over the slice profile, resampled to the scanner grid through the head transform.
5. ``vessels`` / ``cmbs`` / ``mimics``: exact analytic fields of tubes and spheres, sub-voxel averaged
   complex factors (blooming, partial volume) multiplied into the signal; their chi added for QSM.
6. Bias field, complex Gaussian noise (Rician magnitude), then SWI (phase mask^4) / T2* / QSM.

Same ``(seed, index)`` -> bit-identical arrays; every random draw comes from one ``numpy.random.Generator``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from CMBDetectLib.synth.acquisition import (
    AcquisitionParameters,
    SubjectTransform,
    add_complex_noise,
    bias_field,
    sample_acquisition,
    sample_subject_transform,
)
from CMBDetectLib.synth.anatomy import REGION_GROUPS, Anatomy, build_anatomy
from CMBDetectLib.synth.cmbs import (
    CMBSpec,
    PlacedCMB,
    place_cmbs,
    sample_cmb_count,
    sample_radius,
    visible_label,
)
from CMBDetectLib.synth.mimics import Mimic, place_mimics
from CMBDetectLib.synth.signal import (
    field_from_chi,
    qsm_from_chi,
    radians_per_ppm,
    render_sphere,
    swi_from_complex,
)
from CMBDetectLib.synth.susceptibility import head_property_maps, r2s_at_field, sample_tissue_properties
from CMBDetectLib.synth.vessels import generate_vessels, render_vessels, through_plane_segments
from CMBDetectLib.volume import Volume

GENERATOR_VERSION = "1"


@dataclass
class SynthConfig:
    """Generator settings (what a dataset's review JSON records as ``generator.config``)."""

    anatomy: str = "auto"                                  # "auto" | "template" | "procedural"
    in_plane_range_mm: tuple[float, float] = (0.5, 1.0)
    slice_range_mm: tuple[float, float] = (1.0, 5.0)
    slice_thickness_mm: float | None = None
    fov_mm: tuple[float, float] = (180.0, 216.0)
    fov_z_range_mm: tuple[float, float] = (100.0, 150.0)
    min_cmbs: int = 0
    max_cmbs: int = 60
    p_no_cmbs: float = 0.3
    min_radius_mm: float = 1.0
    max_radius_mm: float = 5.0
    radius_mean_mm: float = 1.5                            # log-normal radius prior (cmbs.sample_radius)
    radius_sd_mm: float = 0.45
    p_touch_vessel: float = 0.15
    vessel_density: float = 1.0
    calcification_rate: float = 1.0
    iron_rate: float = 1.0
    max_rotation_deg: float = 10.0
    air_artefact_probability: float = 0.5
    head_spacing_mm: float | None = None                   # anatomy grid (template 1.0, procedural 1.25)
    label_threshold: float = 0.5                           # visible signal below which a voxel is CMB

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}


@dataclass
class CMBRecord:
    id: int
    centre_ras: tuple[float, float, float]
    centre_kji: tuple[float, float, float]
    radius_mm: float
    region: str
    region_group: str
    chi_ppm: float
    touches_vessel: bool
    volume_voxels: int
    volume_mm3: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MimicRecord:
    kind: str                 # "calcification" | "vein" | "iron"
    site: str
    centre_ras: tuple[float, float, float]
    centre_kji: tuple[float, float, float]
    radius_mm: float
    chi_ppm: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SyntheticCase:
    seed: int
    index: int
    modality: str
    image: Volume
    label: Volume              # uint8 binary
    instances: Volume          # uint16, k = CMB k
    brain_mask: Volume         # uint8
    cmbs: list[CMBRecord]
    mimics: list[MimicRecord]
    parameters: dict           # acquisition, tissue, anatomy, config (JSON-serialisable, deterministic)
    timings: dict[str, float] = field(default_factory=dict)


def case_rng(seed: int, index: int = 0) -> np.random.Generator:
    """The random stream of case ``index`` of a dataset generated with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _box_kernel(width_vox: float) -> np.ndarray:
    """Weights of a box of ``width_vox`` voxels sampled on unit bins (fractional edges)."""
    half = width_vox / 2.0
    n = int(np.ceil(half - 0.5))
    centres = np.arange(-n, n + 1, dtype=float)
    weights = np.clip(np.minimum(centres + 0.5, half) - np.maximum(centres - 0.5, -half), 0, None)
    return (weights / weights.sum()).astype(np.float32)


def _resample_to_scanner(volume: np.ndarray, anatomy: Anatomy, head_xyz: list[np.ndarray],
                         cval: float = 0.0) -> np.ndarray:
    coordinates = [(head_xyz[2] - anatomy.origin_lps[2]) / anatomy.spacing,
                   (head_xyz[1] - anatomy.origin_lps[1]) / anatomy.spacing,
                   (head_xyz[0] - anatomy.origin_lps[0]) / anatomy.spacing]
    return ndimage.map_coordinates(volume, coordinates, order=1, mode="constant", cval=cval,
                                   prefilter=False, output=np.float32)


def _interpolate_between_grids(values: np.ndarray, source: Anatomy, target: Anatomy) -> np.ndarray:
    """Separable linear interpolation between two axis-aligned isotropic grids (cheap: three 1D passes)."""
    out = values.astype(np.float32)
    for axis in range(3):
        xyz = 2 - axis
        positions = (target.origin_lps[xyz] + target.spacing * np.arange(target.shape[axis])
                     - source.origin_lps[xyz]) / source.spacing
        positions = np.clip(positions, 0, values.shape[axis] - 1)
        lo = np.minimum(np.floor(positions).astype(int), values.shape[axis] - 2)
        weight = (positions - lo).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = -1
        weight = weight.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - weight) + np.take(out, lo + 1, axis=axis) * weight
    return out


def _shim(field_ppm: np.ndarray, brain: np.ndarray, quality: float) -> np.ndarray:
    """Subtract (``quality`` x) the 2nd-order polynomial fit of the field over the brain, as the scanner's
    shim does: what remains are the local air-tissue gradients at the skull base, not a global ramp."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in field_ppm.shape]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    terms = [np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z]
    inside = brain.ravel()
    if inside.sum() < 20:
        return field_ppm
    design = np.stack([t.ravel()[inside] for t in terms], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, field_ppm.ravel()[inside], rcond=None)
    fit = sum(c * t for c, t in zip(coefficients, terms))
    return (field_ppm - quality * fit).astype(np.float32)


def _fov_crop(anatomy: Anatomy, transform: SubjectTransform, grid: _Grid, margin_mm: float) -> Anatomy:
    """The part of the head grid that the scanner grid samples (its corners mapped to head space)."""
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=float)
    extent = (np.array(grid.shape[::-1]) - 1) * grid.spacing_xyz
    head = transform.scanner_to_head(grid.origin + corners * extent)
    lo = anatomy.lps_to_index(head.min(axis=0) - margin_mm)[0]
    hi = anatomy.lps_to_index(head.max(axis=0) + margin_mm)[0]
    return anatomy.crop(np.floor(lo).astype(int), np.ceil(hi).astype(int) + 1)


def _round3(values) -> tuple[float, float, float]:
    return tuple(round(float(v), 4) for v in values)  # type: ignore[return-value]


class _Grid:
    """The scanner grid: identity LPS direction, ``[k, j, i]`` arrays."""

    def __init__(self, acquisition: AcquisitionParameters):
        self.origin = np.asarray(acquisition.origin_lps, dtype=float)
        self.spacing_xyz = np.asarray(acquisition.spacing_xyz, dtype=float)
        self.shape = tuple(acquisition.shape_zyx)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.spacing_xyz[::-1])  # type: ignore[return-value]

    def scanner_to_kji(self, points: np.ndarray) -> np.ndarray:
        points = np.atleast_2d(points)
        return ((points - self.origin) / self.spacing_xyz)[:, ::-1]

    def kji_to_ras(self, kji: np.ndarray) -> np.ndarray:
        kji = np.atleast_2d(kji)
        lps = kji[:, ::-1] * self.spacing_xyz + self.origin
        return lps * np.array([-1.0, -1.0, 1.0])

    def fits(self, scanner: np.ndarray, radius: float) -> bool:
        kji = self.scanner_to_kji(scanner)[0]
        margin = np.array([max(1.0, (radius + 1.0) / self.spacing_xyz[2]),
                           (radius + 4.0) / self.spacing_xyz[1], (radius + 4.0) / self.spacing_xyz[0]])
        return bool(np.all(kji >= margin) and np.all(kji <= np.array(self.shape) - 1 - margin))

    def volume(self, array: np.ndarray) -> Volume:
        return Volume(array, tuple(float(v) for v in self.spacing_xyz), tuple(float(v) for v in self.origin))


def generate_case(seed: int, modality: str = "swi", *, index: int = 0, config: SynthConfig | None = None,
                  cmbs: list[CMBSpec] | None = None, n_cmbs: int | None = None) -> SyntheticCase:
    """Generate one synthetic scan with its CMB ground truth and mimic list.

    ``cmbs`` requests specific lesions (radius / region / position, others drawn from the priors);
    ``n_cmbs`` requests a count; otherwise the count follows the priors within ``config.min/max_cmbs``.
    """
    config = config or SynthConfig()
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def tick(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now

    rng = case_rng(seed, index)
    acquisition = sample_acquisition(
        rng, modality, in_plane_range_mm=config.in_plane_range_mm, slice_range_mm=config.slice_range_mm,
        slice_thickness_mm=config.slice_thickness_mm, fov_mm=config.fov_mm,
        fov_z_range_mm=config.fov_z_range_mm, max_rotation_deg=config.max_rotation_deg,
        air_artefact_probability=config.air_artefact_probability)
    anatomy = build_anatomy(rng, config.anatomy, config.head_spacing_mm)
    props = sample_tissue_properties(rng)
    transform = sample_subject_transform(rng, acquisition, anatomy.brain_centre_lps())
    grid = _Grid(acquisition)
    tick("setup")

    # --- background: head-grid maps -> field (FFT, 2x coarser: it is smooth) -> complex signal ---------
    # The field needs the whole head (air-tissue interfaces far from the slab matter) but is smooth: it is
    # computed at twice the anatomy spacing; the signal only on the part of the head the slab covers.
    coarse = anatomy.downsampled()
    coarse_maps = head_property_maps(coarse, props, acquisition.b0_tesla, acquisition.air_artefact)
    b0_head = transform.b0_direction_head()
    b0_head_zyx = (float(b0_head[2]), float(b0_head[1]), float(b0_head[0]))
    field_coarse = field_from_chi(coarse_maps.chi_field, (coarse.spacing,) * 3, b0_head_zyx)
    field_coarse = _shim(field_coarse, coarse.brain, float(rng.uniform(0.85, 1.0)))
    del coarse_maps
    anatomy_full = anatomy
    anatomy = _fov_crop(anatomy_full, transform, grid, margin_mm=acquisition.spacing_xyz[2] + 8.0)
    maps = head_property_maps(anatomy, props, acquisition.b0_tesla, acquisition.air_artefact)
    field_ppm = _interpolate_between_grids(field_coarse, coarse, anatomy)
    rad_per_ppm = radians_per_ppm(acquisition.b0_tesla, acquisition.te_ms)
    te_s = acquisition.te_ms * 1e-3
    tick("field")
    head_xyz = transform.head_coordinates_on_grid(grid.origin, grid.spacing_xyz, grid.shape)
    slice_kernel = _box_kernel(acquisition.spacing_xyz[2] / anatomy.spacing)
    # The brain mask is smooth at the scale of a voxel: sample it on every other in-plane voxel.
    brain_half = _resample_to_scanner(ndimage.correlate1d(maps.brain, slice_kernel, axis=0, mode="constant"),
                                      anatomy, [c[:, ::2, ::2] for c in head_xyz])
    brain_fraction = np.repeat(np.repeat(brain_half, 2, axis=1), 2, axis=2)
    brain_fraction = brain_fraction[:, : grid.shape[1], : grid.shape[2]]
    if modality == "qsm":
        chi_head = ndimage.correlate1d(maps.chi, slice_kernel, axis=0, mode="constant")
        chi = _resample_to_scanner(chi_head, anatomy, head_xyz)
        signal = None
    else:
        magnitude = maps.pd * np.exp(-te_s * maps.r2s)
        phase = (-rad_per_ppm * field_ppm).astype(np.float32)
        real = ndimage.correlate1d(magnitude * np.cos(phase), slice_kernel, axis=0, mode="constant")
        imag = ndimage.correlate1d(magnitude * np.sin(phase), slice_kernel, axis=0, mode="constant")
        signal = (_resample_to_scanner(real, anatomy, head_xyz)
                  + 1j * _resample_to_scanner(imag, anatomy, head_xyz)).astype(np.complex64)
        chi = None
    del head_xyz
    tick("background")

    # --- veins ------------------------------------------------------------------------------------------
    anatomy = anatomy_full
    vessels = generate_vessels(anatomy, rng, config.vessel_density)
    # One transform call for all centreline points (the inverse warp iterates).
    all_points = transform.head_to_scanner(np.concatenate([v.points for v in vessels])) if vessels \
        else np.zeros((0, 3))
    splits = np.cumsum([len(v.points) for v in vessels])[:-1]
    vessels_kji = [(grid.scanner_to_kji(points), v.radius)
                   for points, v in zip(np.split(all_points, splits), vessels)]
    blood_r2s = float(r2s_at_field(props.blood_r2s, acquisition.b0_tesla))
    tissue_r2s = float(r2s_at_field(props.r2s["wm"], acquisition.b0_tesla))
    rendering = render_vessels(vessels_kji, grid.shape, grid.spacing_zyx, props.blood_chi,
                               max(blood_r2s - tissue_r2s, 0.0), acquisition.te_ms, rad_per_ppm)
    if signal is not None:
        signal.ravel()[rendering.flat_index] *= rendering.factor
    if chi is not None:
        chi.ravel()[rendering.flat_index] += rendering.fraction * np.float32(props.blood_chi)
    tick("vessels")

    # --- CMBs and mimics --------------------------------------------------------------------------------
    if cmbs is None:
        count = n_cmbs if n_cmbs is not None else sample_cmb_count(rng, config.min_cmbs, config.max_cmbs,
                                                                   config.p_no_cmbs)
        cmbs = [CMBSpec(radius_mm=sample_radius(rng, config.min_radius_mm, config.max_radius_mm,
                                                config.radius_mean_mm, config.radius_sd_mm))
                for _ in range(int(count))]
    placed = place_cmbs(rng, list(cmbs), anatomy, transform.head_to_scanner, grid.fits, vessels,
                        acquisition.b0_tesla, config.p_touch_vessel)
    mimics = place_mimics(rng, anatomy, transform.head_to_scanner, grid.fits, acquisition.b0_tesla,
                          config.calcification_rate, config.iron_rate,
                          avoid=[(c.centre_scanner, c.radius_mm) for c in placed])
    # Drawn before any modality-specific randomness: SWI / T2* / QSM of one seed list the same mimics.
    records_rng = np.random.default_rng(int(rng.integers(2 ** 63)))
    instances = np.zeros(grid.shape, np.uint16)
    records: list[CMBRecord] = []
    for number, cmb in enumerate(placed, start=1):
        records.append(_render_lesion(cmb, number, grid, signal, chi, instances, rad_per_ppm, acquisition,
                                      config.label_threshold))
    for mimic in mimics:
        _render_lesion(mimic, 0, grid, signal, chi, None, rad_per_ppm, acquisition, config.label_threshold)
    tick("lesions")

    # --- acquisition: bias, noise, reconstruction -------------------------------------------------------
    brain = brain_fraction > 0.5
    wm_signal = float(props.pd["wm"] * np.exp(-te_s * r2s_at_field(props.r2s["wm"], acquisition.b0_tesla)))
    if signal is not None:
        signal *= bias_field(rng, grid.shape, acquisition.bias_strength)
        signal = add_complex_noise(signal, wm_signal / acquisition.snr, rng)
        if modality == "swi":
            image = swi_from_complex(signal, acquisition.swi_mask_power, acquisition.swi_hp_fraction)
        else:
            image = np.abs(signal).astype(np.float32)
        gain = float(rng.uniform(400.0, 2000.0)) / wm_signal
        image = (image * np.float32(gain)).astype(np.float32)
    else:
        qsm_mask = ndimage.binary_erosion(brain, iterations=1)
        image = qsm_from_chi(chi, qsm_mask, acquisition.qsm_smoothing_vox, acquisition.qsm_noise_ppm, rng,
                             grid.spacing_zyx)
    tick("acquisition")

    mimic_records = []
    for m in mimics:
        kji = grid.scanner_to_kji(m.centre_scanner)
        mimic_records.append(MimicRecord(m.kind, m.site, _round3(grid.kji_to_ras(kji)[0]), _round3(kji[0]),
                                         round(m.radius_mm, 4), round(m.chi_ppm, 4)))
    inside_brain = _inside_sampler(brain)
    for kji, radius in through_plane_segments(vessels_kji, grid.spacing_zyx, inside_brain,
                                                records_rng):
        mimic_records.append(MimicRecord("vein", "through_plane", _round3(grid.kji_to_ras(kji)[0]),
                                         _round3(kji), round(radius, 4), round(props.blood_chi, 4)))
    parameters = {
        "generator_version": GENERATOR_VERSION, "seed": int(seed), "index": int(index),
        "anatomy": anatomy.source, "acquisition": acquisition.to_dict(), "tissue": props.to_dict(),
        "config": config.to_dict(), "n_vessels": len(vessels),
    }
    label = (instances > 0).astype(np.uint8)
    return SyntheticCase(int(seed), int(index), modality, grid.volume(image), grid.volume(label),
                         grid.volume(instances), grid.volume(brain.astype(np.uint8)), records, mimic_records,
                         parameters, timings)


def _inside_sampler(mask: np.ndarray):
    def inside(kji: np.ndarray) -> np.ndarray:
        index = np.rint(kji).astype(int)
        ok = np.all((index >= 0) & (index < np.array(mask.shape)), axis=1)
        result = np.zeros(len(index), bool)
        result[ok] = mask[tuple(index[ok].T)]
        return result
    return inside


def _render_lesion(lesion: PlacedCMB | Mimic, number: int, grid: _Grid, signal: np.ndarray | None,
                   chi: np.ndarray | None, instances: np.ndarray | None, rad_per_ppm: float,
                   acquisition: AcquisitionParameters, label_threshold: float) -> CMBRecord | None:
    """Multiply a sphere's complex factor into the signal / add its chi; label it if it is a CMB."""
    centre_kji = grid.scanner_to_kji(lesion.centre_scanner)[0]
    box, factor, fraction = render_sphere(grid.shape, grid.spacing_zyx, centre_kji, lesion.radius_mm,
                                          lesion.chi_ppm, lesion.delta_r2s, acquisition.te_ms, rad_per_ppm)
    if factor.size == 0:
        return None
    if signal is not None:
        signal[box] *= factor
    if chi is not None:
        chi[box] += fraction * np.float32(lesion.chi_ppm)
    if instances is None:
        return None
    local_centre = tuple(int(np.clip(np.rint(c - b.start), 0, b.stop - b.start - 1))
                         for c, b in zip(centre_kji, box))
    blob = visible_label(factor, fraction, acquisition.modality, local_centre, label_threshold,
                         acquisition.swi_mask_power)
    target = instances[box]
    blob &= target == 0
    target[blob] = number
    voxels = int(blob.sum())
    voxel_mm3 = float(np.prod(grid.spacing_xyz))
    ras = grid.kji_to_ras(centre_kji)[0]
    return CMBRecord(number, _round3(ras), _round3(centre_kji), round(float(lesion.radius_mm), 4),
                     lesion.region, REGION_GROUPS.get(lesion.region, "unknown"),
                     round(float(lesion.chi_ppm), 4),
                     bool(lesion.touches_vessel), voxels, round(voxels * voxel_mm3, 3))


__all__ = ["CMBRecord", "CMBSpec", "MimicRecord", "SynthConfig", "SyntheticCase", "case_rng", "generate_case",
           "SubjectTransform"]
