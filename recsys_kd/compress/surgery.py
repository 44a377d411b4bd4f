r"""Module surgery on a plain (unsharded) :class:`~recsys_kd.models.CTRModel`: AFM (or SVD) low-rank
compression of MLP layers and embedding tables, returning a new model (the input is deep-copied, never
modified). This module computes the new weights; the modules they go into, and where the embedding
up-projections go for each head, are :mod:`recsys_kd.models.low_rank`'s.

Workflow (the paper's: compress the MLP, fine-tune one epoch, then the embeddings, fine-tune)::

    stats = collect_statistics(model, train_batches)           # one pass over the training set
    model = compress_mlp(model, {1: 64, 2: 64}, stats, relu_between=True)
    ...fine-tune...
    stats = collect_statistics(model, train_batches, layers=[])  # field statistics only
    model = compress_embeddings(model, 2, stats)                # fused where the head allows it

The statistics (:mod:`recsys_kd.compress.statistics`) are those of each ``nn.Linear``'s pre-activation
output, and of the sum-pooled field embeddings. Only the sparse fields' tables are compressed (the paper
likewise leaves continuous features alone).

**Centered or not.** ``compress_embeddings(centered=False)`` (the default) stores :math:`E' = E U_k`
with the bias :math:`(I - U_k U_k^T)\mu` (the paper's equations 10-11), which reproduces the PCA
reconstruction of the pooled embedding for bags of any size, the empty bags and multi-hot features the
reader produces included. ``centered=True`` is the reference code's :math:`E' = (E - \mu^T) U_k` with
bias :math:`\mu`: the same function for features with exactly one id per example, not for others.

Rank choice: an ``int`` k, a ``float`` variance share in (0, 1] (the smallest k whose components
explain that share), or for MLPs a callable ``(linear_index, spectrum) -> Optional[int]`` (None skips
the layer). ``model.compression_log`` lists what each call did (layer or field, method, k, explained
variance share kept); ``model.compression_steps`` the :class:`~recsys_kd.models.low_rank.LowRankStep`
that rebuild its structure.
"""

import copy
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

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
)
from recsys_kd.compress.statistics import ModelStatistics
from recsys_kd.models.embedding import FieldEmbedding
from recsys_kd.models.heads import DNNHead
from recsys_kd.models.layers import MLP
from recsys_kd.models.low_rank import (
    CompressedMLP,
    LowRankStep,
    can_fuse,
    find_mlp,
    low_rank_field_embedding,
    table_configs,
    with_first_linear,
)
from recsys_kd.models.zoo import CTRModel

RankSpec = Union[int, float]
LayerRanks = Union[Mapping[int, RankSpec], Callable[[int, torch.Tensor], Optional[int]]]
METHODS = ("afm", "svd")


# ---------------------------------------------------------------- rank resolution


def rank_from_spec(spec: RankSpec, spectrum: torch.Tensor, what: str) -> int:
    """The rank for ``spec``: an integer is a rank k, any other real number a variance share."""
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        return choose_rank(spectrum, k=int(spec))
    if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
        return choose_rank(spectrum, variance_share=float(spec))
    raise ValueError(f"{what}: rank {spec!r} is neither an int nor a variance share")


def kept_share(spectrum: torch.Tensor, k: int) -> float:
    """The share of the variance that the top k components explain."""
    return float(explained_variance_ratio(spectrum)[:k].sum())


