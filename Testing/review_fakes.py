"""Test doubles for the review layer: a synthetic case and a detection session with the real contract.

``FakeDetectionSession.refilter`` behaves like ``pipeline.DetectionSession.refilter``: stable candidate ids,
one cached label array per ``th_det`` (the same object for a ``th_disc``-only change), components that grow
when ``th_det`` drops and vanish when it rises above their peak, final = p_disc >= th_disc and volume large
enough. It builds real ``CandidateRecord`` / ``DetectionResult`` objects, so the MRML layer is exercised
exactly as with the networks, in milliseconds.
"""

from __future__ import annotations

import numpy as np

from CMBDetectLib.pipeline import CandidateRecord, DetectionParameters, DetectionResult
from CMBDetectLib.volume import Volume

# An oblique, anisotropic grid (10 degrees about the S axis): a RAS/LPS or i/k mix-up moves every candidate.
ANGLE = np.deg2rad(10.0)
OBLIQUE = (np.cos(ANGLE), -np.sin(ANGLE), 0.0, np.sin(ANGLE), np.cos(ANGLE), 0.0, 0.0, 0.0, 1.0)


def make_case(shape=(24, 72, 64), n_candidates=8, spacing=(0.9, 0.8, 2.0), seed=1, sigma_mm=1.6,
              origin=(10.0, -20.0, 5.0), direction=OBLIQUE, missed=1):
    """SWI-like image (dark round blobs on bright tissue) -> (Volume, candidate specs, missed centres)."""
    rng = np.random.default_rng(seed)
    spacing_zyx = np.array(spacing[::-1], dtype=float)
    margin = np.array([3, 8, 8])
    centres: list[np.ndarray] = []
    while len(centres) < n_candidates + missed:
        centre = rng.integers(margin, np.array(shape) - margin)
        if all(np.linalg.norm((centre - c) * spacing_zyx) > 9.0 for c in centres):
            centres.append(centre)
    image = np.full(shape, 800.0, np.float32) + rng.normal(0, 8, shape).astype(np.float32)
    radius = np.ceil(4 * sigma_mm / spacing_zyx).astype(int)
    for centre in centres:   # each blob only in its own box: fast also for large grids
        low, high = np.maximum(centre - radius, 0), np.minimum(centre + radius + 1, shape)
        k, j, i = np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij")
        distance2 = (((k - centre[0]) * spacing_zyx[0]) ** 2 + ((j - centre[1]) * spacing_zyx[1]) ** 2
                     + ((i - centre[2]) * spacing_zyx[2]) ** 2)
        image[low[0]:high[0], low[1]:high[1], low[2]:high[2]] -= \
            600.0 * np.exp(-distance2 / (2 * sigma_mm ** 2)).astype(np.float32)
    volume = Volume(image, tuple(float(s) for s in spacing), origin, tuple(direction))
    p_det = np.round(rng.uniform(0.6, 0.99, n_candidates), 3)
    p_disc = np.round(np.linspace(0.05, 0.95, n_candidates)[rng.permutation(n_candidates)], 3)
    spec = [{"id": index + 1, "centre": centres[index], "p_det": float(p_det[index]),
             "p_disc": float(p_disc[index])} for index in range(n_candidates)]
    return volume, spec, [tuple(int(v) for v in c) for c in centres[n_candidates:]]


class FakeDetectionSession:
    """``refilter(params)`` like the real session, from analytic Gaussian probability blobs."""

    def __init__(self, volume: Volume, spec: list[dict], sigma_mm: float = 1.6, model_info=None):
        self.volume = volume
        self.spec = spec
        self.sigma_mm = sigma_mm
        self.model_info = model_info or {"name": "fake", "version": "0", "sha256": "0" * 8}
        self._labels: dict[float, tuple[Volume, dict]] = {}
        self.path = None
        self.refilter_calls = 0

    def _extract(self, th_det: float):
        key = round(float(th_det), 6)
        if key not in self._labels:
            shape = self.volume.array.shape
            spacing_zyx = np.asarray(self.volume.spacing_zyx)
            labels = np.zeros(shape, np.uint16)
            stats = {}
            for item in self.spec:
                centre = np.asarray(item["centre"])
                radius = np.ceil(4 * self.sigma_mm / spacing_zyx).astype(int)
                low = np.maximum(centre - radius, 0)
                high = np.minimum(centre + radius + 1, shape)
                k, j, i = np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij")
                distance2 = (((k - centre[0]) * spacing_zyx[0]) ** 2 + ((j - centre[1]) * spacing_zyx[1]) ** 2
                             + ((i - centre[2]) * spacing_zyx[2]) ** 2)
                inside = item["p_det"] * np.exp(-distance2 / (2 * self.sigma_mm ** 2)) > th_det
                if not inside.any():
                    continue
                view = labels[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
                view[inside] = item["id"]
                kji = np.argwhere(inside).mean(axis=0) + low
                stats[item["id"]] = (int(inside.sum()), kji)
            self._labels[key] = (self.volume.with_array(labels), stats)
        return self._labels[key]

    def refilter(self, params: DetectionParameters, preview: bool = False) -> DetectionResult:
        """``preview`` changes nothing here: the fake's scores are fixed, none is ever provisional."""
        self.refilter_calls += 1
        params.validate()
        labels, stats = self._extract(params.th_det)
        voxel_mm3 = float(np.prod(self.volume.spacing))
        records = []
        for item in self.spec:
            if item["id"] not in stats:
                continue
            voxels, kji = stats[item["id"]]
            volume_mm3 = voxels * voxel_mm3
            reason = None
            if item["p_disc"] < params.th_disc:
                reason = "discrimination"
            elif volume_mm3 < params.min_volume_mm3:
                reason = "volume"
            records.append(CandidateRecord(
                id=item["id"], centroid_ijk=tuple(float(v) for v in kji[::-1]),
                centroid_ras=tuple(float(v) for v in self.volume.index_to_ras(kji)[0]), volume_mm3=volume_mm3,
                volume_voxels=voxels, p_det=item["p_det"], p_disc=item["p_disc"], ellipticity=0.05,
                edge_distance_mm=10.0, final=reason is None, reason=reason))
        return DetectionResult(records, params, labels, {}, dict(self.model_info))


def default_parameters(**changes) -> DetectionParameters:
    values = {"th_det": 0.5, "th_disc": 0.5, "min_volume_mm3": 2.0, "max_ellipticity": 0.5,
              "min_edge_distance_mm": 0.0}
    values.update(changes)
    return DetectionParameters.from_dict(values)


def add_slice_views(scene) -> dict:
    """Red / Yellow / Green slice nodes as the Slicer application creates them (with orientation presets)."""
    import slicer

    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    views = {}
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        slice_node = scene.CreateNodeByClass("vtkMRMLSliceNode")
        slice_node.SetLayoutName(name)
        slice_node.SetName(name)
        slice_node.SetDefaultOrientation(orientation)
        slice_node.SetOrientation(orientation)
        slice_node.SetDimensions(256, 256, 1)
        slice_node.SetFieldOfView(250, 250, 1)
        scene.AddNode(slice_node)
        slice_node.UnRegister(None)   # CreateNodeByClass returns a new reference; the scene now holds it
        views[name] = slice_node
    return views
