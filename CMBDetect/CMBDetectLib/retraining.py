"""Fine-tune a model on reviewed cases, compare it with its parent, register it as a new version.

Used by the CMBDetectTraining panel (in a background process, ``python -m CMBDetectLib.retraining ...
--progress json``); ``cmbdetect train --init`` can hand over to :func:`run_retrain_command` (same
options, see :func:`add_retrain_arguments`). The steps:

1. roll back any interrupted export, validate the dataset(s), split them by subject (deterministic);
2. evaluate the parent model on the validation cases ("before"), with the code of ``cmbdetect evaluate``;
3. fine-tune stage 1 and the student (distilled from the parent's teacher where it has one, else CE only) from
   the parent's weights with
   :func:`CMBDetectLib.training.train_model` on the training cases only; rejected candidates are in the
   exported reviews as hard negatives and the trainer uses them for the student;
4. evaluate the new model on the same validation cases ("after") and compare it with the parent
   (:func:`CMBDetectLib.model_comparison.compare_metrics`: cluster-wise F1 first, then FPavg);
5. register it as the parent's next version (:mod:`CMBDetectLib.model_registry`), with the comparison in
   its provenance, unless it is *worse* than the parent: then nothing is registered and
   :class:`~CMBDetectLib.errors.NotBetterError` is raised (``register_worse`` / ``--register-worse``
   registers it anyway). An annotator thus only ever gets a better-or-equal model by default.

Only a run that completes registers anything. A cancelled or failed run leaves the model folder as it
was and removes its work folder; a run killed outright (Cancel in Slicer kills the process tree) leaves
a work folder that the next run removes. Optional and off by default: pseudo-labels from the parent's
confident detections on unreviewed scans, used for training only (never for validation).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from CMBDetectLib.dataset import (
    DATASET_JSON,
    DatasetCase,
    case_paths,
    dataset_fingerprint,
    load_dataset,
    split_by_subject,
    validate_dataset,
)
from CMBDetectLib.errors import CancelledError, InputError, NotBetterError
from CMBDetectLib.model_comparison import WORSE, Comparison, compare_metrics
from CMBDetectLib.model_package import ModelPackage, user_models_dir
from CMBDetectLib.progress import ProgressCallback, no_progress, scaled

WORK_DIR_NAME = ".retrain-work"
RESULT_SCHEMA = "cmbdetect.retrain/1"


@dataclass
class RetrainConfig:
    """Everything a retraining run depends on (recorded in the new model's provenance)."""

    validation_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    training: dict = field(default_factory=dict)         # passed to training.train_model as ``config``
    pseudo_labels: bool = False
    unreviewed_images: list[str] = field(default_factory=list)
    unreviewed_modality: str | None = None                # default: the dataset's modality
    pseudo_label_threshold: float = 0.9                   # student probability of a confident detection
    evaluate: bool = True
    time_budget_minutes: float | None = None              # fine-tuning time cap (stage 1 + student)
    register_worse: bool = False                          # register even if worse than the parent

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RetrainResult:
    package: ModelPackage
    parent: ModelPackage
    metrics_before: dict | None
    metrics_after: dict | None
    train_cases: list[str]
    validation_cases: list[str]
    dataset_fingerprint: str
    warnings: list[str]
    seconds: float
    comparison: dict | None = None    # model_comparison.Comparison.to_dict() of after against before

    def to_json_dict(self) -> dict:
        return {"type": "result", "schema": RESULT_SCHEMA, "model": self.package.info(),
                "parent": self.parent.info(), "metrics_before": self.metrics_before,
                "metrics_after": self.metrics_after, "comparison": self.comparison,
                "train_cases": self.train_cases,
                "validation_cases": self.validation_cases, "dataset_fingerprint": self.dataset_fingerprint,
                "warnings": self.warnings, "seconds": round(self.seconds, 1)}


# ============================================================================================ work folders
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - Windows
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)
        if handle:
            ctypes.windll.kernel32.CloseHandle(handle)
            return True
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def work_root() -> Path:
    return user_models_dir() / WORK_DIR_NAME


