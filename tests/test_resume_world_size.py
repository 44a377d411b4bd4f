"""Resuming on another number of ranks: the reader deals the rest of the interrupted epoch to the new
ranks (every row read exactly once), and training resumed 2 -> 1 and 1 -> 2 ranks, under another
sharding plan, ends where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from recsys_kd.data.prepare import PrepareConfig, prepare
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.synthetic import SyntheticConfig
from recsys_kd.runs import TrainOutput
from recsys_kd.train.checkpoint import CheckpointError, check_state_fits
from tests.test_reader import row_ids, write_dataset
from tests.train_jobs import run_jobs
from tests.trainrun import final_weights, run_train_jobs, write_recipe

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


@pytest.mark.parametrize("before, after", [((2, 1), (1, 2)), ((1, 2), (3, 1)), ((2, 2), (1, 3))])
def test_another_number_of_workers_reads_every_row_once(dataset, monkeypatch, before, after):
    """(ranks, workers per rank) before and after. Each worker iterates a copy of its rank's reader,
    the rank's reader records what they hand out: what ResumableLoader does with DataLoader workers,
    here in one process (torch's worker info is stubbed)."""
    config = ReaderConfig(batch_size=30, shuffle=True, shuffle_window_row_groups=2, seed=4)

    def run(layout, states=(), steps=None):
        world_size, workers = layout
        read, saved = [], []
        for rank in range(world_size):
            reader = ParquetReader(dataset, "train", config, rank, world_size, num_workers=workers)
            if states:
                reader.load_state_dicts(states)
            expected, handed = reader.remaining_batches(), 0
            copies = [copy.copy(reader) for _ in range(workers)]  # as the DataLoader's workers get it
            reader.begin_pass()
            for worker, worker_copy in enumerate(copies):
                info = SimpleNamespace(id=worker, num_workers=workers)
                monkeypatch.setattr("recsys_kd.data.reader.get_worker_info", lambda: info)
                for taken, batch in enumerate(worker_copy):
                    if steps is not None and taken == steps:
                        break
                    reader.advance(batch)
                    read.extend(batch.row_ids.tolist())
                    handed += 1
            assert steps is not None or handed == expected
            saved.append(reader.state_dict())
        return saved, read

    states, first = run(before, steps=2)
    _, rest = run(after, states)
    assert 0 < len(first) < SPLIT_ROWS
    assert np.array_equal(np.sort(np.array(first + rest)), np.arange(SPLIT_ROWS))


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


# ------------------------------------------------------------------------------------ training resumed

BATCH = 128  # rows per rank on 2 ranks; 1 rank reads 2 * BATCH: the global batch stays 256 rows
MODEL = {"name": "deepfm", "embedding_dim": 8, "mlp_layers": [32, 16]}
# (optimizer, ranks before -> after, sharding before -> after): every resume changes the plan too
RESUMES = [
    ("sgd", (2, 1), ("row_wise", "table_wise")),
    ("sgd", (1, 2), ("table_wise", "row_wise")),
    ("adagrad", (2, 1), ("column_wise", "table_wise")),
    ("adagrad", (1, 2), ("table_wise", "column_wise")),
    ("rowwise_adagrad", (2, 1), ("row_wise", "table_wise")),
]


PHASES = ("first_1", "on_2", "last_1")  # the three launches: 1 rank here, 2 rank processes, 1 rank here


def train_phases(root: Path) -> Dict[str, List[Dict]]:
    """Per optimizer an uninterrupted 1-rank run, and per entry of RESUMES a run stopped as step 6
    starts (after the step-4 checkpoint: step 5 is lost and redone) and resumed on the other number
    of ranks with the other sharding plan and the per-rank batch that keeps 256 rows a step: the jobs
    of each launch."""
    synthetic = SyntheticConfig(rows=6000, seed=5, sparse_features=5, dense_features=2, max_vocab=300, chunk_rows=2000)
    # row groups of one 2-rank batch, read in order: a 1-rank step reads the rows of a 2-rank step
    prepare(PrepareConfig(format="synthetic", synthetic=synthetic, output=str(root / "data"), progress=False,
                          row_group_rows=BATCH))

    def job(name, optimizer, ranks, sharding, stop_at=None):
        config = write_recipe(root / f"{name}.yaml", {
            "run_dir": str(root / name), "prepare": {"format": "synthetic", "output": str(root / "data")},
            "reader": {"batch_size": BATCH, "shuffle": False},
            "train": {"model": MODEL, "output": str(root / name), "epochs": 1, "progress": False, "max_steps": 8,
                      "checkpoint_every_steps": 4, "eval_every_steps": 3, "patience": 10, "eval_batch_size": 1024,
                      "optim": {"embedding": optimizer, "embedding_lr": 0.05, "lr": 0.003}},
        })
        overrides = [f"reader.batch_size={2 * BATCH // ranks}", f"train.sharding.type={sharding}"]
        return {"config": str(config), "overrides": overrides, "stop_at": stop_at}

    phases: Dict[str, List[Dict]] = {phase: [] for phase in PHASES}
    for optimizer in dict.fromkeys(optimizer for optimizer, _, _ in RESUMES):
        phases["first_1"].append(job(f"whole_{optimizer}", optimizer, 1, "table_wise"))
    for optimizer, (before, after), (plan_before, plan_after) in RESUMES:
        name = f"{optimizer}_{before}to{after}"
        phases["first_1" if before == 1 else "on_2"].append(job(name, optimizer, before, plan_before, stop_at=5))
        phases["on_2" if after == 2 else "last_1"].append(job(name, optimizer, after, plan_after))
    return phases


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """The runs of both resume tests (train, and distill and compress) in three launches, since
    starting processes is most of a small run's time: each group's root and its jobs' outcomes per
    phase (the 2-rank launch: its exit codes), rank 0's log of the 2-rank launch and the 1-rank
    resumes' stderr (also in ``last_1.log``)."""
    root = tmp_path_factory.mktemp("resume_world_size")
    groups = {"train": train_phases(root / "train"), "stages": stage_phases(root / "stages")}
    jobs = {phase: [job for group in groups.values() for job in group[phase]] for phase in PHASES}
    outcomes: Dict[str, List] = {}
    stderr = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outcomes["first_1"] = run_jobs(jobs["first_1"])
        (root / "on_2.json").write_text(json.dumps(jobs["on_2"]))
        outcomes["on_2"] = run_train_jobs(root / "on_2.json", 2)
        with contextlib.redirect_stderr(stderr):  # the resumes say what they resumed from
            outcomes["last_1"] = run_jobs(jobs["last_1"])
    finally:
        torch.set_num_threads(threads)
        (root / "last_1.log").write_text(stderr.getvalue())
    results = {}
    for name, group in groups.items():
        mine = {"on_2": outcomes["on_2"]}
        for phase in ("first_1", "last_1"):
            before = sum(len(other[phase]) for other in list(groups.values())[: list(groups).index(name)])
            mine[phase] = outcomes[phase][before : before + len(group[phase])]
        results[name] = (root / name, mine)
    return results, (root / "on_2.rank0.log").read_text(), stderr.getvalue()


@pytest.fixture(scope="module")
def resumed_runs(launches):
    groups, log, _ = launches
    root, outcomes = groups["train"]
    return root, outcomes["first_1"], outcomes["on_2"], outcomes["last_1"], log


def record(root: Path, name: str) -> Dict:
    return json.loads((root / name / "train.json").read_text())


@pytest.mark.multiprocess
def test_resumed_on_another_number_of_ranks_ends_as_an_uninterrupted_run(resumed_runs):
    """Resumed 2 -> 1 and 1 -> 2 ranks (and from row-/column-wise to table-wise and back), with SGD,
    Adagrad and row-wise Adagrad, a run ends with the validation history, test metrics and weights
    of the uninterrupted run, within float tolerance.

    The reference is the uninterrupted 1-rank run for both directions: the per-rank batch is set so
    that every step holds the same 256 rows on either number of ranks (the reader deals the rest of
    the interrupted epoch in the order the old ranks would have read it), and an uninterrupted
    2-rank run ends where the 1-rank run does (tests/test_train_multiprocess.py); so both the run of
    the initial and of the final number of ranks are this reference, up to the order of float sums."""
    root, first, on_two, last, log = resumed_runs
    assert on_two == [0, 0], log[-3000:]
    assert first == ["0"] * 3 + ["stopped"] * 2 and last == ["0"] * 3
    for optimizer, (before, after), (plan_before, plan_after) in RESUMES:
        name = f"{optimizer}_{before}to{after}"
        whole, resumed = record(root, f"whole_{optimizer}"), record(root, name)
        assert resumed["world_size"] == after
        assert {t["sharding_type"] for n, t in resumed["sharding_plan"].items() if n.startswith("t_")} == {plan_after}
        assert resumed["steps"] == whole["steps"] == 8
        assert [h["step"] for h in resumed["history"]] == [h["step"] for h in whole["history"]] == [3, 6, 8]
        for a, b in zip(resumed["history"], whole["history"]):
            assert a["valid"]["rows"] == b["valid"]["rows"]
            for metric in ("auc", "logloss"):
                assert a["valid"][metric] == pytest.approx(b["valid"][metric], abs=2e-5), (name, a["step"], metric)
        assert resumed["test"]["auc"] == pytest.approx(whole["test"]["auc"], abs=2e-5), name
        assert resumed["test"]["logloss"] == pytest.approx(whole["test"]["logloss"], abs=2e-5), name
        a, b = final_weights(root / name, root / "data", MODEL), final_weights(root / f"whole_{optimizer}", root / "data", MODEL)
        assert a.keys() == b.keys() and len(a) > 10
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=f"{name}: {key}")
    assert "written by 1 ranks, resharded to 2 (global batch 256 -> 256 rows)" in log


