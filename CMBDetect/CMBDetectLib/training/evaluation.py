"""Validation metrics of the trained networks and the choice of ``th_disc``.

Computed on the stage-1 candidates of the validation subjects with DESIGN.md's cluster-wise rules (a
kept candidate is a TP if it overlaps a ground-truth CMB, else a FP; a CMB no kept candidate overlaps
is a FN), before the shape / edge-distance post-processing that the detection pipeline applies
afterwards: these are the "C. det." and "C. disc." rows of the paper's Table 2, not final detections.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np

THRESHOLD_GRID = np.round(np.arange(0.05, 0.96, 0.05), 2)


def discrimination_metrics(probabilities: np.ndarray, touched: Sequence[Sequence[Hashable]], n_cmbs: int,
                           n_scans: int, threshold: float) -> dict:
    """``touched[c]``: the ground-truth CMBs candidate ``c`` overlaps (any hashable ids, unique over
    the scans). CMBs that stage 1 missed count as false negatives."""
    probabilities = np.asarray(probabilities, dtype=float)
    keep = probabilities >= threshold
    tp = int(sum(1 for kept, cmbs in zip(keep, touched) if kept and cmbs))
    fp = int(sum(1 for kept, cmbs in zip(keep, touched) if kept and not cmbs))
    found = {cmb for kept, cmbs in zip(keep, touched) if kept for cmb in cmbs}
    fn = max(int(n_cmbs) - len(found), 0)
    tpr = len(found) / n_cmbs if n_cmbs else None
    precision = tp / (tp + fp) if tp + fp else None
    if precision is None or tpr is None:
        f1 = None
    else:
        f1 = 2 * precision * tpr / (precision + tpr) if precision + tpr > 0 else 0.0
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "fn": fn, "tpr": tpr,
            "fp_per_scan": fp / n_scans if n_scans else None, "precision": precision, "f1": f1}


def choose_discrimination_threshold(probabilities: np.ndarray, touched: Sequence[Sequence[Hashable]],
                                    n_cmbs: int, n_scans: int, default: float = 0.5) -> tuple[float, dict]:
    """The ``th_disc`` of the grid with the best cluster-wise F1 on the validation candidates (ties:
    the lower threshold, which misses fewer CMBs); ``default`` when no candidate is a CMB."""
    if len(probabilities) == 0 or not any(touched):
        return default, discrimination_metrics(probabilities, touched, n_cmbs, n_scans, default)

    def score(threshold: float) -> tuple[float, float]:
        f1 = discrimination_metrics(probabilities, touched, n_cmbs, n_scans, threshold)["f1"]
        return (f1 or 0.0, -threshold)

    best = float(max(THRESHOLD_GRID, key=score))
    return best, discrimination_metrics(probabilities, touched, n_cmbs, n_scans, best)
