"""Tissue magnetic properties (proton density, R2*, susceptibility chi) and their maps on the head grid.

Values are literature-typical at 3 T, relative to CSF (chi in ppm, SI): grey matter slightly paramagnetic,
myelinated white matter diamagnetic, iron-rich deep nuclei paramagnetic (globus pallidus, substantia nigra,
red nucleus, dentate strongest; they rise with age), bone diamagnetic, air +9.4 ppm relative to tissue.
Lesions: CMBs (haemosiderin) strongly paramagnetic with very short T2*; calcifications diamagnetic
(negative chi) with short T2*; venous blood paramagnetic (deoxyhaemoglobin).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from CMBDetectLib.synth.anatomy import NUCLEI, Anatomy, ras_to_lps

# Air cavities near the skull base (RAS centre, semi-axes mm): frontal and sphenoid sinuses, mastoid air
# cells and ear canals -- the sources of the classic orbitofrontal / inferior temporal SWI artefacts.
AIR_CAVITIES = (
    ((0.0, 66.0, 4.0), (14.0, 6.0, 10.0)),
    ((0.0, 18.0, -42.0), (11.0, 12.0, 9.0)),
    ((44.0, -32.0, -44.0), (8.0, 10.0, 8.0)),
    ((-44.0, -32.0, -44.0), (8.0, 10.0, 8.0)),
    ((60.0, -20.0, -40.0), (8.0, 4.0, 4.0)),
    ((-60.0, -20.0, -40.0), (8.0, 4.0, 4.0)),
)

# code -> (chi ppm, R2* 1/s at 3 T) of deep nuclei in a middle-aged adult.
NUCLEUS_PROPERTIES = {1: (0.05, 30.0), 2: (0.14, 48.0), 3: (0.045, 26.0), 4: (0.01, 22.0), 5: (0.11, 40.0),
                      6: (0.13, 46.0), 7: (0.09, 36.0)}


@dataclass
class TissueProperties:
    """Per-subject random tissue values (PD relative, R2* 1/s at 3 T, chi ppm)."""

    pd: dict[str, float]
    r2s: dict[str, float]
    chi: dict[str, float]
    nuclei: dict[int, tuple[float, float]]
    csf_rim_mm: float
    skull_mm: float
    scalp_mm: float
    blood_chi: float
    blood_r2s: float

    def to_dict(self) -> dict:
        return {"pd": self.pd, "r2s_3t": self.r2s, "chi_ppm": self.chi,
                "nuclei": {NUCLEI[c][0]: {"chi_ppm": v[0], "r2s_3t": v[1]} for c, v in self.nuclei.items()},
                "csf_rim_mm": self.csf_rim_mm, "skull_mm": self.skull_mm, "scalp_mm": self.scalp_mm,
                "blood_chi_ppm": self.blood_chi, "blood_r2s_3t": self.blood_r2s}


def sample_tissue_properties(rng: np.random.Generator) -> TissueProperties:
    def jitter(value: float, spread: float = 0.08) -> float:
        return float(value * rng.uniform(1 - spread, 1 + spread))

    iron = rng.uniform(0.5, 1.6)  # age-related deep-grey-matter iron
    pd = {"csf": 1.0, "gm": jitter(0.86, 0.05), "wm": jitter(0.72, 0.05), "skull": 0.08,
          "scalp": jitter(0.85, 0.15)}
    r2s = {"csf": 2.5, "gm": jitter(17.0), "wm": jitter(21.0), "skull": 400.0, "scalp": jitter(35.0, 0.2)}
    chi = {"csf": 0.0, "gm": jitter(0.015, 0.5), "wm": jitter(-0.03, 0.3), "skull": -1.8, "scalp": 0.6}
    nuclei = {code: (float(c * iron * rng.uniform(0.85, 1.15)), float(22.0 + (r - 22.0) * iron))
              for code, (c, r) in NUCLEUS_PROPERTIES.items()}
    return TissueProperties(pd=pd, r2s=r2s, chi=chi, nuclei=nuclei,
                            csf_rim_mm=float(rng.uniform(1.0, 4.0)), skull_mm=float(rng.uniform(4.5, 7.5)),
                            scalp_mm=float(rng.uniform(4.0, 8.0)), blood_chi=float(rng.uniform(0.4, 0.65)),
                            blood_r2s=float(rng.uniform(35.0, 70.0)))


def r2s_at_field(r2s_3t: np.ndarray | float, b0_tesla: float) -> np.ndarray | float:
    """R2* scales roughly linearly with B0 above an intrinsic R2 floor."""
    return r2s_3t * (0.45 + 0.55 * b0_tesla / 3.0)


@dataclass
class HeadMaps:
    pd: np.ndarray
    r2s: np.ndarray       # at the acquisition's B0
    chi: np.ndarray       # relative to CSF, tissue only (used for QSM)
    chi_field: np.ndarray  # chi including air (source of the field)
    head: np.ndarray      # bool: inside the scalp
    brain: np.ndarray     # float fraction of intracranial tissue


def head_property_maps(anatomy: Anatomy, props: TissueProperties, b0_tesla: float,
                       air_artefact: float) -> HeadMaps:
    """PD, R2*, chi maps of the whole head (brain, CSF rim, skull, scalp, sinuses) on the head grid."""
    gm, wm, csf = anatomy.gm, anatomy.wm, anatomy.csf
    outside = anatomy.outside_mm
    rim = props.csf_rim_mm
    # Shells beyond the brain envelope: CSF rim (atrophy-dependent), skull, scalp, then air. Cumulative
    # ramps give partial volume at each boundary.
    beyond = outside > 0
    ramp_rim = np.where(beyond, np.clip(rim + 0.5 - outside, 0, 1), 0).astype(np.float32)
    ramp_skull = np.where(beyond, np.clip(rim + props.skull_mm + 0.5 - outside, 0, 1), 0).astype(np.float32)
    ramp_scalp = np.where(beyond, np.clip(rim + props.skull_mm + props.scalp_mm + 0.5 - outside, 0, 1),
                          0).astype(np.float32)
    skull = ramp_skull - ramp_rim
    scalp = ramp_scalp - ramp_skull
    csf_all = csf + ramp_rim
    tissue_fraction = np.clip(csf + gm + wm + ramp_scalp, 0, 1)

    def mix(values: dict[str, float]) -> np.ndarray:
        out = np.float32(values["csf"]) * csf_all
        out += np.float32(values["gm"]) * gm
        out += np.float32(values["wm"]) * wm
        out += np.float32(values["skull"]) * skull
        out += np.float32(values["scalp"]) * scalp
        return out

    pd = mix(props.pd)
    r2s = mix(props.r2s)
    chi = np.float32(props.chi["gm"]) * gm + np.float32(props.chi["wm"]) * wm
    deep = np.flatnonzero(anatomy.nuclei.ravel())
    if deep.size:
        codes = anatomy.nuclei.ravel()[deep]
        tissue = gm.ravel()[deep] + wm.ravel()[deep]
        chi_table = np.zeros(256, np.float32)
        r2s_table = np.zeros(256, np.float32)
        for code, (chi_value, r2s_value) in props.nuclei.items():
            chi_table[code] = chi_value
            r2s_table[code] = r2s_value - props.r2s["gm"]
        chi.ravel()[deep] += chi_table[codes] * tissue
        r2s.ravel()[deep] += r2s_table[codes] * tissue
    # Air outside the head is the reference (0): tissue is -9.4 ppm relative to it; only differences matter
    # to the dipole kernel. Bone and fat add their own offsets.
    chi_field = chi + np.float32(props.chi["skull"]) * skull + np.float32(props.chi["scalp"]) * scalp
    chi_field -= np.float32(9.4) * tissue_fraction
    if air_artefact > 0:
        for centre_ras, axes in AIR_CAVITIES:
            centre = ras_to_lps(np.array(centre_ras))
            lo = anatomy.lps_to_index(centre - np.array(axes))[0]
            hi = anatomy.lps_to_index(centre + np.array(axes))[0]
            lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
            lo = np.clip(np.floor(lo).astype(int), 0, np.array(anatomy.shape))
            hi = np.clip(np.ceil(hi).astype(int) + 1, 0, np.array(anatomy.shape))
            if np.any(hi <= lo):
                continue
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            z = (anatomy.origin_lps[2] + anatomy.spacing * np.arange(lo[0], hi[0]))[:, None, None]
            y = (anatomy.origin_lps[1] + anatomy.spacing * np.arange(lo[1], hi[1]))[None, :, None]
            x = (anatomy.origin_lps[0] + anatomy.spacing * np.arange(lo[2], hi[2]))[None, None, :]
            rho = np.sqrt(((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2
                          + ((z - centre[2]) / axes[2]) ** 2)
            cavity = np.clip((1.0 - rho) * 4.0, 0, 1) * (outside[box] > 0.5) * air_artefact
            cavity = cavity.astype(np.float32)
            chi_field[box] += np.float32(9.4) * cavity * tissue_fraction[box]
            pd[box] *= 1 - cavity
    brain_fraction = np.clip(gm + wm + csf, 0, 1)
    return HeadMaps(pd, r2s_at_field(r2s, b0_tesla).astype(np.float32), chi, chi_field,
                    tissue_fraction > 0.5, brain_fraction)
