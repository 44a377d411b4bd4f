"""Synthetic click logs with planted feature interactions and a known ground-truth CTR.

Each sparse field f has a vocabulary of V_f values with Zipf-like popularity P(r) ~ (r + 1)^-zipf.
The true logit of a row is

    z = b + sum_f w_f[x_f]                                          (first order)
          + sum_j a_j * log1p(v_j)                                  (dense, first order)
          + s2 * sum_{(f,g) in P2} <u_f[x_f], u_g[x_g]>             (planted pairs)
          + s3 * sum_{(f,g,h) in P3} sum_k u_f[x_f,k] u_g[x_g,k] u_h[x_h,k]   (planted triples)
          + s4 * sum_{(f,g,h,i) in P4} sum_k u_f u_g u_h u_i                  (planted 4th order)

and the label is Bernoulli(sigmoid(z)). Shallow models (LR, FM) cannot represent the 3rd/4th-order
terms, so deep/high-order models measurably beat them. Generation is chunked, chunk c drawn from
a generator seeded by (seed, c): any size, deterministic by seed, bounded memory. The true logit is
written as the extra column ``true_logit`` so the Bayes-optimal AUC is known.

Two outputs: Parquet rows with ids directly (``SyntheticSource``, format ``synthetic``), or raw
Criteo-format TSV (``write_criteo_tsv``) that the Criteo converter then reads, as real logs would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from recsys_kd.data.ids import splitmix64
from recsys_kd.data.quarantine import Quarantine
from recsys_kd.data.schema import MISSING_ID, RESERVED_IDS
from recsys_kd.data.sections import deal_rows
from recsys_kd.data.source import LABEL, Section, SourceChunk, SourceInfo
from recsys_kd.io import atomic_file

TRUE_LOGIT = "true_logit"


@dataclass
class SyntheticConfig:
    rows: int = 100_000
    seed: int = 0
    sparse_features: int = 26
    dense_features: int = 13
    max_vocab: int = 10_000
    min_vocab: int = 8
    zipf: float = 1.05
    missing_rate: float = 0.02
    latent_dim: int = 4
    pairs: int = 10
    triples: int = 8
    quadruples: int = 4
    first_order_scale: float = 0.5
    pair_scale: float = 0.6
    triple_scale: float = 0.9
    quadruple_scale: float = 0.9
    base_ctr: float = 0.25
    chunk_rows: int = 65536

    def validate(self) -> None:
        if self.rows <= 0 or self.sparse_features < 4 or self.dense_features < 0:
            raise ValueError("synthetic: need rows > 0, sparse_features >= 4, dense_features >= 0")
        if not 2 <= self.min_vocab <= self.max_vocab:
            raise ValueError(f"synthetic: need 2 <= min_vocab <= max_vocab, got {self.min_vocab}, {self.max_vocab}")
        if not 0 < self.base_ctr < 1:
            raise ValueError(f"synthetic: base_ctr must be in (0, 1), got {self.base_ctr}")


@dataclass
class GroundTruth:
    """The planted model: vocab sizes, popularity CDFs, weights, latent vectors, interaction sets."""

    vocab_sizes: List[int]
    cdfs: List[np.ndarray]
    first_order: List[np.ndarray]
    latent: List[np.ndarray]
    dense_weights: np.ndarray
    dense_log_means: np.ndarray
    pairs: np.ndarray
    triples: np.ndarray
    quadruples: np.ndarray
    bias: float


def ground_truth(config: SyntheticConfig) -> GroundTruth:
    rng = np.random.default_rng([config.seed, 0x5EED])
    fields = config.sparse_features
    sizes = np.exp(rng.uniform(np.log(config.min_vocab), np.log(config.max_vocab), fields)).astype(int)
    cdfs, first, latent = [], [], []
    for size in sizes:
        weights = (np.arange(size) + 1.0) ** -config.zipf
        cdfs.append(np.cumsum(weights) / weights.sum())
        first.append(rng.normal(0.0, config.first_order_scale, size))
        latent.append(rng.normal(0.0, 1.0, (size, config.latent_dim)))
    combos = lambda order, count: np.array(
        [np.sort(rng.choice(fields, order, replace=False)) for _ in range(count)], dtype=np.int64
    ).reshape(count, order)
    truth = GroundTruth(
        vocab_sizes=[int(s) for s in sizes],
        cdfs=cdfs,
        first_order=first,
        latent=latent,
        dense_weights=rng.normal(0.0, 0.3, config.dense_features),
        dense_log_means=rng.uniform(0.0, 4.0, config.dense_features),
        pairs=combos(2, config.pairs),
        triples=combos(3, config.triples),
        quadruples=combos(4, config.quadruples),
        bias=0.0,
    )
    # Calibrate the bias on a probe sample so the mean CTR is close to base_ctr.
    probe = _draw(config, truth, np.random.default_rng([config.seed, 0xCA1]), 20_000)
    logits = probe["true_logit"]
    low, high = -20.0, 20.0
    for _ in range(60):
        middle = (low + high) / 2
        if np.mean(1 / (1 + np.exp(-(logits + middle)))) < config.base_ctr:
            low = middle
        else:
            high = middle
    truth.bias = (low + high) / 2
    return truth


def _draw(config: SyntheticConfig, truth: GroundTruth, rng: np.random.Generator, rows: int) -> Dict[str, np.ndarray]:
    """One chunk: ranks [F, rows] (-1 = missing), dense counts [D, rows] (NaN = missing), logits, labels."""
    fields = config.sparse_features
    ranks = np.empty((fields, rows), dtype=np.int64)
    for f in range(fields):
        ranks[f] = np.searchsorted(truth.cdfs[f], rng.random(rows), side="right")
        np.minimum(ranks[f], truth.vocab_sizes[f] - 1, out=ranks[f])
    missing = rng.random((fields, rows)) < config.missing_rate
    logit = np.full(rows, truth.bias)
    vectors = []
    for f in range(fields):
        weight = truth.first_order[f][ranks[f]]
        vector = truth.latent[f][ranks[f]]
        weight[missing[f]] = 0.0
        vector[missing[f]] = 0.0
        logit += weight
        vectors.append(vector)
    for order, combos, scale in (
        (2, truth.pairs, config.pair_scale),
        (3, truth.triples, config.triple_scale),
        (4, truth.quadruples, config.quadruple_scale),
    ):
        if len(combos):
            norm = scale / np.sqrt(len(combos) * config.latent_dim)
            for combo in combos:
                product = np.ones((rows, config.latent_dim))
                for f in combo:
                    product = product * vectors[f]
                logit += norm * product.sum(axis=1)
    dense = np.floor(np.exp(rng.normal(truth.dense_log_means[:, None], 1.0, (config.dense_features, rows))))
    dense[rng.random(dense.shape) < config.missing_rate] = np.nan
    logit += (truth.dense_weights[:, None] * (np.log1p(np.nan_to_num(dense)) - truth.dense_log_means[:, None])).sum(0)
    ranks[missing] = -1
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return {"ranks": ranks, "dense": dense, "true_logit": logit, "label": labels}


def _chunks(config: SyntheticConfig, truth: GroundTruth, first: int = 0, end: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
    """The chunks of rows [first, end) (whole chunks: ``first`` is a chunk start)."""
    end = config.rows if end is None else end
    for start in range(first, end, config.chunk_rows):
        index = start // config.chunk_rows
        rows = min(config.chunk_rows, config.rows - start)
        chunk = _draw(config, truth, np.random.default_rng([config.seed, 0xDA7A, index]), rows)
        chunk["row_id"] = np.arange(start, start + rows, dtype=np.int64)
        yield chunk


def sparse_names(config: SyntheticConfig) -> List[str]:
    return [f"C{i}" for i in range(1, config.sparse_features + 1)]


def dense_names(config: SyntheticConfig) -> List[str]:
    return [f"I{i}" for i in range(1, config.dense_features + 1)]


class SyntheticSource:
    """Generated rows with ids already in range (identity rule): id = popularity rank + 2, 0 =
    missing; dense = log1p(count). Extra column ``true_logit``."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.truth = ground_truth(config)
        self.info = SourceInfo(
            name="synthetic",
            dense=dense_names(config),
            sparse=sparse_names(config),
            identity_sizes={
                name: size + RESERVED_IDS for name, size in zip(sparse_names(config), self.truth.vocab_sizes)
            },
            extra=[TRUE_LOGIT],
        )
        self.dropped_by_rule: Dict[str, int] = {}

    def progress_total(self) -> int:
        return self.config.rows

    def deal(self, world_size: int) -> List[List[Section]]:
        return deal_rows(self.config.rows, self.config.chunk_rows, world_size)

    def count_lines(self, section: Section) -> int:
        return section.size

    def chunks(self, quarantine: Optional[Quarantine], sections: Optional[Sequence[Section]] = None) -> Iterator[SourceChunk]:
        ranges = [(0, self.config.rows)] if sections is None else [(s.start, s.end) for s in sections]
        for chunk in (chunk for first, end in ranges for chunk in _chunks(self.config, self.truth, first, end)):
            columns = {"row_id": pa.array(chunk["row_id"]), LABEL: pa.array(chunk["label"])}
            for name, values in zip(self.info.dense, chunk["dense"]):
                columns[name] = pa.array(np.log1p(np.nan_to_num(values)).astype(np.float32))
            for name, ranks in zip(self.info.sparse, chunk["ranks"]):
                columns[name] = pa.array(np.where(ranks < 0, MISSING_ID, ranks + RESERVED_IDS))
            columns[TRUE_LOGIT] = pa.array(chunk["true_logit"].astype(np.float32))
            yield SourceChunk(pa.table(columns), len(chunk["label"]))