def test_a_table_whose_optimizer_changed_with_the_plan_is_named_with_the_fix(tmp_path):
    """A data-parallel table keeps the dense optimizer's state, a sharded one the fused optimizer's:
    resuming with the table on the other side is refused before DCP starts, naming every such table
    and the sharding type that resumes it; a state of another shape is named too."""
    def weight(table: str) -> str:
        return f"model.embedding.ebc.embedding_bags.{table}.weight"

    saved = {"model": {weight("t_a"): torch.zeros(5, 4), weight("t_b"): torch.zeros(6, 4)},
             "optimizer": {"state": {weight("t_a"): {"step": torch.zeros(()), "exp_avg": torch.zeros(5, 4)},
                                     weight("t_b"): {"t_b.momentum1": torch.zeros(6)}}}}
    dcp.save(saved, checkpoint_id=str(tmp_path), no_dist=True)
    swapped = {"model": saved["model"],
               "optimizer": {"state": {weight("t_a"): {"t_a.momentum1": torch.zeros(5, 4)},
                                       weight("t_b"): {"step": torch.zeros(()), "exp_avg": torch.zeros(6, 4)}}}}
    with pytest.raises(CheckpointError, match=r"of t_a, t_b cannot carry over.*"
                                              r"train\.sharding\.tables=\{t_a: data_parallel, t_b: table_wise\}"):
        check_state_fits(tmp_path, swapped)
    column_shards = {**saved, "optimizer": {"state": {**saved["optimizer"]["state"], weight("t_b"): {"t_b.momentum1": torch.zeros(12)}}}}
    with pytest.raises(CheckpointError, match=r"t_b\.momentum1 has shape \[6\] there and \[12\] in this run; row-wise Adagrad"):
        check_state_fits(tmp_path, column_shards)
    with pytest.raises(CheckpointError, match="holds no model.extra; was it written for another model"):
        check_state_fits(tmp_path, {"model": {"extra": torch.zeros(1)}})
    check_state_fits(tmp_path, saved)  # the state it was written from fits


