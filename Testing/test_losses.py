"""Loss functions: weighted CE + Dice, and the knowledge-distillation loss (paper eq. 4)."""

from __future__ import annotations

import math

import pytest
import torch

from CMBDetectLib.training.losses import SegmentationLoss, TeacherLoss, distillation_loss


def _softmax(values: list[float], tau: float = 1.0) -> list[float]:
    exps = [math.exp(v / tau) for v in values]
    return [e / sum(exps) for e in exps]


def test_distillation_loss_matches_a_hand_computation() -> None:
    student = torch.tensor([[2.0, -1.0], [0.5, 1.5]])
    teacher = torch.tensor([[3.0, 0.0], [-1.0, 2.0]])
    targets = torch.tensor([0, 1])
    alpha, beta, tau = 0.4, 0.6, 4.0
    ce = 0.0
    kl = 0.0
    for s, t, y in zip(student.tolist(), teacher.tolist(), targets.tolist()):
        ce += -math.log(_softmax(s)[y])
        p_t, p_s = _softmax(t, tau), _softmax(s, tau)
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    expected = alpha * ce / 2 + beta * tau ** 2 * kl / 2
    actual = distillation_loss(student, teacher, targets, alpha, beta, tau)
    assert float(actual) == pytest.approx(expected, rel=1e-5)


def test_identical_logits_leave_only_the_hard_label_term() -> None:
    logits = torch.tensor([[1.0, -2.0], [0.3, 0.7], [-1.0, 4.0]])
    targets = torch.tensor([0, 1, 1])
    kd = distillation_loss(logits, logits.clone(), targets, alpha=0.4, beta=0.6, tau=4.0)
    ce_only = 0.4 * torch.nn.functional.cross_entropy(logits, targets)
    assert float(kd) == pytest.approx(float(ce_only), abs=1e-6)


def test_teacher_confidence_changes_the_loss() -> None:
    student = torch.tensor([[0.2, 0.1], [0.0, 0.3]])
    targets = torch.tensor([0, 1])
    uniform = torch.zeros(2, 2)                      # what sigmoid-then-softmax targets degenerate to
    confident = torch.tensor([[6.0, -6.0], [-6.0, 6.0]])
    loss_uniform = distillation_loss(student, uniform, targets)
    loss_confident = distillation_loss(student, confident, targets)
    assert float(loss_confident) > float(loss_uniform) + 0.1


def test_distillation_gradient_moves_the_student_towards_the_teacher() -> None:
    student = torch.tensor([[0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-5.0, 5.0]])
    distillation_loss(student, teacher, torch.tensor([1]), alpha=0.0, beta=1.0).backward()
    assert student.grad[0, 1] < 0 < student.grad[0, 0]


def test_no_teacher_is_plain_cross_entropy() -> None:
    logits = torch.tensor([[1.0, 2.0]])
    targets = torch.tensor([0])
    expected = torch.nn.functional.cross_entropy(logits, targets)
    no_teacher = distillation_loss(logits, None, targets, alpha=1.0, beta=0.0)
    assert float(no_teacher) == pytest.approx(float(expected))
    assert float(distillation_loss(logits, logits * 3, targets, alpha=1.0, beta=0.0)) == pytest.approx(
        float(expected))


def test_segmentation_loss_weights_cmb_voxels_ten_times() -> None:
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    labels[0, 1, 1, 1] = 1
    logits = torch.zeros(1, 2, 4, 4, 4)  # p = 0.5 everywhere: CE per voxel = log 2
    loss = SegmentationLoss(dice_weight=0.0)
    assert float(loss(logits, labels)) == pytest.approx(math.log(2), rel=1e-5)
    # Wrong on the CMB voxel only: the weighted mean is (10 * CE_cmb) / (63 + 10).
    logits = torch.zeros(1, 2, 4, 4, 4)
    logits[:, 0] = 5.0
    logits[:, 1] = -5.0
    per_voxel_wrong = -torch.log_softmax(torch.tensor([5.0, -5.0]), 0)[1]
    per_voxel_right = -torch.log_softmax(torch.tensor([5.0, -5.0]), 0)[0]
    expected = (10 * per_voxel_wrong + 63 * per_voxel_right) / 73
    assert float(loss(logits, labels)) == pytest.approx(float(expected), rel=1e-5)


def test_segmentation_loss_dice_term_rewards_overlap() -> None:
    labels = torch.zeros(2, 1, 8, 8, 8)
    labels[0, 0, 2:4, 2:4, 2:4] = 1
    good = torch.full((2, 2, 8, 8, 8), -4.0)
    good[:, 0] = 4.0
    good[0, 1, 2:4, 2:4, 2:4], good[0, 0, 2:4, 2:4, 2:4] = 4.0, -4.0
    bad = good.clone()
    bad[0, 1, 2:4, 2:4, 2:4], bad[0, 0, 2:4, 2:4, 2:4] = -4.0, 4.0
    loss = SegmentationLoss()
    assert float(loss(good, labels)) < 0.1 < float(loss(bad, labels))


def test_teacher_loss_adds_the_patch_classification_term() -> None:
    seg = torch.zeros(2, 2, 8, 8, 8)
    labels = torch.zeros(2, 8, 8, 8)
    right = TeacherLoss()(seg, torch.tensor([[5.0, -5.0], [-5.0, 5.0]]), labels, torch.tensor([0, 1]))
    wrong = TeacherLoss()(seg, torch.tensor([[5.0, -5.0], [-5.0, 5.0]]), labels, torch.tensor([1, 0]))
    assert float(wrong) - float(right) == pytest.approx(10.0, abs=1e-3)
