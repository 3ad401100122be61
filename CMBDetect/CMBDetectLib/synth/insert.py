"""Insert synthetic CMBs into a user's REAL scan (``cmbdetect synth --into IMAGE``).

Each CMB is a paramagnetic sphere whose exact dipole field is averaged over sub-voxel samples on the
image's own grid (B0 along the scanner z axis, whatever the image orientation):

* SWI / T2*-GRE (magnitude): the image is multiplied by the voxel-averaged signal factor -- signal loss
  with blooming and partial volume (SWI also by the negative-phase mask of the CMB's own phase).
* QSM: the sphere's susceptibility (partial volume, lightly smoothed) is added to the map.

CMBs go only inside a brain mask (given, or estimated roughly: Otsu + largest component + hole filling),
at least ``edge_margin_mm`` from its edge, apart from each other; voxels outside each CMB's field box are
bit-for-bit unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from CMBDetectLib.errors import InputError
from CMBDetectLib.synth.cmbs import sample_radius, visible_label
from CMBDetectLib.synth.generator import CMBRecord, SyntheticCase
from CMBDetectLib.synth.signal import radians_per_ppm, render_sphere, swi_phase_mask
from CMBDetectLib.volume import Volume, image_stem, read_volume


@dataclass
class InsertionResult:
    image: Volume
    label: Volume
    instances: Volume
    brain_mask: Volume
    cmbs: list[CMBRecord]
    parameters: dict


def rough_brain_mask(array: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """A rough head/brain mask: non-zero and above Otsu's threshold of the smoothed image, largest
    component, holes filled. Good enough to keep inserted CMBs inside the head, away from its edge."""
    from skimage.filters import threshold_otsu

    data = np.nan_to_num(array.astype(np.float32))
    magnitude = np.abs(data)
    smooth = ndimage.gaussian_filter(magnitude, [1.0 / s for s in spacing_zyx])
    nonzero = magnitude > 0
    if not nonzero.any():
        raise InputError("the image is empty (all zero): nowhere to insert CMBs")
    threshold = threshold_otsu(smooth[nonzero]) if np.ptp(smooth[nonzero]) > 0 else 0.0
    # QSM maps are centred on 0 with a masked background: there, non-zero is the mask.
    mask = (smooth > threshold) if data.min() >= 0 else nonzero
    mask = ndimage.binary_opening(mask, iterations=1)
    labels, count = ndimage.label(mask)
    if count == 0:
        raise InputError("could not find the brain in the image (empty mask)")
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=range(1, count + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    for k in range(mask.shape[0]):
        mask[k] = ndimage.binary_fill_holes(mask[k])
    return ndimage.binary_fill_holes(mask)


def estimate_noise_sigma(image: np.ndarray, mask: np.ndarray) -> float:
    """Gaussian noise sigma from the median absolute deviation of voxel-to-voxel differences in the mask
    (edges and anatomy barely affect the median)."""
    diff = np.diff(image, axis=2)[mask[:, :, 1:] & mask[:, :, :-1]]
    if diff.size < 10:
        return 0.0
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2.0))


def _b0_in_array_axes(volume: Volume) -> tuple[float, float, float]:
    """The scanner z axis (B0) in the image's [k, j, i] axes."""
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    ijk = direction.T @ np.array([0.0, 0.0, 1.0])
    return (float(ijk[2]), float(ijk[1]), float(ijk[0]))


def guess_modality(array: np.ndarray) -> str:
    """QSM maps have negative values; magnitude images (SWI / T2*) do not."""
    return "qsm" if float(np.nanmin(array)) < 0 else "swi"