# ----------------------------------------------------------------------- distill and compress resumed

TEACHER = {"name": "dnn", "embedding_dim": 8, "mlp_layers": [32, 16, 16]}
STUDENT = {"name": "dcn", "embedding_dim": 8, "mlp_layers": [16], "cross_layers": 1}


def stage_phases(root: Path) -> Dict[str, List[Dict]]:
    """A teacher (also the compressed model) and its soft labels; then per stage (distill: a row-wise
    sharded student learning from the teacher's logits in the batch extras; compress: AFM on the MLP,
    then the embeddings, each fine-tuned) an uninterrupted 1-rank run, and a run stopped on 2 ranks as
    step 6 starts (after the step-4 checkpoint; for compress in the MLP's fine-tuning) and resumed on 1
    rank (the student table-wise) with the per-rank batch that keeps 256 rows a step: the jobs of each
    launch."""
    synthetic = SyntheticConfig(rows=4000, seed=6, sparse_features=4, dense_features=2, max_vocab=200, chunk_rows=2000)
    prepare(PrepareConfig(format="synthetic", synthetic=synthetic, output=str(root / "data"), progress=False,
                          row_group_rows=BATCH))
    config = str(write_recipe(root / "recipe.yaml", {
        "run_dir": str(root), "prepare": {"format": "synthetic", "output": str(root / "data")},
        "reader": {"batch_size": 2 * BATCH, "shuffle": False},
        "train": {"model": TEACHER, "output": str(root / "teacher"), "epochs": 1, "progress": False, "max_steps": 10,
                  "checkpoint_every_steps": 4, "eval_batch_size": 1024, "sharding": {"type": "row_wise"}},
        "infer": {"teachers": [{"name": "dnn", "train_output": str(root / "teacher")}], "progress": False},
        "distill": {"model": STUDENT, "epochs": 1, "progress": False, "max_steps": 8, "checkpoint_every_steps": 4,
                    "eval_every_steps": 3, "patience": 10, "eval_batch_size": 1024, "sharding": {"type": "row_wise"},
                    "distill": {"teachers": ["dnn"], "loss": {"hard": 0.5, "soft": 0.5, "temperature": 2.0}}},
        "compress": {"source": str(root / "teacher"), "methods": ["afm"], "batch_size": 500, "progress": False,
                     "sharding": {"type": "row_wise"}, "finetune": {"epochs": 1},
                     "steps": [{"what": "mlp", "ranks": {1: 8, 2: 8}}, {"what": "embeddings", "rank": 4}]},
    }))

    def job(stage, name, ranks, stop_at=None, sharding="row_wise"):
        overrides = [f"reader.batch_size={2 * BATCH // ranks}", f"{stage}.output={root / name}"]
        if stage == "distill":
            overrides.append(f"distill.sharding.type={sharding}")
        return {"stage": stage, "config": config, "overrides": overrides, "stop_at": stop_at}

    return {
        "first_1": [{"stage": "train", "config": config}, {"stage": "infer", "config": config},
                    job("distill", "distill_whole", 1), job("compress", "compress_whole", 1)],
        "on_2": [job("distill", "distill_2to1", 2, stop_at=6), job("compress", "compress_2to1", 2, stop_at=6)],
        "last_1": [job("distill", "distill_2to1", 1, sharding="table_wise"), job("compress", "compress_2to1", 1)],
    }


