"""``cmbdetect export``: saved reviews -> training dataset (nnU-Net v2 raw layout + CMBDetect extras)."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "export"
HELP = ("export reviewed cases (<case>.review.json next to <case>.seg.nrrd or an instance label map) into a "
        "training dataset")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reviews", nargs="+", metavar="REVIEW_JSON",
                        help="saved review(s), <case>.review.json (schema cmbdetect.review/1)")
    parser.add_argument("--dataset", required=True, metavar="DIR",
                        help="dataset folder (created if needed; an exported case is replaced, never "
                             "duplicated)")
    parser.add_argument("--allow-pending", action="store_true",
                        help="export even if candidates are still pending (they become unlabelled, with a "
                             "warning)")
    parser.add_argument("--reviewer", metavar="NAME",
                        help="reviewer to record (default: the one in the review)")
    parser.add_argument("--labels", metavar="PATH",
                        help="segmentation or instance label map to use instead of the one next to the "
                             "review (only with a single review)")
    parser.add_argument("--image", metavar="PATH",
                        help="image to use instead of the path recorded in the review (only with a single "
                             "review; must be the same file: its sha256 is checked)")
    parser.add_argument("--progress", choices=("text", "json", "none"), default="text",
                        help="progress lines on stderr (text) or stdout (json, for the Slicer runner)")


def run(args: argparse.Namespace) -> int:
    from CMBDetectLib.dataset import validate_dataset
    from CMBDetectLib.dataset_export import export_saved_review
    from CMBDetectLib.errors import InputError
    from CMBDetectLib.progress import json_lines_progress, no_progress, scaled, text_progress

    if (args.labels or args.image) and len(args.reviews) > 1:
        raise InputError("--labels and --image apply to one review; export the reviews one at a time")
    reporter = {"text": text_progress, "json": json_lines_progress}.get(args.progress)
    progress = reporter() if reporter else no_progress
    failures = 0
    for index, review in enumerate(args.reviews):
        step = scaled(progress, index / len(args.reviews), (index + 1) / len(args.reviews))
        try:
            result = export_saved_review(review, args.dataset, labels_path=args.labels, image_path=args.image,
                                         allow_pending=args.allow_pending, reviewer=args.reviewer,
                                         progress=step)
        except InputError as error:
            # One bad review must not stop the others; each case is all-or-nothing on its own.
            print(f"cmbdetect export: error: {review}: {error}", file=sys.stderr)
            failures += 1
            continue
        if args.progress == "json":
            print(json.dumps({"type": "result", "case": result.case, "replaced": result.replaced,
                              "cmbs": result.n_cmbs, "hard_negatives": result.n_hard_negatives,
                              "warnings": result.warnings}), flush=True)
        else:
            print(result.summary())
    problems = validate_dataset(args.dataset, check_voxels=False)
    for problem in problems:
        print(f"cmbdetect export: dataset problem: {problem}", file=sys.stderr)
    return 1 if failures or problems else 0
