"""The ``train`` section of a recipe: what to train, how to optimise it, when to evaluate and stop."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from recsys_kd.config import from_dict
from recsys_kd.models.zoo import ModelConfig
from recsys_kd.runs import TrainOutput
from recsys_kd.train.schedule import ScheduleConfig, validate_cadence
from recsys_kd.train.sharding import ShardingConfig


@dataclass
class OptimConfig:
    """Sharded tables train with a fused optimizer (CPU and CUDA kernels: sgd, adagrad, rowwise_adagrad;
    CUDA only: adam, partial_rowwise_adam, whose FBGEMM kernels have no CPU form);
    data-parallel tables and every dense parameter with ``dense`` (adam, adagrad or sgd).

    ``l2_embedding`` adds l2 * mean over the batch of ||e||^2 of the looked-up field embeddings (the
    regulariser of the KD-DAGFM/RecBole code); ``l2_dense`` is weight decay on dense parameters."""

    embedding: Literal["sgd", "adagrad", "rowwise_adagrad", "adam", "partial_rowwise_adam"] = "adagrad"
    embedding_lr: float = 0.05
    dense: Literal["adam", "adagrad", "sgd"] = "adam"
    lr: float = 1e-3
    l2_embedding: float = 0.0
    l2_dense: float = 0.0
    eps: float = 1e-8

    def validate(self) -> None:
        for key in ("lr", "embedding_lr", "l2_embedding", "l2_dense"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")


@dataclass
class TrainConfig:
    """A training run. ``monitor`` is the validation metric that picks the best model and stops early
    (``distill_loss`` exists when the run distils) after ``patience`` evaluations without improvement;
    evaluations happen at every epoch end and every ``eval_every_steps`` steps, or every
    ``eval_every_epochs`` (a fraction of an epoch) or ``eval_every_samples`` rows. ``schedule``: the
    learning-rate schedule (:mod:`recsys_kd.train.schedule`). ``init_from`` a checkpoint to start
    from (``all`` its tensors, or only the ``embeddings``): with ``all`` the starting point is evaluated
    first and stays the best model unless training beats it, so a fine-tuning never hands on a worse
    model than it was given. ``freeze_embeddings`` keeps the tables fixed. ``verify_checkpoints:
    false`` loads checkpoints (resume, best model, ``init_from``) without checking their files against
    ``checksums.json``. ``eval_metrics``: ``exact`` gathers every prediction to every rank (exact AUC,
    the same for any number of ranks); ``streaming`` merges per-rank AUC histograms instead (constant
    memory and traffic, AUC within its reported ``auc_max_error``). ``pipeline``: how steps run,
    ``sparse_dist`` (torchrec's TrainPipelineSparseDist: on CUDA the copy and the input distribution
    of the next batches overlap the compute; on CPU the same results as ``none``), ``none`` (one
    after the other; :mod:`recsys_kd.train.steps`) or ``auto`` (``sparse_dist`` on CUDA, ``none``
    elsewhere, where nothing would overlap)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    output: str = ""
    epochs: int = 10
    max_steps: int = 0
    eval_every_steps: int = 0
    eval_every_epochs: float = 0.0
    eval_every_samples: int = 0
    eval_batch_size: int = 8192
    eval_metrics: Literal["exact", "streaming"] = "exact"
    monitor: Literal["auc", "logloss", "distill_loss"] = "auc"
    patience: int = 2
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
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
    verify_checkpoints: bool = True
    pipeline: Literal["auto", "sparse_dist", "none"] = "auto"

    def validate(self) -> None:
        for key in ("epochs", "eval_batch_size", "keep_checkpoints", "log_every_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.patience < 0 or self.max_steps < 0:
            raise ValueError("patience and max_steps must be >= 0")
        validate_cadence(self.eval_every_steps, self.eval_every_epochs, self.eval_every_samples)

    @classmethod
    def of(cls, output: TrainOutput) -> "TrainConfig":
        """The training part of the config a finished run recorded. A subclass's own sections (a
        student's ``distill``) are left out unless ``cls`` is that subclass."""
        own = {f.name for f in dataclasses.fields(cls)}
        recorded = {key: value for key, value in output.config.items() if key in own}
        return from_dict(cls, recorded, source=str(output.record_path), prefix="config")
