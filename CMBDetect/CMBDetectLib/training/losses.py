"""Loss functions of the three networks (paper sections 2.2.1, 2.3.1, 2.3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from monai.losses import DiceLoss
from torch import nn

CMB_WEIGHT = 10.0  # paper 2.2.1: CMB voxels up-weighted 10 times in the cross-entropy


class SegmentationLoss(nn.Module):
    """Stage-1 (and teacher segmentor) loss: class-weighted cross-entropy + Dice.

    Not MONAI's ``DiceCELoss(weight=...)``: it also applies the class weight to the Dice term (with
    ``include_background=False`` the Dice would simply be multiplied by 10), while the paper weights
    only the cross-entropy. Dice is computed over the whole batch (``batch=True``) because most
    patches contain no CMB, and a per-patch Dice of an empty patch is meaningless.
    """

    def __init__(self, cmb_weight: float = CMB_WEIGHT, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("class_weight", torch.tensor([1.0, float(cmb_weight)]))
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
        self.dice_weight = float(dice_weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                voxel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``logits [B, 2, D, H, W]``, ``labels [B, D, H, W]`` or ``[B, 1, D, H, W]`` in {0, 1}.

        ``voxel_weights [B, D, H, W]`` (optional) multiply the class weights of the cross-entropy voxel by
        voxel (the mean stays normalised by the total weight, as in ``F.cross_entropy``).
        """
        if labels.ndim == logits.ndim:
            labels = labels[:, 0]
        labels = labels.long()
        if voxel_weights is None:
            cross_entropy = F.cross_entropy(logits.float(), labels, weight=self.class_weight)
        else:
            weights = self.class_weight[labels] * voxel_weights.float()
            per_voxel = F.cross_entropy(logits.float(), labels, reduction="none")
            cross_entropy = (per_voxel * weights).sum() / weights.sum().clamp_min(1e-12)
        return cross_entropy + self.dice_weight * self.dice(logits.float(), labels[:, None])


class TeacherLoss(nn.Module):
    """Multi-task teacher loss: segmentation loss on T_s + cross-entropy on T_c (paper 2.3.1; the
    binary cross-entropy of a 2-logit softmax is this cross-entropy)."""

    def __init__(self, classification_weight: float = 1.0, cmb_weight: float = CMB_WEIGHT) -> None:
        super().__init__()
        self.segmentation = SegmentationLoss(cmb_weight)
        self.classification_weight = float(classification_weight)

    def forward(self, seg_logits: torch.Tensor, class_logits: torch.Tensor, voxel_labels: torch.Tensor,
                patch_labels: torch.Tensor) -> torch.Tensor:
        return (self.segmentation(seg_logits, voxel_labels)
                + self.classification_weight * F.cross_entropy(class_logits.float(), patch_labels.long()))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                      targets: torch.Tensor, alpha: float = 0.4, beta: float = 0.6,
                      tau: float = 4.0) -> torch.Tensor:
    """``alpha * CE(y, softmax(z_s)) + beta * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))``.

    Paper eq. 4 with Hinton's tau^2 factor, which keeps the soft-target gradients on the same scale as
    the hard-target ones whatever the temperature. Both inputs are LOGITS: softening probabilities a
    second time (the reference code's sigmoid teacher) gives near-uniform targets. The KL is averaged
    over the batch (``batchmean``, the mathematically correct KL). ``teacher_logits=None`` or
    ``beta=0`` gives the no-distillation ablation.
    """
    student_logits = student_logits.float()
    loss = alpha * F.cross_entropy(student_logits, targets.long())
    if teacher_logits is None or beta == 0:
        return loss
    log_student = F.log_softmax(student_logits / tau, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / tau, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return loss + beta * tau ** 2 * kl
