"""Brain phantoms for the synthetic generator: tissue fractions, deep nuclei and CMB regions on a head grid.

Two sources give the same :class:`Anatomy`:

* ``"template"`` -- the ICBM 2009a MNI152 T1 + grey/white-matter probability maps that ship *inside* the
  nilearn wheel (optional dependency, read offline, never downloaded). Real folding, real ventricles.
* ``"procedural"`` -- an analytic phantom (ellipsoidal cerebrum with noise-driven sulci, ventricles,
  ellipsoidal deep nuclei, foliated cerebellum, brainstem). Works without nilearn; every subject differs.

The head grid is an isotropic LPS grid (identity direction) in MNI-like millimetres (origin near the
anterior commissure), arrays indexed ``[k, j, i]`` = (z, y, x) like every engine array. Per-subject shape
variation (scaling, shear, rotation, smooth warp) is applied later, when the generator samples this grid
onto the scanner grid, so the expensive template preparation is done once per process.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

# Regions where CMBs are placed; proportions from the public annotated collections (cmb_priors.md).
REGIONS: tuple[str, ...] = ("cortex_gwj", "subcortical_wm", "basal_ganglia", "thalamus", "deep_wm",
                            "brainstem", "cerebellum")
REGION_CODES: dict[str, int] = {name: code for code, name in enumerate(REGIONS, start=1)}
REGION_GROUPS: dict[str, str] = {
    "cortex_gwj": "lobar", "subcortical_wm": "lobar",
    "basal_ganglia": "deep", "thalamus": "deep", "deep_wm": "deep",
    "brainstem": "infratentorial", "cerebellum": "infratentorial",
}
REGION_PRIOR: dict[str, float] = {
    "cortex_gwj": 0.33, "subcortical_wm": 0.40, "basal_ganglia": 0.08, "thalamus": 0.05, "deep_wm": 0.02,
    "brainstem": 0.04, "cerebellum": 0.08,
}

# Deep grey-matter nuclei (iron-rich, dark on SWI): code -> (name, centre RAS mm (right side), semi-axes mm).
NUCLEI: dict[int, tuple[str, tuple[float, float, float], tuple[float, float, float]]] = {
    1: ("putamen", (25.0, 2.0, 1.0), (5.5, 14.0, 9.0)),
    2: ("globus_pallidus", (18.5, -3.0, -1.0), (4.0, 8.0, 5.0)),
    3: ("caudate", (13.0, 12.0, 10.0), (4.5, 9.0, 7.5)),
    4: ("thalamus", (11.0, -18.0, 6.0), (7.0, 12.0, 7.5)),
    5: ("red_nucleus", (5.0, -20.0, -9.0), (3.0, 3.5, 3.0)),
    6: ("substantia_nigra", (10.5, -17.0, -12.0), (2.5, 6.0, 2.5)),
    7: ("dentate", (14.0, -57.0, -33.0), (5.5, 7.0, 5.0)),
}
NUCLEUS_CODES: dict[str, int] = {name: code for code, (name, _, _) in NUCLEI.items()}

# Head box in MNI RAS mm (x, y, z): brain plus CSF rim, skull and scalp.
HEAD_BOX_RAS = ((-88.0, 88.0), (-124.0, 86.0), (-80.0, 96.0))
BRAIN_CENTRE_RAS = (0.0, -18.0, 8.0)

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """RAS <-> LPS is its own inverse: flip x and y."""
    return np.asarray(points, dtype=float) * np.array([-1.0, -1.0, 1.0])


lps_to_ras = ras_to_lps


@dataclass
class Anatomy:
    """Tissue model of one subject on an isotropic LPS head grid (arrays ``[k, j, i]``)."""

    spacing: float
    origin_lps: np.ndarray          # LPS mm (x, y, z) of voxel [0, 0, 0]
    gm: np.ndarray                  # float32 fractions in [0, 1]
    wm: np.ndarray
    csf: np.ndarray                 # intracranial CSF (sulci, ventricles, cisterns)
    brain: np.ndarray               # bool: intracranial envelope (brain + CSF)
    outside_mm: np.ndarray          # float32 distance outside the envelope (0 inside): CSF rim, skull, scalp
    nuclei: np.ndarray              # uint8 NUCLEI code
    region: np.ndarray              # uint8 REGION_CODES code (0 = no CMB region)
    ventricles: np.ndarray          # bool
    source: str                     # "template" or "procedural"
    depth_mm: np.ndarray            # float32 distance inside the envelope (0 outside): cortical veins
    ventricle_mm: np.ndarray        # float32 distance to the ventricles: medullary veins
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.gm.shape)  # type: ignore[return-value]

    def index_to_lps(self, kji: np.ndarray) -> np.ndarray:
        kji = np.atleast_2d(np.asarray(kji, dtype=float))
        return kji[:, ::-1] * self.spacing + self.origin_lps

    def lps_to_index(self, lps: np.ndarray) -> np.ndarray:
        lps = np.atleast_2d(np.asarray(lps, dtype=float))
        return ((lps - self.origin_lps) / self.spacing)[:, ::-1]

    def crop(self, lo_kji: np.ndarray, hi_kji: np.ndarray) -> Anatomy:
        """A view of the sub-grid ``[lo, hi)`` (clipped to the grid)."""
        lo = np.clip(np.asarray(lo_kji, dtype=int), 0, np.array(self.shape))
        hi = np.clip(np.asarray(hi_kji, dtype=int), lo + 1, np.array(self.shape))
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        arrays = {name: getattr(self, name)[box] for name in _ARRAY_FIELDS}
        return replace(self, origin_lps=self.origin_lps + lo[::-1] * self.spacing, _cache={}, **arrays)

    def downsampled(self) -> Anatomy:
        """The same head at twice the spacing (block means / strided labels); cached."""
        if "down2" not in self._cache:
            shape = tuple(n // 2 * 2 for n in self.shape)

            def mean(a: np.ndarray) -> np.ndarray:
                a = a[: shape[0], : shape[1], : shape[2]].astype(np.float32)
                return a.reshape(shape[0] // 2, 2, shape[1] // 2, 2, shape[2] // 2, 2).mean(axis=(1, 3, 5))

            def pick(a: np.ndarray) -> np.ndarray:
                return np.ascontiguousarray(a[: shape[0]:2, : shape[1]:2, : shape[2]:2])

            fractions = ("gm", "wm", "csf", "outside_mm", "depth_mm", "ventricle_mm")
            arrays = {name: mean(getattr(self, name)) for name in fractions}
            arrays.update({name: pick(getattr(self, name)) for name in ("nuclei", "region", "brain",
                                                                        "ventricles")})
            self._cache["down2"] = replace(self, spacing=2 * self.spacing, _cache={},
                                           origin_lps=self.origin_lps + 0.5 * self.spacing, **arrays)
        return self._cache["down2"]

    def brain_centre_lps(self) -> np.ndarray:
        return ras_to_lps(np.array(BRAIN_CENTRE_RAS))

    def sample_region_points(self, region: str, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` random LPS points (sub-voxel jitter) inside ``region``; empty if the region is absent."""
        candidates = np.flatnonzero(self.region.ravel() == REGION_CODES[region])
        if candidates.size == 0 or count <= 0:
            return np.zeros((0, 3))
        chosen = rng.choice(candidates, size=count, replace=candidates.size < count)
        kji = np.stack(np.unravel_index(chosen, self.shape), axis=1).astype(float)
        kji += rng.uniform(-0.5, 0.5, kji.shape)
        return self.index_to_lps(kji)

    def region_at(self, lps: np.ndarray) -> list[str | None]:
        index = np.rint(self.lps_to_index(lps)).astype(int)
        inside = np.all((index >= 0) & (index < np.array(self.shape)), axis=1)
        names: list[str | None] = []
        for ok, (k, j, i) in zip(inside, index):
            code = int(self.region[k, j, i]) if ok else 0
            names.append(REGIONS[code - 1] if code else None)
        return names


