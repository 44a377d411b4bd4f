r"""The structure of a low-rank (AFM or SVD) compressed :class:`~recsys_kd.models.CTRModel`: the modules,
the :class:`LowRankStep` records that describe them, and :func:`apply_low_rank_structure`, which
``build_model`` calls to rebuild a compressed model from its ``ModelConfig.compression`` (weights then
come from its checkpoint). Computing the compressed weights is ``recsys_kd.compress``'s job.

**MLP layers.** A chosen ``Linear(n, m)`` becomes ``Linear(n, k) [-> ReLU] -> Linear(k, m)``
(:func:`factored_linear`) in a :class:`CompressedMLP`; its batch norm, activation and dropout stay after
the second Linear.

**Embeddings: fused or kept as an up-projection, per head.** Only sparse fields have tables (a
projected dense field :math:`x_j v_j` has none). Each compressed table ``t_<feature>`` becomes ``V x k_f``
in a new torchrec EBC (same table names) inside a :class:`LowRankFieldEmbedding`, and its up-projection
:math:`e_f = U_f e'_f + c_f` back to D is either

- fused (:func:`can_fuse`: ``DNNHead`` models ``dnn``, ``wide_deep``, ``tiny_mlp``): the MLP reads the
  concatenated fields directly, so the up-projections fold into its first ``nn.Linear``
  (:math:`W'_f = W_f U_f`, :math:`b' = b + \sum_f W_f c_f`), whose input narrows to the codes' width;
  the embedding module then returns the concatenated codes ``[B, n_dense * D + sum_f width_f]`` (2-D),
  which ``DNNHead``'s ``flatten(1)`` passes through unchanged, so ``forward_with_hidden``'s third
  output is that 2-D tensor, not ``[B, F, D]``;
- or kept in the embedding module as ``Linear(k_f, D)`` per field, which still returns ``[B, F, D]``:
  every other head has a layer that reads the field embeddings (FM, CrossNet, CIN, attention, bilinear,
  DAGFM) or sits between them and the MLP (FiBiNET), and folding is exact only when the first Linear
  reads the fields themselves. (Keeping the up-projection for the interaction *and* folding it into the
  MLP, for DeepFM-like heads, would save only part of the first layer's FLOPs; it is not done.)
"""

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_kd.models.embedding import FieldEmbedding
from recsys_kd.models.heads import DNNHead
from recsys_kd.models.layers import MLP

if TYPE_CHECKING:  # zoo imports this module to build compressed models
    from recsys_kd.models.zoo import CTRModel

_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh)


@dataclass
class LowRankStep:
    """One low-rank compression step in a model's structure, as ``recsys-kd compress`` records it, so
    that ``build_model`` rebuilds a compressed model's modules (their weights then come from its
    checkpoint).

    Attributes:
        what: ``"mlp"`` (chosen ``nn.Linear`` layers of the MLP -> ``Linear(n, k) [-> ReLU] -> Linear(k, m)``)
            or ``"embeddings"`` (chosen sparse tables ``V x D`` -> ``V x k`` with an up-projection).
        ranks: ``{Linear index in the MLP (as a string): k}`` or ``{sparse feature: k}``.
        relu_between: ``"mlp"``: a ReLU between the two new layers.
        fused: ``"embeddings"``: the up-projections are folded into the first MLP layer.
        mlp_path: ``"mlp"``: the MLP's module path when the model has several (e.g. ``head.mlp``).
    """

    what: Literal["mlp", "embeddings"] = "mlp"
    ranks: Dict[str, int] = field(default_factory=dict)
    relu_between: bool = False
    fused: bool = False
    mlp_path: str = ""

    def validate(self) -> None:
        if not self.ranks:
            raise ValueError("ranks is empty: name at least one layer or feature")
        for key, k in self.ranks.items():
            if k < 1:
                raise ValueError(f"ranks.{key}: k must be >= 1, got {k}")
        if self.what == "mlp" and not all(key.isdigit() for key in self.ranks):
            raise ValueError(f"mlp ranks are keyed by Linear index (0, 1, ...), got {sorted(self.ranks)}")


# ---------------------------------------------------------------- modules


class CompressedMLP(MLP):
    """
    An :class:`~recsys_kd.models.layers.MLP` whose flat ``layers`` were rewritten (a ``Linear`` replaced
    by two, or the first one fused with embedding up-projections). Same ``forward``
    (``[B, in_features] -> [B, out_features]``); FLOPs are counted by walking the layers:
    ``Linear(i, o)`` 2io + o, activation 1 per element, batch norm 2 per element, dropout 0.

    Args:
        layers (nn.Sequential): the new flat layers (``Linear``, ``BatchNorm1d``, activations,
            ``Dropout``).
    """

    def __init__(self, layers: nn.Sequential) -> None:
        nn.Module.__init__(self)  # MLP.__init__ would build its own layers
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

    Build it with :func:`low_rank_field_embedding`. Scripts with ``torch.jit.script``.
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


# ---------------------------------------------------------------- builders


