"""Read and check an exported training dataset (nnU-Net v2 raw layout + CMBDetect extras).

Layout (DESIGN.md, "Exported training dataset")::

    DATASET/dataset.json                       nnU-Net v2 description (+ a "cmbdetect" section)
    DATASET/imagesTr/<case>_0000.nii.gz        image
    DATASET/labelsTr/<case>.nii.gz             binary CMB label (uint8)
    DATASET/cmbdetect/instances/<case>.nii.gz  instance labels (uint16, k = CMB k)
    DATASET/cmbdetect/reviews/<case>.json      every decision (schema cmbdetect.review/1)
    DATASET/cmbdetect/history.jsonl            one line per export (append-only log)

This module only reads. Writing (with the dataset lock and atomic per-case replacement) is
:mod:`CMBDetectLib.dataset_export`; a reader that finds an interrupted export rolls it back first so that it
never sees a half-replaced case.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from CMBDetectLib.model_package import sha256_file

DATASET_JSON = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
EXTRA_DIR = "cmbdetect"
INSTANCES_DIR = f"{EXTRA_DIR}/instances"
REVIEWS_DIR = f"{EXTRA_DIR}/reviews"
HISTORY_FILE = f"{EXTRA_DIR}/history.jsonl"
FILE_ENDING = ".nii.gz"
DATASET_SCHEMA = "cmbdetect.dataset/1"
REVIEW_SCHEMA = "cmbdetect.review/1"
# Decisions whose voxels are CMB labels; "synthetic" comes from generated datasets (ARCHITECTURE.md).
LABEL_DECISIONS = ("accepted", "added", "synthetic", "pseudo")
NEGATIVE_DECISIONS = ("rejected",)
KNOWN_DECISIONS = LABEL_DECISIONS + NEGATIVE_DECISIONS + ("pending",)


@dataclass(frozen=True)
class CasePaths:
    """The four files of one case, relative to the dataset root."""

    image: str
    label: str
    instances: str
    review: str

    def all(self) -> tuple[str, str, str, str]:
        return (self.image, self.label, self.instances, self.review)


def case_paths(case: str) -> CasePaths:
    return CasePaths(image=f"{IMAGES_DIR}/{case}_0000{FILE_ENDING}",
                     label=f"{LABELS_DIR}/{case}{FILE_ENDING}",
                     instances=f"{INSTANCES_DIR}/{case}{FILE_ENDING}",
                     review=f"{REVIEWS_DIR}/{case}.json")


@dataclass
class DatasetCase:
    """One case as the dataset view and the trainers see it."""

    case: str
    subject: str
    modality: str
    source: str
    n_cmbs: int
    n_hard_negatives: int
    n_pending: int
    reviewer: str | None
    review_time: str | None
    model: dict
    root: Path
    review: dict = field(repr=False, default_factory=dict)

    @property
    def paths(self) -> CasePaths:
        return case_paths(self.case)

    def path(self, kind: str) -> Path:
        """Absolute path of ``kind`` in ("image", "label", "instances", "review")."""
        return self.root / getattr(self.paths, kind)

    @property
    def hard_negatives(self) -> list[dict]:
        return list(self.review.get("hard_negatives", []))


@dataclass
class Dataset:
    root: Path
    description: dict
    cases: list[DatasetCase]

    @property
    def modality(self) -> str | None:
        return dataset_modality(self.description)

    def counts(self) -> dict:
        return {"cases": len(self.cases), "subjects": len({c.subject for c in self.cases}),
                "cmbs": sum(c.n_cmbs for c in self.cases),
                "hard_negatives": sum(c.n_hard_negatives for c in self.cases),
                "pending": sum(c.n_pending for c in self.cases)}


def _decision_counts(review: dict) -> tuple[int, int, int]:
    cmbs = review.get("cmbs", [])
    positives = sum(1 for c in cmbs if c.get("decision") in LABEL_DECISIONS)
    pending = sum(1 for c in cmbs if c.get("decision") == "pending")
    return positives, len(hard_negative_records(review)), pending


def hard_negative_records(review: dict) -> list[dict]:
    """Rejected candidates plus listed hard negatives (mimics in synthetic data), each id once."""
    records = list(review.get("hard_negatives", []))
    seen = {r.get("id") for r in records if r.get("id") is not None}
    for cmb in review.get("cmbs", []):
        if cmb.get("decision") in NEGATIVE_DECISIONS and cmb.get("id") not in seen:
            records.append({"id": cmb.get("id"), "centroid_ras": cmb.get("centroid_ras"), "kind": "rejected"})
    return records


MIXED_MODALITY = "mixed"     # a dataset whose cases each record their own modality (``cmbdetect synth``)


def dataset_modality(description: dict) -> str | None:
    """The dataset's modality code (``swi`` / ``t2s`` / ``qsm``)."""
    return description.get("cmbdetect", {}).get("modality") or description.get("channel_names", {}).get("0")


