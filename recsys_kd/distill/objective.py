"""What the trainer minimises when it distils: the student's loss against labels and teachers.

Teachers' logits come either from the soft labels written by ``infer`` (pre-train scheme: read as
extra columns beside the logs) or from a teacher trained in the same step (co-train scheme: its own
label loss trains it; the distillation terms never reach it). Several teachers are aggregated by
their mean, fixed weights, or the ECKD gating network (trained with the student through the
distillation terms). Hint regression (ECKD eq. 9) reads each teacher's hidden vector, from infer's
``hint_<name>`` columns or the co-trained teacher, through a learned projection per teacher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional

import torch

from recsys_kd.data.schema import SchemaError
from recsys_kd.distill.losses import KDLossConfig, hard_label_bce, logit_mse, soft_label_bce
from recsys_kd.runs import SIDE_INPUT_FILE

COLUMN_PREFIX = "teacher_"
HINT_PREFIX = "hint_"
COTRAIN_TEACHER = "cotrain"  # the co-trained teacher's key among the hint projections


def teacher_column(name: str) -> str:
    """The soft-label column holding teacher ``name``'s logits."""
    return f"{COLUMN_PREFIX}{name}"


def hint_column(name: str) -> str:
    """The soft-label column holding teacher ``name``'s hint vectors (fixed-size list<float32>)."""
    return f"{HINT_PREFIX}{name}"


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
        if self.scheme == "pretrain" and not self.teachers:
            raise ValueError("scheme 'pretrain' needs teachers (names of infer's teacher_<name> columns)")
        if self.scheme == "cotrain" and not self.cotrain_teacher:
            raise ValueError("scheme 'cotrain' needs cotrain_teacher (a model config)")
        if self.aggregation == "fixed":
            if len(self.weights) != len(self.teachers) or abs(sum(self.weights) - 1) > 1e-6 or min(self.weights) < 0:
                raise ValueError(f"aggregation 'fixed' needs one weight >= 0 per teacher summing to 1, got {self.weights}")

    @property
    def columns(self) -> List[str]:
        """The side-input columns a batch needs: logits, then hints when the hint term is on."""
        return [teacher_column(name) for name in self.teachers] + self.hint_columns if self.scheme == "pretrain" else []

    @property
    def hint_columns(self) -> List[str]:
        """The pre-train scheme's hint columns (empty when ``loss.hint`` is 0)."""
        return [hint_column(name) for name in self.teachers] if self.scheme == "pretrain" and self.loss.hint > 0 else []


def hint_widths(config: DistillConfig) -> Dict[str, int]:
    """Teacher name -> its hint width H, from the soft labels' ``side.json`` (pre-train scheme with
    ``loss.hint`` > 0; empty otherwise). Raises SchemaError naming the file when hints are missing."""
    if not config.hint_columns:
        return {}
    manifest_path = Path(config.soft_labels) / SIDE_INPUT_FILE
    try:
        vectors = json.loads(manifest_path.read_text()).get("vectors", {})
    except FileNotFoundError as error:
        raise SchemaError(f"{manifest_path}: not found; run infer before distilling") from error
    missing = [column for column in config.hint_columns if column not in vectors]
    if missing:
        raise SchemaError(
            f"{manifest_path}: no hint column {missing[0]!r} (loss.hint > 0); rerun infer with infer.hints=true"
        )
    return {name: int(vectors[hint_column(name)]) for name in config.teachers}


def teacher_hints(extras: Dict[str, torch.Tensor], config: DistillConfig) -> Optional[Dict[str, torch.Tensor]]:
    """Teacher name -> [B, H_i] hint vectors from a batch's extra columns (pre-train scheme with the
    hint term on), else None."""
    if not config.hint_columns:
        return None
    return {name: extras[hint_column(name)] for name in config.teachers}


def teacher_matrix(extras: Dict[str, torch.Tensor], config: DistillConfig) -> Optional[torch.Tensor]:
    """[B, M] teacher logits from a batch's extra columns (pre-train scheme), else None."""
    if not config.columns:
        return None
    return torch.stack([extras[teacher_column(name)] for name in config.teachers], dim=1)


def aggregate(config: DistillConfig, teacher_logits: torch.Tensor) -> torch.Tensor:
    """[B, M] -> [B] by mean or fixed weights (the gate is applied inside the trained module)."""
    if config.aggregation == "fixed":
        return teacher_logits @ torch.tensor(config.weights, dtype=teacher_logits.dtype, device=teacher_logits.device)
    return teacher_logits.mean(dim=1)


def distillation_terms(
    config: KDLossConfig,
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logit: torch.Tensor,
    hint: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Every term of the student loss and the weighted ``total`` (KD-DAGFM eq. 14 / ECKD eq. 7).

    ``teacher_logit`` [B] is the (aggregated) teacher: raw teacher outputs must already be
    detached by the caller; a gate's output keeps its graph so the gate learns from these terms.
    ``hint`` is the scalar hint-regression loss (ECKD eq. 9, see ``TrainingModule``), required when
    ``config.hint`` > 0. ``distill`` is the weighted sum of the teacher terms alone (ECKD early
    stops on it)."""
    terms = {
        "hard": hard_label_bce(student_logits, labels),
        "soft": soft_label_bce(student_logits, teacher_logit, config.temperature),
        "mse": logit_mse(student_logits, teacher_logit),
    }
    weights = {"hard": config.hard, "soft": config.soft, "mse": config.mse, "hint": config.hint}
    if hint is not None:
        terms["hint"] = hint
    elif config.hint > 0:
        raise ValueError("loss.hint > 0 needs the hint term (teacher hint vectors and a projection)")
    distill = sum(weights[name] * terms[name] for name in ("soft", "mse", "hint") if name in terms)
    total = weights["hard"] * terms["hard"] + distill
    return {**terms, "distill": distill, "total": total}
