"""Operating-point calibration: choose ``th_det``, ``th_disc`` and the post-processing limits of a model on a
development set (never the test set), and record the choice in its ``model.json``.

The networks run once per development scan (:class:`pipeline.DetectionSession`); every candidate of every
``th_det`` in the grid is then measured once (student probability, volume, ellipticity, edge distance, and
which ground-truth CMBs it touches, by the centroid rule of :func:`evaluate.candidate_hits`), so sweeping the
remaining parameters is only array arithmetic.

Objective (the project's target): the most CMBs found with at most ``max_fp_per_scan`` false positives per
scan; ties go to fewer false positives, then to the setting closest to the paper's defaults. The paper's
post-processing limits (5 voxels, ellipticity 0.2, 5 voxels from the edge) are in the grid, so calibration
can only keep or relax them where the development set shows they cost more CMBs than they save.

What is deployed is one ``th_det``, ellipticity and edge limit, with a ``th_disc`` and a minimum volume per
modality (``thresholds.th_disc_by_modality``, ``postprocessing.min_volume_mm3_by_modality``), each modality
held to the budget on its own scans; so the shared setting is chosen for the CMBs those per-modality points find
together (:func:`choose_for_modalities`), and the shared ``th_disc`` and volume (for a scan of unknown modality)
are the best ones at that setting.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from CMBDetectLib.errors import InputError
from CMBDetectLib.model_package import ModelPackage
from CMBDetectLib.postprocessing import PostprocessingParameters, passes_shape_filters
from CMBDetectLib.progress import ProgressCallback, no_progress
from CMBDetectLib.volume import atomic_write_text

PAPER = PostprocessingParameters()
FRONTIER_BUDGETS = (0.25, 0.5, 1.0, 2.0, 4.0)      # recorded: what each false-positive budget would buy
# Cached measurements (collect(cache_dir=...)) carry this: raise it when what measure_scan records changes.
MEASUREMENT_VERSION = 1


@dataclass(frozen=True)
class CalibrationGrid:
    th_det: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)
    th_disc: tuple[float, ...] = tuple(round(v, 2) for v in np.arange(0.05, 0.96, 0.05)) + (0.97, 0.99)
    # no limit, the paper's 5 working voxels, and about the smallest CMB (a sphere of radius 1 mm: 4.2 mm^3)
    min_volume_mm3: tuple[float, ...] = (0.0, PAPER.min_volume_mm3, 4.0)
    max_ellipticity: tuple[float, ...] = (PAPER.max_ellipticity, 0.3, 0.4, 0.5, 1.0)
    min_edge_distance_mm: tuple[float, ...] = (0.0, 2.0, PAPER.min_edge_distance_mm)


@dataclass
class CandidateTable:
    """Every stage-1 candidate of one scan at one ``th_det``, with what the filters need."""

    p_disc: np.ndarray
    volume_mm3: np.ndarray
    ellipticity: np.ndarray
    edge_distance_mm: np.ndarray
    hits: list[list[int]]          # ground-truth CMB ids each candidate touches


@dataclass
class ScanCandidates:
    case: str
    modality: str
    n_gt: int
    by_th_det: dict[float, CandidateTable]


@dataclass(frozen=True)
class OperatingPoint:
    th_det: float
    th_disc: float
    min_volume_mm3: float
    max_ellipticity: float
    min_edge_distance_mm: float
    tp: int
    fp: int
    n_gt: int
    n_scans: int

    @property
    def tpr(self) -> float:
        return self.tp / self.n_gt if self.n_gt else float("nan")

    @property
    def fp_per_scan(self) -> float:
        return self.fp / self.n_scans if self.n_scans else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "tpr": round(self.tpr, 4), "fp_per_scan": round(self.fp_per_scan, 4)}


def measure_scan(session, ground_truth: np.ndarray, label_volume, case: str, th_dets: Sequence[float]
                 ) -> ScanCandidates:
    """Candidates of a session that has run, at every ``th_det``, matched to ``ground_truth`` instances."""
    from CMBDetectLib.evaluate import candidate_hits
    from CMBDetectLib.pipeline import DetectionParameters

    tables = {}
    for th_det in th_dets:
        # every candidate kept: th_disc 0 and no shape filter, so each one's measures are reported
        result = session.refilter(DetectionParameters(th_det=th_det, th_disc=0.0, min_volume_mm3=0.0,
                                                      max_ellipticity=1.0, min_edge_distance_mm=0.0))
        records = [c.to_dict() for c in result.candidates]
        tables[float(th_det)] = CandidateTable(
            p_disc=np.array([c.p_disc for c in result.candidates], float),
            volume_mm3=np.array([c.volume_mm3 for c in result.candidates], float),
            ellipticity=np.array([c.ellipticity for c in result.candidates], float),
            edge_distance_mm=np.array([c.edge_distance_mm for c in result.candidates], float),
            hits=candidate_hits(ground_truth, label_volume, records))
    n_gt = int(len(np.unique(ground_truth[ground_truth > 0])))
    return ScanCandidates(case, str(session.modality), n_gt, tables)


def sweep(scans: Sequence[ScanCandidates], grid: CalibrationGrid) -> list[OperatingPoint]:
    """Cluster counts (centroid rule) of every grid setting over ``scans``."""
    if not scans:
        raise InputError("calibration needs at least one development scan")
    n_gt = sum(scan.n_gt for scan in scans)
    points = []
    for th_det in grid.th_det:
        tables = [scan.by_th_det[float(th_det)] for scan in scans]
        for min_volume, max_ellipticity, min_edge in itertools.product(
                grid.min_volume_mm3, grid.max_ellipticity, grid.min_edge_distance_mm):
            limits = PostprocessingParameters(min_volume, max_ellipticity, min_edge)
            shape_ok = [passes_shape_filters(t.volume_mm3, t.ellipticity, t.edge_distance_mm, limits)
                        for t in tables]
            for th_disc in grid.th_disc:
                tp = fp = 0
                for table, ok in zip(tables, shape_ok):
                    keep = np.flatnonzero(ok & (table.p_disc >= th_disc))
                    found = {gt for index in keep for gt in table.hits[index]}
                    tp += len(found)
                    fp += sum(1 for index in keep if not table.hits[index])
                points.append(OperatingPoint(float(th_det), float(th_disc), float(min_volume),
                                             float(max_ellipticity), float(min_edge), tp, fp, n_gt, len(scans)))
    return points


def _objective(point: OperatingPoint) -> tuple[int, int]:
    """Smaller is better: more CMBs found, then fewer false positives."""
    return (-point.tp, point.fp)


def better(a: OperatingPoint, b: OperatingPoint) -> bool:
    """``a`` beats ``b`` under the objective of :func:`choose`."""
    return _objective(a) < _objective(b)


def _distance_from_paper(point: OperatingPoint, default_th_det: float) -> float:
    return (abs(point.th_det - default_th_det) + abs(point.max_ellipticity - PAPER.max_ellipticity)
            + abs(point.min_volume_mm3 - PAPER.min_volume_mm3) / PAPER.min_volume_mm3
            + abs(point.min_edge_distance_mm - PAPER.min_edge_distance_mm) / PAPER.min_edge_distance_mm)


def choose(points: Sequence[OperatingPoint], max_fp_per_scan: float = 1.0,
           default_th_det: float = 0.5) -> OperatingPoint:
    """Most CMBs found within the false-positive budget; then fewer FPs; then closest to the paper."""
    if not points:
        raise InputError("no operating point to choose from")
    allowed = [p for p in points if p.fp_per_scan <= max_fp_per_scan + 1e-9]
    if not allowed:                                   # budget unreachable: the fewest false positives
        allowed = [min(points, key=lambda p: (p.fp, -p.tp))]
    return min(allowed, key=lambda p: (*_objective(p), _distance_from_paper(p, default_th_det), -p.th_disc))


def choose_by_modality(scans: Sequence[ScanCandidates], joint: OperatingPoint, grid: CalibrationGrid,
                       max_fp_per_scan: float = 1.0) -> dict[str, OperatingPoint]:
    """Per modality, ``joint``'s ``th_det``, ellipticity and edge limits with the ``th_disc`` and minimum volume
    (from ``grid``) that find the most of that modality's CMBs within the budget on that modality's scans
    (ties: fewer false positives, then closest to ``joint``'s minimum volume, then to its ``th_disc``).

    The targets are per modality (a scan is one modality), and neither the student's scores nor the CMBs'
    sizes are alike on all three: one shared ``th_disc`` spends one modality's false-positive budget on
    another's CMBs, and one shared minimum volume must keep QSM's CMBs (their true size, a few voxels on a
    thick slice), where blooming makes every SWI / T2* CMB larger than the smallest noise blobs.
    ``th_det`` stays shared, so the candidate cache does too.
    """
    chosen = {}
    for modality in sorted({s.modality for s in scans}):
        subset = [s for s in scans if s.modality == modality]
        points = sweep(subset, CalibrationGrid(
            th_det=(joint.th_det,), th_disc=grid.th_disc, min_volume_mm3=grid.min_volume_mm3,
            max_ellipticity=(joint.max_ellipticity,), min_edge_distance_mm=(joint.min_edge_distance_mm,)))
        allowed = [p for p in points if p.fp_per_scan <= max_fp_per_scan + 1e-9] or \
            [min(points, key=lambda p: (p.fp, -p.tp))]
        chosen[modality] = min(allowed, key=lambda p: (*_objective(p), abs(p.min_volume_mm3 - joint.min_volume_mm3),
                                                       abs(p.th_disc - joint.th_disc)))
    return chosen


def choose_for_modalities(scans: Sequence[ScanCandidates], grid: CalibrationGrid, max_fp_per_scan: float = 1.0,
                          default_th_det: float = 0.5, points: Sequence[OperatingPoint] | None = None
                          ) -> tuple[OperatingPoint, dict[str, OperatingPoint]]:
    """The shared ``th_det`` and filters chosen for what is deployed: every modality with its own ``th_disc``
    and minimum volume.

    For each ``th_det`` x ellipticity x edge setting of ``grid``: its best shared point (:func:`choose`, the
    fallback for a scan of unknown modality) and each modality's best ``th_disc`` and minimum volume within the
    budget on that modality's scans (:func:`choose_by_modality`). The setting whose per-modality points find
    the most CMBs in total wins (ties: fewer false positives, then closest to the paper). Choosing the setting
    by the shared point alone could pick one that a modality can only meet the budget at by giving up many CMBs.
    ``points``: ``sweep(scans, grid)`` when the caller has it. Returns ``(shared point, {modality: point})``.
    """
    groups: dict[tuple[float, float, float], list[OperatingPoint]] = {}
    for point in points if points is not None else sweep(scans, grid):
        key = (point.th_det, point.max_ellipticity, point.min_edge_distance_mm)
        groups.setdefault(key, []).append(point)
    best: tuple[tuple, OperatingPoint, dict[str, OperatingPoint]] | None = None
    for group in groups.values():
        shared = choose(group, max_fp_per_scan, default_th_det)
        own = choose_by_modality(scans, shared, grid, max_fp_per_scan)
        tp, fp = deployed_totals(own)
        rank = (-tp, fp, _distance_from_paper(shared, default_th_det), -shared.th_disc)
        if best is None or rank < best[0]:
            best = (rank, shared, own)
    assert best is not None   # sweep() raised already if there was nothing to choose from
    return best[1], best[2]


def deployed_totals(by_modality_points: dict[str, OperatingPoint]) -> tuple[int, int]:
    """``(CMBs found, false positives)`` of per-modality points together."""
    return (sum(p.tp for p in by_modality_points.values()), sum(p.fp for p in by_modality_points.values()))


def _grid_of(point: OperatingPoint) -> CalibrationGrid:
    """The one-setting grid of ``point``."""
    return CalibrationGrid(th_det=(point.th_det,), th_disc=(point.th_disc,), min_volume_mm3=(point.min_volume_mm3,),
                           max_ellipticity=(point.max_ellipticity,),
                           min_edge_distance_mm=(point.min_edge_distance_mm,))


def by_modality(scans: Sequence[ScanCandidates], point: OperatingPoint) -> dict[str, dict]:
    """The counts of ``point`` on each modality's scans (one operating point serves all modalities)."""
    same_point = {modality: point for modality in sorted({s.modality for s in scans})}
    return {modality: counted.to_dict() for modality, counted in recount(scans, same_point).items()}


def recount(scans: Sequence[ScanCandidates], per_modality: dict[str, OperatingPoint]) -> dict[str, OperatingPoint]:
    """Each modality's point counted again on that modality's ``scans`` (e.g. scans it was not chosen on)."""
    counted = {}
    for modality, point in per_modality.items():
        subset = [s for s in scans if s.modality == modality]
        if subset:
            counted[modality] = sweep(subset, _grid_of(point))[0]
    return counted


def cross_validate(folds: Sequence[Sequence[ScanCandidates]], grid: CalibrationGrid, max_fp_per_scan: float = 1.0,
                   default_th_det: float = 0.5) -> list[dict]:
    """For each fold: the per-modality points chosen (:func:`choose_for_modalities`) on the other folds, counted
    on the scans they were chosen on (``fit``) and on this fold's (``held_out``). A choice that holds its
    false-positive budget only where it was made is fitted to those scans: the held-out counts are what to
    expect on new scans like them."""
    results = []
    for k, held in enumerate(folds):
        fit = [scan for j, fold in enumerate(folds) if j != k for scan in fold]
        _, own = choose_for_modalities(fit, grid, max_fp_per_scan, default_th_det)
        results.append({"fit": {m: p.to_dict() for m, p in own.items()},
                        "held_out": {m: p.to_dict() for m, p in recount(held, own).items()}})
    return results


def measurement_keys(model: ModelPackage, image: Path, ground_truth: Path, modality: str,
                     th_dets: Sequence[float], flip_options: Sequence[bool]) -> dict[bool, str]:
    """For each flip setting, what one scan's measurements depend on: the networks, the preprocessing, the
    student's flips, the ``th_det`` values, the modality and the contents of the image and its ground truth (not
    the operating point being chosen, so a re-calibration with another objective or grid of filters reuses them)."""
    from CMBDetectLib.model_package import sha256_file

    inference = {k: v for k, v in (model.manifest.get("inference") or {}).items() if k != "student_flips"}
    parts = {"version": MEASUREMENT_VERSION, "networks": model.manifest.get("networks"),
             "preprocessing": model.manifest.get("preprocessing"), "inference": inference,
             "th_det": [float(t) for t in th_dets], "modality": modality,
             "image": sha256_file(image), "ground_truth": sha256_file(ground_truth)}
    return {bool(flips): hashlib.sha256(json.dumps({**parts, "flips": bool(flips)}, sort_keys=True).encode()
                                        ).hexdigest() for flips in flip_options}


def _scan_to_json(scan: ScanCandidates) -> dict:
    return {"case": scan.case, "modality": scan.modality, "n_gt": scan.n_gt,
            "by_th_det": [{"th_det": th, "p_disc": t.p_disc.tolist(), "volume_mm3": t.volume_mm3.tolist(),
                           "ellipticity": t.ellipticity.tolist(), "edge_distance_mm": t.edge_distance_mm.tolist(),
                           "hits": t.hits} for th, t in scan.by_th_det.items()]}


def _scan_from_json(data: dict) -> ScanCandidates:
    tables = {float(t["th_det"]): CandidateTable(
        np.asarray(t["p_disc"], float), np.asarray(t["volume_mm3"], float), np.asarray(t["ellipticity"], float),
        np.asarray(t["edge_distance_mm"], float), [list(map(int, h)) for h in t["hits"]])
        for t in data["by_th_det"]}
    return ScanCandidates(str(data["case"]), str(data["modality"]), int(data["n_gt"]), tables)


def collect(model: ModelPackage, cases: Sequence[tuple[str, Path, Path, str]], grid: CalibrationGrid,
            device: str = "cpu", progress: ProgressCallback | None = None,
            flip_options: Sequence[bool] = (False,), cache_dir: Path | None = None
            ) -> dict[bool, list[ScanCandidates]]:
    """Run the model once on each ``(case, image, instance_or_label_map, modality)`` and measure its
    candidates, for each student test-time-flip setting in ``flip_options`` (the networks' stage 1 runs
    once per scan; only the student re-scores).

    ``cache_dir``: each scan's measurements are kept there (JSON, keyed by :func:`measurement_keys`), so a
    calibration that was stopped resumes, and choosing again with another objective needs no network."""
    from CMBDetectLib.pipeline import DetectionParameters, DetectionSession
    from CMBDetectLib.volume import read_volume

    report = progress or no_progress
    scans: dict[bool, list[ScanCandidates]] = {bool(flips): [] for flips in flip_options}
    for index, (case, image, ground_truth, modality) in enumerate(cases):
        report(index / max(len(cases), 1), f"calibration: {case}")
        cached: dict[bool, Path] = {}
        if cache_dir is not None:
            keys = measurement_keys(model, image, ground_truth, modality, grid.th_det, list(scans))
            cached = {flips: Path(cache_dir) / f"{key}.json" for flips, key in keys.items()}
            if all(path.is_file() for path in cached.values()):
                for flips, path in cached.items():
                    scans[flips].append(_scan_from_json(json.loads(path.read_text(encoding="utf-8"))))
                continue
        volume = read_volume(image)
        truth = read_volume(ground_truth)
        if truth.array.shape != volume.array.shape:
            raise InputError(f"{ground_truth.name} is not on the grid of {image.name}")
        session = DetectionSession(model, device=device)
        session.run(volume, modality, params=DetectionParameters.for_model(model, th_det=min(grid.th_det)))
        for flips in scans:
            session.set_student_flips(flips)
            measured = measure_scan(session, truth.array.astype(np.int64), truth, case, grid.th_det)
            scans[flips].append(measured)
            if flips in cached:
                cached[flips].parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cached[flips], json.dumps(_scan_to_json(measured)))
    report(1.0, f"calibration: {len(cases)} scans measured")
    return scans


