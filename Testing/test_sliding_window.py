"""Sliding-window stage-1 inference: blending, padding and skipped windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from CMBDetectLib.errors import CancelledError
from CMBDetectLib.networks import ShallowUNet
from CMBDetectLib.sliding_window import predict_probability_map, window_slices


class Pointwise(nn.Module):
    """A 1x1x1 network: its sliding-window result must equal the whole-volume result exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[-3.0, 1.0], [4.0, 2.0]]).view(2, 2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.5, -2.0]))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        return self.conv(x)


def _whole(network: nn.Module, channels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(network(torch.from_numpy(channels)[None]), 1)[0, 1].numpy()


@pytest.fixture
def channels() -> np.ndarray:
    return np.random.default_rng(0).random((2, 32, 44, 36), dtype=np.float32)


def test_pointwise_network_equals_whole_volume_everywhere(channels: np.ndarray) -> None:
    network = Pointwise()
    result = predict_probability_map(network, channels, roi_size=16, overlap=0.5, batch_size=3)
    assert result.dtype == np.float32 and result.shape == channels.shape[1:]
    np.testing.assert_allclose(result, _whole(network, channels), atol=1e-5)


def _varying_unet() -> ShallowUNet:
    torch.manual_seed(0)
    network = ShallowUNet(width=4).eval()
    with torch.no_grad():
        network.head.weight.mul_(50.0)  # an untrained network is nearly constant; make it vary
        network.head.bias.zero_()  # around p = 0.5, not at the CMB prior where softmax saturates
    return network


def test_unet_single_window_equals_whole_volume_exactly(channels: np.ndarray) -> None:
    network = _varying_unet()
    result = predict_probability_map(network, channels, roi_size=channels.shape[1:], overlap=0.5)
    np.testing.assert_allclose(result, _whole(network, channels), atol=1e-6)


def test_unet_overlapping_windows_match_whole_volume_in_the_interior(channels: np.ndarray) -> None:
    network = _varying_unet()
    whole = _whole(network, channels)
    assert whole.std() > 1e-3  # the comparison below is not between two constants
    result = predict_probability_map(network, channels, roi_size=24, overlap=0.5, batch_size=4)
    # Not exact: the U-Net's receptive field (~40 voxels) reaches past a 24^3 window's zero-padded
    # border, and those predictions keep a small Gaussian weight. Each window's interior is exact
    # (windows are aligned to the pooling grid), so the blend stays close to the whole-volume map.
    difference = np.abs(result - whole)[(slice(6, -6),) * 3]
    assert difference.mean() < 0.03 * whole.std()
    assert np.percentile(difference, 99) < 0.25 * whole.std()


def test_misaligned_windows_would_be_worse(channels: np.ndarray) -> None:
    network = _varying_unet()
    whole = _whole(network, channels)
    interior = (slice(6, -6),) * 3
    aligned = predict_probability_map(network, channels, roi_size=24, overlap=0.75)
    misaligned = predict_probability_map(network, channels, roi_size=24, overlap=0.75, alignment=1)
    assert np.abs(aligned - whole)[interior].mean() < np.abs(misaligned - whole)[interior].mean()


def test_small_volumes_are_padded(channels: np.ndarray) -> None:
    small = channels[:, :10, :20, :12]
    network = Pointwise()
    result = predict_probability_map(network, small, roi_size=16, overlap=0.25)
    assert result.shape == small.shape[1:]
    np.testing.assert_allclose(result, _whole(network, small), atol=1e-5)


def test_windows_without_mask_voxels_are_skipped_and_zero(channels: np.ndarray) -> None:
    network = Pointwise()
    total = len(window_slices(channels.shape[1:], (16, 16, 16), 0.25))
    mask = np.zeros(channels.shape[1:], dtype=bool)
    mask[2:5, 3:6, 2:5] = True  # inside the very first window only
    result = predict_probability_map(network, channels, roi_size=16, overlap=0.25, patch_mask=mask)
    assert network.calls == 1 < total
    whole = _whole(network, channels)
    np.testing.assert_allclose(result[:12, :12, :12], whole[:12, :12, :12], atol=1e-5)
    assert np.all(result[16:, :, :] == 0) and np.all(result[:, 16:, :] == 0)


def test_empty_mask_runs_nothing(channels: np.ndarray) -> None:
    network = Pointwise()
    result = predict_probability_map(network, channels, roi_size=16,
                                     patch_mask=np.zeros(channels.shape[1:], bool))
    assert network.calls == 0 and not result.any()


def test_progress_and_cancel(channels: np.ndarray) -> None:
    fractions: list[float] = []
    predict_probability_map(Pointwise(), channels, roi_size=16, batch_size=4,
                            progress=lambda f, m: fractions.append(f))
    assert fractions[-1] == pytest.approx(1.0) and fractions == sorted(fractions)
    with pytest.raises(CancelledError):
        predict_probability_map(Pointwise(), channels, roi_size=16, cancel=lambda: True)


def test_training_mode_is_restored(channels: np.ndarray) -> None:
    network = ShallowUNet(width=4).train()
    predict_probability_map(network, channels[:, :24, :24, :24], roi_size=24)
    assert network.training
