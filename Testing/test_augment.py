"""Table 1 augmentations: seeded, within their ranges, label-preserving."""

from __future__ import annotations

import numpy as np

from CMBDetectLib.training.augment import AugmentationConfig, augment_patch, random_offset


def _patch() -> np.ndarray:
    rng = np.random.default_rng(1)
    patch = np.zeros((2, 16, 16, 16), dtype=np.float32)
    patch[0] = 0.5 + 0.1 * rng.standard_normal((16, 16, 16))
    patch[0, 7:9, 7:9, 7:9] = 1.0
    patch[1, 6:10, 6:10, 6:10] = 0.8
    return patch


def test_same_seed_same_result_and_input_untouched() -> None:
    patch = _patch()
    original = patch.copy()
    config = AugmentationConfig(noise_probability=1.0, blur_probability=1.0)
    a = augment_patch(patch, np.random.default_rng(7), config)
    b = augment_patch(patch, np.random.default_rng(7), config)
    c = augment_patch(patch, np.random.default_rng(8), config)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(patch, original)
    assert a.dtype == np.float32 and a.shape == patch.shape


def test_noise_variance_is_in_the_table_1_range() -> None:
    patch = np.zeros((2, 32, 32, 32), dtype=np.float32)
    patch[0] = np.random.default_rng(0).standard_normal((32, 32, 32))  # unit variance
    config = AugmentationConfig(noise_probability=1.0, blur_probability=0.0)
    for seed in range(5):
        noisy = augment_patch(patch, np.random.default_rng(seed), config)
        added = np.var(noisy[0] - patch[0])
        assert 0.008 < added < 0.045
        np.testing.assert_allclose(noisy[1], 0.0, atol=1e-6)  # FRST channel: no noise


def test_absolute_noise_mode() -> None:
    patch = np.zeros((1, 32, 32, 32), dtype=np.float32)
    config = AugmentationConfig(noise_probability=1.0, blur_probability=0.0, relative_noise=False)
    noisy = augment_patch(patch, np.random.default_rng(0), config)
    assert 0.008 < np.var(noisy[0]) < 0.045


def test_blur_follows_table_1_and_keeps_a_single_voxel_cmb() -> None:
    patch = np.zeros((2, 16, 16, 16), dtype=np.float32)
    patch[:, 8, 8, 8] = 1.0
    config = AugmentationConfig(noise_probability=0.0, blur_probability=1.0)
    blurred = augment_patch(patch, np.random.default_rng(3), config)
    # sigma <= 0.2 voxel: a neighbour's weight is <= exp(-12.5), so even a 1-voxel CMB survives intact.
    assert blurred[0, 8, 8, 8] > 0.999
    assert blurred[0, 8, 8, 9] < 1e-4
    wide = AugmentationConfig(noise_probability=0.0, blur_probability=1.0, blur_sigma=(1.0, 1.0))
    wider = augment_patch(patch, np.random.default_rng(3), wide)
    assert wider[0, 8, 8, 8] < 0.5 and wider[0, 8, 8, 9] > 0.01
    assert abs(wider[0].sum() - 1.0) < 1e-3  # a blur redistributes intensity, it does not add any


def test_disabled_config_is_identity() -> None:
    patch = _patch()
    out = augment_patch(patch, np.random.default_rng(0), AugmentationConfig().disabled())
    np.testing.assert_array_equal(out, patch)


def test_translation_offsets_cover_the_range() -> None:
    rng = np.random.default_rng(0)
    offsets = np.array([random_offset(rng, 15) for _ in range(2000)])
    assert offsets.min() == -15 and offsets.max() == 15
    assert np.all(random_offset(rng, 0) == 0)


def test_probability_controls_how_often_noise_applies() -> None:
    patch = _patch()
    config = AugmentationConfig(noise_probability=0.5, blur_probability=0.0)
    changed = sum(not np.array_equal(augment_patch(patch, np.random.default_rng(s), config), patch)
                  for s in range(400))
    assert 160 < changed < 240


def test_flips_move_channels_and_labels_together_and_are_off_by_default():
    from CMBDetectLib.training.augment import random_flip

    rng = np.random.default_rng(0)
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1, 2, 4] = 1                                     # an off-centre "CMB"
    patch = np.stack([labels * 5.0, labels * 2.0]).astype(np.float32)
    assert AugmentationConfig().flip_probability == 0.0     # the paper's Table 1 has no flips
    state = rng.bit_generator.state
    same, same_labels = random_flip(rng, 0.0, patch, labels)
    assert same is patch and same_labels is labels and rng.bit_generator.state == state  # no draw at p = 0
    seen = set()
    for seed in range(40):
        flipped, flipped_labels = random_flip(np.random.default_rng(seed), 0.5, patch, labels)
        where = tuple(int(v) for v in np.argwhere(flipped_labels)[0])
        assert np.argwhere(flipped[0]).tolist() == [list(where)] and flipped[1][where] == 2.0
        seen.add(where)
    assert seen == {(k, j, i) for k in (1, 4) for j in (2, 3) for i in (4, 1)}   # all 8 mirror images
    assert AugmentationConfig(flip_probability=0.5).disabled().flip_probability == 0.0


def test_the_image_before_vessel_suppression_gets_the_same_noise_field() -> None:
    two = _patch()
    three = np.concatenate([two, 2.0 * two[:1]])          # channel 2: the image before suppression
    config = AugmentationConfig(noise_probability=1.0, blur_probability=0.0)
    a = augment_patch(two, np.random.default_rng(3), config)
    b = augment_patch(three, np.random.default_rng(3), config)
    # the first channel's noise is what a two-channel patch always got (make model reproduces old packages)
    np.testing.assert_array_equal(a, b[:2])
    rng = np.random.default_rng(3)
    rng.random()
    variance = rng.uniform(*config.noise_variance)
    expected = rng.normal(0.0, np.sqrt(variance) * float(two[0].std()), size=two[0].shape).astype(np.float32)
    np.testing.assert_array_equal(a[0], two[0] + expected)
    # one acquisition, one noise: channel 2 carries the same field, scaled to its own contrast
    np.testing.assert_allclose(b[2] - three[2], 2.0 * (a[0] - two[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b[1], three[1])         # FRST: none


def test_in_plane_rotations_keep_the_slice_axis_and_move_labels_with_channels():
    from CMBDetectLib.training.augment import random_in_plane_rotation, random_symmetry

    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1, 2, 4] = 1                                     # an off-centre "CMB"
    patch = np.stack([labels * 5.0, labels * 2.0]).astype(np.float32)
    assert AugmentationConfig().rotate_in_plane_probability == 0.0
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    same, same_labels = random_symmetry(rng, AugmentationConfig(), patch, labels)
    assert same is patch and same_labels is labels and rng.bit_generator.state == state  # older recipes replay
    seen = set()
    for seed in range(40):
        turned, turned_labels = random_in_plane_rotation(np.random.default_rng(seed), 1.0, patch, labels)
        where = tuple(int(v) for v in np.argwhere(turned_labels)[0])
        assert np.argwhere(turned[0]).tolist() == [list(where)] and turned[1][where] == 2.0
        assert where[0] == 1                                # the slice index never changes
        seen.add(where)
    # the three quarter turns of (j, i) = (2, 4) about the centre of a 6 x 6 plane
    assert seen == {(1, 1, 2), (1, 3, 1), (1, 4, 3)}
    config = AugmentationConfig(flip_probability=0.5, rotate_in_plane_probability=0.5).disabled()
    assert config.rotate_in_plane_probability == 0.0