def remove_stale_work_dirs() -> int:
    """Delete work folders of runs whose process is gone (killed by Cancel); returns how many."""
    root = work_root()
    if not root.is_dir():
        return 0
    removed = 0
    for folder in root.iterdir():
        pid = int(folder.name.split("-", 1)[0]) if folder.name.split("-", 1)[0].isdigit() else -1
        if not _pid_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)   # instant and no extra disk; the dataset's files are never modified in place
    except OSError:
        shutil.copy2(source, target)


def make_dataset_view(cases: Sequence[DatasetCase], out_dir: Path, modality: str) -> Path:
    """A dataset folder holding only ``cases`` (hard links), so the trainer sees the split it must see."""
    names = [c.case for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"case(s) {duplicates[:5]} appear in more than one dataset; rename one of them")
    for case in cases:
        for relative in case_paths(case.case).all():
            _link_or_copy(case.root / relative, out_dir / relative)
    description = {"channel_names": {"0": modality}, "labels": {"background": 0, "cmb": 1},
                   "numTraining": len(cases), "file_ending": ".nii.gz", "name": "CMBDetect retraining split",
                   "cmbdetect": {"schema": "cmbdetect.dataset/1", "modality": modality,
                                 "cases": sorted(names)}}
    (out_dir / DATASET_JSON).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return out_dir


# ============================================================================================ evaluation
def evaluate_model(model: ModelPackage, dataset_dir: Path, work_dir: Path, device: str = "cpu",
                   progress: ProgressCallback | None = None,
                   cancel: Callable[[], bool] | None = None) -> dict:
    """Detect on every case of ``dataset_dir`` and score it with ``cmbdetect evaluate``'s code.

    Returns ``{"clusterwise": {tpr, fp_avg, precision, f1, tp, fp, fn, n_scans}, "valdo": {...},
    "cases": [...]}`` (NaN written as ``None``).
    """
    from CMBDetectLib.evaluate import evaluate
    from CMBDetectLib.pipeline import DetectionParameters, DetectionSession
    from CMBDetectLib.volume import atomic_write_text, read_volume, write_volume_atomic

    progress = progress or no_progress
    dataset = load_dataset(dataset_dir, recover=False)
    pred_dir = work_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for index, case in enumerate(dataset.cases):
        if cancel is not None and cancel():
            raise CancelledError("retraining cancelled")
        step = scaled(progress, index / len(dataset.cases), (index + 1) / len(dataset.cases))
        image_path = case.path("image")
        volume = read_volume(image_path)
        session = DetectionSession(model, device=device, progress=step, cancel=cancel)
        modality = case.modality or dataset.modality or "swi"
        result = session.run(volume, modality, None, DetectionParameters.for_model(model, modality))
        stem = image_path.name[: -len(".nii.gz")]
        write_volume_atomic(result.final_labels(), pred_dir / f"{stem}_cmb.nii.gz")
        record = result.to_json_dict(str(image_path), case.modality, image_shape=volume.shape_ijk,
                                     image_spacing=volume.spacing)
        atomic_write_text(pred_dir / f"{stem}_candidates.json", json.dumps(record) + "\n")
    report = evaluate(pred_dir, dataset_dir).to_json_dict()
    return {"clusterwise": report["clusterwise"]["total"], "valdo": report["valdo"]["total"],
            "cases": [c.case for c in dataset.cases], "model": model.label}


def headline(metrics: dict | None) -> dict:
    """``{tpr, fp_avg, precision}`` of a metrics record (what the panel shows side by side)."""
    if not metrics:
        return {}
    clusterwise = metrics.get("clusterwise") or {}
    return {key: clusterwise.get(key) for key in ("tpr", "fp_avg", "precision", "f1")}


