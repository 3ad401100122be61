"""``cmbdetect evaluate``: cluster-wise / VALDO metrics, per-stage table and FROC of a detection folder."""

from __future__ import annotations

import argparse
import json
import sys

from CMBDetectLib.volume import atomic_write_text

NAME = "evaluate"
HELP = "compare `cmbdetect detect` outputs with ground-truth labels (TPR, FPavg, precision, F1, FROC)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred_dir", metavar="PRED_DIR",
                        help="folder written by `cmbdetect detect --out` "
                             "(<stem>_cmb.nii.gz, <stem>_candidates.json)")
    parser.add_argument("gt_dir", metavar="GT_DIR",
                        help="folder of ground-truth label maps <stem>.nii.gz, "
                             "or a dataset folder (labelsTr/)")
    parser.add_argument("--froc", metavar="PNG", help="draw the FROC curves of every stage to this PNG file")
    parser.add_argument("--json", metavar="OUT",
                        help="write every number (per scan, per stage, FROC) as JSON")
    parser.add_argument("--by-modality", action="store_true", help="one table row per modality")
    parser.add_argument("--allow-missing", action="store_true",
                        help="evaluate only the ground-truth cases that have a detection")
    parser.add_argument("-v", "--verbose", action="store_true", help="one table row per scan")


def run(args: argparse.Namespace) -> int:
    from CMBDetectLib.evaluate import evaluate, format_report, write_froc_png

    report = evaluate(args.pred_dir, args.gt_dir, allow_missing=args.allow_missing)
    print(format_report(report, verbose=args.verbose, by_modality=args.by_modality))
    if args.froc:
        path = write_froc_png(report, args.froc)
        print(f"FROC curves: {path}", file=sys.stderr)
    if args.json:
        path = atomic_write_text(args.json, json.dumps(report.to_json_dict(), indent=2) + "\n")
        print(f"metrics: {path}", file=sys.stderr)
    return 0