def read_description(root: str | os.PathLike) -> dict:
    path = Path(root) / DATASET_JSON
    return json.loads(path.read_text(encoding="utf-8"))


def case_names(root: str | os.PathLike) -> list[str]:
    """Case names: from ``dataset.json`` (the CMBDetect section), else from the label files."""
    root = Path(root)
    try:
        listed = read_description(root).get("cmbdetect", {}).get("cases")
    except (OSError, ValueError):
        listed = None
    if isinstance(listed, list):
        return sorted(str(c) for c in listed)
    labels = root / LABELS_DIR
    if not labels.is_dir():
        return []
    return sorted(p.name[: -len(FILE_ENDING)] for p in labels.iterdir()
                  if p.name.endswith(FILE_ENDING) and not p.name.startswith("."))


def load_dataset(root: str | os.PathLike, recover: bool = True) -> Dataset:
    """Read ``dataset.json`` and every case's review (no image is loaded).

    ``recover`` first rolls back an export that was killed half-way (see ``dataset_export``).
    """
    root = Path(root)
    if recover:
        from CMBDetectLib.dataset_export import recover_interrupted_exports

        recover_interrupted_exports(root)
    if not (root / DATASET_JSON).is_file():
        from CMBDetectLib.errors import InputError

        raise InputError(f"{root} is not a CMBDetect dataset (no {DATASET_JSON})")
    description = read_description(root)
    cases = []
    for name in case_names(root):
        review_path = root / case_paths(name).review
        try:
            review = json.loads(review_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            review = {}
        positives, negatives, pending = _decision_counts(review)
        cases.append(DatasetCase(
            case=name, subject=str(review.get("subject") or name),
            modality=str(review.get("modality") or description.get("cmbdetect", {}).get("modality") or ""),
            source=str(review.get("source") or ""), n_cmbs=positives, n_hard_negatives=negatives,
            n_pending=pending, reviewer=review.get("reviewer"), review_time=review.get("time"),
            model=dict(review.get("model") or {}), root=root, review=review))
    return Dataset(root, description, cases)


# ------------------------------------------------------------------------------------------ validation
def _read_header(path: Path):
    import SimpleITK as sitk  # noqa: N813 - the name every SimpleITK user knows

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _same_geometry(a, b, tolerance: float = 1e-4) -> bool:
    return (tuple(a.GetSize()) == tuple(b.GetSize())
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tolerance, atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=tolerance, atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def _validate_case(root: Path, name: str, modality: str | None, check_voxels: bool) -> list[str]:
    import SimpleITK as sitk  # noqa: N813 - the name every SimpleITK user knows

    problems: list[str] = []
    paths = case_paths(name)
    for relative in paths.all():
        if not (root / relative).is_file():
            problems.append(f"{name}: {relative} is missing")
    if problems:
        return problems
    try:
        review = json.loads((root / paths.review).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return [f"{name}: {paths.review} is not valid JSON ({error})"]
    if review.get("schema") != REVIEW_SCHEMA:
        problems.append(f"{name}: review schema is {review.get('schema')!r}, expected {REVIEW_SCHEMA!r}")
    if review.get("case") not in (None, name):
        problems.append(f"{name}: review names case {review.get('case')!r}")
    if not review.get("modality"):
        problems.append(f"{name}: modality is not recorded in the review")
    elif modality and modality != MIXED_MODALITY and review.get("modality") != modality:
        problems.append(f"{name}: modality {review.get('modality')!r} differs from the dataset's "
                        f"{modality!r}")
    cmbs = review.get("cmbs", [])
    for cmb in cmbs:
        if cmb.get("decision") not in KNOWN_DECISIONS:
            problems.append(f"{name}: CMB {cmb.get('id')} has unknown decision {cmb.get('decision')!r}")
    try:
        headers = {kind: _read_header(root / getattr(paths, kind))
                   for kind in ("image", "label", "instances")}
    except RuntimeError as error:
        return problems + [f"{name}: unreadable image file ({str(error).strip().splitlines()[-1]})"]
    for kind in ("label", "instances"):
        if not _same_geometry(headers["image"], headers[kind]):
            problems.append(f"{name}: {kind} grid differs from the image grid")
    if not check_voxels or any("grid differs" in p for p in problems):
        return problems
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(root / paths.label)))
    instances = sitk.GetArrayFromImage(sitk.ReadImage(str(root / paths.instances)))
    if label.dtype != np.uint8:
        problems.append(f"{name}: label voxel type is {label.dtype}, expected uint8")
    if not set(np.unique(label).tolist()) <= {0, 1}:
        problems.append(f"{name}: label is not binary (values {np.unique(label).tolist()[:8]})")
    if not np.array_equal(label > 0, instances > 0):
        problems.append(f"{name}: binary label and instance labels disagree")
    present = set(np.unique(instances).tolist()) - {0}
    expected = {int(c["id"]) for c in cmbs if c.get("decision") in LABEL_DECISIONS and "id" in c}
    if present != expected:
        problems.append(f"{name}: instance ids {sorted(present)} do not match the reviewed CMBs "
                        f"{sorted(expected)}")
    return problems


def validate_dataset(root: str | os.PathLike, check_voxels: bool = True) -> list[str]:
    """Every problem found, one sentence each; an empty list means the dataset is usable.

    Checks ``dataset.json`` (nnU-Net v2 keys, ``numTraining``), that every case has its four files on
    one grid, that labels are binary and agree with the instance map and the review's decisions, and
    that no interrupted export is pending. ``check_voxels=False`` skips reading the voxels (fast).
    """
    root = Path(root)
    from CMBDetectLib.dataset_export import pending_transactions

    problems: list[str] = []
    if not root.is_dir():
        return [f"{root} is not a folder"]
    if pending_transactions(root):
        problems.append("an interrupted export is pending; load the dataset or export again to roll it "
                        "back")
    try:
        description = read_description(root)
    except FileNotFoundError:
        return problems + [f"{DATASET_JSON} is missing"]
    except (OSError, ValueError) as error:
        return problems + [f"{DATASET_JSON} is not valid JSON ({error})"]
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in description:
            problems.append(f"{DATASET_JSON} has no '{key}'")
    if description.get("file_ending", FILE_ENDING) != FILE_ENDING:
        problems.append(f"{DATASET_JSON}: file_ending must be {FILE_ENDING!r}")
    labels = description.get("labels", {})
    if labels and (labels.get("background") != 0 or labels.get("cmb") != 1):
        problems.append(f"{DATASET_JSON}: labels must be {{'background': 0, 'cmb': 1}}, got {labels}")
    names = case_names(root)
    if "numTraining" in description and description["numTraining"] != len(names):
        problems.append(f"{DATASET_JSON}: numTraining is {description['numTraining']} but "
                        f"{len(names)} cases are listed")
    if len(set(names)) != len(names):
        problems.append(f"{DATASET_JSON}: a case is listed twice")
    on_disk = sorted(p.name[: -len(FILE_ENDING)] for p in (root / LABELS_DIR).glob(f"*{FILE_ENDING}")
                     if not p.name.startswith(".")) if (root / LABELS_DIR).is_dir() else []
    for extra in sorted(set(on_disk) - set(names)):
        problems.append(f"{extra}: {LABELS_DIR}/{extra}{FILE_ENDING} is not listed in {DATASET_JSON}")
    modality = dataset_modality(description)
    for name in names:
        problems.extend(_validate_case(root, name, modality, check_voxels))
    return problems


# ------------------------------------------------------------------------------------------ split
def _subject_rank(subject: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_by_subject(cases: list, validation_fraction: float = 0.2,
                     seed: int = 0) -> tuple[list, list]:
    """Deterministic train / validation split that never puts one subject on both sides.

    A subject goes to validation when the hash of ``(seed, subject)`` falls below ``validation_fraction``,
    so the assignment of a subject does not depend on the order of the cases nor (except for the
    fallbacks below) on which other subjects exist: adding a case never moves an old subject across.
    With two or more subjects and a positive fraction both sides get at least one subject.
    ``cases`` are :class:`DatasetCase` objects or anything with a ``subject`` attribute or key.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")

    def subject_of(case) -> str:
        return str(case["subject"] if isinstance(case, dict) else case.subject)

    subjects = sorted({subject_of(c) for c in cases}, key=lambda s: (_subject_rank(s, seed), s))
    validation = {s for s in subjects if _subject_rank(s, seed) < validation_fraction}
    if validation_fraction > 0 and len(subjects) >= 2:
        if not validation:
            validation = {subjects[0]}
        if len(validation) == len(subjects):
            validation.discard(subjects[-1])
    train = [c for c in cases if subject_of(c) not in validation]
    valid = [c for c in cases if subject_of(c) in validation]
    return train, valid


# ------------------------------------------------------------------------------------------ fingerprint
def dataset_fingerprint(root: str | os.PathLike, cases: list[str] | None = None) -> str:
    """sha256 over the sorted case files and their sha256 (``dataset.json`` and history excluded).

    Two datasets with the same cases and the same files have the same fingerprint wherever they live;
    any changed voxel or decision changes it. ``cases`` restricts it to a subset (e.g. a training split).
    """
    root = Path(root)
    names = sorted(cases if cases is not None else case_names(root))
    digest = hashlib.sha256()
    for name in names:
        for relative in case_paths(name).all():
            path = root / relative
            file_hash = sha256_file(path) if path.is_file() else "missing"
            digest.update(f"{relative}\t{file_hash}\n".encode())
    return digest.hexdigest()
