"""Evaluate a folder of ``cmbdetect detect`` outputs against ground truth (engine of ``cmbdetect evaluate``).

Inputs
- ``PRED_DIR/<stem>_cmb.nii.gz`` (final detections) and, optionally, ``PRED_DIR/<stem>_candidates.json``
  (schema ``cmbdetect.candidates/1``: every stage-1 candidate with ``p_det, p_disc, final, reason,
  centroid_ras`` and the parameters used).
- ``GT_DIR``: either a folder of label maps ``<stem>.nii.gz`` or a dataset folder (``labelsTr/`` +
  ``cmbdetect/instances/``, ARCHITECTURE.md). Stems are matched to case ids exactly first, then with the
  nnU-Net channel suffix ``_0000`` removed (``imagesTr/case_0000.nii.gz`` -> stem ``case_0000`` -> ``case``).

What is a ground-truth CMB: an instance of ``cmbdetect/instances/<case>.nii.gz`` when the dataset has one
(two annotated CMBs that touch stay two), else a 26-connected component of the label map. Predicted
clusters are the 26-connected components of ``<stem>_cmb.nii.gz > 0`` (DESIGN.md).

Final numbers use the label-map overlap rule (:func:`metrics.clusterwise_counts`) and the VALDO rule.
The per-stage table and the FROC curves need every stage-1 candidate, whose voxels are not stored: a
candidate is matched to the ground-truth CMBs whose voxels lie within one voxel (26-neighbourhood) of
the voxel nearest to its ``centroid_ras`` ("inside the CMB's extent + 1 voxel"). The FROC sweeps are
exact for ``th_disc`` and approximate for ``th_det`` (a lower threshold would also merge or grow
components, which the JSON cannot tell).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from CMBDetectLib.errors import InputError
from CMBDetectLib.metrics import (
    Counts,
    FrocPoint,
    clusters,
    clusterwise_match,
    froc_curve,
    froc_score,
    plot_froc,
    summarise,
    valdo_counts,
)
from CMBDetectLib.postprocessing import CandidateShape, PostprocessingParameters, removal_reason
from CMBDetectLib.progress import ProgressCallback, no_progress
from CMBDetectLib.volume import Volume, read_volume

CANDIDATES_SCHEMA = "cmbdetect.candidates/1"
PRED_SUFFIX = "_cmb.nii.gz"
CANDIDATES_SUFFIX = "_candidates.json"
LABEL_SUFFIX = ".nii.gz"
CHANNEL_SUFFIX = "_0000"
STAGES = ("candidate_detection", "discrimination", "postprocessing")
STAGE_TITLES = {"candidate_detection": "after candidate detection",
                "discrimination": "after discrimination",
                "postprocessing": "after post-processing"}
SHAPE_REASONS = ("volume", "ellipticity", "edge_distance")
# Removal reasons in pipeline order (a candidate's ``reason`` is the first filter it failed), then kept.
REMOVAL_REASONS = ("discrimination", *SHAPE_REASONS, "kept")
CMB_FATES = ("not a candidate", *REMOVAL_REASONS)


@dataclass(frozen=True)
class ScanFiles:
    stem: str
    case: str
    prediction: Path
    candidates: Path | None
    label: Path
    instances: Path | None


@dataclass
class ScanEvaluation:
    """Everything measured on one scan."""

    stem: str
    case: str
    modality: str
    n_gt: int
    clusterwise: Counts
    valdo: Counts
    stages: dict[str, Counts] | None = None
    # (score, hit ground-truth ids) per candidate, for each FROC curve
    froc_items: dict[str, list[tuple[float, list[int]]]] | None = None
    parameters: dict = field(default_factory=dict)
    # where CMBs and false candidates were removed: {"cmbs": {fate: n}, "false_candidates": {reason: n}}
    removals: dict[str, dict[str, int]] | None = None
    # the ground-truth ids (instance map ids, or 26-connected clusters without one), and those found by the
    # cluster-wise rule (the TP of ``clusterwise``)
    gt_ids: list[int] = field(default_factory=list)
    found_ids: list[int] = field(default_factory=list)
    # each ground-truth id's fate (CMB_FATES), with a candidates JSON
    cmb_fates: dict[int, str] | None = None

    def to_dict(self) -> dict:
        data = {"stem": self.stem, "case": self.case, "modality": self.modality, "n_gt": self.n_gt,
                "clusterwise": self.clusterwise.to_dict(), "valdo": self.valdo.to_dict()}
        if self.stages is not None:
            data["stages"] = {name: counts.to_dict() for name, counts in self.stages.items()}
        if self.removals is not None:
            data["removals"] = self.removals
        data["gt_ids"] = list(self.gt_ids)
        data["found_ids"] = list(self.found_ids)
        if self.cmb_fates is not None:
            data["cmb_fates"] = {str(k): v for k, v in self.cmb_fates.items()}
        return data


@dataclass
class EvaluationReport:
    scans: list[ScanEvaluation]
    skipped: list[str] = field(default_factory=list)     # ground-truth cases without a prediction

    def groups(self, by_modality: bool = True) -> dict[str, list[ScanEvaluation]]:
        groups: dict[str, list[ScanEvaluation]] = {}
        if by_modality:
            for scan in self.scans:
                groups.setdefault(scan.modality, []).append(scan)
        groups["total"] = list(self.scans)
        return groups

    @property
    def has_stages(self) -> bool:
        return bool(self.scans) and all(scan.stages is not None for scan in self.scans)

    def stage_summary(self, scans: Sequence[ScanEvaluation] | None = None) -> dict[str, dict]:
        scans = self.scans if scans is None else scans
        return {stage: summarise([scan.stages[stage] for scan in scans]) for stage in STAGES}

    def removal_summary(self, scans: Sequence[ScanEvaluation] | None = None) -> dict[str, dict[str, int]]:
        """Summed :func:`removals` of ``scans`` (all scans with a candidates JSON by default)."""
        scans = [s for s in (self.scans if scans is None else scans) if s.removals is not None]
        total: dict[str, dict[str, int]] = {"cmbs": dict.fromkeys(CMB_FATES, 0),
                                            "false_candidates": dict.fromkeys(REMOVAL_REASONS, 0)}
        for scan in scans:
            for kind, counts in scan.removals.items():
                for key, value in counts.items():
                    total[kind][key] = total[kind].get(key, 0) + value
        return total

    def froc_curves(self) -> dict[str, list[FrocPoint]]:
        """FROC curves named by what is swept, over all scans (needs the candidates JSON of every scan)."""
        if not self.has_stages:
            return {}
        n_gt = sum(scan.n_gt for scan in self.scans)
        names = self.scans[0].froc_items.keys()
        return {name: froc_curve([scan.froc_items[name] for scan in self.scans], n_gt, len(self.scans))
                for name in names}

    def to_json_dict(self) -> dict:
        data: dict = {
            "schema": "cmbdetect.evaluation/1",
            "n_scans": len(self.scans),
            "skipped_cases": list(self.skipped),
            "clusterwise": {name: summarise([s.clusterwise for s in group])
                            for name, group in self.groups().items()},
            "valdo": {name: summarise([s.valdo for s in group]) for name, group in self.groups().items()},
            "scans": [scan.to_dict() for scan in self.scans],
        }
        if self.has_stages:
            data["stages"] = {name: self.stage_summary(group) for name, group in self.groups().items()}
            data["froc"] = {name: {"froc_score": froc_score(points),
                                   "points": [vars(p) for p in points]}
                            for name, points in self.froc_curves().items()}
            data["removals"] = self.removal_summary()
        return _json_safe(data)


def _json_safe(value):
    """NaN / inf are not JSON: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# --- finding files --------------------------------------------------------------------------------------

