"""Export reviewed cases into a training dataset (layout in :mod:`CMBDetectLib.dataset`).

Accepted and added CMBs become labels; rejected candidates are recorded as hard negatives for the
student. Before anything is written the case is checked: image and labels on one grid, no pending
candidate (unless ``allow_pending``, which is reported as a warning), modality recorded, every labelled
CMB has voxels and every labelled voxel a decision.

Safety of the dataset on disk:

* **One writer at a time.** Every export holds an OS file lock on ``DATASET/.cmbdetect.lock``
  (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows). The OS releases it when the process dies,
  so a killed export never leaves a stale lock behind. ``dataset.json`` is read and rewritten under the
  lock, so two exports at once cannot lose each other's case.
* **All or nothing per case.** A case touches six files in four folders (image, label, instances, review,
  ``dataset.json``, history), which no single rename can replace. The new files are first written
  completely into a transaction folder ``DATASET/.cmbdetect-txn/<id>/new/``; a journal then lists them;
  each old file is moved to ``old/`` and the new one moved into place (``os.replace``, same file system);
  finally the journal is marked done and the transaction folder removed. If the process dies before
  "done", the next export or reader rolls the transaction back from ``old/``: the previous dataset comes
  back byte for byte. A re-exported case keeps its file names, so it replaces and never duplicates.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk  # noqa: N813 - the name every SimpleITK user knows

from CMBDetectLib import __version__
from CMBDetectLib.dataset import (
    DATASET_JSON,
    DATASET_SCHEMA,
    FILE_ENDING,
    HISTORY_FILE,
    LABEL_DECISIONS,
    NEGATIVE_DECISIONS,
    REVIEW_SCHEMA,
    case_paths,
    dataset_modality,
)
from CMBDetectLib.errors import InputError
from CMBDetectLib.file_lock import FileLock
from CMBDetectLib.model_package import sha256_file
from CMBDetectLib.progress import ProgressCallback, no_progress
from CMBDetectLib.validation import normalise_modality
from CMBDetectLib.volume import Volume, read_sitk, volume_from_sitk, volume_to_sitk

LOCK_FILE = ".cmbdetect.lock"
TRANSACTIONS_DIR = ".cmbdetect-txn"
JOURNAL = "journal.json"
JOURNAL_SCHEMA = "cmbdetect.export-transaction/1"
# Test hook: seconds to sleep before each file step, so that a test can kill an export half-way.
STEP_DELAY_ENV = "CMBDETECT_EXPORT_STEP_DELAY"
# Saved-review label files looked for next to ``<case>.review.json``, in this order.
LABEL_SUFFIXES = (".seg.nrrd", ".instances.nii.gz", "_cmb.nii.gz", ".labels.nii.gz", ".nii.gz")
# Segment tags that may carry the review id (the MRML layer's choice, and spellings seen in the wild).
ID_TAGS = ("cmbdetect.id", "cmbdetect_id", "cmbdetect.candidate_id", "cmbdetect.candidateid")
_SEGMENT_NUMBER = re.compile(r"(?:CMB|cmb)[ _-]?(\d+)$")


@dataclass
class ExportResult:
    """What one exported case became."""

    case: str
    dataset: Path
    replaced: bool
    n_cmbs: int
    n_hard_negatives: int
    n_pending: int
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verb = "replaced" if self.replaced else "added"
        text = (f"{self.case}: {verb} in {self.dataset} ({self.n_cmbs} CMBs, "
                f"{self.n_hard_negatives} hard negatives)")
        return text + "".join(f"\n  warning: {w}" for w in self.warnings)


@dataclass
class PreparedCase:
    """A checked case, ready to be written (arrays and JSON built, nothing on disk yet)."""

    case: str
    modality: str
    image: Volume
    instances: Volume
    review: dict
    warnings: list[str]


# ============================================================================================ locking
class DatasetLock(FileLock):
    """Exclusive lock on a dataset folder, held while it is modified (an OS lock: never stale)."""

    def __init__(self, root: str | os.PathLike, timeout_s: float = 120.0):
        self.root = Path(root)
        super().__init__(self.root / LOCK_FILE, timeout_s, busy_error=lambda: InputError(
            f"the dataset {self.root} is busy (another export has held it for {timeout_s:.0f} s); "
            "try again later"))


# ============================================================================================ transactions
def pending_transactions(root: str | os.PathLike) -> list[Path]:
    """Transaction folders left by exports that did not finish (empty when the dataset is consistent)."""
    folder = Path(root) / TRANSACTIONS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir())


def recover_interrupted_exports(root: str | os.PathLike) -> int:
    """Roll back every export that died half-way; returns how many there were.

    Cheap when there is nothing to do (no lock taken). Otherwise waits for the lock: a live export holds
    it until its transaction folder is gone, so what is left after acquiring it belongs to a dead process.
    """
    root = Path(root)
    if not pending_transactions(root):
        return 0
    with DatasetLock(root):
        return _recover_locked(root)


def _recover_locked(root: Path) -> int:
    recovered = 0
    for transaction in pending_transactions(root):
        journal_path = transaction / JOURNAL
        journal = None
        if journal_path.is_file():
            try:
                journal = json.loads(journal_path.read_text(encoding="utf-8"))
            except ValueError:
                journal = None  # the journal is written atomically; unreadable means never committed
        if journal and journal.get("state") == "applying":
            _roll_back(root, transaction, journal)
            recovered += 1
        elif journal is None:
            recovered += 1  # died while staging: the dataset was never touched
        shutil.rmtree(transaction, ignore_errors=True)
    folder = root / TRANSACTIONS_DIR
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return recovered


def _roll_back(root: Path, transaction: Path, journal: dict) -> None:
    # Reverse order mirrors the apply order; each step is idempotent, so a crash here is recovered too.
    for entry in reversed(journal["files"]):
        relative = entry["path"]
        destination = root / relative
        backup = transaction / "old" / relative
        if entry["existed"]:
            if backup.exists():
                os.replace(backup, destination)
        else:
            destination.unlink(missing_ok=True)


def _step_delay() -> None:
    delay = os.environ.get(STEP_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def _write_json_file(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(json.dumps(data, indent=2) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def _commit(root: Path, staged: dict[str, Any], case: str, progress: ProgressCallback) -> None:
    """Write ``staged`` (relative path -> sitk.Image | dict | str) as one transaction. Lock must be held."""
    transaction = root / TRANSACTIONS_DIR / f"{case}-{uuid.uuid4().hex[:12]}"
    new = transaction / "new"
    try:
        # 1. Stage every file completely; the dataset is not touched yet.
        for index, (relative, content) in enumerate(staged.items()):
            _step_delay()
            target = new / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, sitk.Image):
                sitk.WriteImage(content, str(target), True)
            elif isinstance(content, str):
                target.write_text(content, encoding="utf-8")
            else:
                _write_json_file(target, content)
            progress(0.1 + 0.6 * (index + 1) / len(staged), f"{case}: staged {relative}")
        # 2. Commit point: from here on a crash is rolled back from the journal.
        files = [{"path": relative, "existed": (root / relative).exists()} for relative in staged]
        journal = {"schema": JOURNAL_SCHEMA, "case": case, "state": "applying", "files": files,
                   "pid": os.getpid(), "time": _now()}
        _write_json_file(transaction / (JOURNAL + ".tmp"), journal)
        os.replace(transaction / (JOURNAL + ".tmp"), transaction / JOURNAL)
    except BaseException:
        shutil.rmtree(transaction, ignore_errors=True)
        raise
    try:
        # 3. Move old files aside, new files in.
        for index, entry in enumerate(files):
            _step_delay()
            destination = root / entry["path"]
            if entry["existed"]:
                backup = transaction / "old" / entry["path"]
                backup.parent.mkdir(parents=True, exist_ok=True)
                os.replace(destination, backup)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(new / entry["path"], destination)
            progress(0.7 + 0.3 * (index + 1) / len(files), f"{case}: wrote {entry['path']}")
        journal["state"] = "done"
        _write_json_file(transaction / (JOURNAL + ".tmp"), journal)
        os.replace(transaction / (JOURNAL + ".tmp"), transaction / JOURNAL)
    except BaseException:
        # An error we can see (full disk, permission): undo now rather than at the next access.
        _roll_back(root, transaction, journal)
        shutil.rmtree(transaction, ignore_errors=True)
        raise
    shutil.rmtree(transaction, ignore_errors=True)
    folder = root / TRANSACTIONS_DIR
    try:
        folder.rmdir()
    except OSError:
        pass  # another (dead) transaction is still there; recovery removes it


# ============================================================================================ checks
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def safe_case_name(name: str) -> str:
    """A case name every file system and nnU-Net accept: letters, digits, ``.``, ``_`` and ``-``; any other
    run of characters becomes ``_`` (``"Patient 7/SWI"`` -> ``"Patient_7_SWI"``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).strip()).strip("._")
    if not cleaned:
        raise InputError(f"case name {name!r} has no usable character")
    return cleaned