def _record(new: CTRModel, old: CTRModel, log: List[Dict[str, Any]], step: LowRankStep) -> None:
    """Appends a surgery's log and structure step to the model's (both inherited from ``old``)."""
    new.compression_log = list(getattr(old, "compression_log", [])) + log
    new.compression_steps = list(getattr(old, "compression_steps", [])) + ([step] if step.ranks else [])


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
        stats (Optional[ModelStatistics]): from :func:`~recsys_kd.compress.statistics.collect_statistics`
            on this model (required for AFM: ``stats.layers`` keyed by the Linear's module path).
        relu_between (bool): insert a ReLU between the two new layers (the paper's improved AFM, to be
            fine-tuned); without it AFM is the exact PCA reconstruction of the layer's output.
        method (str): ``"afm"`` (output PCA) or ``"svd"`` (the weight's truncated SVD, the baseline).
        mlp_path (Optional[str]): the MLP's module path when the model has several.

    Returns:
        CTRModel: a new model whose MLP is a :class:`~recsys_kd.models.low_rank.CompressedMLP` (FLOPs
        and parameters counted).
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
    new.set_submodule(path, compressed)
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
    :class:`~recsys_kd.models.low_rank.CompressedMLP` (non-Linear layers are shared with ``mlp``), the
    log entries, and the :class:`~recsys_kd.models.low_rank.LowRankStep` that rebuilds its structure.
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
            k = rank_from_spec(layer_ranks[index], spectrum, name)
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
                "kept_share": kept_share(spectrum, k),
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


# ---------------------------------------------------------------- embedding surgery


@dataclass
class TableFactors:
    """One sparse table's compression: the table ``[V, k]``, its up-projection ``U [D, k]`` and bias
    ``[D]`` (``e = U e' + c``), and the spectrum k was chosen from."""

    k: int
    table: torch.Tensor
    up_weight: torch.Tensor
    up_bias: torch.Tensor
    spectrum: torch.Tensor


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
        stats (Optional[ModelStatistics]): with field statistics
            (:func:`~recsys_kd.compress.statistics.collect_statistics`), for AFM.
        fuse (Optional[bool]): fold the up-projections into the first MLP layer; None = where
            :func:`~recsys_kd.models.low_rank.can_fuse` (``DNNHead``); True on another head is an error.
        method (str): ``"afm"`` or ``"svd"`` (top right singular vectors of each table, unweighted and
            uncentred).
        centered (bool): AFM tables as the reference code, :math:`(E - \\mu^T) U_k` with bias
            :math:`\\mu` (exact only for features with exactly one id per example), instead of the
            paper's :math:`E U_k` with bias :math:`(I - U_k U_k^T)\\mu` (exact for any bag).

    Returns:
        CTRModel: a new model whose ``embedding`` is a
        :class:`~recsys_kd.models.low_rank.LowRankFieldEmbedding`.
    """
    fuse = _check_embedding_compression(model, stats, method, fuse)
    plan = _rank_plan(ranks, model.embedding._sparse_names)
    new = copy.deepcopy(model)
    embedding = new.embedding
    configs = table_configs(embedding)
    field_stats = stats.fields if stats is not None else []
    factors: Dict[str, TableFactors] = {}
    for i, name in enumerate(embedding._sparse_names):
        if name in plan:
            moments = field_stats[embedding._num_dense + i] if method == "afm" else None
            weight = embedding.ebc.embedding_bags[configs[name].name].weight.detach()
            factors[name] = _factor_table(weight, plan[name], moments, method, centered, name)
    _install_low_rank_embedding(new, factors, fuse)
    use_centered = centered and method == "afm"
    log = [
        embedding_log_entry(configs[name], method, f.k, f.spectrum, use_centered, fuse)
        for name, f in factors.items()
    ]
    step = LowRankStep(what="embeddings", ranks={name: f.k for name, f in factors.items()}, fused=fuse)
    _record(new, model, log, step)
    return new


def _check_embedding_compression(
    model: CTRModel, stats: Optional[ModelStatistics], method: str, fuse: Optional[bool]
) -> bool:
    """Checks that ``model``'s embeddings can be compressed by ``method`` from ``stats``; returns
    whether the up-projections are fused (``fuse``, or where the head allows it when None)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    embedding = model.embedding
    if not isinstance(embedding, FieldEmbedding):
        raise ValueError(f"compress_embeddings needs a FieldEmbedding, got {type(embedding).__name__}")
    if embedding.embedding_dim < 2:
        raise ValueError(f"model {model.name!r} has D = {embedding.embedding_dim}: nothing to compress")
    fusable = can_fuse(model)
    if fuse and not fusable:
        raise ValueError(
            f"model {model.name!r}: its head ({type(model.head).__name__}) does not feed the fields straight "
            "into an MLP, so the up-projections cannot be fused; use fuse=False"
        )
    if method == "afm" and (stats is None or stats.field_stats is None):
        raise ValueError("AFM needs the field statistics: pass collect_statistics(model, ..., fields=True)")
    if stats is not None and stats.field_stats is not None and stats.field_names != embedding.field_names:
        raise ValueError(f"statistics are for fields {stats.field_names}, the model has {embedding.field_names}")
    return fusable if fuse is None else fuse


def _rank_plan(ranks: Union[RankSpec, Mapping[str, RankSpec]], sparse_names: Sequence[str]) -> Dict[str, RankSpec]:
    """``{feature: rank spec}`` for the features to compress: ``ranks`` itself, or one spec for all."""
    if not isinstance(ranks, Mapping):
        return {name: ranks for name in sparse_names}
    unknown = sorted(set(ranks) - set(sparse_names))
    if unknown:
        raise ValueError(f"ranks name {unknown}, which are not sparse features ({list(sparse_names)})")
    return dict(ranks)


def _factor_table(
    weight: torch.Tensor,
    spec: RankSpec,
    moments: Optional[LayerStatistics],
    method: str,
    centered: bool,
    name: str,
) -> TableFactors:
    """Compresses one table ``weight [V, D]``: AFM from its field's ``moments``, or SVD of the weight."""
    if method == "afm":
        assert moments is not None
        spectrum, vectors = pca(moments.covariance())
        k = rank_from_spec(spec, spectrum, name)
        table, up_weight, up_bias = afm_embedding(weight, vectors[:, :k], moments.mean(), centered)
    else:
        gram = embedding_gram(weight)
        spectrum, _ = pca(gram)
        k = rank_from_spec(spec, spectrum, name)
        table, up_weight, up_bias = svd_embedding(weight, k, gram)
    return TableFactors(k, table, up_weight, up_bias, spectrum)


def _install_low_rank_embedding(model: CTRModel, factors: Mapping[str, TableFactors], fuse: bool) -> None:
    """In place: ``model``'s ``FieldEmbedding`` becomes a ``LowRankFieldEmbedding`` holding the
    compressed tables of ``factors`` and its other tables unchanged; fused, the up-projections fold into
    the head's first Linear instead."""
    old = model.embedding
    ranks = {name: f.k for name, f in factors.items()}
    up_weights = {name: f.up_weight for name, f in factors.items()}
    up_biases = {name: f.up_bias for name, f in factors.items()}
    model.embedding = low_rank_field_embedding(old, ranks, up_weights, up_biases, fuse)
    with torch.no_grad():
        for name, config in table_configs(old).items():
            values = factors[name].table if name in factors else old.ebc.embedding_bags[config.name].weight
            model.embedding.ebc.embedding_bags[config.name].weight.copy_(values)
    if fuse:
        model.head.mlp = fused_first_layer(
            model.head, old._num_dense, old.embedding_dim, old._sparse_names, up_weights, up_biases
        )


def embedding_log_entry(
    config: EmbeddingBagConfig, method: str, k: int, spectrum: torch.Tensor, centered: bool, fused: bool
) -> Dict[str, Any]:
    """The ``compression_log`` entry of one compressed table."""
    return {
        "what": "embedding",
        "table": config.name,
        "feature": config.feature_names[0],
        "method": method,
        "shape": [config.num_embeddings, config.embedding_dim],
        "k": k,
        "kept_share": kept_share(spectrum, k),
        "spectrum": spectrum_report(spectrum),
        "centered": centered,
        "fused": fused,
    }


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
    return with_first_linear(head.mlp, fused)
