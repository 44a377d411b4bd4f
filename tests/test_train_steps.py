"""The trainer's steps (recsys_kd/train/steps.py): torchrec's TrainPipelineSparseDist trains exactly as
the synchronous loop, across a pause for evaluation, a padding batch and an epoch change, and the
position a checkpoint saves is the one after the last batch trained, not after the batches the
pipeline pulled ahead. In this process's one-rank group; 2 ranks: tests/test_train_multiprocess.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

from recsys_kd.config import ConfigError
from recsys_kd.data.batch import Batch
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema
from recsys_kd.distill.config import DistillConfig
from recsys_kd.distill.gating import TeacherGate
from recsys_kd.distill.losses import KDLossConfig
from recsys_kd.distill.task import DistillationTask
from recsys_kd.distributed import init_distributed
from recsys_kd.models.low_rank import LowRankStep
from recsys_kd.models.zoo import MODEL_NAMES, ModelConfig, build_model
from recsys_kd.train.config import TrainConfig
from recsys_kd.train.steps import TrainedPosition, epoch_batches, make_steps
from recsys_kd.train.task import LabelTask
from recsys_kd.train.trainer import distribute
from tests.helpers import tiny_batch, tiny_schema
from tests.test_reader import write_dataset

BATCH = 40
READER = ReaderConfig(batch_size=BATCH, shuffle=True, shuffle_window_row_groups=2, seed=3, verify=False)
PAUSE_AFTER = 4  # steps of epoch 0 before the pause an evaluation makes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("steps")
    write_dataset(directory)
    return directory


def sharded_task(dataset: Path, pipeline: str, task: type = LabelTask):
    """A deepfm task module sharded on this process's one-rank group, and its steps."""
    ctx = init_distributed("gloo")
    config = TrainConfig(model=ModelConfig(name="deepfm", embedding_dim=4, mlp_layers=[8]), pipeline=pipeline)
    torch.manual_seed(0)
    model = build_model(Schema.load(dataset), config.model, embedding_device=torch.device("meta"))
    dmp, optimizer, _ = distribute(task(model), config, ctx, BATCH)
    return dmp, make_steps(pipeline, dmp, optimizer, ctx.device)


def logits(dmp: torch.nn.Module, batch: Batch) -> torch.Tensor:
    dmp.eval()
    with torch.no_grad():
        _, outputs = dmp(batch)
    dmp.train()
    return outputs.logits


def train_two_epochs(dataset: Path, pipeline: str) -> Dict[str, List]:
    """Two epochs of the train split, each followed by one padding batch (what a rank steps on when
    its rows have run out), pausing after PAUSE_AFTER steps of epoch 0 to score the valid split."""
    dmp, steps = sharded_task(dataset, pipeline)
    probe = next(iter(ParquetReader(dataset, "valid", ReaderConfig(batch_size=1000, verify=False), 0, 1)))
    reader = ParquetReader(dataset, "train", READER, 0, 1)
    run: Dict[str, List] = {"losses": [], "rows": [], "positions": [], "reader_positions": [], "scores": []}
    for epoch in (0, 1):
        reader.set_epoch(epoch)
        position = TrainedPosition(reader)
        count = reader.num_batches() + 1
        batches = epoch_batches(reader, count, world_size=1)  # the last: a padding batch
        for step in range(count):
            loss, batch = steps.progress(batches)
            position.trained(batch)
            run["losses"].append(loss)
            run["rows"].append(batch.row_ids.tolist())
            run["positions"].append(position.state_dict())
            run["reader_positions"].append(reader.state_dict()["rows_consumed"])
            if epoch == 0 and step + 1 == PAUSE_AFTER:
                steps.pause()
                run["scores"].append(logits(dmp, probe))
        with pytest.raises(StopIteration):
            steps.progress(batches)
    steps.pause()
    run["scores"].append(logits(dmp, probe))
    run["pipelined"] = steps.pipelined_modules()
    return run


