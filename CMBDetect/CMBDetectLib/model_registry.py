"""Model versions: register retrained packages, list them, remember which one is in use.

A retrained model is always a **new** folder ``<name>-<version>`` in :func:`user_models_dir`, with its
provenance in ``model.json`` (parent name / version / sha256, dataset fingerprint, metrics before and
after, date). Nothing is ever overwritten: the version number is the next free minor version of the
parent's major (``1.0.0`` -> ``1.1.0``, or ``1.2.0`` if ``1.1.0`` exists). Which model the user works
with is a small JSON file (``settings.json`` in the user model folder) so that going back to an earlier
version is one call (:func:`select_model` or :func:`select_previous`). A package whose files fail their
sha256 check is refused everywhere (register, select, load).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from CMBDetectLib.errors import ModelError
from CMBDetectLib.file_lock import FileLock
from CMBDetectLib.model_package import (
    ModelPackage,
    bundled_models_dir,
    list_model_dirs,
    resolve_model,
    user_models_dir,
)
from CMBDetectLib.volume import atomic_write_text

SETTINGS_FILE = "settings.json"
SETTINGS_SCHEMA = "cmbdetect.model-settings/1"
REGISTRY_LOCK = ".registry.lock"
_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ============================================================================================ versions
@dataclass
class ModelVersion:
    """One installed package as the version list shows it."""

    name: str
    version: str
    path: Path
    source: str                   # "bundled" or "user"
    created: str = ""
    parent: dict | None = None
    dataset_fingerprint: str | None = None
    metrics: dict = field(default_factory=dict)
    selected: bool = False
    problem: str | None = None    # set when verified and the package fails its checks

    @property
    def label(self) -> str:
        return f"{self.name}-{self.version}"

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "path": str(self.path), "source": self.source,
                "created": self.created, "parent": self.parent,
                "dataset_fingerprint": self.dataset_fingerprint, "metrics": self.metrics,
                "selected": self.selected, "problem": self.problem}


def parse_version(version: str) -> tuple[int, int, int]:
    match = _VERSION.match(str(version).strip())
    if not match:
        raise ModelError(f"model version {version!r} is not of the form MAJOR.MINOR[.PATCH]")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def next_version(parent_version: str, taken: set[str] | list[str]) -> str:
    """Next free ``MAJOR.(MINOR+k).0`` after the parent's version (never one already used)."""
    major, minor, _ = parse_version(parent_version)
    used = set()
    for version in taken:
        try:
            used.add(parse_version(version))
        except ModelError:
            continue
    minor += 1
    while (major, minor, 0) in used:
        minor += 1
    return f"{major}.{minor}.0"


def _manifest(path: Path) -> dict:
    return json.loads((path / "model.json").read_text(encoding="utf-8"))


def _is_user_path(path: Path) -> bool:
    try:
        path.resolve().relative_to(user_models_dir().resolve())
        return True
    except ValueError:
        return False


def list_versions(verify: bool = False) -> list[ModelVersion]:
    """Every installed package, bundled then user, oldest version first within a name.

    ``verify`` checks every weight file's sha256 (slower); a failing one gets ``problem`` set.
    """
    selected = selected_model_path()
    versions = []
    for path in list_model_dirs():
        try:
            manifest = _manifest(path)
        except (OSError, ValueError) as error:
            versions.append(ModelVersion(path.name, "?", path, "user" if _is_user_path(path) else "bundled",
                                         problem=f"unreadable model.json ({error})"))
            continue
        training = manifest.get("training") or {}
        entry = ModelVersion(
            name=str(manifest.get("name", path.name)), version=str(manifest.get("version", "?")), path=path,
            source="user" if _is_user_path(path) else "bundled", created=str(manifest.get("created", "")),
            parent=manifest.get("parent") or training.get("parent"),
            dataset_fingerprint=(training.get("dataset") or {}).get("fingerprint"),
            metrics=dict(manifest.get("metrics") or {}),
            selected=selected is not None and path.resolve() == selected.resolve())
        if verify:
            entry.problem = model_problem(path)
        versions.append(entry)

    def order(entry: ModelVersion) -> tuple:
        try:
            return (entry.source != "bundled", entry.name, parse_version(entry.version))
        except ModelError:
            return (entry.source != "bundled", entry.name, (0, 0, 0))

    return sorted(versions, key=order)


def model_problem(name_or_dir: str | os.PathLike) -> str | None:
    """``None`` if the package loads and every file passes its sha256 check, else the reason."""
    try:
        ModelPackage.load(name_or_dir)
    except ModelError as error:
        return str(error)
    return None


def verify_model(name_or_dir: str | os.PathLike) -> ModelPackage:
    """Load with every check (raises ``ModelError`` for a missing, incomplete or corrupted package)."""
    return ModelPackage.load(name_or_dir)


# ============================================================================================ registering
def _registry_lock(folder: Path) -> FileLock:
    """Serialises version allocation in the user folder (two trainings finishing at once)."""
    return FileLock(folder / REGISTRY_LOCK, 60.0,
                    busy_error=lambda: ModelError(f"the model folder {folder} is busy; try again"))