def factored_linear(
    in_features: int,
    rank: int,
    out_features: int,
    relu_between: bool,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Sequential:
    """The low-rank replacement of ``Linear(n, m)``: ``Linear(n, k) [-> ReLU] -> Linear(k, m)``,
    ``[B, n] -> [B, m]``, default-initialised."""
    first = nn.Linear(in_features, rank, device=device, dtype=dtype)
    second = nn.Linear(rank, out_features, device=device, dtype=dtype)
    layers: List[nn.Module] = [first] + ([nn.ReLU()] if relu_between else []) + [second]
    return nn.Sequential(*layers)


def with_first_linear(mlp: MLP, first: nn.Linear) -> CompressedMLP:
    """``mlp`` reading a different input through ``first`` (e.g. fused embedding codes): a new
    :class:`CompressedMLP` whose other layers are ``mlp``'s own (shared)."""
    return CompressedMLP(nn.Sequential(first, *list(mlp.layers)[1:]))


def table_configs(embedding: FieldEmbedding) -> Dict[str, EmbeddingBagConfig]:
    """Each sparse feature's table config (one feature per table)."""
    return {config.feature_names[0]: config for config in embedding.ebc.embedding_bag_configs()}


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
    configs = table_configs(old)
    new_configs = [
        dataclasses.replace(configs[name], embedding_dim=ranks[name]) if name in ranks else configs[name]
        for name in old._sparse_names
    ]
    if device is None:
        device = next(iter(old.ebc.embedding_bags.values())).weight.device
    return LowRankFieldEmbedding(
        ebc=EmbeddingBagCollection(tables=new_configs, is_weighted=old.ebc.is_weighted(), device=device),
        sparse_names=old._sparse_names,
        field_names=old.field_names,
        embedding_dim=old.embedding_dim,
        dense_weight=old.dense_weight,
        ranks=dict(ranks),
        up_weights=up_weights,
        up_biases=up_biases,
        fused=fused,
    )


def find_mlp(model: nn.Module, mlp_path: Optional[str] = None) -> Tuple[str, MLP]:
    """The module path and module of ``model``'s MLP: the one at ``mlp_path`` (e.g. ``head.mlp``), or the
    model's only :class:`~recsys_kd.models.layers.MLP`."""
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


def can_fuse(model: "CTRModel") -> bool:
    """Whether the embedding up-projections fold into the first MLP layer: the head is a
    ``DNNHead`` (``dnn``, ``wide_deep``, ``tiny_mlp``), whose MLP reads the flattened fields directly
    and nothing else reads them."""
    return type(model.head) is DNNHead and isinstance(model.head.mlp.layers[0], nn.Linear)


# ---------------------------------------------------------------- rebuilding a compressed model


def apply_low_rank_structure(model: "CTRModel", steps: Sequence[LowRankStep]) -> "CTRModel":
    """
    In place: gives ``model`` the modules of the recorded compression ``steps`` (their shapes only:
    weights default-initialised, up-projections zero, until a checkpoint is loaded). ``build_model``
    calls it for a ``ModelConfig`` with ``compression``, which is how a compressed model is fine-tuned,
    evaluated and exported from its checkpoint like any other.
    """
    for step in steps:
        if step.what == "mlp":
            path, mlp = find_mlp(model, step.mlp_path or None)
            ranks = {int(index): k for index, k in step.ranks.items()}
            model.set_submodule(path, _mlp_structure(mlp, ranks, step.relu_between))
        else:
            _embeddings_structure(model, step)
    model.compression_steps = list(steps)
    return model


def _mlp_structure(mlp: MLP, ranks: Mapping[int, int], relu_between: bool) -> CompressedMLP:
    """``mlp`` with its ``ranks``' Linear layers (by index among the Linears) factored."""
    layers: List[nn.Module] = []
    index = -1
    for module in mlp.layers:
        if isinstance(module, nn.Linear):
            index += 1
            if index in ranks:
                n, k, m, like = module.in_features, ranks[index], module.out_features, module.weight
                layers.extend(factored_linear(n, k, m, relu_between, like.device, like.dtype))
                continue
        layers.append(module)
    unknown = sorted(set(ranks) - set(range(index + 1)))
    if unknown:
        raise ValueError(f"compression ranks name Linear layers {unknown}; the MLP has {index + 1}")
    return CompressedMLP(nn.Sequential(*layers))


def _embeddings_structure(model: "CTRModel", step: LowRankStep) -> None:
    """In place: ``model``'s embedding becomes a :class:`LowRankFieldEmbedding` of ``step``'s ranks,
    and, fused, its head's MLP reads the codes through a first Linear of the codes' width."""
    old = model.embedding
    if not isinstance(old, FieldEmbedding):
        raise ValueError("an embeddings step needs a FieldEmbedding: embeddings are compressed at most once")
    unknown = sorted(set(step.ranks) - set(old._sparse_names))
    if unknown:
        raise ValueError(f"compression ranks name {unknown}, which are not sparse features of this model")
    d = old.embedding_dim
    like = old.dense_weight if old.dense_weight is not None else next(iter(model.head.parameters()))
    zeros = {name: torch.zeros(d, k, dtype=like.dtype) for name, k in step.ranks.items()}
    biases = {name: torch.zeros(d, dtype=like.dtype) for name in step.ranks}
    model.embedding = low_rank_field_embedding(old, step.ranks, zeros, biases, step.fused)
    if step.fused:
        if not can_fuse(model):
            raise ValueError(f"model {model.name!r}: a fused embeddings step needs a DNNHead")
        first = model.head.mlp.layers[0]
        width = model.embedding.output_width
        fused = nn.Linear(width, first.out_features, device=first.weight.device, dtype=first.weight.dtype)
        model.head.mlp = with_first_linear(model.head.mlp, fused)

