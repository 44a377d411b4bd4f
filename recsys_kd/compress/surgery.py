r"""Module surgery on a plain (unsharded) :class:`~recsys_kd.models.CTRModel`: AFM (or SVD) low-rank
compression of MLP layers and embedding tables, returning a new model (the input is deep-copied, never
modified).

Workflow (the paper's: compress the MLP, fine-tune one epoch, then the embeddings, fine-tune)::

    stats = collect_statistics(model, train_batches)           # one pass over the training set
    model = compress_mlp(model, {1: 64, 2: 64}, stats, relu_between=True)
    ...fine-tune...
    stats = collect_statistics(model, train_batches, layers=[])  # field statistics only
    model = compress_embeddings(model, 2, stats)                # fused where the head allows it

**Which output AFM mimics.** The statistics of an MLP layer are those of its ``nn.Linear``'s output
:math:`y = W x + b`: PRE-activation (and before batch norm). AFM's derivation (the paper's equations
1-5, and the reference code, which hooks the ``nn.Linear`` modules) replaces the linear map by
:math:`\hat y = U_k U_k^T (y - \mu) + \mu` and factors it into two linear layers; that identity holds
only for the linear output, and the layer's own batch norm / activation / dropout then act on
:math:`\hat y` as they acted on :math:`y`. A post-activation PCA would need the two new layers to
reproduce a ReLU's output, which no pair of linear layers placed before that ReLU can do. Statistics
are taken in eval mode (dropout off, batch norm on its running statistics) under ``no_grad``.

**Embeddings: fused or kept as an up-projection, per head.** Only the sparse fields' tables are
compressed (the projected dense fields :math:`x_j v_j` have no table; the paper likewise leaves
continuous features alone). Each compressed table ``t_<feature>`` becomes ``V x k_f`` in a new
torchrec EBC (same table names); the statistics are those of the sum-pooled field embedding.

- ``DNNHead`` models (``dnn``, ``wide_deep``, ``tiny_mlp``): the MLP reads the concatenated fields
  directly, so the up-projections are folded into its first ``nn.Linear`` (:math:`W'_f = W_f U_f`,
  :math:`b' = b + \sum_f W_f c_f`); the embedding module then returns the concatenated low-rank codes
  ``[B, n_dense * D + sum_f k_f]`` (2-D), which ``DNNHead``'s ``flatten(1)`` passes through unchanged.
  ``forward_with_hidden``'s third output is then that 2-D tensor, not ``[B, F, D]``.
- every other head (an interaction layer such as FM, CrossNet, CIN, attention, bilinear or DAGFM
  reads the field embeddings, or sits between them and the MLP as in FiBiNET): the per-field
  up-projection ``Linear(k_f, D)`` is kept in the embedding module, which still returns ``[B, F, D]``
  (the AFM reference README: folding U into the first FC fails when an interaction layer sits between
  the embeddings and that FC). The paper's hybrid for DeepFM-like heads (fold into the MLP *and* keep
  the up-projection for the interaction) is not done: it saves only part of the first layer's FLOPs.

**Centered or not.** ``compress_embeddings(centered=False)`` (the default) stores :math:`E' = E U_k`
with the bias :math:`(I - U_k U_k^T)\mu` (the paper's equations 10-11), which reproduces the PCA
reconstruction of the pooled embedding for bags of any size, the empty bags and multi-hot features the
reader produces included. ``centered=True`` is the reference code's :math:`E' = (E - \mu^T) U_k` with
bias :math:`\mu`: the same function for features with exactly one id per example, not for others.

Rank choice: an ``int`` k, a ``float`` variance share in (0, 1] (the smallest k whose components
explain that share), or for MLPs a callable ``(linear_index, spectrum) -> Optional[int]`` (None skips
the layer). ``model.compression_log`` lists what each call did (layer or field, method, k, explained
variance share kept).
"""