def insert_cmbs(volume: Volume, n_cmbs: int, *, modality: str | None = None, mask: Volume | None = None,
                seed: int = 0, radii_mm: list[float] | None = None, b0_tesla: float = 3.0,
                te_ms: float = 20.0, edge_margin_mm: float = 8.0, chi_range: tuple[float, float] = (0.4, 1.3),
                label_threshold: float = 0.5) -> InsertionResult:
    """Add ``n_cmbs`` synthetic CMBs to a real image (see module docstring)."""
    if volume.array.ndim != 3:
        raise InputError("--into needs a 3D image")
    modality = modality or guess_modality(volume.array)
    if modality not in ("swi", "t2s", "qsm"):
        raise InputError(f"unknown modality {modality!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1A5E47]))
    spacing = volume.spacing_zyx
    if mask is not None:
        if mask.array.shape != volume.array.shape:
            raise InputError("the mask and the image have different sizes")
        brain = mask.array > 0
    else:
        brain = rough_brain_mask(volume.array, spacing)
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    radii = list(radii_mm) if radii_mm is not None else [sample_radius(rng) for _ in range(n_cmbs)]
    if len(radii) != n_cmbs:
        raise InputError("radii_mm must list one radius per CMB")
    b0 = _b0_in_array_axes(volume)
    rad_per_ppm = radians_per_ppm(b0_tesla, te_ms)
    original_dtype = volume.array.dtype
    image = volume.array.astype(np.float32)
    sigma = np.float32(estimate_noise_sigma(image, brain)) if modality != "qsm" else np.float32(0)
    instances = np.zeros(volume.array.shape, np.uint16)
    placed: list[tuple[np.ndarray, float]] = []
    records: list[CMBRecord] = []
    spacing_arr = np.asarray(spacing)
    for number, radius in enumerate(radii, start=1):
        allowed = np.flatnonzero((depth >= radius + edge_margin_mm).ravel())
        if allowed.size == 0:
            raise InputError(f"the brain mask is too small to insert a CMB of radius {radius:.1f} mm "
                             f"{edge_margin_mm:.0f} mm away from its edge")
        centre = None
        for _ in range(500):
            kji = np.array(np.unravel_index(int(rng.choice(allowed)), brain.shape), dtype=float)
            kji += rng.uniform(-0.4, 0.4, 3)
            if all(np.linalg.norm((kji - other) * spacing_arr) >= 3.0 * (radius + r) for other, r in placed):
                centre = kji
                break
        if centre is None:
            raise InputError(f"no room left in the brain mask for {n_cmbs} CMBs")
        chi = float(rng.uniform(*chi_range))
        delta_r2s = float(rng.uniform(150.0, 400.0) * (0.45 + 0.55 * b0_tesla / 3.0))
        box, factor, fraction = render_sphere(volume.array.shape, spacing, centre, radius, chi, delta_r2s,
                                              te_ms, rad_per_ppm, b0)
        if modality == "qsm":
            added = ndimage.gaussian_filter(fraction * np.float32(chi), 0.5)
            image[box] += np.where(brain[box], added, 0).astype(np.float32)
        else:
            effect = np.abs(factor)
            if modality == "swi":
                effect = effect * swi_phase_mask(np.angle(factor))
            effect = effect.astype(np.float32)
            # The signal that the CMB removes leaves the noise behind: a dark core keeps the scan's Rician
            # noise floor instead of becoming a perfectly black hole.
            refill = sigma * np.sqrt(np.clip(1.0 - effect ** 2, 0.0, 1.0)).astype(np.float32)
            noise = rng.standard_normal(effect.shape + (2,), dtype=np.float32)
            image[box] = np.abs(image[box] * effect + refill * (noise[..., 0] + 1j * noise[..., 1]))
        local = tuple(int(np.clip(np.rint(c - b.start), 0, b.stop - b.start - 1))
                      for c, b in zip(centre, box))
        blob = visible_label(factor, fraction, modality, local, label_threshold) & (instances[box] == 0)
        instances[box][blob] = number
        placed.append((centre, radius))
        voxels = int(blob.sum())
        ras = volume.index_to_ras(centre)[0]
        records.append(CMBRecord(number, tuple(round(float(v), 4) for v in ras),
                                 tuple(round(float(v), 4) for v in centre), round(float(radius), 4),
                                 "unknown",
                                 "unknown", round(chi, 4), False, voxels,
                                 round(voxels * float(np.prod(volume.spacing)), 3)))
    if np.issubdtype(original_dtype, np.integer):
        info = np.iinfo(original_dtype)
        image = np.clip(np.rint(image), info.min, info.max).astype(original_dtype)
    out = volume.with_array(image)
    parameters = {"mode": "insert", "modality": modality, "seed": int(seed), "b0_tesla": b0_tesla,
                  "te_ms": te_ms, "edge_margin_mm": edge_margin_mm, "n_cmbs": n_cmbs,
                  "mask": "given" if mask is not None else "estimated (otsu)"}
    return InsertionResult(out, volume.with_array((instances > 0).astype(np.uint8)),
                           volume.with_array(instances),
                           volume.with_array(brain.astype(np.uint8)), records, parameters)


def insert_cmbs_into_file(image_path: str | Path, out_dir: str | Path, *, n_cmbs: int,
                          modality: str | None = None, mask_path: str | Path | None = None,
                          seed: int = 0) -> dict:
    """Read ``image_path``, insert CMBs, write one case in the dataset layout under ``out_dir``."""
    from CMBDetectLib.synth.dataset_writer import write_case, write_dataset_json

    volume = read_volume(image_path)
    mask = read_volume(mask_path) if mask_path else None
    result = insert_cmbs(volume, n_cmbs, modality=modality, mask=mask, seed=seed)
    identifier = f"{image_stem(image_path)}_synthcmb"
    parameters = dict(result.parameters, base_image=str(image_path))
    case = SyntheticCase(seed, 0, result.parameters["modality"], result.image, result.label, result.instances,
                         result.brain_mask, result.cmbs, [], parameters)
    write_case(case, out_dir, identifier)
    write_dataset_json(out_dir, result.parameters["modality"])
    return {"case": identifier, "modality": result.parameters["modality"],
            "cmbs": [record.to_dict() for record in result.cmbs]}