def test_the_pipeline_trains_as_the_synchronous_loop_and_saves_where_training_is(dataset):
    synchronous, pipelined = train_two_epochs(dataset, "none"), train_two_epochs(dataset, "sparse_dist")
    assert synchronous["pipelined"] == []
    assert pipelined["pipelined"] == ["model.embedding.ebc", "model.first_order.weights.ebc"]
    # the same batches in the same order, each once (the ones in flight at the pause too)
    assert pipelined["rows"] == synchronous["rows"]
    epoch = len(pipelined["rows"]) // 2
    assert sorted(sum(pipelined["rows"][: epoch - 1], [])) == list(range(513))
    assert pipelined["rows"][epoch - 1] == [-1] * BATCH  # the padding batch
    # bit for bit the same losses, and the same model at the pause and at the end
    assert torch.equal(torch.stack(pipelined["losses"]), torch.stack(synchronous["losses"]))
    for a, b in zip(pipelined["scores"], synchronous["scores"]):
        assert torch.equal(a, b)
    assert not torch.equal(pipelined["scores"][0], pipelined["scores"][1])  # training moved the model
    # the pipeline pulls two batches ahead of the one it trains: the reader's own position is ahead,
    # the saved one is where training is, and a reader resumed from it reads the next batch trained
    assert pipelined["reader_positions"][0] > pipelined["positions"][0]["rows_consumed"] == [BATCH]
    assert synchronous["reader_positions"][0] == synchronous["positions"][0]["rows_consumed"]
    resumed = ParquetReader(dataset, "train", READER, 0, 1)
    resumed.load_state_dict(pipelined["positions"][PAUSE_AFTER - 1])
    assert next(iter(resumed)).row_ids.tolist() == pipelined["rows"][PAUSE_AFTER]
    assert pipelined["positions"][epoch - 1]["rows_consumed"] == [513]  # the padding batch moves nothing


class UntraceableTask(LabelTask):
    """A task module whose forward branches on a tensor's value, which torch.fx cannot trace."""

    def forward(self, batch: Batch):
        if batch.labels.sum() > 0:
            return super().forward(batch)
        return super().forward(batch)


def test_a_task_module_the_pipeline_cannot_trace_is_named_with_the_fix(dataset):
    _, steps = sharded_task(dataset, "sparse_dist", UntraceableTask)
    reader = ParquetReader(dataset, "train", READER, 0, 1)
    with pytest.raises(ConfigError, match="cannot trace this task module.*set train.pipeline=none"):
        steps.progress(iter(reader))


def distillation(model, config: DistillConfig, **parts) -> DistillationTask:
    return DistillationTask(model, config, l2_embedding=1e-3, **parts)


