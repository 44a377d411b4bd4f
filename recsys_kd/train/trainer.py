"""The ``train`` stage: a task module with sharded embedding tables, on 1..N processes.

Top-down: join the process group; build the model and its task module (the objective says which:
labels, or distillation); attach the fused table optimizer, shard, add the dense optimizer; resume
from the latest checkpoint if there is one; train epoch by epoch, evaluating on the validation split,
checkpointing, keeping the best model and stopping early; finally evaluate the best model on the test
split and write the record ``train.json``.

The trainer knows no model and no loss: the task module returns ``(loss, outputs)`` (torchrec's
``DLRMTrain`` contract, :mod:`recsys_kd.train.task`). Its steps run through torchrec's train pipeline
or one after the other (``train.pipeline``, :mod:`recsys_kd.train.steps`); the pipeline pulls
batches ahead, so checkpoints save the reader position of the last batch trained.

Every rank runs the same number of steps per epoch (the largest rank's batch count): a rank whose
rows run out first steps on a zero-weight batch, so every row is trained on exactly once per epoch
and collectives stay matched. Evaluation pads the same way and gathers predictions, so metrics are
exact and identical on every rank and for any number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from tqdm import tqdm

from recsys_kd.config import ConfigError, to_dict
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema
from recsys_kd.distributed import DistributedContext, barrier, init_distributed, max_over_ranks
from recsys_kd.io import atomic_write_json
from recsys_kd.memory import reuse_step_memory
from recsys_kd.models.zoo import build_model
from recsys_kd.runs import TrainOutput, is_checkpoint
from recsys_kd.train import checkpoint, hooks
from recsys_kd.train.config import TrainConfig
from recsys_kd.train.evaluation import evaluate
from recsys_kd.train.optimizers import attach_table_optimizer, check_table_optimizer, combined_optimizer
from recsys_kd.train.schedule import LearningRates, lr_scale, steps_between_evaluations
from recsys_kd.train.sharding import describe_plan, seed_tables, shard
from recsys_kd.train.steps import Steps, TrainedPosition, epoch_batches, make_steps, resolved_pipeline
from recsys_kd.train.task import Objective


@dataclass
class Progress:
    """The loop position and early-stopping state; saved in every rank's checkpoint JSON."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: Optional[float] = None
    best_step: int = 0
    bad_evals: int = 0
    plateau_evals: int = 0
    lr_reductions: int = 0
    stopped: bool = False
    history: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class _Run:
    """What the loop's steps share: the config, process context, sharded task and where it writes."""

    config: TrainConfig
    objective: Objective
    ctx: DistributedContext
    dmp: nn.Module
    optimizer: Any
    dataset: Path
    output: TrainOutput
    eval_config: ReaderConfig
    log: "MetricsLog"
    rates: LearningRates
    steps: Steps

    def reader(self, split: str) -> ParquetReader:
        return ParquetReader(self.dataset, split, self.eval_config, self.ctx.rank, self.ctx.world_size,
                             side_inputs=self.objective.side_inputs())

    def evaluate(self, split: str, predictors: bool = False) -> Dict[str, Any]:
        """Collective: the task module's metrics on ``split`` (:func:`~recsys_kd.train.evaluation.evaluate`)."""
        return evaluate(self.dmp, self.reader(split), self.ctx, predictors, streaming=self.config.eval_metrics == "streaming")