def write_criteo_tsv(config: SyntheticConfig, path: Path, progress: bool = True) -> Dict:
    """Writes the synthetic logs as a Criteo-format TSV (label, I1..I13, C1..C26 as 8-digit hex,
    empty = missing), atomically. Returns {rows, positives, bytes}."""
    if config.sparse_features != 26 or config.dense_features != 13:
        raise ValueError("Criteo format needs sparse_features=26 and dense_features=13")
    truth = ground_truth(config)
    hex_values = [_hex_vocabulary(f, size, config.seed) for f, size in enumerate(truth.vocab_sizes)]
    rows = positives = 0
    with atomic_file(Path(path)) as temp, open(temp, "wb") as handle, tqdm(
        total=config.rows, desc="synthesize criteo tsv", unit="row", unit_scale=True, disable=not progress
    ) as bar:
        for chunk in _chunks(config, truth):
            columns = [pa.array(chunk["label"].astype(np.int64)).cast(pa.string())]
            for values in chunk["dense"]:
                ints = pa.array(np.nan_to_num(values).astype(np.int64), mask=np.isnan(values))
                columns.append(ints.cast(pa.string()).fill_null(""))
            for f, ranks in enumerate(chunk["ranks"]):
                taken = hex_values[f].take(pa.array(np.maximum(ranks, 0)))
                columns.append(pc.if_else(pa.array(ranks < 0), "", taken))
            lines = pc.binary_join_element_wise(*columns, "\t")
            handle.write(("\n".join(lines.to_pylist()) + "\n").encode("ascii"))
            rows += len(chunk["label"])
            positives += int(chunk["label"].sum())
            bar.update(len(chunk["label"]))
        handle.flush()
    return {"rows": rows, "positives": positives, "bytes": Path(path).stat().st_size}


def _hex_vocabulary(field_index: int, size: int, seed: int) -> pa.Array:
    """Distinct-looking 32-bit hex tokens for a field's values (as Criteo's hashed categories)."""
    salt = np.uint64((seed * 1_000_003 + field_index + 1) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        codes = splitmix64(np.arange(size, dtype=np.uint64) + (salt << np.uint64(32))) & np.uint64(0xFFFFFFFF)
    return pa.array([f"{code:08x}" for code in codes.tolist()])
