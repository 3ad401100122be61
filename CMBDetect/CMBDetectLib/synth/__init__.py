"""Synthetic SWI / T2*-GRE / QSM scans with cerebral microbleeds and their mimics (``cmbdetect synth``).

Public API::

    from CMBDetectLib.synth import generate_case, SynthConfig, CMBSpec, write_case, write_dataset_json
    case = generate_case(seed, "swi", index=i, config=SynthConfig(in_plane_range_mm=(0.7, 1.0)))
    case.image, case.label, case.instances, case.brain_mask   # Volumes on one grid
    case.cmbs, case.mimics                                    # records (centre RAS mm, radius, region, ...)
    insert_cmbs(real_volume, n_cmbs=5, modality="swi")        # synthetic CMBs in a real scan
"""

from CMBDetectLib.synth.cmbs import CMBSpec
from CMBDetectLib.synth.dataset_writer import case_id, write_case, write_dataset_json
from CMBDetectLib.synth.generator import (
    CMBRecord,
    MimicRecord,
    SynthConfig,
    SyntheticCase,
    case_rng,
    generate_case,
)
from CMBDetectLib.synth.insert import InsertionResult, insert_cmbs

__all__ = ["CMBRecord", "CMBSpec", "InsertionResult", "MimicRecord", "SynthConfig", "SyntheticCase",
           "case_id", "case_rng", "generate_case", "insert_cmbs", "write_case", "write_dataset_json"]
