"""Training: data loading + feature cache, a loss that goes down, determinism, resume, the whole
stage1 -> teacher -> student -> package run (with distillation, without, and fine-tuning).

Everything is tiny (24x48x48 scans, width-4 networks, a handful of steps) so the file runs in well
under a minute on two CPU cores.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_dataset import write_dataset

from CMBDetectLib.errors import CancelledError, InputError, ModelError
from CMBDetectLib.networks import ShallowUNet
from CMBDetectLib.training import StageConfig, train_model
from CMBDetectLib.training.augment import AugmentationConfig
from CMBDetectLib.training.data import load_training_cases
from CMBDetectLib.training.log import read_log
from CMBDetectLib.training.loop import learning_rate
from CMBDetectLib.training.losses import SegmentationLoss
from CMBDetectLib.training.sampling import sample_segmentation_batch
from CMBDetectLib.training.stages import train_segmentation_stage

PREPROCESSING = {"working_spacing_mm": 0.8, "vessel_suppression": False}


def tiny_stage(**overrides) -> dict:
    values = dict(patch_size=16, batch_size=4, epochs=2, steps_per_epoch=3, validation_patches=8,
                  patience=5, max_minutes=None)
    values.update(overrides)
    return values


def tiny_config(cache: Path, **overrides) -> dict:
    config = {"stage1_width": 4, "teacher_arm_channels": 8, "teacher_fc": [32, 16, 8], "student_width": 4,
              "student_arm_channels": 8, "student_fc": [16, 8, 4], "inference_patch_size": 24,
              "vessel_suppression": False, "cache_dir": str(cache), "device": "cpu", "version": "0.0.1",
              "stage1": tiny_stage(), "teacher": tiny_stage(), "student": tiny_stage(validation_patches=64)}
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "Dataset001_Tiny", n_cases=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def cases(dataset: Path, cache: Path) -> list:
    return load_training_cases([dataset], PREPROCESSING, cache_dir=cache)


def test_cases_have_features_labels_and_hard_negatives(cases: list) -> None:
    assert len(cases) == 4
    for case in cases:
        assert case.channels.shape == (2,) + case.labels.shape
        assert case.n_cmbs == 3
        assert len(case.hard_negatives_kji) >= 1
        # CMBs are bright in the intensity channel after SWI inversion.
        cmb = case.labels > 0
        intensity = case.channels[0].astype(np.float32)
        assert intensity[cmb].mean() > intensity[case.brain_mask & ~cmb].mean() + 0.2
        # Hard negatives map back onto the mimics (bright-ish, not CMB).
        k, j, i = np.round(case.hard_negatives_kji[0]).astype(int)
        assert case.labels[k, j, i] == 0 and intensity[k, j, i] > intensity[case.brain_mask].mean()


def test_features_come_from_the_cache_the_second_time(dataset: Path, cache: Path, cases: list,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("features recomputed despite the cache")

    monkeypatch.setattr("CMBDetectLib.features.compute_features", fail)
    again = load_training_cases([dataset], PREPROCESSING, cache_dir=cache)
    np.testing.assert_array_equal(again[0].channels, cases[0].channels)
    assert len(list((cache / "features").glob("*.npz"))) == 4
    # Another preprocessing setting is another cache entry (so it must recompute).
    with pytest.raises(AssertionError, match="recomputed"):
        load_training_cases([dataset], {**PREPROCESSING, "vessel_suppression": True}, cache_dir=cache)


def test_learning_rate_schedule_follows_the_paper() -> None:
    config = StageConfig()
    rates = [learning_rate(config, epoch) for epoch in range(12)]
    assert rates[:4] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    assert rates[-1] == pytest.approx(1e-6) and min(rates) == pytest.approx(1e-6)


def _stage1_config(**overrides) -> StageConfig:
    values = dict(tiny_stage(), augmentation=AugmentationConfig(translation_voxels=4))
    values.update(overrides)
    return StageConfig(**values)


def _run_stage1(cases: list, seed: int, checkpoint: Path | None = None, cancel=None,
                config: StageConfig | None = None) -> ShallowUNet:
    torch.manual_seed(seed)
    network = ShallowUNet(width=4)
    train_segmentation_stage(network, cases, [0, 1, 2], [3], config or _stage1_config(), seed=seed,
                             device=torch.device("cpu"), checkpoint=checkpoint, log=None, progress=None,
                             cancel=cancel)
    return network


def test_stage1_training_lowers_the_loss(cases: list) -> None:
    config = _stage1_config(epochs=3, steps_per_epoch=12, lr_decay_every=10, lr=3e-3)
    x, y = sample_segmentation_batch(cases, [3], np.random.default_rng(5), 8, 16, 0.5,
                                     config.augmentation.disabled())
    loss = SegmentationLoss()

    def evaluate(network: torch.nn.Module) -> float:
        network.eval()
        with torch.no_grad():
            return float(loss(network(torch.from_numpy(x)), torch.from_numpy(y)))

    torch.manual_seed(0)
    before = evaluate(ShallowUNet(width=4))
    after = evaluate(_run_stage1(cases, seed=0, config=config))
    # measured: ~0.96 since the head starts at the CMB prior (the untrained loss is already lower)
    assert after < 0.98 * before


def test_size_balance_weights_match_a_hand_computation() -> None:
    from CMBDetectLib.training.sampling import size_balance_weights

    # background, CMBs of 2, 7, 28 and 200 voxels; reference 28 voxels, factor at most 10
    weights = size_balance_weights(np.array([5000, 2, 7, 28, 200]), exponent=1.0)
    np.testing.assert_allclose(weights, [1.0, 10.0, 4.0, 1.0, 1.0])       # 28/2 = 14 -> capped at 10
    np.testing.assert_allclose(size_balance_weights(np.array([5000, 7]), exponent=0.5), [1.0, 2.0])
    np.testing.assert_array_equal(size_balance_weights(np.array([5000, 2]), exponent=0.0), [1.0, 1.0])


def test_size_balanced_batches_draw_the_same_patches_and_weight_small_cmbs(cases: list) -> None:
    from CMBDetectLib.training.sampling import size_balance_weights

    augmentation = AugmentationConfig(translation_voxels=4, flip_probability=0.5)
    x, y = sample_segmentation_batch(cases, [0, 1], np.random.default_rng(3), 6, 16, 1.0, augmentation)
    xb, yb, wb = sample_segmentation_batch(cases, [0, 1], np.random.default_rng(3), 6, 16, 1.0, augmentation,
                                           size_balance=1.0)
    np.testing.assert_array_equal(x, xb)
    np.testing.assert_array_equal(y, yb)
    assert wb.shape == yb.shape and np.all(wb[yb == 0] == 1.0)
    # every CMB voxel carries its instance's weight (these tiny-dataset CMBs are all below the reference)
    possible = set(np.concatenate([size_balance_weights(c.cmb_sizes, 1.0)[1:] for c in cases[:2]]).tolist())
    assert set(np.unique(wb[yb == 1]).tolist()) <= possible and wb[yb == 1].min() > 1.0
    # the loss: unit weights give the plain loss; weights change it
    logits = torch.randn((6, 2) + yb.shape[1:], generator=torch.Generator().manual_seed(0))
    loss = SegmentationLoss()
    labels = torch.from_numpy(yb)
    assert float(loss(logits, labels, torch.ones(labels.shape))) == pytest.approx(float(loss(logits, labels)))
    assert float(loss(logits, labels, torch.from_numpy(wb))) != pytest.approx(float(loss(logits, labels)))


def test_size_balanced_stage1_training_lowers_the_loss(cases: list) -> None:
    config = _stage1_config(epochs=3, steps_per_epoch=12, lr_decay_every=10, lr=3e-3, cmb_size_balance=1.0)
    x, y, w = sample_segmentation_batch(cases, [3], np.random.default_rng(5), 8, 16, 0.5,
                                        config.augmentation.disabled(), size_balance=1.0)
    loss = SegmentationLoss()

    def evaluate(network: torch.nn.Module) -> float:
        network.eval()
        with torch.no_grad():
            return float(loss(network(torch.from_numpy(x)), torch.from_numpy(y), torch.from_numpy(w)))

    torch.manual_seed(0)
    before = evaluate(ShallowUNet(width=4))
    after = evaluate(_run_stage1(cases, seed=0, config=config))
    assert after < 0.98 * before


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_is_deterministic_and_resumes_exactly(cases: list, tmp_path: Path) -> None:
    first = _run_stage1(cases, seed=3)
    second = _run_stage1(cases, seed=3)
    assert _same_weights(first, second)
    assert not _same_weights(first, _run_stage1(cases, seed=4))

    # Cancel in the middle of the second epoch, then resume from the epoch-1 checkpoint.
    checkpoint = tmp_path / "stage1.pt"
    calls = {"n": 0}

    def cancel_after_four_steps() -> bool:
        calls["n"] += 1
        return calls["n"] > 4

    with pytest.raises(CancelledError):
        _run_stage1(cases, seed=3, checkpoint=checkpoint, cancel=cancel_after_four_steps)
    assert checkpoint.is_file()
    resumed = _run_stage1(cases, seed=3, checkpoint=checkpoint)
    assert _same_weights(first, resumed)
    # A finished checkpoint restores the best weights without training again.
    event = threading.Event()
    event.set()  # would cancel at once if any step ran
    assert _same_weights(first, _run_stage1(cases, seed=3, checkpoint=checkpoint, cancel=event))


def test_resuming_with_another_network_is_a_clear_error(cases: list, tmp_path: Path) -> None:
    checkpoint = tmp_path / "stage1.pt"
    _run_stage1(cases, seed=3, checkpoint=checkpoint, config=_stage1_config(epochs=1, steps_per_epoch=1))
    other = ShallowUNet(in_channels=3, width=4)        # same stage settings, another input layer
    with pytest.raises(InputError, match="holds another network"):
        train_segmentation_stage(other, cases, [0, 1, 2], [3], _stage1_config(epochs=1, steps_per_epoch=1), seed=3,
                                 device=torch.device("cpu"), checkpoint=checkpoint, log=None, progress=None,
                                 cancel=None)


def test_a_stage_setting_added_later_keeps_older_checkpoints_resumable() -> None:
    from CMBDetectLib.training.loop import _fingerprint

    # 1.5.0's stage-1 checkpoint was saved before cmb_size_balance existed; at its old value (0) the
    # fingerprint is what it was then, any other value is another run
    plain = json.loads(_fingerprint(StageConfig(), None))
    assert "cmb_size_balance" not in plain["stage"] and "lr" in plain["stage"]
    assert json.loads(_fingerprint(StageConfig(cmb_size_balance=1.0), None))["stage"]["cmb_size_balance"] == 1.0
    assert "rotate_in_plane_probability" not in plain["stage"]["augmentation"]
    turned = StageConfig(augmentation=AugmentationConfig(rotate_in_plane_probability=0.5))
    assert json.loads(_fingerprint(turned, None))["stage"]["augmentation"]["rotate_in_plane_probability"] == 0.5


def test_train_model_end_to_end_with_and_without_distillation(dataset: Path, cache: Path,
                                                              tmp_path: Path) -> None:
    from CMBDetectLib.model_package import ModelPackage

    fractions: list[float] = []
    package = train_model([dataset], tmp_path / "kd", tiny_config(cache), seed=0,
                          progress=lambda f, m: fractions.append(f))
    loaded = ModelPackage.load(tmp_path / "kd")
    assert loaded.has("stage1") and loaded.has("student") and loaded.has("teacher")
    assert loaded.patch_size("stage1") == 24 and loaded.patch_size("student") == 16
    assert 0 < loaded.thresholds["th_disc"] < 1 and loaded.thresholds["th_det"] == 0.5
    assert loaded.preprocessing["vessel_suppression"] is False
    training = package.manifest["training"]
    assert training["distillation"] is True
    assert set(training["cases"]["train"]).isdisjoint(training["cases"]["validation"])
    # Provenance, so that a rerun on another machine can tell where it parted from this one.
    assert set(training["data_sha256"]) == {"images", "labels", "features"}
    assert all(len(digest) == 64 for digest in training["data_sha256"].values())
    assert training["machine"]["packages"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert training["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    student = loaded.network("student")
    with torch.no_grad():
        assert student(torch.zeros(2, 2, 16, 16, 16)).shape == (2, 2)
    assert fractions[-1] == 1.0 and max(fractions) <= 1.0
    events = [r["event"] for r in read_log(tmp_path / "kd.work" / "train_log.jsonl")]
    for expected in ("run_start", "stage_done", "candidates", "package_saved"):
        assert expected in events
    assert [r["stage"] for r in read_log(tmp_path / "kd.work" / "train_log.jsonl")
            if r["event"] == "stage_done"] == ["stage1", "teacher", "student"]

    with pytest.raises(ModelError, match="already exists"):
        train_model([dataset], tmp_path / "kd", tiny_config(cache))



def test_a_run_resumed_after_stage1_trains_the_same_teacher_and_student(dataset: Path, cache: Path,
                                                                          tmp_path: Path) -> None:
    """Initial weights depend only on (seed, stage): a run that resumes with stage 1 done (the no-KD ablation
    and every scripts/ variant do) must build the teacher and student an uninterrupted run builds."""
    import shutil

    full = train_model([dataset], tmp_path / "full", tiny_config(cache), seed=4)
    work = tmp_path / "resumed.work"
    (work / "checkpoints").mkdir(parents=True)
    shutil.copy2(tmp_path / "full.work" / "checkpoints" / "stage1.pt", work / "checkpoints" / "stage1.pt")
    shutil.copy2(tmp_path / "full.work" / "candidates.json", work / "candidates.json")
    resumed = train_model([dataset], tmp_path / "resumed", tiny_config(cache), seed=4, resume=True, work_dir=work)
    assert [r["event"] for r in read_log(work / "train_log.jsonl")].count("stage_done") == 2  # stage 1 reused
    for role in ("stage1", "teacher", "student"):
        assert resumed.manifest["networks"][role]["sha256"] == full.manifest["networks"][role]["sha256"], role
    assert resumed.manifest["training"]["data_sha256"] == full.manifest["training"]["data_sha256"]


def test_stage2_only_scans_train_the_teacher_and_student_but_not_stage1(dataset: Path, cache: Path,
                                                                         tmp_path: Path) -> None:
    extra = write_dataset(tmp_path / "Dataset002_Extra", n_cases=2, seed=7, prefix="extra")
    plain = train_model([dataset], tmp_path / "plain", tiny_config(cache), seed=3)
    both = train_model([dataset], tmp_path / "both", tiny_config(cache), seed=3, stage2_dataset_dirs=[extra])
    training = both.manifest["training"]
    assert training["cases"]["stage2_only"] == ["extra000", "extra001"]
    assert training["cases"]["train"] == plain.manifest["training"]["cases"]["train"]
    assert training["cases"]["validation"] == plain.manifest["training"]["cases"]["validation"]
    detection = both.manifest["metrics"]["candidate_detection"]
    assert detection["stage2_only"]["scans"] == 2 and detection["stage2_only"]["cmbs"] == 6
    assert detection["train"] == plain.manifest["metrics"]["candidate_detection"]["train"]
    # Stage 1 is the same network as without the extra scans; the teacher and the student learnt from them.
    networks, plain_networks = both.manifest["networks"], plain.manifest["networks"]
    assert networks["stage1"]["sha256"] == plain_networks["stage1"]["sha256"]
    assert networks["teacher"]["sha256"] != plain_networks["teacher"]["sha256"]
    assert networks["student"]["sha256"] != plain_networks["student"]["sha256"]
    data = [r for r in read_log(tmp_path / "both.work" / "train_log.jsonl") if r["event"] == "data"][-1]
    assert data["stage2_only"] == ["extra000", "extra001"]

    with pytest.raises(InputError, match="repeats cases of the training data"):
        train_model([dataset], tmp_path / "same", tiny_config(cache), stage2_dataset_dirs=[dataset])
    assert not (tmp_path / "same").exists()


def test_train_command_takes_stage2_only_scans(dataset: Path, cache: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    from CMBDetectLib.cli import main
    from CMBDetectLib.model_package import ModelPackage

    extra = write_dataset(tmp_path / "Dataset003_Extra", n_cases=1, seed=9, prefix="more")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(tiny_config(cache)))
    assert main(["train", "--dataset", str(dataset), "--stage2-dataset", str(extra), "--out", str(tmp_path / "m"),
                 "--config", str(config_file), "--progress", "none"]) == 0
    assert ModelPackage.load(tmp_path / "m").manifest["training"]["cases"]["stage2_only"] == ["more000"]
    # The registered retraining (--init without --out) has no stage-2-only data: refused, not ignored.
    assert main(["train", "--init", str(tmp_path / "m"), "--dataset", str(dataset), "--stage2-dataset",
                 str(extra)]) == 2
    assert "--stage2-dataset needs --out" in capsys.readouterr().err


def test_train_command_no_kd_ablation(dataset: Path, cache: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    from CMBDetectLib.cli import main
    from CMBDetectLib.model_package import ModelPackage

    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(tiny_config(cache)))
    status = main(["train", "--dataset", str(dataset), "--out", str(tmp_path / "nokd"), "--config",
                   str(config_file), "--no-kd", "--student-steps", "4", "--seed", "2", "--progress", "json"])
    assert status == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[-1]["type"] == "result" and lines[-1]["model"] == str(tmp_path / "nokd")
    assert any(line["type"] == "progress" for line in lines)
    package = ModelPackage.load(tmp_path / "nokd")
    assert not package.has("teacher")
    training = package.manifest["training"]
    assert training["distillation"] is False and training["stages"]["student"]["steps"] == 4


def test_fine_tuning_from_an_existing_package(dataset: Path, cache: Path, tmp_path: Path) -> None:
    base = train_model([dataset], tmp_path / "base", tiny_config(cache), seed=1)
    tuned = train_model([dataset], tmp_path / "tuned", tiny_config(cache, stage1_width=8), seed=1,
                        init_model=tmp_path / "base")
    training = tuned.manifest["training"]
    assert training["init_model"]["sha256"] == base.sha256
    assert training["config"]["stage1"]["lr"] == pytest.approx(1e-4)
    # The architecture comes from the package, not from the (ignored) width option.
    assert tuned.manifest["networks"]["stage1"]["config"]["width"] == 4
    log = read_log(tmp_path / "tuned.work" / "train_log.jsonl")
    assert any(r["event"] == "teacher_reused" for r in log)
    assert json.loads((tmp_path / "tuned" / "model.json").read_text())["networks"]["teacher"]["sha256"] == \
        base.manifest["networks"]["teacher"]["sha256"]


def test_fine_tuning_a_ce_only_parent_keeps_it_ce_only_unless_a_teacher_is_asked_for(
        dataset: Path, cache: Path, tmp_path: Path) -> None:
    base = train_model([dataset], tmp_path / "base", {**tiny_config(cache), "distillation": False}, seed=1)
    assert not base.has("teacher")
    tuned = train_model([dataset], tmp_path / "tuned", tiny_config(cache), seed=1, init_model=tmp_path / "base")
    assert not tuned.has("teacher") and tuned.manifest["training"]["distillation"] is False
    assert any(r["event"] == "teacher_none" for r in read_log(tmp_path / "tuned.work" / "train_log.jsonl"))
    taught = train_model([dataset], tmp_path / "taught", {**tiny_config(cache), "train_teacher_when_finetuning": True},
                         seed=1, init_model=tmp_path / "base")
    assert taught.has("teacher") and taught.manifest["training"]["distillation"] is True
    assert taught.manifest["training"]["stages"]["teacher"]["steps"] > 0


def test_a_fine_tuned_model_keeps_its_parents_test_time_flips(dataset: Path, cache: Path, tmp_path: Path) -> None:
    from CMBDetectLib.model_package import ModelPackage

    base = train_model([dataset], tmp_path / "base", tiny_config(cache), seed=1)
    assert base.student_flips is False and "inference" in base.manifest   # a new model records its choice
    manifest = json.loads((tmp_path / "base" / "model.json").read_text())
    manifest["inference"] = {"student_flips": True}                   # what calibration writes
    (tmp_path / "base" / "model.json").write_text(json.dumps(manifest))
    tuned = train_model([dataset], tmp_path / "tuned", tiny_config(cache), seed=1, init_model=tmp_path / "base")
    assert tuned.student_flips is True and ModelPackage.load(tmp_path / "tuned").student_flips is True


def test_a_vessel_context_model_trains_detects_and_fine_tunes_with_three_channels(dataset: Path, cache: Path,
                                                                                   tmp_path: Path) -> None:
    from CMBDetectLib.model_package import ModelPackage
    from CMBDetectLib.pipeline import DetectionParameters, DetectionSession
    from CMBDetectLib.volume import read_volume

    config = tiny_config(cache, vessel_suppression=True, vessel_context=True)
    train_model([dataset], tmp_path / "context", config, seed=1)
    package = ModelPackage.load(tmp_path / "context")
    assert package.preprocessing["vessel_context"] is True
    channels = {role: spec["config"]["in_channels"] for role, spec in package.manifest["networks"].items()}
    assert channels == {"stage1": 2, "teacher": 3, "student": 3}     # stage 1 keeps the paper's input
    # Detection builds the three channels from model.json and both stages run on them.
    image = sorted((dataset / "imagesTr").glob("*.nii.gz"))[0]
    session = DetectionSession(package, device="cpu")
    result = session.run(read_volume(image), "swi", params=DetectionParameters(th_det=0.001))
    assert session.features.channels.shape[0] == 3
    assert result.candidates and all(0.0 <= c.p_disc <= 1.0 for c in result.candidates)
    # A fine-tuned model is trained and run on the inputs its parent was made for.
    tuned = train_model([dataset], tmp_path / "tuned", tiny_config(cache), seed=1, init_model=tmp_path / "context")
    assert tuned.preprocessing["vessel_context"] is True and tuned.preprocessing["vessel_suppression"] is True
    assert tuned.manifest["networks"]["student"]["config"]["in_channels"] == 3
    from CMBDetectLib.training import TrainingConfig

    with pytest.raises(ValueError, match="needs vessel_suppression"):
        TrainingConfig.from_dict({"vessel_suppression": False, "vessel_context": True})


def test_features_cached_before_vessel_context_existed_stay_valid() -> None:
    from CMBDetectLib.training.data import feature_cache_key

    settings = {"working_spacing_mm": 0.8, "vessel_suppression": True, "brain_mask": "otsu"}
    assert feature_cache_key("abc", "swi", {**settings, "vessel_context": False}) == \
        feature_cache_key("abc", "swi", settings)
    assert feature_cache_key("abc", "swi", {**settings, "vessel_context": True}) != \
        feature_cache_key("abc", "swi", settings)
    # the same for native thick slices (max_spacing_mm None) against interpolated ones
    assert feature_cache_key("abc", "swi", {**settings, "max_spacing_mm": None}) == \
        feature_cache_key("abc", "swi", settings)
    assert feature_cache_key("abc", "swi", {**settings, "max_spacing_mm": 1.7}) != \
        feature_cache_key("abc", "swi", settings)


def test_a_fine_tuned_model_keeps_its_parents_qsm_scaling(dataset: Path, cache: Path, tmp_path: Path) -> None:
    base = train_model([dataset], tmp_path / "base", tiny_config(cache), seed=1)
    assert base.preprocessing["qsm_scaling"] == "compress"          # a new model records its scaling
    manifest = json.loads((tmp_path / "base" / "model.json").read_text())
    del manifest["preprocessing"]["qsm_scaling"]                     # a package made before it was recorded
    (tmp_path / "base" / "model.json").write_text(json.dumps(manifest))
    tuned = train_model([dataset], tmp_path / "tuned", tiny_config(cache), seed=1, init_model=tmp_path / "base")
    assert tuned.preprocessing["qsm_scaling"] == "clip"
    assert tuned.manifest["training"]["config"]["qsm_scaling"] == "clip"


def test_training_config_round_trips_and_rejects_unknown_options() -> None:
    from CMBDetectLib.training import TrainingConfig

    stage1 = {"max_steps": 10, "augmentation": {"translation_voxels": 5}}
    config = TrainingConfig.from_dict({"stage1_width": 8, "stage1": stage1})
    assert config.stage1.max_steps == 10 and config.stage1.patch_size == 32  # the rest keeps its default
    assert config.stage1.augmentation.translation_voxels == 5
    assert config.stage1.augmentation.noise_variance == (0.01, 0.04)
    again = TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown training option"):
        TrainingConfig.from_dict({"stage_one_width": 8})
    with pytest.raises(ValueError, match="qsm_scaling must be one of clip, compress"):
        TrainingConfig.from_dict({"qsm_scaling": "log"})
    with pytest.raises(ValueError, match="unknown stage option"):
        TrainingConfig.from_dict({"student": {"steps": 8}})
    per_modality = {"swi": "otsu-hull", "t2s": "otsu", "qsm": "otsu"}
    assert TrainingConfig.from_dict({"brain_mask": per_modality}).brain_mask == per_modality
    with pytest.raises(ValueError, match="names no method for t2s"):
        TrainingConfig.from_dict({"brain_mask": {"swi": "otsu-hull", "qsm": "otsu"}})
    with pytest.raises(ValueError, match="brain mask method"):
        TrainingConfig.from_dict({"brain_mask": "bet"})


def test_a_per_modality_brain_mask_shares_the_cache_of_its_one_method() -> None:
    from CMBDetectLib.training.data import feature_cache_key

    settings = {"working_spacing_mm": 0.8, "vessel_suppression": True}
    per_modality = {**settings, "brain_mask": {"swi": "otsu-hull", "t2s": "otsu", "qsm": "otsu"}}
    assert feature_cache_key("abc", "t2s", per_modality) == feature_cache_key("abc", "t2s",
                                                                             {**settings, "brain_mask": "otsu"})
    assert feature_cache_key("abc", "swi", per_modality) == \
        feature_cache_key("abc", "swi", {**settings, "brain_mask": "otsu-hull"})
    assert feature_cache_key("abc", "swi", per_modality) != feature_cache_key("abc", "swi",
                                                                             {**settings, "brain_mask": "otsu"})


def test_validation_metrics_are_cluster_wise_and_pick_the_best_threshold() -> None:
    from CMBDetectLib.training.evaluation import choose_discrimination_threshold, discrimination_metrics

    # Candidate 0 overlaps two CMBs (one cluster, two CMBs found); 1 overlaps the third; 2-3 are false.
    touched = [[("a", 1), ("a", 2)], [("b", 1)], [], []]
    scores = np.array([0.9, 0.3, 0.6, 0.1])
    metrics = discrimination_metrics(scores, touched, n_cmbs=3, n_scans=2, threshold=0.5)
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (1, 1, 1)
    assert metrics["tpr"] == pytest.approx(2 / 3) and metrics["precision"] == pytest.approx(0.5)
    assert metrics["fp_per_scan"] == pytest.approx(0.5)
    threshold, best = choose_discrimination_threshold(scores, touched, n_cmbs=3, n_scans=2)
    assert 0.1 < threshold <= 0.3 and best["tpr"] == 1.0  # keeps candidates 0 and 1, drops the 0.1
    assert choose_discrimination_threshold(np.zeros(0), [], 3, 2)[0] == 0.5


class _BrightVoxels(torch.nn.Module):
    """A stand-in stage 1 that calls every voxel brighter than ``level`` a CMB."""

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cmb = 200.0 * (x[:, :1] - self.level)
        return torch.cat([torch.zeros_like(cmb), cmb], dim=1)


def test_mined_candidates_are_labelled_by_overlap(cases: list) -> None:
    from CMBDetectLib.training.mining import candidate_summary, mine_case

    case = cases[0]
    level = float(case.channels[0][case.labels > 0].astype(np.float32).min()) - 0.02
    result = mine_case(_BrightVoxels(level), case, 0, th_det=0.5, roi_size=24, overlap=0.25,
                       evidence_threshold=-1.0, device=torch.device("cpu"))
    assert result.cmbs_found == case.n_cmbs == 3
    positives = [item for item in result.items if item.label == 1]
    assert sorted(cmb for item in positives for cmb in item.cmbs) == [1, 2, 3]
    for item in result.items:
        assert bool(item.cmbs) == bool(item.label)
        if item.label:  # a CMB candidate is centred on its CMB
            voxel = tuple(np.round(item.centre).astype(int))
            assert case.instances[voxel] in item.cmbs
    assert candidate_summary([result])["tpr"] == 1.0


def test_cmbdetect_train_gives_identical_networks_in_two_processes(dataset: Path, tmp_path: Path) -> None:
    """Deterministic given a seed, all three networks: two `cmbdetect train` processes (other hash seeds, own
    feature caches) write byte-identical weights; another seed does not."""
    import os
    import subprocess
    import sys

    def train(name: str, seed: int, hash_seed: str) -> dict:
        config_file = tmp_path / f"{name}.json"
        config_file.write_text(json.dumps(tiny_config(tmp_path / f"cache_{name}")))
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "CMBDetectLib", "train", "--dataset", str(dataset), "--out", str(tmp_path / name),
             "--config", str(config_file), "--seed", str(seed), "--device", "cpu", "--progress", "json"],
            capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        networks = json.loads((tmp_path / name / "model.json").read_text(encoding="utf-8"))["networks"]
        return {role: spec["sha256"] for role, spec in networks.items()}

    first = train("first", 5, "1")
    assert set(first) == {"stage1", "teacher", "student"}
    assert train("second", 5, "2") == first
    other = train("other", 6, "1")
    assert all(other[role] != first[role] for role in first)


def test_train_init_without_out_registers_a_new_version(tmp_path, tiny_model):
    """`cmbdetect train --init MODEL --dataset DIR` = fine-tune, before/after metrics, next version."""
    import json
    import os
    import subprocess
    import sys

    from tiny_dataset import write_dataset

    dataset = write_dataset(tmp_path / "dataset", n_cases=4, seed=3)
    user_models = tmp_path / "user_models"
    env = {**os.environ, "CMBDETECT_USER_MODELS": str(user_models), "CMBDETECT_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "CMBDetectLib", "train", "--init", str(tiny_model.path), "--dataset", str(dataset),
         "--stage1-steps", "1", "--student-steps", "1", "--device", "cpu", "--progress", "json"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    final = json.loads(result.stdout.strip().splitlines()[-1])
    registered = [p for p in user_models.iterdir() if (p / "model.json").is_file()]
    assert len(registered) == 1
    manifest = json.loads((registered[0] / "model.json").read_text())
    assert manifest["version"] != tiny_model.version and manifest["name"] == tiny_model.name
    assert json.dumps(manifest).count(tiny_model.sha256) >= 1, "parent provenance missing"
    assert final, "the json progress must end with a result line"
    assert (tiny_model.path / "model.json").is_file(), "the parent package must stay untouched"


def test_a_candidate_teacher_learns_false_candidates_with_their_candidate_label(cases: list) -> None:
    """``teacher_candidates``: negatives come from the false stage-1 candidates first, and a candidate patch is
    labelled as the student's is (by its candidate label), not by the CMB voxels near its centre."""
    from CMBDetectLib.candidates import extract_patches
    from CMBDetectLib.training.sampling import PatchItem, TeacherSampler

    case_index = next(i for i, c in enumerate(cases) if c.n_cmbs)
    on_cmb = np.asarray(cases[case_index].cmb_voxels[0][0])
    # a "false" candidate sitting on a CMB voxel: only its candidate label can make it negative
    candidates = [PatchItem(case_index, on_cmb, 0, "stage1", ())]
    still = AugmentationConfig(translation_voxels=0).disabled()
    matched = TeacherSampler(cases, [case_index], candidates, 16, 2, np.random.default_rng(0), 1.0)
    x, _, classes = matched.sample(np.random.default_rng(1), 6, 0.0, still)
    assert classes.tolist() == [0] * 6
    expected = extract_patches(cases[case_index].channels, on_cmb[None], 16)[0]
    assert all(np.array_equal(patch, expected) for patch in x)
    # the 1.9.4 teacher: the same candidate is one pool among several, labelled by its central cube
    legacy = TeacherSampler(cases, [case_index], candidates, 16, 2, np.random.default_rng(0))
    x, _, classes = legacy.sample(np.random.default_rng(1), 64, 0.0, still)
    from_candidate = [bool(np.array_equal(patch, expected)) for patch in x]
    assert 0 < sum(from_candidate) < 48
    assert all(label == 1 for label, hit in zip(classes, from_candidate) if hit)