TWO_TEACHERS = dict(teachers=["a", "b"], loss=KDLossConfig(hard=0.5, mse=1.0))
# name -> (model config overrides, the task module around the model, the modules the pipeline must find)
TASKS = {
    **{name: ({}, lambda model: LabelTask(model, l2_embedding=1e-3), None) for name in MODEL_NAMES},
    "dnn compressed, fused": (dict(name="dnn", compression=[LowRankStep("mlp", {"0": 3}),
                                                            LowRankStep("embeddings", {"user": 2}, fused=True)]),
                              LabelTask, None),
    "deepfm compressed": (dict(name="deepfm", compression=[LowRankStep("embeddings", {"user": 2, "item": 3})]),
                          LabelTask, None),
    "distill, mean": (dict(name="dagfm_outer"), lambda model: distillation(model, DistillConfig(**TWO_TEACHERS)), None),
    "distill, fixed weights": (dict(name="dagfm_outer"), lambda model: distillation(
        model, DistillConfig(**TWO_TEACHERS, aggregation="fixed", weights=[0.3, 0.7])), None),
    "distill, gate and hints": (dict(name="dagfm_outer"), lambda model: distillation(
        model, DistillConfig(teachers=["a", "b"], aggregation="gate", loss=KDLossConfig(hard=0.5, mse=1.0, hint=1e-3)),
        gate=TeacherGate(2), projections={"a": nn.Linear(3, model.hidden_dim), "b": nn.Linear(5, model.hidden_dim)}),
        None),
    "distill, co-trained teacher": (dict(name="dagfm_outer"), lambda model: distillation(
        model, DistillConfig(scheme="cotrain", cotrain_teacher={"name": "dnn"}, loss=KDLossConfig(hard=0.5, soft=0.5)),
        teacher=build_model(tiny_schema(), ModelConfig(name="dnn", embedding_dim=4, mlp_layers=[8]),
                            embedding_device=torch.device("meta"))),
        ["model.embedding.ebc", "teacher.embedding.ebc"]),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_every_model_and_task_module_is_pipelined(name):
    """torchrec traces the task module to find which batch attribute each sharded table collection
    reads: every model of the zoo, compressed ones and the distillation tasks must trace (a traced
    tensor cannot steer Python control flow), and every table collection they call be found."""
    overrides, task, expected = TASKS[name]
    schema = tiny_schema()
    config = TrainConfig(model=ModelConfig(**{"name": name, "embedding_dim": 4, "mlp_layers": [8], "cin_layers": [4, 4],
                                              **overrides}))
    torch.manual_seed(0)
    model = build_model(schema, config.model, embedding_device=torch.device("meta"))
    dmp, optimizer, _ = distribute(task(model), config, init_distributed("gloo"), 16)
    steps = make_steps("sparse_dist", dmp, optimizer, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    extras = {"teacher_a": torch.randn(16, generator=generator), "teacher_b": torch.randn(16, generator=generator),
              "hint_a": torch.randn(16, 3, generator=generator), "hint_b": torch.randn(16, 5, generator=generator)}
    batch = dataclasses.replace(tiny_batch(schema, 0, 16), extras=extras)
    loss, _ = steps.progress(iter([batch]))
    steps.pause()
    tables = sorted(path for path, module in dmp.module.named_modules() if isinstance(module, ShardedEmbeddingBagCollection))
    assert steps.pipelined_modules() == tables == (expected or tables) and tables
    assert torch.isfinite(loss)


def test_one_process_data_parallel_tables_train_as_torchrecs_ddp_wrapped_lookup(dataset: Path, monkeypatch):
    """One process: the data-parallel tables' lookup is not wrapped in DDP (an allreduce over one rank),
    and three steps leave every weight and state-dict key as torchrec's DDP-wrapped lookup does."""
    from torch.nn.parallel import DistributedDataParallel

    from recsys_kd.train import sharding

    def trained(dmp, optimizer):
        for batch in list(ParquetReader(dataset, "train", READER, 0, 1))[:3]:
            optimizer.zero_grad()
            loss, _ = dmp(batch)
            loss.backward()
            optimizer.step()
        return {key: value.detach().clone() for key, value in dmp.state_dict().items()}

    def build():
        config = TrainConfig(model=ModelConfig(name="deepfm", embedding_dim=4, mlp_layers=[8]), pipeline="none",
                             sharding=sharding.ShardingConfig(type="data_parallel"))
        torch.manual_seed(0)
        model = build_model(Schema.load(dataset), config.model, embedding_device=torch.device("meta"))
        dmp, optimizer, _ = distribute(LabelTask(model), config, init_distributed("gloo"), BATCH)
        lookups = [lookup for module in dmp.modules() if isinstance(module, ShardedEmbeddingBagCollection)
                   for lookup in module._lookups]
        return dmp, optimizer, lookups

    dmp, optimizer, lookups = build()
    assert lookups and not any(isinstance(lookup, DistributedDataParallel) for lookup in lookups)
    bare = trained(dmp, optimizer)
    monkeypatch.setattr(sharding, "OneProcessShardedEmbeddingBagCollection", ShardedEmbeddingBagCollection)
    dmp, optimizer, lookups = build()
    assert all(isinstance(lookup, DistributedDataParallel) for lookup in lookups)
    wrapped = trained(dmp, optimizer)
    assert bare.keys() == wrapped.keys()
    for key in bare:
        torch.testing.assert_close(bare[key], wrapped[key], rtol=0, atol=0, msg=key)
