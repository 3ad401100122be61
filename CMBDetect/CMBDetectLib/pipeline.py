"""The two-stage detection pipeline with cached stages for interactive review.

The networks run once per scan (:meth:`DetectionSession.run`); :meth:`DetectionSession.refilter` re-applies
thresholds and post-processing from the cache: a ``th_disc`` or post-processing change touches no network, a
``th_det`` change re-extracts connected components and scores only candidates never seen before.

A model with student test-time flips scores a candidate 8 times. While a ``th_det`` slider is being dragged,
``refilter(..., preview=True)`` gives each new candidate a *provisional* score: the score of the component that
held its peak at the nearest threshold already seen (components at two thresholds nest; no network), or, for a
blob no threshold has seen, a one-view student score (8x cheaper). :meth:`DetectionSession.score_provisional`
then replaces those scores in small chunks (the GUI does it between events), so that what the user finally sees
is the model's real score.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from CMBDetectLib.candidates import Candidate, extract_candidates, extract_patches
from CMBDetectLib.errors import CancelledError, InputError, ModelError
from CMBDetectLib.model_package import ModelPackage
from CMBDetectLib.postprocessing import PostprocessingParameters, apply_postprocessing, edge_distance_mm
from CMBDetectLib.progress import ProgressCallback, no_progress, scaled
from CMBDetectLib.volume import Volume

CANDIDATES_SCHEMA = "cmbdetect.candidates/1"
REASONS = ("discrimination", "volume", "ellipticity", "edge_distance")
# Previewed candidates given their real score per GUI event-loop turn (8 x 8 views: ~0.1 s on a laptop CPU).
REFINE_CHUNK = 8
MAX_CACHED_THRESHOLDS = 8   # Th_Cdet values whose components stay cached (a revisited evicted one: ~0.2 s, no network)
# Parameters a model may set per modality ({parameter: (model.json section, key)}): the student's scores are not
# equally sharp on every modality, and blooming makes SWI / T2* CMBs larger than QSM's.
PER_MODALITY = {"th_disc": ("thresholds", "th_disc_by_modality"),
                "min_volume_mm3": ("postprocessing", "min_volume_mm3_by_modality")}


def _per_modality_values(model: ModelPackage, modality: str) -> dict[str, float]:
    """The model's per-modality values (``PER_MODALITY``) for ``modality``, where it has them."""
    from CMBDetectLib.validation import normalise_modality

    own = normalise_modality(modality)
    values = {}
    for name, (section, key) in PER_MODALITY.items():
        by_modality = (model.manifest.get(section) or {}).get(key) or {}
        if by_modality.get(own) is not None:
            values[name] = float(by_modality[own])
    return values


