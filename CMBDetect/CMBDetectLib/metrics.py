"""Detection metrics named as in DESIGN.md: cluster-wise TPR, FPavg, precision, F1, the VALDO rule, FROC.

Cluster-wise rule (paper section 4.1): clusters are 26-connected components. A predicted cluster that
overlaps a ground-truth CMB by at least one voxel is a true positive, otherwise a false positive; a
ground-truth CMB that no prediction overlaps is a false negative. Two counts of "true positive" exist
when the matching is not one-to-one, and both are kept:

- ``tp``: ground-truth CMBs overlapped by at least one prediction -> **cluster-wise TPR** = tp / (tp + fn)
  (so TPR never exceeds 1 when two predictions touch the same CMB);
- ``tp_pred``: predicted clusters that overlap some CMB -> **precision** = tp_pred / (tp_pred + fp)
  (the fraction of what the user is shown that is right).

**FPavg** = fp / number of scans, **F1** = 2 P R / (P + R). A ratio with a zero denominator is NaN
(``None`` in JSON); F1 treats an undefined precision or TPR as 0 unless both are undefined.

VALDO rule: one-to-one matching of centres of mass within 5 mm (Hungarian assignment that first
maximises the number of pairs within the distance, then minimises their total distance).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
VALDO_DISTANCE_MM = 5.0
# Sensitivities at these FPavg levels are averaged into the usual FROC score (as in LUNA16 / VALDO).
FROC_FP_LEVELS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Counts:
    """Cluster counts of one scan (or a sum of scans)."""

    tp: int            # ground-truth CMBs hit by at least one prediction
    fp: int            # predicted clusters hitting no CMB
    fn: int            # ground-truth CMBs hit by no prediction
    tp_pred: int = -1  # predicted clusters hitting a CMB; -1 = same as tp (one-to-one matching)

    def __post_init__(self) -> None:
        if self.tp_pred < 0:
            object.__setattr__(self, "tp_pred", self.tp)

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                      self.tp_pred + other.tp_pred)

    def to_dict(self) -> dict:
        return asdict(self)


def clusters(label_map: np.ndarray, use_instances: bool = False) -> np.ndarray:
    """Cluster label map: 26-connected components of ``label_map > 0``, or the given instance ids."""
    label_map = np.asarray(label_map)
    if use_instances:
        return label_map.astype(np.int64, copy=False)
    labels, _ = ndimage.label(label_map > 0, structure=CONNECTIVITY_26)
    return labels


def clusterwise_counts(pred_labels: np.ndarray, gt_labels: np.ndarray, pred_instances: bool = False,
                       gt_instances: bool = False) -> Counts:
    """Cluster-wise TP / FP / FN of one scan (both maps on the same grid).

    By default both maps are binarised and split into 26-connected components (the DESIGN.md rule); pass
    ``*_instances=True`` to count each non-zero id of a map as one cluster instead (e.g. ground-truth
    instance maps in which two annotated CMBs touch).
    """
    return clusterwise_match(pred_labels, gt_labels, pred_instances, gt_instances)[0]


def clusterwise_match(pred_labels: np.ndarray, gt_labels: np.ndarray, pred_instances: bool = False,
                      gt_instances: bool = False) -> tuple[Counts, list[int]]:
    """:func:`clusterwise_counts` and the ground-truth cluster ids it counts as found (its TP), sorted.

    With ``gt_instances=True`` these are the ids of the instance map, so each found CMB can be looked up
    (e.g. in the synthetic generator's per-case record of its size and susceptibility)."""
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from ground truth {gt_labels.shape}")
    pred = clusters(pred_labels, pred_instances)
    gt = clusters(gt_labels, gt_instances)
    pred_ids = np.unique(pred[pred > 0])
    gt_ids = np.unique(gt[gt > 0])
    overlap = (pred > 0) & (gt > 0)
    hit_pred = np.unique(pred[overlap])
    hit_gt = np.unique(gt[overlap])
    counts = Counts(tp=len(hit_gt), fp=len(pred_ids) - len(hit_pred), fn=len(gt_ids) - len(hit_gt),
                    tp_pred=len(hit_pred))
    return counts, [int(v) for v in hit_gt]


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def summarise(counts_list: Iterable[Counts]) -> dict:
    """Pool scans: ``tpr, fp_avg, precision, f1, tp, fp, fn, tp_pred, n_scans``."""
    counts_list = list(counts_list)
    total = sum(counts_list, Counts(0, 0, 0, 0))
    n_scans = len(counts_list)
    tpr = _ratio(total.tp, total.tp + total.fn)
    precision = _ratio(total.tp_pred, total.tp_pred + total.fp)
    if math.isnan(tpr) and math.isnan(precision):
        f1 = math.nan
    else:
        r, p = (0.0 if math.isnan(v) else v for v in (tpr, precision))
        f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"tpr": tpr, "fp_avg": _ratio(total.fp, n_scans), "precision": precision, "f1": f1,
            "tp": total.tp, "fp": total.fp, "fn": total.fn, "tp_pred": total.tp_pred, "n_scans": n_scans}


