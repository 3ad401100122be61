"""Cluster-wise counts, VALDO matching and FROC against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from CMBDetectLib.metrics import (
    Counts,
    bootstrap_intervals,
    clusterwise_counts,
    froc_curve,
    froc_score,
    match_centres,
    plot_froc,
    sensitivity_at,
    summarise,
    valdo_counts,
)


def empty(shape=(10, 12, 14)):
    return np.zeros(shape, np.uint16)


def test_simple_tp_fp_fn():
    gt, pred = empty(), empty()
    gt[2, 2, 2] = 1                 # found
    gt[7, 7, 7:9] = 1               # missed
    pred[2, 2, 1:3] = 5             # overlaps the first CMB by one voxel
    pred[5, 10, 10] = 9             # nowhere near a CMB
    assert clusterwise_counts(pred, gt) == Counts(tp=1, fp=1, fn=1, tp_pred=1)


def test_gt_touched_by_two_predictions_counts_once():
    gt, pred = empty(), empty()
    gt[4, 4, 3:8] = 1
    pred[4, 4, 3] = 1
    pred[4, 4, 7] = 2               # two separate predictions on the same CMB
    counts = clusterwise_counts(pred, gt)
    assert counts == Counts(tp=1, fp=0, fn=0, tp_pred=2)
    summary = summarise([counts])
    assert summary["tpr"] == 1.0 and summary["precision"] == 1.0 and summary["f1"] == 1.0


def test_prediction_touching_two_gt_cmbs_finds_both():
    gt, pred = empty(), empty()
    gt[4, 4, 2] = 1
    gt[4, 4, 6] = 1                 # two CMBs (not connected)
    pred[4, 4, 2:7] = 3             # one long prediction over both
    assert clusterwise_counts(pred, gt) == Counts(tp=2, fp=0, fn=0, tp_pred=1)


def test_clusters_are_26_connected_but_instances_can_be_kept():
    gt, pred = empty(), empty()
    pred[1, 1, 1] = 1
    pred[2, 2, 2] = 2               # touches the first by a corner: one cluster
    assert clusterwise_counts(pred, gt) == Counts(tp=0, fp=1, fn=0)
    assert clusterwise_counts(pred, gt, pred_instances=True) == Counts(tp=0, fp=2, fn=0)
    gt[5, 5, 5:7] = [1, 2]          # two touching annotated CMBs, one hit
    pred[5, 5, 5] = 3
    assert clusterwise_counts(pred, gt).fn == 0
    assert clusterwise_counts(pred, gt, gt_instances=True).fn == 1


def test_empty_scans_and_summary():
    nothing = clusterwise_counts(empty(), empty())
    assert nothing == Counts(0, 0, 0)
    summary = summarise([nothing])
    assert math.isnan(summary["tpr"]) and math.isnan(summary["precision"]) and math.isnan(summary["f1"])
    assert summary["fp_avg"] == 0 and summary["n_scans"] == 1

    only_fp = empty()
    only_fp[3, 3, 3] = 1
    counts = [clusterwise_counts(only_fp, empty()), Counts(tp=3, fp=1, fn=1), nothing]
    summary = summarise(counts)
    assert summary["tp"] == 3 and summary["fp"] == 2 and summary["fn"] == 1 and summary["n_scans"] == 3
    assert summary["tpr"] == pytest.approx(0.75)
    assert summary["fp_avg"] == pytest.approx(2 / 3)
    assert summary["precision"] == pytest.approx(0.6)
    assert summary["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert summarise([Counts(0, 0, 4)])["f1"] == 0.0     # missed everything: F1 0, precision undefined
    assert math.isnan(summarise([])["fp_avg"])


def test_shapes_must_match():
    with pytest.raises(ValueError):
        clusterwise_counts(empty((3, 3, 3)), empty((3, 3, 4)))


def test_valdo_one_to_one_within_5mm():
    spacing = (3.0, 0.5, 0.5)
    gt, pred = empty((10, 40, 40)), empty((10, 40, 40))
    gt[5, 10, 10] = 1
    gt[5, 10, 20] = 1               # 5 mm from the first
    pred[5, 10, 15] = 1             # 2.5 mm from both: only one of them may take it
    pred[6, 30, 30] = 1             # far from everything
    gt[2, 30, 30] = 1
    counts = valdo_counts(pred, gt, spacing)
    assert counts == Counts(tp=1, fp=1, fn=2)
    # overlap is not needed, only the distance; 4 slices x 3 mm = 12 mm is too far
    assert clusterwise_counts(pred, gt).tp == 0


def test_assignment_maximises_pairs_before_distance():
    # greedy nearest matching would pair p0-g0 (1 mm) and leave p1 with nothing within 5 mm
    pred = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 5.5]])
    gt = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -3.0]])
    pairs = match_centres(pred, gt, 5.0)
    assert len(pairs) == 2 and all(d <= 5.0 for _, _, d in pairs)
    assert sorted((p, g) for p, g, _ in pairs) == [(0, 1), (1, 0)]
    assert match_centres(pred, np.zeros((0, 3))) == []


def test_froc_hand_computed():
    # scan 0: CMB 1 hit by 0.9 and 0.4; FPs at 0.8, 0.3.  scan 1: CMB 1 hit at 0.6; FP at 0.6;
    # one CMB in scan 1 is never hit (n_gt_total = 3).
    per_scan = [[(0.9, 1), (0.8, None), (0.4, [1]), (0.3, [])], [(0.6, {1}), (0.6, None)]]
    points = froc_curve(per_scan, n_gt_total=3)
    table = [(p.threshold, p.tp, p.fp) for p in points]
    # 0.4 is no step: that candidate only re-finds a CMB already found at 0.9
    assert table == [(math.inf, 0, 0), (0.9, 1, 0), (0.8, 1, 1), (0.6, 2, 2), (0.3, 2, 3)]
    assert points[-1].tpr == pytest.approx(2 / 3) and points[-1].fp_avg == pytest.approx(1.5)
    assert sensitivity_at(points, 0.5) == pytest.approx(1 / 3)
    assert sensitivity_at(points, 1.0) == pytest.approx(2 / 3)
    assert 0 < froc_score(points) < 1


def test_froc_candidate_hitting_two_cmbs_and_empty_scans():
    points = froc_curve([[(0.7, [1, 2])], [], []], n_gt_total=2)
    assert points[-1].tp == 2 and points[-1].tpr == 1.0 and points[-1].fp_avg == 0.0
    assert [p.tp for p in froc_curve([[(0.5, True), (0.4, True)]], n_gt_total=2)] == [0, 1, 2]
    assert froc_curve([[], []], n_gt_total=0)[-1].fp == 0
    with pytest.raises(ValueError):
        froc_curve([[(0.5, [1, 2])]], n_gt_total=1)


def test_plot_froc_writes_a_png(tmp_path):
    points = froc_curve([[(0.9, 1), (0.8, None), (0.2, None)]], n_gt_total=1)
    path = plot_froc({"stage 1": points, "empty": []}, tmp_path / "sub" / "froc.png",
                     operating_points={"th = 0.5": (1.0, 1.0)})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(path.parent.iterdir()) == [path]


def test_bootstrap_intervals_match_an_enumeration_of_the_resamples() -> None:
    # Two scans, one CMB each, one found: a resample holds the found one twice (TPR 1, 1/4 of draws), both
    # (0.5, 1/2) or the missed one twice (0, 1/4); its false positives are 0, 2 or 4 per scan likewise.
    scans = [Counts(tp=1, fp=0, fn=0), Counts(tp=0, fp=4, fn=1)]
    intervals = bootstrap_intervals(scans, level=0.95, n_resamples=20000, seed=1)
    assert intervals["tpr"] == (0.0, 1.0) and intervals["fp_avg"] == (0.0, 4.0)
    # At 40 % the interval is the central 30-70 % band: only the mixed draws.
    assert bootstrap_intervals(scans, level=0.4, n_resamples=20000, seed=1) == {"tpr": (0.5, 0.5),
                                                                                 "fp_avg": (2.0, 2.0)}


def test_bootstrap_intervals_shrink_with_more_scans_and_hold_the_estimate() -> None:
    rng = np.random.default_rng(0)
    scans = [Counts(tp=int(t), fp=int(f), fn=int(n)) for t, f, n in
             zip(rng.integers(0, 6, 200), rng.integers(0, 4, 200), rng.integers(0, 3, 200))]
    point = summarise(scans)
    wide, narrow = bootstrap_intervals(scans[:20]), bootstrap_intervals(scans)
    assert narrow["tpr"][0] <= point["tpr"] <= narrow["tpr"][1]
    assert narrow["fp_avg"][0] <= point["fp_avg"] <= narrow["fp_avg"][1]
    assert narrow["tpr"][1] - narrow["tpr"][0] < wide["tpr"][1] - wide["tpr"][0]
    assert narrow["fp_avg"][1] - narrow["fp_avg"][0] < wide["fp_avg"][1] - wide["fp_avg"][0]
    assert bootstrap_intervals(scans[:20]) == wide                      # deterministic
    identical = bootstrap_intervals([Counts(2, 1, 2)] * 5)
    assert identical == {"tpr": (0.5, 0.5), "fp_avg": (1.0, 1.0)}
    assert all(math.isnan(v) for v in bootstrap_intervals([Counts(0, 3, 0)])["tpr"])   # no CMB: no TPR