@dataclass
class DetectionParameters:
    """Everything the user can tune after the networks have run."""

    th_det: float = 0.5
    th_disc: float = 0.5
    min_volume_mm3: float = PostprocessingParameters.min_volume_mm3
    max_ellipticity: float = PostprocessingParameters.max_ellipticity
    min_edge_distance_mm: float = PostprocessingParameters.min_edge_distance_mm

    @classmethod
    def for_model(cls, model: ModelPackage | None, modality: str | None = None,
                  **overrides: Any) -> DetectionParameters:
        """The model's recommended defaults, then ``overrides`` (``None`` values are ignored).

        ``modality``: the model's value for that modality where it has one (``th_disc`` from
        ``thresholds.th_disc_by_modality``, ``min_volume_mm3`` from ``postprocessing.min_volume_mm3_by_modality``,
        both chosen by calibration); otherwise its shared value.
        """
        values: dict[str, Any] = {}
        if model is not None:
            values.update({k: v for k, v in model.thresholds.items() if k in ("th_det", "th_disc")})
            values.update({k: v for k, v in model.postprocessing.items()
                           if k in ("min_volume_mm3", "max_ellipticity", "min_edge_distance_mm")})
            if modality is not None:
                values.update(_per_modality_values(model, modality))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    def following_modality(self, model: ModelPackage | None, old: str | None, new: str) -> DetectionParameters:
        """These parameters after the user switched the modality from ``old`` to ``new``: each per-modality
        value (``PER_MODALITY``) follows the model's value for ``new`` only while it still is the model's value
        for ``old`` (a value the user chose is never overwritten)."""
        if model is None:
            return self
        recommended_old = DetectionParameters.for_model(model, old)
        recommended_new = DetectionParameters.for_model(model, new)
        follow = {name: getattr(recommended_new, name) for name in PER_MODALITY
                  if abs(getattr(self, name) - getattr(recommended_old, name)) <= 1e-6}
        return replace_parameters(self, **follow) if follow else self

    @classmethod
    def from_dict(cls, values: dict) -> DetectionParameters:
        known = {f.name for f in fields(cls)}
        params = cls(**{k: float(v) for k, v in values.items() if k in known})
        params.validate()
        return params

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        for name in ("th_det", "th_disc"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0 or not np.isfinite(value):
                raise InputError(f"{name} must be between 0 and 1, got {value}")
        for name in ("min_volume_mm3", "max_ellipticity", "min_edge_distance_mm"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise InputError(f"{name} must be a non-negative number, got {getattr(self, name)}")

    def postprocessing(self) -> PostprocessingParameters:
        return PostprocessingParameters(min_volume_mm3=self.min_volume_mm3, max_ellipticity=self.max_ellipticity,
                                        min_edge_distance_mm=self.min_edge_distance_mm)


@dataclass
class CandidateRecord:
    """One stage-1 candidate with everything later stages measured about it."""

    id: int
    centroid_ijk: tuple[float, float, float]
    centroid_ras: tuple[float, float, float]
    volume_mm3: float
    volume_voxels: int
    p_det: float
    p_disc: float
    ellipticity: float
    edge_distance_mm: float
    final: bool
    reason: str | None

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("centroid_ijk", "centroid_ras"):
            data[key] = [round(float(v), 3) for v in data[key]]
        for key in ("volume_mm3", "p_det", "p_disc", "ellipticity", "edge_distance_mm"):
            data[key] = round(float(data[key]), 4)
        return data


@dataclass
class DetectionResult:
    """Candidates of every stage at one parameter setting, on the input image's grid."""

    candidates: list[CandidateRecord]
    parameters: DetectionParameters
    candidate_labels: Volume
    timings: dict[str, float] = field(default_factory=dict)
    model_info: dict = field(default_factory=dict)
    provisional: int = 0           # candidates whose student score is provisional (refilter preview=True)

    @property
    def final_candidates(self) -> list[CandidateRecord]:
        return [c for c in self.candidates if c.final]

    def final_labels(self) -> Volume:
        """Instance label map of the final detections only (k = candidate id k)."""
        labels = self.candidate_labels.array
        lookup = np.zeros(int(labels.max(initial=0)) + 1, dtype=labels.dtype)
        for candidate in self.final_candidates:
            lookup[candidate.id] = candidate.id
        return self.candidate_labels.with_array(lookup[labels])

    def counts_by_reason(self) -> dict[str, int]:
        counts = {"final": len(self.final_candidates)}
        for reason in REASONS:
            counts[reason] = sum(1 for c in self.candidates if c.reason == reason)
        return counts

    def to_json_dict(self, image_path: str | None, modality: str, image_shape=None, image_spacing=None) -> dict:
        labels = self.candidate_labels
        return {
            "schema": CANDIDATES_SCHEMA,
            "image": {"path": str(image_path) if image_path else None,
                      "shape": list(image_shape or labels.shape_ijk),
                      "spacing": [float(s) for s in (image_spacing or labels.spacing)],
                      "modality": modality},
            "model": self.model_info,
            "parameters": self.parameters.to_dict(),
            "timings": {k: round(float(v), 3) for k, v in self.timings.items()},
            "counts": {"candidates": len(self.candidates), **self.counts_by_reason()},
            "candidates": [c.to_dict() for c in self.candidates],
        }


@dataclass
class _Extraction:
    """Stage-1 components at one ``th_det`` (cached per threshold)."""

    labels: np.ndarray            # working grid, component label per voxel
    candidates: list[Candidate]
    ids: np.ndarray               # stable candidate id of each component (index = component label - 1)
    keys: list[tuple[int, int, int]]   # student-score key per component (rounded centroid)
    ellipticity: np.ndarray
    edge_distance: np.ndarray
    shape_reason: list[str | None]     # per component, for the current post-processing parameters
    shape_params: PostprocessingParameters | None = None
    input_labels: Volume | None = None


class DetectionSession:
    """Runs the networks once for a scan and answers threshold changes from the cache."""

    def __init__(self, model: ModelPackage | None, device: str = "auto", batch_size: int = 8,
                 progress: ProgressCallback | None = None, cancel=None):
        self.model = model
        self.device_preference = device
        self.batch_size = batch_size
        self.progress = progress or no_progress
        self.cancel = cancel
        self.features = None
        self.probability: np.ndarray | None = None
        self.modality: str | None = None
        self.timings: dict[str, float] = {}
        self.device_used: str | None = None
        self._edge_distance: np.ndarray | None = None
        self._scores: dict[tuple[int, int, int], float] = {}
        self._preview_scores: dict[tuple[int, int, int], float] = {}   # provisional scores awaiting the real one
        self._ids: dict[tuple[int, int, int], int] = {}
        # Least recently used out first: each holds a working-grid and an input-grid label map (~110 MB on a
        # 512x512x150 scan), and a slider with 0.01 steps would otherwise keep up to 99 of them.
        self._extractions: OrderedDict[float, _Extraction] = OrderedDict()
        self._student = None
        self._student_device = "cpu"      # the stage-1 device once run() chose one (a loaded session: CPU)
        self._input_reference: Volume | None = None
        self.model_info: dict = model.info() if model is not None else {}
        self.student_flips = model.student_flips if model is not None else False

    # ------------------------------------------------------------------ running
    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise CancelledError("detection cancelled")

    def _device(self):
        from CMBDetectLib.device import select_device

        return select_device(self.device_preference)

    def run(self, volume: Volume, modality: str, mask: Volume | None = None,
            params: DetectionParameters | None = None) -> DetectionResult:
        """Preprocess, run stage 1 once, then :meth:`refilter` with ``params``."""
        from CMBDetectLib.device import describe_device, run_with_oom_fallback
        from CMBDetectLib.features import compute_features, feature_settings
        from CMBDetectLib.sliding_window import predict_probability_map
        from CMBDetectLib.validation import normalise_modality

        if self.model is None:
            raise ModelError("no model given: detection needs a model package")
        self.modality = normalise_modality(modality)
        params = params or DetectionParameters.for_model(self.model, self.modality)
        params.validate()
        preprocessing = self.model.preprocessing
        start = time.perf_counter()
        self.features = compute_features(volume, self.modality, mask, progress=scaled(self.progress, 0.0, 0.45),
                                         **feature_settings(preprocessing))
        self.timings = {f"features.{k}": float(v) for k, v in getattr(self.features, "timings", {}).items()}
        self.timings["features"] = time.perf_counter() - start
        self.features.channels = self.features.channels.astype(np.float16).astype(np.float32)
        self._input_reference = Volume(np.zeros((1, 1, 1), np.uint8), volume.spacing, volume.origin, volume.direction)
        self._input_shape = volume.array.shape
        self._check_cancel()

        device = self._device()
        self.device_used = describe_device(device)
        self.progress(0.45, f"stage 1: candidate detection on {self.device_used}")
        start = time.perf_counter()
        from CMBDetectLib.networks.fusion import fuse_batch_norm

        network = fuse_batch_norm(self.model.network("stage1", device))
        self._student_device = device
        patch_mask = self._evidence_mask()

        def stage1(batch_size: int, run_device) -> np.ndarray:
            return predict_probability_map(
                network.to(run_device), self.features.channels, roi_size=self.model.patch_size("stage1"),
                overlap=float(preprocessing.get("overlap", 0.25)), batch_size=batch_size, device=run_device,
                patch_mask=patch_mask, progress=scaled(self.progress, 0.45, 0.85))

        probability = run_with_oom_fallback(stage1, self.batch_size, device, log=self._log)
        # Kept at float16 precision so that a saved session (float16 on disk) answers exactly like this one.
        self.probability = (probability * self.features.brain_mask).astype(np.float16).astype(np.float32)
        self.timings["stage1"] = time.perf_counter() - start
        self._edge_distance = edge_distance_mm(self.features.brain_mask, self.features.spacing_zyx)
        self._extractions.clear()
        self._scores.clear()
        self._preview_scores.clear()
        self._ids.clear()
        self._check_cancel()
        self.progress(0.85, "stage 2: candidate discrimination")
        start = time.perf_counter()
        result = self.refilter(params)
        self.timings["discrimination_and_postprocessing"] = time.perf_counter() - start
        result.timings = dict(self.timings)
        self.progress(1.0, f"{len(result.final_candidates)} CMBs from {len(result.candidates)} candidates")
        return result

    def _log(self, message: str) -> None:
        # Device fallbacks (GPU out of memory -> smaller batch -> CPU) must be visible to the user.
        self.progress(0.45, message)

    def _evidence_mask(self) -> np.ndarray:
        """Windows worth running stage 1 on: brain voxels with some radial-symmetry evidence."""
        frst = self.features.channels[1]
        threshold = float(self.model.preprocessing.get("evidence_threshold", 0.05))
        return self.features.brain_mask & (frst > threshold)

    # ------------------------------------------------------------------ re-filtering
    def refilter(self, params: DetectionParameters, preview: bool = False) -> DetectionResult:
        """Apply thresholds + post-processing from the cache (no stage-1 network).

        ``preview``: candidates never scored get a provisional score (the score of the component that held their
        peak at a cached threshold, else a one-view student score; only for a model with test-time flips, whose
        real scores cost 8 views); ``result.provisional`` counts them.
        """
        if self.probability is None or self.features is None:
            raise RuntimeError("run() (or load()) must come before refilter()")
        params.validate()
        start = time.perf_counter()
        extraction = self._extraction(params.th_det, preview)
        shape_params = params.postprocessing()
        if extraction.shape_params != shape_params:
            self._apply_shape_filters(extraction, shape_params)
        records = []
        provisional = 0
        for index, candidate in enumerate(extraction.candidates):
            key = extraction.keys[index]
            p_disc = self._scores.get(key)
            if p_disc is None:
                p_disc = self._preview_scores[key]
                provisional += 1
            reason = "discrimination" if p_disc < params.th_disc else extraction.shape_reason[index]
            records.append(self._record(extraction, index, candidate, p_disc, reason))
        if extraction.input_labels is None:
            extraction.input_labels = self._input_labels(extraction)
        timings = dict(self.timings)
        timings["refilter"] = time.perf_counter() - start
        return DetectionResult(records, params, extraction.input_labels, timings, dict(self.model_info),
                               provisional)

    def _extraction(self, th_det: float, preview: bool = False) -> _Extraction:
        key = round(float(th_det), 6)
        extraction = self._extractions.get(key)
        if extraction is not None:
            self._extractions.move_to_end(key)
        else:
            labels, candidates = extract_candidates(self.probability, th_det, self.features.spacing_zyx)
            keys = [tuple(int(round(v)) for v in c.centroid_kji) for c in candidates]
            ids = np.array([self._stable_id(tuple(int(v) for v in c.peak_kji)) for c in candidates],
                           dtype=np.int64)
            extraction = _Extraction(labels, candidates, ids, keys, np.zeros(len(candidates)),
                                     np.zeros(len(candidates)), [None] * len(candidates))
            self._extractions[key] = extraction
            while len(self._extractions) > MAX_CACHED_THRESHOLDS:
                self._extractions.popitem(last=False)
        missing = self._unscored(extraction)
        if preview and self.student_flips:
            self._preview_from_cached(key, extraction, set(missing))
            unseen = [k for k in missing if k not in self._preview_scores]
            if unseen:
                self._score(unseen, preview=True)
        elif missing:
            self._score(missing)
        return extraction

    def _preview_from_cached(self, th_det: float, extraction: _Extraction,
                             missing: set[tuple[int, int, int]]) -> None:
        """Provisional score of an unscored component: the score of the component that held its peak voxel at
        the nearest cached ``Th_Cdet``.

        Components at two thresholds nest (one is the other's blob grown, shrunk, split or merged, with its
        centroid a voxel or two away), so that score is the best guess short of running the student; only
        blobs no cached threshold has seen need the network while the slider moves.
        """
        others = sorted((cached for cached in self._extractions if cached != th_det),
                        key=lambda cached: abs(cached - th_det))
        for candidate, key in zip(extraction.candidates, extraction.keys):
            if key not in missing or key in self._preview_scores:
                continue
            for other_key in others:
                other = self._extractions[other_key]
                label = int(other.labels[candidate.peak_kji])
                if label == 0:
                    continue
                other_score_key = other.keys[label - 1]
                score = self._scores.get(other_score_key, self._preview_scores.get(other_score_key))
                if score is not None:
                    self._preview_scores[key] = score
                    break

    def _unscored(self, extraction: _Extraction | None) -> list[tuple[int, int, int]]:
        """Score keys of ``extraction`` without a real student score (sorted: a deterministic order)."""
        return [] if extraction is None else sorted({k for k in extraction.keys if k not in self._scores})

    def provisional_count(self, th_det: float) -> int:
        """Candidates at ``th_det`` that still carry a provisional score."""
        return len(self._unscored(self._extractions.get(round(float(th_det), 6))))

    def score_provisional(self, th_det: float, limit: int = 32) -> int:
        """Give up to ``limit`` provisional candidates at ``th_det`` their real score; returns how many remain.

        Meant to be called repeatedly from an event loop (each call is short), then ``refilter(params)``.
        """
        missing = self._unscored(self._extractions.get(round(float(th_det), 6)))
        limit = max(1, int(limit))
        self._score(missing[:limit])
        return max(0, len(missing) - limit)

    def _stable_id(self, peak: tuple[int, int, int]) -> int:
        if peak not in self._ids:
            self._ids[peak] = len(self._ids) + 1
        return self._ids[peak]

    def set_student_flips(self, flips: bool) -> None:
        """Score candidates with (or without) test-time flips from now on; forgets the cached scores."""
        if bool(flips) != self.student_flips:
            self.student_flips = bool(flips)
            self._scores.clear()
            self._preview_scores.clear()
            self._extractions.clear()

    def _score(self, centres: list[tuple[int, int, int]], preview: bool = False) -> None:
        """Student probability for patches centred on ``centres`` (only ones never scored before).

        ``preview``: one view only, into the provisional scores (the real ones stay untouched).
        """
        if not centres:
            return
        import torch

        from CMBDetectLib.networks.discriminator import student_probabilities
        from CMBDetectLib.networks.fusion import fuse_batch_norm

        if self._student is None:
            if self.model is None or self.features.channels is None:
                raise ModelError("new candidates need the student network, but this session has no model")
            student = fuse_batch_norm(self.model.network("student", self._student_device))
            self._student = (student, self.model.patch_size("student"))
        student, size = self._student
        device = next(student.parameters()).device
        # Small batches: on CPU, 8-32 patches of 24^3 run at ~2.5-3.3 ms each, 256 at 5-6 ms (cache-bound).
        for start in range(0, len(centres), 32):
            chunk = centres[start:start + 32]
            patches = extract_patches(self.features.channels, np.asarray(chunk, dtype=float), size=size)
            with torch.inference_mode():
                probabilities = student_probabilities(
                    student, torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).to(device),
                    flips=self.student_flips and not preview).cpu().numpy()
            into = self._preview_scores if preview else self._scores
            for centre, probability in zip(chunk, probabilities):
                into[centre] = float(probability)
                if not preview:
                    self._preview_scores.pop(centre, None)

    def _apply_shape_filters(self, extraction: _Extraction, params: PostprocessingParameters) -> None:
        outcome = apply_postprocessing(extraction.candidates, extraction.labels, self._edge_distance,
                                       self.features.spacing_zyx, params)
        reasons, shapes = outcome
        for index, candidate in enumerate(extraction.candidates):
            extraction.shape_reason[index] = reasons[candidate.label]
            extraction.ellipticity[index] = shapes[candidate.label].ellipticity
            extraction.edge_distance[index] = shapes[candidate.label].edge_distance_mm
        extraction.shape_params = params

    def _record(self, extraction: _Extraction, index: int, candidate: Candidate, p_disc: float,
                reason: str | None) -> CandidateRecord:
        grid = self.features.grid
        centroid = np.asarray(candidate.centroid_kji, dtype=float)
        input_kji = np.asarray(grid.working_index_to_input_index(centroid)).reshape(-1)
        ras = np.asarray(grid.working_index_to_ras(centroid)).reshape(-1)
        return CandidateRecord(
            id=int(extraction.ids[index]), centroid_ijk=tuple(float(v) for v in input_kji[::-1]),
            centroid_ras=tuple(float(v) for v in ras), volume_mm3=float(candidate.volume_mm3),
            volume_voxels=int(candidate.volume_voxels), p_det=float(candidate.p_det), p_disc=float(p_disc),
            ellipticity=float(extraction.ellipticity[index]),
            edge_distance_mm=float(extraction.edge_distance[index]), final=reason is None, reason=reason)

    def _input_labels(self, extraction: _Extraction) -> Volume:
        lookup = np.zeros(len(extraction.candidates) + 1, dtype=np.uint16)
        lookup[1:] = extraction.ids.astype(np.uint16)
        # Component labels -> stable candidate ids, written only around each candidate (a Th_Cdet slider step
        # on a 40 M-voxel clinical grid must not resample the whole grid).
        array = self.features.grid.sparse_labels_to_input(extraction.labels, values=lookup)
        reference = self._input_reference
        return Volume(array, reference.spacing, reference.origin, reference.direction)

    def probability_on_input(self) -> Volume:
        """Stage-1 probability map on the input grid (nearest neighbour, for display and ``--save-prob``)."""
        array = self.features.grid.labels_to_input(self.probability.astype(np.float32))
        reference = self._input_reference
        return Volume(array, reference.spacing, reference.origin, reference.direction)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Cache file for reviewing without re-running stage 1 (probability map, mask, scores, grid)."""
        from CMBDetectLib.session_cache import save_session

        return save_session(self, Path(path))

    @classmethod
    def load(cls, path: str | Path, model: ModelPackage | None = None) -> DetectionSession:
        from CMBDetectLib.session_cache import load_session

        return load_session(cls, Path(path), model)


def replace_parameters(params: DetectionParameters, **changes: Any) -> DetectionParameters:
    """Convenience for callers (sliders): a copy with some values changed, validated."""
    updated = replace(params, **{k: float(v) for k, v in changes.items()})
    updated.validate()
    return updated