def train(config: TrainConfig, dataset: Path, reader_config: ReaderConfig,
          objective: Optional[Objective] = None) -> Dict[str, Any]:
    """Runs (or resumes) training; returns the record written to ``<output>/train.json``.

    ``objective``: what the task module minimises; the label task when None."""
    objective = objective or Objective()
    if config.monitor not in objective.metrics:
        raise ConfigError(f"train.monitor {config.monitor!r} is not a metric of this run (it has {', '.join(objective.metrics)})")
    ctx = init_distributed(config.backend)
    output = TrainOutput(config.output)
    schema = Schema.load(dataset)
    objective.check_inputs(verify=reader_config.verify)
    torch.manual_seed(config.seed)  # dense parameters: the same on every rank
    model = build_model(schema, config.model, embedding_device=torch.device("meta"))  # tables: shard by shard
    parameters, flops = model.num_parameters(), model.flops_per_example()
    dmp, optimizer, plan = distribute(objective.task(model, schema, config), config, ctx, reader_config.batch_size)
    columns = objective.columns()
    train_reader = ParquetReader(dataset, "train", dataclasses.replace(reader_config, extras=list(reader_config.extras) + columns),
                                 ctx.rank, ctx.world_size, side_inputs=objective.side_inputs())
    eval_config = ReaderConfig(batch_size=config.eval_batch_size, validate_ids=reader_config.validate_ids, extras=columns)
    run = _Run(config, objective, ctx, dmp, optimizer, dataset, output, eval_config,
               MetricsLog(output.metrics_log, ctx.is_main), LearningRates(optimizer, config.schedule.min_lr),
               make_steps(config.pipeline, dmp, optimizer, ctx.device))
    progress = _resume(run, train_reader) or Progress()
    if not progress.history and config.init_from and config.init_from_part == "all":
        _evaluate_and_track(run, progress)  # the starting point: what training must beat to replace it
    torch.manual_seed(config.seed + 7919 * ctx.rank + progress.global_step)
    started = time.time()
    samples = _train_loop(run, train_reader, progress)
    seconds = time.time() - started
    test = _final_test(run)
    size = {"model": config.model.name, "parameters": parameters, "flops_per_example": flops}
    extra = objective.record(lambda split: run.evaluate(split, predictors=True), test, size, schema)
    record = {
        "stage": "train",
        "model": config.model.name,
        "dataset": str(dataset),
        "output": str(output.path),
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "config": to_dict(config),
        "reader": to_dict(reader_config),  # as given: the pipeline compares it to skip a finished run
        "sharding_plan": describe_plan(plan),
        "parameters": parameters,
        "flops_per_example": flops,
        "epochs_run": progress.epoch,
        "steps": progress.global_step,
        "best_step": progress.best_step,
        "best_valid": progress.best,
        "lr_reductions": progress.lr_reductions,
        "history": progress.history,
        "train_pipeline": {"kind": resolved_pipeline(config.pipeline, ctx.device),
                           "pipelined_modules": run.steps.pipelined_modules()},
        "test": test,
        **extra,
        "train_seconds_this_run": round(seconds, 3),
        "samples_per_second_this_run": round(samples / max(seconds, 1e-9), 1),
    }
    if ctx.is_main:
        atomic_write_json(output.record_path, record)
    run.log.close()
    barrier()
    return record


def distribute(task: nn.Module, config: TrainConfig, ctx: DistributedContext, batch_size: Optional[int] = None):
    """Collective: shards the task module with its optimizers (planned for ``batch_size`` rows per
    rank), starting from its seeded weights (or ``config.init_from``); returns (dmp, combined
    optimizer, plan). From here on this process keeps freed memory for the next step
    (:func:`~recsys_kd.memory.reuse_step_memory`)."""
    reuse_step_memory()
    check_table_optimizer(config.optim, ctx.device, frozen=config.freeze_embeddings)
    attach_table_optimizer(task, config.optim, config.sharding, frozen=config.freeze_embeddings)
    dmp, plan = shard(task, config.sharding, ctx, batch_size)
    if config.deterministic_init:
        # DMP initialises the tables it materialises rank by rank; seeding each element by (seed, table,
        # position) makes every world size and plan start from identical tables, without a full copy
        seed_tables(dmp, config.seed)
    if config.init_from:
        checkpoint.load_init_from(dmp, Path(config.init_from), config.init_from_part, config.verify_checkpoints)
    return dmp, combined_optimizer(dmp, config.optim, config.freeze_embeddings), plan


