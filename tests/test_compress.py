"""AFM low-rank compression: the statistics against numpy, the transforms against the PCA reconstruction
formula (exact at full rank), the row-block and column-partial forms of the embedding transform, the SVD
baseline, and the surgery on whole models (full rank leaves logits unchanged, fused == unfused, fewer
parameters and FLOPs at small rank, the head still scripts)."""

import warnings
from typing import List

import numpy as np
import pytest
import torch
from torch import nn

from recsys_kd.compress import (
    LayerStatistics,
    ModelStatistics,
    afm_embedding,
    afm_embedding_columns,
    afm_embedding_rows,
    afm_linear,
    afm_linear_factors,
    choose_rank,
    collect_statistics,
    compress_embeddings,
    compress_mlp,
    embedding_gram,
    fuse_into_first_linear,
    mlp_linear_names,
    pca,
    spectrum_report,
    svd_embedding,
    svd_linear,
    svd_linear_factors,
)
from recsys_kd.data.batch import Batch
from recsys_kd.models import CTRModel, ModelConfig, build_model
from recsys_kd.models.low_rank import CompressedMLP, LowRankFieldEmbedding, LowRankStep, can_fuse
from tests.helpers import tiny_batch, tiny_schema

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")
SCHEMA = tiny_schema(with_hour=True)
NUM_DENSE, SPARSE = 2, ["user", "tags", "item", "hour"]
D = 4
MLP_LAYERS = [12, 10, 10]


def make_batch(seed: int, batch_size: int = 32) -> Batch:
    """Skewed ids (AFM weighs rows by how often they are looked up), a multi-hot feature with empty bags."""
    return tiny_batch(SCHEMA, seed, batch_size, skewed_ids=True, dense_shift=0.5)


BATCHES = [make_batch(seed) for seed in range(4)]
TEST_BATCH = make_batch(99, batch_size=16)


def build(name: str, **overrides) -> CTRModel:
    config = ModelConfig(name=name, embedding_dim=D, mlp_layers=MLP_LAYERS, cross_layers=2, **overrides)
    model = build_model(SCHEMA, config)
    with torch.no_grad():  # "trained-ish": tables of unit scale with a mean, not the 1e-4 init
        for table in model.embedding.ebc.embedding_bags.values():
            table.weight.normal_().add_(0.3)
    return model.eval()


def logits_of(model: CTRModel, batch: Batch = TEST_BATCH) -> torch.Tensor:
    with torch.no_grad():
        return model(batch.dense, batch.sparse)


def fields_of(model: CTRModel, batch: Batch = TEST_BATCH) -> torch.Tensor:
    with torch.no_grad():
        return model.embedding(batch.dense, batch.sparse)


def pca_reconstruction(y: torch.Tensor, stats: LayerStatistics, k: int) -> torch.Tensor:
    """y_hat = U_k U_k^T (y - mu) + mu computed directly (float64)."""
    _, vectors = pca(stats.covariance())
    u, mu = vectors[:, :k], stats.mean()
    return (y.to(F64) - mu) @ u @ u.T + mu


def script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit itself is deprecated in 2.13
        # torchrec's EmbeddingBagCollection itself draws these two from the TorchScript compiler
        warnings.filterwarnings("ignore", "The TorchScript type system doesn't support instance-level", UserWarning)
        warnings.filterwarnings("ignore", "TorchScript will treat type annotations of Tensor dtype", UserWarning)
        return torch.jit.script(module)


# ---------------------------------------------------------------- statistics, PCA, rank (e)


