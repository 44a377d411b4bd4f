"""The ``distill`` section of a recipe: a student's training config plus how it learns from its teachers.

Teachers' logits come either from the soft labels written by ``infer`` (pre-train scheme: read as
extra columns ``teacher_<name>`` beside the logs) or from a teacher trained in the same step (co-train
scheme). Hint regression (ECKD eq. 9) reads each teacher's hidden vector from infer's ``hint_<name>``
columns or the co-trained teacher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional

from recsys_kd.data.schema import SchemaError
from recsys_kd.distill.losses import KDLossConfig
from recsys_kd.runs import SIDE_INPUT_FILE
from recsys_kd.train.config import TrainConfig

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


@dataclass
class StudentConfig(TrainConfig):
    """A student's training run: a ``TrainConfig`` and its ``distill`` section (the recipe's
    ``distill:`` has the keys of ``train:`` plus ``distill:``)."""

    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> None:
        super().validate()
        self.distill.validate()
