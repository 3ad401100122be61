"""``cmbdetect train``: train (or fine-tune) stage 1, the teacher and the student into a model package."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import signal
import sys
import threading
from pathlib import Path

from CMBDetectLib.errors import CancelledError, InputError
from CMBDetectLib.progress import json_lines_progress, no_progress, text_progress

NAME = "train"
HELP = "train a CMB detection model (stage 1 + teacher + student) on exported datasets"

# How a total --max-minutes is shared between the stages (the default per-stage budgets' proportions).
_TIME_SHARE = {"stage1": 0.55, "teacher": 0.25, "student": 0.20}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", nargs="+", required=True, metavar="DIR",
                        help="dataset folder(s) in the exported layout (imagesTr, labelsTr, cmbdetect/...)")
    parser.add_argument("--stage2-dataset", nargs="+", default=[], metavar="DIR",
                        help="more dataset folder(s) that train only the teacher and the student (stage 1 "
                             "never sees them, so its candidates there are like those on a new scan)")
    parser.add_argument("--out", metavar="DIR",
                        help="new model folder (default: <user models folder>/<name>-<version>)")
    parser.add_argument("--init", metavar="MODEL",
                        help="fine-tune this model package (name or folder); without --out the result is "
                             "evaluated before/after on a validation split and registered as the next "
                             "version in the user model folder (the parent is never overwritten)")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="with --init: share of subjects kept for the before/after metrics")
    parser.add_argument("--config", metavar="JSON", help="training options file (TrainingConfig keys)")
    parser.add_argument("--register-worse", action="store_true",
                        help="with --init, off by default: register the new version even if it is worse than "
                             "the model it started from on the validation subjects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None)
    parser.add_argument("--stage1-steps", type=int, metavar="N", help="at most N optimiser steps for stage 1")
    parser.add_argument("--teacher-steps", type=int, metavar="N", help="at most N steps for the teacher")
    parser.add_argument("--student-steps", type=int, metavar="N", help="at most N steps for the student")
    parser.add_argument("--max-minutes", type=float, metavar="M",
                        help="time budget for all stages together (shared 55/25/20 %%)")
    parser.add_argument("--no-kd", action="store_true",
                        help="train the student without distillation (ablation: alpha=1, beta=0, no teacher)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its checkpoints (same --out)")
    parser.add_argument("--work-dir", metavar="DIR", help="checkpoints and log (default: <out>.work)")
    parser.add_argument("--cache-dir", metavar="DIR", help="feature cache (default: ~/.cache/cmbdetect)")
    parser.add_argument("--name", help="model name (default: cmbdetect-custom)")
    parser.add_argument("--version", dest="model_version", help="model version (default: a time stamp)")
    parser.add_argument("--progress", choices=["json", "text", "none"], default="text",
                        help="progress lines: json = one JSON object per line on stdout (for Slicer)")


def build_config(args: argparse.Namespace) -> dict:
    """The ``TrainingConfig`` dict: the --config file, then the command-line options on top."""
    config: dict = {}
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise InputError(f"cannot read the training config {args.config}: {error}") from None
    for stage, steps in (("stage1", args.stage1_steps), ("teacher", args.teacher_steps),
                         ("student", args.student_steps)):
        if steps is not None:
            config.setdefault(stage, {})["max_steps"] = int(steps)
    if args.max_minutes is not None:
        for stage, share in _TIME_SHARE.items():
            config.setdefault(stage, {})["max_minutes"] = float(args.max_minutes) * share
    for key, value in (("device", args.device), ("cache_dir", args.cache_dir), ("name", args.name),
                       ("version", args.model_version)):
        if value is not None:
            config[key] = value
    if args.no_kd:
        config["distillation"] = False
    return config


class _CancelOnSigterm:
    """While active, SIGTERM (the Slicer runner's Cancel) stops training between two steps, keeping
    the checkpoints for ``--resume``; the previous handler is restored afterwards."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous = None

    def __enter__(self) -> threading.Event:
        try:
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.event.set())
        except ValueError:  # not the main thread: no signal handling, cancel by killing
            self._previous = None
        return self.event

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run(args: argparse.Namespace) -> int:
    if args.init and not args.out:
        if args.stage2_dataset:
            print("cmbdetect train: --stage2-dataset needs --out (the registered retraining uses --dataset only)",
                  file=sys.stderr)
            return 2
        return _fine_tune_and_register(args)
    return _train(args)


def _fine_tune_and_register(args: argparse.Namespace) -> int:
    """``--init`` without ``--out``: the annotators' retraining (same code path as the Slicer panel)."""
    from CMBDetectLib.retraining import run_retrain_command

    training = build_config(args)
    for key in ("name", "version"):  # the registry names the new version after its parent
        training.pop(key, None)
    retrain_args = argparse.Namespace(
        init=args.init, dataset=list(args.dataset), validation_fraction=args.validation_fraction,
        seed=args.seed, device=args.device or "auto", config=json.dumps(training) if training else None,
        pseudo_labels=None, pseudo_label_threshold=0.9, time_budget=None, no_evaluate=False,
        register_worse=args.register_worse, progress=args.progress)
    return run_retrain_command(retrain_args)


def _train(args: argparse.Namespace) -> int:
    from CMBDetectLib.model_package import user_models_dir
    from CMBDetectLib.training import TrainingConfig, train_model

    try:
        settings = TrainingConfig.from_dict(build_config(args))
    except (TypeError, ValueError) as error:
        raise InputError(f"invalid training options: {error}") from None
    if settings.version is None:
        settings.version = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d.%H%M%S")
    out = Path(args.out) if args.out else user_models_dir() / f"{settings.name}-{settings.version}"
    if args.progress == "json":
        progress = json_lines_progress(sys.stdout)
    elif args.progress == "text":
        progress = text_progress(sys.stderr)
    else:
        progress = no_progress
    try:
        with _CancelOnSigterm() as cancel:
            package = train_model(args.dataset, out, settings, seed=args.seed, progress=progress,
                                  cancel=cancel, init_model=args.init, resume=args.resume,
                                  work_dir=args.work_dir, stage2_dataset_dirs=args.stage2_dataset)
    except CancelledError:
        print(f"cmbdetect train: cancelled; continue with the same command and --resume (--out {out})",
              file=sys.stderr)
        return 130
    summary = {"type": "result", "model": str(package.path), "name": package.name,
               "version": package.version, "thresholds": package.thresholds,
               "metrics": package.manifest.get("metrics", {}),
               "seconds": package.manifest.get("training", {}).get("seconds")}
    if args.progress == "json":
        sys.stdout.write(json.dumps(summary) + "\n")
        sys.stdout.flush()
    else:
        print(f"model saved: {package.path} (th_det {package.thresholds.get('th_det')}, "
              f"th_disc {package.thresholds.get('th_disc')})")
    return 0
