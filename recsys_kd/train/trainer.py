"""The ``train`` stage: a CTR model with sharded embedding tables, on 1..N processes.

Top-down: join the process group; build the model and a sharding plan; wrap it in
DistributedModelParallel with a fused optimizer for sharded tables and a dense optimizer for the
rest; resume from the latest checkpoint if there is one; train epoch by epoch, evaluating AUC and
logloss on the validation split, checkpointing, keeping the best model and stopping early; finally
evaluate the best model on the test split and write the record ``train.json``.

Every rank runs the same number of steps per epoch (the largest rank's batch count): a rank whose
rows run out first steps on a zero-weight batch, so every row is trained on exactly once per epoch
and collectives stay matched. Evaluation pads the same way and gathers predictions, so metrics are
exact and identical on every rank and for any number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from recsys_kd.config import from_dict, to_dict
from recsys_kd.data.batch import Batch, padding_batch
from recsys_kd.data.reader import ParquetReader, ReaderConfig
from recsys_kd.data.schema import Schema, SchemaError
from recsys_kd.distill.gating import TeacherGate
from recsys_kd.distill.losses import hint_loss
from recsys_kd.distill.objective import (
    COTRAIN_TEACHER,
    DistillConfig,
    aggregate,
    distillation_terms,
    hint_widths,
    teacher_hints,
    teacher_matrix,
)
from recsys_kd.distributed import DistributedContext, init_distributed, max_over_ranks
from recsys_kd.io import atomic_write_json
from recsys_kd.models.zoo import CTRModel, ModelConfig, build_model
from recsys_kd.train import checkpoint
from recsys_kd.train.metrics import classification_metrics, gather_predictions
from recsys_kd.train.sharding import (
    EmbeddingBagCollectionSharderAnyDevice,
    ShardingConfig,
    data_parallel_tables,
    describe_plan,
    make_plan,
)

RECORD_FILE = "train.json"
METRICS_LOG = "metrics.jsonl"
KILL_ENV = "RECSYS_KD_KILL_AT_STEP"  # "rank:step" -> SIGKILL that rank at that step (fault tests)


@dataclass
class OptimConfig:
    """Sharded tables train with a fused optimizer (CPU kernels: sgd, adagrad, rowwise_adagrad);
    data-parallel tables and every dense parameter with ``dense`` (adam, adagrad or sgd).

    ``l2_embedding`` adds l2 * mean over the batch of ||e||^2 of the looked-up field embeddings (the
    regulariser of the KD-DAGFM/RecBole code); ``l2_dense`` is weight decay on dense parameters."""

    embedding: Literal["sgd", "adagrad", "rowwise_adagrad"] = "adagrad"
    embedding_lr: float = 0.05
    dense: Literal["adam", "adagrad", "sgd"] = "adam"
    lr: float = 1e-3
    l2_embedding: float = 0.0
    l2_dense: float = 0.0
    eps: float = 1e-8


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    output: str = ""
    epochs: int = 10
    max_steps: int = 0
    eval_every_steps: int = 0
    eval_batch_size: int = 8192
    monitor: Literal["auc", "logloss", "distill_loss"] = "auc"
    patience: int = 2
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    seed: int = 2022
    deterministic_init: bool = True
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    log_every_steps: int = 50
    progress: bool = True
    init_from: str = ""
    init_from_part: Literal["all", "embeddings"] = "all"
    freeze_embeddings: bool = False
    distill: Optional[DistillConfig] = None

    def validate(self) -> None:
        if self.monitor == "distill_loss" and self.distill is None:
            raise ValueError("monitor 'distill_loss' needs a distill section")
        for key in ("epochs", "eval_batch_size", "keep_checkpoints", "log_every_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.patience < 0 or self.max_steps < 0:
            raise ValueError("patience and max_steps must be >= 0")


class TrainingModule(nn.Module):
    """What DistributedModelParallel wraps, so every output the loss needs goes through DMP's forward
    (and DDP's hooks): the model's logits, hidden vector and field embeddings, and when distilling
    the teacher logit: the ECKD ``gate`` over the soft labels [B, M], or a co-trained ``teacher``;
    with ``projections`` (teacher name, or ``COTRAIN_TEACHER``, -> ``W``: ``[B, H_i] -> [B, H_S]``)
    the ECKD hint loss, eq. 9 averaged over the teachers.

    Shapes: ``dense [B, n_dense]``, ``sparse`` KJT, ``teacher_logits [B, M]`` (optional),
    ``teacher_hints`` name -> ``[B, H_i]`` (optional) -> ``([B], [B, H_S], [B, F, D], teacher logit [B] or
    None, co-trained teacher's own logits [B] or None, hint loss (scalar) or None)``.
    """

    def __init__(self, model: CTRModel, gate: Optional[nn.Module] = None, teacher: Optional[CTRModel] = None,
                 projections: Optional[Dict[str, nn.Module]] = None) -> None:
        super().__init__()
        self.model = model
        self.gate = gate
        self.teacher = teacher
        self.projections = nn.ModuleDict(projections) if projections else None

    def forward(
        self, dense: torch.Tensor, sparse: KeyedJaggedTensor, teacher_logits: Optional[torch.Tensor] = None,
        teacher_hints: Optional[Dict[str, torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
               Optional[torch.Tensor]]:
        logits, hidden, fields = self.model.forward_with_hidden(dense, sparse)
        own = None
        if self.teacher is not None:
            own, teacher_hidden, _ = self.teacher.forward_with_hidden(dense, sparse)
            teacher_logits = own.detach()  # the KD terms never train the teacher
            teacher_hints = {COTRAIN_TEACHER: teacher_hidden} if self.projections is not None else None
        elif teacher_logits is not None and self.gate is not None:
            teacher_logits = self.gate(teacher_logits)[1]
        hint = None
        if self.projections is not None and teacher_hints is not None:
            hint = torch.stack([hint_loss(hidden, teacher_hints[name].detach(), projection)
                                for name, projection in self.projections.items()]).mean()
        return logits, hidden, fields, teacher_logits, own, hint


@dataclass
class Progress:
    """The loop position and early-stopping state; saved in every rank's checkpoint JSON."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: Optional[float] = None
    best_step: int = 0
    bad_evals: int = 0
    stopped: bool = False
    history: List[Dict[str, Any]] = field(default_factory=list)


def train(config: TrainConfig, dataset: Path, reader_config: ReaderConfig) -> Dict[str, Any]:
    """Runs (or resumes) training; returns the record written to ``<output>/train.json``."""
    ctx = init_distributed(config.backend)
    output = Path(config.output)
    schema = Schema.load(dataset)
    torch.manual_seed(config.seed)
    model = build_model(schema, config.model)
    parameters, flops = model.num_parameters(), model.flops_per_example()
    module = _training_module(model, schema, config)
    dmp, optimizer, plan = _distribute(module, config, ctx)
    extras, side = _distill_inputs(config)
    given_reader = reader_config  # recorded as given: the pipeline compares it to skip a finished run
    reader_config = dataclasses.replace(reader_config, extras=list(reader_config.extras) + extras)
    train_reader = ParquetReader(dataset, "train", reader_config, ctx.rank, ctx.world_size, side_inputs=side)
    eval_config = ReaderConfig(batch_size=config.eval_batch_size, validate_ids=reader_config.validate_ids, extras=extras)
    progress = _resume(output, dmp, optimizer, train_reader, ctx) or Progress()
    torch.manual_seed(config.seed + 7919 * ctx.rank + progress.global_step)
    log = MetricsLog(output / METRICS_LOG, ctx.is_main)
    started = time.time()
    samples = _train_loop(config, ctx, dmp, optimizer, train_reader, dataset, eval_config, progress, output, log)
    seconds = time.time() - started
    test = _final_test(config, ctx, dmp, output, dataset, eval_config)
    distillation = _distillation_record(config, ctx, dmp, dataset, eval_config, test, parameters, flops)
    record = {
        "stage": "train",
        "model": config.model.name,
        "dataset": str(dataset),
        "output": str(output),
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "config": to_dict(config),
        "reader": to_dict(given_reader),
        "sharding_plan": describe_plan(plan),
        "parameters": parameters,
        "flops_per_example": flops,
        "epochs_run": progress.epoch,
        "steps": progress.global_step,
        "best_step": progress.best_step,
        "best_valid": progress.best,
        "history": progress.history,
        "test": test,
        **({"distillation": distillation} if distillation is not None else {}),
        "train_seconds_this_run": round(seconds, 3),
        "samples_per_second_this_run": round(samples / max(seconds, 1e-9), 1),
    }
    if ctx.is_main:
        atomic_write_json(output / RECORD_FILE, record)
    log.close()
    dist.barrier()
    return record


def _training_module(model: CTRModel, schema: Schema, config: TrainConfig) -> TrainingModule:
    gate = teacher = projections = None
    if config.distill is not None:
        if config.distill.aggregation == "gate":
            gate = TeacherGate(len(config.distill.teachers))
        if config.distill.scheme == "cotrain":
            teacher_config = from_dict(ModelConfig, config.distill.cotrain_teacher, source="distill.cotrain_teacher")
            teacher = build_model(schema, teacher_config)
        projections = _hint_projections(config.distill, model, teacher)
    return TrainingModule(model, gate=gate, teacher=teacher, projections=projections)


def _hint_projections(
    distill: DistillConfig, model: CTRModel, teacher: Optional[CTRModel]
) -> Optional[Dict[str, nn.Module]]:
    """ECKD eq. 9's W per teacher, ``[B, H_teacher] -> [B, H_student]``, when the hint term is on.
    Bias-free as in the paper; trained with the student (they are dense parameters of the module)."""
    if distill.loss.hint <= 0:
        return None
    widths = {COTRAIN_TEACHER: teacher.hidden_dim} if teacher is not None else hint_widths(distill)
    return {name: nn.Linear(width, model.hidden_dim, bias=False) for name, width in widths.items()}


def _distill_inputs(config: TrainConfig) -> Tuple[List[str], List[Path]]:
    """Extra columns and side inputs the readers need (the pre-train scheme's soft labels)."""
    if config.distill is None or not config.distill.columns:
        return [], []
    soft_labels = Path(config.distill.soft_labels)
    from recsys_kd.data.side_inputs import verify_alignment

    verify_alignment_once(soft_labels, verify_alignment)
    return config.distill.columns, [soft_labels]


def verify_alignment_once(soft_labels: Path, verify) -> None:
    """Checks the soft labels against the logs (rank 0 reads, every rank learns the verdict)."""
    side = json.loads((soft_labels / "side.json").read_text()) if (soft_labels / "side.json").exists() else {}
    error = None
    if dist.get_rank() == 0:
        try:
            verify(Path(side.get("dataset", "")), soft_labels)
        except Exception as failure:  # re-raised on every rank below
            error = str(failure)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise SchemaError(box[0])


def _distribute(module: TrainingModule, config: TrainConfig, ctx: DistributedContext):
    """DMP-wraps the module with a planner-made plan; returns (dmp, combined optimizer, plan)."""
    initial = copy.deepcopy(module.state_dict()) if config.deterministic_init else None
    replicated = set(data_parallel_tables(module, config.sharding))
    fused_weights = [
        bag.weight
        for ebc in _ebcs(module)
        for name, bag in ebc.embedding_bags.items()
        if name not in replicated
    ]
    if fused_weights:
        # Frozen tables (KD-DAGFM distils with the teacher's embeddings fixed) step with lr 0.
        lr = 0.0 if config.freeze_embeddings else config.optim.embedding_lr
        optimizer_class = torch.optim.SGD if config.freeze_embeddings else _fused_optimizer_class(config.optim.embedding)
        apply_optimizer_in_backward(optimizer_class, fused_weights, {"lr": lr})
    plan = make_plan(module, config.sharding, ctx.device, ctx.world_size)
    dmp = DistributedModelParallel(
        module, device=ctx.device, plan=plan, sharders=[EmbeddingBagCollectionSharderAnyDevice()]
    )
    if initial is not None:
        # DMP re-initialises the tables it shards, rank by rank; loading the seeded full model makes
        # every world size start from identical weights (costs one full copy of the tables).
        dmp.load_state_dict(initial)
    if config.init_from:
        load_init_from(dmp, Path(config.init_from), config.init_from_part)
    dense_parameters = dict(in_backward_optimizer_filter(dmp.named_parameters(), include=False))
    if config.freeze_embeddings:
        dense_parameters = {name: p for name, p in dense_parameters.items() if ".embedding_bags." not in name}
    dense = KeyedOptimizerWrapper(dense_parameters, lambda params: _dense_optimizer(config.optim, params))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    return dmp, optimizer, plan


def load_init_from(dmp: nn.Module, path: Path, part: str = "all") -> List[str]:
    """
    Collective, after sharding: fills the model from the checkpoint at ``path``, each rank reading only
    the shards it holds (DCP reshards to this plan and number of ranks), so no rank ever holds a table
    it does not own. Loads every model tensor stored there under the same name and shape; ``part``
    ``embeddings`` loads the tables only (KD-DAGFM's student sharing its teacher's). With ``all``, a
    model tensor the checkpoint lacks is an error. Returns the names loaded.
    """
    import torch.distributed.checkpoint as dcp

    if not (path / ".metadata").exists():
        raise checkpoint.CheckpointError(f"init_from {path}: not a checkpoint (no .metadata)")
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = dmp.state_dict()
    prefix = "model.embedding." if part == "embeddings" else "model."
    wanted = {
        key: value for key, value in state.items()
        if key.startswith(prefix) and f"model.{key}" in stored
        and tuple(getattr(stored[f"model.{key}"], "size", ())) == tuple(value.size())
    }
    if not wanted:
        raise checkpoint.CheckpointError(f"init_from {path}: no tensor matches this model")
    missing = sorted(key for key in state if key.startswith("model.") and key not in wanted)
    if part == "all" and missing:
        raise checkpoint.CheckpointError(
            f"init_from {path}: {len(missing)} model tensors are missing or shaped differently there, "
            f"e.g. {missing[:3]}; use init_from_part: embeddings to load only the tables"
        )
    dcp.load({"model": wanted}, checkpoint_id=str(path))
    dmp.load_state_dict({**state, **wanted})
    return sorted(wanted)


def _ebcs(module: nn.Module):
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    return [m for m in module.modules() if isinstance(m, EmbeddingBagCollection)]


def _fused_optimizer_class(name: str):
    from torchrec.optim import RowWiseAdagrad

    return {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad}[name]


def _dense_optimizer(optim: OptimConfig, params) -> torch.optim.Optimizer:
    if optim.dense == "adam":
        return torch.optim.Adam(params, lr=optim.lr, eps=optim.eps, weight_decay=optim.l2_dense)
    if optim.dense == "adagrad":
        return torch.optim.Adagrad(params, lr=optim.lr, eps=optim.eps, weight_decay=optim.l2_dense)
    return torch.optim.SGD(params, lr=optim.lr, weight_decay=optim.l2_dense)


def _train_loop(config, ctx, dmp, optimizer, reader, dataset, eval_config, progress: Progress, output, log) -> int:
    samples = 0
    kill_rank, kill_step = _kill_point()
    while progress.epoch < config.epochs and not progress.stopped:
        reader.set_epoch(progress.epoch)
        steps = max_over_ranks(reader.num_batches())
        batches = iter(reader)
        bar = tqdm(total=steps, initial=progress.step_in_epoch, desc=f"train {config.model.name} epoch {progress.epoch}",
                   unit="step", disable=not (config.progress and ctx.is_main), mininterval=1.0)
        window_started, window_samples = time.time(), 0
        while progress.step_in_epoch < steps:
            if progress.global_step == kill_step and ctx.rank == kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)
            batch = next(batches, None)
            weight = 1.0 if batch is not None else 0.0
            batch = batch if batch is not None else padding_batch(reader.schema, reader.config.batch_size,
                                                                  reader.config.extras, reader.vector_widths)
            loss = _step(config, dmp, optimizer, batch.to(ctx.device), weight)
            progress.step_in_epoch += 1
            progress.global_step += 1
            rows = batch.batch_size * int(weight) * ctx.world_size
            samples += rows
            window_samples += rows
            bar.update(1)
            if progress.global_step % config.log_every_steps == 0:
                rate = window_samples / max(time.time() - window_started, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:,.0f}")
                log.write({"step": progress.global_step, "epoch": progress.epoch, "loss": loss, "samples_per_second": rate})
                window_started, window_samples = time.time(), 0
            at_max = config.max_steps and progress.global_step >= config.max_steps
            epoch_end = progress.step_in_epoch == steps
            if (config.eval_every_steps and progress.global_step % config.eval_every_steps == 0) or epoch_end or at_max:
                _evaluate_and_track(config, ctx, dmp, dataset, eval_config, progress, output, log)
            if epoch_end:
                progress.epoch += 1
                progress.step_in_epoch = 0
            if at_max:
                progress.stopped = True
            checkpoint_due = config.checkpoint_every_steps and progress.global_step % config.checkpoint_every_steps == 0
            if checkpoint_due or epoch_end or progress.stopped:
                _save(output, dmp, optimizer, reader, progress, config.keep_checkpoints)
            if progress.stopped or epoch_end:
                break
        bar.close()
    return samples


def _step(config: TrainConfig, dmp, optimizer, batch: Batch, weight: float) -> float:
    terms, _, _ = _loss_terms(config, dmp, batch)
    optimizer.zero_grad()
    (terms["total"] * weight).backward()
    optimizer.step()
    return float(terms["total"].detach())


def _loss_terms(
    config: TrainConfig, dmp, batch: Batch
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """The objective's terms (label BCE, or the distillation terms; plus L2 on looked-up embeddings
    and, in co-training, the teacher's own label loss), the student's logits [B] and the aggregated
    teacher logit [B] the terms used (None without distillation)."""
    distill = config.distill
    teachers = teacher_matrix(batch.extras, distill) if distill is not None else None
    hints = teacher_hints(batch.extras, distill) if distill is not None else None
    logits, _, fields, teacher, own, hint = dmp(batch.dense, batch.sparse, teachers, hints)
    if distill is None:
        terms = {"total": F.binary_cross_entropy_with_logits(logits, batch.labels)}
    else:
        if teacher is not None and teacher.dim() == 2:
            teacher = aggregate(distill, teacher)
        terms = distillation_terms(distill.loss, logits, batch.labels, teacher, hint)
        if own is not None:
            terms["teacher_hard"] = F.binary_cross_entropy_with_logits(own, batch.labels)
            terms["total"] = terms["total"] + terms["teacher_hard"]
    if config.optim.l2_embedding:
        terms["total"] = terms["total"] + config.optim.l2_embedding * fields.pow(2).sum() / batch.batch_size
    return terms, logits, teacher


def _evaluate_and_track(config, ctx, dmp, dataset, eval_config, progress: Progress, output, log) -> None:
    reader = ParquetReader(dataset, "valid", eval_config, ctx.rank, ctx.world_size, side_inputs=_distill_inputs_side(config))
    metrics = evaluate(dmp, reader, ctx, config)
    value = metrics[config.monitor]
    better = progress.best is None or (value > progress.best if config.monitor == "auc" else value < progress.best)
    entry = {"step": progress.global_step, "epoch": progress.epoch, "valid": metrics, "improved": better}
    progress.history.append(entry)
    log.write(entry)
    if ctx.is_main and config.progress:
        tqdm.write(f"valid step {progress.global_step}: auc {metrics['auc']:.5f} logloss {metrics['logloss']:.5f}"
                   f"{' (best)' if better else ''}")
    if better:
        progress.best, progress.best_step, progress.bad_evals = value, progress.global_step, 0
        checkpoint.save(output / "checkpoints", checkpoint.BEST, {"model": dmp.state_dict()}, {"step": progress.global_step})
    else:
        progress.bad_evals += 1
        if progress.bad_evals >= max(config.patience, 1):
            progress.stopped = True


def evaluate(dmp: nn.Module, reader: ParquetReader, ctx: DistributedContext, config: Optional[TrainConfig] = None,
             teachers: bool = False) -> Dict[str, Any]:
    """AUC and logloss of ``dmp`` over the reader's split, exact across ranks; with a distill
    config also ``distill_loss``, the mean weighted distillation terms (ECKD early stopping), and
    with ``teachers`` the AUC and logloss of each teacher (``teachers``: name -> metrics, from the
    soft labels or the co-trained teacher) and of their aggregate as the loss saw it (``ensemble``:
    mean, fixed weights or the trained gate)."""
    steps = max_over_ranks(reader.num_batches())
    batches = iter(reader)
    labels, logits, distill_sum = [], [], 0.0
    predictors: Dict[str, List[torch.Tensor]] = {}
    dmp.eval()
    with torch.no_grad():
        for _ in range(steps):
            batch = next(batches, None)
            padding = batch is None
            batch = batch if batch is not None else padding_batch(reader.schema, reader.config.batch_size,
                                                                  reader.config.extras, reader.vector_widths)
            batch = batch.to(ctx.device)
            distilling = config is not None and config.distill is not None
            if distilling:
                terms, output, teacher = _loss_terms(config, dmp, batch)
            else:
                output = dmp(batch.dense, batch.sparse)[0]
            if not padding:
                labels.append(batch.labels.cpu())
                logits.append(output.float().cpu())
                if distilling:
                    distill_sum += float(terms["distill"]) * batch.batch_size
                if distilling and teachers:
                    for name, values in _teacher_predictions(config.distill, batch, teacher).items():
                        predictors.setdefault(name, []).append(values.float().cpu())
    dmp.train()
    local_labels = torch.cat(labels) if labels else torch.zeros(0)
    local_logits = torch.cat(logits) if logits else torch.zeros(0)
    gathered = gather_predictions(local_labels, local_logits)
    metrics = classification_metrics(gathered["labels"], gathered["logits"])
    if config is not None and config.distill is not None:
        totals = torch.tensor([distill_sum, float(local_labels.shape[0])], dtype=torch.float64)
        dist.all_reduce(totals)
        metrics["distill_loss"] = float(totals[0] / max(totals[1], 1.0))
    if teachers and config is not None and config.distill is not None:
        names = ["ensemble", *(config.distill.teachers if config.distill.scheme == "pretrain" else [COTRAIN_TEACHER])]
        scored = {}
        for name in names:  # every rank gathers every predictor, in the same order (collectives match)
            values = torch.cat(predictors[name]) if name in predictors else torch.zeros(0)
            predicted = gather_predictions(local_labels, values)
            scored[name] = classification_metrics(predicted["labels"], predicted["logits"])
        metrics["ensemble"] = scored.pop("ensemble")
        metrics["teachers"] = scored
    return metrics


def _teacher_predictions(distill: DistillConfig, batch: Batch, teacher: torch.Tensor) -> Dict[str, torch.Tensor]:
    """name -> [B] logits of each teacher and of the aggregate ``teacher`` the loss used (``ensemble``)."""
    if distill.scheme == "cotrain":
        return {"ensemble": teacher, COTRAIN_TEACHER: teacher}
    own = teacher_matrix(batch.extras, distill)
    return {"ensemble": teacher, **{name: own[:, i] for i, name in enumerate(distill.teachers)}}


def _final_test(config, ctx, dmp, output: Path, dataset: Path, eval_config: ReaderConfig) -> Dict[str, float]:
    best = output / "checkpoints" / checkpoint.BEST
    if (best / ".metadata").exists():
        state = {"model": dmp.state_dict()}
        dcp_load(best, state)
        dmp.load_state_dict(state["model"])
    reader = ParquetReader(dataset, "test", eval_config, ctx.rank, ctx.world_size, side_inputs=_distill_inputs_side(config))
    return evaluate(dmp, reader, ctx, config, teachers=config.distill is not None)


def _distillation_record(config: TrainConfig, ctx: DistributedContext, dmp, dataset: Path, eval_config: ReaderConfig,
                         test: Dict[str, Any], parameters: Dict[str, int], flops: int) -> Optional[Dict[str, Any]]:
    """Teacher, ensemble and student metrics side by side (AUC and logloss on valid and test,
    parameters, FLOPs per example); moves the test's teacher metrics out of ``test``. The model
    loaded is the best checkpoint (``_final_test`` loaded it). None without distillation."""
    if config.distill is None:
        return None
    reader = ParquetReader(dataset, "valid", eval_config, ctx.rank, ctx.world_size, side_inputs=_distill_inputs_side(config))
    valid = evaluate(dmp, reader, ctx, config, teachers=True)
    sizes = _teacher_sizes(config, dataset)
    test_teachers = test.pop("teachers")
    teachers = {name: {**sizes[name], "valid": valid["teachers"][name], "test": test_teachers[name]} for name in sizes}
    ensemble_parameters = sum(t["parameters"]["total"] for t in teachers.values())
    return {
        "aggregation": config.distill.aggregation,
        "teachers": teachers,
        "ensemble": {"parameters": {"total": ensemble_parameters},
                     "flops_per_example": sum(t["flops_per_example"] for t in teachers.values()),
                     "valid": valid["ensemble"], "test": test.pop("ensemble")},
        "student": {"model": config.model.name, "parameters": parameters, "flops_per_example": flops,
                    "valid": {k: v for k, v in valid.items() if k not in ("teachers", "ensemble")}, "test": test},
    }


def _teacher_sizes(config: TrainConfig, dataset: Path) -> Dict[str, Dict[str, Any]]:
    """name -> model, parameters and FLOPs per example of each teacher: from infer's record
    (pre-train scheme), or the co-trained teacher's config (built with tables on the meta device)."""
    distill = config.distill
    if distill.scheme == "cotrain":
        model_config = from_dict(ModelConfig, distill.cotrain_teacher, source="distill.cotrain_teacher")
        model = build_model(Schema.load(dataset), model_config, embedding_device=torch.device("meta"))
        return {COTRAIN_TEACHER: {"model": model_config.name, "parameters": model.num_parameters(),
                                  "flops_per_example": model.flops_per_example()}}
    from recsys_kd.distill.infer import RECORD_FILE as INFER_RECORD

    record_path = Path(distill.soft_labels) / INFER_RECORD
    try:
        recorded = json.loads(record_path.read_text())["teachers"]
    except FileNotFoundError as error:
        raise SchemaError(f"{record_path}: not found; the soft labels have no infer record") from error
    missing = [name for name in distill.teachers if name not in recorded]
    if missing:
        raise SchemaError(f"{record_path}: no teacher {missing[0]!r} (distill.teachers {distill.teachers})")
    return {name: {key: recorded[name][key] for key in ("model", "parameters", "flops_per_example")}
            for name in distill.teachers}


def _distill_inputs_side(config: TrainConfig) -> List[Path]:
    return [Path(config.distill.soft_labels)] if config.distill is not None and config.distill.columns else []


def dcp_load(path: Path, state: Dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(path))


def _save(output: Path, dmp, optimizer, reader: ParquetReader, progress: Progress, keep: int) -> None:
    rank_state = {"progress": progress.__dict__, "reader": reader.state_dict(), "rng": checkpoint.rng_state()}
    state = {"model": dmp.state_dict(), "optimizer": optimizer.state_dict()}
    checkpoint.save(output / "checkpoints", f"step_{progress.global_step:09d}", state, rank_state, keep=keep)


def _resume(output: Path, dmp, optimizer, reader: ParquetReader, ctx: DistributedContext) -> Optional[Progress]:
    path = checkpoint.latest(output / "checkpoints")
    if path is None:
        return None
    optimizer.init_state()
    state = {"model": dmp.state_dict(), "optimizer": optimizer.state_dict()}
    rank_state = checkpoint.load(path, state)
    dmp.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    reader.load_state_dict(rank_state["reader"])
    checkpoint.set_rng_state(rank_state["rng"])
    if ctx.is_main:
        tqdm.write(f"resumed from {path} (epoch {rank_state['progress']['epoch']}, step {rank_state['progress']['global_step']})", file=sys.stderr)
    return Progress(**rank_state["progress"])


def _kill_point() -> Tuple[int, int]:
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return -1, -1
    rank, _, step = spec.partition(":")
    return int(rank), int(step)


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
