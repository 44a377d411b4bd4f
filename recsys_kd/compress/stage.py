"""``recsys-kd compress``: AFM (or SVD) low-rank compression of a trained model, sharded, step by step,
each step fine-tuned through the normal trainer.

For each method (``afm``, ``svd``) and each configured step (the paper's order: the MLP, then the
embeddings), the stage

1. loads the current model (the source, or the previous step's fine-tuned model) into a
   DistributedModelParallel-sharded module, on N processes;
2. (AFM) streams the training split through it once, accumulating the float64 moments of the chosen
   outputs, and all-reduces them;
3. compresses it shard by shard (:mod:`recsys_kd.compress.sharded`) and saves the compressed model as a
   DCP checkpoint whose ``ModelConfig.compression`` records its structure, so ``train``, ``export`` and
   ``infer`` rebuild it like any model;
4. evaluates it right after compression (valid and test), and
5. fine-tunes it (``finetune.epochs``, default 1) with ``recsys-kd train``'s trainer; the chain goes
   on from the fine-tuned model when its valid AUC is at least the compressed model's, else from the
   compressed one (early stopping's rule, applied to epoch 0); ``final`` in the record names the
   chain's last model.

Output layout (every directory is a model output that ``recsys_kd.runs.TrainOutput`` reads: a step's
record is ``compress_step.json``, a fine-tuning's ``train.json``, each beside ``checkpoints/best``)::

    <output>/<method>/step1_mlp/            compressed, not fine-tuned
    <output>/<method>/step1_mlp/ft/         fine-tuned
    <output>/<method>/step2_embeddings/...
    <output>/compress.json                  the record: parameters, FLOPs, AUC/logloss per stage

A finished step (its record exists) is not redone, so a killed run resumes at its step.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import torch
from tqdm import tqdm

from recsys_kd.compress.sharded import compress_sharded_embeddings, compress_sharded_mlp, sharded_statistics
from recsys_kd.compress.statistics import mlp_linear_names
from recsys_kd.config import ConfigError, to_dict
from recsys_kd.data.batch import padding_batch
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema
from recsys_kd.distributed import DistributedContext, barrier, init_distributed, max_over_ranks
from recsys_kd.io import atomic_write_json
from recsys_kd.models.low_rank import can_fuse
from recsys_kd.models.zoo import ModelConfig, build_model
from recsys_kd.runs import BEST, COMPRESS_RECORD, COMPRESS_STEP_RECORD, TrainOutput
from recsys_kd.train import checkpoint
from recsys_kd.train.config import OptimConfig, TrainConfig
from recsys_kd.train.evaluation import evaluate
from recsys_kd.train.schedule import validate_cadence
from recsys_kd.train.sharding import ShardingConfig, shard
from recsys_kd.train.task import LabelTask
from recsys_kd.train.trainer import train

METHODS = ("afm", "svd")


@dataclass
class CompressStepConfig:
    """One compression step.

    Attributes:
        what: ``"mlp"`` or ``"embeddings"``.
        ranks: ``mlp``: ``{Linear index: k or variance share}`` (0-based over the MLP's Linear layers;
            the paper leaves the first alone: ``{1: 64, 2: 64}``); ``embeddings``: per-feature
            overrides ``{feature: k or share}``.
        rank: ``embeddings``: k (int) or variance share (float) of every other sparse field.
        relu_between: ``mlp``: a ReLU between the two new layers (the paper's improved variant).
        fuse: ``embeddings``: fold the up-projections into the first MLP layer: ``auto`` (where the
            head is a plain MLP over the fields), ``yes`` or ``no``.
        centered: ``embeddings``: the reference code's centred tables (exact for one-id bags only).
        mlp_path: ``mlp``: the MLP's module path when the model has several (``head.mlp``).
    """

    what: Literal["mlp", "embeddings"] = "mlp"
    ranks: Dict[str, Union[int, float]] = field(default_factory=dict)
    rank: Optional[Union[int, float]] = None
    relu_between: bool = True
    fuse: Literal["auto", "yes", "no"] = "auto"
    centered: bool = False
    mlp_path: str = ""

    def validate(self) -> None:
        if self.what == "mlp":
            if not self.ranks:
                raise ValueError("an mlp step needs ranks {Linear index: k}")
            bad = [key for key in self.ranks if not str(key).isdigit()]
            if bad:
                raise ValueError(f"mlp ranks are keyed by Linear index (0, 1, ...), got {bad}")
            if self.rank is not None:
                raise ValueError("rank is for embeddings steps; an mlp step takes ranks {index: k}")
        elif self.rank is None and not self.ranks:
            raise ValueError("an embeddings step needs rank (every sparse field) or ranks {feature: k}")
        for key, value in list(self.ranks.items()) + [("rank", self.rank)]:
            if value is not None and not (value >= 1 if isinstance(value, int) else 0.0 < value <= 1.0):
                raise ValueError(f"{key}: expected an int k >= 1 or a variance share in (0, 1], got {value!r}")


@dataclass
class FinetuneConfig:
    """Fine-tuning after each step, through the trainer (labels only). ``epochs`` 0 skips it;
    ``optim`` defaults to the source model's. Evaluations at every epoch end and at one cadence, as
    the trainer's: ``eval_every_steps``, ``eval_every_epochs`` (a fraction of an epoch, which keeps its
    meaning on a larger dataset) or ``eval_every_samples``."""

    epochs: int = 1
    optim: Optional[OptimConfig] = None
    eval_every_steps: int = 0
    eval_every_epochs: float = 0.0
    eval_every_samples: int = 0

    def validate(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        validate_cadence(self.eval_every_steps, self.eval_every_epochs, self.eval_every_samples)


@dataclass
class CompressConfig:
    """The ``compress`` section of a recipe.

    Attributes:
        source: a train (or distill / FT) output directory: ``train.json`` + ``checkpoints/``.
        checkpoint: which of its checkpoints (``best``).
        output: where the steps and ``compress.json`` go (default ``<run_dir>/compress/<model>``).
        methods: ``afm`` and/or ``svd`` (the weight-based baseline, same structure), each a full chain.
        steps: applied in order, each fine-tuned.
        stats_batches: batches per rank for the AFM statistics; 0 = the whole training split (then the
            statistics do not depend on the number of ranks).
        batch_size: of the statistics pass.
        sharding: of the compressed model; default the source's.
        chunk_rows: rows per collective when column shards are combined.
    """

    source: str = ""
    checkpoint: str = "best"
    output: str = ""
    methods: List[Literal["afm", "svd"]] = field(default_factory=lambda: ["afm", "svd"])
    steps: List[CompressStepConfig] = field(
        default_factory=lambda: [
            CompressStepConfig(what="mlp", ranks={"1": 64, "2": 64}),
            CompressStepConfig(what="embeddings", rank=4),
        ]
    )
    stats_batches: int = 0
    batch_size: int = 4096
    sharding: Optional[ShardingConfig] = None
    chunk_rows: int = 1 << 20
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    progress: bool = True

    def validate(self) -> None:
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must list afm and/or svd once each, got {self.methods}")
        if not self.steps:
            raise ValueError("steps is empty")
        if sum(step.what == "embeddings" for step in self.steps) > 1:
            raise ValueError("the embeddings can be compressed once per chain")
        if self.stats_batches < 0 or self.batch_size < 1 or self.chunk_rows < 1:
            raise ValueError("stats_batches must be >= 0, batch_size and chunk_rows >= 1")


def compress(config: CompressConfig, reader_config: ReaderConfig) -> Dict[str, Any]:
    """Runs (or resumes) every method's chain of steps; returns the record written to
    ``<output>/compress.json``."""
    ctx = init_distributed(config.backend)
    started = time.time()
    source = TrainOutput(config.source)
    base = TrainConfig.of(source)
    dataset = source.dataset
    schema = Schema.load(dataset)
    output = Path(config.output)
    chains: Dict[str, List[Dict[str, Any]]] = {}
    finals: Dict[str, str] = {}
    for method in config.methods:
        rows = [_summary("uncompressed", source.record)]
        current, current_checkpoint, model_config = source, config.checkpoint, base.model
        for index, step in enumerate(config.steps, 1):
            step_output = TrainOutput(output / method / f"step{index}_{step.what}")
            if not step_output.finished():
                compress_step(ctx, config, step, method, schema, dataset, base, model_config,
                              current.checkpoint(current_checkpoint), step_output.path, reader_config)
            step_record = step_output.record
            model_config = checkpoint.recorded_model_config(step_output)
            rows.append(_summary(f"{step.what} compressed", step_record))
            current, current_checkpoint = step_output, BEST
            if config.finetune.epochs:
                ft_output = TrainOutput(step_output.path / "ft")
                ft_record = ft_output.record if ft_output.finished() else train(
                    finetune_config(base, model_config, step_output.best, ft_output.path, config), dataset, reader_config
                )
                rows.append(_summary(f"{step.what} fine-tuned", ft_record))
                # early stopping's rule applied to epoch 0: keep the fine-tuning only if valid AUC improved
                if ft_record["best_valid"] >= step_record["valid"]["auc"]:
                    current = ft_output
        chains[method] = rows
        finals[method] = str(current.path)
    record = {
        "stage": "compress",
        "source": str(source.path),
        "dataset": str(dataset),
        "output": str(output),
        "world_size": ctx.world_size,
        "config": to_dict(config),
        "chains": chains,
        "final": finals,
        "seconds_this_run": round(time.time() - started, 3),
    }
    if ctx.is_main:
        atomic_write_json(output / COMPRESS_RECORD, record)
    barrier()
    return record


def compress_step(
    ctx: DistributedContext,
    config: CompressConfig,
    step: CompressStepConfig,
    method: str,
    schema: Schema,
    dataset: Path,
    base: TrainConfig,
    model_config: ModelConfig,
    source_checkpoint: Path,
    step_dir: Path,
    reader_config: ReaderConfig,
) -> Dict[str, Any]:
    """One step: load sharded, collect statistics, transform shard by shard, save, evaluate."""
    started = time.time()
    sharding = config.sharding or base.sharding
    dmp = load_sharded(schema, model_config, sharding, source_checkpoint, ctx)
    model = dmp.module.model
    stats = None
    if method == "afm":
        layers = mlp_linear_names(model, step.mlp_path or None) if step.what == "mlp" else []
        stats = _statistics(ctx, config, dmp, model, schema, dataset, reader_config, layers, step.what == "embeddings")
    state = dmp.state_dict()
    if step.what == "mlp":
        ranks = {int(index): k for index, k in step.ranks.items()}
        log, low_rank = compress_sharded_mlp(model, state, ranks, stats, step.relu_between, method, step.mlp_path)
    else:
        fuse = can_fuse(model) if step.fuse == "auto" else step.fuse == "yes"
        sparse = list(schema.sparse_names)
        unknown = sorted(set(step.ranks) - set(sparse))
        if unknown:
            raise ConfigError(f"compress.steps: ranks name {unknown}, which are not sparse features ({sparse})")
        ranks = {name: step.ranks.get(name, step.rank) for name in sparse if name in step.ranks or step.rank is not None}
        layout = build_model(schema, model_config, embedding_device=torch.device("meta")).embedding
        log, low_rank = compress_sharded_embeddings(
            model, layout, state, ranks, stats, fuse, method, step.centered, config.chunk_rows
        )
    compressed_config = dataclasses.replace(model_config, compression=list(model_config.compression) + [low_rank])
    skeleton = build_model(schema, compressed_config, embedding_device=torch.device("meta"))
    _check_structure(state, LabelTask(skeleton).state_dict())
    step_output = TrainOutput(step_dir)
    checkpoint.save(step_output.checkpoints, BEST, {"model": state}, {"step": 0})
    del dmp, state

    evaluated = load_sharded(schema, compressed_config, sharding, step_output.best, ctx)
    eval_config = ReaderConfig(batch_size=base.eval_batch_size, validate_ids=reader_config.validate_ids)
    metrics = {
        split: evaluate(evaluated, ParquetReader(dataset, split, eval_config, ctx.rank, ctx.world_size), ctx)
        for split in ("valid", "test")
    }
    record = {
        "stage": "compress_step",
        "method": method,
        "step": to_dict(step),
        "model": compressed_config.name,
        "dataset": str(dataset),
        "output": str(step_dir),
        "source_checkpoint": str(source_checkpoint),
        "world_size": ctx.world_size,
        "config": to_dict(dataclasses.replace(base, model=compressed_config, output=str(step_dir))),
        "log": log,
        "parameters": skeleton.num_parameters(),
        "flops_per_example": skeleton.flops_per_example(),
        "statistics_rows": int(_rows_of(stats)) if stats is not None else 0,
        "best_valid": metrics["valid"]["auc"],
        "valid": metrics["valid"],
        "test": metrics["test"],
        "seconds": round(time.time() - started, 3),
    }
    if ctx.is_main:
        atomic_write_json(step_dir / COMPRESS_STEP_RECORD, record)
        tqdm.write(f"{method} {step.what}: valid auc {metrics['valid']['auc']:.5f}, test auc {metrics['test']['auc']:.5f}, "
                   f"{record['parameters']['total']:,} parameters", file=sys.stderr)
    barrier()
    return record


def load_sharded(schema: Schema, model_config: ModelConfig, sharding: ShardingConfig, path: Path,
                 ctx: DistributedContext) -> torch.nn.Module:
    """A model built on the meta device, sharded (each rank materialises only its shards) and filled
    from the checkpoint at ``path`` (DCP reshards it to this plan and number of ranks)."""
    dmp, _ = shard(LabelTask(build_model(schema, model_config, embedding_device=torch.device("meta"))), sharding, ctx)
    checkpoint.load_init_from(dmp, path)
    return dmp


def finetune_config(base: TrainConfig, model_config: ModelConfig, step_checkpoint: Path, ft_dir: Path,
                    config: CompressConfig) -> TrainConfig:
    """Label-only training of the compressed model, initialised from its step checkpoint."""
    return dataclasses.replace(
        base,
        model=model_config,
        optim=config.finetune.optim or base.optim,
        sharding=config.sharding or base.sharding,
        output=str(ft_dir),
        epochs=config.finetune.epochs,
        max_steps=0,
        eval_every_steps=config.finetune.eval_every_steps,
        eval_every_epochs=config.finetune.eval_every_epochs,
        eval_every_samples=config.finetune.eval_every_samples,
        monitor="auc",
        init_from=str(step_checkpoint),
        init_from_part="all",
        deterministic_init=False,  # every tensor comes from init_from, shard by shard
        freeze_embeddings=False,
    )


def _statistics(ctx, config: CompressConfig, dmp, model, schema: Schema, dataset: Path, reader_config: ReaderConfig,
                layers: List[str], fields: bool):
    stats_reader = ReaderConfig(batch_size=config.batch_size, shuffle=False, validate_ids=reader_config.validate_ids)
    reader = ParquetReader(dataset, "train", stats_reader, ctx.rank, ctx.world_size)
    mine = reader.num_batches() if not config.stats_batches else min(reader.num_batches(), config.stats_batches)
    steps = max_over_ranks(mine)
    bar = tqdm(total=steps, desc="afm statistics", unit="batch", disable=not (config.progress and ctx.is_main), file=sys.stderr)
    with bar:
        return sharded_statistics(
            dmp, model, itertools.islice(reader, mine), steps, lambda: padding_batch(schema, config.batch_size),
            layers, fields, progress=bar,
        )


def _rows_of(stats) -> float:
    any_stats = next(iter(stats.layers.values()), stats.field_stats)
    return any_stats.n if any_stats is not None else 0


def _check_structure(state: Dict[str, Any], expected: Dict[str, torch.Tensor]) -> None:
    """The transformed state must be exactly the compressed model's: same keys, same global shapes."""
    have = {key: tuple(value.size()) for key, value in state.items()}
    want = {key: tuple(value.shape) for key, value in expected.items()}
    if have != want:
        diff = sorted(set(have.items()) ^ set(want.items()))
        raise RuntimeError(f"compressed state does not match the compressed model's structure: {diff[:6]}")


def _summary(what: str, record: Dict[str, Any]) -> Dict[str, Any]:
    test = record.get("test") or {}
    valid = record.get("valid") or {}
    return {
        "stage": what,
        "model": record["model"],
        "output": record.get("output"),
        "parameters": record["parameters"]["total"],
        "embedding_parameters": record["parameters"].get("embedding"),
        "dense_parameters": record["parameters"].get("dense"),
        "flops_per_example": record["flops_per_example"],
        "valid_auc": valid.get("auc", record.get("best_valid")),
        "test_auc": test.get("auc"),
        "test_logloss": test.get("logloss"),
    }