def test_statistics_in_chunks_equal_one_pass_and_numpy() -> None:
    y = torch.randn(301, 5, dtype=F64) @ torch.randn(5, 5, dtype=F64) + torch.tensor([3.0, -1.0, 0.0, 10.0, 0.5])
    whole = LayerStatistics(5)
    whole.update(y)
    chunked = LayerStatistics(5)
    for chunk in torch.split(y, [37, 100, 1, 163]):
        chunked.update(chunk)
    for a, b in zip(whole.tensors(), chunked.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
    assert chunked.n == 301
    np.testing.assert_allclose(chunked.mean().numpy(), y.numpy().mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(chunked.covariance().numpy(), np.cov(y.numpy(), rowvar=False, bias=True), rtol=1e-9, atol=1e-10)

    # two "ranks" each with its shard: summing their tensors (what all_reduce SUM does) == one pass
    left, right = LayerStatistics(5), LayerStatistics(5)
    left.update(y[:150])
    right.update(y[150:])
    for mine, theirs in zip(left.tensors(), right.tensors()):
        mine += theirs  # in place, as dist.all_reduce
    torch.testing.assert_close(left.covariance(), whole.covariance(), rtol=1e-10, atol=1e-10)
    merged = LayerStatistics(5)
    merged.update(y[:10])
    other = LayerStatistics(5)
    other.update(y[10:])
    torch.testing.assert_close(merged.merge(other).mean(), whole.mean())
    restored = LayerStatistics.from_state_dict(whole.state_dict())
    torch.testing.assert_close(restored.covariance(), whole.covariance())

    # grouped (per-field) statistics equal one accumulator per group
    fields = torch.randn(64, 3, 4, dtype=F64) + 2.0
    grouped = LayerStatistics(4, groups=3)
    grouped.update(fields[:20])
    grouped.update(fields[20:])
    for f in range(3):
        single = LayerStatistics(4)
        single.update(fields[:, f])
        torch.testing.assert_close(grouped.group(f).covariance(), single.covariance())
        torch.testing.assert_close(grouped.group(f).mean(), single.mean())
        np.testing.assert_allclose(
            grouped.group(f).covariance().numpy(), np.cov(fields[:, f].numpy(), rowvar=False, bias=True), atol=1e-12
        )
    with pytest.raises(ValueError, match="no samples"):
        LayerStatistics(3).mean()


def test_pca_rank_choice_and_spectrum_report() -> None:
    basis = torch.linalg.qr(torch.randn(6, 6, dtype=F64))[0]
    values = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0], dtype=F64)
    cov = basis @ torch.diag(values) @ basis.T
    eigenvalues, vectors = pca(cov)
    torch.testing.assert_close(eigenvalues, values, atol=1e-12, rtol=0)
    torch.testing.assert_close(vectors @ torch.diag(eigenvalues) @ vectors.T, cov)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(6, dtype=F64))
    assert (vectors.abs().argmax(dim=0) == vectors.argmax(dim=0)).all()  # sign fixed: largest entry positive

    assert choose_rank(values, k=3) == 3
    assert choose_rank(values, variance_share=8 / 15.5) == 1
    assert choose_rank(values, variance_share=0.9) == 3  # 14 / 15.5 = 0.903
    assert choose_rank(values, variance_share=1.0) == 5
    assert choose_rank(torch.zeros(4, dtype=F64), variance_share=0.9) == 1
    for bad in (dict(k=0), dict(k=7), dict(variance_share=0.0), dict(), dict(k=2, variance_share=0.5)):
        with pytest.raises(ValueError):
            choose_rank(values, **bad)
    report = spectrum_report(values)
    assert report["dim"] == 6 and report["total_variance"] == pytest.approx(15.5)
    assert report["explained_variance_ratio"][0] == pytest.approx(8 / 15.5)
    assert report["cumulative"][-1] == pytest.approx(1.0)
    assert report["rank_for_share"]["0.9"] == 3


# ---------------------------------------------------------------- MLP transform (a, b) and SVD (g)


def _layer_outputs(m: int = 7, n: int = 11, samples: int = 400):
    weight, bias = torch.randn(m, n), torch.randn(m)
    # correlated inputs with a mean, so that the outputs' covariance has a real spectrum
    x = torch.randn(samples, 4) @ torch.randn(4, n) + 0.1 * torch.randn(samples, n) + 1.0
    y = x @ weight.T + bias
    stats = LayerStatistics(m)
    stats.update(y)
    return weight, bias, x, y, stats


