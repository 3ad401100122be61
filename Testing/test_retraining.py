"""End to end: a case reviewed in a (headless) Slicer scene -> export -> dataset validator -> short CPU
fine-tune -> new version registered -> it loads and detects. A cancelled retrain registers nothing, nor
does one whose model is worse than its parent on the validation case (unless asked to)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_phantom, make_tiny_model

from CMBDetectLib import model_registry
from CMBDetectLib.dataset import load_dataset, validate_dataset
from CMBDetectLib.dataset_export import export_case, export_review_session
from CMBDetectLib.errors import CancelledError, NotBetterError
from CMBDetectLib.model_package import ModelPackage
from CMBDetectLib.pipeline import DetectionParameters, DetectionSession
from CMBDetectLib.retraining import RetrainConfig, main, retrain, work_root
from CMBDetectLib.volume import Volume

REPO = Path(__file__).resolve().parents[1]
SPACING = (0.9, 0.9, 2.0)
# A step budget that makes the fine-tune a plumbing check of a few seconds on 2 cores.
TINY_TRAINING = {
    "device": "cpu", "finetune_step_fraction": 1.0, "inference_batch_size": 4,
    "stage1": {"patch_size": 24, "batch_size": 2, "epochs": 2, "steps_per_epoch": 1, "max_steps": 2,
               "validation_patches": 2},
    "teacher": {"batch_size": 2, "epochs": 2, "steps_per_epoch": 1, "max_steps": 2, "validation_patches": 4},
    "student": {"batch_size": 4, "epochs": 2, "steps_per_epoch": 1, "max_steps": 2, "validation_patches": 8},
}
PHANTOM_CMBS = [((12, 25, 25, 2.0), (13, 40, 38, 1.8)), ((11, 30, 22, 2.0), (12, 36, 42, 1.8)),
                ((12, 22, 40, 2.0), (13, 42, 26, 1.8))]


@pytest.fixture
def models(tmp_path, monkeypatch):
    """Empty per-user model folder, a bundled tiny parent model 1.0.0 and a private feature cache."""
    monkeypatch.setenv("CMBDETECT_BUNDLED_MODELS", str(tmp_path / "bundled"))
    monkeypatch.setenv("CMBDETECT_USER_MODELS", str(tmp_path / "user"))
    monkeypatch.setenv("CMBDETECT_CACHE", str(tmp_path / "cache"))
    return make_tiny_model(tmp_path / "bundled" / "tiny-test-1.0.0", version="1.0.0")


def phantom(n: int) -> tuple[Volume, Volume, np.ndarray]:
    """A small SWI-like scan with two labelled CMBs and one unlabelled dark mimic (a hard negative)."""
    image, labels, _ = make_phantom(shape=(24, 64, 64), spacing_zyx=SPACING[::-1], cmbs=PHANTOM_CMBS[n],
                                    seed=n)
    k, j, i = np.indices(image.shape)
    distance2 = ((k - 12) * SPACING[2]) ** 2 + ((j - 45) * SPACING[1]) ** 2 + ((i - 18) * SPACING[0]) ** 2
    mimic = distance2 <= 1.8 ** 2
    image[mimic] = 150.0
    return Volume(image, SPACING), Volume(labels, SPACING), mimic


def stub_detection(image: Volume, truth: Volume, mimic: np.ndarray, parent: ModelPackage):
    """What the detector reports for the review: CMB 1 (true), candidate 2 (the mimic); CMB 2 is missed.

    The random-weight test model cannot find anything real, so the result is written down instead: the
    review, export and retraining code paths are the same.
    """
    from CMBDetectLib.pipeline import CandidateRecord, DetectionResult

    labels = np.zeros(image.array.shape, np.uint16)
    labels[truth.array == 1] = 1
    labels[mimic] = 2
    records = []
    for identifier in (1, 2):
        kji = np.argwhere(labels == identifier).mean(axis=0)
        voxels = int((labels == identifier).sum())
        records.append(CandidateRecord(
            id=identifier, centroid_ijk=tuple(kji[::-1]), centroid_ras=tuple(image.index_to_ras(kji)[0]),
            volume_mm3=voxels * float(np.prod(SPACING)), volume_voxels=voxels, p_det=0.9, p_disc=0.8,
            ellipticity=0.05, edge_distance_mm=10.0, final=True, reason=None))
    return DetectionResult(records, DetectionParameters.for_model(parent), image.with_array(labels),
                           model_info=parent.info())


def reviewed_elsewhere(case: str, subject: str, labels: Volume) -> dict:
    """The review of a case annotated outside this test (every ground-truth CMB accepted)."""
    ids = sorted(int(v) for v in np.unique(labels.array) if v)
    return {"schema": "cmbdetect.review/1", "case": case, "subject": subject, "modality": "swi",
            "model": {"name": "tiny-test", "version": "1.0.0"}, "parameters": {"th_det": 0.5, "th_disc": 0.5},
            "reviewer": "asmith", "time": "2026-11-23T10:00:00+00:00",
            "cmbs": [{"id": i, "decision": "accepted"} for i in ids]}


def review_in_scene(parent: ModelPackage, scene):
    """sub-01 reviewed in the scene: CMB 1 accepted, the mimic rejected, the missed CMB 2 added."""
    from CMBDetectLib.mrml import geometry
    from CMBDetectLib.mrml.review_session import ReviewSession

    image, truth, mimic = phantom(0)
    node = geometry.volume_to_node(image, "sub-01", scene=scene)
    result = stub_detection(image, truth, mimic, parent)
    session = ReviewSession.create(node, result, modality="swi", case="sub-01", reviewer="jdoe",
                                   image_info={"name": "sub-01", "shape": list(image.shape_ijk)})
    session.accept(1)
    session.reject(2)
    missed = np.argwhere(truth.array == 2).mean(axis=0)
    added = session.add_missed(image.index_to_ras(missed)[0])   # grown from the clicked point
    decisions = {1: "accepted", 2: "rejected", added.id: "added"}
    return session, image, decisions


def make_dataset(root: Path, parent: ModelPackage, scene) -> dict:
    """sub-01 is reviewed in the scene; sub-02 and sub-03 come reviewed (every CMB accepted)."""
    session, _, decisions = review_in_scene(parent, scene)
    exported = export_review_session(root, session)
    for n, subject in ((1, "s2"), (2, "s3")):
        image_n, truth_n, _ = phantom(n)
        export_case(root, reviewed_elsewhere(f"sub-0{n + 1}", subject, truth_n), image_n, truth_n)
    return {"decisions": decisions, "export": exported}


def test_a_review_saved_by_slicer_exports_like_the_scene(slicer_scene, tmp_path, models):
    """The .seg.nrrd Slicer writes (one layer per segment, cropped extent) gives the same dataset case."""
    import SimpleITK as sitk  # noqa: N813

    from CMBDetectLib.dataset import case_paths
    from CMBDetectLib.dataset_export import export_saved_review
    from CMBDetectLib.volume import write_volume_atomic

    session, image, decisions = review_in_scene(models, slicer_scene.scene)
    export_review_session(tmp_path / "from-scene", session)
    saved = session.save(tmp_path / "reviews")
    image_path = write_volume_atomic(image, tmp_path / "reviews" / "sub-01.nii.gz")
    export_saved_review(saved["review"], tmp_path / "from-files", image_path=image_path)
    paths = case_paths("sub-01")
    arrays = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / paths.instances)))
              for d in ("from-scene", "from-files")]
    assert np.array_equal(arrays[0], arrays[1])
    assert set(np.unique(arrays[0])) == {0} | {i for i, d in decisions.items() if d != "rejected"}
    reviews = [json.loads((tmp_path / d / paths.review).read_text()) for d in ("from-scene", "from-files")]
    assert [(c["id"], c["decision"]) for c in reviews[0]["cmbs"]] == \
        [(c["id"], c["decision"]) for c in reviews[1]["cmbs"]]
    assert reviews[1]["hard_negatives"][0]["centroid_ijk"] == reviews[0]["hard_negatives"][0]["centroid_ijk"]
    assert validate_dataset(tmp_path / "from-files") == []


def test_review_export_finetune_register_and_detect(slicer_scene, tmp_path, models):
    parent = models
    start = time.perf_counter()
    dataset = tmp_path / "dataset"
    made = make_dataset(dataset, parent, slicer_scene.scene)
    decisions = made["decisions"]
    assert sorted(decisions.values()) == ["accepted", "added", "rejected"]
    assert validate_dataset(dataset) == []
    view = load_dataset(dataset)
    sub01 = next(c for c in view.cases if c.case == "sub-01")
    assert sub01.n_cmbs == sum(d in ("accepted", "added") for d in decisions.values()) == 2
    assert sub01.n_hard_negatives == sum(d == "rejected" for d in decisions.values())
    assert sub01.reviewer == "jdoe" and sub01.model["version"] == "1.0.0"

    messages = []
    result = retrain(parent.path, [dataset],
                     RetrainConfig(validation_fraction=0.34, device="cpu", training=TINY_TRAINING),
                     progress=lambda f, m: messages.append((f, m)))
    elapsed = time.perf_counter() - start
    print(f"review + export + fine-tune + before/after evaluation: {elapsed:.1f} s")
    # The random parent finds nothing on the validation case and neither does its 2-step fine-tune: F1 0
    # on both sides, same FPavg: "equal", so it is registered (better-or-equal).
    print(f"compared with the parent: {result.comparison['verdict']} ({result.comparison['reason']})")
    assert result.comparison["verdict"] in ("better", "equal")

    package = result.package
    assert (package.name, package.version) == ("tiny-test", "1.1.0")
    assert package.path.parent == tmp_path / "user"
    assert len(result.validation_cases) == 1 and len(result.train_cases) == 2
    for metrics in (result.metrics_before, result.metrics_after):
        assert set(metrics["clusterwise"]) >= {"tpr", "fp_avg", "precision"}
        assert metrics["cases"] == result.validation_cases
    manifest = package.manifest
    assert manifest["parent"]["version"] == "1.0.0" and manifest["parent"]["sha256"] == parent.sha256
    assert manifest["training"]["dataset"]["fingerprint"] == result.dataset_fingerprint
    assert manifest["training"]["dataset"]["validation_cases"] == result.validation_cases
    assert manifest["metrics"]["validation"]["after"] == result.metrics_after
    assert manifest["training"]["comparison"] == result.comparison
    assert manifest["training"]["retrain_config"]["register_worse"] is False
    # the trainer saw the training subjects only
    assert set(manifest["training"]["cases"]["train"]) | set(manifest["training"]["cases"]["validation"]) \
        == set(result.train_cases)
    assert [f for f, _ in messages] == sorted(f for f, _ in messages) and messages[-1][0] == 1.0
    assert not any(work_root().iterdir())

    # it is listed, can be selected, loads (sha256-verified) and detects on the input grid
    versions = {v.label: v for v in model_registry.list_versions()}
    assert versions["tiny-test-1.1.0"].parent["version"] == "1.0.0"
    model_registry.select_model("tiny-test-1.1.0")
    path, _ = model_registry.active_model_path()
    loaded = ModelPackage.load(path)
    image, _, _ = phantom(1)
    detection = DetectionSession(loaded, device="cpu").run(image, "swi")
    assert detection.candidate_labels.same_grid(image)
    assert detection.model_info["version"] == "1.1.0"
    # the parent is untouched and switching back is one call
    ModelPackage.load(parent.path)
    model_registry.select_model("tiny-test-1.0.0")
    assert model_registry.active_model_path()[0] == parent.path.resolve()


def test_a_cancelled_retrain_registers_nothing(slicer_scene, tmp_path, models):
    parent = models
    dataset = tmp_path / "dataset"
    make_dataset(dataset, parent, slicer_scene.scene)

    def cancel_once_training() -> bool:
        return bool(messages) and messages[-1][0] > 0.25   # cancelled inside train_model

    messages = []
    with pytest.raises(CancelledError):
        retrain(parent.path, [dataset], RetrainConfig(validation_fraction=0.34, device="cpu",
                                                      training=TINY_TRAINING),
                progress=lambda f, m: messages.append((f, m)), cancel=cancel_once_training)
    assert any("fine-tuning" in m for _, m in messages)
    user = tmp_path / "user"
    assert [p.name for p in user.iterdir() if not p.name.startswith(".")] == []
    assert not any(work_root().iterdir())   # the work folder (checkpoints, splits) is gone
    assert [v.label for v in model_registry.list_versions()] == ["tiny-test-1.0.0"]


def test_cancel_from_the_panel_kills_the_process_and_registers_nothing(slicer_scene, tmp_path, models):
    """What Cancel in CMBDetectTraining does: the runner kills the background process tree."""
    from CMBDetectLib.runner import CANCELLED, ProcessRunner, engine_environment

    parent = models
    dataset = tmp_path / "dataset"
    make_dataset(dataset, parent, slicer_scene.scene)
    slow = json.loads(json.dumps(TINY_TRAINING))
    slow["stage1"].update({"max_steps": 100000, "epochs": 1000, "steps_per_epoch": 50, "patience": 1000})
    command = [sys.executable, "-m", "CMBDetectLib.retraining", "--init", str(parent.path),
               "--dataset", str(dataset), "--validation-fraction", "0.34", "--device", "cpu",
               "--config", json.dumps(slow), "--progress", "json"]
    runner = ProcessRunner(command, env=engine_environment(REPO / "CMBDetect")).start()
    deadline = time.monotonic() + 240
    while runner.is_running and time.monotonic() < deadline:
        runner.poll()
        if runner.fraction > 0.25:     # inside train_model (stage 1)
            break
        time.sleep(0.1)
    assert runner.is_running, runner.error_message
    runner.cancel(timeout=4.0)
    assert runner.state == CANCELLED
    print(f"cancelled at {runner.fraction:.2f} ({runner.message}); exit status {runner.returncode}")
    if runner.returncode == 130:
        # SIGTERM was turned into CancelledError: the process removed its own work folder
        assert not any(work_root().iterdir())
    else:
        assert runner.returncode == -9, runner.stderr_tail   # it did not stop in time and was SIGKILLed
    assert [p.name for p in (tmp_path / "user").iterdir() if not p.name.startswith(".")] == []
    from CMBDetectLib.retraining import remove_stale_work_dirs

    remove_stale_work_dirs()    # whatever SIGKILL left behind is swept by the next run
    assert not any(work_root().iterdir())
    assert [v.label for v in model_registry.list_versions()] == ["tiny-test-1.0.0"]


def set_thresholds(package: ModelPackage, **thresholds: float) -> ModelPackage:
    """The same networks with other recommended thresholds (model.json holds them, outside the checksums)."""
    manifest = json.loads((package.path / "model.json").read_text())
    manifest["thresholds"].update(thresholds)
    (package.path / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return ModelPackage.load(package.path)


def test_a_model_worse_than_its_parent_is_not_registered(tmp_path, models, capfd):
    """The guard on real components: a parent that is right on the validation case, a child that is not.

    With ``th_disc = 0`` the random parent keeps its one candidate, a large blob that covers both CMBs of
    the validation case (cluster-wise TPR = precision = F1 = 1). The fine-tune is given a fixed
    ``th_disc`` of 0.95 (its two steps hardly move the student's ~0.4), so the child rejects that
    candidate: F1 1 -> 0, "worse". Without ``register_worse`` nothing is registered; with it the version
    is registered and its provenance says it was worse.
    """
    parent = set_thresholds(models, th_disc=0.0)
    dataset = tmp_path / "dataset"
    for n, subject in enumerate(("sub-01", "s2", "s3")):   # the split keeps s3 (phantom 2) for validation
        image_n, truth_n, _ = phantom(n)
        export_case(dataset, reviewed_elsewhere(f"sub-0{n + 1}", subject, truth_n), image_n, truth_n)
    strict = {**TINY_TRAINING, "th_disc": 0.95}
    user = tmp_path / "user"

    with pytest.raises(NotBetterError) as raised:
        retrain(parent.path, [dataset], RetrainConfig(validation_fraction=0.34, device="cpu", training=strict))
    comparison = raised.value.comparison
    assert comparison.verdict == "worse"
    assert comparison.before["f1"] == 1.0 and comparison.after["f1"] == 0.0
    assert raised.value.parent == "tiny-test-1.0.0" and raised.value.validation_cases == ["sub-03"]
    message = str(raised.value)
    assert message.startswith("the fine-tuned model is worse than tiny-test-1.0.0 on the 1 validation case(s)")
    assert "not registered" in message and "--register-worse" in message and "F1 1.00 -> 0.00" in message
    assert [p.name for p in user.iterdir() if not p.name.startswith(".")] == []
    assert not any(work_root().iterdir())   # the work folder is removed as after any failed run
    assert [v.label for v in model_registry.list_versions()] == ["tiny-test-1.0.0"]

    # the same run through the command line, with --register-worse: registered, and it says it was worse
    status = main(["--init", str(parent.path), "--dataset", str(dataset), "--validation-fraction", "0.34",
                   "--device", "cpu", "--config", json.dumps(strict), "--register-worse", "--progress", "json"])
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert status == 0 and lines[-1]["type"] == "result"
    assert lines[-1]["comparison"]["verdict"] == "worse"
    package = ModelPackage.load(lines[-1]["model"]["path"])
    assert (package.name, package.version) == ("tiny-test", "1.1.0") and package.path.parent == user
    assert package.manifest["training"]["comparison"] == lines[-1]["comparison"]
    assert package.manifest["training"]["retrain_config"]["register_worse"] is True
    assert not any(work_root().iterdir())


def test_the_panel_is_told_that_a_worse_model_was_not_registered(tmp_path, models):
    """What CMBDetectTraining runs: exit status 1, one error line, and a ``not_better`` JSON line."""
    from CMBDetectLib.runner import FAILED, ProcessRunner, engine_environment

    parent = set_thresholds(models, th_disc=0.0)   # the set-up of the test above, in a background process
    dataset = tmp_path / "dataset"
    for n, subject in enumerate(("sub-01", "s2", "s3")):
        image_n, truth_n, _ = phantom(n)
        export_case(dataset, reviewed_elsewhere(f"sub-0{n + 1}", subject, truth_n), image_n, truth_n)
    command = [sys.executable, "-m", "CMBDetectLib.retraining", "--init", str(parent.path),
               "--dataset", str(dataset), "--validation-fraction", "0.34", "--device", "cpu",
               "--config", json.dumps({**TINY_TRAINING, "th_disc": 0.95}), "--progress", "json"]
    env = {**engine_environment(REPO / "CMBDetect"), "OMP_NUM_THREADS": "1"}   # two cores, shared
    runner = ProcessRunner(command, env=env).start()
    events = []
    deadline = time.monotonic() + 240
    while runner.is_running and time.monotonic() < deadline:
        events += runner.poll()
        time.sleep(0.05)
    assert runner.state == FAILED and runner.returncode == 1, runner.stderr_tail
    (event,) = [e for e in events if e.type == "not_better"]
    assert event.data["parent"] == "tiny-test-1.0.0" and event.data["comparison"]["verdict"] == "worse"
    assert runner.stderr_tail == [f"cmbdetect retrain: error: {event.data['message']}"]
    assert "not registered" in runner.error_message
    assert [p.name for p in (tmp_path / "user").iterdir() if not p.name.startswith(".")] == []
    assert not any(work_root().iterdir())


def test_the_training_panel_offers_register_worse_unticked():
    """Static check of CMBDetectTraining (no Slicer here): the checkbox exists, is bound to a parameter
    that defaults to False, and every ``self.ui.<name>`` the panel uses is in its .ui file."""
    import ast
    import xml.etree.ElementTree as ElementTree

    module = REPO / "CMBDetectTraining"
    root = ElementTree.parse(module / "Resources" / "UI" / "CMBDetectTraining.ui").getroot()
    widgets = {w.get("name"): w for w in root.iter("widget")}
    checkbox = widgets["registerWorseCheckBox"]
    assert checkbox.get("class") == "QCheckBox"
    properties = {p.get("name"): p for p in checkbox.findall("property")}
    assert properties["checked"].findtext("bool") == "false" and properties["toolTip"].findtext("string")
    assert properties["SlicerParameterName"].findtext("string") == "registerWorse"
    tree = ast.parse((module / "CMBDetectTraining.py").read_text())
    wrapper = next(n for n in ast.walk(tree)
                   if isinstance(n, ast.ClassDef) and n.name == "CMBDetectTrainingParameterNode")
    defaults = {s.target.id: s.value for s in wrapper.body if isinstance(s, ast.AnnAssign)}
    assert isinstance(defaults["registerWorse"], ast.Constant) and defaults["registerWorse"].value is False
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
            and n.value.attr == "ui" and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}
    assert "registerWorseCheckBox" in used and not used - set(widgets), sorted(used - set(widgets))


def test_pseudo_labels_keep_only_confident_detections(tmp_path, models, monkeypatch):
    """Off by default; when asked for, confident final detections of unreviewed scans become labels."""
    from CMBDetectLib import pipeline
    from CMBDetectLib.retraining import make_pseudo_label_dataset
    from CMBDetectLib.volume import write_volume_atomic

    image, truth, mimic = phantom(0)
    detection = stub_detection(image, truth, mimic, models)
    detection.candidates[1].p_disc = 0.6          # the mimic: a final detection, but not a confident one
    monkeypatch.setattr(pipeline.DetectionSession, "run", lambda self, *args, **kwargs: detection)
    scan = write_volume_atomic(image, tmp_path / "unreviewed" / "scan-7.nii.gz")
    assert not RetrainConfig().pseudo_labels
    folder, warnings = make_pseudo_label_dataset(models, [str(scan)], "swi", tmp_path / "pseudo", 0.75, "cpu",
                                                 lambda f, m: None, None)
    assert folder == tmp_path / "pseudo" and warnings == []
    assert validate_dataset(folder) == []
    (case,) = load_dataset(folder).cases
    assert case.case == "pseudo-scan-7" and case.source == "pseudo" and case.n_cmbs == 1
    assert case.n_hard_negatives == 0             # unreviewed: nothing is a proven negative
    assert [c["decision"] for c in case.review["cmbs"]] == ["pseudo"]
