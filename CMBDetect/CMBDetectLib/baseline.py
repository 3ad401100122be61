"""A classical baseline detector for comparison: FRST map + threshold + the same post-processing.

No network is involved: the fast radial symmetry transform (feature channel 1, in [0, 1] after its robust
normalisation) is thresholded inside the brain, its 26-connected components become candidates exactly as
stage 1 does (:func:`candidates.extract_candidates`), and the three post-processing filters of the method
remove small, elongated and near-boundary ones (:func:`postprocessing.apply_postprocessing`).

The result is a :class:`pipeline.DetectionResult`, so it is written, reviewed and evaluated exactly like the
detector's: ``p_det`` and ``p_disc`` both hold the candidate's FRST peak (there is no second stage, so
``th_disc = 0`` and no candidate is removed for "discrimination"). In ``cmbdetect evaluate`` the FROC
curve "discrimination + post-processing (th_disc)" therefore sweeps the FRST threshold over the
post-processed candidates: the baseline's FROC.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from CMBDetectLib.candidates import extract_candidates
from CMBDetectLib.errors import InputError
from CMBDetectLib.pipeline import CandidateRecord, DetectionParameters, DetectionResult
from CMBDetectLib.postprocessing import PostprocessingParameters, apply_postprocessing, edge_distance_mm

FRST_CHANNEL = 1
DEFAULT_TH_FRST = 0.5      # half the scan's 99.9th-percentile FRST response; tune it with the FROC curve
BASELINE_MODEL_INFO = {"name": "baseline-frst", "version": "1", "sha256": None,
                       "description": "FRST threshold + post-processing (no network)"}
_MAX_LABEL = np.iinfo(np.uint16).max


def detect_baseline(features: Any, th_frst: float = DEFAULT_TH_FRST,
                    postprocessing: PostprocessingParameters | None = None) -> DetectionResult:
    """Detect CMB candidates in a ``ScanFeatures``-like object without any network.

    ``features`` needs ``channels`` ([C, K, J, I], channel 1 = FRST), ``brain_mask``, ``spacing_zyx`` and
    ``grid`` (a ``preprocessing.ScanGrid``: ``labels_to_input``, ``working_index_to_input_index``,
    ``working_index_to_ras``, ``input_volume_like``).
    """
    if not 0.0 <= th_frst <= 1.0:
        raise InputError(f"the FRST threshold must be between 0 and 1, got {th_frst}")
    postprocessing = postprocessing or PostprocessingParameters()
    timings: dict[str, float] = {}
    start = time.perf_counter()

    brain = np.asarray(features.brain_mask, dtype=bool)
    spacing = tuple(float(s) for s in features.spacing_zyx)
    # Only the brain votes: FRST rings outside it (skull, background) are not CMBs.
    score = np.where(brain, np.asarray(features.channels[FRST_CHANNEL], dtype=np.float32), 0.0)
    labels, candidates = extract_candidates(score, th_frst, spacing)
    if len(candidates) > _MAX_LABEL:
        raise InputError(f"{len(candidates)} FRST components at threshold {th_frst}: raise the threshold")
    timings["candidates"] = time.perf_counter() - start

    start = time.perf_counter()
    distance = edge_distance_mm(brain, spacing)
    reasons, shapes = apply_postprocessing(candidates, labels, distance, spacing, postprocessing)
    timings["postprocessing"] = time.perf_counter() - start

    grid = features.grid
    records: list[CandidateRecord] = []
    if candidates:
        centroids = np.array([c.centroid_kji for c in candidates], dtype=float)
        input_kji = np.asarray(grid.working_index_to_input_index(centroids), dtype=float).reshape(-1, 3)
        ras = np.asarray(grid.working_index_to_ras(centroids), dtype=float).reshape(-1, 3)
        for index, candidate in enumerate(candidates):
            shape, reason = shapes[candidate.label], reasons[candidate.label]
            records.append(CandidateRecord(
                id=candidate.label, centroid_ijk=tuple(float(v) for v in input_kji[index][::-1]),
                centroid_ras=tuple(float(v) for v in ras[index]), volume_mm3=float(candidate.volume_mm3),
                volume_voxels=int(candidate.volume_voxels), p_det=float(candidate.p_det),
                p_disc=float(candidate.p_det), ellipticity=shape.ellipticity,
                edge_distance_mm=shape.edge_distance_mm, final=reason is None, reason=reason))

    start = time.perf_counter()
    input_labels = np.asarray(grid.labels_to_input(labels.astype(np.uint16))).astype(np.uint16, copy=False)
    timings["to_input_grid"] = time.perf_counter() - start
    parameters = DetectionParameters(th_det=float(th_frst), th_disc=0.0,
                                     min_volume_mm3=postprocessing.min_volume_mm3,
                                     max_ellipticity=postprocessing.max_ellipticity,
                                     min_edge_distance_mm=postprocessing.min_edge_distance_mm)
    return DetectionResult(candidates=records, parameters=parameters,
                           candidate_labels=grid.input_volume_like(input_labels), timings=timings,
                           model_info=dict(BASELINE_MODEL_INFO))
