"""Model versions: new versions never overwrite, provenance is recorded, selection switches back, corrupt
packages are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_model

from CMBDetectLib import model_registry as registry
from CMBDetectLib.errors import ModelError
from CMBDetectLib.model_package import ModelPackage, resolve_model, sha256_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folders(tmp_path, monkeypatch):
    bundled, user = tmp_path / "bundled", tmp_path / "user"
    monkeypatch.setenv("CMBDETECT_BUNDLED_MODELS", str(bundled))
    monkeypatch.setenv("CMBDETECT_USER_MODELS", str(user))
    parent = make_tiny_model(bundled / "tiny-test-1.0.0", seed=0, version="1.0.0")
    return bundled, user, parent


def _trained(tmp_path, seed: int = 1) -> ModelPackage:
    """Stands for a freshly fine-tuned package (different weights, trainer's own name and version)."""
    return make_tiny_model(tmp_path / f"trained-{seed}", seed=seed, version="20261123T100000")


def test_next_version_skips_every_used_number():
    assert registry.next_version("1.0.0", []) == "1.1.0"
    assert registry.next_version("1.0.0", {"1.1.0", "1.2.0", "2.0.0"}) == "1.3.0"
    assert registry.next_version("1.1", {"1.2.0"}) == "1.3.0"
    assert registry.next_version("0.0.1", {"junk"}) == "0.1.0"
    with pytest.raises(ModelError):
        registry.next_version("latest", [])


def test_register_writes_a_new_version_with_provenance(tmp_path, folders):
    bundled, user, parent = folders
    parent_bytes = {p.name: p.read_bytes() for p in parent.path.iterdir()}
    trained = _trained(tmp_path)
    before = {"clusterwise": {"tpr": 0.5, "fp_avg": 3.0, "precision": 0.4}}
    after = {"clusterwise": {"tpr": 0.75, "fp_avg": 1.0, "precision": 0.6}}
    package = registry.register_model(trained, parent, dataset_fingerprint="ab" * 32,
                                      dataset={"train_cases": ["a"], "validation_cases": ["b"]},
                                      metrics_before=before, metrics_after=after)
    assert package.path == user / "tiny-test-1.1.0" and package.version == "1.1.0"
    assert package.name == parent.name
    manifest = package.manifest
    assert manifest["parent"] == {"name": "tiny-test", "version": "1.0.0", "sha256": parent.sha256,
                                  "path": str(parent.path)}
    assert manifest["training"]["dataset"]["fingerprint"] == "ab" * 32
    assert manifest["metrics"]["validation"] == {"before": before, "after": after}
    assert manifest["created"] and manifest["training"]["method"] == "fine-tune"
    # the weights are the trained ones, the parent is untouched
    assert sha256_file(package.path / "student.pt") == sha256_file(trained.path / "student.pt")
    assert {p.name: p.read_bytes() for p in parent.path.iterdir()} == parent_bytes
    # a second registration from the same parent is 1.2.0, never a reuse of 1.1.0
    second = registry.register_model(_trained(tmp_path, 2), parent, dataset_fingerprint="cd" * 32)
    assert second.version == "1.2.0"
    assert sha256_file(package.path / "student.pt") == sha256_file(trained.path / "student.pt")
    # a child of 1.1.0 takes the next free minor too
    assert registry.register_model(_trained(tmp_path, 3), package).version == "1.3.0"
    # and a leftover folder without model.json still blocks its number
    (user / "tiny-test-1.4.0").mkdir()
    assert registry.register_model(_trained(tmp_path, 4), parent).version == "1.5.0"
    assert not [p for p in user.iterdir() if p.name.startswith(".tiny-test")]   # no staging left
    versions = registry.list_versions()
    assert [v.label for v in versions] == ["tiny-test-1.0.0", "tiny-test-1.1.0", "tiny-test-1.2.0",
                                           "tiny-test-1.3.0", "tiny-test-1.5.0"]
    assert [v.source for v in versions][:2] == ["bundled", "user"]
    assert versions[1].parent["version"] == "1.0.0" and versions[1].dataset_fingerprint == "ab" * 32


def test_a_corrupted_package_is_refused(tmp_path, folders):
    _, user, parent = folders
    trained = _trained(tmp_path)
    data = bytearray((trained.path / "stage1.pt").read_bytes())
    data[-10] ^= 0xFF
    (trained.path / "stage1.pt").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        registry.register_model(trained.path, parent)
    assert not user.exists() or not [p for p in user.iterdir() if p.name.startswith("tiny-test")]
    good = registry.register_model(_trained(tmp_path, 2), parent)
    (good.path / "student.pt").write_bytes(b"not a state dict")
    with pytest.raises(ModelError, match="sha256"):
        registry.select_model(good.path)
    assert registry.selected_model_path() is None
    assert registry.model_problem(good.path) is not None
    flagged = {v.label: v.problem for v in registry.list_versions(verify=True)}
    assert flagged["tiny-test-1.0.0"] is None and "sha256" in flagged["tiny-test-1.1.0"]


def test_select_and_switch_back(tmp_path, folders):
    _, _, parent = folders
    new = registry.register_model(_trained(tmp_path), parent)
    assert registry.active_model_path() == (resolve_model("default"), None)
    registry.select_model(new.path)
    assert registry.active_model_path()[0] == new.path.resolve()
    assert [v.label for v in registry.list_versions() if v.selected] == ["tiny-test-1.1.0"]
    registry.select_model("tiny-test-1.0.0")          # one call to switch back
    assert registry.active_model_path()[0] == parent.path.resolve()
    assert registry.select_previous().version == "1.1.0"
    assert registry.select_previous().version == "1.0.0"
    registry.clear_selection()
    assert registry.selected_model_path() is None
    assert registry.select_previous().version == "1.0.0"
    # a selected folder that disappeared falls back to the default with a note
    registry.select_model(new.path)
    import shutil

    shutil.rmtree(new.path)
    path, note = registry.active_model_path()
    assert path == resolve_model("default") and "gone" in note


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "CMBDetectLib", "models", *args], cwd=REPO,
                          env=dict(os.environ), capture_output=True, text=True, timeout=120)


def test_models_command(tmp_path, folders):
    _, _, parent = folders
    registry.register_model(_trained(tmp_path), parent, metrics_after={"clusterwise": {"tpr": 0.8}})
    listing = _cli("list")
    assert listing.returncode == 0, listing.stderr
    assert "tiny-test-1.0.0" in listing.stdout and "tiny-test-1.1.0" in listing.stdout
    assert "from tiny-test-1.0.0" in listing.stdout and "TPR 0.80" in listing.stdout
    assert _cli("verify", "tiny-test-1.1.0").returncode == 0
    shown = _cli("show", "tiny-test-1.1.0")
    assert json.loads(shown.stdout)["parent"]["version"] == "1.0.0"
    selected = _cli("select", "tiny-test-1.1.0")
    assert selected.returncode == 0 and "tiny-test-1.1.0" in selected.stdout
    assert "* tiny-test-1.1.0" in _cli("list").stdout
    assert _cli("select", "--previous").returncode == 0
    assert registry.selected_model_path() is None
    corrupt = registry.register_model(_trained(tmp_path, 2), parent)
    (corrupt.path / "stage1.pt").write_bytes(b"x")
    failed = _cli("verify", corrupt.path.name)
    assert failed.returncode == 1 and "sha256" in failed.stderr and len(failed.stderr.splitlines()) == 1
    assert _cli("select", corrupt.path.name).returncode == 1
    assert _cli("list", "--verify").returncode == 1
