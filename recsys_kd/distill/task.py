"""The distillation task: what a student minimises against its labels and its teachers, as a task
module the generic trainer trains (``forward(batch) -> (loss, outputs)``), and the objective that
builds it, checks its inputs and writes its part of the run record.

Teachers' logits come from the soft labels ``infer`` wrote (pre-train scheme: extra columns beside
the logs) or from a teacher trained in the same step (co-train scheme: its own label loss trains it;
the distillation terms never reach it). Several teachers are aggregated by their mean, fixed weights
or the ECKD gate (trained with the student through the distillation terms). Hint regression (ECKD
eq. 9) projects each teacher's hidden vector into the student's through a learned ``W`` per teacher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from recsys_kd.config import from_dict
from recsys_kd.data.batch import Batch
from recsys_kd.data.reader import ReaderConfig
from recsys_kd.data.schema import Schema, SchemaError
from recsys_kd.data.side_inputs import verify_alignment
from recsys_kd.distill.config import COTRAIN_TEACHER, DistillConfig, StudentConfig, hint_column, hint_widths, teacher_column
from recsys_kd.distill.gating import TeacherGate
from recsys_kd.distill.losses import hint_loss, kd_loss, mean_teacher, weighted_teacher
from recsys_kd.distributed import all_gather_json
from recsys_kd.models.zoo import CTRModel, ModelConfig, build_model
from recsys_kd.runs import INFER_RECORD, SIDE_INPUT_FILE
from recsys_kd.train.task import Evaluate, Objective, TaskOutputs, embedding_l2
from recsys_kd.train.trainer import train

ENSEMBLE = "ensemble"  # the aggregated teacher among the predictors


class DistillationTask(nn.Module):
    """
    A student learning from labels and teachers (KD-DAGFM eq. 14, ECKD eq. 7), plus the optional L2 on
    looked-up embeddings. Everything the loss needs runs inside this module, so DistributedModelParallel
    (and DDP's hooks) see the ECKD ``gate``, a co-trained ``teacher`` and the hint ``projections``
    (teacher name, or ``COTRAIN_TEACHER`` -> ``W``: ``[B, H_i] -> [B, H_S]``).

    Shapes: ``Batch`` (dense ``[B, n_dense]``, sparse KJT, labels ``[B]``, extras ``teacher_<name>
    [B]`` and ``hint_<name> [B, H_i]`` in the pre-train scheme) -> ``(loss, TaskOutputs(logits [B],
    losses {"distill"}, predictors {"ensemble", <teacher name> ...: [B]}))``.

    Example::

        task = DistillationTask(student, DistillConfig(teachers=["dcn"], loss=KDLossConfig(hard=1, mse=1)))
        loss, outputs = task(batch)  # batch.extras["teacher_dcn"]: [B]
    """

    def __init__(self, model: CTRModel, config: DistillConfig, l2_embedding: float = 0.0,
                 gate: Optional[TeacherGate] = None, teacher: Optional[CTRModel] = None,
                 projections: Optional[Dict[str, nn.Module]] = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.l2_embedding = l2_embedding
        self.gate = gate
        self.teacher = teacher
        self.projections = nn.ModuleDict(projections) if projections else None

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, TaskOutputs]:
        logits, hidden, fields = (batch.real(t) for t in self.model.forward_with_hidden(batch.dense, batch.sparse))
        teachers, hints, own_loss = self._teachers(batch)
        ensemble = self._aggregate(teachers)
        hint = None
        if self.projections is not None:
            hint = torch.stack([hint_loss(hidden, hints[name], projection)
                                for name, projection in self.projections.items()]).mean()
        terms = kd_loss(self.config.loss, logits, batch.real(batch.labels), ensemble, hint)
        loss = terms["total"]
        if own_loss is not None:
            loss = loss + own_loss
        if self.l2_embedding:
            loss = loss + embedding_l2(fields, self.l2_embedding)
        names = [COTRAIN_TEACHER] if self.teacher is not None else self.config.teachers
        predictors = {ENSEMBLE: ensemble.detach(), **{name: teachers[:, i] for i, name in enumerate(names)}}
        return loss, TaskOutputs(logits, {"distill": terms["distill"].detach()}, predictors)

    def _teachers(self, batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """Detached teacher logits [R, M], hint vectors by name, and the co-trained teacher's own label
        loss (None in the pre-train scheme), for the batch's R real rows."""
        if self.teacher is not None:
            own, hidden, _ = (batch.real(t) for t in self.teacher.forward_with_hidden(batch.dense, batch.sparse))
            own_loss = F.binary_cross_entropy_with_logits(own, batch.real(batch.labels))
            return own.detach().unsqueeze(1), {COTRAIN_TEACHER: hidden.detach()}, own_loss
        teachers = torch.stack([batch.extras[teacher_column(name)] for name in self.config.teachers], dim=1)
        hints = {name: batch.real(batch.extras[hint_column(name)]).detach() for name in self.config.teachers} \
            if self.config.hint_columns else {}
        return batch.real(teachers).detach(), hints, None

    def _aggregate(self, teachers: torch.Tensor) -> torch.Tensor:
        """[B, M] -> [B]: the gate's per-example ensemble (keeps its graph), fixed weights or the mean."""
        if self.gate is not None:
            return self.gate(teachers)[1]
        if self.config.aggregation == "fixed":
            return weighted_teacher(teachers, torch.tensor(self.config.weights, device=teachers.device))
        return mean_teacher(teachers)


class DistillationObjective(Objective):
    """The distillation objective of a student run: reader inputs (the soft labels), the extra
    ``distill_loss`` metric, the alignment check of the soft labels against the logs, and the record's
    ``distillation`` section (teachers, ensemble and student side by side)."""

    metrics = ("auc", "logloss", "distill_loss")

    def __init__(self, config: DistillConfig) -> None:
        self.config = config

    def columns(self) -> List[str]:
        return self.config.columns

    def side_inputs(self) -> List[Path]:
        return [Path(self.config.soft_labels)] if self.config.columns else []

    def check_inputs(self, verify: bool = True) -> None:
        """Checks the soft labels against the logs (rank 0 reads, every rank raises the same error)."""
        if not self.config.columns:
            return
        error = None
        if dist.get_rank() == 0:
            try:
                soft_labels = Path(self.config.soft_labels)
                manifest = soft_labels / SIDE_INPUT_FILE
                side = json.loads(manifest.read_text()) if manifest.exists() else {}
                verify_alignment(Path(side.get("dataset", "")), soft_labels, verify=verify)
            except Exception as failure:  # re-raised on every rank below
                error = str(failure)
        verdict = all_gather_json(error)[0]  # rank 0's, as JSON: nothing unpickled
        if verdict is not None:
            raise SchemaError(verdict)

    def task(self, model: CTRModel, schema: Schema, config: StudentConfig) -> nn.Module:
        distill = self.config
        gate = TeacherGate(len(distill.teachers)) if distill.aggregation == "gate" else None
        teacher = (build_model(schema, self._cotrain_config(), embedding_device=torch.device("meta"))
                   if distill.scheme == "cotrain" else None)
        return DistillationTask(model, distill, config.optim.l2_embedding, gate=gate, teacher=teacher,
                                projections=self._projections(model, teacher))

    def _projections(self, model: CTRModel, teacher: Optional[CTRModel]) -> Optional[Dict[str, nn.Module]]:
        """ECKD eq. 9's W per teacher, ``[B, H_teacher] -> [B, H_student]``, when the hint term is on.
        Bias-free as in the paper; trained with the student (dense parameters of the task module)."""
        if self.config.loss.hint <= 0:
            return None
        widths = {COTRAIN_TEACHER: teacher.hidden_dim} if teacher is not None else hint_widths(self.config)
        return {name: nn.Linear(width, model.hidden_dim, bias=False) for name, width in widths.items()}

    def _cotrain_config(self) -> ModelConfig:
        return from_dict(ModelConfig, self.config.cotrain_teacher, source="distill.cotrain_teacher")

    def record(self, evaluate: Evaluate, test: Dict[str, Any], size: Dict[str, Any], schema: Schema) -> Dict[str, Any]:
        """``distillation``: each teacher's, the ensemble's and the student's AUC and logloss on valid and
        test, parameters and FLOPs per example (the best model; the trainer's final test loaded it). The
        predictors leave ``test``."""
        valid = evaluate("valid")
        valid_predictors, test_predictors = valid.pop("predictors"), test.pop("predictors")
        sizes = self._teacher_sizes(schema)
        teachers = {name: {**sizes[name], "valid": valid_predictors[name], "test": test_predictors[name]} for name in sizes}
        return {"distillation": {
            "aggregation": self.config.aggregation,
            "teachers": teachers,
            "ensemble": {"parameters": {"total": sum(t["parameters"]["total"] for t in teachers.values())},
                         "flops_per_example": sum(t["flops_per_example"] for t in teachers.values()),
                         "valid": valid_predictors[ENSEMBLE], "test": test_predictors[ENSEMBLE]},
            "student": {**size, "valid": valid, "test": test},
        }}

    def _teacher_sizes(self, schema: Schema) -> Dict[str, Dict[str, Any]]:
        """name -> model, parameters and FLOPs per example of each teacher: from infer's record
        (pre-train scheme), or the co-trained teacher's config (built with tables on the meta device)."""
        if self.config.scheme == "cotrain":
            model_config = self._cotrain_config()
            model = build_model(schema, model_config, embedding_device=torch.device("meta"))
            return {COTRAIN_TEACHER: {"model": model_config.name, "parameters": model.num_parameters(),
                                      "flops_per_example": model.flops_per_example()}}
        record_path = Path(self.config.soft_labels) / INFER_RECORD
        try:
            recorded = json.loads(record_path.read_text())["teachers"]
        except FileNotFoundError as error:
            raise SchemaError(f"{record_path}: not found; the soft labels have no infer record") from error
        missing = [name for name in self.config.teachers if name not in recorded]
        if missing:
            raise SchemaError(f"{record_path}: no teacher {missing[0]!r} (distill.teachers {self.config.teachers})")
        return {name: {key: recorded[name][key] for key in ("model", "parameters", "flops_per_example")}
                for name in self.config.teachers}


def distill(config: StudentConfig, dataset: Path, reader_config: ReaderConfig) -> Dict[str, Any]:
    """The ``distill`` stage: trains the student with the generic trainer and this objective; returns
    its record (``train.json`` with a ``distillation`` section)."""
    return train(config, dataset, reader_config, DistillationObjective(config.distill))