def write_calibration(package_dir: Path, chosen: OperatingPoint, points: Sequence[OperatingPoint],
                      scans: Sequence[ScanCandidates], description: dict, max_fp_per_scan: float,
                      student_flips: bool = False, alternatives: dict | None = None,
                      per_modality: dict[str, OperatingPoint] | None = None,
                      cross_validation: list[dict] | None = None) -> dict:
    """Put the chosen operating point into ``model.json`` (thresholds + post-processing + test-time
    flips + a record of how they were chosen); ``alternatives``: what the other settings achieved;
    ``per_modality``: each modality's own point (:func:`choose_by_modality`), whose ``th_disc`` and minimum
    volume are deployed for that modality; ``cross_validation``: :func:`cross_validate`'s record."""
    manifest_path = Path(package_dir) / "model.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    # a re-calibration keeps the training-time values as "before"
    before = (manifest.get("calibration") or {}).get("before") or {
        "thresholds": manifest.get("thresholds"), "postprocessing": manifest.get("postprocessing"),
        "inference": manifest.get("inference")}
    manifest["inference"] = {**(manifest.get("inference") or {}), "student_flips": bool(student_flips)}
    manifest["thresholds"] = {"th_det": chosen.th_det, "th_disc": chosen.th_disc}
    manifest["postprocessing"] = {"min_volume_mm3": chosen.min_volume_mm3,
                                  "max_ellipticity": chosen.max_ellipticity,
                                  "min_edge_distance_mm": chosen.min_edge_distance_mm}
    if per_modality:
        manifest["thresholds"]["th_disc_by_modality"] = {m: p.th_disc for m, p in per_modality.items()}
        manifest["postprocessing"]["min_volume_mm3_by_modality"] = {m: p.min_volume_mm3
                                                                    for m, p in per_modality.items()}

    def at(params: dict) -> dict | None:
        match = [p for p in points if all(abs(getattr(p, k) - float(v)) < 1e-6 for k, v in params.items())]
        return match[0].to_dict() if match else None

    paper_point = at({"th_det": 0.5, "th_disc": (before["thresholds"] or {}).get("th_disc", 0.5),
                      **PAPER.to_dict()})
    record = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "development_set": description, "scans": len(scans), "cmbs": sum(s.n_gt for s in scans),
        "objective": (f"most CMBs found with <= {max_fp_per_scan:g} false positives per scan "
                      + ("on each modality's scans, each modality with its own th_disc and minimum volume, "
                         "th_det and the other filters shared " if per_modality else "")
                      + "(centroid matching); ties: fewer false positives, then closest to the paper's filters"),
        "chosen": chosen.to_dict(), "before": before,
        "at_training_threshold_and_paper_filters": paper_point,
        "grid_points": len(points),
        "best_within": {f"{budget:g}_fp_per_scan": choose(points, budget).to_dict()
                        for budget in FRONTIER_BUDGETS},
        "student_flips": bool(student_flips), "alternatives": alternatives or {},
        "chosen_by_modality": by_modality(scans, chosen),
    }
    if per_modality:
        # (the record's key predates the per-modality volume: each point carries both)
        record["th_disc_by_modality"] = {m: p.to_dict() for m, p in per_modality.items()}
        tp, fp = deployed_totals(per_modality)
        total = {"tp": tp, "fp": fp}
        record["with_th_disc_by_modality"] = {**total, "n_gt": record["cmbs"], "n_scans": len(scans),
                                              "tpr": round(total["tp"] / max(record["cmbs"], 1), 4),
                                              "fp_per_scan": round(total["fp"] / max(len(scans), 1), 4)}
    if cross_validation is not None:
        record["cross_validation"] = cross_validation
    manifest["calibration"] = record
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return record
