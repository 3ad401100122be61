"""Stage-1 candidates: 26-connected components of the thresholded probability map, and patches around them.

Every statistic is computed for all components at once (one pass over the foreground voxels with
``np.bincount`` / ``np.lexsort``), because a low ``th_det`` can give hundreds of components and the
review panel re-extracts them whenever the user moves the threshold slider.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

# Full 3x3x3 neighbourhood: faces, edges and corners (DESIGN.md: clusters are 26-connected).
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Candidate:
    """One connected component of ``prob >= th_det`` on the working grid (array order ``[k, j, i]``)."""

    label: int                                    # value of this component in the label map (1..N)
    centroid_kji: tuple[float, float, float]      # unweighted centre of its voxels, working-grid index
    peak_kji: tuple[int, int, int]                # voxel of its highest probability: a stable identity
    volume_voxels: int
    volume_mm3: float
    p_det: float                                  # highest stage-1 probability inside the component
    bbox: tuple[tuple[int, int], ...]             # (start, stop) per axis, stop exclusive

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """The bounding box as array slices, for cropping ``labels`` or any map on the same grid."""
        return tuple(slice(start, stop) for start, stop in self.bbox)  # type: ignore[return-value]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a boolean mask -> (int32 labels, number of components)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    count = ndimage.label(mask, structure=CONNECTIVITY_26, output=labels)
    return labels, int(count)


def extract_candidates(prob: np.ndarray, th_det: float,
                       spacing_zyx: Sequence[float]) -> tuple[np.ndarray, list[Candidate]]:
    """Threshold the stage-1 probability map (``prob >= th_det``) and describe each 26-connected component.

    Returns the int32 label map (0 = background, k = ``candidates[k - 1].label``) and the candidates in
    label order. Ties for the peak voxel are broken towards the lowest flat index, so the identity is
    deterministic.
    """
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"expected a 3D probability map, got shape {prob.shape}")
    labels, count = label_components(prob >= th_det)
    if count == 0:
        return labels, []

    flat_labels = labels.ravel()
    foreground = np.flatnonzero(flat_labels)            # only candidate voxels: a tiny fraction of the scan
    component = flat_labels[foreground]
    values = prob.ravel()[foreground].astype(np.float64)
    coordinates = np.unravel_index(foreground, labels.shape)

    n_bins = count + 1
    voxels = np.bincount(component, minlength=n_bins)[1:]
    centroids = np.stack([np.bincount(component, weights=axis, minlength=n_bins)[1:]
                          for axis in coordinates], axis=1) / voxels[:, None]

    # Peak = last element of each component after sorting by (component, probability, -flat index).
    order = np.lexsort((-foreground, values, component))
    last_of_component = np.flatnonzero(np.diff(component[order], append=n_bins))
    peak_flat = foreground[order[last_of_component]]
    peak_values = values[order[last_of_component]]
    peaks = np.stack(np.unravel_index(peak_flat, labels.shape), axis=1)

    voxel_mm3 = float(np.prod(np.asarray(spacing_zyx, dtype=float)))
    boxes = ndimage.find_objects(labels, max_label=count)
    candidates = [
        Candidate(label=index + 1,
                  centroid_kji=tuple(float(v) for v in centroids[index]),  # type: ignore[arg-type]
                  peak_kji=tuple(int(v) for v in peaks[index]),  # type: ignore[arg-type]
                  volume_voxels=int(voxels[index]),
                  volume_mm3=float(voxels[index]) * voxel_mm3,
                  p_det=float(peak_values[index]),
                  bbox=tuple((int(s.start), int(s.stop)) for s in boxes[index]))
        for index in range(count)
    ]
    return labels, candidates


def round_half_up(values: np.ndarray) -> np.ndarray:
    """Round to the nearest integer with .5 going up (``np.round`` rounds .5 to even, which is surprising)."""
    return np.floor(np.asarray(values, dtype=float) + 0.5).astype(np.int64)


def extract_patches(channels: np.ndarray, centres_kji: np.ndarray | Sequence[Sequence[float]],
                    size: int = 24) -> np.ndarray:
    """Cubic patches ``[N, C, size, size, size]`` around each centre, zero outside the image.

    The centre voxel (the rounded centre) lands at index ``size // 2`` of each patch axis. The channels
    are not padded as a whole: only the part of each patch that lies inside the image is copied, so the
    cost is proportional to the number of patches, not to the image size.
    """
    channels = np.asarray(channels)
    if channels.ndim != 4:
        raise ValueError(f"expected channels [C, K, J, I], got shape {channels.shape}")
    centres = round_half_up(np.asarray(centres_kji, dtype=float).reshape(-1, 3))
    n_channels, shape = channels.shape[0], np.asarray(channels.shape[1:])
    patches = np.zeros((len(centres), n_channels, size, size, size), dtype=channels.dtype)
    for index, centre in enumerate(centres):
        start = centre - size // 2
        stop = start + size
        source_start = np.maximum(start, 0)
        source_stop = np.minimum(stop, shape)
        if np.any(source_stop <= source_start):
            continue                                   # the patch lies entirely outside the image
        target_start = source_start - start
        target_stop = target_start + (source_stop - source_start)
        patches[(index, slice(None), *(slice(a, b) for a, b in zip(target_start, target_stop)))] = \
            channels[(slice(None), *(slice(a, b) for a, b in zip(source_start, source_stop)))]
    return patches