def bootstrap_intervals(counts_list: Iterable[Counts], level: float = 0.95, n_resamples: int = 4000,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the pooled ``tpr`` and ``fp_avg`` over scans drawn with replacement.

    The scan is the unit that varies from one test set to the next (its CMBs and mimics come together),
    so this says how far another set of as many scans could land. Deterministic for a given ``seed``.
    """
    counts_list = list(counts_list)
    if not counts_list:
        return {"tpr": (math.nan, math.nan), "fp_avg": (math.nan, math.nan)}
    tp = np.array([c.tp for c in counts_list], dtype=float)
    cmbs = np.array([c.tp + c.fn for c in counts_list], dtype=float)
    fp = np.array([c.fp for c in counts_list], dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(counts_list), size=(n_resamples, len(counts_list)))
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp[draws].sum(axis=1) / cmbs[draws].sum(axis=1)
    fp_avg = fp[draws].sum(axis=1) / len(counts_list)
    tails = 100.0 * np.array([(1.0 - level) / 2.0, (1.0 + level) / 2.0])

    def interval(values: np.ndarray) -> tuple[float, float]:
        values = values[np.isfinite(values)]     # a draw without any CMB has no TPR
        if not len(values):
            return (math.nan, math.nan)
        low, high = np.percentile(values, tails)
        return (float(low), float(high))

    return {"tpr": interval(tpr), "fp_avg": interval(fp_avg)}


def centres_of_mass_mm(label_map: np.ndarray, spacing_zyx: Sequence[float],
                       use_instances: bool = False) -> np.ndarray:
    """Centres of mass (N x 3, mm, array axis order) of the clusters of a label map."""
    labels = clusters(label_map, use_instances)
    ids = np.unique(labels[labels > 0])
    if len(ids) == 0:
        return np.zeros((0, 3))
    centres = np.asarray(ndimage.center_of_mass(labels > 0, labels, ids), dtype=float).reshape(-1, 3)
    return centres * np.asarray(spacing_zyx, dtype=float)


def match_centres(pred_mm: np.ndarray, gt_mm: np.ndarray,
                  max_distance_mm: float = VALDO_DISTANCE_MM) -> list[tuple[int, int, float]]:
    """One-to-one pairs ``(pred index, gt index, distance)`` with distance <= ``max_distance_mm``.

    The cost of a pair beyond the distance is a constant larger than any sum of in-range distances, so
    the assignment first maximises the number of valid pairs, then minimises their total distance.
    """
    pred_mm, gt_mm = np.asarray(pred_mm, float).reshape(-1, 3), np.asarray(gt_mm, float).reshape(-1, 3)
    if len(pred_mm) == 0 or len(gt_mm) == 0:
        return []
    distance = np.linalg.norm(pred_mm[:, None, :] - gt_mm[None, :, :], axis=2)
    valid = distance <= max_distance_mm
    forbidden = max_distance_mm * (min(distance.shape) + 1) + 1.0
    rows, cols = linear_sum_assignment(np.where(valid, distance, forbidden))
    return [(int(r), int(c), float(distance[r, c])) for r, c in zip(rows, cols) if valid[r, c]]


def valdo_counts(pred_labels: np.ndarray, gt_labels: np.ndarray, spacing_zyx: Sequence[float],
                 max_distance_mm: float = VALDO_DISTANCE_MM, pred_instances: bool = False,
                 gt_instances: bool = False) -> Counts:
    """VALDO rule: predicted and true clusters matched one-to-one by centre of mass within 5 mm."""
    pred = centres_of_mass_mm(pred_labels, spacing_zyx, pred_instances)
    gt = centres_of_mass_mm(gt_labels, spacing_zyx, gt_instances)
    matched = len(match_centres(pred, gt, max_distance_mm))
    return Counts(tp=matched, fp=len(pred) - matched, fn=len(gt) - matched, tp_pred=matched)


# --- FROC -----------------------------------------------------------------------------------------------

Hits = Union[None, bool, int, Iterable[int]]


@dataclass(frozen=True)
class FrocPoint:
    threshold: float
    tpr: float
    fp_avg: float
    tp: int
    fp: int


def _hit_ids(hits: Hits, scan: int, index: int) -> set:
    if hits is None or hits is False:
        return set()
    if hits is True:
        return {("candidate", scan, index)}          # a hit of its own, distinct CMB
    if isinstance(hits, (int, np.integer)):
        return {int(hits)}
    return {int(h) for h in hits}


def froc_curve(per_scan: Sequence[Sequence[tuple[float, Hits]]], n_gt_total: int,
               n_scans: int | None = None) -> list[FrocPoint]:
    """TPR against FPavg while sweeping a threshold over per-candidate scores.

    ``per_scan[s]`` lists scan ``s``'s candidates as ``(score, hits)``; ``hits`` names the ground-truth
    CMBs the candidate overlaps: ``None`` / empty (a false positive), one id, several ids, or ``True`` for
    "a CMB of its own". At threshold ``t`` the candidates with ``score >= t`` are kept: a CMB counts once
    (at the highest score of the candidates hitting it), a candidate hitting nothing is a FP, and extra
    candidates on an already found CMB are neither (as in :func:`clusterwise_counts`). ``n_gt_total``
    counts every CMB, including those no candidate hits (they cap the TPR). Points are ordered by
    decreasing threshold (increasing FPavg); the first is ``threshold = inf`` (nothing kept).
    """
    n_scans = len(per_scan) if n_scans is None else n_scans
    found_at: dict = {}
    fp_scores: list[float] = []
    for scan, candidates in enumerate(per_scan):
        for index, (score, hits) in enumerate(candidates):
            ids = _hit_ids(hits, scan, index)
            if not ids:
                fp_scores.append(float(score))
            for gt_id in ids:
                key = (scan, gt_id)
                found_at[key] = max(found_at.get(key, -math.inf), float(score))
    if len(found_at) > n_gt_total:
        raise ValueError(f"{len(found_at)} CMBs are hit, but n_gt_total is {n_gt_total}")

    tp_scores = np.sort(np.fromiter(found_at.values(), float, len(found_at)))
    fp_sorted = np.sort(np.asarray(fp_scores, float))
    thresholds = np.unique(np.concatenate([tp_scores, fp_sorted]))[::-1]
    points = [FrocPoint(math.inf, 0.0 if n_gt_total else math.nan, 0.0, 0, 0)]
    for threshold in thresholds:
        tp = int(len(tp_scores) - np.searchsorted(tp_scores, threshold, side="left"))
        fp = int(len(fp_sorted) - np.searchsorted(fp_sorted, threshold, side="left"))
        points.append(FrocPoint(float(threshold), _ratio(tp, n_gt_total), _ratio(fp, n_scans), tp, fp))
    return points


def sensitivity_at(points: Sequence[FrocPoint], fp_avg: float) -> float:
    """Highest TPR reached with FPavg <= ``fp_avg`` (0 if none)."""
    reachable = [p.tpr for p in points if p.fp_avg <= fp_avg and not math.isnan(p.tpr)]
    return max(reachable, default=0.0)


def froc_score(points: Sequence[FrocPoint], fp_levels: Sequence[float] = FROC_FP_LEVELS) -> float:
    """Mean sensitivity at the given FPavg levels (the usual single-number FROC summary)."""
    return float(np.mean([sensitivity_at(points, level) for level in fp_levels]))


def plot_froc(curves: Mapping[str, Sequence[FrocPoint]], path: str | Path, title: str = "FROC",
              operating_points: Mapping[str, tuple[float, float]] | None = None) -> Path:
    """Draw FROC curves (TPR against FPavg, log x axis) to a PNG file.

    ``operating_points`` maps a label to an ``(fp_avg, tpr)`` marker, e.g. the thresholds in use. The
    figure is drawn with the Agg canvas directly, so no GUI backend and no global pyplot state are touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    smallest, largest = math.inf, 0.0
    for name, points in curves.items():
        drawn = [p for p in points if not math.isnan(p.tpr) and not math.isnan(p.fp_avg)]
        if not drawn:
            continue
        fp = np.array([p.fp_avg for p in drawn])
        positive = fp[fp > 0]
        if positive.size:
            smallest = min(smallest, float(positive.min()))
            largest = max(largest, float(positive.max()))
        axes.step(fp, [p.tpr for p in drawn], where="post", label=name)
    for name, (fp_avg, tpr) in (operating_points or {}).items():
        axes.plot([fp_avg], [tpr], marker="o", linestyle="none", label=name)
    if math.isfinite(smallest):
        linthresh = min(smallest, 0.1)
        axes.set_xscale("symlog", linthresh=linthresh)
        # 0, then the decades above the linear range (a decade inside it would print on top of the 0)
        first = math.ceil(math.log10(linthresh))
        last = max(first, math.floor(math.log10(max(largest, linthresh))))
        axes.set_xticks([0.0] + [10.0 ** k for k in range(first, last + 1)])
    axes.set_xlabel("FPavg (false positives per scan)")
    axes.set_ylabel("cluster-wise TPR")
    axes.set_ylim(0.0, 1.02)
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    if curves or operating_points:
        axes.legend(loc="lower right", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")     # no half-written PNG if drawing fails
    try:
        figure.savefig(partial, format="png")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
