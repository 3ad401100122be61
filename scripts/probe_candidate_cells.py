"""Diagnostic: where does a model lose CMBs and make false positives, per modality x slice-thickness cell?

``python scripts/probe_candidate_cells.py MODEL_DIR [--th-det 0.4] [--th-disc 0.5]`` runs the model on the
development scans (those of ``calibrate_model.py``, student test-time flips as the model has them) and prints,
per cell, before the shape filters:
- the CMBs, and how many of them any stage-1 candidate at ``--th-det`` touches (the candidate stage's reach);
- the candidates, the positive ones (touching a CMB) and the negative ones;
- the student's ROC AUC separating positive from negative candidates;
- the negatives the student scores ``>= --th-disc`` and the positives it scores below.
A cell with a low reach needs a better stage 1; a cell with many negatives above ``--th-disc`` at a high AUC
holds many mimics, not a poor student; a low AUC is the student. ``--save FILE`` keeps the per-candidate rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibrate_model import development_cases  # noqa: E402
from evaluate_model import DEV_PER_CELL  # noqa: E402

from CMBDetectLib.calibration import CalibrationGrid, collect  # noqa: E402
from CMBDetectLib.model_package import ModelPackage  # noqa: E402


def slice_thickness_mm(image: Path) -> int:
    """The coarsest spacing of an image, from its header only (the voxels were read once, by ``collect``)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image))
    reader.ReadImageInformation()
    return int(round(max(reader.GetSpacing())))


def candidate_rows(model: ModelPackage, dev_dir: Path, per_cell: int, th_det: float) -> tuple[list[dict], dict]:
    """One row per stage-1 candidate (cell, student score, positive or not) and the CMB count per cell."""
    cases = development_cases(dev_dir, per_cell)
    scans = collect(model, cases, CalibrationGrid(th_det=(th_det,)), flip_options=(model.student_flips,),
                    progress=lambda fraction, message: print(message, flush=True))[model.student_flips]
    rows, cells = [], defaultdict(lambda: {"cmbs": 0, "reached": 0})
    for scan, (_, image, _, _) in zip(scans, cases):
        cell = f"{scan.modality} {slice_thickness_mm(image)} mm"
        table = scan.by_th_det[th_det]
        cells[cell]["cmbs"] += scan.n_gt
        cells[cell]["reached"] += len({cmb for hits in table.hits for cmb in hits})
        rows += [{"case": scan.case, "cell": cell, "p_disc": float(p), "positive": bool(hits)}
                 for p, hits in zip(table.p_disc, table.hits)]
    return rows, dict(cells)


def print_table(rows: list[dict], cells: dict, th_disc: float) -> None:
    print(f"cell         CMBs reached  candidates positive negative   AUC  neg>={th_disc:g}  pos<{th_disc:g}")
    for cell in sorted(cells):
        p = np.array([r["p_disc"] for r in rows if r["cell"] == cell])
        y = np.array([r["positive"] for r in rows if r["cell"] == cell], dtype=bool)
        auc = roc_auc_score(y, p) if 0 < y.sum() < len(y) else float("nan")
        print(f"{cell:<12} {cells[cell]['cmbs']:4d} {cells[cell]['reached']:7d}  {len(p):10d} {y.sum():8d} "
              f"{(~y).sum():8d}  {auc:.3f}  {int(((p >= th_disc) & ~y).sum()):7d}  {int(((p < th_disc) & y).sum()):6d}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--dev", default="build/evaluation_dev/dev")
    parser.add_argument("--per-cell", type=int, default=DEV_PER_CELL)
    parser.add_argument("--th-det", type=float, default=None, help="default: the model's own Th_Cdet")
    parser.add_argument("--th-disc", type=float, default=0.5)
    parser.add_argument("--save", default=None, help="write the per-candidate rows (JSON) here")
    args = parser.parse_args()
    model = ModelPackage.load(args.model)
    th_det = float(args.th_det if args.th_det is not None else model.thresholds.get("th_det", 0.5))
    rows, cells = candidate_rows(model, Path(args.dev), args.per_cell, th_det)
    if args.save:
        Path(args.save).write_text(json.dumps({"th_det": th_det, "cells": cells, "rows": rows}), encoding="utf-8")
    print(f"{model.label}, Th_Cdet {th_det:g}, {sum(c['cmbs'] for c in cells.values())} development CMBs")
    print_table(rows, cells, args.th_disc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
