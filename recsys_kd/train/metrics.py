"""AUC and logloss, the one home for both: exact (pure functions, and their multi-rank form) and
streaming (:class:`StreamingMetrics`, constant memory, for scoring whole datasets).

AUC is the Mann-Whitney statistic with ties counted half (the same value as sklearn's
``roc_auc_score``); logloss is the mean binary cross-entropy of probabilities clipped to
[1e-7, 1 - 1e-7] (FuxiCTR's convention). Across ranks, predictions are gathered so every rank
computes the same, exact figures whatever the number of ranks; streaming metrics sum their
histograms across ranks instead (:meth:`StreamingMetrics.all_reduce`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from recsys_kd.distributed import all_gather_rows, all_reduce

EPSILON = 1e-7
AUC_BUCKET_BITS = 20  # streaming AUC: 2**20 histogram buckets per label


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
    local = torch.stack([labels.double().cpu(), logits.double().cpu()], dim=1)  # [n, 2]
    merged = all_gather_rows(local)
    return {"labels": merged[:, 0].numpy(), "logits": merged[:, 1].numpy()}


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> Dict[str, float]:
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    return {"auc": auc(labels, logits), "logloss": logloss(labels, probabilities), "rows": int(len(labels))}


def prediction_metrics(labels: torch.Tensor, logits: torch.Tensor, streaming: bool) -> Dict[str, float]:
    """Collective: ``auc``, ``logloss`` and ``rows`` of every rank's ``labels`` and ``logits`` ``[n_r]``:
    exact (predictions gathered to every rank) or, ``streaming``, from per-rank
    :class:`StreamingMetrics` summed over ranks (adds ``auc_max_error``; the AUC is within it of the
    exact one). The same figures on every rank."""
    if not streaming:
        gathered = gather_predictions(labels, logits)
        return classification_metrics(gathered["labels"], gathered["logits"])
    metrics = StreamingMetrics()
    metrics.update(labels.double().cpu().numpy(), torch.sigmoid(logits.double()).cpu().numpy())
    result = metrics.all_reduce().result()
    if result is None:
        return {"auc": float("nan"), "logloss": float("nan"), "rows": 0, "auc_max_error": 0.0}
    return {key: result[key] for key in ("auc", "logloss", "rows", "auc_max_error")}


class StreamingMetrics:
    """AUC and logloss over a stream of (labels, probabilities) batches in constant memory.

    AUC: per label, a histogram of ``float32_bits(p) >> (31 - AUC_BUCKET_BITS)`` (for p in [0, 1] the
    bit pattern is increasing in p); buckets are walked in order, positive-negative pairs in the same
    bucket count one half. ``auc_max_error`` is half their share: the exact AUC lies within that of the
    reported one. Logloss: float64 sum of the clipped binary cross-entropy.

    Partial results combine: :meth:`merge` adds another stream's counts (e.g. another part's), and
    :meth:`all_reduce` sums them over the ranks of the process group.
    """

    def __init__(self) -> None:
        buckets = 1 << AUC_BUCKET_BITS
        self.positives = np.zeros(buckets, dtype=np.int64)
        self.negatives = np.zeros(buckets, dtype=np.int64)
        self.loss_sum = 0.0
        self.rows = 0

    def update(self, labels: Optional[np.ndarray], probabilities: np.ndarray) -> None:
        if labels is None:
            return
        p = np.clip(probabilities.astype(np.float64), EPSILON, 1 - EPSILON)
        self.loss_sum += float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).sum())
        self.rows += len(labels)
        bucket = probabilities.astype(np.float32).view(np.int32) >> (31 - AUC_BUCKET_BITS)
        positive = labels > 0.5
        self.positives += np.bincount(bucket[positive], minlength=len(self.positives))
        self.negatives += np.bincount(bucket[~positive], minlength=len(self.negatives))

    def merge(self, other: "StreamingMetrics") -> "StreamingMetrics":
        """Adds ``other``'s rows to these; returns self."""
        self.positives += other.positives
        self.negatives += other.negatives
        self.loss_sum += other.loss_sum
        self.rows += other.rows
        return self

    def all_reduce(self) -> "StreamingMetrics":
        """Sums every rank's rows into each rank's metrics (collective: every rank calls it); a no-op
        without a process group or with one process. Returns self."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        counts = all_reduce(torch.from_numpy(np.concatenate([self.positives, self.negatives, [self.rows]]))).numpy()
        loss = all_reduce(torch.tensor([self.loss_sum], dtype=torch.float64))
        buckets = len(self.positives)
        self.positives, self.negatives = counts[:buckets].copy(), counts[buckets:2 * buckets].copy()
        self.rows, self.loss_sum = int(counts[-1]), float(loss.item())
        return self

    def result(self) -> Optional[Dict[str, float]]:
        """{auc, auc_max_error, logloss, rows, positives}, or None when no labels were seen."""
        if self.rows == 0:
            return None
        positives, negatives = int(self.positives.sum()), int(self.negatives.sum())
        metrics: Dict[str, Any] = {"rows": self.rows, "positives": positives, "logloss": self.loss_sum / self.rows}
        if positives == 0 or negatives == 0:
            metrics.update(auc=float("nan"), auc_max_error=0.0)
            return metrics
        pos, neg = self.positives.astype(np.float64), self.negatives.astype(np.float64)
        below = np.cumsum(neg) - neg  # negatives in strictly lower buckets
        pairs = positives * negatives
        metrics["auc"] = float((pos * below).sum() + 0.5 * (pos * neg).sum()) / pairs
        metrics["auc_max_error"] = float(0.5 * (pos * neg).sum() / pairs)
        return metrics
