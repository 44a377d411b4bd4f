r"""The AFM statistics of a whole :class:`~recsys_kd.models.CTRModel` over a data set: forward hooks
(:class:`StatisticsHooks`) accumulate the first and second moments (:class:`~recsys_kd.compress.afm.LayerStatistics`)
of chosen ``nn.Linear`` outputs and of the field embeddings while batches stream through the model;
:func:`collect_statistics` does one such pass.

**Which output AFM mimics.** The statistics of an MLP layer are those of its ``nn.Linear``'s output
:math:`y = W x + b`: PRE-activation (and before batch norm). AFM's derivation (the paper's equations
1-5; the reference code likewise hooks the ``nn.Linear`` modules) replaces the linear map by
:math:`\hat y = U_k U_k^T (y - \mu) + \mu` and factors it into two linear layers; that identity holds
only for the linear output, and the layer's own batch norm / activation / dropout then act on
:math:`\hat y` as they acted on :math:`y`. A post-activation PCA would need the two new layers to
reproduce a ReLU's output, which no pair of linear layers placed before that ReLU can do. Statistics
are taken in eval mode (dropout off, batch norm on its running statistics) under ``no_grad``.

The field statistics are those of the sum-pooled field embeddings ``[B, F, D]`` (one accumulator per
field), read from a module that returns them: a ``FieldEmbedding``, or an unfused
``LowRankFieldEmbedding`` in a later round.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_kd.compress.afm import LayerStatistics
from recsys_kd.distributed import all_reduce
from recsys_kd.models.embedding import FieldEmbedding
from recsys_kd.models.layers import MLP
from recsys_kd.models.low_rank import LowRankFieldEmbedding, find_mlp
from recsys_kd.models.zoo import CTRModel


@dataclass
class ModelStatistics:
    """
    AFM statistics of one model over a data set: ``layers`` maps a ``nn.Linear``'s module path in the
    model (e.g. ``head.mlp.layers.2``) to the statistics of its (pre-activation) output; ``field_stats``
    holds those of the F field embeddings (grouped, ``field_names`` order); ``fields[f]`` is field f's.

    ``tensors()`` lists every accumulator in a fixed order (sorted layer paths, then the fields): the
    same on every rank of a model, so a caller reduces them one by one (``all_reduce`` does it).
    """

    layers: Dict[str, LayerStatistics] = field(default_factory=dict)
    field_stats: Optional[LayerStatistics] = None
    field_names: List[str] = field(default_factory=list)

    @property
    def fields(self) -> List[LayerStatistics]:
        if self.field_stats is None:
            return []
        return [self.field_stats.group(f) for f in range(len(self.field_names))]

    def tensors(self) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        for name in sorted(self.layers):
            out.extend(self.layers[name].tensors())
        if self.field_stats is not None:
            out.extend(self.field_stats.tensors())
        return out

    def all_reduce(self, group: Optional[object] = None) -> "ModelStatistics":
        for tensor in self.tensors():
            all_reduce(tensor, group=group)
        return self

    def merge(self, other: "ModelStatistics") -> "ModelStatistics":
        if sorted(other.layers) != sorted(self.layers) or other.field_names != self.field_names:
            raise ValueError("cannot merge statistics of different layers or fields")
        for name, stats in self.layers.items():
            stats.merge(other.layers[name])
        if self.field_stats is not None and other.field_stats is not None:
            self.field_stats.merge(other.field_stats)
        return self


def mlp_linear_names(model: nn.Module, mlp_path: Optional[str] = None) -> List[str]:
    """Module paths of the MLP's ``nn.Linear`` layers in order (index i of ``layer_ranks`` is the
    i-th); [] when the model has no MLP and no ``mlp_path`` is given."""
    if mlp_path is None and not any(isinstance(m, MLP) for m in model.modules()):
        return []
    path, mlp = find_mlp(model, mlp_path)
    return [f"{path}.layers.{i}" for i, m in enumerate(mlp.layers) if isinstance(m, nn.Linear)]


class StatisticsHooks:
    """
    Forward hooks that accumulate :class:`ModelStatistics` while the caller streams batches through the
    model (use as a context manager; the hooks are removed on exit). ``layers``: module paths of
    ``nn.Linear`` layers (default: every Linear of the model's MLP); ``fields``: also the field
    embeddings ``[B, F, D]`` from ``model.embedding`` (one statistics object per field). While
    ``active`` is False the hooks count nothing (a rank's padding batches in a collective pass).
    """

    def __init__(self, model: CTRModel, layers: Optional[Sequence[str]] = None, fields: bool = True) -> None:
        self.model = model
        self.active = True
        names = mlp_linear_names(model) if layers is None else list(layers)
        self.stats = ModelStatistics()
        self._handles: List[Any] = []
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear")
            stats = LayerStatistics(module.out_features, device=module.weight.device)
            self.stats.layers[name] = stats
            self._handles.append(module.register_forward_hook(self._hook(stats)))
        if fields:
            embedding = model.embedding
            if not isinstance(embedding, FieldEmbedding) and not (
                isinstance(embedding, LowRankFieldEmbedding) and not embedding.fused
            ):
                raise ValueError("field statistics need an embedding module that returns [B, F, D]")
            self.stats.field_names = list(embedding.field_names)
            self.stats.field_stats = LayerStatistics(embedding.embedding_dim, groups=embedding.num_fields,
                                                     device=_compute_device(model))
            self._handles.append(embedding.register_forward_hook(self._hook(self.stats.field_stats)))

    def _hook(self, stats: LayerStatistics) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self.active:
                stats.update(output)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "StatisticsHooks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _compute_device(model: nn.Module) -> torch.device:
    """Where the model computes (its first materialised parameter's device; the CPU when it has
    none): the field statistics accumulate there, next to the embeddings they read."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def _batch_inputs(batch: Any) -> Tuple[torch.Tensor, KeyedJaggedTensor]:
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    return batch.dense, batch.sparse


@torch.no_grad()
def collect_statistics(
    model: CTRModel,
    batches: Iterable[Any],
    layers: Optional[Sequence[str]] = None,
    fields: bool = True,
    max_batches: Optional[int] = None,
) -> ModelStatistics:
    """
    Streams ``batches`` (reader ``Batch`` es or ``(dense, sparse)`` pairs) through ``model`` in eval mode
    and returns the statistics of the chosen Linear outputs (default: all of the MLP's) and of the
    field embeddings. The model's train/eval mode is restored. In a multi-process run each rank streams
    its share and calls ``stats.all_reduce()``.
    """
    was_training = model.training
    model.eval()
    try:
        with StatisticsHooks(model, layers, fields) as hooks:
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                dense, sparse = _batch_inputs(batch)
                model(dense, sparse)
    finally:
        model.train(was_training)
    return hooks.stats
