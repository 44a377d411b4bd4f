"""The embedding front end shared by every model: sparse and dense features -> field embeddings ``[B, F, D]``.

Field order is fixed by the schema: the dense features (``schema.dense`` order) when they are projected,
then the sparse features (``schema.sparse`` order). For Criteo this is I1..I13, C1..C26 whether the
integer features arrive as dense columns (projected here) or were bucketized into sparse ids, so the
field order, which DAGFM's edges depend on, is the same in both cases.
"""

import hashlib
import math
from functools import partial
from typing import List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_kd.data.schema import Schema, SchemaError

DENSE_MODES = ("projected", "none")

# FuxiCTR's default embedding initializer, ``partial(nn.init.normal_, std=1e-4)``: tiny embeddings make
# every interaction term start near zero, so training begins close to the constant model. It lives in
# each table's config because DistributedModelParallel re-initialises the tables it shards through it.
EMBEDDING_STD = 1e-4

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def seeded_table_block(
    seed: int, table: str, row0: int, num_rows: int, col0: int, num_cols: int, embedding_dim: int,
    device: Optional[torch.device] = None, std: float = EMBEDDING_STD,
) -> torch.Tensor:
    r"""
    Rows ``[row0, row0 + num_rows)``, columns ``[col0, col0 + num_cols)`` of table ``table``'s seeded
    initial values, ``[num_rows, num_cols]`` float32 ~ N(0, ``std``), computed on ``device``.

    Element ``(r, c)`` depends only on ``(seed, table, r * embedding_dim + c)``: a counter-based RNG
    (splitmix64 of the counter, two draws, Box-Muller), so any block of a table (a row shard, a
    column shard, a chunk of either) is initialised without the rest and every sharding plan, and
    every number of ranks, starts from the same table.

    Example::

        shard = seeded_table_block(0, "model.embedding.ebc.embedding_bags.t_C1.weight", 1000, 500, 0, 16, 16)
    """
    key = _to_signed(_splitmix64_int(seed & _MASK64 ^ int.from_bytes(hashlib.blake2b(table.encode(), digest_size=8).digest(), "little")))
    rows = torch.arange(row0, row0 + num_rows, dtype=torch.int64, device=device)
    cols = torch.arange(col0, col0 + num_cols, dtype=torch.int64, device=device)
    counter = (rows[:, None] * embedding_dim + cols[None, :]) * 2
    first = _unit_interval(_splitmix64(key + (counter + 1) * _to_signed(_GOLDEN)))
    second = _unit_interval(_splitmix64(key + (counter + 2) * _to_signed(_GOLDEN)))
    normal = torch.sqrt(-2.0 * torch.log(first)) * torch.cos(2.0 * math.pi * second)
    return (normal * std).to(torch.float32)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors read as uint64 (multiplication wraps modulo 2**64)."""
    z = z ^ _shift_right(z, 30)
    z = z * _to_signed(0xBF58476D1CE4E5B9)
    z = z ^ _shift_right(z, 27)
    z = z * _to_signed(0x94D049BB133111EB)
    return z ^ _shift_right(z, 31)


def _splitmix64_int(z: int) -> int:
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 ``z``."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _unit_interval(z: torch.Tensor) -> torch.Tensor:
    """The top 53 bits of each word as a float64 in (0, 1]."""
    return (_shift_right(z, 11) + 1).to(torch.float64) * 2.0 ** -53


def _to_signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class FieldEmbedding(nn.Module):
    r"""
    The field embeddings of one example: a torchrec ``EmbeddingBagCollection`` with one table
    ``{table_prefix}{feature}`` (``num_embeddings x D``, sum pooling, so a multi-hot feature is the sum of
    its ids' rows) per sparse feature, and with ``dense_mode="projected"`` one field per dense feature,

    .. math:: e_j = x_j \, v_j, \qquad v_j \in R^D

    (FuxiCTR's numeric embedding, ``nn.Linear(1, D, bias=False)`` per feature, and like it initialised
    ``U(-1, 1)``, PyTorch's default for fan-in 1). With ``dense_mode="none"`` the dense input is ignored
    (datasets whose numeric features were bucketized into sparse ids).

    When the schema has weighted features (libSVM/libFM values) the collection is weighted: a bag
    pools :math:`\sum_i w_i E[id_i]` with the ids' weights from the KeyedJaggedTensor (1 for the ids of
    unweighted features), libFM's :math:`x_i v_i`; otherwise it takes no weights.

    The pooled embeddings are taken from the ``KeyedTensor`` by name (``to_dict()``), never by position:
    an EBC sharded by DistributedModelParallel returns its keys grouped by sharding, in another order.

    Args:
        schema (Schema): the dataset's features.
        embedding_dim (int): D.
        dense_mode (str): ``"projected"`` or ``"none"``.
        table_prefix (str): table name prefix, ``"t_"`` for field embeddings, ``"w_"`` for first-order
            weights (D = 1).
        device (Optional[torch.device]): where the tables are created, e.g. ``meta`` for a model that
            DistributedModelParallel materialises shard by shard; the dense projection stays on the
            default device.

    Shapes: ``dense [B, n_dense]``, ``sparse`` KJT with the schema's sparse keys ``-> [B, F, D]``,
    ``F = n_sparse (+ n_dense if projected)``.

    Example::

        embedding = FieldEmbedding(schema, embedding_dim=16)  # Criteo: 13 dense, 26 sparse
        fields = embedding(batch.dense, batch.sparse)  # [B, 39, 16]
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int,
        dense_mode: str = "projected",
        table_prefix: str = "t_",
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if dense_mode not in DENSE_MODES:
            raise ValueError(f"dense_mode must be one of {list(DENSE_MODES)}, got {dense_mode!r}")
        if not schema.sparse:
            raise SchemaError(f"schema {schema.name!r} has no sparse features to embed")
        self.embedding_dim: int = embedding_dim
        self._sparse_names: List[str] = schema.sparse_names
        self._num_dense: int = len(schema.dense) if dense_mode == "projected" else 0
        self.field_names: List[str] = (list(schema.dense) if self._num_dense else []) + self._sparse_names
        self.num_fields: int = len(self.field_names)
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"{table_prefix}{feature.name}",
                    feature_names=[feature.name],
                    num_embeddings=feature.num_embeddings,
                    embedding_dim=embedding_dim,
                    pooling=PoolingType.SUM,
                    init_fn=partial(nn.init.normal_, mean=0.0, std=EMBEDDING_STD),
                )
                for feature in schema.sparse
            ],
            is_weighted=schema.weighted,
            device=device,
        )
        self.dense_weight: Optional[nn.Parameter] = (
            nn.Parameter(torch.empty(self._num_dense, embedding_dim).uniform_(-1.0, 1.0))
            if self._num_dense
            else None
        )

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            dense (torch.Tensor): dense features, shape [B, n_dense] (ignored unless projected).
            sparse (KeyedJaggedTensor): the sparse features, stride B.

        Returns:
            torch.Tensor: field embeddings, shape [B, F, D], in ``field_names`` order.
        """
        if self.dense_weight is not None:
            _check_dense_shape(dense, self._num_dense)
        pooled = self.ebc(sparse).to_dict()
        sparse_fields = torch.stack([pooled[name] for name in self._sparse_names], dim=1)
        if self.dense_weight is None:
            return sparse_fields
        dense_fields = dense.unsqueeze(2) * self.dense_weight  # [B, n_dense, D]
        return torch.cat([dense_fields, sparse_fields], dim=1)

    def flops_per_example(self) -> int:
        """The dense projection's multiplies. Lookups and bag pooling are memory work and count 0."""
        return self._num_dense * self.embedding_dim


