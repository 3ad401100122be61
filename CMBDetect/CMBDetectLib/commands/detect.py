"""``cmbdetect detect``: find CMBs in one or more scans and write label maps + candidate JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from CMBDetectLib.errors import CMBDetectError
from CMBDetectLib.modality import guess_modality
from CMBDetectLib.progress import json_lines_progress, no_progress, text_progress
from CMBDetectLib.volume import atomic_write_text, image_stem, read_volume, write_volume_atomic

NAME = "detect"
HELP = "detect cerebral microbleeds in SWI / T2*-GRE / QSM volumes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="NIfTI / NRRD / MHA volume(s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--modality", choices=["swi", "t2s", "qsm"], default=None,
                        help="input modality (default: guessed from the file name, then the intensities)")
    parser.add_argument("--mask", metavar="MASK", help="brain mask on the image grid (default: estimated)")
    parser.add_argument("--model", default="default", metavar="NAME|DIR", help="model package (default: bundled)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    parser.add_argument("--th-det", type=float, default=None, metavar="F", help="stage-1 threshold Th_Cdet")
    parser.add_argument("--th-disc", type=float, default=None, metavar="F", help="student threshold Th_Cdisc")
    parser.add_argument("--min-volume-mm3", type=float, default=None, metavar="MM3",
                        help="post-processing: drop smaller candidates (default: the model's)")
    parser.add_argument("--max-ellipticity", type=float, default=None, metavar="E",
                        help="post-processing: drop more elongated candidates, 0 = round .. 1 = line")
    parser.add_argument("--min-edge-distance-mm", type=float, default=None, metavar="MM",
                        help="post-processing: drop candidates closer to the brain edge")
    parser.add_argument("--save-prob", action="store_true",
                        help="also write <stem>_prob.nii.gz and <stem>_session.npz (review without re-running)")
    parser.add_argument("--batch-size", type=int, default=8, help="stage-1 windows per batch (GPU memory)")
    parser.add_argument("--progress", choices=["json", "text", "none"], default="text",
                        help="progress lines: json = one JSON object per line on stdout (for Slicer)")


def run(args: argparse.Namespace) -> int:
    from CMBDetectLib.model_package import ModelPackage
    from CMBDetectLib.pipeline import DetectionParameters, DetectionSession

    if args.progress == "json":
        progress, emit = json_lines_progress(sys.stdout), _emit_json
    elif args.progress == "text":
        progress, emit = text_progress(sys.stdout), None
    else:
        progress, emit = no_progress, None
    out_dir = Path(args.out)
    model = ModelPackage.load(args.model)
    overrides = {"th_det": args.th_det, "th_disc": args.th_disc, "min_volume_mm3": args.min_volume_mm3,
                 "max_ellipticity": args.max_ellipticity, "min_edge_distance_mm": args.min_edge_distance_mm}
    DetectionParameters.for_model(model, **overrides)         # bad values fail before any image is read
    mask = read_volume(args.mask) if args.mask else None
    failures = 0
    for index, image_path in enumerate(args.images):
        start = time.perf_counter()
        try:
            volume = read_volume(image_path)
            modality, why = (args.modality, "given") if args.modality else guess_modality(
                Path(image_path).name, volume.array)
            session = DetectionSession(model, device=args.device, batch_size=args.batch_size,
                                       progress=_per_image(progress, index, len(args.images), image_path))
            # the model's Th_Cdisc for this scan's modality, unless --th-disc says otherwise
            params = DetectionParameters.for_model(model, modality, **overrides)
            result = session.run(volume, modality, mask, params)
            outputs = _write_outputs(out_dir, image_path, volume, modality, result, session, args.save_prob)
        except CMBDetectError as error:
            if len(args.images) == 1:
                raise
            print(f"cmbdetect detect: error: {image_path}: {error}", file=sys.stderr)
            failures += 1
            continue
        elapsed = time.perf_counter() - start
        if emit:
            emit({"type": "result", "image": str(image_path), "modality": modality, "device": session.device_used,
                  "n_final": len(result.final_candidates), "n_candidates": len(result.candidates),
                  "seconds": round(elapsed, 2), "outputs": {k: str(v) for k, v in outputs.items()}})
        else:
            _print_summary(image_path, modality, why, session.device_used, result, outputs, elapsed)
    return 1 if failures else 0


def _per_image(progress, index: int, count: int, path: str):
    def report(fraction: float, message: str) -> None:
        prefix = f"{Path(path).name}: " if count > 1 else ""
        progress((index + fraction) / count, prefix + message)
    return report


def _emit_json(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _write_outputs(out_dir: Path, image_path: str, volume, modality: str, result, session,
                   save_prob: bool) -> dict[str, Path]:
    """All files of one scan, each written to a temporary name then renamed; on failure none is left."""
    stem = image_stem(image_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = result.final_labels()
    outputs: dict[str, Path] = {}
    try:
        outputs["labels"] = write_volume_atomic(labels, out_dir / f"{stem}_cmb.nii.gz")
        record = result.to_json_dict(os.path.abspath(image_path), modality, image_shape=volume.shape_ijk,
                                     image_spacing=volume.spacing)
        record["device"] = session.device_used
        if save_prob:
            probability = session.probability_on_input()
            outputs["probability"] = write_volume_atomic(probability, out_dir / f"{stem}_prob.nii.gz")
            outputs["session"] = session.save(out_dir / f"{stem}_session.npz")
        record["outputs"] = {k: str(v) for k, v in outputs.items()}
        outputs["candidates"] = atomic_write_text(out_dir / f"{stem}_candidates.json",
                                                  json.dumps(record, indent=1) + "\n")
    except BaseException:
        for path in outputs.values():
            Path(path).unlink(missing_ok=True)
        raise
    return outputs


def _print_summary(image_path, modality, why, device, result, outputs, elapsed) -> None:
    final = result.final_candidates
    counts = result.counts_by_reason()
    print(f"{image_path}: {len(final)} CMB(s) from {len(result.candidates)} candidates "
          f"({modality}, {why}; {device}; {elapsed:.1f} s)")
    params = result.parameters
    # a limit that removes nothing is said so, not printed as "ellipticity <= 1"
    limits = [f"volume >= {params.min_volume_mm3:g} mm3" if params.min_volume_mm3 > 0 else "no volume limit",
              f"ellipticity <= {params.max_ellipticity:g}" if params.max_ellipticity < 1 else "no ellipticity limit",
              f"edge distance >= {params.min_edge_distance_mm:g} mm" if params.min_edge_distance_mm > 0
              else "no edge-distance limit"]
    print(f"  thresholds: Th_Cdet {params.th_det:g}, Th_Cdisc {params.th_disc:g}; {', '.join(limits)}")
    removed = ", ".join(f"{counts[k]} by {k.replace('_', ' ')}" for k in
                        ("discrimination", "volume", "ellipticity", "edge_distance") if counts.get(k))
    if removed:
        print(f"  removed: {removed}")
    if final:
        print(f"  {'id':>4} {'RAS (mm)':>24} {'vol mm3':>8} {'p_det':>6} {'p_disc':>6}")
        for c in final:
            ras = ", ".join(f"{v:.1f}" for v in c.centroid_ras)
            print(f"  {c.id:>4} {ras:>24} {c.volume_mm3:>8.1f} {c.p_det:>6.2f} {c.p_disc:>6.2f}")
    for kind, path in outputs.items():
        print(f"  {kind}: {path}")