def review_to_dict(review: Any) -> dict:
    """A ``CaseReview`` (``review.py``) or an already-parsed ``cmbdetect.review/1`` dict -> dict copy."""
    if hasattr(review, "to_json_dict"):
        review = review.to_json_dict()
    if not isinstance(review, dict):
        raise InputError(f"expected a review, got {type(review).__name__}")
    if review.get("schema") not in (None, REVIEW_SCHEMA):
        raise InputError(f"review schema is {review.get('schema')!r}, expected {REVIEW_SCHEMA!r}")
    return json.loads(json.dumps(review))  # deep copy, and proof that it is plain JSON


def _centroids(labels: np.ndarray, ids: list[int]) -> dict[int, tuple[np.ndarray, int]]:
    """Centroid ``[k, j, i]`` and voxel count of each id present in ``labels``."""
    from scipy import ndimage

    if not ids:
        return {}
    counts = ndimage.sum_labels(np.ones_like(labels, dtype=np.float64), labels, ids)
    centres = ndimage.center_of_mass(np.ones_like(labels, dtype=np.float64), labels, ids)
    return {i: (np.asarray(c, dtype=float), int(n)) for i, c, n in zip(ids, centres, counts) if n > 0}


def prepare_case(review: Any, image: Volume, instances: Volume, *, allow_pending: bool = False,
                 reviewer: str | None = None, case: str | None = None) -> PreparedCase:
    """Check a reviewed case and build what the dataset stores; raises ``InputError`` on a problem.

    ``instances`` is an instance label map on the image grid in which value k is the voxels of the CMB
    (or candidate) whose review id is k; values of rejected or pending candidates may be present and are
    dropped from the labels.
    """
    data = review_to_dict(review)
    warnings: list[str] = []
    name = safe_case_name(case or data.get("case") or "")
    if not data.get("modality"):
        raise InputError(f"{name}: the modality (swi, t2s or qsm) is not recorded in the review")
    modality = normalise_modality(str(data["modality"]))
    image_array = np.asarray(image.array)
    if image_array.ndim != 3:
        raise InputError(f"{name}: the image is not a 3D volume")
    if not image.same_grid(instances):
        raise InputError(f"{name}: the labels are not on the image grid (image {image.shape_ijk}, "
                         f"spacing {tuple(round(s, 4) for s in image.spacing)}; labels "
                         f"{instances.shape_ijk}, spacing {tuple(round(s, 4) for s in instances.spacing)})")
    recorded_shape = (data.get("image") or {}).get("shape")
    if recorded_shape and [int(v) for v in recorded_shape] != list(image.shape_ijk):
        raise InputError(f"{name}: the image has shape {list(image.shape_ijk)} but the review was made on "
                         f"{list(recorded_shape)}")
    label_array = np.asarray(instances.array)
    if label_array.dtype.kind not in "iub":
        raise InputError(f"{name}: the label map has voxel type {label_array.dtype}; expected integer labels")
    if label_array.size and label_array.min() < 0:
        raise InputError(f"{name}: the label map has negative values")

    cmbs = data.get("cmbs") or []
    decisions: dict[int, str] = {}
    for cmb in cmbs:
        if "id" not in cmb:
            raise InputError(f"{name}: a CMB in the review has no id")
        cmb["decision"] = str(cmb.get("decision", "pending")).strip().lower()
        decisions[int(cmb["id"])] = cmb["decision"]
    unknown = sorted(set(decisions.values()) - set(LABEL_DECISIONS + NEGATIVE_DECISIONS + ("pending",)))
    if unknown:
        raise InputError(f"{name}: unknown decision(s) {unknown} in the review")
    pending = sorted(i for i, d in decisions.items() if d == "pending")
    if pending and not allow_pending:
        raise InputError(f"{name}: {len(pending)} candidate(s) are still pending review "
                         f"(ids {pending[:10]}); review them or export anyway with allow_pending")
    if pending:
        warnings.append(f"{len(pending)} pending candidate(s) exported as unlabelled (neither CMB nor hard "
                        "negative)")

    present = sorted(int(v) for v in np.unique(label_array) if v != 0)
    without_decision = [v for v in present if v not in decisions]
    if without_decision:
        raise InputError(f"{name}: label value(s) {without_decision[:10]} in the segmentation have no "
                         "decision in the review")
    positive_ids = sorted(i for i, d in decisions.items() if d in LABEL_DECISIONS)
    if positive_ids and max(positive_ids) > np.iinfo(np.uint16).max:
        raise InputError(f"{name}: CMB id {max(positive_ids)} does not fit a uint16 instance map")
    empty = [i for i in positive_ids if i not in present]
    if empty:
        raise InputError(f"{name}: CMB(s) {empty[:10]} are marked {decisions[empty[0]]} but have no voxels "
                         "in the segmentation; paint them or reject them")

    lookup = np.zeros(max(present, default=0) + 1, dtype=np.uint16)
    for identifier in positive_ids:
        lookup[identifier] = identifier
    kept = lookup[label_array.astype(np.int64)] if present else np.zeros(label_array.shape, np.uint16)
    output_instances = image.with_array(kept)

    geometry = _centroids(label_array.astype(np.int64), present)
    voxel_mm3 = float(np.prod(image.spacing))

    def locate(record: dict) -> dict:
        identifier = int(record["id"]) if record.get("id") is not None else None
        if identifier is not None and identifier in geometry:
            centre_kji, voxels = geometry[identifier]
            record["centroid_ras"] = [round(float(v), 3) for v in image.index_to_ras(centre_kji)[0]]
            record["volume_voxels"] = voxels
            record["volume_mm3"] = round(voxels * voxel_mm3, 4)
        if record.get("centroid_ras") is not None:
            kji = image.ras_to_index(np.asarray(record["centroid_ras"], dtype=float))[0]
            record["centroid_ijk"] = [round(float(v), 3) for v in kji[::-1]]
        return record

    exported_cmbs = [locate(dict(cmb)) for cmb in cmbs]
    from CMBDetectLib.dataset import hard_negative_records

    hard_negatives = [locate(dict(record)) for record in hard_negative_records(data)]
    parameters = dict(data.get("parameters") or {})
    data.update({
        "schema": REVIEW_SCHEMA, "case": name, "subject": str(data.get("subject") or name),
        "modality": modality, "source": data.get("source") or "review",
        "cmbs": exported_cmbs, "hard_negatives": hard_negatives,
        "thresholds": {k: parameters[k] for k in ("th_det", "th_disc") if k in parameters},
        "model": dict(data.get("model") or {}),
    })
    if reviewer:
        data["reviewer"] = reviewer
    if not data.get("reviewer"):
        data["reviewer"] = getpass.getuser()
        warnings.append(f"no reviewer recorded; using the account name {data['reviewer']!r}")
    if not data.get("time"):
        data["time"] = _now()
    data["export"] = {"time": _now(), "by": getpass.getuser(), "cmbdetect": __version__,
                      "allow_pending": bool(allow_pending), "warnings": list(warnings)}
    if not data["model"]:
        warnings.append("the review records no model version")
    return PreparedCase(name, modality, image, output_instances, data, warnings)