def test_afm_linear_is_exact_at_full_rank_and_the_pca_reconstruction_below() -> None:
    weight, bias, x, y, stats = _layer_outputs()
    eigenvalues, vectors = pca(stats.covariance())
    full = afm_linear(weight, bias, vectors, stats.mean(), relu_between=False)
    assert [type(m) for m in full] == [nn.Linear, nn.Linear]
    torch.testing.assert_close(full(x), y, rtol=1e-5, atol=1e-4)

    for k in (1, 3, 5):
        low = afm_linear(weight, bias, vectors[:, :k], stats.mean(), relu_between=False)
        assert (low[0].in_features, low[0].out_features, low[1].out_features) == (11, k, 7)
        torch.testing.assert_close(low(x).double(), pca_reconstruction(y, stats, k), rtol=1e-4, atol=1e-4)
        # in float64 the identity is exact to round-off
        w1, b1, w2, b2 = afm_linear_factors(weight.double(), bias.double(), vectors[:, :k], stats.mean())
        exact = (x.double() @ w1.T + b1) @ w2.T + b2
        y64 = x.double() @ weight.double().T + bias.double()
        torch.testing.assert_close(exact, pca_reconstruction(y64, stats, k), rtol=1e-9, atol=1e-9)
        # the error is the discarded variance: mean squared error = sum of the dropped eigenvalues
        error = ((exact - y64) ** 2).sum(dim=1).mean()
        assert float(error) == pytest.approx(float(eigenvalues[k:].sum()), rel=1e-3)

    with_relu = afm_linear(weight, bias, vectors[:, :3], stats.mean(), relu_between=True)
    assert [type(m) for m in with_relu] == [nn.Linear, nn.ReLU, nn.Linear]


def test_svd_baseline_is_exact_at_full_rank() -> None:
    weight, bias, x, y, _ = _layer_outputs()
    full = svd_linear(weight, bias, 7, relu_between=False)
    torch.testing.assert_close(full(x), y, rtol=1e-5, atol=1e-4)
    w1, b1, w2, b2 = svd_linear_factors(weight.double(), bias.double(), 3)
    u, s, vh = torch.linalg.svd(weight.double())
    torch.testing.assert_close(w2 @ w1, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])  # the truncated SVD
    assert torch.equal(b1, torch.zeros(3, dtype=F64)) and torch.equal(b2, bias.double())

    table = torch.randn(30, 6)
    compressed, up_weight, up_bias = svd_embedding(table, 6)
    torch.testing.assert_close(compressed @ up_weight.T + up_bias, table, rtol=1e-5, atol=1e-5)
    compressed, up_weight, _ = svd_embedding(table.double(), 2)
    u, s, vh = torch.linalg.svd(table.double(), full_matrices=False)
    torch.testing.assert_close(compressed @ up_weight.T, u[:, :2] @ torch.diag(s[:2]) @ vh[:2])
    # the Gram matrix of row blocks sums to the table's (row-wise shards)
    torch.testing.assert_close(embedding_gram(table[:10]) + embedding_gram(table[10:]), embedding_gram(table))


# ---------------------------------------------------------------- embedding transform (c) and its shard forms


