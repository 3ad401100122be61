"""Export of reviewed cases: layout, pre-write checks, replacement, killed and concurrent exports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from CMBDetectLib.dataset import case_paths, load_dataset, validate_dataset
from CMBDetectLib.dataset_export import (
    STEP_DELAY_ENV,
    export_case,
    export_saved_review,
    pending_transactions,
    read_segmentation_instances,
    recover_interrupted_exports,
)
from CMBDetectLib.errors import InputError
from CMBDetectLib.volume import Volume, write_volume_atomic

REPO = Path(__file__).resolve().parents[1]
SPACING = (0.9, 0.9, 2.0)
ADDED = 60001
# id -> (centre k, j, i) of a 3x3x3 blob
BLOBS = {1: (8, 6, 6), 2: (8, 16, 16), ADDED: (8, 6, 16), 4: (8, 16, 6)}


def make_case(case: str = "sub-01", decisions: dict | None = None, subject: str | None = None,
              modality: str | None = "swi", seed: int = 0):
    """A tiny reviewed case: image, instance labels (every candidate's voxels) and its review dict."""
    decisions = decisions or {1: "accepted", 2: "rejected", ADDED: "added"}
    rng = np.random.default_rng(seed)
    image = rng.normal(500, 20, (16, 24, 24)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint16)
    for identifier in decisions:
        k, j, i = BLOBS[identifier]
        labels[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2] = identifier
        image[labels == identifier] = 100.0
    image_volume = Volume(image, SPACING, (10.0, -5.0, 3.0))
    review = {
        "schema": "cmbdetect.review/1", "case": case, "subject": subject or case, "modality": modality,
        "image": {"path": f"{case}.nii.gz", "shape": [24, 24, 16], "spacing": list(SPACING)},
        "model": {"name": "tiny-test", "version": "1.0.0", "sha256": "0" * 64},
        "parameters": {"th_det": 0.5, "th_disc": 0.6, "min_volume_mm3": 2.5},
        "reviewer": "jdoe", "time": "2026-11-23T10:00:00+00:00", "source": "review",
        "cmbs": [{"id": i, "decision": d, "segment_id": f"CMB_{i}",
                  "centroid_ras": [0.0, 0.0, 0.0], "volume_mm3": 1.0, "p_det": 0.9, "p_disc": 0.8}
                 for i, d in decisions.items()],
        "history": [{"time": "2026-11-23T10:00:00+00:00", "action": "accept", "id": 1}],
    }
    if modality is None:
        del review["modality"]
    return review, image_volume, image_volume.with_array(labels)


def save_case(folder: Path, case: str = "sub-01", **kwargs) -> Path:
    """The same case saved as ``<case>.review.json`` + image + ``<case>.instances.nii.gz``."""
    review, image, labels = make_case(case, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    write_volume_atomic(image, folder / f"{case}.nii.gz")
    write_volume_atomic(labels, folder / f"{case}.instances.nii.gz")
    path = folder / f"{case}.review.json"
    path.write_text(json.dumps(review), encoding="utf-8")
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".cmbdetect.lock"}


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_export_writes_the_dataset_layout(tmp_path):
    review, image, labels = make_case()
    result = export_case(tmp_path / "ds", review, image, labels)
    root = tmp_path / "ds"
    assert (result.case, result.replaced, result.n_cmbs, result.n_hard_negatives) == ("sub-01", False, 2, 1)
    paths = case_paths("sub-01")
    label = read(root / paths.label)
    instances = read(root / paths.instances)
    assert label.dtype == np.uint8 and instances.dtype == np.uint16
    # accepted + added are labels, the rejected candidate is not
    assert set(np.unique(instances)) == {0, 1, ADDED}
    assert np.array_equal(label > 0, instances > 0)
    assert not label[labels.array == 2].any()
    assert np.allclose(read(root / paths.image), image.array)
    exported_image = sitk.ReadImage(str(root / paths.image))
    assert np.allclose(exported_image.GetSpacing(), SPACING) and np.allclose(exported_image.GetOrigin(),
                                                                              (10.0, -5.0, 3.0))
    description = json.loads((root / "dataset.json").read_text())
    assert description["numTraining"] == 1 and description["labels"] == {"background": 0, "cmb": 1}
    assert description["channel_names"] == {"0": "swi"} and description["file_ending"] == ".nii.gz"
    saved = json.loads((root / paths.review).read_text())
    assert {c["id"]: c["decision"] for c in saved["cmbs"]} == {1: "accepted", 2: "rejected", ADDED: "added"}
    assert saved["reviewer"] == "jdoe" and saved["model"]["version"] == "1.0.0"
    assert saved["thresholds"] == {"th_det": 0.5, "th_disc": 0.6}
    # the rejected candidate is a hard negative located on the exported grid
    (negative,) = saved["hard_negatives"]
    assert negative["id"] == 2 and negative["kind"] == "rejected"
    assert np.allclose(negative["centroid_ijk"], [16, 16, 8], atol=1e-3)
    assert np.allclose(image.ras_to_index(negative["centroid_ras"])[0], [8, 16, 16], atol=1e-3)
    history = (root / "cmbdetect" / "history.jsonl").read_text().splitlines()
    assert len(history) == 1 and json.loads(history[0])["action"] == "added"
    assert validate_dataset(root) == []
    dataset = load_dataset(root)
    assert dataset.counts() == {"cases": 1, "subjects": 1, "cmbs": 2, "hard_negatives": 1, "pending": 0}
    assert not pending_transactions(root)


def test_pending_candidates_need_an_explicit_export_anyway(tmp_path):
    review, image, labels = make_case(decisions={1: "accepted", 4: "pending"})
    with pytest.raises(InputError, match="pending"):
        export_case(tmp_path / "ds", review, image, labels)
    assert not (tmp_path / "ds" / "dataset.json").exists()
    result = export_case(tmp_path / "ds", review, image, labels, allow_pending=True)
    assert any("pending" in w for w in result.warnings)
    instances = read(tmp_path / "ds" / case_paths("sub-01").instances)
    assert set(np.unique(instances)) == {0, 1}   # pending is neither a label ...
    assert result.n_hard_negatives == 0           # ... nor a hard negative
    assert validate_dataset(tmp_path / "ds") == []


@pytest.mark.parametrize("problem, message", [
    ("grid", "not on the image grid"),
    ("modality", "modality"),
    ("undecided_label", "no decision"),
    ("empty_cmb", "no voxels"),
    ("shape", "review was made on"),
])
def test_pre_write_checks_refuse_bad_cases(tmp_path, problem, message):
    review, image, labels = make_case()
    if problem == "grid":
        labels = Volume(labels.array, (0.9, 0.9, 2.5), labels.origin)
    elif problem == "modality":
        review, image, labels = make_case(modality=None)
    elif problem == "undecided_label":
        review["cmbs"] = [c for c in review["cmbs"] if c["id"] != 2]
    elif problem == "empty_cmb":
        labels = labels.with_array(np.where(labels.array == ADDED, 0, labels.array).astype(np.uint16))
    elif problem == "shape":
        review["image"]["shape"] = [24, 24, 17]
    with pytest.raises(InputError, match=message):
        export_case(tmp_path / "ds", review, image, labels)
    assert not (tmp_path / "ds").exists() or not any((tmp_path / "ds").glob("**/*.nii.gz"))


def test_a_dataset_keeps_one_modality(tmp_path):
    export_case(tmp_path / "ds", *make_case("a"))
    review, image, labels = make_case("b")
    review["modality"] = "qsm"
    with pytest.raises(InputError, match="separate dataset"):
        export_case(tmp_path / "ds", review, image, labels)
    assert load_dataset(tmp_path / "ds").counts()["cases"] == 1


def test_re_export_replaces_the_case_and_keeps_history(tmp_path):
    root = tmp_path / "ds"
    export_case(root, *make_case())
    export_case(root, *make_case("other", subject="s2"))
    review, image, labels = make_case(decisions={1: "rejected", 2: "rejected", ADDED: "added"})
    result = export_case(root, review, image, labels)
    assert result.replaced and result.n_cmbs == 1 and result.n_hard_negatives == 2
    description = json.loads((root / "dataset.json").read_text())
    assert description["numTraining"] == 2 and description["cmbdetect"]["cases"] == ["other", "sub-01"]
    images = sorted(p.name for p in (root / "imagesTr").iterdir())
    assert images == ["other_0000.nii.gz", "sub-01_0000.nii.gz"]
    assert set(np.unique(read(root / case_paths("sub-01").instances))) == {0, ADDED}
    history = [json.loads(line) for line in (root / "cmbdetect" / "history.jsonl").read_text().splitlines()]
    assert [(h["case"], h["action"]) for h in history] == [("sub-01", "added"), ("other", "added"),
                                                           ("sub-01", "replaced")]
    assert validate_dataset(root) == []


def test_cropped_multi_layer_segmentation_is_placed_on_the_image_grid(tmp_path):
    """A .seg.nrrd as Slicer writes it: one layer per segment, cropped extent, SegmentN_* fields."""
    review, image, labels = make_case()
    ids = [1, 2, ADDED]
    crop = (slice(6, 11), slice(4, 19), slice(3, 20))   # k, j, i: holds every blob, smaller than the image
    layers = [(labels.array[crop] == i).astype(np.uint8) for i in ids]
    seg = sitk.GetImageFromArray(np.stack(layers, axis=-1), isVector=True)
    seg.SetSpacing(image.spacing)
    seg.SetDirection(image.direction)
    # the crop starts at voxel (i, j, k) = (3, 4, 6); identity direction
    seg.SetOrigin(tuple(np.asarray(image.origin) + np.asarray(image.spacing) * np.array([3, 4, 6])))
    for n, identifier in enumerate(ids):
        # the id tag only for the first; the others are found by segment_id / name
        seg.SetMetaData(f"Segment{n}_ID", f"CMB_{identifier}" if n else "Segment_1")
        seg.SetMetaData(f"Segment{n}_Name", f"CMB {identifier}")
        seg.SetMetaData(f"Segment{n}_LabelValue", "1")
        seg.SetMetaData(f"Segment{n}_Layer", str(n))
        seg.SetMetaData(f"Segment{n}_Tags", f"CMBDetect.id:{identifier}|Segmentation.Status:completed|")
    path = tmp_path / "sub-01.seg.nrrd"
    sitk.WriteImage(seg, str(path))
    instances = read_segmentation_instances(path, review, image)
    assert np.array_equal(instances.array, labels.array)


def test_saved_review_export_checks_the_image_checksum(tmp_path):
    review_path = save_case(tmp_path / "reviews")
    data = json.loads(review_path.read_text())
    data["image"]["sha256"] = "f" * 64
    review_path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="sha256"):
        export_saved_review(review_path, tmp_path / "ds")


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "CMBDetectLib", "export", *args],
                            cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_cli_export_and_report(tmp_path):
    first = save_case(tmp_path / "reviews", "sub-01")
    second = save_case(tmp_path / "reviews", "sub-02", decisions={1: "accepted", 4: "pending"})
    process = _cli(str(first), str(second), "--dataset", str(tmp_path / "ds"), "--reviewer", "asmith")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1   # sub-02 has a pending candidate ...
    assert "pending" in err and "sub-01: added" in out
    assert load_dataset(tmp_path / "ds").counts()["cases"] == 1   # ... and sub-01 is exported anyway
    process = _cli(str(second), "--dataset", str(tmp_path / "ds"), "--allow-pending", "--progress", "json")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    result = [json.loads(line) for line in out.splitlines() if '"result"' in line][0]
    assert result["case"] == "sub-02" and result["cmbs"] == 1 and result["warnings"]
    saved = json.loads((tmp_path / "ds" / case_paths("sub-01").review).read_text())
    assert saved["reviewer"] == "asmith"


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the export to reach the expected step")
        time.sleep(0.02)


