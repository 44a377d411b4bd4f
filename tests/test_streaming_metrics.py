"""StreamingMetrics: AUC within its stated bound of the exact AUC, exact logloss; partial results merged
(two halves == one pass) and summed across 2 gloo ranks (== merged)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recsys_kd.train.metrics import StreamingMetrics, auc, logloss, prediction_metrics


def _stream(rows: int = 20_000, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    labels = (generator.random(rows) < 0.3).astype(np.float32)
    probabilities = (1 / (1 + np.exp(-(generator.normal(size=rows) + labels)))).astype(np.float32)
    probabilities[:100] = 0.5  # ties across labels count one half, exactly as the Mann-Whitney statistic
    return labels, probabilities


def _metrics(labels: np.ndarray, probabilities: np.ndarray, batch: int = 3000) -> StreamingMetrics:
    metrics = StreamingMetrics()
    for start in range(0, len(labels), batch):
        metrics.update(labels[start:start + batch], probabilities[start:start + batch])
    return metrics


def test_streaming_metrics_match_the_exact_formulas() -> None:
    labels, probabilities = _stream()
    result = _metrics(labels, probabilities).result()
    exact = auc(labels, probabilities)
    assert abs(result["auc"] - exact) <= result["auc_max_error"] + 1e-12 and result["auc_max_error"] < 1e-3
    assert result["logloss"] == pytest.approx(logloss(labels, probabilities), rel=1e-9)
    assert result["rows"] == len(labels) and result["positives"] == int(labels.sum())
    assert StreamingMetrics().result() is None
    unlabelled = StreamingMetrics()
    unlabelled.update(None, probabilities)  # rows without labels (raw logs of a test set) count nothing
    assert unlabelled.result() is None


def test_merging_two_halves_equals_one_pass() -> None:
    labels, probabilities = _stream()
    whole = _metrics(labels, probabilities)
    half = len(labels) // 2 + 17
    merged = _metrics(labels[:half], probabilities[:half]).merge(_metrics(labels[half:], probabilities[half:]))
    np.testing.assert_array_equal(merged.positives, whole.positives)
    np.testing.assert_array_equal(merged.negatives, whole.negatives)
    assert merged.rows == whole.rows
    assert merged.loss_sum == pytest.approx(whole.loss_sum, rel=1e-12)
    expected, got = whole.result(), merged.result()
    assert got["auc"] == expected["auc"] and got["auc_max_error"] == expected["auc_max_error"]
    assert got["logloss"] == pytest.approx(expected["logloss"], rel=1e-12)
    assert abs(got["auc"] - auc(labels, probabilities)) <= got["auc_max_error"] + 1e-12
    assert StreamingMetrics().merge(whole).result() == expected  # merging into an empty stream


def test_all_reduce_without_a_process_group_changes_nothing() -> None:
    assert not dist.is_initialized()
    labels, probabilities = _stream(rows=3000)
    metrics = _metrics(labels, probabilities)
    before = metrics.result()
    assert metrics.all_reduce() is metrics and metrics.result() == before


def _all_reduce_as_rank(rank: int, init_file: Path, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        labels, probabilities = _stream()
        half = len(labels) // 2
        mine = slice(0, half) if rank == 0 else slice(half, None)
        result = _metrics(labels[mine], probabilities[mine]).all_reduce().result()
        (out / f"rank-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_all_reduce_over_two_ranks_equals_one_pass(tmp_path: Path) -> None:
    # spawn, not fork: threads earlier tests leave behind can hold locks a forked child inherits
    mp.start_processes(_all_reduce_as_rank, args=(tmp_path / "pg", tmp_path), nprocs=2, start_method="spawn")
    labels, probabilities = _stream()
    expected = _metrics(labels, probabilities).result()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert got["rows"] == expected["rows"] and got["positives"] == expected["positives"]
        assert got["auc"] == expected["auc"] and got["auc_max_error"] == expected["auc_max_error"]
        assert got["logloss"] == pytest.approx(expected["logloss"], rel=1e-12)


def test_streaming_evaluation_metrics_bound_the_exact_ones() -> None:
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(5000, generator=generator).round(decimals=2)  # ties, as real scores have
    labels = (torch.rand(5000, generator=generator) < torch.sigmoid(logits)).float()
    exact = prediction_metrics(labels, logits, streaming=False)
    streaming = prediction_metrics(labels, logits, streaming=True)
    assert streaming["rows"] == exact["rows"] == 5000
    assert abs(streaming["auc"] - exact["auc"]) <= streaming["auc_max_error"] + 1e-12
    assert streaming["logloss"] == pytest.approx(exact["logloss"], rel=1e-6)
    empty = prediction_metrics(torch.zeros(0), torch.zeros(0), streaming=True)
    assert empty["rows"] == 0 and math.isnan(empty["auc"])