def _strip_channel(name: str) -> str:
    return name[: -len(CHANNEL_SUFFIX)] if name.endswith(CHANNEL_SUFFIX) else name


def _ground_truth_index(gt_dir: Path) -> tuple[dict[str, tuple[Path, Path | None]], bool]:
    """``{case: (label file, instance file or None)}`` and whether ``gt_dir`` is a dataset folder."""
    from CMBDetectLib.dataset import INSTANCES_DIR, LABELS_DIR

    is_dataset = (gt_dir / LABELS_DIR).is_dir()
    label_dir = gt_dir / LABELS_DIR if is_dataset else gt_dir
    index: dict[str, tuple[Path, Path | None]] = {}
    for path in sorted(label_dir.iterdir()):
        name = path.name
        if not name.endswith(LABEL_SUFFIX) or name.startswith(".") or name.endswith(PRED_SUFFIX):
            continue
        case = path.name[: -len(LABEL_SUFFIX)]
        instances = gt_dir / INSTANCES_DIR / path.name if is_dataset else None
        index[case] = (path, instances if instances is not None and instances.is_file() else None)
    return index, is_dataset


def find_scans(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
               allow_missing: bool = False) -> tuple[list[ScanFiles], list[str]]:
    """Pair every prediction with its ground truth; returns (pairs, ground-truth cases left out).

    Raises ``InputError`` for a missing folder, a prediction without ground truth, or (unless
    ``allow_missing``) a ground-truth case without a prediction.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for what, folder in (("prediction", pred_dir), ("ground-truth", gt_dir)):
        if not folder.is_dir():
            raise InputError(f"{what} folder not found: {folder}")
    stems = sorted(p.name[: -len(PRED_SUFFIX)] for p in pred_dir.iterdir()
                   if p.name.endswith(PRED_SUFFIX) and not p.name.startswith("."))
    if not stems:
        raise InputError(f"no detections (*{PRED_SUFFIX}) in {pred_dir}; "
                         "run `cmbdetect detect --out` there first")
    truth, is_dataset = _ground_truth_index(gt_dir)
    if not truth:
        where = f"{gt_dir}/labelsTr" if is_dataset else str(gt_dir)
        raise InputError(f"no ground-truth label maps (*{LABEL_SUFFIX}) in {where}")
    stripped: dict[str, str] = {}
    for case in truth:
        stripped.setdefault(_strip_channel(case), case)

    pairs: list[ScanFiles] = []
    unmatched: list[str] = []
    for stem in stems:
        case = stem if stem in truth else stripped.get(_strip_channel(stem))
        if case is None:
            unmatched.append(stem)
            continue
        candidates = pred_dir / f"{stem}{CANDIDATES_SUFFIX}"
        label, instances = truth[case]
        pairs.append(ScanFiles(stem, case, pred_dir / f"{stem}{PRED_SUFFIX}",
                               candidates if candidates.is_file() else None, label, instances))
    if unmatched:
        raise InputError(f"no ground truth in {gt_dir} for {len(unmatched)} detection(s): "
                         f"{_short_list(unmatched)}")
    used = {pair.case for pair in pairs}
    if len(used) != len(pairs):
        raise InputError("two detections match the same ground-truth case "
                         f"({_short_list(sorted(p.stem for p in pairs))}); keep one per case")
    missing = sorted(set(truth) - used)
    if missing and not allow_missing:
        raise InputError(f"no detection in {pred_dir} for {len(missing)} ground-truth case(s): "
                         f"{_short_list(missing)} (use --allow-missing to evaluate only the detected cases)")
    return pairs, missing


def _short_list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- one scan -------------------------------------------------------------------------------------------

def _read_candidates(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {path.name}: {error}") from None
    if not isinstance(data, dict) or data.get("schema") != CANDIDATES_SCHEMA:
        raise InputError(f"{path.name} is not a {CANDIDATES_SCHEMA} file")
    if not isinstance(data.get("candidates"), list):
        raise InputError(f"{path.name} has no candidate list")
    return data


def _ground_truth_instances(files: ScanFiles, label: Volume) -> np.ndarray:
    if files.instances is None:
        return clusters(label.array)
    instances = read_volume(files.instances)
    if not instances.same_grid(label, tolerance=1e-3):
        raise InputError(f"{files.instances.name}: the instance map is not on the grid of its label map")
    if not np.array_equal(instances.array > 0, label.array > 0):
        raise InputError(f"{files.instances.name}: the instance map and labelsTr/{files.label.name} "
                         "disagree on which voxels are CMB")
    return instances.array.astype(np.int64)


def candidate_hits(gt_instances: np.ndarray, label: Volume, candidates: Sequence[dict]) -> list[list[int]]:
    """Ground-truth ids within one voxel (26-neighbourhood) of each candidate's centroid voxel."""
    padded = np.pad(gt_instances, 1)
    shape = np.asarray(gt_instances.shape)
    hits: list[list[int]] = []
    for candidate in candidates:
        if candidate.get("centroid_ras") is not None:
            kji = label.ras_to_index(np.asarray(candidate["centroid_ras"], float))[0]
        elif candidate.get("centroid_ijk") is not None:
            kji = np.asarray(candidate["centroid_ijk"], float)[::-1]
        else:
            raise InputError(f"candidate {candidate.get('id')} has no centroid")
        voxel = np.floor(kji + 0.5).astype(int)
        if np.any(voxel < -1) or np.any(voxel > shape):
            hits.append([])                          # outside the image: cannot touch a CMB
            continue
        k, j, i = voxel + 1                          # index into the padded map
        window = padded[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2]
        hits.append(sorted(int(v) for v in np.unique(window[window > 0])))
    return hits