def test_afm_embedding_full_rank_low_rank_rows_and_column_partials() -> None:
    table = torch.randn(50, 6, dtype=F64) @ torch.randn(6, 6, dtype=F64) + 0.7
    ids = torch.multinomial(torch.arange(50, 0, -1, dtype=F64), 500, replacement=True)
    stats = LayerStatistics(6)
    stats.update(table[ids])  # the field's outputs: rows as often as they are looked up
    _, vectors = pca(stats.covariance())
    for centered in (True, False):
        compressed, up_weight, up_bias = afm_embedding(table, vectors, stats.mean(), centered)
        torch.testing.assert_close(compressed @ up_weight.T + up_bias, table)  # full rank: the table itself
        for k in (1, 2, 4):
            compressed, up_weight, up_bias = afm_embedding(table, vectors[:, :k], stats.mean(), centered)
            assert compressed.shape == (50, k) and up_weight.shape == (6, k) and up_bias.shape == (6,)
            torch.testing.assert_close(compressed @ up_weight.T + up_bias, pca_reconstruction(table, stats, k))

            # row blocks (row-wise / table-wise shards): each block projects alone
            blocks = [afm_embedding_rows(rows, vectors[:, :k], stats.mean(), centered) for rows in table.split([17, 30, 3])]
            torch.testing.assert_close(torch.cat(blocks), compressed)
            # column blocks (column-wise shards): the partials sum to the full transform
            mu = stats.mean()
            partials = [
                afm_embedding_columns(table[:, c], vectors[c, :k], mu[c], centered)
                for c in (slice(0, 2), slice(2, 5), slice(5, 6))
            ]
            torch.testing.assert_close(sum(partials), compressed, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        afm_embedding_columns(table[:, :2], vectors[:3, :2], stats.mean()[:2])

    # a sum-pooled bag of n ids: the uncentered form reconstructs the pooled embedding for any n (the
    # empty bag included), the reference's centered form only for n = 1
    k = 2
    for bag in ([], [3], [3, 8, 8]):
        pooled = table[bag].sum(dim=0)
        expected = pca_reconstruction(pooled.unsqueeze(0), stats, k)[0]
        for centered in (False, True):
            compressed, up_weight, up_bias = afm_embedding(table, vectors[:, :k], stats.mean(), centered)
            got = compressed[bag].sum(dim=0) @ up_weight.T + up_bias
            if centered and len(bag) != 1:
                assert not torch.allclose(got, expected)
            else:
                torch.testing.assert_close(got, expected)


def test_fuse_into_first_linear_mixed_fields() -> None:
    widths = [3, 3, 3, 3]
    weight, bias = torch.randn(5, 12, dtype=F64), torch.randn(5, dtype=F64)
    ups = [None, torch.randn(3, 2, dtype=F64), torch.randn(3, 3, dtype=F64), torch.randn(3, 1, dtype=F64)]
    up_biases = [None, torch.randn(3, dtype=F64), torch.randn(3, dtype=F64), None]
    codes = [torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64), torch.randn(8, 3, dtype=F64), torch.randn(8, 1, dtype=F64)]
    fields = [c if u is None else c @ u.T + (b if b is not None else 0) for c, u, b in zip(codes, ups, up_biases)]
    expected = torch.cat(fields, dim=1) @ weight.T + bias
    fused_weight, fused_bias = fuse_into_first_linear(weight, bias, ups, up_biases, widths)
    assert fused_weight.shape == (5, 3 + 2 + 3 + 1)
    torch.testing.assert_close(torch.cat(codes, dim=1) @ fused_weight.T + fused_bias, expected)
    with pytest.raises(ValueError):
        fuse_into_first_linear(weight, bias, ups, up_biases, [3, 3, 3])


# ---------------------------------------------------------------- surgery on models (c, d, f, g)


def test_statistics_hooks_collect_linear_outputs_and_fields() -> None:
    model = build("dnn")
    names = mlp_linear_names(model)
    assert names == ["head.mlp.layers.0", "head.mlp.layers.2", "head.mlp.layers.4"]
    stats = collect_statistics(model, BATCHES)
    assert sorted(stats.layers) == names and stats.field_names == model.embedding.field_names
    # direct: the first Linear's output on every batch, and every field embedding
    with torch.no_grad():
        flat = torch.cat([model.embedding(b.dense, b.sparse).flatten(1) for b in BATCHES])
        fields = torch.cat([model.embedding(b.dense, b.sparse) for b in BATCHES])
    direct = LayerStatistics(MLP_LAYERS[0])
    direct.update(model.head.mlp.layers[0](flat))  # pre-activation: the Linear's own output
    torch.testing.assert_close(stats.layers[names[0]].covariance(), direct.covariance())
    for f, field_stats in enumerate(stats.fields):
        single = LayerStatistics(D)
        single.update(fields[:, f])
        torch.testing.assert_close(field_stats.mean(), single.mean())
        torch.testing.assert_close(field_stats.covariance(), single.covariance())
    assert len(stats.tensors()) == 3 * 3 + 3
    assert model.training is False  # mode restored (build() returns eval)