def checkpoint_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """Every model tensor of the DCP checkpoint at ``path``, whatever the model (single process)."""
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tensors = {key: torch.zeros(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in stored.items()
               if key.startswith("model.") and hasattr(meta, "size")}
    dcp.load(tensors, checkpoint_id=str(path), no_dist=True)
    return tensors


def assert_close_tensors(mine: Dict[str, torch.Tensor], theirs: Dict[str, torch.Tensor], name: str) -> None:
    assert mine.keys() == theirs.keys() and len(mine) > 5, name
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=2e-5, msg=f"{name}: {key}")


@pytest.mark.multiprocess
def test_distill_and_compress_resumed_on_fewer_ranks_end_as_uninterrupted_runs(launches):
    """A distillation (teacher logits read from the soft labels beside the rows) and an AFM compression
    with fine-tuning, stopped on 2 ranks and resumed on 1, end with the metrics and weights of their
    uninterrupted 1-rank runs, within float tolerance."""
    groups, log_two, log_last = launches
    root, outcomes = groups["stages"]
    first, on_two, last = (outcomes[phase] for phase in PHASES)
    assert first == ["0"] * 4 and on_two == [0, 0] and last == ["0"] * 2, (log_two + log_last)[-3000:]
    resharded = "(epoch 0, step 4; written by 2 ranks, resharded to 1 (global batch 256 -> 256 rows))"
    for checkpoints in ("distill_2to1/checkpoints", "compress_2to1/afm/step1_mlp/ft/checkpoints"):
        assert f"resumed from {root / checkpoints / 'step_000000004'} {resharded}" in log_last, log_last[-3000:]

    whole, resumed = (json.loads((root / name / "train.json").read_text()) for name in ("distill_whole", "distill_2to1"))
    assert resumed["world_size"] == 1 and resumed["config"]["distill"]["teachers"] == ["dnn"]
    assert resumed["steps"] == whole["steps"] == 8
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in whole["history"]] == [3, 6, 8]
    for a, b in zip(resumed["history"], whole["history"]):
        for metric in ("auc", "logloss", "distill_loss"):
            assert a["valid"][metric] == pytest.approx(b["valid"][metric], abs=2e-5), ("distill", a["step"], metric)
    for metric in ("auc", "logloss"):
        assert resumed["test"][metric] == pytest.approx(whole["test"][metric], abs=2e-5), metric
    assert_close_tensors(checkpoint_tensors(TrainOutput(root / "distill_2to1").latest()),
                         checkpoint_tensors(TrainOutput(root / "distill_whole").latest()), "distill")

    whole, resumed = (json.loads((root / name / "compress.json").read_text()) for name in ("compress_whole", "compress_2to1"))
    stages = ["uncompressed", "mlp compressed", "mlp fine-tuned", "embeddings compressed", "embeddings fine-tuned"]
    assert [row["stage"] for row in resumed["chains"]["afm"]] == [row["stage"] for row in whole["chains"]["afm"]] == stages
    for a, b in zip(resumed["chains"]["afm"], whole["chains"]["afm"]):
        for metric in ("valid_auc", "test_auc", "test_logloss"):
            assert a[metric] == pytest.approx(b[metric], abs=2e-5), (a["stage"], metric)
    for step in ("step1_mlp", "step1_mlp/ft", "step2_embeddings", "step2_embeddings/ft"):
        mine, theirs = (TrainOutput(root / name / "afm" / step) for name in ("compress_2to1", "compress_whole"))
        # a compression step's one checkpoint; a fine-tuning's last weights
        assert_close_tensors(checkpoint_tensors(mine.latest() or mine.best),
                             checkpoint_tensors(theirs.latest() or theirs.best), step)