# ============================================================================================ export
def _new_description(modality: str) -> dict:
    return {
        "channel_names": {"0": modality},
        "labels": {"background": 0, "cmb": 1},
        "numTraining": 0,
        "file_ending": FILE_ENDING,
        "name": "CMBDetect reviewed cases",
        "description": "Cerebral microbleeds: reviewed detections exported by CMBDetect",
        "cmbdetect": {"schema": DATASET_SCHEMA, "modality": modality, "cases": []},
    }


def export_prepared(dataset_dir: str | os.PathLike, prepared: PreparedCase,
                    progress: ProgressCallback | None = None, lock_timeout_s: float = 120.0) -> ExportResult:
    """Write a checked case into the dataset as one transaction (replacing an earlier export of it)."""
    root = Path(dataset_dir)
    progress = progress or no_progress
    paths = case_paths(prepared.case)
    image = volume_to_sitk(prepared.image)
    instances = volume_to_sitk(prepared.instances)
    label = volume_to_sitk(prepared.instances.with_array((prepared.instances.array > 0).astype(np.uint8)))
    progress(0.05, f"{prepared.case}: waiting for the dataset lock")
    with DatasetLock(root, lock_timeout_s):
        _recover_locked(root)
        try:
            description = json.loads((root / DATASET_JSON).read_text(encoding="utf-8"))
        except FileNotFoundError:
            description = _new_description(prepared.modality)
        except ValueError as error:
            raise InputError(f"{root / DATASET_JSON} is not valid JSON ({error}); fix or move it") from None
        existing_modality = dataset_modality(description)
        if existing_modality and existing_modality != prepared.modality:
            raise InputError(f"the dataset {root} holds {existing_modality} cases; export "
                             f"{prepared.modality} cases into a separate dataset")
        section = description.setdefault("cmbdetect", {"schema": DATASET_SCHEMA,
                                                       "modality": prepared.modality})
        cases = list(section.get("cases") or [])
        replaced = prepared.case in cases or (root / paths.label).exists()
        if prepared.case not in cases:
            cases.append(prepared.case)
        section["cases"] = sorted(cases)
        section.setdefault("modality", prepared.modality)
        description["numTraining"] = len(section["cases"])

        review_text = json.dumps(prepared.review, indent=2) + "\n"
        counts = {"cmbs": sum(1 for c in prepared.review["cmbs"] if c.get("decision") in LABEL_DECISIONS),
                  "hard_negatives": len(prepared.review["hard_negatives"]),
                  "pending": sum(1 for c in prepared.review["cmbs"] if c.get("decision") == "pending")}
        history_line = {
            "time": _now(), "action": "replaced" if replaced else "added", "case": prepared.case,
            "subject": prepared.review["subject"], "reviewer": prepared.review.get("reviewer"),
            "by": getpass.getuser(), "model": prepared.review.get("model", {}), **counts,
            "review_sha256": hashlib.sha256(review_text.encode()).hexdigest(),
            "warnings": prepared.warnings,
        }
        history_path = root / HISTORY_FILE
        history = history_path.read_text(encoding="utf-8") if history_path.is_file() else ""
        if history and not history.endswith("\n"):
            history += "\n"
        staged: dict[str, Any] = {
            paths.image: image, paths.label: label, paths.instances: instances, paths.review: review_text,
            HISTORY_FILE: history + json.dumps(history_line) + "\n", DATASET_JSON: description,
        }
        _commit(root, staged, prepared.case, progress)
    progress(1.0, f"{prepared.case}: exported")
    return ExportResult(prepared.case, root, replaced, counts["cmbs"], counts["hard_negatives"],
                        counts["pending"], list(prepared.warnings))


