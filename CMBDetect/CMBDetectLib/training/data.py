"""Training cases: features (cached on disk), labels on the working grid, CMBs and hard negatives.

Features come from :func:`CMBDetectLib.features.compute_features`, the exact function inference uses,
so training and inference see the same inputs. Computing them (N4, vessel suppression, FRST) takes
seconds to minutes per scan, so they are cached as ``.npz`` (channels in float16) under a key made of
the image file's sha256, the preprocessing settings and the package version: a re-run, a resumed run
or a fine-tuning run on the same scans skips the work. Labels are not cached (reviews change them);
they are resampled to the working grid with nearest neighbour on every load, which is cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk  # noqa: N813 - the name every SimpleITK user knows
from scipy import ndimage

from CMBDetectLib import __version__
from CMBDetectLib.errors import CancelledError, InputError
from CMBDetectLib.model_package import sha256_file
from CMBDetectLib.progress import ProgressCallback, no_progress

CACHE_FORMAT = 1
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


@dataclass
class TrainingCase:
    """One scan on its (cropped) working grid, everything in ``[k, j, i]`` order."""

    case: str
    subject: str
    modality: str
    dataset: str
    channels: np.ndarray                 # float16 [C, K, J, I], features.CHANNELS (float32: ``float_channels``)
    brain_mask: np.ndarray               # bool [K, J, I]
    labels: np.ndarray                   # uint8 [K, J, I], 1 = CMB
    instances: np.ndarray                # int32 [K, J, I], k = CMB k
    spacing_zyx: tuple[float, float, float]
    grid: object                         # preprocessing.ScanGrid
    hard_negatives_kji: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    _cmb_voxels: list[np.ndarray] | None = field(default=None, repr=False)
    _brain_flat: np.ndarray | None = field(default=None, repr=False)
    _cmb_sizes: np.ndarray | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)  # type: ignore[return-value]

    def float_channels(self) -> np.ndarray:
        return self.channels.astype(np.float32)

    @property
    def cmb_voxels(self) -> list[np.ndarray]:
        """Voxel indices ``(n, 3)`` of each CMB instance (for sampling patches around CMBs)."""
        if self._cmb_voxels is None:
            voxels = []
            for index, box in enumerate(ndimage.find_objects(self.instances), start=1):
                if box is None:
                    continue
                local = np.argwhere(self.instances[box] == index)
                voxels.append(local + np.array([s.start for s in box]))
            self._cmb_voxels = voxels
        return self._cmb_voxels

    @property
    def n_cmbs(self) -> int:
        return len(self.cmb_voxels)

    @property
    def cmb_sizes(self) -> np.ndarray:
        """Voxel count of each instance id on the working grid (index 0: background)."""
        if self._cmb_sizes is None:
            self._cmb_sizes = np.bincount(self.instances.ravel()).astype(np.int64)
        return self._cmb_sizes

    @property
    def cmb_centres_kji(self) -> np.ndarray:
        if not self.cmb_voxels:
            return np.zeros((0, 3))
        return np.array([v.mean(axis=0) for v in self.cmb_voxels])

    @property
    def brain_flat(self) -> np.ndarray:
        """Flat indices of the brain voxels (for uniform background sampling)."""
        if self._brain_flat is None:
            self._brain_flat = np.flatnonzero(self.brain_mask)
            if self._brain_flat.size == 0:
                self._brain_flat = np.arange(self.brain_mask.size)
        return self._brain_flat


# ------------------------------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    override = os.environ.get("CMBDETECT_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "cmbdetect"


def feature_cache_key(image_sha256: str, modality: str, preprocessing: dict) -> str:
    """Everything that changes the features: the voxels, the modality, the settings, the code version."""
    if modality != "qsm":
        # QSM's scaling does not touch SWI / T2*-GRE features: their cached features stay valid.
        preprocessing = {k: v for k, v in preprocessing.items() if k != "qsm_scaling"}
    if isinstance(preprocessing.get("brain_mask"), dict):
        # a per-modality setting makes this modality's features exactly as its one method does
        from CMBDetectLib.preprocessing import brain_mask_method

        preprocessing = {**preprocessing, "brain_mask": brain_mask_method(preprocessing["brain_mask"], modality)}
    if preprocessing.get("max_spacing_mm") is None:
        # Native thick slices are how every feature was made before the setting existed.
        preprocessing = {k: v for k, v in preprocessing.items() if k != "max_spacing_mm"}
    if not preprocessing.get("vessel_context", False):
        # Off is how every feature was made before the setting existed: those cached features stay valid.
        preprocessing = {k: v for k, v in preprocessing.items() if k != "vessel_context"}
    settings = json.dumps({"modality": modality, "preprocessing": preprocessing, "version": __version__,
                           "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(f"{image_sha256}\n{settings}".encode()).hexdigest()


def _grid_to_json(grid) -> str:
    return json.dumps(dataclasses.asdict(grid))


def _grid_from_json(text: str):
    from CMBDetectLib.preprocessing import ScanGrid

    values = json.loads(text)
    return ScanGrid(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            stream.write(buffer.getvalue())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cached_features(image_path: Path, modality: str, preprocessing: dict,
                    cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray, object]:
    """``(channels float16, brain mask, grid)`` of one image, from the cache or computed and stored.

    ``cache_dir=None`` disables caching. A corrupt cache file is recomputed and replaced.
    """
    from CMBDetectLib.features import compute_features, feature_settings
    from CMBDetectLib.volume import read_volume

    key = feature_cache_key(sha256_file(image_path), modality, preprocessing)
    path = cache_dir / "features" / f"{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                return stored["channels"], stored["brain_mask"], _grid_from_json(str(stored["grid"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: compute again below and overwrite it
    features = compute_features(read_volume(image_path), modality, **feature_settings(preprocessing))
    channels = features.channels.astype(np.float16)
    if path is not None:
        _save_npz_atomic(path, channels=channels, brain_mask=features.brain_mask,
                         grid=np.array(_grid_to_json(features.grid)))
    return channels, features.brain_mask, features.grid


# ------------------------------------------------------------------------------------------ geometry
def ras_to_working_index(grid, ras: np.ndarray) -> np.ndarray:
    """RAS mm (N x 3) -> continuous working-grid ``[k, j, i]`` (inverse of ``working_index_to_ras``)."""
    ras = np.atleast_2d(np.asarray(ras, dtype=float))
    lps = ras * _LPS_TO_RAS
    direction = np.asarray(grid.direction, dtype=float).reshape(3, 3)
    ijk = np.linalg.solve(direction, (lps - np.asarray(grid.working_origin)).T).T / np.asarray(grid.spacing)
    return ijk[:, ::-1]


def _to_working_labels(grid, path: Path) -> np.ndarray:
    image = sitk.ReadImage(str(path))
    try:
        return np.asarray(grid.to_working(image, sitk.sitkNearestNeighbor))
    except InputError as error:
        raise InputError(f"{path.name}: {error}") from None


def _hard_negatives(grid, review: dict, shape: Sequence[int]) -> np.ndarray:
    from CMBDetectLib.dataset import hard_negative_records

    points = [r["centroid_ras"] for r in hard_negative_records(review)
              if isinstance(r.get("centroid_ras"), (list, tuple)) and len(r["centroid_ras"]) == 3]
    if not points:
        return np.zeros((0, 3))
    kji = ras_to_working_index(grid, np.asarray(points, dtype=float))
    inside = np.all((kji >= 0) & (kji <= np.asarray(shape) - 1), axis=1)
    return kji[inside]


# ------------------------------------------------------------------------------------------ loading
def load_training_cases(dataset_dirs: Sequence[str | os.PathLike], preprocessing: dict,
                        cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                        progress: ProgressCallback | None = None, cancel=None) -> list[TrainingCase]:
    """Every case of every dataset folder (ARCHITECTURE.md layout), features computed or cached.

    ``preprocessing``: ``working_spacing_mm`` and ``vessel_suppression`` as in ``model.json``.
    """
    from CMBDetectLib.candidates import label_components
    from CMBDetectLib.dataset import load_dataset

    report = progress or no_progress
    from CMBDetectLib.training.loop import as_cancel_check

    is_cancelled = as_cancel_check(cancel)
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if use_cache else None
    entries = []
    for directory in dataset_dirs:
        dataset = load_dataset(directory)
        if not dataset.cases:
            raise InputError(f"dataset {directory} has no cases")
        for case in dataset.cases:
            entries.append((dataset, case))
    cases: list[TrainingCase] = []
    for index, (dataset, case) in enumerate(entries):
        if is_cancelled():
            raise CancelledError("cancelled while preparing the training data")
        report(index / len(entries), f"features of {case.case} ({index + 1}/{len(entries)})")
        modality = case.modality or dataset.modality or "swi"
        image_path = case.path("image")
        if not image_path.is_file():
            raise InputError(f"dataset {dataset.root}: {image_path.name} is missing")
        channels, brain, grid = cached_features(image_path, modality, preprocessing, cache)
        labels = (_to_working_labels(grid, case.path("label")) > 0).astype(np.uint8)
        if case.path("instances").is_file():
            instances = _to_working_labels(grid, case.path("instances")).astype(np.int32)
            instances[labels == 0] = 0
        else:
            instances, _ = label_components(labels > 0)
        # Instances that vanished or were split by resampling: relabel 1..N contiguously.
        _, instances_flat = np.unique(instances, return_inverse=True)
        instances = instances_flat.reshape(instances.shape).astype(np.int32)
        cases.append(TrainingCase(
            case=case.case, subject=case.subject, modality=modality,
            dataset=str(dataset.root), channels=channels, brain_mask=brain.astype(bool), labels=labels,
            instances=instances, spacing_zyx=tuple(float(s) for s in grid.working_spacing_zyx),
            grid=grid, hard_negatives_kji=_hard_negatives(grid, case.review, labels.shape)))
    report(1.0, f"{len(cases)} training cases ready")
    return cases
