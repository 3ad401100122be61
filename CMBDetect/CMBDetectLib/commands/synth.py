"""``cmbdetect synth``: generate a synthetic training dataset, or insert synthetic CMBs into a real scan."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from CMBDetectLib.errors import InputError

NAME = "synth"
HELP = ("Generate synthetic SWI / T2*-GRE / QSM scans with cerebral microbleeds (nnU-Net-style dataset), "
        "or insert synthetic CMBs into a real scan (--into).")

MIXED_WEIGHTS = {"swi": 0.5, "t2s": 0.3, "qsm": 0.2}
BALANCED_ORDER = ("swi", "t2s", "qsm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output dataset folder")
    parser.add_argument("--n", type=int, default=10, metavar="N", help="number of cases (default 10)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--start-index", type=int, default=0, metavar="I",
                        help="index of the first case (to extend a dataset reproducibly)")
    parser.add_argument("--modality", choices=["swi", "t2s", "qsm", "mixed", "balanced"], default="mixed",
                        help="image type; mixed draws one per case (50 %% SWI, 30 %% T2*, 20 %% QSM; default), "
                             "balanced takes SWI, T2*, QSM in turn (case index modulo 3)")
    parser.add_argument("--slice-thickness", type=float, default=None, metavar="MM",
                        help="fixed slice thickness (default: random 1-5 mm)")
    parser.add_argument("--in-plane", type=float, nargs=2, default=(0.5, 1.0), metavar=("MIN", "MAX"),
                        help="in-plane voxel size range in mm (default 0.5 1.0)")
    parser.add_argument("--min-cmbs", type=int, default=0, help="minimum CMBs per case (default 0)")
    parser.add_argument("--max-cmbs", type=int, default=60, help="maximum CMBs per case (default 60)")
    parser.add_argument("--radius-mean", type=float, default=1.5, metavar="MM",
                        help="mean CMB radius of the log-normal prior (default 1.5 mm, the clinical prior; "
                             "radii stay within 1-5 mm, i.e. 2-10 mm diameter)")
    parser.add_argument("--radius-sd", type=float, default=0.45, metavar="MM",
                        help="standard deviation of the CMB radius prior (default 0.45 mm)")
    parser.add_argument("--anatomy", choices=["auto", "template", "procedural"], default="auto",
                        help="MNI152 template (needs nilearn), procedural phantom, or auto (default)")
    parser.add_argument("--anatomy-spacing", type=float, default=None, metavar="MM",
                        help="grid of the anatomical model (default: template 1.0, procedural 1.25); "
                             "coarser is faster")
    parser.add_argument("--into", default=None, metavar="IMAGE",
                        help="insert synthetic CMBs into this real scan instead of generating phantoms")
    parser.add_argument("--mask", default=None, metavar="MASK", help="brain mask for --into (optional)")
    parser.add_argument("--n-cmbs", type=int, default=5, metavar="K", help="CMBs to insert with --into")
    parser.add_argument("--progress", choices=["json", "text"], default="text",
                        help="progress lines: json (one object per line on stdout) or text")


def _modality_for(seed: int, index: int, requested: str) -> str:
    if requested == "balanced":
        return BALANCED_ORDER[index % len(BALANCED_ORDER)]
    if requested != "mixed":
        return requested
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 7]))
    names = list(MIXED_WEIGHTS)
    return str(rng.choice(names, p=[MIXED_WEIGHTS[n] for n in names]))


def _emit(args: argparse.Namespace, text: str, record: dict) -> None:
    if args.progress == "json":
        sys.stdout.write(json.dumps(record) + "\n")
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _check(args: argparse.Namespace) -> None:
    if args.n < 0:
        raise InputError("--n must be >= 0")
    if args.min_cmbs < 0 or args.max_cmbs < args.min_cmbs:
        raise InputError("--min-cmbs / --max-cmbs must satisfy 0 <= min <= max")
    if args.slice_thickness is not None and not 0.2 <= args.slice_thickness <= 10.0:
        raise InputError("--slice-thickness must be between 0.2 and 10 mm")
    if not 0.2 <= args.in_plane[0] <= args.in_plane[1] <= 3.0:
        raise InputError("--in-plane MIN MAX must satisfy 0.2 <= MIN <= MAX <= 3 mm")
    if args.n_cmbs < 0:
        raise InputError("--n-cmbs must be >= 0")
    if not 1.0 <= args.radius_mean <= 5.0 or not 0.0 < args.radius_sd <= 5.0:
        raise InputError("--radius-mean must be between 1 and 5 mm and --radius-sd between 0 and 5 mm")
    if args.anatomy_spacing is not None and not 0.5 <= args.anatomy_spacing <= 3.0:
        raise InputError("--anatomy-spacing must be between 0.5 and 3 mm")


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.into:
        return _run_into(args)
    from CMBDetectLib.synth.dataset_writer import case_id, write_case, write_dataset_json
    from CMBDetectLib.synth.generator import SynthConfig, generate_case

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = SynthConfig(anatomy=args.anatomy, in_plane_range_mm=tuple(args.in_plane),
                         slice_thickness_mm=args.slice_thickness, min_cmbs=args.min_cmbs,
                         max_cmbs=args.max_cmbs, head_spacing_mm=args.anatomy_spacing,
                         radius_mean_mm=args.radius_mean, radius_sd_mm=args.radius_sd)
    started = time.perf_counter()
    total_cmbs = 0
    for number in range(args.start_index, args.start_index + args.n):
        modality = _modality_for(args.seed, number, args.modality)
        case_start = time.perf_counter()
        case = generate_case(args.seed, modality, index=number, config=config)
        identifier = case_id(modality, number)
        write_case(case, out, identifier)
        seconds = time.perf_counter() - case_start
        total_cmbs += len(case.cmbs)
        spacing = "x".join(f"{s:.2f}" for s in case.image.spacing)
        acquisition = case.parameters["acquisition"]
        done = number - args.start_index + 1
        _emit(args, f"{identifier}: {len(case.cmbs)} CMBs, {len(case.mimics)} mimics, {spacing} mm, "
                    f"{acquisition['b0_tesla']:.1f} T TE {acquisition['te_ms']:.0f} ms, "
                    f"{seconds:.1f} s",
              {"type": "case", "case": identifier, "modality": modality, "cmbs": len(case.cmbs),
               "mimics": len(case.mimics), "spacing": list(case.image.spacing), "seconds": round(seconds, 3),
               "fraction": round(done / max(args.n, 1), 4)})
    dataset_modality = "mixed" if args.modality == "balanced" else args.modality
    write_dataset_json(out, dataset_modality)
    elapsed = time.perf_counter() - started
    _emit(args, f"wrote {args.n} cases ({total_cmbs} CMBs) to {out} in {elapsed:.1f} s",
          {"type": "summary", "cases": args.n, "cmbs": total_cmbs, "out": str(out),
           "seconds": round(elapsed, 3)})
    return 0


def _run_into(args: argparse.Namespace) -> int:
    from CMBDetectLib.synth.insert import insert_cmbs_into_file

    modality = args.modality if args.modality not in ("mixed", "balanced") else None
    started = time.perf_counter()
    result = insert_cmbs_into_file(args.into, args.out, n_cmbs=args.n_cmbs, modality=modality,
                                   mask_path=args.mask, seed=args.seed)
    elapsed = time.perf_counter() - started
    _emit(args, f"{result['case']}: inserted {len(result['cmbs'])} CMBs ({result['modality']}) into "
                f"{args.into} -> {args.out} in {elapsed:.1f} s",
          {"type": "summary", "case": result["case"], "cmbs": len(result["cmbs"]),
           "modality": result["modality"], "out": str(args.out), "seconds": round(elapsed, 3)})
    return 0