def export_case(dataset_dir: str | os.PathLike, review: Any, image: Volume, instances: Volume, *,
                allow_pending: bool = False, reviewer: str | None = None, case: str | None = None,
                progress: ProgressCallback | None = None) -> ExportResult:
    """Check and export one reviewed case (a ``CaseReview`` or its JSON dict + image + instance labels)."""
    prepared = prepare_case(review, image, instances, allow_pending=allow_pending, reviewer=reviewer,
                            case=case)
    return export_prepared(dataset_dir, prepared, progress)


# ============================================================================================ saved reviews
def review_stem(review_path: str | os.PathLike) -> str:
    name = Path(review_path).name
    for suffix in (".review.json", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_labels_for_review(review_path: str | os.PathLike, review: dict | None = None) -> Path:
    """``<case>.seg.nrrd`` (or an instance label map) saved next to ``<case>.review.json``.

    The segmentation file the review names (``files.segmentation``, written by CMBDetect) comes first.
    """
    review_path = Path(review_path)
    named = ((review or {}).get("files") or {}).get("segmentation")
    if named and (review_path.parent / named).is_file():
        return review_path.parent / named
    stem = review_stem(review_path)
    for suffix in LABEL_SUFFIXES:
        candidate = review_path.with_name(stem + suffix)
        if candidate.is_file():
            return candidate
    raise InputError(f"no segmentation found next to {review_path.name} (looked for "
                     + ", ".join(stem + s for s in LABEL_SUFFIXES) + ")")


def _segment_metadata(image: sitk.Image) -> list[dict]:
    """Slicer's per-segment NRRD fields (``SegmentN_ID``, ``_LabelValue``, ``_Layer``, ``_Name``,
    ``_Tags``)."""
    keys = set(image.GetMetaDataKeys())
    segments = []
    index = 0
    while f"Segment{index}_ID" in keys:
        def field_of(suffix: str, default: str = "", n: int = index) -> str:
            key = f"Segment{n}_{suffix}"
            return image.GetMetaData(key) if key in keys else default

        tags = {}
        for item in field_of("Tags").split("|"):
            if ":" in item:
                key, value = item.split(":", 1)
                tags[key] = value
        segments.append({"id": field_of("ID"), "name": field_of("Name"),
                         "label_value": int(field_of("LabelValue", str(index + 1)) or index + 1),
                         "layer": int(field_of("Layer", "0") or 0), "tags": tags})
        index += 1
    return segments


def _cmb_id_of_segment(segment: dict, by_segment_id: dict[str, int]) -> int | None:
    if segment["id"] in by_segment_id:
        return by_segment_id[segment["id"]]
    for key, value in segment["tags"].items():
        if key.lower() in ID_TAGS and value.strip().isdigit():
            return int(value)
    for text in (segment["id"], segment["name"]):
        match = _SEGMENT_NUMBER.search(text.strip())
        if match:
            return int(match.group(1))
    return None


def _resample_onto(layer: sitk.Image, reference: Volume, name: str) -> np.ndarray:
    """Nearest-neighbour copy of a (possibly cropped) label layer onto the image grid, after checking that
    its voxels are the image's voxels (same spacing and axes, whole-voxel offset)."""
    reference_image = volume_to_sitk(Volume(np.zeros((1, 1, 1), np.uint8), reference.spacing,
                                            reference.origin, reference.direction))
    if not (np.allclose(layer.GetSpacing(), reference.spacing, rtol=1e-4, atol=1e-4)
            and np.allclose(layer.GetDirection(), reference.direction, atol=1e-4)):
        raise InputError(f"{name}: the segmentation is not on the image grid (different spacing or axes); "
                         "set the segmentation geometry to the image before saving")
    offset = np.asarray(reference_image.TransformPhysicalPointToContinuousIndex(layer.GetOrigin()))
    if not np.allclose(offset, np.round(offset), atol=1e-3):
        raise InputError(f"{name}: the segmentation grid is shifted by a fraction of a voxel from the image")
    target = volume_to_sitk(reference.with_array(np.zeros(reference.array.shape, np.uint16)))
    resampled = sitk.Resample(sitk.Cast(layer, sitk.sitkUInt16), target, sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return sitk.GetArrayFromImage(resampled)


def read_segmentation_instances(path: str | os.PathLike, review: dict, reference: Volume) -> Volume:
    """A Slicer ``.seg.nrrd`` -> instance label map on ``reference``'s grid (value = the CMB's review id).

    Segments are matched to review entries by ``segment_id``, then by a ``cmbdetect.id`` tag, then by
    a ``CMB <n>`` name. A cropped segmentation (Slicer saves the extent that holds segments) is placed
    back on the image grid; multi-layer files (overlapping segments) are merged.
    """
    path = Path(path)
    image = _read_any_dimension(path)
    segments = _segment_metadata(image)
    name = review_stem(path) if not path.name.endswith(".seg.nrrd") else path.name[: -len(".seg.nrrd")]
    by_segment_id = {str(c["segment_id"]): int(c["id"])
                     for c in review.get("cmbs", []) if c.get("segment_id")}
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        layers = [sitk.VectorIndexSelectionCast(image, n) for n in range(components)]
    elif image.GetDimension() == 4:
        layers = [image[:, :, :, n] for n in range(image.GetSize()[3])]
    else:
        layers = [image]
    output = np.zeros(reference.array.shape, np.uint16)
    if not segments:
        # A plain label map saved as .nrrd: the values are already review ids.
        output = _resample_onto(layers[0], reference, name)
        return reference.with_array(output)
    for layer_index, layer in enumerate(layers):
        array = _resample_onto(layer, reference, name)
        for segment in (s for s in segments if s["layer"] == layer_index):
            identifier = _cmb_id_of_segment(segment, by_segment_id)
            if identifier is None:
                raise InputError(f"{name}: segment {segment['name'] or segment['id']!r} matches no CMB in "
                                 "the review")
            output[array == segment["label_value"]] = identifier
    return reference.with_array(output)


def _read_any_dimension(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"cannot read {path}: {str(error).strip().splitlines()[-1]}") from None


def load_saved_review(review_path: str | os.PathLike) -> dict:
    review_path = Path(review_path)
    try:
        data = json.loads(review_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"review file not found: {review_path}") from None
    except ValueError as error:
        raise InputError(f"{review_path} is not valid JSON ({error})") from None
    # The raw dict is exported (unknown keys and a missing modality must survive), but it is parsed once
    # by review.py so that a malformed entry is reported the same way CMBDetect reports it.
    from CMBDetectLib.review import CaseReview

    CaseReview.from_json_dict(data)
    return review_to_dict(data)


def export_saved_review(review_path: str | os.PathLike, dataset_dir: str | os.PathLike, *,
                        labels_path: str | os.PathLike | None = None,
                        image_path: str | os.PathLike | None = None, allow_pending: bool = False,
                        reviewer: str | None = None,
                        progress: ProgressCallback | None = None) -> ExportResult:
    """Export a review saved on disk (``<case>.review.json`` + ``<case>.seg.nrrd`` or a label map)."""
    review_path = Path(review_path)
    review = load_saved_review(review_path)
    recorded = review.get("image") or {}
    if image_path is None:
        if not recorded.get("path"):
            raise InputError(f"{review_path.name} records no image path; give the image explicitly")
        image_path = Path(recorded["path"])
        if not image_path.is_absolute():
            image_path = review_path.parent / image_path
    image_path = Path(image_path)
    if not image_path.is_file():
        raise InputError(f"the reviewed image {image_path} is not there; give its new location")
    if recorded.get("sha256") and sha256_file(image_path) != recorded["sha256"]:
        raise InputError(f"{image_path} is not the image that was reviewed (sha256 differs from the review)")
    image = volume_from_sitk(read_sitk(image_path))
    labels_path = Path(labels_path) if labels_path else find_labels_for_review(review_path, review)
    if labels_path.name.endswith(".seg.nrrd"):
        instances = read_segmentation_instances(labels_path, review, image)
    else:
        instances = volume_from_sitk(read_sitk(labels_path))
    review.setdefault("case", review_stem(review_path))
    return export_case(dataset_dir, review, image, instances, allow_pending=allow_pending, reviewer=reviewer,
                       progress=progress)


# ============================================================================================ scene reviews
def review_session_case(session: Any) -> tuple[dict, Volume, Volume]:
    """Review dict, image and instance label map of a CMBDetect ``mrml.ReviewSession`` in the scene.

    Edits made in Slicer (Segment Editor shapes, statuses, painted segments) are picked up first. Each
    segment's voxels are taken on the image grid whatever layer or extent Slicer keeps them in.
    """
    from CMBDetectLib.mrml import geometry, segments

    session.sync_from_scene()
    image = geometry.volume_from_node(session.volume_node)
    ijk_to_ras = geometry.node_ijk_to_ras(session.volume_node)
    shape = image.array.shape
    instances = np.zeros(shape, np.uint16)
    segmentation = session.segmentation_node.GetSegmentation()
    # CMBs last, so that where a rejected candidate overlaps a CMB the voxel stays a CMB.
    ordered = sorted(session.review.cmbs,
                     key=lambda c: getattr(c.decision, "value", c.decision) in LABEL_DECISIONS)
    for entry in ordered:
        segment = segmentation.GetSegment(entry.segment_id)
        if segment is None:
            continue
        flat = segments.segment_flat_indices(segment, ijk_to_ras, shape)
        instances.reshape(-1)[flat] = entry.id
    return session.review.to_json_dict(), image, image.with_array(instances)


def export_review_session(dataset_dir: str | os.PathLike, session: Any, *, allow_pending: bool = False,
                          reviewer: str | None = None, case: str | None = None,
                          progress: ProgressCallback | None = None) -> ExportResult:
    """Export the case reviewed in the scene (what the CMBDetectTraining panel's Export button does)."""
    review, image, instances = review_session_case(session)
    return export_case(dataset_dir, review, image, instances, allow_pending=allow_pending, reviewer=reviewer,
                       case=case, progress=progress)
