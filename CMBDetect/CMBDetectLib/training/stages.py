"""The three training stages as (train step, validation) pairs for :func:`loop.train_stage`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn

from CMBDetectLib.networks import StudentNet, TeacherNet
from CMBDetectLib.progress import ProgressCallback
from CMBDetectLib.training.config import StageConfig, TrainingConfig
from CMBDetectLib.training.data import TrainingCase
from CMBDetectLib.training.log import JsonLinesLog
from CMBDetectLib.training.loop import StageResult, train_stage
from CMBDetectLib.training.losses import SegmentationLoss, TeacherLoss, distillation_loss
from CMBDetectLib.training.sampling import (
    CandidateSampler,
    PatchItem,
    TeacherSampler,
    sample_segmentation_batch,
)


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def _batched_mean(function, count: int, batch_size: int) -> float:
    """Mean of ``function(start, stop)`` over mini-batches, weighted by their size."""
    total, seen = 0.0, 0
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        total += float(function(start, stop)) * (stop - start)
        seen += stop - start
    return total / max(seen, 1)


def train_segmentation_stage(network: nn.Module, cases: list[TrainingCase], train: list[int],
                             validation: list[int], config: StageConfig, *, seed: int, device: torch.device,
                             checkpoint: Path | None, log: JsonLinesLog, progress: ProgressCallback | None,
                             cancel) -> StageResult:
    """Stage 1: the shallow U-Net on patches ~half of which hold a CMB (weighted CE + Dice)."""
    loss_function = SegmentationLoss().to(device)
    network.to(device)

    balance = float(config.cmb_size_balance)

    def loss(model: nn.Module, batch: tuple[np.ndarray, ...]) -> torch.Tensor:
        x, y, *weights = batch
        return loss_function(model(_tensor(x, device)), _tensor(y, device),
                             _tensor(weights[0], device) if weights else None)

    def step(model: nn.Module, rng: np.random.Generator) -> torch.Tensor:
        return loss(model, sample_segmentation_batch(cases, train, rng, config.batch_size, config.patch_size,
                                                     config.positive_fraction, config.augmentation, balance))

    validation_batch = sample_segmentation_batch(cases, validation, np.random.default_rng([seed, 101]),
                                                 config.validation_patches, config.patch_size,
                                                 config.positive_fraction, config.augmentation.disabled(),
                                                 balance)

    def validate(model: nn.Module) -> float:
        return _batched_mean(lambda a, b: loss(model, tuple(part[a:b] for part in validation_batch)),
                             len(validation_batch[0]), config.batch_size)

    return train_stage("stage1", network, config, step, validate, seed=seed, checkpoint_path=checkpoint,
                       log=log, progress=progress, cancel=cancel)


def train_teacher_stage(teacher: TeacherNet, cases: list[TrainingCase], train: list[int],
                        validation: list[int], candidates: list[PatchItem], settings: TrainingConfig, *,
                        seed: int, device: torch.device, checkpoint: Path | None, log: JsonLinesLog,
                        progress: ProgressCallback | None, cancel,
                        validation_candidates: list[PatchItem] | None = None) -> StageResult:
    """Teacher: multi-task (segmentation + patch classification) on 24^3 patches.

    With ``settings.teacher_candidates`` it is validated (early stopping, the checkpoint kept) by the balanced
    CE of its classifier on ``validation_candidates``, the student's validation patches.
    """
    config = settings.teacher
    loss_function = TeacherLoss().to(device)
    teacher.to(device)
    share = 0.75 if settings.teacher_candidates else None
    sampler = TeacherSampler(cases, train, candidates, config.patch_size, settings.central_radius,
                             np.random.default_rng([seed, 201]), share)

    def step(model: nn.Module, rng: np.random.Generator) -> torch.Tensor:
        x, y, c = sampler.sample(rng, config.batch_size, config.positive_fraction, config.augmentation)
        seg, cls = model(_tensor(x, device))
        return loss_function(seg, cls, _tensor(y, device), _tensor(c, device))

    # a checkpoint of the other kind of teacher is not resumed
    fingerprint = {"teacher_candidates": True} if settings.teacher_candidates else None
    if settings.teacher_candidates and validation_candidates:
        validate = candidate_validation(lambda model, x: model.classify(x), cases, validation_candidates,
                                        config.patch_size, settings.student.validation_patches, seed, device)
    else:
        validation_sampler = TeacherSampler(cases, validation, candidates, config.patch_size,
                                            settings.central_radius, np.random.default_rng([seed, 202]), share)
        val_x, val_y, val_c = validation_sampler.sample(np.random.default_rng([seed, 203]),
                                                        config.validation_patches, config.positive_fraction,
                                                        config.augmentation.disabled())

        def validate(model: nn.Module) -> float:
            def loss(a: int, b: int) -> torch.Tensor:
                seg, cls = model(_tensor(val_x[a:b], device))
                return loss_function(seg, cls, _tensor(val_y[a:b], device), _tensor(val_c[a:b], device))

            return _batched_mean(loss, len(val_x), config.batch_size)

    return train_stage("teacher", teacher, config, step, validate, seed=seed, checkpoint_path=checkpoint,
                       log=log, progress=progress, cancel=cancel, fingerprint_extra=fingerprint)


def balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of the per-class mean cross-entropies: validation candidates are mostly negatives, and an
    unweighted loss would reward a student that calls everything a non-CMB."""
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    per_class = [losses[labels == c].mean() for c in (0, 1) if bool((labels == c).any())]
    return torch.stack(per_class).mean()