def _shape_reason(candidate: dict, params: PostprocessingParameters) -> str | None:
    """The post-processing verdict, recomputed for candidates whose stored reason is "discrimination"."""
    reason = candidate.get("reason")
    if reason in SHAPE_REASONS or candidate.get("final"):
        return reason
    try:
        shape = CandidateShape(label=int(candidate.get("id", 0)), volume_mm3=float(candidate["volume_mm3"]),
                               ellipticity=float(candidate["ellipticity"]),
                               edge_distance_mm=float(candidate["edge_distance_mm"]))
    except (KeyError, TypeError, ValueError):
        return None
    return removal_reason(shape, params)


def removals(hits: list[list[int]], candidates: Sequence[dict], n_gt_ids: Sequence[int]) -> dict[str, dict[str, int]]:
    """Where each ground-truth CMB was lost, and which filter removed each false candidate.

    A CMB's fate is that of the candidate touching it that went furthest through the pipeline
    (``kept`` if any was final; ``not a candidate`` if stage 1 produced none), so the counts say which
    stage or filter costs sensitivity; the false candidates' reasons say what each filter is worth.
    """
    false_candidates = dict.fromkeys(REMOVAL_REASONS, 0)
    for hit, candidate in zip(hits, candidates):
        if not hit:
            false_candidates[_candidate_fate(candidate)] += 1
    cmbs = dict.fromkeys(CMB_FATES, 0)
    for fate in cmb_fates(hits, candidates, n_gt_ids).values():
        cmbs[fate] += 1
    return {"cmbs": cmbs, "false_candidates": false_candidates}


