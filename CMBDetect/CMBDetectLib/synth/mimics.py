"""Non-CMB lesions that look like CMBs: calcifications (diamagnetic) and focal non-haemorrhagic iron.

Calcifications are dark on SWI / T2* (short T2*) like CMBs, but **negative** on QSM (and of opposite phase):
physiological ones sit in the choroid plexus, pineal gland, globus pallidus and dentate nuclei; a few are
parenchymal. Focal iron in the basal ganglia is weakly paramagnetic and less dark than a CMB.
(Veins, the commonest mimic, live in ``vessels.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from CMBDetectLib.synth.anatomy import Anatomy, ras_to_lps

# Physiological calcification sites (RAS mm, right side where paired) and typical radius range.
CALCIFICATION_SITES = {
    "choroid_plexus": ((24.0, -40.0, 14.0), (2.0, 4.5), True),
    "pineal": ((0.0, -31.0, 3.0), (1.5, 3.5), False),
    "globus_pallidus": ((19.0, -3.0, -1.0), (1.0, 2.5), True),
    "dentate": ((14.0, -57.0, -33.0), (1.0, 2.5), True),
}


@dataclass
class Mimic:
    kind: str                 # "calcification" | "iron" | "vein"
    site: str
    centre_head: np.ndarray   # LPS mm, head space (NaN if unknown)
    centre_scanner: np.ndarray
    radius_mm: float
    chi_ppm: float
    delta_r2s: float


def place_mimics(rng: np.random.Generator, anatomy: Anatomy,
                 head_to_scanner: Callable[[np.ndarray], np.ndarray],
                 fits_in_fov: Callable[[np.ndarray, float], bool], b0_tesla: float,
                 calcification_rate: float = 1.0, iron_rate: float = 1.0,
                 avoid: list[tuple[np.ndarray, float]] | None = None) -> list[Mimic]:
    """Random calcifications and iron foci for one subject (away from the CMBs in ``avoid``)."""
    avoid = list(avoid or [])
    mimics: list[Mimic] = []
    field_scale = 0.45 + 0.55 * b0_tesla / 3.0

    def accept(scanner: np.ndarray, radius: float) -> bool:
        if not fits_in_fov(scanner, radius):
            return False
        return all(np.linalg.norm(scanner - c) >= 3.0 * (radius + r) for c, r in avoid)

    def add(kind: str, site: str, head: np.ndarray, radius: float, chi: float, r2s: float) -> None:
        scanner = head_to_scanner(head[None])[0]
        if accept(scanner, radius):
            mimics.append(Mimic(kind, site, head, scanner, radius, chi, r2s * field_scale))
            avoid.append((scanner, radius))

    # Physiological calcifications (common in adults: pineal and choroid plexus in most over 40).
    for site, (centre_ras, radius_range, paired) in CALCIFICATION_SITES.items():
        probability = {"choroid_plexus": 0.35, "pineal": 0.3, "globus_pallidus": 0.1, "dentate": 0.06}[site]
        if rng.random() >= probability * calcification_rate:
            continue
        sides = (1.0, -1.0) if paired and rng.random() < 0.7 else (float(rng.choice([1.0, -1.0])),)
        for side in sides:
            centre = np.array([side * centre_ras[0], centre_ras[1], centre_ras[2]]) + rng.normal(0, 1.5, 3)
            add("calcification", site, ras_to_lps(centre), float(rng.uniform(*radius_range)),
                float(-rng.uniform(0.25, 1.0)), float(rng.uniform(60.0, 250.0)))
    # Occasional parenchymal calcification (old granuloma, cysticercosis...).
    for _ in range(int(rng.poisson(0.25 * calcification_rate))):
        points = anatomy.sample_region_points(str(rng.choice(["subcortical_wm", "cortex_gwj"])), 1, rng)
        if points.shape[0]:
            add("calcification", "parenchymal", points[0], float(rng.uniform(1.0, 3.0)),
                float(-rng.uniform(0.3, 1.0)), float(rng.uniform(60.0, 250.0)))
    # Focal non-haemorrhagic iron in the basal ganglia / thalamus: weak, fuzzy-looking.
    for _ in range(int(rng.poisson(0.8 * iron_rate))):
        points = anatomy.sample_region_points(str(rng.choice(["basal_ganglia", "thalamus"])), 1, rng)
        if points.shape[0]:
            add("iron", "basal_ganglia", points[0], float(rng.uniform(1.5, 3.0)),
                float(rng.uniform(0.08, 0.2)), float(rng.uniform(10.0, 35.0)))
    return mimics
