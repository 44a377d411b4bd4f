import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from recsys_kd.data import split as splitting
from recsys_kd.data.ids import VocabularyCounter, hash_ids, splitmix64, stable_hash, vocab_ids
from recsys_kd.data.schema import MISSING_ID, OOV_ID


def test_splitmix64_matches_reference_definition():
    def reference(x):
        mask = (1 << 64) - 1
        z = x & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    values = [0, 1, 2**63 + 5, 123456789]
    assert splitmix64(np.array(values, np.uint64)).tolist() == [reference(v) for v in values]


def test_string_hash_depends_on_every_byte_and_length():
    values = pa.array(["", "a", "a\0", "abcdefgh", "abcdefgi", "abcdefghX", "Xbcdefgh", "abcdefghabcdefgh"])
    hashes = stable_hash(values, seed=1)
    assert len(set(hashes.tolist())) == len(values)
    assert stable_hash(values, seed=2).tolist() != hashes.tolist()
    # Slices and chunk boundaries do not change a value's hash.
    assert stable_hash(values.slice(3, 3), seed=1).tolist() == hashes[3:6].tolist()
    assert stable_hash(pa.chunked_array([values[:2], values[2:]]), seed=1).tolist() == hashes.tolist()


def test_hash_is_stable_across_processes():
    code = "import pyarrow as pa; from recsys_kd.data.ids import hash_ids; print(hash_ids(pa.array(['68fd1e64', 'x', None]), 1000, 5).tolist())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == str(hash_ids(pa.array(["68fd1e64", "x", None]), 1000, 5).tolist())


def test_hash_ids_range_and_missing():
    values = pa.array([f"v{i}" for i in range(20000)] + [None])
    ids = hash_ids(values, 50, seed=3)
    assert ids[-1] == MISSING_ID
    assert ids[:-1].min() >= 2 and ids[:-1].max() < 50
    counts = np.bincount(ids[:-1], minlength=50)[2:]
    assert counts.min() > 0.7 * counts.mean()  # roughly uniform over the buckets
    ints = hash_ids(pa.array([1, 2, None], pa.int64()), 50, seed=3)
    assert ints[2] == MISSING_ID and ints[0] != ints[1]


def test_vocabulary_min_count_and_order_across_chunks():
    counter = VocabularyCounter(["x"], compact_every_rows=3)
    for chunk in (["a", "b", "a", None], ["c", "a", "b"], ["c", "c", "d"]):
        counter.update(pa.table({"x": pa.array(chunk, pa.string())}))
    vocab = counter.vocabulary("x", min_count=2)
    assert vocab.to_pydict() == {"value": ["a", "c", "b"], "count": [3, 3, 2]}
    ids = vocab_ids(pa.array(["a", "c", "b", "d", None, "zz"]), vocab.column("value").combine_chunks())
    assert ids.tolist() == [2, 3, 4, OOV_ID, MISSING_ID, OOV_ID]


def test_permutation_split_is_numpy_randomstate_permutation():
    n = 1003
    ranks = splitting.permutation_ranks(n, seed=2022)
    assignment = splitting.assign_by_rank(ranks, n, [0.8, 0.1, 0.1])
    permutation = np.random.RandomState(2022).permutation(n)
    assert set(np.flatnonzero(assignment == 0)) == set(permutation[:802])
    assert set(np.flatnonzero(assignment == 1)) == set(permutation[802:902])
    assert set(np.flatnonzero(assignment == 2)) == set(permutation[902:])
    assert splitting.split_counts(72855, [0.8, 0.1, 0.1]) == [58284, 7285, 7286]


def test_random_split_is_deterministic_chunk_independent_and_proportional():
    row_ids = np.arange(200_000)
    whole = splitting.assign_random(row_ids, 7, [0.8, 0.1, 0.1])
    parts = np.concatenate([splitting.assign_random(row_ids[i : i + 999], 7, [0.8, 0.1, 0.1]) for i in range(0, len(row_ids), 999)])
    assert np.array_equal(whole, parts)
    shares = np.bincount(whole) / len(whole)
    np.testing.assert_allclose(shares, [0.8, 0.1, 0.1], atol=0.005)
    assert not np.array_equal(whole, splitting.assign_random(row_ids, 8, [0.8, 0.1, 0.1]))


def test_day_and_sequential_split():
    assert splitting.assign_day(np.array([0, 5, 6, 7]), [6], [7]).tolist() == [0, 0, 1, 2]
    assert splitting.assign_by_rank(np.arange(10), 10, [0.6, 0.2, 0.2]).tolist() == [0] * 6 + [1] * 2 + [2] * 2


def test_split_config_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        splitting.SplitConfig(fractions=[0.5, 0.5, 0.5]).validate()