def _train_loop(run: _Run, reader: ParquetReader, progress: Progress) -> int:
    config, ctx = run.config, run.ctx
    samples = 0
    while progress.epoch < config.epochs and not progress.stopped:
        reader.set_epoch(progress.epoch)
        # the steps taken (before a resume: perhaps on another number of ranks) and the longest rank's to come
        steps = progress.step_in_epoch + max_over_ranks(reader.remaining_batches())
        total = config.max_steps or config.epochs * steps
        every = steps_between_evaluations(config.eval_every_steps, config.eval_every_epochs, config.eval_every_samples,
                                          steps, reader.config.batch_size * ctx.world_size)
        position = TrainedPosition(reader)  # the steps may pull batches ahead: a checkpoint saves where training is
        batches = epoch_batches(reader, steps - progress.step_in_epoch, ctx.world_size, pin=ctx.device.type == "cuda")
        bar = tqdm(total=steps, initial=progress.step_in_epoch, desc=f"train {config.model.name} epoch {progress.epoch}",
                   unit="step", disable=not (config.progress and ctx.is_main), mininterval=1.0)
        window_started, window_samples = time.time(), 0
        while progress.step_in_epoch < steps:
            hooks.reached("train_step", ctx.rank, progress.global_step)
            # before the step: its zero_grad hands the fused tables their rate (recsys_kd/train/steps.py)
            run.rates.apply(lr_scale(config.schedule, progress.global_step, total, progress.lr_reductions))
            loss, batch = run.steps.progress(batches)
            position.trained(batch)
            progress.step_in_epoch += 1
            progress.global_step += 1
            rows = 0 if batch.is_padding else batch.rows * ctx.world_size
            samples += rows
            window_samples += rows
            bar.update(1)
            if progress.global_step % config.log_every_steps == 0:
                rate = window_samples / max(time.time() - window_started, 1e-9)
                loss = float(loss)  # the one host sync of the loss: at log steps only
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:,.0f}")
                run.log.write({"step": progress.global_step, "epoch": progress.epoch, "loss": loss, "lr": run.rates.current[-1],
                              "samples_per_second": rate})
                window_started, window_samples = time.time(), 0
            at_max = config.max_steps and progress.global_step >= config.max_steps
            epoch_end = progress.step_in_epoch == steps
            if (every and progress.global_step % every == 0) or epoch_end or at_max:
                run.steps.pause()  # evaluation calls the model's own forward; batches in flight are kept
                _evaluate_and_track(run, progress)
            if epoch_end:
                progress.epoch += 1
                progress.step_in_epoch = 0
            if at_max:
                progress.stopped = True
            checkpoint_due = config.checkpoint_every_steps and progress.global_step % config.checkpoint_every_steps == 0
            if checkpoint_due or epoch_end or progress.stopped:
                _save(run, position, progress)
            if progress.stopped or epoch_end:
                break
        bar.close()
    run.steps.pause()
    return samples


def _evaluate_and_track(run: _Run, progress: Progress) -> None:
    config = run.config
    metrics = run.evaluate("valid")
    value = metrics[config.monitor]
    better = progress.best is None or (value > progress.best if config.monitor == "auc" else value < progress.best)
    entry = {"step": progress.global_step, "epoch": progress.epoch, "valid": metrics, "improved": better,
             "lr": run.rates.current[-1], "lr_reductions": progress.lr_reductions}
    progress.history.append(entry)
    run.log.write(entry)
    if run.ctx.is_main and config.progress:
        tqdm.write(f"valid step {progress.global_step}: auc {metrics['auc']:.5f} logloss {metrics['logloss']:.5f}"
                   f"{' (best)' if better else ''}")
    if better:
        progress.best, progress.best_step, progress.bad_evals, progress.plateau_evals = value, progress.global_step, 0, 0
        checkpoint.save(run.output.checkpoints, checkpoint.BEST, {"model": run.dmp.state_dict()}, {"step": progress.global_step})
        return
    progress.bad_evals += 1
    if progress.bad_evals >= max(config.patience, 1):
        progress.stopped = True
    elif config.schedule.kind == "plateau":
        progress.plateau_evals += 1
        if progress.plateau_evals >= config.schedule.patience:
            _reduce_on_plateau(run, progress)


