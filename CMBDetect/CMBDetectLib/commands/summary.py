"""``cmbdetect summary``: anatomical region of every CMB, clinical summary (CSV) and one-page HTML report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from CMBDetectLib.errors import InputError
from CMBDetectLib.volume import atomic_write_text, image_stem, read_volume

NAME = "summary"
HELP = "name the region of each CMB (atlas or parcellation) and write the clinical summary + HTML report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="the scan the candidates were detected on")
    parser.add_argument("candidates", metavar="CANDIDATES_JSON", help="<stem>_candidates.json from detect")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--mask", metavar="MASK",
                        help="brain mask on the image grid (helps the registration)")
    parser.add_argument("--parcellation", metavar="LABELMAP",
                        help="your own region label map on the scan (replaces the MNI atlas)")
    parser.add_argument("--parcellation-table", metavar="CSV",
                        help="label,region,category[,side,lobe] for --parcellation "
                             "(category: lobar, deep or infratentorial)")
    parser.add_argument("--th-definite", type=float, default=None, metavar="F",
                        help="p_disc at or above which a final CMB is 'definite' (default 0.8), "
                             "else 'possible'")
    parser.add_argument("--no-report", action="store_true", help="only the CSV/JSON files, no HTML/PNG")


def _read_candidates(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"candidates file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path.name} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("candidates"), list):
        raise InputError(f"{path.name} is not a cmbdetect candidates file (no 'candidates' list)")
    for candidate in data["candidates"]:
        if (not isinstance(candidate, dict) or "id" not in candidate
                or len(candidate.get("centroid_ras") or []) != 3):
            raise InputError(f"{path.name}: every candidate needs an id and a 3-value centroid_ras")
    return data


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from CMBDetectLib.anatomy.regions import Parcellation, assign_regions
    from CMBDetectLib.anatomy.registration import register_to_atlas
    from CMBDetectLib.anatomy.report import write_report
    from CMBDetectLib.anatomy.summary import (
        DEFAULT_TH_DEFINITE,
        summarise,
        write_cmb_table_csv,
        write_summary_csv,
    )

    if bool(args.parcellation) != bool(args.parcellation_table):
        raise InputError("--parcellation and --parcellation-table go together")
    th_definite = DEFAULT_TH_DEFINITE if args.th_definite is None else args.th_definite
    if not 0.0 <= th_definite <= 1.0:
        raise InputError(f"--th-definite must be between 0 and 1, got {th_definite}")
    out_dir = Path(args.out)
    scan = read_volume(args.image)
    stem = image_stem(args.image)
    data = _read_candidates(Path(args.candidates))
    shape = data.get("image", {}).get("shape")
    if shape and list(shape) != list(scan.shape_ijk):
        raise InputError(f"{Path(args.candidates).name} was made on a {shape} grid but "
                         f"{Path(args.image).name} is {list(scan.shape_ijk)}: not the same scan")
    mask = read_volume(args.mask) if args.mask else None
    candidates = data["candidates"]
    points = np.array([c["centroid_ras"] for c in candidates], dtype=float).reshape(-1, 3)

    registration = None
    if args.parcellation:
        parcellation = Parcellation.from_files(args.parcellation, args.parcellation_table)
        if not parcellation.labels.same_grid(scan, tolerance=1e-3):
            print("cmbdetect summary: note: the parcellation is on another grid; "
                  "it is used in physical space", file=sys.stderr)
        if any(entry.side is None for entry in parcellation.table.values()):
            try:  # left/right from the MNI registration for labels whose side the table does not give
                registration = register_to_atlas(scan, mask)
            except InputError as error:
                print(f"cmbdetect summary: warning: sides unknown ({error})", file=sys.stderr)
        regions = assign_regions(points, parcellation, registration=registration)
        region_labels = parcellation.labels
        brain = parcellation.labels.with_array(np.asarray(parcellation.labels.array) > 0)
        location = f"user parcellation {Path(args.parcellation).name} ({len(parcellation.table)} labels)"
    else:
        registration = register_to_atlas(scan, mask)
        regions = assign_regions(points, registration)
        region_labels = registration.warp_to_scan(scan, "labels")
        brain = registration.warp_to_scan(scan, "brain_mask")
        atlas = registration.atlas
        location = (f"{atlas.name}; affine registration, brain-mask Dice {registration.dice:.2f}, anatomical "
                    f"structure (eta^2) {registration.structure:.2f} (refused below "
                    f"{registration.quality['min_dice']} / {registration.quality['min_structure']}); "
                    f"regions are approximate (lobe borders to ~1 gyrus). Licence: {atlas.licence}.")

    th_disc = (data.get("parameters") or {}).get("th_disc")
    summary = summarise(candidates, regions, th_definite=th_definite, th_disc=th_disc)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_summary_csv(summary, out_dir / f"{stem}_summary.csv")
    write_cmb_table_csv(summary, out_dir / f"{stem}_cmbs.csv")
    enriched = dict(data)
    enriched["candidates"] = [{**c, "region": r.to_dict()} for c, r in zip(candidates, regions)]
    enriched["anatomy"] = {
        "source": "parcellation" if args.parcellation else "atlas",
        "location": location,
        "registration": registration.quality if registration is not None else None,
        "summary": summary.to_dict(),
    }
    atomic_write_text(out_dir / f"{stem}_candidates_anatomy.json", json.dumps(enriched, indent=1) + "\n")
    if registration is not None:
        import SimpleITK as sitk

        sitk.WriteTransform(registration.transform, str(out_dir / f"{stem}_to_mni.tfm"))
    if not args.no_report:
        modality = (data.get("image") or {}).get("modality") or "unknown"
        write_report(out_dir, stem, scan, summary, region_labels=region_labels, brain_mask=brain,
                     registration=registration, location_info=location,
                     scan_info={"file": Path(args.image).name, "modality": modality,
                                "grid": "x".join(str(s) for s in scan.shape_ijk),
                                "spacing (mm)": "x".join(f"{s:.2f}" for s in scan.spacing),
                                "model": (data.get("model") or {}).get("name", "?"),
                                "th_disc": th_disc if th_disc is not None else "?"})
    print(f"{stem}: {summary.total} CMBs ({', '.join(f'{v} {k}' for k, v in summary.by_category.items())}) "
          f"-> {out_dir}", file=sys.stderr)
    return 0