@pytest.mark.parametrize("phase", ["staging", "applying"])
def test_an_export_killed_half_way_leaves_the_previous_dataset(tmp_path, phase):
    root = tmp_path / "ds"
    export_case(root, *make_case())
    export_case(root, *make_case("other", subject="s2"))
    before = snapshot(root)
    review_path = save_case(tmp_path / "reviews", "sub-01", decisions={1: "rejected", 2: "rejected",
                                                                      ADDED: "added"}, seed=5)
    process = _cli(str(review_path), "--dataset", str(root), "--progress", "none",
                   env={STEP_DELAY_ENV: "0.3"})
    try:
        if phase == "staging":
            # killed after the first staged file: the dataset itself was never touched
            _wait_for(lambda: any(p.is_file() for t in pending_transactions(root)
                                  for p in t.rglob("*.nii.gz")))
        else:
            # killed after the journal and at least one file moved into place
            _wait_for(lambda: any((t / "old").is_dir() for t in pending_transactions(root)))
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert pending_transactions(root)
    if phase == "applying":
        assert snapshot(root) != before   # the kill really happened in the middle of the replacement
        assert any("interrupted export" in p for p in validate_dataset(root, check_voxels=False))
    assert recover_interrupted_exports(root) == 1
    assert snapshot(root) == before
    assert validate_dataset(root) == []
    # and the next export goes through on the recovered dataset
    export_saved_review(review_path, root)
    assert validate_dataset(root) == []
    assert set(np.unique(read(root / case_paths("sub-01").instances))) == {0, ADDED}


def test_two_exports_at_once_keep_both_cases(tmp_path):
    root = tmp_path / "ds"
    reviews = [save_case(tmp_path / "reviews", f"sub-{n}") for n in (1, 2)]
    # slow steps make the two processes overlap; the lock serialises their read-modify-write
    processes = [_cli(str(r), "--dataset", str(root), "--progress", "none", env={STEP_DELAY_ENV: "0.05"})
                 for r in reviews]
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    description = json.loads((root / "dataset.json").read_text())
    assert description["cmbdetect"]["cases"] == ["sub-1", "sub-2"] and description["numTraining"] == 2
    assert len((root / "cmbdetect" / "history.jsonl").read_text().splitlines()) == 2
    assert validate_dataset(root) == []