import copy
import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_kd.compress.afm import (
    LayerStatistics,
    afm_embedding,
    afm_linear,
    choose_rank,
    embedding_gram,
    explained_variance_ratio,
    fuse_into_first_linear,
    pca,
    singular_value_spectrum,
    spectrum_report,
    svd_embedding,
    svd_linear,
    two_linear_layers,
)
from recsys_kd.models.embedding import FieldEmbedding
from recsys_kd.models.heads import DNNHead
from recsys_kd.models.layers import MLP
from recsys_kd.models.zoo import CTRModel, LowRankStep

RankSpec = Union[int, float]
LayerRanks = Union[Mapping[int, RankSpec], Callable[[int, torch.Tensor], Optional[int]]]
METHODS = ("afm", "svd")

_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh)


# ---------------------------------------------------------------- modules the surgery builds


class CompressedMLP(MLP):
    """
    An :class:`~recsys_kd.models.layers.MLP` whose flat ``layers`` were rewritten (a ``Linear`` replaced
    by two, or the first one fused with embedding up-projections). Same ``forward``; FLOPs are counted by
    walking the layers: ``Linear(i, o)`` 2io + o, activation 1 per element, batch norm 2 per element,
    dropout 0.

    Args:
        layers (nn.Sequential): the new flat layers (``Linear``, ``BatchNorm1d``, activations,
            ``Dropout``).
    """

    def __init__(self, layers: nn.Sequential) -> None:
        nn.Module.__init__(self)
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("an MLP needs at least one nn.Linear")
        for module in layers:
            if not isinstance(module, (nn.Linear, nn.BatchNorm1d, nn.Dropout) + _ELEMENTWISE):
                raise ValueError(f"unexpected MLP layer {type(module).__name__}")
        self.layers = layers
        self._in_features = linears[0].in_features
        self._layer_sizes: List[int] = [m.out_features for m in linears]
        self._batch_norm = any(isinstance(m, nn.BatchNorm1d) for m in layers)
        self._activation_on_last = not isinstance(layers[len(layers) - 1], nn.Linear)
        self.out_features: int = linears[-1].out_features

    def flops_per_example(self) -> int:
        flops = 0
        width = self._in_features
        for module in self.layers:
            if isinstance(module, nn.Linear):
                flops += 2 * module.in_features * module.out_features + module.out_features
                width = module.out_features
            elif isinstance(module, nn.BatchNorm1d):
                flops += 2 * width
            elif isinstance(module, _ELEMENTWISE):
                flops += width
        return flops