# ============================================================================================ pseudo-labels
def make_pseudo_label_dataset(model: ModelPackage, images: Sequence[str], modality: str, out_dir: Path,
                              threshold: float, device: str, progress: ProgressCallback,
                              cancel: Callable[[], bool] | None) -> tuple[Path | None, list[str]]:
    """Confident detections of ``model`` on unreviewed scans as a training-only dataset.

    Only final detections whose student probability is at least ``threshold`` become labels (decision
    ``pseudo``); everything else stays unlabelled (an unreviewed candidate is not a proven negative).
    """
    from CMBDetectLib.dataset_export import export_case, safe_case_name
    from CMBDetectLib.pipeline import DetectionParameters, DetectionSession
    from CMBDetectLib.volume import image_stem, read_volume

    warnings: list[str] = []
    exported = 0
    for index, image_path in enumerate(images):
        if cancel is not None and cancel():
            raise CancelledError("retraining cancelled")
        step = scaled(progress, index / len(images), (index + 1) / len(images))
        volume = read_volume(image_path)
        session = DetectionSession(model, device=device, progress=step, cancel=cancel)
        result = session.run(volume, modality, None, DetectionParameters.for_model(model, modality))
        confident = [c for c in result.final_candidates if c.p_disc >= threshold]
        if not confident:
            warnings.append(f"pseudo-labels: no confident detection on {Path(image_path).name}")
            continue
        keep = {c.id for c in confident}
        labels = result.candidate_labels.array.copy()
        labels[~np.isin(labels, list(keep))] = 0
        case = safe_case_name(f"pseudo-{image_stem(image_path)}")
        review = {"schema": "cmbdetect.review/1", "case": case, "subject": case, "modality": modality,
                  "source": "pseudo", "model": model.info(), "parameters": result.parameters.to_dict(),
                  "reviewer": "pseudo-labels", "image": {"path": str(image_path)},
                  "cmbs": [{"id": c.id, "decision": "pseudo", "centroid_ras": list(c.centroid_ras),
                            "p_det": c.p_det, "p_disc": c.p_disc} for c in confident]}
        export_case(out_dir, review, volume, result.candidate_labels.with_array(labels))
        exported += 1
    return (out_dir if exported else None), warnings


# ============================================================================================ retraining
def _check_cancel(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise CancelledError("retraining cancelled")


def retrain(init_model: str | os.PathLike | ModelPackage, dataset_dirs: Sequence[str | os.PathLike],
            config: RetrainConfig | None = None, progress: ProgressCallback | None = None,
            cancel: Callable[[], bool] | None = None) -> RetrainResult:
    """Fine-tune ``init_model`` on the dataset(s), evaluate before/after, register the new version.

    Raises ``CancelledError`` when ``cancel()`` becomes true (nothing registered, work folder removed),
    ``NotBetterError`` when the new model is worse than ``init_model`` on the validation cases and
    ``config.register_worse`` is off (nothing registered, work folder removed), ``InputError`` for an
    unusable dataset, ``ModelError`` for a corrupted parent model.
    """
    from CMBDetectLib.model_registry import register_model
    from CMBDetectLib.training import train_model

    config = config or RetrainConfig()
    progress = progress or no_progress
    started = time.perf_counter()
    parent = init_model if isinstance(init_model, ModelPackage) else ModelPackage.load(init_model)
    if not dataset_dirs:
        raise InputError("no dataset given")
    warnings: list[str] = []
    progress(0.0, "checking the dataset")
    datasets = []
    for directory in dataset_dirs:
        dataset = load_dataset(directory)   # rolls back an interrupted export first
        problems = validate_dataset(directory)
        if problems:
            raise InputError(f"the dataset {directory} has {len(problems)} problem(s): {problems[0]}"
                             + (" ..." if len(problems) > 1 else ""))
        if not dataset.cases:
            raise InputError(f"the dataset {directory} has no case")
        datasets.append(dataset)
    modalities = {d.modality for d in datasets}
    if len(modalities) != 1:
        raise InputError(f"the datasets mix modalities {sorted(m or '?' for m in modalities)}; "
                         "retrain on one")
    modality = modalities.pop() or "swi"
    cases = [case for dataset in datasets for case in dataset.cases]
    train_cases, validation_cases = split_by_subject(cases, config.validation_fraction, config.seed)
    if not validation_cases:
        warnings.append("fewer than two subjects: no validation split, so no before/after metrics")
    if not train_cases:
        raise InputError("no training case left after the validation split")
    fingerprint = _combined_fingerprint(datasets)

    remove_stale_work_dirs()
    work_root().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=work_root()))
    try:
        train_view = make_dataset_view(train_cases, work / "train", modality)
        validation_view = (make_dataset_view(validation_cases, work / "validation", modality)
                           if validation_cases else None)
        training_dirs = [train_view]
        evaluate = config.evaluate and validation_view is not None
        metrics_before = None
        if evaluate:
            progress(0.02, f"evaluating {parent.label} on {len(validation_cases)} validation case(s)")
            metrics_before = evaluate_model(parent, validation_view, work / "before", config.device,
                                            scaled(progress, 0.02, 0.15), cancel)
        _check_cancel(cancel)
        if config.pseudo_labels and config.unreviewed_images:
            pseudo_dir, pseudo_warnings = make_pseudo_label_dataset(
                parent, config.unreviewed_images, config.unreviewed_modality or modality, work / "pseudo",
                config.pseudo_label_threshold, config.device, scaled(progress, 0.15, 0.2), cancel)
            warnings += pseudo_warnings
            if pseudo_dir is not None:
                training_dirs.append(pseudo_dir)
        _check_cancel(cancel)
        progress(0.2, f"fine-tuning {parent.label} on {len(train_cases)} case(s)")
        trained = train_model(training_dirs, work / "trained", training_options(config), config.seed,
                              scaled(progress, 0.2, 0.85), cancel, init_model=parent.path)
        _check_cancel(cancel)
        trained_package = trained if isinstance(trained, ModelPackage) else ModelPackage.load(
            trained if trained is not None else work / "trained")
        metrics_after = None
        if evaluate:
            progress(0.85, "evaluating the fine-tuned model")
            metrics_after = evaluate_model(trained_package, validation_view, work / "after", config.device,
                                           scaled(progress, 0.85, 0.97), cancel)
        _check_cancel(cancel)   # the last moment a Cancel is honoured: registering is quick and atomic
        comparison = compare_metrics(metrics_before, metrics_after)
        if comparison.verdict == WORSE and not config.register_worse:
            raise NotBetterError(not_better_message(parent.label, len(validation_cases), comparison),
                                 comparison, parent.label, [c.case for c in validation_cases])
        progress(0.97, "registering the new model version")
        package = register_model(
            trained_package, parent, dataset_fingerprint=fingerprint,
            dataset={"paths": [str(Path(d.root).resolve()) for d in datasets], "modality": modality,
                     "train_cases": [c.case for c in train_cases],
                     "validation_cases": [c.case for c in validation_cases],
                     "pseudo_label_images": list(config.unreviewed_images) if config.pseudo_labels else []},
            metrics_before=metrics_before, metrics_after=metrics_after,
            training={"retrain_config": config.to_dict(), "comparison": comparison.to_dict()})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(1.0, f"registered {package.label}")
    return RetrainResult(package, parent, metrics_before, metrics_after, [c.case for c in train_cases],
                         [c.case for c in validation_cases], fingerprint, warnings,
                         time.perf_counter() - started, comparison.to_dict())


