"""Resuming on another number of ranks: the reader deals the rest of the interrupted epoch to the new
ranks (every row read exactly once), and training resumed 2 -> 1 and 1 -> 2 ranks, under another
sharding plan, ends where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest

from recsys_kd.data.reader import ParquetReader, ReaderConfig
from tests.test_reader import row_ids, write_dataset

SPLIT_ROWS = 513  # tests.test_reader's train split: 11 row groups of 50 rows (one of 13)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("remap")
    write_dataset(directory)
    return directory


def interrupt(dataset: Path, config: ReaderConfig, world_size: int, steps: int, states: Sequence[Dict] = (),
              epoch: int = 1) -> Tuple[List[Dict], List[int]]:
    """``world_size`` ranks (resuming from ``states`` when given) each take up to ``steps`` batches,
    in step as the trainer's ranks are; returns (their states, the row_ids they read)."""
    read: List[int] = []
    saved = []
    for rank in range(world_size):
        reader = ParquetReader(dataset, "train", config, rank, world_size)
        reader.set_epoch(epoch)
        if states:
            reader.load_state_dicts(states)
        batches = iter(reader)
        for _ in range(steps):
            batch = next(batches, None)
            if batch is not None:
                read.extend(batch.row_ids.tolist())
        saved.append(reader.state_dict())
    return saved, read


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("worlds, steps", [
    ((2, 1), (3,)), ((1, 2), (4,)), ((2, 3), (2,)), ((3, 2), (1,)),
    ((2, 1, 3), (3, 2)),  # remapped twice: the remapped epoch's own state is remapped again
    ((1, 2, 2), (2, 1)),  # a remapped epoch resumed on as many ranks continues its remapped streams
])
def test_every_row_of_the_interrupted_epoch_is_read_exactly_once(dataset, shuffle, worlds, steps):
    # batches of 40 straddle row groups (50) and windows (2 row groups): positions fall mid-window
    config = ReaderConfig(batch_size=40, shuffle=shuffle, shuffle_window_row_groups=2, seed=3)
    states, read = [], []
    for world_size, taken in zip(worlds, steps):
        states, rows = interrupt(dataset, config, world_size, taken, states)
        read.extend(rows)
    assert 0 < len(read) < SPLIT_ROWS
    rest = []
    for rank in range(worlds[-1]):
        reader = ParquetReader(dataset, "train", config, rank, worlds[-1])
        reader.load_state_dicts(states)
        reader.set_epoch(1)  # the trainer's loop: the same epoch keeps the loaded position
        expected = reader.remaining_batches()
        batches = list(reader)
        assert len(batches) == expected
        rest.extend(row_ids(batches).tolist())
    together = np.sort(np.array(read + rest))
    assert np.array_equal(together, np.arange(SPLIT_ROWS))  # each row once: none lost, none repeated
    # the next epoch is dealt as usual on the new ranks
    reader = ParquetReader(dataset, "train", config, 0, worlds[-1])
    reader.load_state_dicts(states)
    reader.set_epoch(2)
    fresh = ParquetReader(dataset, "train", config, 0, worlds[-1])
    fresh.set_epoch(2)
    assert np.array_equal(row_ids(list(reader)), row_ids(list(fresh)))


def test_unshuffled_row_groups_keep_their_batches_across_world_sizes(dataset):
    """Row groups of one per-rank batch, read in order: N ranks with batches of B hold, step by step,
    the rows 1 rank reads with batches of N * B; resumed on the other number, the steps hold the same rows."""

    def steps(world_size: int, batch: int, states: Sequence[Dict] = ()) -> List[set]:
        streams = []
        for rank in range(world_size):
            reader = ParquetReader(dataset, "train", ReaderConfig(batch_size=batch), rank, world_size)
            if states:
                reader.load_state_dicts(states)
            streams.append([set(b.row_ids.tolist()) for b in reader])
        return [set().union(*(s[k] for s in streams if k < len(s))) for k in range(max(map(len, streams)))]

    one, two = steps(1, 100), steps(2, 50)
    assert one == two and len(one) == 6
    two_states, _ = interrupt(dataset, ReaderConfig(batch_size=50), 2, 2, epoch=0)
    assert steps(1, 100, two_states) == one[2:]
    one_states, _ = interrupt(dataset, ReaderConfig(batch_size=100), 1, 2, epoch=0)
    assert steps(2, 50, one_states) == two[2:]


def test_states_of_another_stream_or_with_drop_last_are_refused(dataset):
    states, _ = interrupt(dataset, ReaderConfig(batch_size=40, shuffle=True), 2, 1)
    with pytest.raises(ValueError, match="seed"):
        ParquetReader(dataset, "train", ReaderConfig(batch_size=40, shuffle=True, seed=9), 0, 1).load_state_dicts(states)
    with pytest.raises(ValueError, match="not one run's states"):
        ParquetReader(dataset, "train", ReaderConfig(batch_size=40, shuffle=True), 0, 1).load_state_dicts(states[:1] * 3)
    dropping, _ = interrupt(dataset, ReaderConfig(batch_size=40, drop_last=True), 2, 1)
    with pytest.raises(ValueError, match="drop_last"):
        ParquetReader(dataset, "train", ReaderConfig(batch_size=40, drop_last=True), 0, 1).load_state_dicts(dropping)