_FATE_RANK = {reason: position for position, reason in enumerate(REMOVAL_REASONS)}


def _candidate_fate(candidate: dict) -> str:
    if candidate.get("final"):
        return "kept"
    reason = candidate.get("reason")
    return reason if reason in _FATE_RANK else "discrimination"


def cmb_fates(hits: list[list[int]], candidates: Sequence[dict], gt_ids: Sequence[int]) -> dict[int, str]:
    """Each ground-truth id's fate (one of CMB_FATES): that of the candidate touching it that went furthest."""
    best: dict[int, str] = {}
    for hit, candidate in zip(hits, candidates):
        reason = _candidate_fate(candidate)
        for gt_id in hit:
            if gt_id not in best or _FATE_RANK[reason] > _FATE_RANK[best[gt_id]]:
                best[gt_id] = reason
    return {int(gt_id): best.get(gt_id, "not a candidate") for gt_id in gt_ids}


def recall_by(scans: Sequence[ScanEvaluation], group_of: Callable[[ScanEvaluation, int], str | None]
              ) -> dict[str, dict[str, int]]:
    """Ground-truth CMBs grouped by ``group_of(scan, gt_id)`` (None: left out), each group with ``n``, ``found``
    (cluster-wise, after post-processing) and ``not_a_candidate`` (stage 1 never proposed it; scans without a
    candidates JSON count none). Says which kinds of CMB a model misses, e.g. by the synthetic generator's
    record of each CMB's size or susceptibility."""
    groups: dict[str, dict[str, int]] = {}
    for scan in scans:
        found = set(scan.found_ids)
        for gt_id in scan.gt_ids:
            name = group_of(scan, gt_id)
            if name is None:
                continue
            group = groups.setdefault(name, {"n": 0, "found": 0, "not_a_candidate": 0})
            group["n"] += 1
            group["found"] += gt_id in found
            group["not_a_candidate"] += (scan.cmb_fates or {}).get(gt_id) == "not a candidate"
    return groups