def not_better_message(parent_label: str, n_validation: int, comparison: Comparison) -> str:
    """The one sentence of :class:`NotBetterError` (the CLI's error line)."""
    return (f"the fine-tuned model is worse than {parent_label} on the {n_validation} validation case(s): "
            f"{comparison.reason}; it was not registered and {parent_label} stays in use; rerun with "
            "--register-worse to keep it anyway")


def training_options(config: RetrainConfig) -> dict:
    """``config.training`` plus the time budget, split 60 / 40 between stage 1 and the student.

    The trainer scales a stage's ``max_minutes`` by ``finetune_step_fraction`` when fine-tuning, so the
    budget is divided by that fraction here: the user's "30 minutes" is then 30 minutes. A ``max_minutes``
    given explicitly in ``config.training`` wins.
    """
    options = json.loads(json.dumps(config.training))
    if config.time_budget_minutes is None:
        return options
    from CMBDetectLib.training import TrainingConfig

    fraction = TrainingConfig.from_dict(options).finetune_step_fraction or 1.0
    for stage, share in (("stage1", 0.6), ("student", 0.4)):
        stage_options = options.setdefault(stage, {})
        stage_options.setdefault("max_minutes", share * float(config.time_budget_minutes) / fraction)
    return options


def _combined_fingerprint(datasets: list) -> str:
    if len(datasets) == 1:
        return dataset_fingerprint(datasets[0].root)
    import hashlib

    digest = hashlib.sha256()
    for fingerprint in sorted(dataset_fingerprint(d.root) for d in datasets):
        digest.update(fingerprint.encode())
    return digest.hexdigest()


