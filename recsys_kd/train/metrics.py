"""Evaluation metrics as pure functions, and their exact multi-rank form.

AUC is the Mann-Whitney statistic with ties counted half (the same value as sklearn's
``roc_auc_score``); logloss is the mean binary cross-entropy of probabilities clipped to
[1e-7, 1 - 1e-7] (FuxiCTR's convention). Across ranks, predictions are gathered so every rank
computes the same, exact figures whatever the number of ranks.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torch.distributed as dist

EPSILON = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; ties in ``scores`` count one half. NaN when one class is absent."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    positives = labels.sum()
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average rank within each run of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    average = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(average, ends - starts)
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def logloss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), EPSILON, 1 - EPSILON)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def gather_predictions(labels: torch.Tensor, logits: torch.Tensor) -> Dict[str, np.ndarray]:
    """All ranks' labels and logits, concatenated in rank order (every rank gets all)."""
    local = torch.stack([labels.double().cpu(), logits.double().cpu()])
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"labels": local[0].numpy(), "logits": local[1].numpy()}
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([local.shape[1]], dtype=torch.int64))
    largest = int(max(c.item() for c in counts))
    padded = torch.zeros(2, largest, dtype=torch.float64)
    padded[:, : local.shape[1]] = local
    gathered = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    merged = torch.cat([g[:, : int(c.item())] for g, c in zip(gathered, counts)], dim=1)
    return {"labels": merged[0].numpy(), "logits": merged[1].numpy()}


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> Dict[str, float]:
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    return {"auc": auc(labels, logits), "logloss": logloss(labels, probabilities), "rows": int(len(labels))}
