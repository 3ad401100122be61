"""Reading a dataset: the validator finds real problems, the split is deterministic and by subject, the
fingerprint follows the content."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from test_dataset_export import make_case

from CMBDetectLib.dataset import (
    case_paths,
    dataset_fingerprint,
    load_dataset,
    split_by_subject,
    validate_dataset,
)
from CMBDetectLib.dataset_export import export_case


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "ds"
    for n, subject in enumerate(["s1", "s1", "s2"]):
        export_case(root, *make_case(f"case-{n}", subject=subject, seed=n))
    return root


def test_dataset_view_counts(dataset):
    loaded = load_dataset(dataset)
    assert [c.case for c in loaded.cases] == ["case-0", "case-1", "case-2"]
    assert [c.subject for c in loaded.cases] == ["s1", "s1", "s2"]
    assert loaded.counts() == {"cases": 3, "subjects": 2, "cmbs": 6, "hard_negatives": 3, "pending": 0}
    case = loaded.cases[0]
    assert case.modality == "swi" and case.reviewer == "jdoe" and case.model["version"] == "1.0.0"
    assert case.path("image").is_file() and case.hard_negatives[0]["id"] == 2
    assert loaded.modality == "swi"


def _rewrite(path, array):
    reference = sitk.ReadImage(str(path))
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path), True)


@pytest.mark.parametrize("damage, expected", [
    ("missing_label", "is missing"),
    ("non_binary", "not binary"),
    ("grid", "grid differs"),
    ("num_training", "numTraining"),
    ("instance_mismatch", "disagree"),
    ("decision_mismatch", "do not match the reviewed CMBs"),
    ("unlisted", "not listed"),
    ("no_modality", "modality is not recorded"),
    ("bad_labels", "labels must be"),
])
def test_validator_reports_each_problem(dataset, damage, expected):
    assert validate_dataset(dataset) == []
    paths = case_paths("case-1")
    if damage == "missing_label":
        (dataset / paths.label).unlink()
    elif damage == "non_binary":
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / paths.label)))
        _rewrite(dataset / paths.label, (label * 2).astype(np.uint8))
    elif damage == "grid":
        image = sitk.ReadImage(str(dataset / paths.label))
        image.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(image, str(dataset / paths.label), True)
    elif damage == "num_training":
        description = json.loads((dataset / "dataset.json").read_text())
        description["numTraining"] = 5
        (dataset / "dataset.json").write_text(json.dumps(description))
    elif damage == "instance_mismatch":
        instances = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / paths.instances)))
        instances[0, 0, 0] = 1
        _rewrite(dataset / paths.instances, instances)
    elif damage == "decision_mismatch":
        review = json.loads((dataset / paths.review).read_text())
        review["cmbs"][0]["decision"] = "rejected"
        (dataset / paths.review).write_text(json.dumps(review))
    elif damage == "unlisted":
        shutil.copy(dataset / paths.label, dataset / "labelsTr" / "stray.nii.gz")
    elif damage == "no_modality":
        review = json.loads((dataset / paths.review).read_text())
        del review["modality"]
        (dataset / paths.review).write_text(json.dumps(review))
    elif damage == "bad_labels":
        description = json.loads((dataset / "dataset.json").read_text())
        description["labels"] = {"background": 0, "CMB": 2}
        (dataset / "dataset.json").write_text(json.dumps(description))
    problems = validate_dataset(dataset)
    assert problems and any(expected in p for p in problems), problems


def test_validator_on_a_folder_that_is_no_dataset(tmp_path):
    assert validate_dataset(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'} is not a folder"]
    assert validate_dataset(tmp_path) == ["dataset.json is missing"]


def test_split_is_deterministic_and_by_subject():
    cases = [{"case": f"c{n}", "subject": f"s{n // 3}"} for n in range(60)]   # 20 subjects, 3 cases each
    train, valid = split_by_subject(cases, 0.25, seed=7)
    assert {c["subject"] for c in train}.isdisjoint({c["subject"] for c in valid})
    assert len(train) + len(valid) == 60 and 2 <= len({c["subject"] for c in valid}) <= 10
    # the same answer whatever the order of the cases
    shuffled = list(reversed(cases))
    train2, valid2 = split_by_subject(shuffled, 0.25, seed=7)
    assert sorted(c["case"] for c in valid2) == sorted(c["case"] for c in valid)
    # adding subjects never moves an old subject across
    more = cases + [{"case": f"x{n}", "subject": f"new{n}"} for n in range(10)]
    _, valid3 = split_by_subject(more, 0.25, seed=7)
    old = {c["subject"] for c in valid3} & {c["subject"] for c in cases}
    assert old == {c["subject"] for c in valid}
    # another seed gives another split
    assert {c["case"] for c in split_by_subject(cases, 0.25, seed=8)[1]} != {c["case"] for c in valid}


def test_split_keeps_both_sides_non_empty():
    two = [{"subject": "a"}, {"subject": "b"}]
    for seed in range(20):
        train, valid = split_by_subject(two, 0.5, seed)
        assert len(train) == 1 and len(valid) == 1
        train, valid = split_by_subject(two, 0.01, seed)
        assert len(train) == 1 and len(valid) == 1
    assert split_by_subject([{"subject": "a"}] * 3, 0.5, 0) == ([{"subject": "a"}] * 3, [])
    assert split_by_subject(two, 0.0, 0) == (two, [])
    with pytest.raises(ValueError):
        split_by_subject(two, 1.0, 0)


def test_split_of_dataset_cases(dataset):
    train, valid = split_by_subject(load_dataset(dataset).cases, 0.5, seed=0)
    assert {c.subject for c in train} | {c.subject for c in valid} == {"s1", "s2"}
    assert len({c.subject for c in valid}) == 1


def test_fingerprint_follows_the_content(dataset, tmp_path):
    first = dataset_fingerprint(dataset)
    assert first == dataset_fingerprint(dataset) and len(first) == 64
    # the same files elsewhere give the same fingerprint; dataset.json / history do not count
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    (copy / "cmbdetect" / "history.jsonl").write_text("")
    assert dataset_fingerprint(copy) == first
    assert dataset_fingerprint(dataset, ["case-0", "case-1"]) != first
    review = copy / case_paths("case-2").review
    data = json.loads(review.read_text())
    data["cmbs"][0]["decision"] = "rejected"
    review.write_text(json.dumps(data))
    assert dataset_fingerprint(copy) != first