def test_a_candidate_teacher_keeps_the_weights_best_on_the_validation_candidates(dataset: Path, cache: Path,
                                                                                 tmp_path: Path) -> None:
    """The teacher checkpoint kept is chosen by its classifier's balanced CE on the student's validation
    candidates: recomputed here from the saved package and the mined candidates."""
    from CMBDetectLib.model_package import ModelPackage
    from CMBDetectLib.training.mining import ground_truth_items
    from CMBDetectLib.training.sampling import CandidateSampler, PatchItem
    from CMBDetectLib.training.stages import balanced_cross_entropy

    config = tiny_config(cache, teacher_candidates=True, th_det=0.01, evidence_threshold=-1.0,
                         teacher=tiny_stage(epochs=3, steps_per_epoch=4))
    package = train_model([dataset], tmp_path / "tc", config, seed=2)
    training = package.manifest["training"]
    assert training["config"]["teacher_candidates"] is True
    cases = load_training_cases([dataset], PREPROCESSING, cache_dir=cache)
    names = [c.case for c in cases]
    validation = {names.index(name) for name in training["cases"]["validation"]}
    stored = json.loads((tmp_path / "tc.work" / "candidates.json").read_text())
    items = [PatchItem(i["case"], np.asarray(i["centre"]), i["label"], i["source"], tuple(i["cmbs"]))
             for r in stored["results"] for i in r["items"] if i["case"] in validation]
    if not any(i.label == 1 for i in items):   # what train_model does when stage 1 found no validation CMB
        items += ground_truth_items(cases, sorted(validation))
    assert any(i.label == 1 for i in items) and any(i.label == 0 for i in items)
    x, y = CandidateSampler(cases, items, 16).all_patches()
    teacher = ModelPackage.load(tmp_path / "tc").network("teacher").eval()
    with torch.no_grad():
        loss = float(balanced_cross_entropy(teacher.classify(torch.from_numpy(x)), torch.from_numpy(y)))
    assert loss == pytest.approx(training["stages"]["teacher"]["best_validation"], rel=1e-5)
