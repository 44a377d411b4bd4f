"""Evaluation of a task module over a split: exact AUC and logloss on every rank, for any number of
ranks, plus the task's own losses and, on request, its other predictors.

Ranks step together (sharded lookups are collective): a rank whose rows run out first evaluates
padding batches whose outputs are dropped. Predictions are gathered, so every rank computes the same
exact figures as one process would; or, streaming, per-rank AUC histograms are summed over ranks
(constant memory and traffic; the AUC within its reported ``auc_max_error``).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn

from recsys_kd.data.batch import padding_batch
from recsys_kd.data.reader import ParquetReader
from recsys_kd.distributed import DistributedContext, all_reduce, max_over_ranks
from recsys_kd.train.metrics import prediction_metrics


def evaluate(dmp: nn.Module, reader: ParquetReader, ctx: DistributedContext, predictors: bool = False,
             streaming: bool = False) -> Dict[str, Any]:
    """
    Collective. Scores the task module ``dmp`` (``forward(batch) -> (loss, TaskOutputs)``) over
    ``reader``'s split.

    Returns:
        ``auc``, ``logloss``, ``rows`` of the model's logits; ``<name>_loss``: the mean over rows of
        each of the task's named losses; with ``predictors``, ``predictors``: name -> the ``auc``,
        ``logloss`` and ``rows`` of each other predictor the task outputs (absent when it has none).
        ``streaming``: metrics from per-rank AUC histograms merged over ranks instead of gathered
        predictions (:func:`~recsys_kd.train.metrics.prediction_metrics`; adds ``auc_max_error``).
    """
    steps = max_over_ranks(reader.num_batches())
    batches = iter(reader)
    labels: List[torch.Tensor] = []
    logits: List[torch.Tensor] = []
    loss_sums: Dict[str, float] = {}
    scored: Dict[str, List[torch.Tensor]] = {}
    dmp.eval()
    with torch.no_grad():
        for _ in range(steps):
            batch = next(batches, None)
            padding = batch is None
            if padding:
                batch = padding_batch(reader.schema, reader.config.batch_size, reader.config.extras, reader.vector_widths)
            if ctx.world_size > 1:
                batch = batch.padded_to(reader.config.batch_size)  # equal batches on every rank
            batch = batch.to(ctx.device)
            _, outputs = dmp(batch)
            # names come from padding batches too, so every rank reduces the same ones in the same order
            for name, value in outputs.losses.items():
                loss_sums[name] = loss_sums.get(name, 0.0) + (0.0 if padding else float(value) * batch.rows)
            for name in outputs.predictors if predictors else ():
                scored.setdefault(name, [])
            if padding:
                continue
            labels.append(batch.real(batch.labels).cpu())
            logits.append(outputs.logits.float().cpu())
            for name, values in outputs.predictors.items() if predictors else ():
                scored[name].append(values.float().cpu())
    dmp.train()
    local_labels = torch.cat(labels) if labels else torch.zeros(0)
    metrics = prediction_metrics(local_labels, _cat(logits), streaming)
    if loss_sums:
        totals = torch.tensor([*loss_sums.values(), float(local_labels.shape[0])], dtype=torch.float64)
        all_reduce(totals)
        for index, name in enumerate(loss_sums):
            metrics[f"{name}_loss"] = float(totals[index] / max(float(totals[-1]), 1.0))
    if scored:
        metrics["predictors"] = {name: prediction_metrics(local_labels, _cat(values), streaming)
                                 for name, values in scored.items()}
    return metrics


def _cat(values: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat(values) if values else torch.zeros(0)
