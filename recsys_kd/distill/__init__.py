"""Knowledge distillation: teacher-ensemble inference writing soft labels (``infer``), the ``distill``
section (``config``), the distillation task and objective the generic trainer trains (``task``), the
KD losses of ECKD and KD-DAGFM (``losses``) and the ECKD teacher gate (``gating``)."""

from recsys_kd.distill.gating import TeacherGate
from recsys_kd.distill.losses import (
    KDLossConfig,
    detach_teacher,
    hard_label_bce,
    hint_loss,
    kd_loss,
    logit_mse,
    mean_teacher,
    soft_label_bce,
    weighted_teacher,
)

__all__ = [
    "KDLossConfig",
    "TeacherGate",
    "detach_teacher",
    "hard_label_bce",
    "hint_loss",
    "kd_loss",
    "logit_mse",
    "mean_teacher",
    "soft_label_bce",
    "weighted_teacher",
]
