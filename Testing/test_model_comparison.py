"""The better-or-equal rule retraining registers by (``CMBDetectLib.model_comparison``)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from CMBDetectLib.model_comparison import F1_TOLERANCE, FP_TOLERANCE, Comparison, compare_metrics


def record(f1: float | None, fp_avg: float | None = 1.0, tpr: float | None = 0.8,
           precision: float | None = 0.6) -> dict:
    """A metrics record as ``retraining.evaluate_model`` returns it (NaN written as ``None``)."""
    return {"clusterwise": {"tpr": tpr, "fp_avg": fp_avg, "precision": precision, "f1": f1, "tp": 4,
                            "fp": 3, "fn": 1, "n_scans": 3},
            "valdo": {}, "cases": ["sub-03"], "model": "tiny-test-1.0.0"}


def test_a_higher_f1_is_better_even_with_more_false_positives():
    comparison = compare_metrics(record(0.62, fp_avg=1.5, tpr=0.80), record(0.70, fp_avg=2.5, tpr=0.85))
    assert comparison.verdict == "better"
    assert comparison.reason == "F1 0.62 -> 0.70 (TPR 0.80 -> 0.85, FPavg 1.50 -> 2.50)"
    assert comparison.before["f1"] == 0.62 and comparison.after["fp_avg"] == 2.5


def test_a_lower_f1_is_worse_even_with_fewer_false_positives():
    comparison = compare_metrics(record(0.70, fp_avg=2.0), record(0.60, fp_avg=0.5))
    assert comparison.verdict == "worse"
    assert not comparison.acceptable
    assert comparison.reason.startswith("F1 0.70 -> 0.60")


@pytest.mark.parametrize("fp_after, verdict", [(1.0, "equal"), (1.0 + FP_TOLERANCE, "equal"),
                                               (1.0 - FP_TOLERANCE, "equal"), (1.5, "worse"),
                                               (0.5, "better")])
def test_within_the_f1_tolerance_the_false_positives_decide(fp_after, verdict):
    comparison = compare_metrics(record(0.70, fp_avg=1.0), record(0.70 + F1_TOLERANCE / 2, fp_avg=fp_after))
    assert comparison.verdict == verdict
    assert comparison.acceptable == (verdict != "worse")


def test_f1_exactly_at_the_tolerance_is_not_a_difference():
    assert compare_metrics(record(0.5), record(0.5 - F1_TOLERANCE)).verdict == "equal"
    assert compare_metrics(record(0.5), record(0.5 + 2 * F1_TOLERANCE)).verdict == "better"


@pytest.mark.parametrize("fp_before, fp_after, verdict", [(0.0, 0.0, "equal"), (0.0, 2.0, "worse"),
                                                          (3.0, 1.0, "better"), (None, 1.0, "equal")])
def test_without_cmbs_f1_is_undefined_and_the_false_positives_decide(fp_before, fp_after, verdict):
    """Validation cases without any CMB: TPR and F1 are NaN (``None``) on both sides."""
    before = record(None, fp_avg=fp_before, tpr=None, precision=None)
    after = record(None, fp_avg=fp_after, tpr=None, precision=None)
    comparison = compare_metrics(before, after)
    assert comparison.verdict == verdict
    assert "F1 n/a -> n/a" in comparison.reason


def test_an_f1_defined_on_one_side_only_counts_as_zero_on_the_other():
    assert compare_metrics(record(None, tpr=None), record(0.4)).verdict == "better"
    assert compare_metrics(record(0.4), record(None, tpr=None)).verdict == "worse"
    assert compare_metrics(record(0.0), record(None, tpr=None)).verdict == "equal"


@pytest.mark.parametrize("before, after", [(None, record(0.5)), (record(0.5), None), ({}, record(0.5)),
                                           (None, None)])
def test_a_missing_record_gives_unknown(before, after):
    comparison = compare_metrics(before, after)
    assert comparison.verdict == "unknown" and comparison.acceptable
    assert "no validation metrics" in comparison.reason


def test_nan_values_and_json():
    comparison = compare_metrics(record(float("nan"), tpr=float("nan")), record(0.3))
    assert comparison.verdict == "better" and comparison.before["f1"] is None
    data = comparison.to_dict()
    assert set(data) == {"verdict", "reason", "before", "after"}
    assert json.loads(json.dumps(data)) == data
    with pytest.raises(dataclasses.FrozenInstanceError):
        comparison.verdict = "equal"  # type: ignore[misc]
    assert isinstance(comparison, Comparison)
