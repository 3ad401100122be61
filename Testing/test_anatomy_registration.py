"""The atlas registration refuses, loudly, images that are not a brain (quality is measured)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nilearn")

from CMBDetectLib.anatomy.atlas import load_atlas  # noqa: E402
from CMBDetectLib.anatomy.phantom import make_head_phantom  # noqa: E402
from CMBDetectLib.anatomy.registration import MIN_STRUCTURE, register_to_atlas  # noqa: E402
from CMBDetectLib.errors import InputError  # noqa: E402
from CMBDetectLib.volume import Volume  # noqa: E402

SPACING = (0.9, 0.9, 3.0)   # SimpleITK (x, y, z)
SHAPE = (50, 200, 170)      # [k, j, i]


def _grid_mm():
    k, j, i = np.meshgrid(*(np.arange(n) - n / 2 for n in SHAPE), indexing="ij")
    return k * SPACING[2], j * SPACING[1], i * SPACING[0]


def _with_noise(array: np.ndarray, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(np.abs(array + rng.normal(0, 0.03, array.shape)).astype(np.float32), spacing=SPACING)


def test_brain_shaped_ellipsoid_with_shading_is_refused():
    # Outline like a brain (so the mask overlap alone would pass), smooth shading like a bias field,
    # but no anatomy inside: the structure score must catch it.
    z, y, x = _grid_mm()
    r = np.sqrt((x / 68) ** 2 + (y / 85) ** 2 + (z / 60) ** 2)
    phantom = np.where(r < 1, 0.4 + 0.3 * r ** 2 + 0.1 * y / 85, 0.0)
    phantom += np.where((r > 1.08) & (r < 1.18), 0.7, 0)
    with pytest.raises(InputError, match="quality check") as error:
        register_to_atlas(_with_noise(phantom), atlas=load_atlas())
    assert "structure" in str(error.value)


def test_cylinder_phantom_is_refused():
    z, y, x = _grid_mm()
    phantom = np.where((np.hypot(x, y) < 75) & (np.abs(z) < 60), 0.5, 0.0)
    with pytest.raises(InputError, match="quality check"):
        register_to_atlas(_with_noise(phantom, 1), atlas=load_atlas())


def test_small_object_is_refused_before_registration():
    z, y, x = _grid_mm()
    phantom = np.where(np.sqrt(x ** 2 + y ** 2 + z ** 2) < 30, 0.8, 0.0)   # ~110 mL: a knee, a fruit...
    with pytest.raises(InputError, match="does not look like a head"):
        register_to_atlas(_with_noise(phantom, 2), atlas=load_atlas())


def test_noisy_shaded_thick_slice_brain_is_accepted():
    # The other side of the threshold: a real-looking brain with 5 mm slices, strong noise and a bias
    # field still passes, with a clear margin over the refusal threshold.
    scan, _ = make_head_phantom(spacing=(0.9, 0.8, 5.0), size=(200, 260, 30), noise=0.08, seed=5)
    k = np.linspace(-1, 1, scan.array.shape[0])[:, None, None]
    i = np.linspace(-1, 1, scan.array.shape[2])[None, None, :]
    scan = scan.with_array((scan.array * (1 + 0.3 * k + 0.2 * i)).astype(np.float32))
    result = register_to_atlas(scan)
    assert result.structure > 2 * MIN_STRUCTURE
    assert result.dice > 0.85
