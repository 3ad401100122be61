"""Input checks: every kind of bad image / mask / modality gives one clear InputError."""

from __future__ import annotations

import numpy as np
import pytest

from CMBDetectLib.errors import InputError
from CMBDetectLib.validation import normalise_modality, validate_image, validate_mask
from CMBDetectLib.volume import Volume


def _mri(shape=(16, 24, 20), spacing=(0.8, 0.8, 3.0), dtype=np.float32) -> Volume:
    rng = np.random.default_rng(0)
    return Volume((rng.random(shape) * 1000).astype(dtype), spacing)


@pytest.mark.parametrize("name,expected", [
    ("SWI", "swi"), ("swi", "swi"), (" Swi ", "swi"),
    ("t2*", "t2s"), ("T2star", "t2s"), ("gre", "t2s"), ("t2s-gre", "t2s"), ("T2*-GRE", "t2s"), ("t2s", "t2s"),
    ("QSM", "qsm"), ("qsm", "qsm"),
])
def test_modality_aliases(name, expected):
    assert normalise_modality(name) == expected


@pytest.mark.parametrize("name", ["flair", "T1", "", "swi2"])
def test_unknown_modality_lists_choices(name):
    with pytest.raises(InputError, match="swi.*t2s.*qsm"):
        normalise_modality(name)


def test_good_images_pass():
    validate_image(_mri())
    validate_image(_mri(dtype=np.int16))
    validate_image(_mri(dtype=np.uint16))


@pytest.mark.parametrize("shape", [(1, 64, 64), (64, 64, 4), (64, 7, 64)])
def test_flat_image_looks_2d(shape):
    with pytest.raises(InputError, match="2D"):
        validate_image(Volume(np.random.default_rng(0).random(shape).astype(np.float32)))


def test_two_dimensional_array():
    with pytest.raises(InputError, match="3D"):
        validate_image(Volume(np.ones((64, 64), np.float32)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_counted(bad):
    volume = _mri()
    volume.array[0, 0, :3] = bad
    with pytest.raises(InputError, match="3 NaN/Inf"):
        validate_image(volume)


def test_empty_and_constant():
    with pytest.raises(InputError, match="empty"):
        validate_image(Volume(np.zeros((16, 16, 16), np.float32)))
    with pytest.raises(InputError, match="constant"):
        validate_image(Volume(np.full((16, 16, 16), 7.0, np.float32)))


@pytest.mark.parametrize("spacing", [(0.8, 0.8, 0.01), (0.8, 0.0, 3.0), (25.0, 0.8, 3.0), (-1.0, 1.0, 1.0),
                                     (0.8, float("nan"), 3.0), (0.8, float("inf"), 3.0)])
def test_absurd_spacing(spacing):
    volume = _mri()
    volume.spacing = spacing
    with pytest.raises(InputError, match="spacing"):
        validate_image(volume)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32])
def test_label_map_is_refused(dtype):
    labels = np.zeros((16, 24, 20), dtype)
    labels[4:8, 4:8, 4:8] = 1
    labels[10:12, 10:12, 10:12] = 5
    with pytest.raises(InputError, match="label map"):
        validate_image(Volume(labels))


def test_mask_must_share_the_grid():
    image = _mri()
    mask = Volume(np.ones((16, 24, 21), np.uint8), image.spacing)
    with pytest.raises(InputError, match=r"shape \(21, 24, 16\)"):
        validate_mask(mask, image)
    mask = Volume(np.ones(image.array.shape, np.uint8), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="spacing"):
        validate_mask(mask, image)
    mask = Volume(np.ones(image.array.shape, np.uint8), image.spacing, origin=(5.0, 0.0, 0.0))
    with pytest.raises(InputError, match="grid"):
        validate_mask(mask, image)


def test_empty_mask_is_refused_and_good_mask_is_boolean():
    image = _mri()
    with pytest.raises(InputError, match="empty"):
        validate_mask(Volume(np.zeros(image.array.shape, np.uint8), image.spacing), image)
    array = np.zeros(image.array.shape, np.uint8)
    array[2:5, 3:9, 4:6] = 3
    result = validate_mask(Volume(array, image.spacing), image)
    assert result.dtype == bool and result.sum() == 3 * 6 * 2
