"""``cmbdetect detect`` as a real subprocess: outputs on the input grid, and one clear line for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CMBDetectLib.volume import Volume, read_volume, write_volume_atomic


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "CMBDetectLib", *args], capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def scan_path(tmp_path_factory, phantom_volume):
    path = tmp_path_factory.mktemp("scans") / "sub-01_swi.nii.gz"
    write_volume_atomic(phantom_volume.image, path)
    return path


def test_detect_writes_outputs_on_the_input_grid(tiny_model, scan_path, tmp_path):
    out = tmp_path / "out"
    result = run_cli("detect", str(scan_path), "--out", str(out), "--model", str(tiny_model.path),
                     "--device", "cpu", "--th-det", "0.3", "--save-prob", "--progress", "json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    fractions = [line["fraction"] for line in lines if line["type"] == "progress"]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
    final = [line for line in lines if line["type"] == "result"]
    assert len(final) == 1 and final[0]["modality"] == "swi"
    labels = read_volume(out / "sub-01_swi_cmb.nii.gz")
    image = read_volume(scan_path)
    assert labels.same_grid(image, tolerance=1e-6)
    assert np.issubdtype(labels.array.dtype, np.unsignedinteger)
    record = json.loads((out / "sub-01_swi_candidates.json").read_text())
    assert record["schema"] == "cmbdetect.candidates/1"
    assert record["image"]["shape"] == list(image.shape_ijk)
    final_ids = {c["id"] for c in record["candidates"] if c["final"]}
    assert set(np.unique(labels.array)) - {0} == final_ids
    assert (out / "sub-01_swi_session.npz").is_file() and (out / "sub-01_swi_prob.nii.gz").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def _write(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()] if image.GetDimension() <= 3 else (*spacing, 1.0))
    sitk.WriteImage(image, str(path))
    return path


BAD_INPUTS = {
    "2d": (lambda d: _write(d / "flat.nii.gz", np.ones((64, 64), np.float32)), "2D"),
    "4d": (lambda d: _write(d / "series.nii.gz", np.random.rand(3, 16, 16, 16).astype(np.float32)), "4D"),
    "constant": (lambda d: _write(d / "const.nii.gz", np.full((16, 32, 32), 7, np.float32)), "constant"),
    "empty": (lambda d: _write(d / "zeros.nii.gz", np.zeros((16, 32, 32), np.float32)), "empty"),
    "nan": (lambda d: _write(d / "nan.mha", np.where(np.random.rand(16, 32, 32) > 0.5, np.nan, 1.0)
                             .astype(np.float32)), "NaN"),
    "spacing": (lambda d: _write(d / "huge.nii.gz", np.random.rand(16, 32, 32).astype(np.float32),
                                 (50.0, 50.0, 50.0)), "spacing"),
    "labelmap": (lambda d: _write(d / "seg.nii.gz", (np.random.rand(16, 32, 32) > 0.5).astype(np.uint8)),
                 "label"),
    "missing": (lambda d: d / "does_not_exist.nii.gz", "not found"),
    "unreadable": (lambda d: (d / "broken.nii.gz").write_bytes(b"not an image") and d / "broken.nii.gz",
                   "cannot read"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_line_and_no_output(case, tiny_model, tmp_path):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    result = run_cli("detect", str(path), "--out", str(out), "--model", str(tiny_model.path), "--device", "cpu")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists() or not list(out.iterdir())


def test_mask_on_another_grid_is_refused(tiny_model, scan_path, tmp_path):
    mask = Volume(np.ones((10, 20, 20), np.uint8), (1.0, 1.0, 1.0))
    mask_path = write_volume_atomic(mask, tmp_path / "mask.nii.gz")
    result = run_cli("detect", str(scan_path), "--out", str(tmp_path / "out"), "--mask", str(mask_path),
                     "--model", str(tiny_model.path), "--device", "cpu")
    assert result.returncode != 0 and "grid" in result.stderr.lower()


def test_unknown_modality_is_refused(tiny_model, scan_path, tmp_path):
    result = run_cli("detect", str(scan_path), "--out", str(tmp_path / "o"), "--modality", "flair",
                     "--model", str(tiny_model.path))
    assert result.returncode != 0 and "modality" in result.stderr


def test_missing_model_is_refused(scan_path, tmp_path):
    result = run_cli("detect", str(scan_path), "--out", str(tmp_path / "o"), "--model", "no-such-model")
    assert result.returncode != 0
    assert "unknown model" in result.stderr and "Traceback" not in result.stderr


def test_corrupted_model_is_refused(tiny_model, scan_path, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model.path, broken)
    weights = broken / "student.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = run_cli("detect", str(scan_path), "--out", str(tmp_path / "o"), "--model", str(broken))
    assert result.returncode != 0 and "sha256" in result.stderr
    assert not (tmp_path / "o").exists()


def _limit_file_size() -> None:
    """In the child: files larger than 4 kB cannot be written (EFBIG), like a disk that is full."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_full_disk_gives_one_line_and_leaves_nothing(tiny_model, scan_path, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "CMBDetectLib", "detect", str(scan_path), "--out", str(out), "--model",
         str(tiny_model.path), "--device", "cpu", "--th-det", "0.3", "--save-prob"],
        capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())


def test_detect_uses_the_models_threshold_for_the_scans_modality(tiny_model, scan_path, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model.path, model)
    manifest = json.loads((model / "model.json").read_text())
    manifest["thresholds"]["th_disc_by_modality"] = {"swi": 0.123, "qsm": 0.456}   # as calibration writes
    manifest["postprocessing"]["min_volume_mm3_by_modality"] = {"swi": 3.5, "qsm": 0.0}
    (model / "model.json").write_text(json.dumps(manifest))
    for extra, expected, volume in (([], 0.123, "volume >= 3.5 mm3"), (["--modality", "qsm"], 0.456, "no volume limit"),
                                    (["--th-disc", "0.2"], 0.2, "volume >= 3.5 mm3")):
        out = tmp_path / f"out{expected}"
        result = run_cli("detect", str(scan_path), "--out", str(out), "--model", str(model), "--device", "cpu",
                         "--progress", "none", *extra)
        assert result.returncode == 0, result.stderr
        assert f"Th_Cdisc {expected:g}; {volume}," in result.stdout   # the summary says which values it used
        record = json.loads((out / "sub-01_swi_candidates.json").read_text())
        assert record["parameters"]["th_disc"] == pytest.approx(expected)
        assert record["parameters"]["min_volume_mm3"] == pytest.approx(0.0 if "no" in volume else 3.5)
