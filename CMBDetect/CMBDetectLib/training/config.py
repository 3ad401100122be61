"""Training configuration: plain dataclasses that round-trip through JSON (stored in ``model.json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from CMBDetectLib.training.augment import AugmentationConfig


@dataclass
class StageConfig:
    """Optimisation settings and budgets of one network (paper section 2.5 defaults where they apply).

    An "epoch" is ``steps_per_epoch`` sampled batches (patches are drawn at random, there is no fixed
    pass over the data). The learning rate is ``lr * lr_decay ** (epoch // lr_decay_every)``, floored at
    ``min_lr``; so ``steps_per_epoch`` sets how long the model trains at each learning rate. Training
    stops at ``epochs``, after ``patience`` epochs without a better validation loss, after ``max_steps``
    optimiser steps or after ``max_minutes``, whichever comes first; the best weights are kept.
    """

    patch_size: int = 24
    batch_size: int = 8
    epochs: int = 100
    steps_per_epoch: int = 50
    lr: float = 1e-3
    lr_decay: float = 0.1
    lr_decay_every: int = 2
    min_lr: float = 1e-6
    adam_eps: float = 1e-4
    patience: int = 20
    max_steps: int | None = None
    max_minutes: float | None = None
    validation_patches: int = 32
    positive_fraction: float = 0.5
    # stage 1 only: > 0 up-weights the cross-entropy of CMBs smaller than ~28 working voxels by
    # (28 / size) ** cmb_size_balance, at most 10x (sampling.size_balance_weights); 0 = the paper's loss.
    # Aimed at the tiny CMBs of 3-5 mm slices that stage 1 misses; not yet measured on the full recipe.
    cmb_size_balance: float = 0.0
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)

    @classmethod
    def from_dict(cls, values: dict | None, base: StageConfig | None = None) -> StageConfig:
        """``values`` override ``base`` (or the defaults); unknown keys are an error."""
        base = base or cls()
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown stage option(s): {', '.join(sorted(unknown))}")
        if "augmentation" in values and not isinstance(values["augmentation"], AugmentationConfig):
            merged = {**asdict(base.augmentation), **dict(values["augmentation"] or {})}
            values["augmentation"] = AugmentationConfig.from_dict(merged)
        return replace(base, **values)


def _stage1_defaults() -> StageConfig:
    # Trained on 32^3 patches (the network is fully convolutional; inference uses 48^3 windows): a
    # 48^3 x 8 step costs ~3.4x more on a CPU for little gain on 2-10 voxel CMBs.
    # 6 epochs x 100 steps: 200 steps at each of lr 1e-3, 1e-4, 1e-5 (~2-5 s per step on 2 cores).
    return StageConfig(patch_size=32, epochs=6, steps_per_epoch=100, patience=3, max_minutes=45.0,
                       validation_patches=32, positive_fraction=0.5,
                       augmentation=AugmentationConfig(translation_voxels=15))


def _teacher_defaults() -> StageConfig:
    return StageConfig(patch_size=24, epochs=6, steps_per_epoch=80, patience=3, max_minutes=20.0,
                       validation_patches=64, positive_fraction=0.5,
                       augmentation=AugmentationConfig(translation_voxels=3))


def _student_defaults() -> StageConfig:
    # Student patches are centred on candidates at inference, so only a small jitter here.
    # Adam eps 1e-8, not the paper's 1e-4: a student trained from scratch starts with gradients of 1e-4-1e-3,
    # which eps 1e-4 damps, and at some seeds it never left that plateau (scripts/make_model.py, 1.7.0).
    return StageConfig(patch_size=24, batch_size=16, epochs=6, steps_per_epoch=100, patience=3, adam_eps=1e-8,
                       max_minutes=15.0, validation_patches=512, positive_fraction=0.5,
                       augmentation=AugmentationConfig(translation_voxels=2))


@dataclass
class TrainingConfig:
    """Everything ``train_model`` needs besides the data; stored in the package's ``training`` record."""

    # architecture
    stage1_width: int = 16
    teacher_arm_channels: int = 32
    teacher_fc: tuple[int, ...] = (1024, 128, 32)
    student_width: int = 8
    student_arm_channels: int = 16
    student_fc: tuple[int, ...] = (256, 64, 16)
    inference_patch_size: int = 48            # stage-1 sliding-window ROI written to model.json
    # preprocessing (must match inference: written to model.json)
    working_spacing_mm: float = 0.8
    max_spacing_mm: float | None = None       # thick slices interpolated to this spacing (None: native)
    vessel_suppression: bool = True
    qsm_scaling: str = "compress"             # preprocessing.QSM_SCALINGS ("clip": packages up to 1.4.0)
    brain_mask: str | dict[str, str] = "otsu"  # preprocessing.BRAIN_MASK_METHODS, or one per modality
    vessel_context: bool = False              # teacher + student also see the image before vessel suppression
    overlap: float = 0.25
    evidence_threshold: float = 0.05
    # thresholds
    th_det: float = 0.5
    th_disc: float | None = None              # None: chosen on the validation candidates (best F1)
    # teacher / student
    central_radius: int = 4                   # a patch is CMB-positive if its central (2r+1)^3 holds a CMB
    # True: the teacher's classifier learns and is chosen on what the student classifies: 3/4 of its negatives
    # are false stage-1 candidates (False: 1/4, with mimics, hard negatives and random brain as the rest),
    # candidate patches carry their candidate label, and the checkpoint kept is the one whose classifier has
    # the lowest balanced CE on the validation candidates (False: the lowest multi-task loss). With False the
    # 1.9.4 teacher called false candidates 41 % CMB on average and its KD student lost to a CE-only one.
    teacher_candidates: bool = False
    distillation: bool = True                 # False: the paper's no-KD ablation (alpha=1, beta=0)
    alpha: float = 0.4
    beta: float = 0.6
    tau: float = 4.0
    student_add_ground_truth: bool = True     # also train on CMBs stage 1 missed (patches at their centre)
    # data
    validation_fraction: float = 0.2
    cache_dir: str | None = None              # feature cache; None: CMBDETECT_CACHE or ~/.cache/cmbdetect
    device: str = "auto"
    inference_batch_size: int = 8
    # fine-tuning from an existing package (init_model): fewer steps, lower learning rate
    finetune_lr: float = 1e-4
    finetune_step_fraction: float = 0.3
    # False: reuse the parent's teacher, or fine-tune a teacher-less parent's student with CE only (as it was trained)
    train_teacher_when_finetuning: bool = False
    # package
    name: str = "cmbdetect-custom"
    version: str | None = None                # None: a UTC time stamp
    description: str = ""
    stage1: StageConfig = field(default_factory=_stage1_defaults)
    teacher: StageConfig = field(default_factory=_teacher_defaults)
    student: StageConfig = field(default_factory=_student_defaults)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> TrainingConfig:
        """Nested dicts are merged into the defaults, so a config may name only what it changes."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        config = cls()
        stages = {name: StageConfig.from_dict(values.pop(name), getattr(config, name))
                  for name in ("stage1", "teacher", "student") if name in values}
        for key in ("teacher_fc", "student_fc"):
            if key in values:
                values[key] = tuple(values[key])
        from CMBDetectLib.preprocessing import QSM_SCALINGS, brain_mask_setting

        if values.get("qsm_scaling", config.qsm_scaling) not in QSM_SCALINGS:
            raise ValueError(f"qsm_scaling must be one of {', '.join(QSM_SCALINGS)}, not {values['qsm_scaling']!r}")
        if "brain_mask" in values:
            values["brain_mask"] = brain_mask_setting(values["brain_mask"])
        if values.get("vessel_context", config.vessel_context) and \
                not values.get("vessel_suppression", config.vessel_suppression):
            raise ValueError("vessel_context adds the image before vessel suppression: it needs vessel_suppression")
        return replace(config, **values, **stages)