def _stage_counts(hits: list[list[int]], keep: list[bool], n_gt: int) -> Counts:
    found = {g for h, k in zip(hits, keep) if k for g in h}
    return Counts(tp=len(found), fp=sum(1 for h, k in zip(hits, keep) if k and not h), fn=n_gt - len(found),
                  tp_pred=sum(1 for h, k in zip(hits, keep) if k and h))


def evaluate_scan(files: ScanFiles, gt_modality: str | None = None) -> ScanEvaluation:
    label = read_volume(files.label)
    prediction = read_volume(files.prediction)
    if prediction.array.shape != label.array.shape:
        raise InputError(f"{files.prediction.name} has shape {prediction.shape_ijk} but its ground truth "
                         f"{files.label.name} has {label.shape_ijk}; both must be on the same grid")
    if not prediction.same_grid(label, tolerance=1e-3):
        raise InputError(f"{files.prediction.name} and {files.label.name} have the same size but a "
                         "different spacing, origin or direction")
    gt = _ground_truth_instances(files, label)
    gt_ids = [int(v) for v in np.unique(gt[gt > 0])]
    n_gt = len(gt_ids)
    spacing = label.spacing_zyx
    clusterwise, found_ids = clusterwise_match(prediction.array, gt, gt_instances=True)
    evaluation = ScanEvaluation(
        stem=files.stem, case=files.case, modality=gt_modality or "unknown", n_gt=n_gt, clusterwise=clusterwise,
        valdo=valdo_counts(prediction.array, gt, spacing, gt_instances=True), gt_ids=gt_ids, found_ids=found_ids)
    if files.candidates is None:
        return evaluation

    data = _read_candidates(files.candidates)
    evaluation.modality = str(data.get("image", {}).get("modality") or evaluation.modality)
    parameters = dict(data.get("parameters") or {})
    evaluation.parameters = parameters
    defaults = PostprocessingParameters()
    shape_params = PostprocessingParameters(**{
        name: float(parameters.get(name, getattr(defaults, name)))
        for name in ("min_volume_mm3", "max_ellipticity", "min_edge_distance_mm")})
    candidates = data["candidates"]
    hits = candidate_hits(gt, label, candidates)
    passed_discrimination = [c.get("reason") != "discrimination" for c in candidates]
    final = [bool(c.get("final")) for c in candidates]
    evaluation.stages = {
        "candidate_detection": _stage_counts(hits, [True] * len(candidates), n_gt),
        "discrimination": _stage_counts(hits, passed_discrimination, n_gt),
        "postprocessing": _stage_counts(hits, final, n_gt),
    }
    evaluation.removals = removals(hits, candidates, gt_ids)
    evaluation.cmb_fates = cmb_fates(hits, candidates, gt_ids)
    shape_ok = [_shape_reason(c, shape_params) is None for c in candidates]
    p_det = [float(c.get("p_det", 0.0)) for c in candidates]
    p_disc = [float(c.get("p_disc", 0.0)) for c in candidates]
    evaluation.froc_items = {
        "candidate detection (th_det)": list(zip(p_det, hits)),
        "discrimination (th_disc)": list(zip(p_disc, hits)),
        "discrimination + post-processing (th_disc)":
            [(score, hit) for score, hit, ok in zip(p_disc, hits, shape_ok) if ok],
    }
    return evaluation


def _dataset_modality(gt_dir: Path) -> str | None:
    from CMBDetectLib.dataset import dataset_modality, read_description

    try:
        return dataset_modality(read_description(gt_dir))
    except (OSError, ValueError, AttributeError):
        return None


def evaluate(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, allow_missing: bool = False,
             progress: ProgressCallback | None = None) -> EvaluationReport:
    """Evaluate every detection in ``pred_dir`` against ``gt_dir`` (see the module documentation)."""
    progress = progress or no_progress
    pairs, missing = find_scans(pred_dir, gt_dir, allow_missing)
    modality = _dataset_modality(Path(gt_dir))
    scans = []
    for index, files in enumerate(pairs):
        progress(index / len(pairs), f"evaluating {files.stem}")
        scans.append(evaluate_scan(files, modality))
    progress(1.0, f"evaluated {len(scans)} scans")
    return EvaluationReport(scans, missing)


# --- presentation ---------------------------------------------------------------------------------------

