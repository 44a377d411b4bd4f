"""Optimizers of a sharded training run: a fused optimizer for the sharded tables (applied in the
backward pass by FBGEMM's kernels) and a dense optimizer for everything else."""

from __future__ import annotations

from typing import Dict, Iterable

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import PartialRowWiseAdam, RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys_kd.config import ConfigError
from recsys_kd.train.config import OptimConfig
from recsys_kd.train.sharding import ShardingConfig, data_parallel_tables

_FUSED = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad,
          "adam": torch.optim.Adam, "partial_rowwise_adam": PartialRowWiseAdam}
CUDA_ONLY_TABLE_OPTIMIZERS = ("adam", "partial_rowwise_adam")  # FBGEMM has no CPU kernel for them


def check_table_optimizer(optim: OptimConfig, device: torch.device, frozen: bool) -> None:
    """Refuses, before sharding, a fused table optimizer without a kernel on ``device`` (FBGEMM's
    Adam and partial row-wise Adam run on CUDA only; torchrec would fail deep in sharding)."""
    if not frozen and optim.embedding in CUDA_ONLY_TABLE_OPTIMIZERS and device.type != "cuda":
        raise ConfigError(f"train.optim.embedding: {optim.embedding} has FBGEMM kernels on CUDA only and this run is "
                          f"on {device.type}; use sgd, adagrad or rowwise_adagrad")


def attach_table_optimizer(module: nn.Module, optim: OptimConfig, sharding: ShardingConfig, frozen: bool) -> None:
    """Before sharding: gives every table that will be sharded (not data-parallel) its fused
    optimizer. ``frozen`` tables (KD-DAGFM distils with the teacher's embeddings fixed) step with lr 0."""
    replicated = set(data_parallel_tables(module, sharding))
    weights = [
        bag.weight
        for ebc in module.modules() if isinstance(ebc, EmbeddingBagCollection)
        for name, bag in ebc.embedding_bags.items()
        if name not in replicated
    ]
    if not weights:
        return
    if frozen:
        apply_optimizer_in_backward(torch.optim.SGD, weights, {"lr": 0.0})
    else:
        apply_optimizer_in_backward(_FUSED[optim.embedding], weights, {"lr": optim.embedding_lr})


def combined_optimizer(dmp: nn.Module, optim: OptimConfig, frozen_embeddings: bool) -> CombinedOptimizer:
    """After sharding: the sharded tables' fused optimizer and ``optim.dense`` over every other
    parameter (data-parallel tables included, unless ``frozen_embeddings``), as one keyed optimizer
    whose state DCP checkpoints."""
    dense: Dict[str, nn.Parameter] = dict(in_backward_optimizer_filter(dmp.named_parameters(), include=False))
    if frozen_embeddings:
        dense = {name: p for name, p in dense.items() if ".embedding_bags." not in name}
    wrapper = KeyedOptimizerWrapper(dense, lambda params: dense_optimizer(optim, params))
    return CombinedOptimizer([dmp.fused_optimizer, wrapper])


def dense_optimizer(optim: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if optim.dense == "adam":
        # fused: one kernel over all weights per step; torch's default on CPU is a Python loop of ~10
        # ops per weight tensor (+9% samples per CPU second for MovieLens' DCN, docs/train.md)
        return torch.optim.Adam(params, lr=optim.lr, eps=optim.eps, weight_decay=optim.l2_dense, fused=True)
    if optim.dense == "adagrad":
        return torch.optim.Adagrad(params, lr=optim.lr, eps=optim.eps, weight_decay=optim.l2_dense)
    return torch.optim.SGD(params, lr=optim.lr, weight_decay=optim.l2_dense)
