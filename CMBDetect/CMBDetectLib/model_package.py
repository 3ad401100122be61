"""Model packages: ``model.json`` + weight files, verified by sha256 and loaded as code-free data.

A package folder holds ``model.json`` (schema ``cmbdetect.model/1``) and one ``.pt`` state dict per
network role (``stage1``, ``student``, optionally ``teacher``). Bundled packages live in
``CMBDetect/Resources/Models/<name>-<version>/``; user packages in :func:`user_models_dir`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from CMBDetectLib.errors import CancelledError, ModelError

SCHEMA = "cmbdetect.model/1"
ROLES = ("stage1", "teacher", "student")
REQUIRED_ROLES = ("stage1", "student")
DEFAULT_MODEL = "default"


@dataclass
class NetworkSpec:
    """What to save for one network: the module (its state dict is saved), how to rebuild it, its patch size."""

    module: Any
    class_name: str
    config: dict
    patch_size: int


def bundled_models_dir() -> Path:
    """``CMBDetect/Resources/Models`` next to this package (editable install or Slicer module folder)."""
    override = os.environ.get("CMBDETECT_BUNDLED_MODELS")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "Resources" / "Models"


def user_models_dir() -> Path:
    """Per-user folder for trained model versions (``CMBDETECT_USER_MODELS`` overrides it)."""
    override = os.environ.get("CMBDETECT_USER_MODELS")
    return Path(override) if override else Path.home() / ".cmbdetect" / "models"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in version.replace("-", ".").split("."))


class ModelPackage:
    """A verified model package folder."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest

    # ---------------------------------------------------------------- identity
    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def label(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def sha256(self) -> str:
        """Digest of the manifest (which itself holds the sha256 of every weight file)."""
        return sha256_file(self.path / "model.json")

    @property
    def thresholds(self) -> dict:
        return dict(self.manifest.get("thresholds", {}))

    @property
    def postprocessing(self) -> dict:
        return dict(self.manifest.get("postprocessing", {}))

    @property
    def student_flips(self) -> bool:
        """Test-time flips for the student (``inference.student_flips``; chosen by calibration)."""
        return bool((self.manifest.get("inference") or {}).get("student_flips", False))

    @property
    def preprocessing(self) -> dict:
        return dict(self.manifest.get("preprocessing", {}))

    def info(self) -> dict:
        """Short provenance record for outputs (candidates JSON, reviews)."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "path": str(self.path)}

    def has(self, role: str) -> bool:
        return role in self.manifest.get("networks", {})

    def patch_size(self, role: str) -> int:
        return int(self.manifest["networks"][role]["patch_size"])

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, name_or_dir: str | os.PathLike = DEFAULT_MODEL) -> ModelPackage:
        path = resolve_model(name_or_dir)
        manifest_path = path / "model.json"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ModelError(f"model {path} has an unreadable model.json ({error})") from None
        if manifest.get("schema") != SCHEMA:
            raise ModelError(f"model {path}: model.json schema is {manifest.get('schema')!r}, expected {SCHEMA!r}")
        networks = manifest.get("networks", {})
        for role in REQUIRED_ROLES:
            if role not in networks:
                raise ModelError(f"model {path} has no '{role}' network")
        for spec in networks.values():
            weight_file = path / spec["file"]
            if not weight_file.is_file():
                raise ModelError(f"model {path} is incomplete: {spec['file']} is missing")
            if sha256_file(weight_file) != spec.get("sha256"):
                raise ModelError(f"model {path}: {spec['file']} fails its sha256 check (corrupted or modified); "
                                 "reinstall or re-train this model")
        return cls(path, manifest)

    def network(self, role: str, device: Any = "cpu"):
        """Build the network of ``role`` and load its weights (``weights_only=True``: data, never code)."""
        import torch

        from CMBDetectLib.networks import build_network

        if not self.has(role):
            raise ModelError(f"model {self.label} has no '{role}' network")
        spec = self.manifest["networks"][role]
        module = build_network(spec["class"], spec["config"])
        try:
            state = torch.load(self.path / spec["file"], map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except CancelledError:      # a Cancel (SIGTERM) that lands while loading is not a bad file
            raise
        except Exception as error:  # noqa: BLE001 - any unpickling/shape problem means a bad file
            raise ModelError(f"model {self.label}: cannot load {spec['file']} ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:200]})") from None
        return module.to(device).eval()

    # ---------------------------------------------------------------- saving
    @classmethod
    def save(cls, out_dir: str | os.PathLike, *, name: str, version: str, networks: dict[str, NetworkSpec],
             preprocessing: dict, thresholds: dict, postprocessing: dict, training: dict | None = None,
             metrics: dict | None = None, description: str = "", modalities: tuple = ("swi", "t2s", "qsm"),
             inference: dict | None = None) -> ModelPackage:
        """Write a new package folder atomically; an existing folder is never overwritten."""
        import torch

        out_dir = Path(out_dir)
        if out_dir.exists():
            raise ModelError(f"refusing to overwrite the existing model folder {out_dir}")
        for role in REQUIRED_ROLES:
            if role not in networks:
                raise ModelError(f"cannot save a model without a '{role}' network")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            manifest_networks = {}
            for role, spec in networks.items():
                file_name = f"{role}.pt"
                state = {key: value.detach().cpu().contiguous() for key, value in spec.module.state_dict().items()}
                torch.save(state, staging / file_name)
                manifest_networks[role] = {
                    "file": file_name, "class": spec.class_name, "config": spec.config,
                    "patch_size": int(spec.patch_size), "sha256": sha256_file(staging / file_name),
                    "parameters": int(sum(v.numel() for v in state.values())),
                }
            manifest = {
                "schema": SCHEMA, "name": name, "version": version, "description": description,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "modalities": list(modalities), "preprocessing": preprocessing,
                "networks": manifest_networks, "thresholds": thresholds, "postprocessing": postprocessing,
                "training": training or {}, "metrics": metrics or {},
            }
            if inference:
                manifest["inference"] = inference
            (staging / "model.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            os.replace(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls.load(out_dir)


def _package_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "model.json").is_file() and not p.name.startswith("."))


def list_model_dirs() -> list[Path]:
    """Every package folder, bundled first, then the user's."""
    return _package_dirs(bundled_models_dir()) + _package_dirs(user_models_dir())


def resolve_model(name_or_dir: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """A folder path, ``default`` (newest bundled), a package name (newest version) or ``name-version``."""
    candidate = Path(name_or_dir)
    if candidate.is_dir():
        if not (candidate / "model.json").is_file():
            raise ModelError(f"{candidate} is not a model package (no model.json)")
        return candidate
    text = str(name_or_dir)
    if text == DEFAULT_MODEL:
        bundled = _package_dirs(bundled_models_dir())
        if not bundled:
            raise ModelError(f"no bundled model found in {bundled_models_dir()} (run `make model`)")
        return _newest(bundled)
    matches = [p for p in list_model_dirs() if p.name == text]
    if not matches:
        matches = [p for p in list_model_dirs() if _manifest_name(p) == text]
    if not matches:
        raise ModelError(f"unknown model {text!r}; installed: "
                         + (", ".join(p.name for p in list_model_dirs()) or "none"))
    return _newest(matches)


def _manifest_name(path: Path) -> str | None:
    try:
        return json.loads((path / "model.json").read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError):
        return None


def _newest(paths: list[Path]) -> Path:
    def key(path: Path) -> tuple:
        try:
            manifest = json.loads((path / "model.json").read_text(encoding="utf-8"))
            return _version_key(str(manifest.get("version", "0")))
        except (OSError, ValueError):
            return ()
    return sorted(paths, key=key)[-1]
