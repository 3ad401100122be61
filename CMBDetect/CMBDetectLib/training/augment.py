"""Training-time augmentation of the paper's Table 1 (section 2.4).

Only transformations that do not destroy 2-10 voxel CMBs: translation (a random offset of the patch
crop, so no interpolation at all), additive Gaussian noise and a very light Gaussian blur. No rotation
or down-scaling. Beyond Table 1, optional mirror flips (``flip_probability``, off by default): a flip
moves voxels without interpolating them, and a CMB's dipole pattern, a vein or a calcification stays
what it is when mirrored about any axis through the patch centre (the B0 axis included).
Noise and blur are each applied with their own probability ("random combinations"), parameters drawn
uniformly from the Table 1 ranges.

Note: at Table 1's blur sigma of 0.1-0.2 voxel a neighbour's weight is at most exp(-12.5) ~ 4e-6,
so that blur is practically the identity; it is kept for fidelity and can be widened in the config.

Implemented with numpy + scipy instead of MONAI's ``RandGaussianNoise`` / ``RandGaussianSmooth``
because those draw the noise standard deviation from ``[0, std]`` (not a ``[min, max]`` variance
range) and use the legacy ``np.random.RandomState``; one ``np.random.Generator`` here makes a
training run reproducible from a single seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

#: channels that carry the noise of another (features.CHANNELS): channel 2 (``vessel_context``) is channel 0
#: before vessel suppression, the same acquisition
SAME_NOISE_AS = {0: (2,)}


@dataclass(frozen=True)
class AugmentationConfig:
    translation_voxels: int = 15                      # +- offset of the crop around its nominal centre
    noise_variance: tuple[float, float] = (0.01, 0.04)
    blur_sigma: tuple[float, float] = (0.1, 0.2)      # voxels
    noise_probability: float = 0.5
    blur_probability: float = 0.5
    noise_channels: tuple[int, ...] = (0,)            # intensity only: FRST is derived, not measured
    # Noise variance is in units of the channel's variance inside the patch (z-score units, as in the
    # paper's normalised images); our intensities live in [0, 1] with CMB contrasts of ~0.3, where an
    # absolute sigma of 0.2 would bury small CMBs.
    relative_noise: bool = True
    flip_probability: float = 0.0                     # per axis; 0 keeps the paper's Table 1 exactly
    # a random multiple of 90 degrees about the slice axis (B0 and the thick-slice axis stay where they are,
    # so blooming and partial volume look as they do on a scanner); 0 draws nothing (older recipes replay)
    rotate_in_plane_probability: float = 0.0

    @classmethod
    def from_dict(cls, values: dict | None) -> AugmentationConfig:
        values = dict(values or {})
        for key in ("noise_variance", "blur_sigma", "noise_channels"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def disabled(self) -> AugmentationConfig:
        return replace(self, translation_voxels=0, noise_probability=0.0, blur_probability=0.0,
                       flip_probability=0.0, rotate_in_plane_probability=0.0)


def random_offset(rng: np.random.Generator, translation_voxels: int) -> np.ndarray:
    """Translation of Table 1: a uniform integer offset in ``[-t, t]`` per axis (``[k, j, i]``)."""
    t = int(translation_voxels)
    if t <= 0:
        return np.zeros(3, dtype=np.int64)
    return rng.integers(-t, t + 1, size=3)


def augment_patch(patch: np.ndarray, rng: np.random.Generator, config: AugmentationConfig) -> np.ndarray:
    """Noise and blur on one patch ``[C, D, H, W]`` (float32, a new array; labels are untouched)."""
    out = np.array(patch, dtype=np.float32, copy=True)
    if config.noise_probability > 0 and rng.random() < config.noise_probability:
        variance = rng.uniform(*config.noise_variance)
        # One noise field for every measured channel: they are two versions of one acquisition, whose
        # noise is the same. It is drawn for the first channel exactly as a one-channel recipe always drew
        # it (bit for bit: make model reproduces older packages) and rescaled for the others.
        noise, first_scale = None, 1.0
        followers = [c for n in config.noise_channels for c in SAME_NOISE_AS.get(n, ())]
        channels = [*config.noise_channels, *(c for c in followers if c not in config.noise_channels)]
        for channel in (c for c in channels if c < out.shape[0]):
            scale = float(out[channel].std()) if config.relative_noise else 1.0
            if scale <= 0:
                continue
            if noise is None:
                noise = rng.normal(0.0, np.sqrt(variance) * scale, size=out[channel].shape).astype(np.float32)
                first_scale = scale
                out[channel] += noise
            else:
                out[channel] += noise * np.float32(scale / first_scale)
    if config.blur_probability > 0 and rng.random() < config.blur_probability:
        sigma = rng.uniform(*config.blur_sigma)
        for channel in range(out.shape[0]):
            out[channel] = ndimage.gaussian_filter(out[channel], sigma=sigma, mode="nearest")
    return out


def random_flip(rng: np.random.Generator, probability: float, channels: np.ndarray,
                labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Mirror ``channels [C, D, H, W]`` (and ``labels [D, H, W]`` the same way) along each spatial axis
    with ``probability``. Draws nothing from ``rng`` when ``probability`` is 0 (older recipes replay)."""
    if probability <= 0:
        return channels, labels
    for axis in range(3):
        if rng.random() < probability:
            channels = np.flip(channels, axis=axis + 1)
            labels = None if labels is None else np.flip(labels, axis=axis)
    return (np.ascontiguousarray(channels),
            None if labels is None else np.ascontiguousarray(labels))


def random_in_plane_rotation(rng: np.random.Generator, probability: float, channels: np.ndarray,
                             labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """With ``probability``, rotate ``channels [C, D, H, W]`` (and ``labels [D, H, W]``) by 90, 180 or 270
    degrees in the (H, W) plane; the slice axis D is kept. Draws nothing when ``probability`` is 0.

    Meant for the working grid, whose in-plane voxels are square (resampled to the working spacing, or
    native when coarser, and the scans' in-plane spacing is isotropic).
    """
    if probability <= 0 or rng.random() >= probability:
        return channels, labels
    turns = int(rng.integers(1, 4))
    channels = np.ascontiguousarray(np.rot90(channels, turns, axes=(2, 3)))
    labels = None if labels is None else np.ascontiguousarray(np.rot90(labels, turns, axes=(1, 2)))
    return channels, labels


def random_symmetry(rng: np.random.Generator, config: AugmentationConfig, channels: np.ndarray,
                    labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The configured mirror flips, then the in-plane rotation (each draws nothing when off)."""
    channels, labels = random_flip(rng, config.flip_probability, channels, labels)
    return random_in_plane_rotation(rng, config.rotate_in_plane_probability, channels, labels)
