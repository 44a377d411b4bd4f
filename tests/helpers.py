"""Shared test helpers: reading back a prepared dataset in full (small datasets only)."""

import importlib.util
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq

from recsys_kd.data.schema import IdRule, Schema, SparseFeature

import torch

IDENTITY = IdRule(kind="identity")
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` imported as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_schema(with_hour: bool = True) -> Schema:
    """2 dense features and 3-4 small sparse ones, one multi-hot: for model-level tests."""
    sparse = [
        SparseFeature("user", 11, IDENTITY),
        SparseFeature("tags", 7, IDENTITY, multi_hot=True),
        SparseFeature("item", 13, IDENTITY),
    ]
    if with_hour:
        sparse.append(SparseFeature("hour", 5, IDENTITY))
    return Schema(name="tiny", label="label", dense=["d0", "d1"], sparse=sparse)


def read_split(dataset: Path, split: str) -> pa.Table:
    schema = Schema.load(dataset)
    files = schema.splits[split].files
    if not files:
        return pa.table({})
    return pa.concat_tables([pq.read_table(Path(dataset) / f) for f in files])


def read_all(dataset: Path) -> pa.Table:
    schema = Schema.load(dataset)
    tables = [read_split(dataset, s) for s in schema.splits if schema.splits[s].files]
    return pa.concat_tables(tables).sort_by("row_id")


def tiny_batch(schema: Schema, seed: int, batch_size: int, skewed_ids: bool = False, dense_shift: float = 0.0):
    """A reader-shaped Batch over ``schema``: KJT keys in schema order, multi-hot features with 0-3
    ids and an empty first bag. ``skewed_ids`` draws popular ids more often (rank-weighted)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_kd.data.batch import Batch

    generator = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    for feature in schema.sparse:
        if feature.multi_hot:
            length = torch.randint(0, 4, (batch_size,), generator=generator, dtype=torch.int32)
            length[0] = 0
        else:
            length = torch.ones(batch_size, dtype=torch.int32)
        lengths.append(length)
        count = int(length.sum())
        if skewed_ids:
            weights = torch.arange(feature.num_embeddings, 0, -1, dtype=torch.float64)
            values.append(torch.multinomial(weights, count, replacement=True, generator=generator))
        else:
            values.append(torch.randint(0, feature.num_embeddings, (count,), generator=generator))
    return Batch(
        dense=torch.randn(batch_size, len(schema.dense), generator=generator) + dense_shift,
        sparse=KeyedJaggedTensor(
            keys=schema.sparse_names, values=torch.cat(values), lengths=torch.cat(lengths), stride=batch_size
        ),
        labels=torch.randint(0, 2, (batch_size,), generator=generator).float(),
        extras={},
        row_ids=torch.arange(batch_size),
    )


SMALL_MODEL = dict(embedding_dim=4, mlp_layers=[16, 8], cross_layers=2, cin_layers=[6, 4], dagfm_layers=2)


def visible_model(schema: Schema, name: str, seed: int = 0, **overrides):
    """A small eval-mode model with visible tables (the default init, std 1e-4, would make every model
    near-constant) and random biases; ``overrides`` change ``SMALL_MODEL``'s config."""
    from recsys_kd.models import ModelConfig, build_model

    torch.manual_seed(seed)
    model = build_model(schema, ModelConfig(name=name, **{**SMALL_MODEL, **overrides}))
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if ".embedding_bags." in key:
                parameter.normal_(0.0, 0.5)
            elif key.endswith("bias"):
                parameter.uniform_(-0.3, 0.3)
    return model.eval()


def fake_train_output(root: Path, dataset: Path, name: str, seed: int = 0, **overrides) -> Path:
    """A train output as the trainer leaves it (train.json + checkpoints/best in DCP) for a
    :func:`visible_model`, without training: what ``export_artifact`` reads."""

    from recsys_kd.models import ModelConfig

    model = visible_model(Schema.load(dataset), name, seed=seed, **overrides)
    return save_train_output(Path(root) / name, dataset, model, ModelConfig(name=name, **{**SMALL_MODEL, **overrides}))


def save_train_output(output: Path, dataset: Path, model, config) -> Path:
    """Writes ``model`` (built from ``config``, a ModelConfig) as a train output: train.json +
    checkpoints/best in DCP."""
    import json

    import torch.distributed.checkpoint as dcp

    from recsys_kd.config import to_dict

    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    dcp.save({"model": state}, checkpoint_id=str(output / "checkpoints" / "best"), no_dist=True)
    record = {"config": {"model": to_dict(config)}, "dataset": str(dataset), "test": {"auc": 0.5, "logloss": 0.7}}
    (output / "train.json").write_text(json.dumps(record))
    return output


TINY_MODEL = {"embedding_dim": 8, "dense_mode": "projected"}


def tiny_pipeline_recipe(root: Path) -> Path:
    """A recipe of every pipeline stage on 4,000 synthetic rows (tests/conftest.py runs it once: ``tiny_pipeline_run``)."""
    from tests.trainrun import write_recipe

    quick = {"epochs": 1, "max_steps": 8, "log_every_steps": 2, "progress": False, "eval_batch_size": 2048}
    return write_recipe(root / "tiny.yaml", {
        "run_dir": str(root),
        "synthesize": {"path": str(root / "raw" / "train.txt"),
                       "synthetic": {"rows": 4000, "seed": 1, "max_vocab": 200, "chunk_rows": 2000}},
        "prepare": {"format": "criteo", "inputs": [str(root / "raw" / "train.txt")], "output": str(root / "data"),
                    "criteo": {"integers": "bucketize"}, "ids": {"rule": "vocab", "min_count": 2},
                    "progress": False, "row_group_rows": 500},
        "reader": {"batch_size": 256, "shuffle": True},
        "train": {"model": {"name": "dcn", "mlp_layers": [16], "cross_layers": 2, **TINY_MODEL}, **quick},
        "infer": {"teachers": [{"name": "dcn", "train_output": str(root / "train" / "dcn")}], "batch_size": 512},
        "distill": {"model": {"name": "dnn", "mlp_layers": [16, 16, 16], **TINY_MODEL},
                    "distill": {"teachers": ["dcn"], "loss": {"hard": 0.5, "mse": 1.0}}, **quick},
        "finetune": {"model": {"name": "dnn", "mlp_layers": [16, 16, 16], **TINY_MODEL}, **quick},
        "compress": {"methods": ["afm"], "batch_size": 1000,
                     "steps": [{"what": "mlp", "ranks": {1: 4}}, {"what": "embeddings", "rank": 4}],
                     "finetune": {"epochs": 1}},
    })