class LowRankFieldEmbedding(nn.Module):
    r"""
    The field embeddings after AFM/SVD compression of some sparse tables: an EBC whose compressed tables
    are ``V x k_f`` (same names ``t_<feature>``), the unchanged projected dense fields, and either

    - ``fused=False``: per-field up-projections :math:`e_f = U_f e'_f + c_f` back to D (ranks may differ
      per field: the codes are zero-padded to ``k_max`` and ``up_weight`` ``[F_c, D, k_max]`` has zero
      columns beyond each k_f, so one batched product serves all fields) -> ``[B, F, D]`` in
      ``field_names`` order, like :class:`~recsys_kd.models.FieldEmbedding`;
    - ``fused=True``: no up-projection (it lives in the head's first Linear) -> the concatenation
      ``[B, n_dense * D + sum_f width_f]`` of the dense fields and the sparse codes in field order
      (width_f = k_f for a compressed field, D for a kept one).

    Build it with :func:`compress_embeddings`. Scripts with ``torch.jit.script``.
    """

    # attribute types in the class body, as TorchScript wants them for possibly empty lists
    embedding_dim: int
    field_names: List[str]
    num_fields: int
    fused: bool
    ranks: Dict[str, int]
    _sparse_names: List[str]
    _num_dense: int
    _compressed: List[str]
    _kept: List[str]
    _k_max: int
    _pads: List[int]
    _identity_order: bool

    def __init__(
        self,
        ebc: EmbeddingBagCollection,
        sparse_names: Sequence[str],
        field_names: Sequence[str],
        embedding_dim: int,
        dense_weight: Optional[nn.Parameter],
        ranks: Mapping[str, int],
        up_weights: Mapping[str, torch.Tensor],
        up_biases: Mapping[str, torch.Tensor],
        fused: bool,
    ) -> None:
        super().__init__()
        self.ebc = ebc
        self.embedding_dim = embedding_dim
        self.field_names = list(field_names)
        self.num_fields = len(self.field_names)
        self._sparse_names = list(sparse_names)
        self._num_dense = dense_weight.shape[0] if dense_weight is not None else 0
        self.dense_weight = dense_weight
        self.fused = fused
        self.ranks = dict(ranks)
        self._compressed = [n for n in self._sparse_names if n in self.ranks]
        self._kept = [n for n in self._sparse_names if n not in self.ranks]
        self._k_max = max(self.ranks.values()) if self.ranks else 0
        self._pads = [self._k_max - self.ranks[n] for n in self._compressed]
        if fused or not self._compressed:
            self.up_weight: Optional[nn.Parameter] = None
            self.up_bias: Optional[nn.Parameter] = None
        else:
            d = embedding_dim
            like = up_weights[self._compressed[0]]
            weight = torch.zeros(len(self._compressed), d, self._k_max, dtype=like.dtype, device=like.device)
            for i, name in enumerate(self._compressed):
                weight[i, :, : self.ranks[name]] = up_weights[name]
            self.up_weight = nn.Parameter(weight)
            self.up_bias = nn.Parameter(torch.stack([up_biases[n] for n in self._compressed]))
        # unfused output is cat([dense, up-projected, kept]) reordered into field order
        position = {name: i for i, name in enumerate(self.field_names)}
        produced = self.field_names[: self._num_dense] + self._compressed + self._kept
        order = torch.empty(self.num_fields, dtype=torch.long)
        for i, name in enumerate(produced):
            order[position[name]] = i
        self.register_buffer("_order", order, persistent=False)
        self._identity_order = bool((order == torch.arange(self.num_fields)).all())

    @property
    def output_width(self) -> int:
        """Width of the flattened output: ``F * D`` unfused, the concatenated codes' width fused."""
        if not self.fused:
            return self.num_fields * self.embedding_dim
        return self._num_dense * self.embedding_dim + sum(self.field_widths()[self._num_dense :])

    def field_widths(self) -> List[int]:
        """Per field (``field_names`` order): D for dense and kept fields, k_f for compressed ones."""
        d = self.embedding_dim
        return [d] * self._num_dense + [self.ranks.get(n, d) for n in self._sparse_names]

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """``dense [B, n_dense]``, ``sparse`` KJT -> ``[B, F, D]`` (unfused) or ``[B, output_width]``."""
        pooled = self.ebc(sparse).to_dict()
        dense_fields: Optional[torch.Tensor] = None
        if self.dense_weight is not None:
            dense_fields = dense.unsqueeze(2) * self.dense_weight  # [B, n_dense, D]
        if self.fused:
            parts = [] if dense_fields is None else [dense_fields.flatten(1)]
            return torch.cat(parts + [pooled[name] for name in self._sparse_names], dim=1)
        parts = [] if dense_fields is None else [dense_fields]
        if self._compressed:
            assert self.up_weight is not None and self.up_bias is not None
            codes = torch.stack(
                [nn.functional.pad(pooled[n], (0, pad)) for n, pad in zip(self._compressed, self._pads)], dim=1
            )  # [B, F_c, k_max]
            parts.append(torch.einsum("bfk,fdk->bfd", codes, self.up_weight) + self.up_bias)
        if self._kept:
            parts.append(torch.stack([pooled[n] for n in self._kept], dim=1))
        fields = torch.cat(parts, dim=1)
        return fields if self._identity_order else fields.index_select(1, self._order)

    def flops_per_example(self) -> int:
        """The dense projection, and unfused the up-projections as computed (padded to ``k_max``)."""
        flops = self._num_dense * self.embedding_dim
        if not self.fused:
            flops += len(self._compressed) * (2 * self._k_max * self.embedding_dim + self.embedding_dim)
        return flops


