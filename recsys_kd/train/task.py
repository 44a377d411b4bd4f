"""The task module the trainer trains, and the objective that builds it.

The trainer knows no model: it wraps a *task module* in DistributedModelParallel and relies on the
contract of torchrec's ``DLRMTrain``: ``forward(batch) -> (loss, outputs)``. The loss is what one
step minimises; ``outputs`` (:class:`TaskOutputs`) is what evaluation scores. :class:`LabelTask` is
the plain CTR task (BCE on the labels); the distillation task lives in ``recsys_kd.distill``.

An :class:`Objective` builds the task module for a model and tells the trainer what else the task
needs: extra reader columns and side inputs, the validation metrics it adds, a pre-flight check of
its inputs, and its section of the run record. ``Objective()`` itself is the label task.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from recsys_kd.data.batch import Batch
from recsys_kd.data.schema import Schema
from recsys_kd.models.zoo import CTRModel

if TYPE_CHECKING:
    from recsys_kd.train.config import TrainConfig


class TaskOutputs(NamedTuple):
    """What a task module hands evaluation beside its loss.

    Attributes:
        logits: the trained model's logits ``[R]`` for the batch's R real rows.
        losses: named scalar losses of this batch (means over the batch), averaged over the split by
            evaluation as ``<name>_loss`` metrics (the distillation loss ECKD stops early on).
        predictors: other named logits ``[R]`` evaluation can score beside the model's (the
            teachers and their ensemble when distilling).
    """

    logits: torch.Tensor
    losses: Dict[str, torch.Tensor]
    predictors: Dict[str, torch.Tensor]


def embedding_l2(fields: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight`` * sum of squared looked-up field embeddings / batch size: the L2 regulariser of the
    KD-DAGFM/RecBole code, on the rows a batch used rather than on whole tables.

    Shapes: ``fields [B, F, D]`` (or ``[B, W]`` for fused low-rank codes) -> scalar.
    """
    return weight * fields.pow(2).sum() / _rows_at_least_one(fields)


@torch.fx.wrap
def _rows_at_least_one(tensor: torch.Tensor) -> int:
    """max(B, 1) for ``tensor [B, ...]``; a call torch.fx records without running it (the train
    pipeline traces the task module, and a traced tensor's size cannot steer ``max``)."""
    return max(tensor.shape[0], 1)


class LabelTask(nn.Module):
    """
    The CTR task: binary cross-entropy of the model's logits against the labels, plus the optional
    L2 on looked-up embeddings.

    Shapes: ``Batch`` (dense ``[B, n_dense]``, sparse KJT, labels ``[B]``) -> ``(loss (scalar),
    TaskOutputs(logits [R]))``, R = ``batch.rows``: a padded batch's loss and outputs are those of its
    real rows (a task module's contract).

    Example::

        task = LabelTask(build_model(schema, ModelConfig(name="dnn")))
        loss, outputs = task(batch)
        loss.backward()
    """

    def __init__(self, model: CTRModel, l2_embedding: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.l2_embedding = l2_embedding

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, TaskOutputs]:
        logits, _, fields = self.model.forward_with_hidden(batch.dense, batch.sparse)
        logits, fields = batch.real(logits), batch.real(fields)  # a padded batch's loss is its real rows'
        loss = F.binary_cross_entropy_with_logits(logits, batch.real(batch.labels))
        if self.l2_embedding:
            loss = loss + embedding_l2(fields, self.l2_embedding)
        return loss, TaskOutputs(logits, losses={}, predictors={})


Evaluate = Callable[[str], Dict[str, Any]]


class Objective:
    """What a run minimises, as the trainer needs to know it. This base class is the label task;
    ``recsys_kd.distill.task.DistillationObjective`` is the other one.

    Example::

        train(config, dataset, reader_config)                         # Objective(): labels
        train(config, dataset, reader_config, DistillationObjective(config.distill))
    """

    #: validation metrics a run can monitor
    metrics: Tuple[str, ...] = ("auc", "logloss")

    def columns(self) -> List[str]:
        """Extra columns every batch needs (``Batch.extras``), from the side inputs."""
        return []

    def side_inputs(self) -> List[Path]:
        """Directories of per-row columns aligned with the logs, joined by the reader."""
        return []

    def check_inputs(self, verify: bool = True) -> None:
        """Collective, before training: raises the same error on every rank when inputs are unusable
        (``verify``: checking file checksums too, as ``reader.verify`` says)."""

    def task(self, model: CTRModel, schema: Schema, config: "TrainConfig") -> nn.Module:
        """The task module around ``model``: ``forward(batch) -> (loss, TaskOutputs)``."""
        return LabelTask(model, config.optim.l2_embedding)

    def record(self, evaluate: Evaluate, test: Dict[str, Any], size: Dict[str, Any], schema: Schema) -> Dict[str, Any]:
        """Entries the objective adds to the run record, after the final test. ``evaluate(split)``
        evaluates the best model with its predictors; ``test`` is the test evaluation (its
        ``predictors`` entry is the objective's to consume); ``size``: the trained model's ``model``
        name, ``parameters`` and ``flops_per_example``."""
        return {}