def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_report(report: EvaluationReport, verbose: bool = False, by_modality: bool = False) -> str:
    """Readable tables: cluster-wise and VALDO metrics per group (and per scan), then per stage."""
    header = (f"{'':<24} {'scans':>5} {'CMBs':>5} {'TP':>4} {'FP':>4} {'FN':>4} {'TPR':>6} {'FPavg':>6} "
              f"{'prec.':>6} {'F1':>6} | {'TPR':>6} {'prec.':>6}")
    left = "Cluster-wise (overlap >= 1 voxel, 26-connected clusters)"
    lines = [f"{left:<{header.index('|')}}| VALDO (centres <= 5 mm)", header, "-" * len(header)]

    def row(name: str, scans: Sequence[ScanEvaluation]) -> str:
        c = summarise([s.clusterwise for s in scans])
        v = summarise([s.valdo for s in scans])
        return (f"{name[:24]:<24} {c['n_scans']:>5} {sum(s.n_gt for s in scans):>5} {c['tp']:>4} "
                f"{c['fp']:>4} {c['fn']:>4} {_fmt(c['tpr']):>6} {_fmt(c['fp_avg'], 2):>6} "
                f"{_fmt(c['precision']):>6} {_fmt(c['f1']):>6} | "
                f"{_fmt(v['tpr']):>6} {_fmt(v['precision']):>6}")

    if verbose:
        lines += [row(scan.stem, [scan]) for scan in report.scans]
        lines.append("-" * len(header))
    for name, scans in report.groups(by_modality).items():
        lines.append(row(name, scans))

    if report.has_stages:
        lines += ["", "Per stage (candidates matched to CMBs by centroid, within the CMB + 1 voxel)",
                  f"{'':<28} {'TP':>5} {'FP':>6} {'FN':>4} {'TPR':>6} {'FPavg':>7} {'prec.':>6}"]
        for stage, s in report.stage_summary().items():
            lines.append(f"{STAGE_TITLES[stage]:<28} {s['tp']:>5} {s['fp']:>6} {s['fn']:>4} "
                         f"{_fmt(s['tpr']):>6} {_fmt(s['fp_avg'], 2):>7} {_fmt(s['precision']):>6}")
        lines += ["", "Where candidates are removed (a CMB counts at the furthest stage one of its candidates reached)",
                  *removal_lines(report.removal_summary()), ""]
        for name, points in report.froc_curves().items():
            lines.append(f"FROC score {name}: {_fmt(froc_score(points))} "
                         "(mean TPR at 1/8 ... 8 FP per scan)")
    elif report.scans:
        lines += ["", "(no per-stage table: some scans have no <stem>_candidates.json)"]
    if report.skipped:
        lines.append(f"not evaluated (no detection): {_short_list(report.skipped)}")
    return "\n".join(lines)


def removal_lines(summary: dict[str, dict[str, int]]) -> list[str]:
    """Two aligned text rows: true CMBs lost at each stage / filter, false candidates removed there."""
    columns = CMB_FATES
    lines = [f"{'':<18}" + "".join(f"{name:>17}" for name in columns)]
    lines.append(f"{'true CMBs':<18}" + "".join(f"{summary['cmbs'].get(name, 0):>17}" for name in columns))
    lines.append(f"{'false candidates':<18}" + "".join(
        f"{summary['false_candidates'].get(name, 0) if name != 'not a candidate' else '-':>17}"
        for name in columns))
    return lines


def operating_points(report: EvaluationReport) -> dict[str, tuple[float, float]]:
    """Markers for the FROC plot: the final result at the thresholds that were used."""
    if not report.has_stages:
        return {}
    final = report.stage_summary()["postprocessing"]
    thresholds = {scan.parameters.get("th_disc") for scan in report.scans}
    label = (f"final (th_disc = {thresholds.pop():g})" if len(thresholds) == 1 and None not in thresholds
             else "final")
    if math.isnan(final["tpr"]):
        return {}
    return {label: (final["fp_avg"], final["tpr"])}


def write_froc_png(report: EvaluationReport, path: str | os.PathLike) -> Path:
    if not report.has_stages:
        raise InputError("a FROC curve needs <stem>_candidates.json next to every <stem>_cmb.nii.gz "
                         "(written by `cmbdetect detect`)")
    n_scans = len(report.scans)
    return plot_froc(report.froc_curves(), path, title=f"FROC ({n_scans} scan{'s' if n_scans != 1 else ''})",
                     operating_points=operating_points(report))
