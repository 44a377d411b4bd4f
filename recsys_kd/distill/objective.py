"""What the trainer minimises when it distils: the student's loss against labels and teachers.

Teachers' logits come either from the soft labels written by ``infer`` (pre-train scheme: read as
extra columns beside the logs) or from a teacher trained in the same step (co-train scheme: its own
label loss trains it; the distillation terms never reach it). Several teachers are aggregated by
their mean, fixed weights, or the ECKD gating network (trained with the student through the
distillation terms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

import torch

from recsys_kd.distill.losses import KDLossConfig, hard_label_bce, logit_mse, soft_label_bce

COLUMN_PREFIX = "teacher_"


def teacher_column(name: str) -> str:
    """The soft-label column holding teacher ``name``'s logits."""
    return f"{COLUMN_PREFIX}{name}"


@dataclass
class DistillConfig:
    """``teachers``: names of the soft-label columns ``teacher_<name>`` (pre-train scheme) in
    ``soft_labels`` (an ``infer`` output); ``cotrain_teacher``: a model trained jointly instead.
    ``aggregation``: ``mean``, ``fixed`` (``weights``) or ``gate`` (ECKD eq. 11)."""

    scheme: Literal["pretrain", "cotrain"] = "pretrain"
    soft_labels: str = ""
    teachers: List[str] = field(default_factory=list)
    aggregation: Literal["mean", "fixed", "gate"] = "mean"
    weights: List[float] = field(default_factory=list)
    loss: KDLossConfig = field(default_factory=KDLossConfig)
    cotrain_teacher: Optional[Dict] = None

    def validate(self) -> None:
        self.loss.validate()
        if self.loss.hint:
            raise ValueError("loss.hint needs teacher hidden vectors, which infer does not write yet")
        if self.scheme == "pretrain" and not self.teachers:
            raise ValueError("scheme 'pretrain' needs teachers (names of infer's teacher_<name> columns)")
        if self.scheme == "cotrain" and not self.cotrain_teacher:
            raise ValueError("scheme 'cotrain' needs cotrain_teacher (a model config)")
        if self.aggregation == "fixed":
            if len(self.weights) != len(self.teachers) or abs(sum(self.weights) - 1) > 1e-6 or min(self.weights) < 0:
                raise ValueError(f"aggregation 'fixed' needs one weight >= 0 per teacher summing to 1, got {self.weights}")

    @property
    def columns(self) -> List[str]:
        return [teacher_column(name) for name in self.teachers] if self.scheme == "pretrain" else []


def teacher_matrix(extras: Dict[str, torch.Tensor], config: DistillConfig) -> Optional[torch.Tensor]:
    """[B, M] teacher logits from a batch's extra columns (pre-train scheme), else None."""
    if not config.columns:
        return None
    return torch.stack([extras[name] for name in config.columns], dim=1)


def aggregate(config: DistillConfig, teacher_logits: torch.Tensor) -> torch.Tensor:
    """[B, M] -> [B] by mean or fixed weights (the gate is applied inside the trained module)."""
    if config.aggregation == "fixed":
        return teacher_logits @ torch.tensor(config.weights, dtype=teacher_logits.dtype, device=teacher_logits.device)
    return teacher_logits.mean(dim=1)


def distillation_terms(
    config: KDLossConfig, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logit: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Every term of the student loss and the weighted ``total`` (KD-DAGFM eq. 14 / ECKD eq. 7).

    ``teacher_logit`` [B] is the (aggregated) teacher: raw teacher outputs must already be
    detached by the caller; a gate's output keeps its graph so the gate learns from these terms.
    ``distill`` is the weighted sum of the teacher terms alone (ECKD early stops on it)."""
    terms = {
        "hard": hard_label_bce(student_logits, labels),
        "soft": soft_label_bce(student_logits, teacher_logit, config.temperature),
        "mse": logit_mse(student_logits, teacher_logit),
    }
    weights = {"hard": config.hard, "soft": config.soft, "mse": config.mse}
    distill = sum(weights[name] * terms[name] for name in ("soft", "mse"))
    total = weights["hard"] * terms["hard"] + distill
    return {**terms, "distill": distill, "total": total}
