"""Patch sampling for the three networks.

* stage 1: ``positive_fraction`` of the patches contain a CMB (a random voxel of a random CMB, moved by
  the Table 1 translation), the rest are centred on random brain voxels;
* teacher: 24^3 patches labelled CMB when their central ``(2r+1)^3`` cube holds a CMB voxel; positives
  around CMBs and true stage-1 candidates, negatives from false stage-1 candidates, reviewers' hard
  negatives / synthetic mimics, voxels with high radial symmetry (CMB look-alikes) and random brain
  (``teacher_candidates``: mostly false stage-1 candidates, candidate patches labelled as the student's);
* student: patches centred on stage-1 candidates (what it classifies at inference), plus hard
  negatives and, optionally, the CMBs stage 1 missed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from CMBDetectLib.candidates import extract_patches
from CMBDetectLib.training.augment import AugmentationConfig, augment_patch, random_offset, random_symmetry
from CMBDetectLib.training.data import TrainingCase


@dataclass
class PatchItem:
    """A patch to extract: which case, where (working-grid ``[k, j, i]``), and its class if fixed."""

    case: int
    centre: np.ndarray
    label: int = -1          # -1: decide from the voxel labels (central cube)
    source: str = ""
    cmbs: tuple[int, ...] = ()   # instance ids of the ground-truth CMBs a candidate overlaps


def _crop(case: TrainingCase, centre: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    channels = extract_patches(case.channels, centre[None], size)[0].astype(np.float32)
    labels = extract_patches(case.labels[None], centre[None], size)[0, 0]
    return channels, labels


def central_label(labels: np.ndarray, radius: int) -> int:
    """1 if the central ``(2 radius + 1)^3`` cube of a label patch holds a CMB voxel."""
    centre = labels.shape[0] // 2
    box = (slice(max(centre - radius, 0), centre + radius + 1),) * 3
    return int(labels[box].any())


def _random_brain_voxel(case: TrainingCase, rng: np.random.Generator) -> np.ndarray:
    flat = case.brain_flat[rng.integers(case.brain_flat.size)]
    return np.array(np.unravel_index(flat, case.shape))


def _random_cmb_voxel(cases: list[TrainingCase], rng: np.random.Generator,
                      indices: list[int]) -> tuple[int, np.ndarray] | None:
    with_cmbs = [index for index in indices if cases[index].n_cmbs]
    if not with_cmbs:
        return None
    index = with_cmbs[rng.integers(len(with_cmbs))]
    voxels = cases[index].cmb_voxels[rng.integers(cases[index].n_cmbs)]
    return index, voxels[rng.integers(len(voxels))]


#: size (working-grid voxels) of a CMB whose voxels keep weight 1 under ``cmb_size_balance``: a sphere of radius
#: ~1.5 mm (the generator's mean radius) at the 0.8 mm working spacing.
SIZE_BALANCE_REFERENCE_VOXELS = 28.0
#: the largest factor ``cmb_size_balance`` gives the voxels of the smallest CMBs
SIZE_BALANCE_MAX_FACTOR = 10.0


def size_balance_weights(sizes: np.ndarray, exponent: float) -> np.ndarray:
    """Per-instance voxel weights ``clip((reference / size) ** exponent, 1, max)`` (index 0, background: 1).

    With voxel-wise losses a CMB counts by its volume, so a 2-voxel CMB on a thick slice weighs ~1/75 of a
    150-voxel one and stage 1 barely learns to find it. ``exponent`` 1 would make every CMB at or below the
    reference size weigh the same; CMBs above it keep their plain weight.
    """
    sizes = np.asarray(sizes, dtype=float)
    weights = np.ones(sizes.shape, dtype=np.float32)
    if exponent > 0 and sizes.size > 1:
        ratio = SIZE_BALANCE_REFERENCE_VOXELS / np.maximum(sizes[1:], 1.0)
        weights[1:] = np.clip(ratio ** exponent, 1.0, SIZE_BALANCE_MAX_FACTOR)
    return weights


def sample_segmentation_batch(cases: list[TrainingCase], indices: list[int], rng: np.random.Generator,
                              batch_size: int, patch_size: int, positive_fraction: float,
                              augmentation: AugmentationConfig, size_balance: float = 0.0):
    """Stage-1 batch from the cases ``indices``: ``(x [B, 2, P, P, P] float32, y [B, P, P, P] uint8)``.

    ``size_balance`` > 0 also returns ``w [B, P, P, P] float32``, the voxel weights of
    :func:`size_balance_weights` (1 outside CMBs); the random draws are the same either way.
    """
    xs, ys, ws = [], [], []
    for _ in range(batch_size):
        picked = _random_cmb_voxel(cases, rng, indices) if rng.random() < positive_fraction else None
        if picked is None:
            index = indices[int(rng.integers(len(indices)))]
            centre = _random_brain_voxel(cases[index], rng)
        else:
            index, centre = picked
            # Translation (Table 1): the CMB lands anywhere within +-t voxels of the patch centre.
            limit = min(augmentation.translation_voxels, patch_size // 2 - 2)
            centre = centre + random_offset(rng, limit)
        channels, labels = _crop(cases[index], centre, patch_size)
        if size_balance > 0:
            instances = extract_patches(cases[index].instances[None], np.asarray(centre)[None], patch_size)[0]
            weights = size_balance_weights(cases[index].cmb_sizes, size_balance)[instances]
            # flipped together with the channels so that the weights stay on their voxels
            stacked, labels = random_symmetry(rng, augmentation,
                                              np.concatenate([channels, weights.astype(np.float32)]), labels)
            channels, weights = stacked[:-1], stacked[-1]
            ws.append(np.ascontiguousarray(weights))
        else:
            channels, labels = random_symmetry(rng, augmentation, channels, labels)
        xs.append(augment_patch(channels, rng, augmentation))
        ys.append(labels)
    if size_balance > 0:
        return np.stack(xs), np.stack(ys), np.stack(ws)
    return np.stack(xs), np.stack(ys)


def high_evidence_voxels(case: TrainingCase, quantile: float = 0.995, limit: int = 2000,
                         rng: np.random.Generator | None = None) -> np.ndarray:
    """Brain voxels with the strongest radial symmetry (FRST): where CMB mimics are."""
    frst = case.channels[1].astype(np.float32)
    values = frst[case.brain_mask]
    if values.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    threshold = np.quantile(values, quantile)
    points = np.argwhere((frst >= threshold) & case.brain_mask & (case.labels == 0))
    if len(points) > limit:
        rng = rng or np.random.default_rng(0)
        points = points[rng.choice(len(points), limit, replace=False)]
    return points


class TeacherSampler:
    """Balanced positive / negative 24^3 patches for the multi-task teacher."""

    def __init__(self, cases: list[TrainingCase], indices: list[int], candidates: list[PatchItem],
                 patch_size: int, central_radius: int, rng: np.random.Generator,
                 candidate_negative_share: float | None = None) -> None:
        """``candidate_negative_share``: None draws negatives evenly from the pools below (and random brain);
        a share in [0, 1] draws that share from the false stage-1 candidates first, the student's negatives,
        and labels every candidate patch by its candidate label, as the student's are."""
        self.cases = cases
        self.candidate_negative_share = candidate_negative_share
        self.indices = list(indices)
        self.patch_size = patch_size
        self.central_radius = central_radius
        chosen = set(self.indices)
        self.candidate_positives = [item for item in candidates if item.label == 1 and item.case in chosen]
        self.candidate_negatives = [item for item in candidates if item.label == 0 and item.case in chosen]
        self.hard_negatives = [PatchItem(i, np.asarray(p), -1, "hard_negative")
                               for i in self.indices for p in cases[i].hard_negatives_kji]
        self.mimics = [PatchItem(i, p, -1, "frst")
                       for i in self.indices for p in high_evidence_voxels(cases[i], rng=rng)]

    def _negative(self, rng: np.random.Generator) -> PatchItem:
        share = self.candidate_negative_share
        if share is not None and self.candidate_negatives and rng.random() < share:
            return self.candidate_negatives[rng.integers(len(self.candidate_negatives))]
        pools = [pool for pool in (self.candidate_negatives, self.hard_negatives, self.mimics) if pool]
        if pools and rng.random() < 0.75:
            pool = pools[rng.integers(len(pools))]
            return pool[rng.integers(len(pool))]
        index = self.indices[int(rng.integers(len(self.indices)))]
        return PatchItem(index, _random_brain_voxel(self.cases[index], rng), -1, "random")

    def _positive(self, rng: np.random.Generator) -> PatchItem | None:
        if self.candidate_positives and rng.random() < 0.5:
            return self.candidate_positives[rng.integers(len(self.candidate_positives))]
        picked = _random_cmb_voxel(self.cases, rng, self.indices)
        return None if picked is None else PatchItem(picked[0], picked[1], -1, "cmb")

    def sample(self, rng: np.random.Generator, batch_size: int, positive_fraction: float,
               augmentation: AugmentationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x [B, 2, P, P, P], voxel labels [B, P, P, P], patch labels [B])``."""
        xs, ys, classes = [], [], []
        for _ in range(batch_size):
            item = self._positive(rng) if rng.random() < positive_fraction else None
            item = item or self._negative(rng)
            # Small translation only: the CMB must stay in the central region.
            limit = min(augmentation.translation_voxels, self.central_radius)
            centre = np.round(np.asarray(item.centre, dtype=float)).astype(np.int64)
            centre = centre + random_offset(rng, limit)
            channels, labels = _crop(self.cases[item.case], centre, self.patch_size)
            channels, labels = random_symmetry(rng, augmentation, channels, labels)
            xs.append(augment_patch(channels, rng, augmentation))
            ys.append(labels)
            candidate_label = self.candidate_negative_share is not None and item.label >= 0
            classes.append(item.label if candidate_label else central_label(labels, self.central_radius))
        return np.stack(xs), np.stack(ys), np.array(classes, dtype=np.int64)


class CandidateSampler:
    """Student patches centred on candidates; labels are the candidates' (overlap with a CMB)."""

    def __init__(self, cases: list[TrainingCase], items: list[PatchItem], patch_size: int) -> None:
        self.cases = cases
        self.items = items
        self.patch_size = patch_size
        self.positives = [item for item in items if item.label == 1]
        self.negatives = [item for item in items if item.label == 0]

    def _patch(self, item: PatchItem, offset: np.ndarray) -> np.ndarray:
        centre = np.round(np.asarray(item.centre, dtype=float)).astype(np.int64) + offset
        return extract_patches(self.cases[item.case].channels, centre[None], self.patch_size)[0] \
            .astype(np.float32)

    def sample(self, rng: np.random.Generator, batch_size: int, positive_fraction: float,
               augmentation: AugmentationConfig) -> tuple[np.ndarray, np.ndarray]:
        """Class-balanced batch ``(x [B, C, P, P, P], labels [B])`` (sampling with replacement)."""
        xs, ys = [], []
        for _ in range(batch_size):
            positive = bool(self.positives) and (not self.negatives or rng.random() < positive_fraction)
            pool = self.positives if positive else self.negatives
            item = pool[rng.integers(len(pool))]
            patch = self._patch(item, random_offset(rng, augmentation.translation_voxels))
            patch, _ = random_symmetry(rng, augmentation, patch)
            xs.append(augment_patch(patch, rng, augmentation))
            ys.append(item.label)
        return np.stack(xs), np.array(ys, dtype=np.int64)

    def all_patches(self, limit: int | None = None,
                    rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every item (or a seeded subset of ``limit``), unaugmented: the validation set."""
        items = self.items
        if limit is not None and len(items) > limit:
            rng = rng or np.random.default_rng(0)
            items = [items[i] for i in sorted(rng.choice(len(items), limit, replace=False))]
        if not items:
            shape = (0, 2) + (self.patch_size,) * 3
            return np.zeros(shape, np.float32), np.zeros(0, np.int64)
        return (np.stack([self._patch(item, np.zeros(3, np.int64)) for item in items]),
                np.array([item.label for item in items], dtype=np.int64))
