r"""The ECKD teacher gating network (Zhu et al., "Ensembled CTR Prediction via Knowledge Distillation",
CIKM 2020, section 3.3, equations 10-11)."""

from typing import Tuple

import torch
from torch import nn


class TeacherGate(nn.Module):
    r"""
    Per-example softmax weights over M teachers computed from the teachers' own logits, ECKD equation 11:

    .. math:: \alpha_i = \frac{\exp(w_i z_{T_i} + b_i)}{\sum_{j=1}^M \exp(w_j z_{T_j} + b_j)},
        \quad i = 1, \dots, M

    with one learnable scalar pair :math:`(w_i, b_i)` per teacher, and the ensemble teacher of equation 10,

    .. math:: z_T = \sum_{i=1}^M \alpha_i z_{T_i}

    The ensemble is taken over *logits*: equation 10 writes :math:`\sum_i \alpha_i T_i` without saying
    whether :math:`T_i` is a logit or a probability, but the soft-label loss it feeds (equation 8) divides
    the teacher's logit :math:`z_T` by the temperature, so the ensemble has to be a logit.

    :math:`w = 0, b = 0` at initialisation, so an untrained gate is the plain teacher average (the paper's
    "without gating" baseline, section 4.6.1); the gradient with respect to :math:`w_i` is non-zero there.
    The gate is trained jointly with the student (section 3.4.1): put its parameters in the student's
    optimizer and feed it *detached* teacher logits; its only training signal is the distillation loss.

    Args:
        num_teachers (int): M.

    Shapes: ``[B, M] -> ([B, M], [B])``.

    Example::

        gate = TeacherGate(num_teachers=3)
        alpha, z_t = gate(torch.randn(4, 3))  # alpha [4, 3] (rows sum to 1), z_t [4]
    """

    def __init__(self, num_teachers: int) -> None:
        super().__init__()
        if num_teachers < 1:
            raise ValueError(f"num_teachers must be >= 1, got {num_teachers}")
        self.num_teachers = num_teachers
        self.w = nn.Parameter(torch.zeros(num_teachers))
        self.b = nn.Parameter(torch.zeros(num_teachers))

    def forward(self, teacher_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            teacher_logits (torch.Tensor): :math:`z_{T_i}` of each teacher, shape [B, M].

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: the weights :math:`alpha`, shape [B, M], each row summing
            to 1; the ensemble logit :math:`sum_i alpha_i z_{T_i}`, shape [B].
        """
        if teacher_logits.dim() != 2 or teacher_logits.size(1) != self.num_teachers:
            raise ValueError(
                "teacher_logits must be [B, " + str(self.num_teachers) + "], got " + str(teacher_logits.shape)
            )
        alpha = torch.softmax(teacher_logits * self.w + self.b, dim=1)  # [B, M]
        return alpha, (alpha * teacher_logits).sum(dim=1)