_ARRAY_FIELDS = ("gm", "wm", "csf", "brain", "outside_mm", "nuclei", "region", "ventricles", "depth_mm",
                 "ventricle_mm")


def template_available() -> bool:
    """True when nilearn (optional) is installed with the MNI152 files; nothing is imported or downloaded."""
    return _template_directory() is not None


def _template_directory() -> Path | None:
    try:
        spec = importlib.util.find_spec("nilearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    if all((folder / name).is_file() for name in _TEMPLATE_FILES.values()):
        return folder
    return None


def _head_grid(spacing: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Origin (LPS) and shape [k, j, i] of the head box at ``spacing``."""
    lo_lps = np.array([-HEAD_BOX_RAS[0][1], -HEAD_BOX_RAS[1][1], HEAD_BOX_RAS[2][0]])
    size = np.array([HEAD_BOX_RAS[0][1] - HEAD_BOX_RAS[0][0], HEAD_BOX_RAS[1][1] - HEAD_BOX_RAS[1][0],
                     HEAD_BOX_RAS[2][1] - HEAD_BOX_RAS[2][0]])
    n_xyz = np.ceil(size / spacing).astype(int) + 1
    return lo_lps, (int(n_xyz[2]), int(n_xyz[1]), int(n_xyz[0]))


def _grid_ras(origin_lps: np.ndarray, shape: tuple[int, int, int], spacing: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable RAS coordinate arrays (z [k,1,1], y [1,j,1], x [1,1,i])."""
    z = (origin_lps[2] + spacing * np.arange(shape[0]))[:, None, None]
    y = -(origin_lps[1] + spacing * np.arange(shape[1]))[None, :, None]
    x = -(origin_lps[0] + spacing * np.arange(shape[2]))[None, None, :]
    return z.astype(np.float32), y.astype(np.float32), x.astype(np.float32)


def _ellipsoid_rho(z, y, x, centre_ras, semi_axes) -> np.ndarray:
    """Normalised ellipsoid radius (< 1 inside)."""
    return np.sqrt(((x - centre_ras[0]) / semi_axes[0]) ** 2 + ((y - centre_ras[1]) / semi_axes[1]) ** 2
                   + ((z - centre_ras[2]) / semi_axes[2]) ** 2)


def _nuclei_map(z, y, x, shape, jitter: dict[int, tuple[np.ndarray, float]] | None = None) -> np.ndarray:
    nuclei = np.zeros(shape, np.uint8)
    for code, (_, centre, axes) in NUCLEI.items():
        shift, scale = jitter.get(code, (np.zeros(3), 1.0)) if jitter else (np.zeros(3), 1.0)
        for side in (1.0, -1.0):
            c = (side * centre[0] + side * shift[0], centre[1] + shift[1], centre[2] + shift[2])
            nuclei[_ellipsoid_rho(z, y, x, c, np.array(axes) * scale) < 1.0] = code
    return nuclei


def _regions(gm, wm, csf, brain, nuclei, vent_dist, z, y, x) -> np.ndarray:
    """CMB regions from tissue fractions + geometric rules (tentorium, brainstem box)."""
    shape = gm.shape
    tissue = gm + wm
    brainstem = (brain & (np.abs(x) < 13) & (y > -42) & (y < -8) & (z < -6) & (z > -62) & (tissue > 0.6))
    brainstem = np.broadcast_to(brainstem, shape)
    # The tentorium is highest near the incisura and slopes down towards the occiput (transverse sinus);
    # the cerebellum lies below it and behind the brainstem.
    infratentorial = (z < -6.0 + 0.45 * np.minimum(y + 45.0, 0.0)) & (y < -36)
    cerebellum = np.broadcast_to(brain & infratentorial & (tissue > 0.6) & ~brainstem, shape)
    supra = brain & ~np.broadcast_to(infratentorial, shape) & ~brainstem & (z > -45)
    deep_nuclei = (nuclei >= 1) & (nuclei <= 4)
    region = np.zeros(shape, np.uint8)
    region[supra & (gm >= 0.4) & (tissue >= 0.8)] = REGION_CODES["cortex_gwj"]
    region[supra & (wm >= 0.7)] = REGION_CODES["subcortical_wm"]
    region[supra & (wm >= 0.5) & (vent_dist <= 9.0) & (np.abs(x) < 30)] = REGION_CODES["deep_wm"]
    region[supra & deep_nuclei & (nuclei != 4) & (tissue > 0.7)] = REGION_CODES["basal_ganglia"]
    region[supra & (nuclei == 4) & (tissue > 0.7)] = REGION_CODES["thalamus"]
    region[brainstem] = REGION_CODES["brainstem"]
    region[cerebellum] = REGION_CODES["cerebellum"]
    return region


@functools.lru_cache(maxsize=2)
def _template_anatomy(spacing: float) -> Anatomy:
    import SimpleITK as sitk

    folder = _template_directory()
    if folder is None:
        raise FileNotFoundError("the MNI152 template is not installed (nilearn missing)")
    origin, shape = _head_grid(spacing)
    reference = sitk.Image([shape[2], shape[1], shape[0]], sitk.sitkFloat32)
    reference.SetSpacing([spacing] * 3)
    reference.SetOrigin([float(v) for v in origin])
    maps = {}
    for key, name in _TEMPLATE_FILES.items():
        image = sitk.Cast(sitk.ReadImage(str(folder / name)), sitk.sitkFloat32)
        resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
        maps[key] = sitk.GetArrayFromImage(resampled) / 255.0
    z, y, x = _grid_ras(origin, shape, spacing)
    gm = np.clip(maps["gm"], 0, 1).astype(np.float32)
    wm = np.clip(maps["wm"], 0, 1).astype(np.float32)
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(maps["t1"] > 0.02, iterations=2))
    csf = np.where(brain, np.clip(1.0 - gm - wm, 0, 1), 0).astype(np.float32)
    inner = ndimage.distance_transform_edt(brain, sampling=spacing)
    ventricles = brain & (csf > 0.6) & (inner > 12.0) & (np.abs(x) < 35) & (z > -20)
    ventricles = ndimage.binary_opening(ventricles)
    outside = ndimage.distance_transform_edt(~brain, sampling=spacing).astype(np.float32)
    nuclei = _nuclei_map(z, y, x, shape)
    nuclei[~brain] = 0
    vent_dist = ndimage.distance_transform_edt(~ventricles, sampling=spacing).astype(np.float32)
    region = _regions(gm, wm, csf, brain, nuclei, vent_dist, z, y, x)
    return Anatomy(spacing, origin, gm, wm, csf, brain, outside, nuclei, region, ventricles, "template",
                   inner.astype(np.float32), vent_dist)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], spacing: float,
                  wavelength_mm: float) -> np.ndarray:
    """Band-limited noise (unit std) made on a coarse grid and upsampled: cheap, smooth at ``wavelength``."""
    coarse_step = wavelength_mm / 4.0
    coarse_shape = tuple(max(4, int(np.ceil(n * spacing / coarse_step)) + 3) for n in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), 1.0, mode="wrap")
    coarse /= coarse.std() + 1e-9
    coordinates = [np.arange(n) * spacing / coarse_step + 1.0 for n in shape]
    # Separable trilinear upsampling through three 1D interpolations (much cheaper than map_coordinates).
    out = coarse
    for axis, coordinate in enumerate(coordinates):
        lo = np.floor(coordinate).astype(int)
        w = (coordinate - lo).astype(np.float32)
        a = np.take(out, lo, axis=axis)
        b = np.take(out, lo + 1, axis=axis)
        shape_w = [1, 1, 1]
        shape_w[axis] = -1
        out = a * (1 - w.reshape(shape_w)) + b * w.reshape(shape_w)
    return out.astype(np.float32)


