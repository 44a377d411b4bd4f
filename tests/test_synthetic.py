import numpy as np
import pytest

from recsys_kd.data.prepare import IdConfig, PrepareConfig, prepare
from recsys_kd.data.schema import Schema
from recsys_kd.data.synthetic import TRUE_LOGIT, SyntheticConfig, _draw, ground_truth, write_criteo_tsv
from tests.helpers import read_all


def auc(labels, scores):
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    positives = labels.sum()
    return (ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * (len(labels) - positives))


def test_deterministic_by_seed_and_any_size(tmp_path):
    config = SyntheticConfig(rows=5000, seed=3, chunk_rows=1024)
    a = prepare(PrepareConfig(format="synthetic", synthetic=config, output=str(tmp_path / "a"), progress=False))
    b = prepare(PrepareConfig(format="synthetic", synthetic=config, output=str(tmp_path / "b"), progress=False))
    table_a, table_b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert table_a.equals(table_b) and a["rows"] == b["rows"]
    assert table_a.num_rows == 5000
    other = SyntheticConfig(rows=5000, seed=4, chunk_rows=1024)
    prepare(PrepareConfig(format="synthetic", synthetic=other, output=str(tmp_path / "c"), progress=False))
    assert not read_all(tmp_path / "c")["label"].equals(table_a["label"])
    schema = Schema.load(tmp_path / "a")
    assert schema.extra == [TRUE_LOGIT] and len(schema.sparse) == 26 and len(schema.dense) == 13
    for feature in schema.sparse:
        ids = table_a[feature.name].to_numpy()
        assert ids.min() >= 0 and ids.max() < feature.num_embeddings


def test_labels_follow_the_true_logit_and_high_orders_matter():
    config = SyntheticConfig(rows=60_000, seed=1)
    truth = ground_truth(config)
    chunk = _draw(config, truth, np.random.default_rng(5), 60_000)
    labels, logits = chunk["label"], chunk["true_logit"]
    assert abs(labels.mean() - config.base_ctr) < 0.02
    assert abs(labels.mean() - np.mean(1 / (1 + np.exp(-logits)))) < 0.01
    oracle = auc(labels, logits)
    # Without the planted 3rd/4th-order terms the best possible score is clearly worse.
    no_high = SyntheticConfig(**{**config.__dict__, "triples": 0, "quadruples": 0})
    truth_low = ground_truth(no_high)
    low = _draw(no_high, truth_low, np.random.default_rng(5), 60_000)["true_logit"]
    assert oracle > 0.75
    assert auc(labels, low) < oracle - 0.03


def test_criteo_tsv_round_trip(tmp_path):
    config = SyntheticConfig(rows=3000, seed=2, chunk_rows=1000)
    raw = tmp_path / "raw" / "train.txt"
    info = write_criteo_tsv(config, raw, progress=False)
    lines = raw.read_text().splitlines()
    assert info["rows"] == len(lines) == 3000
    assert all(len(line.split("\t")) == 40 for line in lines)
    assert info["positives"] == sum(line.startswith("1\t") for line in lines)
    record = prepare(PrepareConfig(format="criteo", inputs=[str(raw)], output=str(tmp_path / "ds"), progress=False,
                                   ids=IdConfig(rule="vocab")))
    assert record["quarantined_total"] == 0 and sum(record["rows"].values()) == 3000
    # The converter recovers the generator's categories exactly (one id per distinct hex value).
    prepare(PrepareConfig(format="synthetic", synthetic=config, output=str(tmp_path / "direct"), progress=False))
    converted, generated = read_all(tmp_path / "ds"), read_all(tmp_path / "direct")
    for name in ("C1", "C10", "C26"):
        pairs = set(zip(converted[name].to_pylist(), generated[name].to_pylist()))
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    assert converted["label"].equals(generated["label"])


def test_invalid_config_is_refused():
    with pytest.raises(ValueError, match="base_ctr"):
        SyntheticConfig(base_ctr=1.5).validate()