# ---------------------------------------------------------------- statistics over a model


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
        import torch.distributed as dist

        for tensor in self.tensors():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return self

    def merge(self, other: "ModelStatistics") -> "ModelStatistics":
        if sorted(other.layers) != sorted(self.layers) or other.field_names != self.field_names:
            raise ValueError("cannot merge statistics of different layers or fields")
        for name, stats in self.layers.items():
            stats.merge(other.layers[name])
        if self.field_stats is not None and other.field_stats is not None:
            self.field_stats.merge(other.field_stats)
        return self


def find_mlp(model: nn.Module, mlp_path: Optional[str] = None) -> Tuple[str, MLP]:
    """The MLP to compress: ``mlp_path`` (e.g. ``head.mlp``), or the model's only
    :class:`~recsys_kd.models.layers.MLP`."""
    if mlp_path is not None:
        module = model.get_submodule(mlp_path)
        if not isinstance(module, MLP):
            raise ValueError(f"{mlp_path} is a {type(module).__name__}, not an MLP")
        return mlp_path, module
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, MLP)]
    if len(found) != 1:
        names = [name for name, _ in found]
        raise ValueError(f"model has {len(found)} MLPs {names}: name the one to compress with mlp_path")
    return found[0]


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
            self.stats.field_stats = LayerStatistics(embedding.embedding_dim, groups=embedding.num_fields)
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


# ---------------------------------------------------------------- rank resolution


def _rank_from_spec(spec: RankSpec, spectrum: torch.Tensor, what: str) -> int:
    """An integer is a rank k, any other real number a variance share."""
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        return choose_rank(spectrum, k=int(spec))
    if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
        return choose_rank(spectrum, variance_share=float(spec))
    raise ValueError(f"{what}: rank {spec!r} is neither an int nor a variance share")


def _kept_share(spectrum: torch.Tensor, k: int) -> float:
    return float(explained_variance_ratio(spectrum)[:k].sum())


# ---------------------------------------------------------------- MLP surgery


