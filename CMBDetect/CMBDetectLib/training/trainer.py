"""``train_model``: stage 1 -> candidates -> teacher -> student -> model package.

Work files (checkpoints, mined candidates, the JSON-lines log) live in ``work_dir`` (default
``<out_dir>.work``) so an interrupted run can be resumed with ``resume=True``; the package itself is
written atomically at the very end by :meth:`ModelPackage.save`, so ``out_dir`` either does not exist
or holds a complete, verified model.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from CMBDetectLib import __version__
from CMBDetectLib.dataset import case_paths
from CMBDetectLib.device import describe_device, select_device
from CMBDetectLib.errors import InputError, ModelError
from CMBDetectLib.features import BASE_CHANNELS, discriminator_channels, feature_settings
from CMBDetectLib.networks import ShallowUNet, StudentNet, TeacherNet, network_config
from CMBDetectLib.progress import ProgressCallback, no_progress, scaled
from CMBDetectLib.training.config import StageConfig, TrainingConfig
from CMBDetectLib.training.data import TrainingCase, load_training_cases
from CMBDetectLib.training.evaluation import choose_discrimination_threshold, discrimination_metrics
from CMBDetectLib.training.log import JsonLinesLog
from CMBDetectLib.training.loop import as_cancel_check, make_deterministic, seed_initialisation
from CMBDetectLib.training.mining import (
    CaseCandidates,
    candidate_summary,
    ground_truth_items,
    hard_negative_items,
    look_alike_items,
    mine_candidates,
)
from CMBDetectLib.training.provenance import data_digests, machine_record
from CMBDetectLib.training.sampling import PatchItem
from CMBDetectLib.training.stages import (
    score_items,
    train_segmentation_stage,
    train_student_stage,
    train_teacher_stage,
)


def _state_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _split(cases: list[TrainingCase], fraction: float, seed: int, log: JsonLinesLog) -> tuple[list, list]:
    from CMBDetectLib.dataset import split_by_subject

    train, validation = split_by_subject(cases, fraction, seed)
    index = {id(case): i for i, case in enumerate(cases)}
    train_ids = [index[id(c)] for c in train]
    validation_ids = [index[id(c)] for c in validation]
    if not validation_ids:
        # One subject only: early stopping then watches the training subject (logged, and in model.json).
        log("warning", message="no held-out subject: validating on the training cases")
        validation_ids = list(train_ids)
    return train_ids, validation_ids


def _finetune(stage: StageConfig, settings: TrainingConfig) -> StageConfig:
    """Fewer steps at a lower learning rate: adapt a trained network without forgetting it."""
    fraction = settings.finetune_step_fraction
    return dataclasses.replace(
        stage, lr=settings.finetune_lr, epochs=max(2, int(round(stage.epochs * fraction))),
        max_steps=_scaled(stage.max_steps, fraction),
        max_minutes=None if stage.max_minutes is None else stage.max_minutes * fraction)


def _scaled(steps: int | None, fraction: float) -> int | None:
    return None if steps is None else max(1, int(steps * fraction))


def _mined(path: Path, stage1: torch.nn.Module, cases: list[TrainingCase], settings: TrainingConfig,
           device: torch.device, progress: ProgressCallback, cancel,
           log: JsonLinesLog) -> list[CaseCandidates]:
    """Stage-1 candidates of every case, reused from ``path`` when made by the same stage-1 weights."""
    key = {"stage1": _state_digest(stage1), "cases": [c.case for c in cases], "th_det": settings.th_det,
           "roi": settings.inference_patch_size, "overlap": settings.overlap,
           "evidence_threshold": settings.evidence_threshold}
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("key") == key:
                log("candidates_reused", file=str(path))
                return [CaseCandidates([PatchItem(i["case"], np.asarray(i["centre"]), i["label"],
                                                  i["source"], tuple(i["cmbs"])) for i in r["items"]],
                                       r["n_cmbs"], r["cmbs_found"]) for r in stored["results"]]
        except (OSError, ValueError, KeyError):
            pass
    results = mine_candidates(stage1, cases, settings.th_det, settings.inference_patch_size, settings.overlap,
                              settings.evidence_threshold, device, settings.inference_batch_size, progress,
                              cancel)
    from CMBDetectLib.volume import atomic_write_text

    atomic_write_text(path, json.dumps({"key": key, "results": [
        {"n_cmbs": r.n_cmbs, "cmbs_found": r.cmbs_found,
         "items": [{"case": i.case, "centre": [float(v) for v in i.centre], "label": i.label,
                    "source": i.source, "cmbs": list(i.cmbs)} for i in r.items]} for r in results]}))
    return results


def train_model(dataset_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                config: TrainingConfig | dict | None = None, seed: int = 0,
                progress: ProgressCallback | None = None, cancel=None,
                init_model: str | os.PathLike | None = None, resume: bool = False,
                work_dir: str | os.PathLike | None = None,
                stage2_dataset_dirs: Sequence[str | os.PathLike] = ()):
    """Train stage 1, the teacher and the student on ``dataset_dirs`` and save a model package.

    ``stage2_dataset_dirs``: more scans that train only the teacher and the student. Stage 1 never sees
    them, so its candidates there are the ones it makes on a new scan (on its own training scans it makes
    fewer false candidates), and stage 2 gets more candidates than the stage-1 scans alone give. Stage 2
    still validates on the held-out subjects of ``dataset_dirs``.

    ``init_model`` (a package name or folder) fine-tunes an existing model instead: its architecture
    and preprocessing are kept, stage 1 and the student are trained for ``finetune_step_fraction`` of
    the steps at ``finetune_lr``, and the package's teacher (if any) distils into the student.
    ``config.distillation=False`` trains the student without a teacher (the paper's ablation).
    ``cancel``: a callable or ``threading.Event``; cancelling raises ``CancelledError`` and keeps the
    last epoch checkpoint, from which ``resume=True`` continues. Returns the saved ``ModelPackage``.
    """
    from CMBDetectLib.model_package import ModelPackage, NetworkSpec
    from CMBDetectLib.postprocessing import PostprocessingParameters

    started = time.perf_counter()
    settings = config if isinstance(config, TrainingConfig) else TrainingConfig.from_dict(config)
    report = progress or no_progress
    is_cancelled = as_cancel_check(cancel)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ModelError(f"the output folder {out_dir} already exists; choose a new one")
    if not dataset_dirs:
        raise InputError("no training dataset given")
    work = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + ".work")
    if not resume and work.exists():
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        (work / "candidates.json").unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = JsonLinesLog(work / "train_log.jsonl")
    make_deterministic(seed)
    device = select_device(settings.device)

    base = ModelPackage.load(init_model) if init_model is not None else None
    preprocessing = {"working_spacing_mm": settings.working_spacing_mm, "max_spacing_mm": settings.max_spacing_mm,
                     "vessel_suppression": settings.vessel_suppression, "qsm_scaling": settings.qsm_scaling,
                     "brain_mask": settings.brain_mask, "vessel_context": settings.vessel_context,
                     "overlap": settings.overlap, "evidence_threshold": settings.evidence_threshold}
    if base is not None:
        # The networks only understand inputs made the way they were trained (a package that does not
        # record a feature setting was trained with that setting's legacy value).
        preprocessing.update({k: v for k, v in base.preprocessing.items() if k in preprocessing})
        preprocessing.update(feature_settings(base.preprocessing))
        settings = dataclasses.replace(
            settings, working_spacing_mm=float(preprocessing["working_spacing_mm"]),
            max_spacing_mm=preprocessing["max_spacing_mm"],
            vessel_suppression=bool(preprocessing["vessel_suppression"]),
            qsm_scaling=str(preprocessing["qsm_scaling"]), brain_mask=preprocessing["brain_mask"],
            vessel_context=bool(preprocessing["vessel_context"]),
            overlap=float(preprocessing["overlap"]),
            evidence_threshold=float(preprocessing["evidence_threshold"]),
            inference_patch_size=base.patch_size("stage1"),
            th_det=float(base.thresholds.get("th_det", settings.th_det)),
            stage1=_finetune(settings.stage1, settings),
            student=dataclasses.replace(_finetune(settings.student, settings),
                                        patch_size=base.patch_size("student")),
            teacher=dataclasses.replace(settings.teacher, patch_size=base.patch_size("teacher"))
            if base.has("teacher") else settings.teacher)
    log("run_start", seed=seed, datasets=[str(d) for d in dataset_dirs], init_model=str(init_model or ""),
        resume=resume, device=describe_device(device), config=settings.to_dict(), cmbdetect=__version__,
        torch=torch.__version__)

    cases = load_training_cases(dataset_dirs, preprocessing, cache_dir=settings.cache_dir,
                                progress=scaled(report, 0.0, 0.08 if stage2_dataset_dirs else 0.1),
                                cancel=is_cancelled)
    if not any(case.n_cmbs for case in cases):
        raise InputError("the training data holds no CMB label; nothing to learn from")
    stage2_only = load_training_cases(stage2_dataset_dirs, preprocessing, cache_dir=settings.cache_dir,
                                      progress=scaled(report, 0.08, 0.1), cancel=is_cancelled) \
        if stage2_dataset_dirs else []
    repeated = sorted({c.case for c in cases} & {c.case for c in stage2_only})
    if repeated:
        # The same scan on both sides would let stage 1's training scans in as "unseen" ones.
        raise InputError(f"the stage-2 data repeats cases of the training data ({', '.join(repeated[:5])}); "
                         "give stage 2 other scans")
    train_ids, validation_ids = _split(cases, settings.validation_fraction, seed, log)
    stage2_ids = list(range(len(cases), len(cases) + len(stage2_only)))
    cases = cases + stage2_only
    digests = data_digests([Path(c.dataset) / case_paths(c.case).image for c in cases], cases)
    machine = machine_record()
    log("provenance", data=digests, machine=machine)
    log("data", cases=len(cases), train=[cases[i].case for i in train_ids],
        validation=[cases[i].case for i in validation_ids], stage2_only=[cases[i].case for i in stage2_ids],
        cmbs=sum(c.n_cmbs for c in cases))
    checkpoints = work / "checkpoints"
    stage2_channels = discriminator_channels(settings.vessel_context)

    # ---- stage 1
    if base is not None:
        stage1 = base.network("stage1", "cpu")
    else:
        stage1 = ShallowUNet(in_channels=BASE_CHANNELS, width=settings.stage1_width)
    stage1_result = train_segmentation_stage(
        stage1, cases, train_ids, validation_ids, settings.stage1, seed=seed, device=device,
        checkpoint=checkpoints / "stage1.pt", log=log, progress=scaled(report, 0.1, 0.4),
        cancel=is_cancelled)

    # ---- stage-1 candidates of every case (student data, validation metrics)
    mined = _mined(work / "candidates.json", stage1, cases, settings, device, scaled(report, 0.4, 0.5),
                   is_cancelled, log)
    candidates = [item for result in mined for item in result.items]
    detection_metrics = {"train": candidate_summary([mined[i] for i in train_ids]),
                         "validation": candidate_summary([mined[i] for i in validation_ids])}
    if stage2_ids:
        detection_metrics["stage2_only"] = candidate_summary([mined[i] for i in stage2_ids])
    stage2_train_ids = train_ids + stage2_ids
    log("candidates", **detection_metrics)

    # The student's validation candidates (also the teacher's with ``teacher_candidates``).
    validation_set = set(validation_ids)
    validation_items = [i for i in candidates if i.case in validation_set]
    if not any(i.label == 1 for i in validation_items):
        validation_items += ground_truth_items(cases, validation_ids)

    # ---- teacher
    teacher: torch.nn.Module | None = None
    teacher_result = None
    if settings.distillation:
        if base is not None and base.has("teacher") and not settings.train_teacher_when_finetuning:
            teacher = base.network("teacher", device)
            log("teacher_reused", model=base.label)
        elif base is not None and not settings.train_teacher_when_finetuning:
            # A parent without a teacher (a CE-only student, like the bundled default since 1.11.0) is fine-tuned
            # the way it was trained; distilling would first need a teacher trained from scratch on the new data.
            log("teacher_none", model=base.label,
                reason="the parent has no teacher: its student is fine-tuned with CE only "
                       "(train_teacher_when_finetuning trains a teacher to distil from)")
        else:
            seed_initialisation(seed, "teacher")
            teacher = TeacherNet(in_channels=stage2_channels, width=stage1.config["width"],
                                 arm_channels=settings.teacher_arm_channels, fc=settings.teacher_fc)
            teacher.load_stage1(stage1.state_dict())
            teacher_result = train_teacher_stage(
                teacher, cases, stage2_train_ids, validation_ids, candidates, settings, seed=seed, device=device,
                checkpoint=checkpoints / "teacher.pt", log=log, progress=scaled(report, 0.5, 0.75),
                cancel=is_cancelled, validation_candidates=validation_items)
    if is_cancelled():
        from CMBDetectLib.errors import CancelledError

        raise CancelledError("training cancelled")

    # ---- student on candidate-centred patches
    train_set = set(stage2_train_ids)
    train_items = [i for i in candidates if i.case in train_set] + hard_negative_items(cases, stage2_train_ids)
    if settings.student_add_ground_truth:
        train_items += ground_truth_items(cases, stage2_train_ids)
    shortfall = sum(i.label == 1 for i in train_items) - sum(i.label == 0 for i in train_items)
    if shortfall > 0:
        extra = look_alike_items(cases, stage2_train_ids, shortfall, np.random.default_rng([seed, 401]))
        train_items += extra
        log("student_negatives_added", count=len(extra), reason="fewer negative candidates than positives")
    if base is not None:
        student = base.network("student", "cpu")
    else:
        seed_initialisation(seed, "student")
        student = StudentNet(in_channels=stage2_channels, width=settings.student_width,
                             arm_channels=settings.student_arm_channels, fc=settings.student_fc)
    student_result = train_student_stage(
        student, teacher, cases, train_items, validation_items, settings, seed=seed, device=device,
        checkpoint=checkpoints / "student.pt", log=log, progress=scaled(report, 0.75, 0.95),
        cancel=is_cancelled)

    # ---- thresholds and validation metrics
    report(0.96, "choosing the discrimination threshold")
    validation_candidates = [i for i in candidates if i.case in validation_set]
    # A fine-tuned model keeps its parent's test-time flips, and its th_disc is chosen the way it will be used.
    flips = base.student_flips if base is not None else False
    scores = score_items(student, cases, validation_candidates, settings.student.patch_size, device, flips)
    touched = [[(i.case, cmb) for cmb in i.cmbs] for i in validation_candidates]
    n_cmbs = sum(cases[i].n_cmbs for i in validation_ids)
    if settings.th_disc is None:
        th_disc, disc_metrics = choose_discrimination_threshold(scores, touched, n_cmbs, len(validation_ids))
    else:
        th_disc = float(settings.th_disc)
        disc_metrics = discrimination_metrics(scores, touched, n_cmbs, len(validation_ids), th_disc)
    metrics = {"note": "validation subjects, stage-1 candidates before post-processing",
               "candidate_detection": detection_metrics, "discrimination": disc_metrics}

    # ---- package
    report(0.98, "saving the model package")
    networks = {"stage1": NetworkSpec(stage1.cpu(), "ShallowUNet", network_config(stage1),
                                      settings.inference_patch_size),
                "student": NetworkSpec(student.cpu(), "StudentNet", network_config(student),
                                       settings.student.patch_size)}
    if teacher is not None:
        networks["teacher"] = NetworkSpec(teacher.cpu(), "TeacherNet", network_config(teacher),
                                          settings.teacher.patch_size)
    postprocessing = (base.postprocessing if base is not None
                      else dataclasses.asdict(PostprocessingParameters()))
    results = {"stage1": stage1_result.summary(), "student": student_result.summary()}
    if teacher_result is not None:
        results["teacher"] = teacher_result.summary()
    training = {
        "seed": seed, "datasets": [str(Path(d).resolve()) for d in dataset_dirs],
        "stage2_datasets": [str(Path(d).resolve()) for d in stage2_dataset_dirs],
        "cases": {"train": [cases[i].case for i in train_ids],
                  "validation": [cases[i].case for i in validation_ids],
                  "stage2_only": [cases[i].case for i in stage2_ids]},
        "init_model": base.info() if base is not None else None, "distillation": teacher is not None,
        "config": settings.to_dict(), "stages": results, "device": describe_device(device),
        "data_sha256": digests, "machine": machine,
        "seconds": round(time.perf_counter() - started, 1), "cmbdetect": __version__,
        "torch": torch.__version__, "python": platform.python_version(),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    version = settings.version or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d.%H%M%S")
    modalities = {case.modality for case in cases}
    if base is not None:
        modalities |= set(base.manifest.get("modalities", []))
    modalities = tuple(sorted(modalities))
    package = ModelPackage.save(
        out_dir, name=settings.name, version=version, networks=networks, preprocessing=preprocessing,
        thresholds={"th_det": settings.th_det, "th_disc": th_disc}, postprocessing=postprocessing,
        training=training, metrics=metrics, modalities=modalities, inference={"student_flips": flips},
        description=settings.description or f"trained on {len(cases)} scans ({', '.join(modalities)})")
    log("package_saved", path=str(out_dir), th_disc=th_disc, seconds=training["seconds"])
    report(1.0, f"model saved to {out_dir}")
    return package
