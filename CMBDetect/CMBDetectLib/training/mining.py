"""Stage-1 candidates of the training cases: the student's training items and the per-stage metrics.

The student must learn on exactly what it will see at inference: patches centred on the (rounded)
centroids of the 26-connected components of ``P_det >= th_det`` (paper 2.3.2). A candidate is a CMB
when it overlaps a ground-truth CMB by at least one voxel (the cluster-wise TP rule of DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from CMBDetectLib.candidates import extract_candidates
from CMBDetectLib.errors import CancelledError
from CMBDetectLib.progress import ProgressCallback, no_progress
from CMBDetectLib.sliding_window import predict_probability_map
from CMBDetectLib.training.data import TrainingCase
from CMBDetectLib.training.sampling import PatchItem


@dataclass
class CaseCandidates:
    """Stage-1 result of one case: candidate items and how many CMBs they found."""

    items: list[PatchItem]
    n_cmbs: int
    cmbs_found: int


def evidence_mask(case: TrainingCase, evidence_threshold: float) -> np.ndarray:
    """Same window-skipping rule as the detection pipeline: brain voxels with some FRST evidence."""
    return case.brain_mask & (case.channels[1].astype(np.float32) > evidence_threshold)


def mine_case(network: torch.nn.Module, case: TrainingCase, case_index: int, th_det: float,
              roi_size: int, overlap: float, evidence_threshold: float, device: torch.device,
              batch_size: int = 8) -> CaseCandidates:
    probability = predict_probability_map(network, case.float_channels(), roi_size=roi_size, overlap=overlap,
                                          batch_size=batch_size, device=device,
                                          patch_mask=evidence_mask(case, evidence_threshold),
                                          channels_last=False)  # bit-for-bit reproducible training
    components, candidates = extract_candidates(probability, th_det, case.spacing_zyx)
    # (component, instance) pairs of every overlap: which CMBs each candidate touches.
    both = (components > 0) & (case.instances > 0)
    pairs = np.unique(np.stack([components[both], case.instances[both]], axis=1), axis=0)
    touched: dict[int, list[int]] = {}
    for component, instance in pairs.tolist():
        touched.setdefault(component, []).append(instance)
    items = [PatchItem(case_index, np.asarray(c.centroid_kji, dtype=float), int(c.label in touched),
                       "candidate", tuple(touched.get(c.label, ()))) for c in candidates]
    found = {instance for instances in touched.values() for instance in instances}
    return CaseCandidates(items, case.n_cmbs, len(found))


def mine_candidates(network: torch.nn.Module, cases: list[TrainingCase], th_det: float, roi_size: int,
                    overlap: float, evidence_threshold: float, device: torch.device, batch_size: int = 8,
                    progress: ProgressCallback | None = None, cancel=None) -> list[CaseCandidates]:
    report = progress or no_progress
    results = []
    for index, case in enumerate(cases):
        if cancel is not None and cancel():
            raise CancelledError("cancelled while finding stage-1 candidates")
        report(index / max(len(cases), 1), f"stage-1 candidates of {case.case}")
        results.append(mine_case(network, case, index, th_det, roi_size, overlap, evidence_threshold, device,
                                 batch_size))
    report(1.0, "stage-1 candidates ready")
    return results


def candidate_summary(results: list[CaseCandidates]) -> dict:
    """Cluster-wise TPR and false positives per scan of stage 1 (paper Table 2, "C. det.")."""
    n_cmbs = sum(r.n_cmbs for r in results)
    found = sum(r.cmbs_found for r in results)
    false_positives = sum(1 for r in results for item in r.items if item.label == 0)
    return {"scans": len(results), "cmbs": n_cmbs, "candidates": sum(len(r.items) for r in results),
            "tpr": found / n_cmbs if n_cmbs else None,
            "fp_per_scan": false_positives / len(results) if results else None}


def ground_truth_items(cases: list[TrainingCase], case_indices: list[int]) -> list[PatchItem]:
    """One positive item at the centre of every CMB (covers the CMBs stage 1 missed)."""
    return [PatchItem(index, centre, 1, "ground_truth")
            for index in case_indices for centre in cases[index].cmb_centres_kji]


def hard_negative_items(cases: list[TrainingCase], case_indices: list[int]) -> list[PatchItem]:
    """Reviewers' rejected candidates and synthetic mimics (not overlapping a CMB)."""
    items = []
    for index in case_indices:
        case = cases[index]
        for point in case.hard_negatives_kji:
            voxel = tuple(np.clip(np.round(point).astype(int), 0, np.asarray(case.shape) - 1))
            if not case.labels[voxel]:
                items.append(PatchItem(index, np.asarray(point, dtype=float), 0, "hard_negative"))
    return items


def look_alike_items(cases: list[TrainingCase], case_indices: list[int], count: int,
                     rng: np.random.Generator) -> list[PatchItem]:
    """Negatives at the strongest non-CMB radial-symmetry responses: a stand-in for false candidates
    while stage 1 finds few (a short or early run), so the student never sees only one class."""
    from CMBDetectLib.training.sampling import high_evidence_voxels

    points = [(index, point) for index in case_indices
              for point in high_evidence_voxels(cases[index], limit=max(count, 1), rng=rng)]
    if not points or count <= 0:
        return []
    chosen = rng.choice(len(points), min(count, len(points)), replace=False)
    return [PatchItem(points[i][0], points[i][1].astype(float), 0, "look_alike") for i in sorted(chosen)]