def _taken_versions(name: str, folder: Path) -> set[str]:
    taken = set()
    for path in list_model_dirs():
        try:
            manifest = _manifest(path)
        except (OSError, ValueError):
            continue
        if manifest.get("name") == name:
            taken.add(str(manifest.get("version")))
    # Folders count even without a readable model.json: a version number is never reused.
    prefix = f"{name}-"
    for root in (folder, bundled_models_dir()):
        if root.is_dir():
            taken.update(p.name[len(prefix):] for p in root.iterdir() if p.name.startswith(prefix))
    return taken


def register_model(trained: str | os.PathLike | ModelPackage, parent: ModelPackage, *,
                   dataset_fingerprint: str | None = None, dataset: dict | None = None,
                   metrics_before: dict | None = None, metrics_after: dict | None = None,
                   training: dict | None = None, description: str | None = None,
                   folder: str | os.PathLike | None = None) -> ModelPackage:
    """Copy a freshly trained package into the user model folder as the parent's next version.

    The trained package is verified first (a corrupted one is refused); ``model.json`` gets the new name
    and version plus the provenance; the copy is verified again before it appears under its final name
    (staging folder + rename, under a lock), so a half-copied version is never listed.
    """
    source = trained if isinstance(trained, ModelPackage) else ModelPackage.load(trained)
    source = ModelPackage.load(source.path)   # re-verify: the files may have changed since loading
    folder = Path(folder) if folder is not None else user_models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(json.dumps(source.manifest))
    parent_info = {"name": parent.name, "version": parent.version, "sha256": parent.sha256,
                   "path": str(parent.path)}
    with _registry_lock(folder):
        version = next_version(parent.version, _taken_versions(parent.name, folder))
        final = folder / f"{parent.name}-{version}"
        if final.exists():   # belt and braces: _taken_versions already counted every folder
            raise ModelError(f"refusing to overwrite the existing model folder {final}")
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder))
        try:
            for spec in manifest.get("networks", {}).values():
                shutil.copy2(source.path / spec["file"], staging / spec["file"])
            training_record = dict(manifest.get("training") or {})
            training_record.update(training or {})
            training_record.update({"method": training_record.get("method", "fine-tune"),
                                    "parent": parent_info})
            if dataset_fingerprint or dataset:
                training_record["dataset"] = {**(dataset or {}), "fingerprint": dataset_fingerprint}
            metrics = dict(manifest.get("metrics") or {})
            if metrics_before is not None or metrics_after is not None:
                metrics["validation"] = {"before": metrics_before, "after": metrics_after}
            manifest.update({
                "name": parent.name, "version": version, "created": _now(), "parent": parent_info,
                "training": training_record, "metrics": metrics,
                "description": description or f"{parent.name} {parent.version} fine-tuned on reviewed cases",
            })
            atomic_write_text(staging / "model.json", json.dumps(manifest, indent=2) + "\n")
            ModelPackage.load(staging)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return ModelPackage.load(final)


# ============================================================================================ selection
def settings_path() -> Path:
    return user_models_dir() / SETTINGS_FILE


def read_settings() -> dict:
    try:
        data = json.loads(settings_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_settings(data: dict) -> None:
    data = {**data, "schema": SETTINGS_SCHEMA, "time": _now()}
    atomic_write_text(settings_path(), json.dumps(data, indent=2) + "\n")


def selected_model_path() -> Path | None:
    """The folder the user selected, or ``None`` (= the bundled default)."""
    selected = read_settings().get("selected")
    return Path(selected["path"]) if isinstance(selected, dict) and selected.get("path") else None


def select_model(name_or_dir: str | os.PathLike) -> ModelPackage:
    """Make a package the one CMBDetect uses (verified first; the previous choice is remembered)."""
    package = verify_model(name_or_dir)
    settings = read_settings()
    current = settings.get("selected")
    record = {"path": str(package.path.resolve()), "label": package.label, "sha256": package.sha256}
    if not (isinstance(current, dict) and current.get("path") == record["path"]):
        settings["previous"] = current
    settings["selected"] = record
    _write_settings(settings)
    return package


def select_previous() -> ModelPackage | None:
    """Switch back to the model used before the last :func:`select_model` (``None`` = bundled default)."""
    settings = read_settings()
    previous = settings.get("previous")
    if isinstance(previous, dict) and previous.get("path"):
        return select_model(previous["path"])
    clear_selection()
    return None


def clear_selection() -> None:
    """Go back to the bundled default model."""
    settings = read_settings()
    if settings.get("selected"):
        settings["previous"] = settings["selected"]
    settings["selected"] = None
    _write_settings(settings)


def active_model_path() -> tuple[Path, str | None]:
    """``(folder, note)`` of the model to use: the selected one, else the bundled default.

    ``note`` explains a fallback (the selected folder was removed); a selected package that is present
    but corrupted is *not* silently replaced: loading it raises ``ModelError``, as it must.
    """
    selected = selected_model_path()
    if selected is not None:
        if (selected / "model.json").is_file():
            return selected, None
        note = f"the selected model {selected} is gone; using the bundled default"
        return resolve_model("default"), note
    return resolve_model("default"), None


def describe_metrics(metrics: dict[str, Any] | None) -> str:
    """``TPR 0.90, FPavg 1.5, precision 0.59`` (missing values omitted)."""
    if not metrics:
        return ""
    parts = []
    for key, label, digits in (("tpr", "TPR", 2), ("fp_avg", "FPavg", 2), ("precision", "precision", 2)):
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:.{digits}f}")
    return ", ".join(parts)
