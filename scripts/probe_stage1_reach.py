"""Diagnostic: how many development-set CMBs can stage 1 reach at all, per modality x slice-thickness cell?

``python scripts/probe_stage1_reach.py MODEL_DIR`` runs the model's stage 1 on the development scans (those of
``calibrate_model.py``) and prints, per cell, the fraction of ground-truth CMBs whose highest stage-1 probability
reaches 0.05 ... 0.5. A CMB below the lowest ``Th_Cdet`` never becomes a candidate, whatever the student and
the filters do, so this is the ceiling of the candidate stage. ``--save FILE`` keeps the per-CMB rows (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibrate_model import development_cases  # noqa: E402
from evaluate_model import DEV_PER_CELL  # noqa: E402

from CMBDetectLib.model_package import ModelPackage  # noqa: E402
from CMBDetectLib.pipeline import DetectionParameters, DetectionSession  # noqa: E402
from CMBDetectLib.volume import read_volume  # noqa: E402

LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


def reach_rows(model: ModelPackage, dev_dir: Path, per_cell: int) -> list[dict]:
    """One row per ground-truth CMB: its cell and its highest stage-1 probability (on the image grid)."""
    rows = []
    for case, image, truth_path, modality in development_cases(dev_dir, per_cell):
        volume, truth = read_volume(image), read_volume(truth_path)
        session = DetectionSession(model, device="cpu")
        session.run(volume, modality, params=DetectionParameters.for_model(model, th_det=max(LEVELS)))
        probability, labels = session.probability_on_input().array, truth.array
        thickness = int(round(max(volume.spacing)))
        instances = np.unique(labels[labels > 0])
        # one pass over the volume for every CMB's peak and size
        peaks = ndimage.maximum(probability, labels, instances)
        sizes = ndimage.sum_labels(np.ones(labels.shape, np.int32), labels, instances)
        rows += [{"case": case, "modality": modality, "slice_mm": thickness, "cmb": int(instance),
                  "voxels": int(size), "p_max": float(peak)} for instance, peak, size in zip(instances, peaks, sizes)]
        print(f"{case}: {len(instances)} CMBs", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    cells: dict[str, list[float]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: (r["modality"], r["slice_mm"])):
        cells[f"{row['modality']} {row['slice_mm']} mm"].append(row["p_max"])
    cells["all"] = [row["p_max"] for row in rows]
    print("cell          CMBs  " + "  ".join(f">={level:<4}" for level in LEVELS))
    for name, values in cells.items():
        p = np.asarray(values)
        print(f"{name:<12} {len(p):5d}  " + "  ".join(f"{(p >= level).mean():6.2f}" for level in LEVELS))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--dev-dir", type=Path, default=Path("build/evaluation_dev/dev"))
    parser.add_argument("--save", type=Path, help="write the per-CMB rows to this JSON file")
    args = parser.parse_args()
    rows = reach_rows(ModelPackage.load(str(args.model)), args.dev_dir, DEV_PER_CELL)
    if args.save:
        args.save.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
