"""Write synthetic cases in the CMBDetect dataset layout (nnU-Net v2 raw + ``cmbdetect/`` extras).

```
DATASET/dataset.json
DATASET/imagesTr/<case>_0000.nii.gz
DATASET/labelsTr/<case>.nii.gz                 binary uint8
DATASET/cmbdetect/instances/<case>.nii.gz      uint16, k = CMB k
DATASET/cmbdetect/reviews/<case>.json          schema "cmbdetect.review/1", decision "synthetic"
```
Every file is written atomically (temporary file + rename); ``dataset.json`` is rewritten from the cases
actually present, so an interrupted run leaves a consistent, smaller dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from CMBDetectLib.synth.generator import SyntheticCase
from CMBDetectLib.volume import Volume, atomic_write_text, write_volume_atomic

REVIEW_SCHEMA = "cmbdetect.review/1"
CHANNEL_NAMES = {"swi": "SWI", "t2s": "T2star", "qsm": "QSM", "mixed": "SWI_T2star_QSM"}


def case_id(modality: str, number: int) -> str:
    """``synth_swi_00012``."""
    return f"synth_{modality}_{number:05d}"


def review_document(case: SyntheticCase, identifier: str) -> dict:
    """The per-case JSON: every CMB (decision ``synthetic``) and every mimic as a hard negative."""
    return {
        "schema": REVIEW_SCHEMA,
        "case": identifier,
        "modality": case.modality,
        "subject": identifier,
        "source": "synthetic",
        "image": {"shape_kji": list(case.image.array.shape), "spacing": list(case.image.spacing),
                  "origin": list(case.image.origin), "direction": list(case.image.direction)},
        "cmbs": [{"id": record.id, "decision": "synthetic", "centroid_ras": list(record.centre_ras),
                  "centroid_kji": list(record.centre_kji), "radius_mm": record.radius_mm,
                  "region": record.region, "region_group": record.region_group,
                  "chi_ppm": record.chi_ppm, "touches_vessel": record.touches_vessel,
                  "volume_voxels": record.volume_voxels, "volume_mm3": record.volume_mm3}
                 for record in case.cmbs],
        "hard_negatives": [{"centroid_ras": list(m.centre_ras), "centroid_kji": list(m.centre_kji),
                            "kind": m.kind, "site": m.site, "radius_mm": m.radius_mm, "chi_ppm": m.chi_ppm}
                           for m in case.mimics],
        "model": None,
        "thresholds": None,
        "reviewer": "cmbdetect-synth",
        "time": None,
        "generator": case.parameters,
    }


def write_case(case: SyntheticCase, out_dir: str | Path, identifier: str) -> dict[str, Path]:
    """Write one case's four files (atomically); returns their paths."""
    out = Path(out_dir)
    paths = {
        "image": out / "imagesTr" / f"{identifier}_0000.nii.gz",
        "label": out / "labelsTr" / f"{identifier}.nii.gz",
        "instances": out / "cmbdetect" / "instances" / f"{identifier}.nii.gz",
        "review": out / "cmbdetect" / "reviews" / f"{identifier}.json",
    }
    write_volume_atomic(case.image, paths["image"])
    write_volume_atomic(Volume(case.label.array.astype(np.uint8), case.label.spacing, case.label.origin,
                               case.label.direction), paths["label"])
    write_volume_atomic(Volume(case.instances.array.astype(np.uint16), case.instances.spacing,
                               case.instances.origin, case.instances.direction), paths["instances"])
    atomic_write_text(paths["review"], json.dumps(review_document(case, identifier), indent=1) + "\n")
    return paths


def write_dataset_json(out_dir: str | Path, modality: str, name: str = "CMBDetectSynthetic",
                       description: str = "Synthetic SWI / T2*-GRE / QSM scans with cerebral microbleeds "
                                          "(CMBDetect generator)") -> Path:
    """(Re)write ``dataset.json`` from the label files present (nnU-Net v2 raw format)."""
    out = Path(out_dir)
    cases = sorted(path.name[: -len(".nii.gz")] for path in (out / "labelsTr").glob("*.nii.gz"))
    present = [c for c in cases if (out / "imagesTr" / f"{c}_0000.nii.gz").is_file()]
    document = {
        "name": name,
        "description": description,
        "channel_names": {"0": CHANNEL_NAMES.get(modality, modality)},
        "labels": {"background": 0, "cmb": 1},
        "numTraining": len(present),
        "file_ending": ".nii.gz",
        "cmbdetect": {"source": "synthetic", "modality": modality, "cases": present},
    }
    return atomic_write_text(out / "dataset.json", json.dumps(document, indent=1) + "\n")