def test_compress_mlp_full_rank_is_exact_and_small_rank_shrinks() -> None:
    model = build("dnn")
    reference = logits_of(model)
    stats = collect_statistics(model, BATCHES, fields=False)
    full = compress_mlp(model, {0: 12, 1: 10, 2: 10}, stats, relu_between=False)
    torch.testing.assert_close(logits_of(full), reference, rtol=0, atol=1e-5)
    assert isinstance(full.head.mlp, CompressedMLP) and type(model.head.mlp) is not CompressedMLP  # input kept
    for method in ("svd",):  # (g) the SVD baseline at full rank as well
        torch.testing.assert_close(
            logits_of(compress_mlp(model, {0: 12, 1: 10, 2: 10}, relu_between=False, method=method)),
            reference, rtol=0, atol=1e-5,
        )

    small = compress_mlp(model, {1: 2, 2: 2}, stats, relu_between=True)  # the paper's pattern: layer 1 kept
    kinds = [type(m).__name__ for m in small.head.mlp.layers]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear", "ReLU", "Linear", "ReLU", "Linear", "ReLU"]
    before, after = model.num_parameters(), small.num_parameters()
    assert after["embedding"] == before["embedding"]
    # Linear(12, 10) + Linear(10, 10) -> Linear(12, 2) + Linear(2, 10) + Linear(10, 2) + Linear(2, 10)
    assert before["dense"] - after["dense"] == (130 + 110) - (26 + 30 + 22 + 30)
    hand = (
        2 * 6 * D + 2 * (24 * 12) + 12 + 12  # dense projection, Linear(24, 12) + ReLU
        + (2 * 12 * 2 + 2) + 2 + (2 * 2 * 10 + 10) + 10  # layer 1: Linear(12, 2), ReLU, Linear(2, 10), ReLU
        + (2 * 10 * 2 + 2) + 2 + (2 * 2 * 10 + 10) + 10  # layer 2
        + (2 * 10 + 1)  # output
    ) - 2 * 6 * D + NUM_DENSE * D
    assert small.flops_per_example() == hand < model.flops_per_example()
    assert [entry["k"] for entry in small.compression_log] == [2, 2]

    # without the ReLU the compressed layer is the PCA reconstruction of its output
    exact = compress_mlp(model, {1: 3}, stats, relu_between=False)
    with torch.no_grad():
        flat = model.embedding(TEST_BATCH.dense, TEST_BATCH.sparse).flatten(1)
        h1 = model.head.mlp.layers[1](model.head.mlp.layers[0](flat))
        y = model.head.mlp.layers[2](h1)
        z = exact.head.mlp.layers[3](exact.head.mlp.layers[2](h1))
    torch.testing.assert_close(z.double(), pca_reconstruction(y, stats.layers["head.mlp.layers.2"], 3), rtol=1e-4, atol=1e-5)

    # variance-share and callable rules; the compressed head scripts and computes the same logits
    shared = compress_mlp(model, {2: 0.99}, stats, relu_between=False)
    assert 1 <= shared.compression_log[0]["k"] <= 10 and shared.compression_log[0]["kept_share"] >= 0.99
    ruled = compress_mlp(model, lambda i, spectrum: 4 if i > 0 else None, stats, relu_between=True)
    assert [e["index"] for e in ruled.compression_log] == [1, 2]
    scripted = script(small.head)
    with torch.no_grad():
        fields = small.embedding(TEST_BATCH.dense, TEST_BATCH.sparse)
    torch.testing.assert_close(scripted(fields, None), logits_of(small))
    with pytest.raises(ValueError, match="names Linear layers"):
        compress_mlp(model, {5: 2}, stats, relu_between=False)
    with pytest.raises(ValueError, match="statistics"):
        compress_mlp(model, {1: 2}, None, relu_between=False)