def compress_mlp(
    model: CTRModel,
    layer_ranks: LayerRanks,
    stats: Optional[ModelStatistics] = None,
    *,
    relu_between: bool,
    method: str = "afm",
    mlp_path: Optional[str] = None,
) -> CTRModel:
    """
    Replaces chosen ``nn.Linear`` layers of the model's MLP by ``Linear(n, k) [-> ReLU] -> Linear(k, m)``.

    Args:
        model (CTRModel): a plain (unsharded) model; not modified.
        layer_ranks (LayerRanks): ``{i: k or variance share}`` over the MLP's Linear layers, 0-based
            (``{1: 64, 2: 64}`` is the paper's Criteo setting, first layer untouched), or a callable
            ``(i, spectrum) -> k or None`` called for every Linear.
        stats (Optional[ModelStatistics]): from :func:`collect_statistics` on this model (required for
            AFM: ``stats.layers`` keyed by the Linear's module path).
        relu_between (bool): insert a ReLU between the two new layers (the paper's improved AFM, to be
            fine-tuned); without it AFM is the exact PCA reconstruction of the layer's output.
        method (str): ``"afm"`` (output PCA) or ``"svd"`` (the weight's truncated SVD, the baseline).
        mlp_path (Optional[str]): the MLP's module path when the model has several.

    Returns:
        CTRModel: a new model whose MLP is a :class:`CompressedMLP` (FLOPs and parameters counted).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if method == "afm" and stats is None:
        raise ValueError("AFM needs the layers' output statistics: pass collect_statistics(model, ...)")
    new = copy.deepcopy(model)
    path, mlp = find_mlp(new, mlp_path)
    compressed, log, step = compress_mlp_module(
        mlp, path, layer_ranks, stats, relu_between=relu_between, method=method
    )
    step.mlp_path = mlp_path or ""
    _set_submodule(new, path, compressed)
    _record(new, model, log, step)
    return new


def compress_mlp_module(
    mlp: MLP,
    path: str,
    layer_ranks: LayerRanks,
    stats: Optional[ModelStatistics],
    *,
    relu_between: bool,
    method: str,
) -> Tuple[CompressedMLP, List[Dict[str, Any]], LowRankStep]:
    """
    The core of :func:`compress_mlp` on the MLP module itself (at module path ``path``; statistics are
    keyed ``<path>.layers.<i>``), for callers that hold a sharded model they cannot deep-copy: a new
    :class:`CompressedMLP` (non-Linear layers are shared with ``mlp``), the log entries, and the
    :class:`~recsys_kd.models.zoo.LowRankStep` that rebuilds its structure.
    """
    log: List[Dict[str, Any]] = []
    layers: List[nn.Module] = []
    chosen: Dict[str, int] = {}
    index = -1
    for position, module in enumerate(mlp.layers):
        if not isinstance(module, nn.Linear):
            layers.append(module)
            continue
        index += 1
        name = f"{path}.layers.{position}"
        if not callable(layer_ranks) and index not in layer_ranks:
            layers.append(module)
            continue
        weight = module.weight.detach()
        bias = module.bias.detach() if module.bias is not None else None
        if method == "afm":
            assert stats is not None
            if name not in stats.layers:
                raise ValueError(f"no statistics for {name}; collected: {sorted(stats.layers)}")
            spectrum, vectors = pca(stats.layers[name].covariance())
            if relu_between:
                vectors = orient_towards_mean(vectors, stats.layers[name].mean())
        else:
            spectrum = singular_value_spectrum(weight)
        if callable(layer_ranks):
            wanted = layer_ranks(index, spectrum)
            if wanted is None:
                layers.append(module)
                continue
            k = choose_rank(spectrum, k=int(wanted))
        else:
            k = _rank_from_spec(layer_ranks[index], spectrum, name)
        if method == "afm":
            layers.extend(afm_linear(weight, bias, vectors[:, :k], stats.layers[name].mean(), relu_between))
        else:
            layers.extend(svd_linear(weight, bias, k, relu_between))
        chosen[str(index)] = k
        log.append(
            {
                "what": "mlp",
                "layer": name,
                "index": index,
                "method": method,
                "shape": [module.out_features, module.in_features],
                "k": k,
                "kept_share": _kept_share(spectrum, k),
                "spectrum": spectrum_report(spectrum),
                "relu_between": relu_between,
            }
        )
    if not callable(layer_ranks):
        unknown = sorted(set(layer_ranks) - set(range(index + 1)))
        if unknown:
            raise ValueError(f"layer_ranks names Linear layers {unknown}; the MLP has {index + 1}")
    step = LowRankStep(what="mlp", ranks=chosen, relu_between=relu_between)
    return CompressedMLP(nn.Sequential(*layers)), log, step


def orient_towards_mean(vectors: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    r"""
    Flips each principal direction (column of ``vectors`` ``[m, m]``) whose projection of the mean
    output :math:`u_i^T \mu` is negative. An eigenvector's sign is free, and without a ReLU between the
    two new layers the result does not depend on it; with the ReLU (the paper's improved AFM), the
    code :math:`U_k^T y` is cut below zero, so each direction is oriented for its code to be positive
    on average: on a trained MovieLens DCN most directions have :math:`|u_i^T \mu|` above their
    standard deviation, and this orientation keeps the AUC right after compression close to the
    exact (ReLU-free) transform, as the paper reports, where arbitrary signs lost 0.14 AUC.
    """
    signs = torch.sign(vectors.t() @ mu.to(vectors.dtype))
    signs[signs == 0] = 1.0
    return vectors * signs


def _record(new: CTRModel, old: CTRModel, log: List[Dict[str, Any]], step: LowRankStep) -> None:
    """Appends a surgery's log and structure step to the model's (both inherited from ``old``)."""
    new.compression_log = list(getattr(old, "compression_log", [])) + log
    new.compression_steps = list(getattr(old, "compression_steps", [])) + ([step] if step.ranks else [])


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, module)


# ---------------------------------------------------------------- embedding surgery


def can_fuse(model: CTRModel) -> bool:
    """Whether the embedding up-projections fold into the first MLP layer: the head is a
    ``DNNHead`` (``dnn``, ``wide_deep``, ``tiny_mlp``), whose MLP reads the flattened fields directly
    and nothing else reads them."""
    return type(model.head) is DNNHead and isinstance(model.head.mlp.layers[0], nn.Linear)


def compress_embeddings(
    model: CTRModel,
    ranks: Union[RankSpec, Mapping[str, RankSpec]],
    stats: Optional[ModelStatistics] = None,
    *,
    fuse: Optional[bool] = None,
    method: str = "afm",
    centered: bool = False,
) -> CTRModel:
    """
    Replaces sparse embedding tables ``V x D`` by ``V x k_f`` projections plus an up-projection, kept
    per field or fused into the first MLP layer.

    Args:
        model (CTRModel): a plain model with a :class:`~recsys_kd.models.FieldEmbedding`; not modified.
        ranks: one k (int) or variance share (float) for every sparse field, or ``{feature: k or
            share}`` for the fields to compress (others keep their D-wide table).
        stats (Optional[ModelStatistics]): with field statistics (:func:`collect_statistics`), for AFM.
        fuse (Optional[bool]): fold the up-projections into the first MLP layer; None = where
            :func:`can_fuse` (``DNNHead``); True on another head is an error.
        method (str): ``"afm"`` or ``"svd"`` (top right singular vectors of each table, unweighted and
            uncentred).
        centered (bool): AFM tables as the reference code, :math:`(E - \\mu^T) U_k` with bias
            :math:`\\mu` (exact only for features with exactly one id per example), instead of the
            paper's :math:`E U_k` with bias :math:`(I - U_k U_k^T)\\mu` (exact for any bag).

    Returns:
        CTRModel: a new model whose ``embedding`` is a :class:`LowRankFieldEmbedding`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    embedding = model.embedding
    if not isinstance(embedding, FieldEmbedding):
        raise ValueError(f"compress_embeddings needs a FieldEmbedding, got {type(embedding).__name__}")
    if embedding.embedding_dim < 2:
        raise ValueError(f"model {model.name!r} has D = {embedding.embedding_dim}: nothing to compress")
    fuse = can_fuse(model) if fuse is None else fuse
    if fuse and not can_fuse(model):
        raise ValueError(
            f"model {model.name!r}: its head ({type(model.head).__name__}) does not feed the fields straight "
            "into an MLP, so the up-projections cannot be fused; use fuse=False"
        )
    if method == "afm" and (stats is None or stats.field_stats is None):
        raise ValueError("AFM needs the field statistics: pass collect_statistics(model, ..., fields=True)")
    if stats is not None and stats.field_stats is not None and stats.field_names != embedding.field_names:
        raise ValueError(f"statistics are for fields {stats.field_names}, the model has {embedding.field_names}")
    d = embedding.embedding_dim
    sparse_names = list(embedding._sparse_names)
    num_dense = embedding._num_dense
    if isinstance(ranks, Mapping):
        unknown = sorted(set(ranks) - set(sparse_names))
        if unknown:
            raise ValueError(f"ranks name {unknown}, which are not sparse features ({sparse_names})")
        plan: Dict[str, RankSpec] = dict(ranks)
    else:
        plan = {name: ranks for name in sparse_names}

    new = copy.deepcopy(model)
    old = new.embedding
    assert isinstance(old, FieldEmbedding)
    configs = {config.feature_names[0]: config for config in old.ebc.embedding_bag_configs()}
    field_stats = stats.fields if stats is not None else []
    tables: Dict[str, torch.Tensor] = {}
    up_weights: Dict[str, torch.Tensor] = {}
    up_biases: Dict[str, torch.Tensor] = {}
    chosen: Dict[str, int] = {}
    log: List[Dict[str, Any]] = []
    for i, name in enumerate(sparse_names):
        config = configs[name]
        weight = old.ebc.embedding_bags[config.name].weight.detach()
        if name not in plan:
            tables[config.name] = weight
            continue
        if method == "afm":
            moments = field_stats[num_dense + i]
            spectrum, vectors = pca(moments.covariance())
            k = _rank_from_spec(plan[name], spectrum, name)
            table, up_weight, up_bias = afm_embedding(weight, vectors[:, :k], moments.mean(), centered)
        else:
            gram = embedding_gram(weight)
            spectrum, _ = pca(gram)
            k = _rank_from_spec(plan[name], spectrum, name)
            table, up_weight, up_bias = svd_embedding(weight, k, gram)
        chosen[name] = k
        tables[config.name] = table
        up_weights[name], up_biases[name] = up_weight, up_bias
        log.append(
            {
                "what": "embedding",
                "table": config.name,
                "feature": name,
                "method": method,
                "shape": [config.num_embeddings, d],
                "k": k,
                "kept_share": _kept_share(spectrum, k),
                "spectrum": spectrum_report(spectrum),
                "centered": centered if method == "afm" else False,
                "fused": fuse,
            }
        )

    new.embedding = low_rank_field_embedding(old, chosen, up_weights, up_biases, fuse)
    with torch.no_grad():
        for table_name, values in tables.items():
            new.embedding.ebc.embedding_bags[table_name].weight.copy_(values)
    if fuse:
        new.head.mlp = fused_first_layer(new.head, num_dense, d, sparse_names, up_weights, up_biases)
    _record(new, model, log, LowRankStep(what="embeddings", ranks=chosen, fused=fuse))
    return new


def low_rank_field_embedding(
    old: FieldEmbedding,
    ranks: Mapping[str, int],
    up_weights: Mapping[str, torch.Tensor],
    up_biases: Mapping[str, torch.Tensor],
    fused: bool,
    device: Optional[torch.device] = None,
) -> LowRankFieldEmbedding:
    """
    The :class:`LowRankFieldEmbedding` replacing ``old``: the same tables, dense projection and field
    order, the tables of ``ranks``' features ``V x k`` instead of ``V x D`` (created on ``device``,
    default ``old``'s table device, and default-initialised: the caller copies or loads the values)
    with the given up-projections ``U_f [D, k_f]`` and biases ``[D]`` (unused when ``fused``).
    """
    configs = {config.feature_names[0]: config for config in old.ebc.embedding_bag_configs()}
    new_configs = [
        dataclasses.replace(configs[name], embedding_dim=ranks[name]) if name in ranks else configs[name]
        for name in old._sparse_names
    ]
    if device is None:
        device = next(iter(old.ebc.embedding_bags.values())).weight.device
    return LowRankFieldEmbedding(
        ebc=EmbeddingBagCollection(tables=new_configs, device=device),
        sparse_names=old._sparse_names,
        field_names=old.field_names,
        embedding_dim=old.embedding_dim,
        dense_weight=old.dense_weight,
        ranks=dict(ranks),
        up_weights=up_weights,
        up_biases=up_biases,
        fused=fused,
    )


def apply_low_rank_structure(model: CTRModel, steps: Sequence[LowRankStep]) -> CTRModel:
    """
    In place: gives ``model`` the modules of the recorded compression ``steps`` (their shapes only;
    weights zero or default-initialised until a checkpoint is loaded). ``build_model`` calls it for a
    ``ModelConfig`` with ``compression``, which is how a compressed model is fine-tuned, evaluated and
    exported from its checkpoint like any other.
    """
    for step in steps:
        if step.what == "mlp":
            path, mlp = find_mlp(model, step.mlp_path or None)
            ranks = {int(index): k for index, k in step.ranks.items()}
            _set_submodule(model, path, _mlp_structure(mlp, ranks, step.relu_between))
            continue
        old = model.embedding
        if not isinstance(old, FieldEmbedding):
            raise ValueError("an embeddings step needs a FieldEmbedding: embeddings are compressed at most once")
        unknown = sorted(set(step.ranks) - set(old._sparse_names))
        if unknown:
            raise ValueError(f"compression ranks name {unknown}, which are not sparse features of this model")
        d = old.embedding_dim
        weight = old.dense_weight if old.dense_weight is not None else next(iter(model.head.parameters()))
        zeros = {name: torch.zeros(d, k, dtype=weight.dtype) for name, k in step.ranks.items()}
        biases = {name: torch.zeros(d, dtype=weight.dtype) for name in step.ranks}
        model.embedding = low_rank_field_embedding(old, step.ranks, zeros, biases, step.fused)
        if step.fused:
            if not can_fuse(model):
                raise ValueError(f"model {model.name!r}: a fused embeddings step needs a DNNHead")
            model.head.mlp = fused_first_layer(model.head, old._num_dense, d, old._sparse_names, zeros, biases)
    model.compression_steps = list(steps)
    return model


def _mlp_structure(mlp: MLP, ranks: Mapping[int, int], relu_between: bool) -> CompressedMLP:
    layers: List[nn.Module] = []
    index = -1
    for module in mlp.layers:
        if isinstance(module, nn.Linear):
            index += 1
            if index in ranks:
                k, n, m = ranks[index], module.in_features, module.out_features
                like = module.weight
                zeros = [torch.zeros(*shape, dtype=like.dtype, device=like.device) for shape in ((k, n), (k,), (m, k), (m,))]
                layers.extend(two_linear_layers(*zeros, relu_between=relu_between))
                continue
        layers.append(module)
    unknown = sorted(set(ranks) - set(range(index + 1)))
    if unknown:
        raise ValueError(f"compression ranks name Linear layers {unknown}; the MLP has {index + 1}")
    return CompressedMLP(nn.Sequential(*layers))


def fused_first_layer(
    head: nn.Module,
    num_dense: int,
    d: int,
    sparse_names: Sequence[str],
    up_weights: Mapping[str, torch.Tensor],
    up_biases: Mapping[str, torch.Tensor],
) -> CompressedMLP:
    """A ``DNNHead``'s MLP with the fields' up-projections folded into its first ``nn.Linear``
    (:func:`~recsys_kd.compress.afm.fuse_into_first_linear`); the other layers are shared."""
    assert isinstance(head, DNNHead)
    first = head.mlp.layers[0]
    assert isinstance(first, nn.Linear)
    field_weights: List[Optional[torch.Tensor]] = [None] * num_dense + [up_weights.get(n) for n in sparse_names]
    field_biases: List[Optional[torch.Tensor]] = [None] * num_dense + [up_biases.get(n) for n in sparse_names]
    weight, bias = fuse_into_first_linear(
        first.weight.detach(),
        first.bias.detach() if first.bias is not None else None,
        field_weights,
        field_biases,
        [d] * (num_dense + len(sparse_names)),
    )
    fused = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return CompressedMLP(nn.Sequential(fused, *list(head.mlp.layers)[1:]))
