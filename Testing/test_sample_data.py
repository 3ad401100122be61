"""The generated demo sample: deterministic (same seed -> same sha256), cached, and re-generated when the
cached file is corrupted or its record is missing."""

from __future__ import annotations

import json

import pytest

from CMBDetectLib.sample_data import file_sha256, get_sample, sample_stem, verify_cached
from CMBDetectLib.synth.generator import SynthConfig
from CMBDetectLib.volume import read_volume

# A small field of view keeps the test at ~10 s per generation; the real sample uses sample_config().
SMALL = SynthConfig(in_plane_range_mm=(1.2, 1.2), slice_thickness_mm=4.0, fov_mm=(120.0, 130.0),
                    fov_z_range_mm=(40.0, 40.0))


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    return get_sample(tmp_path_factory.mktemp("cache_a"), seed=5, n_cmbs=2, config=SMALL)


def test_same_seed_gives_the_same_file_and_the_cache_is_reused(first, tmp_path):
    assert first.generated and first.n_cmbs == 2
    assert first.image.name == f"{sample_stem(5)}.nii.gz"
    record = json.loads(first.truth.read_text())
    assert record["sha256"] == first.sha256 == file_sha256(first.image)
    assert len(record["cmbs"]) == 2 and record["seed"] == 5
    assert read_volume(first.image).shape_ijk == tuple(record["shape"])
    # Generated again elsewhere: bit-identical.
    second = get_sample(tmp_path / "cache_b", seed=5, n_cmbs=2, config=SMALL)
    assert second.generated and second.sha256 == first.sha256
    # Asked again: the verified cached file is re-used, not generated.
    again = get_sample(tmp_path / "cache_b", seed=5, n_cmbs=2, config=SMALL)
    assert not again.generated and again.sha256 == first.sha256
    # Other settings are another sample: the cache is not taken for it.
    assert verify_cached(tmp_path / "cache_b", seed=5, config=None) is None


def test_corrupted_cache_is_detected_and_regenerated(first, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    image = folder / first.image.name
    image.write_bytes(first.image.read_bytes())
    (folder / first.truth.name).write_text(first.truth.read_text())
    assert verify_cached(folder, seed=5, config=SMALL) is not None
    # Flip one byte in the middle of the file (a bad disk block, an interrupted copy...).
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    assert verify_cached(folder, seed=5, config=SMALL) is None
    repaired = get_sample(folder, seed=5, n_cmbs=2, config=SMALL)
    assert repaired.generated and repaired.sha256 == first.sha256 == file_sha256(image)
    # A missing record (generation interrupted before it was written) also means "generate again".
    (folder / first.truth.name).unlink()
    assert verify_cached(folder, seed=5, config=SMALL) is None
