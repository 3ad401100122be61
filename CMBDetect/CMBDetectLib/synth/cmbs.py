"""Placement of synthetic cerebral microbleeds: how many, how big, where (priors from cmb_priors.md).

* Count per scan: many scans have none; among positive scans median 2, mean ~4.6, long tail (max 83).
* Radius: mean ~1.5 mm (sd ~0.45 mm) -- diameter 2-10 mm clinically; truncated to [min, max] radius.
* Location: subcortical WM 40 %, cortex / grey-white junction 33 %, basal ganglia 8 %, thalamus 5 %,
  deep WM 2 %, brainstem 4 %, cerebellum 8 %; some touch a vein (a hard case for vessel suppression).
* Susceptibility: haemosiderin, strongly paramagnetic; T2* very short inside (black core).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from CMBDetectLib.synth.anatomy import REGION_PRIOR, REGIONS, Anatomy
from CMBDetectLib.synth.signal import swi_phase_mask
from CMBDetectLib.synth.vessels import Vessel


@dataclass
class CMBSpec:
    """A requested CMB; ``None`` fields are drawn from the priors."""

    radius_mm: float | None = None
    region: str | None = None
    centre_head_lps: tuple[float, float, float] | None = None   # explicit position in head space
    touch_vessel: bool | None = None
    chi_ppm: float | None = None


@dataclass
class PlacedCMB:
    centre_head: np.ndarray      # LPS mm, head space
    centre_scanner: np.ndarray   # LPS mm, scanner space
    radius_mm: float
    region: str
    chi_ppm: float
    delta_r2s: float             # extra R2* inside (1/s at the acquisition's B0)
    touches_vessel: bool


def sample_cmb_count(rng: np.random.Generator, min_cmbs: int = 0, max_cmbs: int = 60,
                     p_none: float = 0.3) -> int:
    """Zero with probability ``p_none``, else 1 + floor(lognormal): median 2, mean ~4.5, heavy tail."""
    if max_cmbs <= 0:
        return 0
    if min_cmbs <= 0 and rng.random() < p_none:
        return 0
    count = 1 + int(np.floor(rng.lognormal(np.log(1.5), 1.35)))
    return int(np.clip(count, max(min_cmbs, 1), max_cmbs))


def sample_radius(rng: np.random.Generator, min_radius: float = 1.0, max_radius: float = 5.0,
                  mean: float = 1.5, sd: float = 0.45) -> float:
    """Log-normal radius (mean ``mean``, sd ``sd``), redrawn until inside [min, max]."""
    sigma = np.sqrt(np.log(1.0 + (sd / mean) ** 2))
    mu = np.log(mean) - sigma ** 2 / 2
    for _ in range(100):
        radius = float(rng.lognormal(mu, sigma))
        if min_radius <= radius <= max_radius:
            return radius
    return float(np.clip(mean, min_radius, max_radius))


def sample_region(rng: np.random.Generator) -> str:
    weights = np.array([REGION_PRIOR[name] for name in REGIONS])
    return str(rng.choice(REGIONS, p=weights / weights.sum()))


def place_cmbs(rng: np.random.Generator, specs: list[CMBSpec], anatomy: Anatomy,
               head_to_scanner: Callable[[np.ndarray], np.ndarray],
               fits_in_fov: Callable[[np.ndarray, float], bool], vessels: list[Vessel],
               b0_tesla: float, p_touch_vessel: float = 0.15, blooming_gap: float = 3.0) -> list[PlacedCMB]:
    """Place every requested CMB (regions, non-overlapping including blooming, inside the field of view).

    A CMB that cannot be placed after many attempts (e.g. a region outside a thin slab) is moved to the
    lobar white matter, so the requested count is always honoured when any room exists.
    """
    placed: list[PlacedCMB] = []
    candidate_vessels = [v for v in vessels if v.kind in ("cortical", "medullary")]

    def free(centre_scanner: np.ndarray, radius: float) -> bool:
        return all(np.linalg.norm(centre_scanner - other.centre_scanner)
                   >= blooming_gap * (radius + other.radius_mm) for other in placed)

    for spec in specs:
        radius = float(spec.radius_mm) if spec.radius_mm is not None else sample_radius(rng)
        chi = float(spec.chi_ppm) if spec.chi_ppm is not None else float(rng.uniform(0.4, 1.3))
        touch = bool(spec.touch_vessel) if spec.touch_vessel is not None else rng.random() < p_touch_vessel
        region = spec.region or sample_region(rng)
        result = None
        for attempt in range(400):
            via_vessel = False
            if spec.centre_head_lps is not None:
                head = np.asarray(spec.centre_head_lps, dtype=float)
                found_region = anatomy.region_at(head)[0] or region
            elif touch and candidate_vessels and attempt < 150:
                vessel = candidate_vessels[int(rng.integers(len(candidate_vessels)))]
                index = int(rng.integers(len(vessel.points)))
                last = len(vessel.points) - 1
                tangent = vessel.points[min(index + 1, last)] - vessel.points[max(index - 1, 0)]
                tangent /= max(np.linalg.norm(tangent), 1e-9)
                direction = np.cross(tangent, rng.normal(0, 1, 3))
                direction /= max(np.linalg.norm(direction), 1e-9)
                head = vessel.points[index] + direction * (radius + vessel.radius[index]) * 0.95
                found_region = anatomy.region_at(head)[0]
                if found_region is None or (spec.region and found_region != spec.region):
                    continue
                via_vessel = True
            else:
                use_region = region if attempt < 300 else "subcortical_wm"
                points = anatomy.sample_region_points(use_region, 1, rng)
                if points.shape[0] == 0:
                    region = "subcortical_wm"
                    continue
                head, found_region = points[0], use_region
            scanner = head_to_scanner(head[None])[0]
            fits = fits_in_fov(scanner, radius) and free(scanner, radius)
            if spec.centre_head_lps is None and not fits:
                continue
            result = PlacedCMB(head, scanner, radius, str(found_region), chi,
                               float(rng.uniform(150.0, 400.0) * (0.45 + 0.55 * b0_tesla / 3.0)),
                               via_vessel)
            break
        if result is not None:
            placed.append(result)
    return placed


def visible_label(factor: np.ndarray, fraction: np.ndarray, modality: str, centre_local: tuple[int, int, int],
                  threshold: float = 0.5, mask_power: int = 4) -> np.ndarray:
    """What a rater outlines for one CMB, in its render box: the voxels whose signal the CMB alone reduces
    below ``threshold`` on SWI / T2* (blooming included) or that it fills at least half (QSM: only those),
    connected to its centre voxel, which is always included."""
    if modality == "qsm":
        visible = fraction >= 0.5
    else:
        effect = np.abs(factor)
        if modality == "swi":
            effect = effect * swi_phase_mask(np.angle(factor), mask_power)
        visible = (effect < threshold) | (fraction >= 0.5)
    visible = visible.copy()
    visible[centre_local] = True
    components, _ = ndimage.label(visible, structure=np.ones((3, 3, 3)))
    return components == components[centre_local]