def test_compress_embeddings_reconstructs_fields_per_field() -> None:
    model = build("deepfm")  # FM reads the fields: the up-projection stays, never fused
    assert not can_fuse(model)
    reference, fields = logits_of(model), fields_of(model)
    stats = collect_statistics(model, BATCHES)
    with pytest.raises(ValueError, match="cannot be fused"):
        compress_embeddings(model, 2, stats, fuse=True)

    full = compress_embeddings(model, D, stats)
    assert isinstance(full.embedding, LowRankFieldEmbedding) and not full.embedding.fused
    torch.testing.assert_close(fields_of(full), fields, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_of(full), reference, rtol=0, atol=1e-5)
    svd_full = compress_embeddings(model, D, method="svd")  # (g)
    torch.testing.assert_close(logits_of(svd_full), reference, rtol=0, atol=1e-5)

    # mixed per-field ranks, one table kept: each compressed field is the PCA reconstruction of the
    # original field embedding (the multi-hot "tags", with its empty bags, included)
    ranks = {"user": 2, "tags": 1, "item": 3}
    low = compress_embeddings(model, ranks, stats)
    got = fields_of(low)
    assert got.shape == fields.shape
    for f, name in enumerate(model.embedding.field_names):
        if name in ranks:
            expected = pca_reconstruction(fields[:, f], stats.fields[f], ranks[name])
            torch.testing.assert_close(got[:, f].double(), expected, rtol=1e-5, atol=1e-5)
        else:  # dense fields and the kept "hour"
            torch.testing.assert_close(got[:, f], fields[:, f])
    tables = {c.name: c.embedding_dim for c in low.embedding.ebc.embedding_bag_configs()}
    assert tables == {"t_user": 2, "t_tags": 1, "t_item": 3, "t_hour": D}
    assert low.num_parameters()["embedding"] == 11 * 2 + 7 * 1 + 13 * 3 + 5 * D + sum(f.num_embeddings for f in SCHEMA.sparse)
    k_max = 3
    assert low.flops_per_example() == model.flops_per_example() + 3 * (2 * k_max * D + D)
    script(low.head)
    scripted_embedding = script(low.embedding)  # the serving path may script the embedding module too
    torch.testing.assert_close(scripted_embedding(TEST_BATCH.dense, TEST_BATCH.sparse), got)

    # the reference's centered tables give the same fields for single-valued features, not for "tags"
    centered = fields_of(compress_embeddings(model, ranks, stats, centered=True))
    user, tags = NUM_DENSE + SPARSE.index("user"), NUM_DENSE + SPARSE.index("tags")
    torch.testing.assert_close(centered[:, user], got[:, user], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(centered[:, tags], got[:, tags], atol=1e-3)

    shared = compress_embeddings(model, 0.9, stats)
    assert all(entry["kept_share"] >= 0.9 for entry in shared.compression_log)
    with pytest.raises(ValueError, match="not sparse features"):
        compress_embeddings(model, {"d0": 2}, stats)


@pytest.mark.parametrize("name", ["dnn", "wide_deep"])
def test_fused_and_unfused_give_identical_logits(name: str) -> None:
    model = build(name)
    assert can_fuse(model)
    stats = collect_statistics(model, BATCHES)
    full = compress_embeddings(model, D, stats)  # fused by default on DNN heads
    assert full.embedding.fused
    torch.testing.assert_close(logits_of(full), logits_of(model), rtol=0, atol=1e-5)

    fused = compress_embeddings(model, 2, stats)
    unfused = compress_embeddings(model, 2, stats, fuse=False)
    assert fused.embedding.fused and not unfused.embedding.fused
    torch.testing.assert_close(logits_of(fused), logits_of(unfused), rtol=0, atol=1e-5)
    logits, hidden, codes = fused.forward_with_hidden(TEST_BATCH.dense, TEST_BATCH.sparse)
    assert codes.shape == (16, NUM_DENSE * D + len(SPARSE) * 2)
    assert fused.head.mlp.layers[0].in_features == NUM_DENSE * D + len(SPARSE) * 2

    # parameters: tables V x 2 instead of V x D; the fused first layer is narrower, no up-projection
    vocab = sum(f.num_embeddings for f in SCHEMA.sparse)
    first_order = vocab if name == "wide_deep" else 0
    before, after, kept = model.num_parameters(), fused.num_parameters(), unfused.num_parameters()
    assert before["embedding"] == vocab * D + first_order and after["embedding"] == vocab * 2 + first_order
    assert after["dense"] == before["dense"] - 12 * len(SPARSE) * (D - 2)
    assert kept["dense"] == before["dense"] + len(SPARSE) * (D * 2 + D)
    assert fused.flops_per_example() == model.flops_per_example() - 2 * 12 * len(SPARSE) * (D - 2)

    # after MLP compression too (the paper's order), and the fused head still scripts
    both = compress_embeddings(compress_mlp(model, {0: 6, 1: 3}, stats, relu_between=False), 2, stats)
    ref = compress_embeddings(compress_mlp(model, {0: 6, 1: 3}, stats, relu_between=False), 2, stats, fuse=False)
    torch.testing.assert_close(logits_of(both), logits_of(ref), rtol=0, atol=1e-5)
    first_order_term = None
    if both.first_order is not None:
        with torch.no_grad():
            first_order_term = both.first_order(TEST_BATCH.dense, TEST_BATCH.sparse)
    with torch.no_grad():
        codes = both.embedding(TEST_BATCH.dense, TEST_BATCH.sparse)
    torch.testing.assert_close(script(both.head)(codes, first_order_term), logits_of(both))
    assert [e["what"] for e in both.compression_log] == ["mlp", "mlp"] + ["embedding"] * len(SPARSE)


def test_statistics_of_a_compressed_model_and_reduction_order() -> None:
    """A second round collects statistics through the compressed modules; ModelStatistics reduces in a
    fixed order (what a multi-rank caller all_reduces one tensor at a time)."""
    model = build("dcn")
    stats = collect_statistics(model, BATCHES)
    compressed = compress_embeddings(compress_mlp(model, {1: 4}, stats, relu_between=True), 3, stats)
    again = collect_statistics(compressed, BATCHES[:2])
    assert sorted(again.layers) == mlp_linear_names(compressed) and len(again.fields) == 6
    halves: List[ModelStatistics] = [collect_statistics(model, BATCHES[:2]), collect_statistics(model, BATCHES[2:])]
    for mine, theirs in zip(halves[0].tensors(), halves[1].tensors()):
        mine += theirs
    for name, layer in stats.layers.items():
        torch.testing.assert_close(halves[0].layers[name].covariance(), layer.covariance())
    torch.testing.assert_close(halves[0].field_stats.covariance(), stats.field_stats.covariance())


@pytest.mark.parametrize("name, fuse", [("dnn", None), ("dcn", False)])
def test_recorded_structure_rebuilds_the_compressed_model(name: str, fuse) -> None:
    """build_model with the recorded LowRankSteps makes the same modules: the compressed state dict
    loads into it key for key and shape for shape, and the rebuilt model computes the same logits."""
    model = build(name)
    stats = collect_statistics(model, BATCHES)
    compressed = compress_embeddings(compress_mlp(model, {1: 4}, stats, relu_between=True), 3, stats, fuse=fuse)
    steps = compressed.compression_steps
    assert [s.what for s in steps] == ["mlp", "embeddings"] and steps[0].ranks == {"1": 4}
    assert steps[1].ranks == {n: 3 for n in SPARSE} and steps[1].fused == (name == "dnn")

    config = ModelConfig(name=name, embedding_dim=D, mlp_layers=MLP_LAYERS, cross_layers=2, compression=steps)
    rebuilt = build_model(SCHEMA, config).eval()
    expected = compressed.state_dict()
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {k: tuple(v.shape) for k, v in expected.items()}
    rebuilt.load_state_dict(expected)
    torch.testing.assert_close(logits_of(rebuilt), logits_of(compressed), rtol=0, atol=0)
    assert rebuilt.num_parameters() == compressed.num_parameters()
    assert rebuilt.flops_per_example() == compressed.flops_per_example()

    with pytest.raises(ValueError, match="not sparse features"):
        build_model(SCHEMA, ModelConfig(name=name, embedding_dim=D, compression=[LowRankStep("embeddings", {"nope": 2})]))


def test_relu_variant_orients_each_direction_towards_the_mean() -> None:
    """With a ReLU between the new layers each kept direction has u^T mu >= 0 (a free sign choice):
    the code U_k^T y is then positive on average; without the ReLU the result ignores the signs."""
    from recsys_kd.compress.surgery import orient_towards_mean

    vectors = torch.linalg.qr(torch.randn(6, 6, dtype=F64))[0]
    mu = torch.randn(6, dtype=F64)
    oriented = orient_towards_mean(vectors, mu)
    flipped = (vectors.T @ mu) < 0
    torch.testing.assert_close(oriented[:, flipped], -vectors[:, flipped])
    torch.testing.assert_close(oriented[:, ~flipped], vectors[:, ~flipped])
    assert bool(((oriented.T @ mu) >= 0).all())

    model = build("dnn")
    stats = collect_statistics(model, BATCHES)
    moments = stats.layers["head.mlp.layers.2"]  # Linear index 1: 12 -> 10
    u_k = orient_towards_mean(pca(moments.covariance())[1], moments.mean())[:, :5]
    relu = compress_mlp(model, {1: 5}, stats, relu_between=True)
    weight = model.head.mlp.layers[2].weight.detach().double()
    assert isinstance(relu.head.mlp.layers[3], nn.ReLU)
    torch.testing.assert_close(relu.head.mlp.layers[2].weight.double(), u_k.T @ weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(relu.head.mlp.layers[4].weight.double(), u_k, rtol=1e-5, atol=1e-6)
    assert bool((u_k.T @ moments.mean() >= 0).all())