# ============================================================================================ command line
def add_retrain_arguments(parser: argparse.ArgumentParser, with_required: bool = True) -> None:
    """Options of a retraining run (also used by ``cmbdetect train --init``)."""
    if with_required:
        parser.add_argument("--init", required=True, metavar="MODEL",
                            help="model to start from (name, name-version or folder)")
        parser.add_argument("--dataset", required=True, action="append", metavar="DIR",
                            help="exported dataset (repeat for several)")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of subjects kept for before/after metrics (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--config", metavar="JSON",
                        help="training options as JSON text or a JSON file (steps, widths, ...)")
    parser.add_argument("--pseudo-labels", nargs="+", metavar="IMAGE", default=None,
                        help="off by default: also train on the current model's confident detections on "
                             "these unreviewed scans")
    parser.add_argument("--pseudo-label-threshold", type=float, default=0.9)
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="upper bound on the fine-tuning time (stage 1 and student together)")
    parser.add_argument("--no-evaluate", action="store_true", help="skip the before/after metrics")
    parser.add_argument("--register-worse", action="store_true",
                        help="off by default: register the fine-tuned model even if it is worse than the "
                             "model it started from on the validation cases (F1, then FPavg)")
    parser.add_argument("--progress", choices=("text", "json", "none"), default="text")


def _training_config(text: str | None) -> dict:
    if not text:
        return {}
    try:
        # JSON text starts with "{"; anything else is a file (a long JSON text is no valid file name).
        value = json.loads(text if text.lstrip().startswith("{") else Path(text).read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"cannot read the --config file {text}: {error.strerror or error}") from None
    except ValueError as error:
        raise InputError(f"--config is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise InputError("--config must be a JSON object")
    return value


def run_retrain_command(args: argparse.Namespace) -> int:
    """Run a retraining from parsed arguments (``--progress json`` ends with a ``"result"`` line)."""
    from CMBDetectLib.model_registry import describe_metrics
    from CMBDetectLib.progress import json_lines_progress, text_progress

    config = RetrainConfig(validation_fraction=args.validation_fraction, seed=args.seed, device=args.device,
                           training=_training_config(args.config), pseudo_labels=bool(args.pseudo_labels),
                           unreviewed_images=list(args.pseudo_labels or []),
                           pseudo_label_threshold=args.pseudo_label_threshold, evaluate=not args.no_evaluate,
                           time_budget_minutes=args.time_budget,
                           register_worse=bool(getattr(args, "register_worse", False)))
    progress = {"json": json_lines_progress, "text": text_progress}.get(args.progress, lambda: no_progress)()
    # Cancel in Slicer sends SIGTERM to the process group first: turn it into a clean CancelledError so
    # that the work folder is removed (a SIGKILL that follows is covered by remove_stale_work_dirs).
    previous = None
    if hasattr(signal, "SIGTERM"):
        def on_terminate(signum, frame):
            raise CancelledError("retraining cancelled")
        previous = signal.signal(signal.SIGTERM, on_terminate)
    try:
        result = retrain(args.init, args.dataset, config, progress)
    except NotBetterError as error:
        if args.progress == "json":   # for the panel: structured, before the error line on stderr
            print(json.dumps({"type": "not_better", "message": str(error), "parent": error.parent,
                              "validation_cases": error.validation_cases,
                              "comparison": error.comparison.to_dict() if error.comparison else None}),
                  flush=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if args.progress == "json":
        print(json.dumps(result.to_json_dict()), flush=True)
    else:
        before, after = headline(result.metrics_before), headline(result.metrics_after)
        print(f"registered {result.package.label} in {result.package.path}")
        if before or after:
            print(f"  validation ({len(result.validation_cases)} case(s)): "
                  f"before {describe_metrics(before)}; after {describe_metrics(after)}")
        if result.comparison:
            print(f"  compared with {result.parent.label}: {result.comparison['verdict']}, "
                  f"{result.comparison['reason']}")
        for warning in result.warnings:
            print(f"  warning: {warning}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m CMBDetectLib.retraining --init MODEL --dataset DIR [...]`` (what the panel runs)."""
    from CMBDetectLib.errors import CMBDetectError

    parser = argparse.ArgumentParser(prog="cmbdetect-retrain", description=__doc__.splitlines()[0])
    add_retrain_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_retrain_command(args)
    except CancelledError:
        print("cmbdetect retrain: cancelled", file=sys.stderr)
        return 130
    except CMBDetectError as error:
        print(f"cmbdetect retrain: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