def _reduce_on_plateau(run: _Run, progress: Progress) -> None:
    """One more plateau reduction of every learning rate (applied from the next step), continuing from
    the best model when the schedule says so."""
    progress.lr_reductions, progress.plateau_evals = progress.lr_reductions + 1, 0
    if run.config.schedule.reload_best and is_checkpoint(run.output.best):
        state = {"model": run.dmp.state_dict()}
        checkpoint.load_state(run.output.best, state)
        run.dmp.load_state_dict(state["model"])
    if run.ctx.is_main and run.config.progress:
        tqdm.write(f"learning rates x{run.config.schedule.factor:g} (reduction {progress.lr_reductions})"
                   f"{', from the best model' if run.config.schedule.reload_best else ''}")


def _final_test(run: _Run) -> Dict[str, Any]:
    """The best model (when one was saved) on the test split, with the task's other predictors."""
    if is_checkpoint(run.output.best):
        state = {"model": run.dmp.state_dict()}
        checkpoint.load_state(run.output.best, state, run.config.verify_checkpoints)
        run.dmp.load_state_dict(state["model"])
    return run.evaluate("test", predictors=True)


def _save(run: _Run, position: TrainedPosition, progress: Progress) -> None:
    rank_state = {"progress": progress.__dict__, "reader": position.state_dict(), "rng": checkpoint.rng_state()}
    state = {"model": run.dmp.state_dict(), "optimizer": run.optimizer.state_dict()}
    checkpoint.save(run.output.checkpoints, f"step_{progress.global_step:09d}", state, rank_state,
                    keep=run.config.keep_checkpoints)


def _resume(run: _Run, reader: ParquetReader) -> Optional[Progress]:
    """The newest intact step checkpoint's state (an older one when the newest is damaged), or None.

    Written by another number of ranks, its tensors are resharded by DCP to this run's plan and the
    reader deals the rest of the interrupted epoch to this run's ranks (each row read once)."""
    if run.output.latest() is None:
        return None
    run.optimizer.init_state()
    state = {"model": run.dmp.state_dict(), "optimizer": run.optimizer.state_dict()}
    path, rank_states = checkpoint.load_latest(run.output, state, run.config.verify_checkpoints)
    run.dmp.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    try:
        reader.load_state_dicts([rank_state["reader"] for rank_state in rank_states])
    except ValueError as error:
        raise checkpoint.CheckpointError(f"{path}: cannot continue its epoch with this reader: {error}") from None
    written_by = len(rank_states)
    if written_by == run.ctx.world_size:  # another world has no RNG stream per rank to continue; train() reseeds
        checkpoint.set_rng_state(rank_states[run.ctx.rank]["rng"])
    progress = rank_states[0]["progress"]  # the same on every rank: the metrics it tracks are gathered
    if run.ctx.is_main:
        batch, was = reader.config.batch_size * run.ctx.world_size, rank_states[0]["reader"]["batch_size"] * written_by
        change = (f"; written by {written_by} ranks, resharded to {run.ctx.world_size} (global batch {was} -> {batch} rows)"
                  if written_by != run.ctx.world_size else "")
        tqdm.write(f"resumed from {path} (epoch {progress['epoch']}, step {progress['global_step']}{change})", file=sys.stderr)
    return Progress(**progress)


class MetricsLog:
    """JSON lines of training and evaluation metrics (rank 0), plus TensorBoard scalars when the
    ``tensorboard`` package is installed."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.enabled = enabled
        self._handle = None
        self._tensorboard = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a", encoding="utf-8")
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, entry: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._handle.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")
        self._handle.flush()
        if self._tensorboard is not None:
            step = entry["step"]
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tensorboard.add_scalar(f"train/{key}", value, step)
            for key, value in entry.get("valid", {}).items():
                if isinstance(value, float) and math.isfinite(value):
                    self._tensorboard.add_scalar(f"valid/{key}", value, step)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