def candidate_validation(classify, cases: list[TrainingCase], items: list[PatchItem], patch_size: int,
                         limit: int, seed: int, device: torch.device):
    """``validate(model)``: the balanced CE of ``classify(model, x)`` (class logits) on the unaugmented patches of
    ``items`` (at most ``limit``, a seeded subset), the criterion of the student and of a candidate teacher."""
    val_x, val_y = CandidateSampler(cases, items, patch_size).all_patches(limit, np.random.default_rng([seed, 301]))

    def validate(model: nn.Module) -> float:
        if len(val_x) == 0:
            return 0.0
        logits = torch.cat([classify(model, _tensor(val_x[a:a + 64], device)) for a in range(0, len(val_x), 64)])
        return float(balanced_cross_entropy(logits, _tensor(val_y, device)))

    return validate


def train_student_stage(student: StudentNet, teacher: nn.Module | None, cases: list[TrainingCase],
                        train_items: list[PatchItem], validation_items: list[PatchItem],
                        settings: TrainingConfig, *, seed: int, device: torch.device,
                        checkpoint: Path | None, log: JsonLinesLog, progress: ProgressCallback | None,
                        cancel) -> StageResult:
    """Student on candidate-centred patches with the distillation loss (or plain CE for the ablation)."""
    config = settings.student
    distil = settings.distillation and teacher is not None
    alpha, beta = (settings.alpha, settings.beta) if distil else (1.0, 0.0)
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    sampler = CandidateSampler(cases, train_items, config.patch_size)
    validate = candidate_validation(lambda model, x: model(x), cases, validation_items, config.patch_size,
                                    config.validation_patches, seed, device)

    def step(model: nn.Module, rng: np.random.Generator) -> torch.Tensor:
        x, y = sampler.sample(rng, config.batch_size, config.positive_fraction, config.augmentation)
        inputs = _tensor(x, device)
        teacher_logits = None
        if distil:
            with torch.no_grad():
                teacher_logits = teacher.classify(inputs) if hasattr(teacher, "classify") else teacher(inputs)
        return distillation_loss(model(inputs), teacher_logits, _tensor(y, device), alpha, beta, settings.tau)

    return train_stage("student", student, config, step, validate, seed=seed, checkpoint_path=checkpoint,
                       log=log, progress=progress, cancel=cancel,
                       fingerprint_extra={"distillation": distil, "alpha": alpha, "beta": beta,
                                          "tau": settings.tau})


def score_items(student: nn.Module, cases: list[TrainingCase], items: list[PatchItem], patch_size: int,
                device: torch.device, flips: bool = False) -> np.ndarray:
    """Student CMB probability of every item (unaugmented patches; ``flips``: the 8-view average that the
    pipeline uses for a model with ``inference.student_flips``)."""
    from CMBDetectLib.networks.discriminator import student_probabilities

    x, _ = CandidateSampler(cases, items, patch_size).all_patches()
    if len(x) == 0:
        return np.zeros(0)
    student.to(device).eval()
    with torch.no_grad():
        scores = [student_probabilities(student, _tensor(x[a:a + 64], device), flips)
                  for a in range(0, len(x), 64)]
    return torch.cat(scores).cpu().numpy()