def _procedural_anatomy(rng: np.random.Generator, spacing: float) -> Anatomy:
    """Analytic phantom; every subject differs (sizes, folding, ventricles, nuclei positions)."""
    origin, shape = _head_grid(spacing)
    z, y, x = _grid_ras(origin, shape, spacing)
    scale = rng.uniform(0.93, 1.07)
    cerebrum_axes = np.array([68.0, 86.0, 62.0]) * scale * rng.uniform(0.96, 1.04, 3)
    cerebrum_centre = np.array([0.0, -16.0, 14.0])
    rho = _ellipsoid_rho(z, y, x, cerebrum_centre, cerebrum_axes)
    rho = rho * (1.0 + 0.035 * _smooth_noise(rng, shape, spacing, 40.0))
    # Flatten the base of the cerebrum (temporal/frontal floor) and carve the cerebellar notch.
    rho = np.maximum(rho, 1.0 - (z - (cerebrum_centre[2] - 0.62 * cerebrum_axes[2])) / 6.0)
    cbl_axes = np.array([50.0, 30.0, 22.0]) * scale
    cbl_centre = np.array([0.0, -62.0, -34.0])
    rho_cbl = _ellipsoid_rho(z, y, x, cbl_centre, cbl_axes)
    rho_cbl = rho_cbl * (1.0 + 0.03 * _smooth_noise(rng, shape, spacing, 30.0))
    rho_bs = np.sqrt((x / 11.0) ** 2 + ((y + 24.0) / 12.0) ** 2) + np.maximum(0.0, (-z - 58.0) / 6.0) \
        + np.maximum(0.0, (z - 2.0) / 6.0)
    tentorium = (rho_cbl < 1.15) & (rho > 0.85)
    rho = np.where(tentorium, np.maximum(rho, 1.02), rho)
    r_mean = float(np.mean(cerebrum_axes))
    depth = (1.0 - rho) * r_mean                 # mm below the cerebral surface (approximation)
    brain = (rho < 1.0) | (rho_cbl < 1.0) | (rho_bs < 1.0)
    outside = np.minimum.reduce([(rho - 1.0) * r_mean, (rho_cbl - 1.0) * float(np.mean(cbl_axes)),
                                 (rho_bs - 1.0) * 11.0])
    outside = np.maximum(outside, 0.0).astype(np.float32)

    # Cortex: a 2.5-3.5 mm ribbon under the surface and along sulci; sulci are zero sheets of smooth
    # noise (gyral wavelength ~ 12-18 mm) down to a random depth, CSF in their middle.
    thickness = rng.uniform(2.4, 3.4)
    folding = _smooth_noise(rng, shape, spacing, rng.uniform(13.0, 18.0))
    sheet_mm = np.abs(folding) * rng.uniform(3.5, 4.5)        # ~ distance to the nearest sulcus (mm)
    sulcal_depth = rng.uniform(11.0, 17.0) * (1.0 + 0.25 * _smooth_noise(rng, shape, spacing, 50.0))
    in_sulcus_band = depth < sulcal_depth
    sulcus_width = rng.uniform(0.5, 1.4)
    csf_frac = np.clip(1.0 - (depth + 0.0) / 1.0, 0, 1)             # subarachnoid rim near the surface
    csf_frac = np.maximum(csf_frac, np.where(in_sulcus_band, np.clip(sulcus_width - sheet_mm + 0.5, 0, 1), 0))
    # Distance to the nearest pial surface: the outer surface, a sulcal wall, or a sulcus fundus.
    ribbon = np.minimum(depth, np.sqrt(sheet_mm ** 2 + np.maximum(depth - sulcal_depth, 0) ** 2))
    gm_frac = np.clip(thickness + 0.5 - ribbon, 0, 1)
    # Interhemispheric fissure.
    fissure = np.abs(x) < rng.uniform(0.8, 1.6)
    fissure = fissure & (depth < rng.uniform(30.0, 40.0)) & (rho < 1.0)
    csf_frac = np.where(fissure, 1.0, csf_frac)
    gm_frac = np.maximum(gm_frac, np.clip(thickness + 1.0 - np.abs(x), 0, 1) * (depth < 36.0))

    # Cerebellum: foliated cortex (thin stripes) over a white-matter core; brainstem mostly white matter.
    folia = np.sin((z - cbl_centre[2]) * 2 * np.pi / rng.uniform(3.0, 4.5)
                   + 2.0 * _smooth_noise(rng, shape, spacing, 20.0))
    cbl_depth = (1.0 - rho_cbl) * float(np.mean(cbl_axes))
    cbl_core = (cbl_depth > 9.0) & (np.abs(x) > 6)
    cbl_gm = np.where(cbl_core, 0.15, np.clip(0.75 + 0.35 * folia, 0, 1))
    cbl_csf = np.where(cbl_core, 0.0, np.clip(-folia - 0.6, 0, 1) * 1.5)

    inside_cerebrum = rho < 1.0
    inside_cbl = (rho_cbl < 1.0) & ~inside_cerebrum
    inside_bs = (rho_bs < 1.0) & ~inside_cerebrum & ~inside_cbl
    gm = np.zeros(shape, np.float32)
    csf = np.zeros(shape, np.float32)
    gm[inside_cerebrum] = gm_frac[inside_cerebrum]
    csf[inside_cerebrum] = csf_frac[inside_cerebrum]
    gm[inside_cbl] = cbl_gm[inside_cbl]
    csf[inside_cbl] = cbl_csf[inside_cbl]
    gm[inside_bs] = 0.2
    csf = np.clip(csf, 0, 1)
    gm = np.clip(np.minimum(gm, 1.0 - csf), 0, 1)

    # Lateral ventricles (bodies + frontal horns + atria + occipital horns) and the third ventricle;
    # their size varies with simulated atrophy.
    vscale = rng.uniform(0.8, 1.6)
    ventricles = np.zeros(shape, bool)
    for side in (1.0, -1.0):
        for centre, axes in (((9.0, 8.0, 14.0), (4.0, 14.0, 5.0)), ((13.0, -16.0, 17.0), (4.5, 14.0, 4.0)),
                             ((22.0, -38.0, 10.0), (5.0, 8.0, 7.0)), ((18.0, -52.0, 8.0), (3.0, 8.0, 3.0))):
            axes_scaled = np.array(axes) * np.array([vscale, 1.0, vscale ** 0.5])
            ventricles |= _ellipsoid_rho(z, y, x, (side * centre[0], centre[1], centre[2]), axes_scaled) < 1
    ventricles |= _ellipsoid_rho(z, y, x, (0.0, -12.0, 0.0), (1.5 * vscale, 14.0, 8.0)) < 1
    ventricles &= inside_cerebrum
    csf[ventricles] = 1.0
    gm[ventricles] = 0.0

    jitter = {code: (rng.normal(0, 1.5, 3), rng.uniform(0.9, 1.1)) for code in NUCLEI}
    nuclei = _nuclei_map(z, y, x, shape, jitter)
    nuclei[~brain | ventricles] = 0
    deep = nuclei > 0
    gm[deep] = np.maximum(gm[deep], 0.85)
    csf[deep] = np.minimum(csf[deep], 0.05)
    gm = np.where(brain, gm, 0).astype(np.float32)
    csf = np.where(brain, csf, 0).astype(np.float32)
    wm = np.where(brain, np.clip(1.0 - gm - csf, 0, 1), 0).astype(np.float32)
    vent_dist = ndimage.distance_transform_edt(~ventricles, sampling=spacing).astype(np.float32)
    region = _regions(gm, wm, csf, brain, nuclei, vent_dist, z, y, x)
    inner = np.maximum.reduce([depth, cbl_depth, (1.0 - rho_bs) * 11.0])
    inner = np.where(brain, np.maximum(inner, 0.0), 0.0).astype(np.float32)
    return Anatomy(spacing, origin, gm, wm, csf, brain, outside, nuclei, region, ventricles, "procedural",
                   inner, vent_dist)


def build_anatomy(rng: np.random.Generator, source: str = "auto", spacing: float | None = None) -> Anatomy:
    """The head model of one subject.

    ``source``: ``"template"`` (needs nilearn), ``"procedural"``, or ``"auto"`` (template if installed).
    The template is shared between subjects (cached); subject variation comes from the generator's
    random anatomical transform, random tissue properties, vessels and lesions.
    """
    if source not in ("auto", "template", "procedural"):
        raise ValueError(f"unknown anatomy source {source!r}")
    if source == "auto":
        source = "template" if template_available() else "procedural"
    if source == "template":
        return _template_anatomy(float(spacing or 1.0))
    return _procedural_anatomy(rng, float(spacing or 1.25))
