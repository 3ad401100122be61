"""Is a fine-tuned model better than the model it started from? The rule retraining registers by.

Both models are scored on the same validation cases (:func:`CMBDetectLib.retraining.evaluate_model`);
:func:`compare_metrics` reads the cluster-wise totals of the two records and gives one verdict:

- ``unknown``: a record is missing (no validation subject, or ``--no-evaluate``): nothing to compare;
- otherwise the primary criterion is the cluster-wise **F1**: more than ``F1_TOLERANCE`` higher is
  ``better``, more than ``F1_TOLERANCE`` lower is ``worse``. An F1 defined on one side only counts as 0 on
  the other side;
- when the F1 values are within the tolerance, or undefined on both sides (no CMB and no detection in the
  validation cases), the false positives per scan decide: more than ``FP_TOLERANCE`` more is ``worse``,
  more than ``FP_TOLERANCE`` fewer is ``better``, anything else is ``equal``.

Retraining registers a ``worse`` model only when asked to (``--register-worse``), so an annotator only
ever gets a better-or-equal model by default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

F1_TOLERANCE = 0.01      # cluster-wise F1 differences up to this are noise
FP_TOLERANCE = 0.25      # false positives per scan differences up to this are noise

BETTER, EQUAL, WORSE, UNKNOWN = "better", "equal", "worse", "unknown"
VERDICTS = (BETTER, EQUAL, WORSE, UNKNOWN)
HEADLINE_KEYS = ("tpr", "fp_avg", "precision", "f1")


@dataclass(frozen=True)
class Comparison:
    """The verdict of "after" against "before", a short sentence with the numbers, and those numbers."""

    verdict: str
    reason: str
    before: dict
    after: dict

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def acceptable(self) -> bool:
        """Whether the new model may be registered without being asked to (anything but ``worse``)."""
        return self.verdict != WORSE


def _number(value: Any) -> float | None:
    """A finite float, or ``None`` for a missing / NaN value (NaN is written as ``None`` in the records)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _headline(metrics: dict | None) -> dict:
    clusterwise = (metrics or {}).get("clusterwise") or {}
    return {key: _number(clusterwise.get(key)) for key in HEADLINE_KEYS}


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _describe(before: dict, after: dict) -> str:
    """``F1 0.62 -> 0.70 (TPR 0.80 -> 0.85, FPavg 1.50 -> 1.20)``."""
    def pair(key: str) -> str:
        return f"{_text(before.get(key))} -> {_text(after.get(key))}"

    return f"F1 {pair('f1')} (TPR {pair('tpr')}, FPavg {pair('fp_avg')})"


def compare_metrics(before: dict | None, after: dict | None) -> Comparison:
    """Compare two metrics records of :func:`~CMBDetectLib.retraining.evaluate_model` (see the module doc)."""
    old, new = _headline(before), _headline(after)
    if not before or not after:
        missing = "before" if not before else "after"
        return Comparison(UNKNOWN, f"no validation metrics {missing} fine-tuning", old, new)
    numbers = _describe(old, new)
    f1_old, f1_new = old["f1"], new["f1"]
    if f1_old is not None or f1_new is not None:
        f1_old, f1_new = f1_old or 0.0, f1_new or 0.0
        if f1_new > f1_old + F1_TOLERANCE:
            return Comparison(BETTER, numbers, old, new)
        if f1_new < f1_old - F1_TOLERANCE:
            return Comparison(WORSE, numbers, old, new)
    fp_old, fp_new = old["fp_avg"], new["fp_avg"]
    if fp_old is not None and fp_new is not None:
        if fp_new > fp_old + FP_TOLERANCE:
            return Comparison(WORSE, numbers, old, new)
        if fp_new < fp_old - FP_TOLERANCE:
            return Comparison(BETTER, numbers, old, new)
    return Comparison(EQUAL, numbers, old, new)