@torch.fx.wrap
def _check_dense_shape(dense: torch.Tensor, num_dense: int) -> None:
    """Raises unless ``dense`` is ``[B, num_dense]``. A call fx records without running (``torch.fx.wrap``):
    torchrec's train pipeline traces the model to find its embedding lookups, and a traced tensor's
    shape cannot steer Python control flow."""
    if dense.dim() != 2 or dense.size(1) != num_dense:
        raise SchemaError(f"dense input has shape {list(dense.shape)}, the model expects [B, {num_dense}]")


class FirstOrder(nn.Module):
    r"""
    The first-order (linear, "wide") term of LR, FM, Wide&Deep, DeepFM, xDeepFM and FiBiNet:

    .. math:: y = w_0 + \sum_{f \in sparse} \sum_{i \in bag_f} w_{f,i} + \sum_j x_j u_j

    a :class:`FieldEmbedding` with D = 1 (tables ``w_{feature}``, the same initialisation; its dense
    projection is the linear map over the dense features) summed over fields, plus a global bias
    :math:`w_0` starting at 0: FuxiCTR's ``LR_Layer``.

    Args:
        schema (Schema): the dataset's features.
        dense_mode (str): as for :class:`FieldEmbedding`.
        device (Optional[torch.device]): where the tables are created.

    Shapes: ``dense [B, n_dense]``, ``sparse`` KJT ``-> [B, 1]``.

    Example::

        first_order = FirstOrder(schema)
        y = first_order(batch.dense, batch.sparse)  # [B, 1]
    """

    def __init__(
        self, schema: Schema, dense_mode: str = "projected", device: Optional[torch.device] = None
    ) -> None:
        super().__init__()
        self.weights = FieldEmbedding(schema, 1, dense_mode, table_prefix="w_", device=device)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            dense (torch.Tensor): dense features, shape [B, n_dense].
            sparse (KeyedJaggedTensor): the sparse features, stride B.

        Returns:
            torch.Tensor: shape [B, 1].
        """
        return self.weights(dense, sparse).sum(dim=1) + self.bias

    def flops_per_example(self) -> int:
        # the weights, their sum over F fields, the bias
        return self.weights.flops_per_example() + self.weights.num_fields + 1
