r"""The math of AFM low-rank compression (Yu et al., "Unified Low-rank Compression Framework for
Click-through Rate Prediction", KDD 2024), and the weight-based SVD baseline, on plain tensors.

Atomic Feature Mimicking (AFM) replaces a linear map by the PCA of its OUTPUTS over the training set,
not by a low-rank approximation of its weight. For an output :math:`y \in R^m` with mean :math:`\mu`
and covariance :math:`C = E[y y^T] - \mu \mu^T = U S U^T` (eigenvalues descending), keeping the top
:math:`k` eigenvectors :math:`U_k` gives the PCA reconstruction

.. math:: \hat y = U_k U_k^T (y - \mu) + \mu

which the transforms below realise exactly with smaller layers:

- MLP layer :math:`y = W x + b` -> ``Linear(n, k)`` with :math:`(U_k^T W, U_k^T b)` then
  ``Linear(k, m)`` with :math:`(U_k, (I - U_k U_k^T) \mu)` (:func:`afm_linear`). Exactly
  :math:`\hat y` when nothing sits between the two; the paper then inserts a ReLU between them
  (``relu_between=True``) and fine-tunes.
- Embedding table :math:`E \in R^{V \times d}` of one field -> :math:`E' \in R^{V \times k}` plus an
  up-projection ``Linear(k, d)`` (:func:`afm_embedding`), in one of two equivalent-for-one-id forms:

  * ``centered=True`` (the reference code): :math:`E' = (E - 1 \mu^T) U_k`, up-projection
    :math:`(U_k, \mu)`;
  * ``centered=False`` (the paper's equations 10-11): :math:`E' = E U_k`, up-projection
    :math:`(U_k, (I - U_k U_k^T) \mu)`.

  For a bag of exactly one id both give :math:`\hat e`. Sum pooling over a bag of :math:`n` ids
  separates them: the uncentered form gives :math:`\hat y` of the pooled embedding :math:`y` for every
  :math:`n` (including the empty bag, :math:`y = 0`), the centered one gives
  :math:`U_k U_k^T (y - n \mu) + \mu`, which is not :math:`\hat y` unless :math:`n = 1`.
- Fusion into the first MLP layer (:func:`fuse_into_first_linear`): with the MLP reading the
  concatenated fields, :math:`W'_f = W_f U_f` per field and :math:`b' = b + \sum_f W_f c_f`, with
  :math:`c_f` the up-projection's bias.

The statistics (:class:`LayerStatistics`) are sums: :math:`\sum y`, :math:`\sum y y^T` and the count
:math:`n`, in float64, so that shards of the data (ranks) accumulate their own and an ``all_reduce``
(SUM, exact for float64 on gloo) combines them; :math:`C = S / n - \mu \mu^T`.

Every embedding transform works on row blocks (a row-wise or table-wise shard projects only its own
rows: :func:`afm_embedding_rows`) and has a column-partial form for column-wise shards
(:func:`afm_embedding_columns`: the full result is the sum of the partials over the column blocks).

Everything computes in float64 and returns tensors in the dtype of the weight it transforms.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from recsys_kd.distributed import all_reduce
from recsys_kd.models.low_rank import factored_linear

_F64 = torch.float64


# ---------------------------------------------------------------- statistics


class LayerStatistics:
    r"""
    Streaming first and second moments of a layer output: :math:`\sum y`, :math:`\sum y y^T`, :math:`n`
    (float64), optionally for ``groups`` outputs at once (the F field embeddings of one example: each
    example contributes one vector to every group, so the count is shared).

    Args:
        dim (int): the output width n (D for a field embedding).
        groups (Optional[int]): None for one output ``[B, n]``; G for G outputs ``[B, G, n]``.
        device (Optional[torch.device]): where the sums live.

    The sums are the tensors of :meth:`tensors` (``sum`` ``[(G,) n]``, ``outer`` ``[(G,) n, n]``,
    ``count`` ``[]``): ``recsys_kd.distributed.all_reduce`` each (SUM), in place, to combine ranks (or call
    :meth:`all_reduce`).

    Example::

        stats = LayerStatistics(400)
        for x in batches:
            stats.update(layer(x))  # [B, 400]
        cov, mu = stats.covariance(), stats.mean()
    """

    def __init__(self, dim: int, groups: Optional[int] = None, device: Optional[torch.device] = None) -> None:
        if dim < 1 or (groups is not None and groups < 1):
            raise ValueError(f"dim and groups must be >= 1, got dim={dim}, groups={groups}")
        self.dim = dim
        self.groups = groups
        lead = () if groups is None else (groups,)
        self.sum = torch.zeros(*lead, dim, dtype=_F64, device=device)
        self.outer = torch.zeros(*lead, dim, dim, dtype=_F64, device=device)
        self.count = torch.zeros((), dtype=_F64, device=device)

    def update(self, y: torch.Tensor) -> None:
        """Adds a batch: ``y`` is ``[B, n]`` (or ``[B, G, n]`` with groups; leading dims are flattened
        into B)."""
        y = y.detach()
        if self.groups is None:
            y = y.reshape(-1, self.dim).to(device=self.sum.device, dtype=_F64)
            self.sum += y.sum(dim=0)
            self.outer.addmm_(y.t(), y)
        else:
            y = y.reshape(-1, self.groups, self.dim).to(device=self.sum.device, dtype=_F64)
            self.sum += y.sum(dim=0)
            grouped = y.transpose(0, 1)  # [G, B, n]
            self.outer.baddbmm_(grouped.transpose(1, 2), grouped)
        self.count += y.shape[0]

    def merge(self, other: "LayerStatistics") -> "LayerStatistics":
        """Adds another accumulator's sums (same shape) into this one; returns self."""
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"cannot merge statistics of shape {list(other.sum.shape)} into {list(self.sum.shape)}")
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.sum.device)
        self.count += other.count.to(self.sum.device)
        return self

    def tensors(self) -> List[torch.Tensor]:
        """The accumulators themselves, ``[sum, outer, count]``: reduce them in place (SUM)."""
        return [self.sum, self.outer, self.count]

    def all_reduce(self, group: Optional[object] = None) -> "LayerStatistics":
        """Sums the accumulators over the ranks of ``group`` (float64 SUM, exact on gloo); returns self."""
        for tensor in self.tensors():
            all_reduce(tensor, group=group)
        return self

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"sum": self.sum.clone(), "outer": self.outer.clone(), "count": self.count.clone()}

    @classmethod
    def from_state_dict(cls, state: Dict[str, torch.Tensor]) -> "LayerStatistics":
        total = state["sum"]
        stats = cls(total.shape[-1], total.shape[0] if total.dim() == 2 else None, device=total.device)
        stats.sum.copy_(total)
        stats.outer.copy_(state["outer"])
        stats.count.copy_(state["count"])
        return stats

    def group(self, index: int) -> "LayerStatistics":
        """Group ``index`` as an ungrouped accumulator whose tensors are views of this one's (a later
        in-place reduce of this object shows in it)."""
        if self.groups is None:
            raise ValueError("these statistics have no groups")
        view = LayerStatistics.__new__(LayerStatistics)
        view.dim, view.groups = self.dim, None
        view.sum, view.outer, view.count = self.sum[index], self.outer[index], self.count
        return view

    @property
    def n(self) -> int:
        return int(self.count.item())

    def mean(self) -> torch.Tensor:
        """:math:`\\mu = \\sum y / n`, float64 ``[(G,) n]``."""
        if self.count.item() == 0:
            raise ValueError("no samples accumulated")
        return self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """:math:`C = \\sum y y^T / n - \\mu \\mu^T` (the population covariance, as the reference code),
        symmetrised, float64 ``[(G,) n, n]``."""
        mu = self.mean()
        cov = self.outer / self.count - mu.unsqueeze(-1) * mu.unsqueeze(-2)
        return 0.5 * (cov + cov.transpose(-1, -2))


# ---------------------------------------------------------------- PCA and the rank


def pca(cov: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Eigendecomposition of a symmetric covariance (batched over leading dims).

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: eigenvalues in descending order ``[(G,) n]`` and the
        eigenvectors as the matching columns ``[(G,) n, n]``, float64. Each eigenvector's sign is fixed
        (its largest-magnitude entry positive) so that equal statistics give equal factors everywhere.
    """
    values, vectors = torch.linalg.eigh(cov.to(_F64))
    values, vectors = values.flip(-1), vectors.flip(-1)
    pivot = vectors.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(vectors, -2, pivot))
    signs[signs == 0] = 1.0
    return values, vectors * signs


def explained_variance_ratio(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Each component's share of the total variance (negative round-off clamped to 0); all zero when
    the output is constant."""
    values = eigenvalues.to(_F64).clamp(min=0)
    total = values.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, values / total.clamp(min=torch.finfo(_F64).tiny), torch.zeros_like(values))


def choose_rank(eigenvalues: torch.Tensor, k: Optional[int] = None, variance_share: Optional[float] = None) -> int:
    """
    The rank to keep: ``k`` as given (checked against the width), or the smallest k whose top-k
    components explain at least ``variance_share`` of the variance. Exactly one of the two.

    Args:
        eigenvalues (torch.Tensor): descending, ``[n]``.
        k (Optional[int]): 1 <= k <= n.
        variance_share (Optional[float]): in (0, 1].

    Returns:
        int: k (1 for a constant output and any share).
    """
    n = eigenvalues.shape[-1]
    if (k is None) == (variance_share is None):
        raise ValueError("give exactly one of k and variance_share")
    if k is not None:
        if not 1 <= int(k) <= n:
            raise ValueError(f"rank k must be in [1, {n}], got {k}")
        return int(k)
    assert variance_share is not None
    if not 0.0 < variance_share <= 1.0:
        raise ValueError(f"variance_share must be in (0, 1], got {variance_share}")
    ratio = explained_variance_ratio(eigenvalues)
    if float(ratio.sum()) == 0.0:
        return 1
    cumulative = ratio.cumsum(dim=-1)
    reached = (cumulative >= variance_share - 1e-12).nonzero()
    return int(reached[0].item()) + 1 if reached.numel() else n


def spectrum_report(
    eigenvalues: torch.Tensor, shares: Sequence[float] = (0.5, 0.9, 0.95, 0.99, 0.999)
) -> Dict[str, object]:
    """
    A JSON-able summary of a spectrum (of the covariance for AFM, of the squared singular values for
    SVD): width, total variance, explained variance ratio and its cumulative sum per component, and
    the rank that reaches each of ``shares``.
    """
    ratio = explained_variance_ratio(eigenvalues)
    return {
        "dim": int(eigenvalues.shape[-1]),
        "total_variance": float(eigenvalues.to(_F64).clamp(min=0).sum()),
        "explained_variance_ratio": [float(v) for v in ratio],
        "cumulative": [float(v) for v in ratio.cumsum(dim=-1)],
        "rank_for_share": {str(s): choose_rank(eigenvalues, variance_share=s) for s in shares},
    }


# ---------------------------------------------------------------- MLP layers


def _check_basis(u_k: torch.Tensor, width: int, what: str) -> None:
    if u_k.dim() != 2 or u_k.shape[0] != width or not 1 <= u_k.shape[1] <= width:
        raise ValueError(f"{what}: U_k must be [{width}, k] with 1 <= k <= {width}, got {list(u_k.shape)}")


def afm_linear_factors(
    weight: torch.Tensor, bias: Optional[torch.Tensor], u_k: torch.Tensor, mu: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    AFM factors of a layer :math:`y = W x + b` (W ``[m, n]``): ``(W1, b1, W2, b2)`` =
    :math:`(U_k^T W, U_k^T b, U_k, (I - U_k U_k^T) \mu)`, so that :math:`W_2 (W_1 x + b_1) + b_2 =
    U_k U_k^T (y - \mu) + \mu`. Shapes ``[k, n], [k], [m, k], [m]``, in W's dtype.
    """
    m = weight.shape[0]
    _check_basis(u_k, m, "afm_linear")
    w, u, mean = weight.to(_F64), u_k.to(_F64), mu.to(_F64).reshape(m)
    b = bias.to(_F64) if bias is not None else torch.zeros(m, dtype=_F64, device=weight.device)
    w1, b1 = u.t() @ w, u.t() @ b
    b2 = mean - u @ (u.t() @ mean)
    return tuple(t.to(weight.dtype) for t in (w1, b1, u, b2))  # type: ignore[return-value]


def svd_linear_factors(
    weight: torch.Tensor, bias: Optional[torch.Tensor], k: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    The weight-based baseline in the same two-layer structure: :math:`W = U S V^T \approx (U_k
    S_k^{1/2})(S_k^{1/2} V_k^T)`; ``(W1, b1, W2, b2)`` = :math:`(S_k^{1/2} V_k^T, 0, U_k S_k^{1/2}, b)`.
    Exact at k = min(m, n).
    """
    m, n = weight.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"svd_linear: k must be in [1, {min(m, n)}], got {k}")
    u, s, vh = torch.linalg.svd(weight.to(_F64), full_matrices=False)
    root = s[:k].sqrt()
    w1 = root.unsqueeze(1) * vh[:k]
    w2 = u[:, :k] * root
    b1 = torch.zeros(k, dtype=_F64, device=weight.device)
    b2 = bias.to(_F64) if bias is not None else torch.zeros(m, dtype=_F64, device=weight.device)
    return tuple(t.to(weight.dtype) for t in (w1, b1, w2, b2))  # type: ignore[return-value]


def singular_value_spectrum(weight: torch.Tensor) -> torch.Tensor:
    """Squared singular values of W, descending (the SVD baseline's "variance" for rank choice)."""
    return torch.linalg.svdvals(weight.to(_F64)).pow(2)


def two_linear_layers(
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, relu_between: bool
) -> nn.Sequential:
    """``Linear(n, k) [-> ReLU] -> Linear(k, m)`` (:func:`~recsys_kd.models.low_rank.factored_linear`)
    holding the factors ``w1 [k, n], b1 [k], w2 [m, k], b2 [m]``."""
    k, n = w1.shape
    layers = factored_linear(n, k, w2.shape[0], relu_between, device=w1.device, dtype=w1.dtype)
    first, second = layers[0], layers[len(layers) - 1]
    with torch.no_grad():
        first.weight.copy_(w1)
        first.bias.copy_(b1)
        second.weight.copy_(w2)
        second.bias.copy_(b2)
    return layers


def afm_linear(
    weight: torch.Tensor, bias: Optional[torch.Tensor], u_k: torch.Tensor, mu: torch.Tensor, relu_between: bool
) -> nn.Sequential:
    """The AFM replacement of ``Linear(n, m)``: ``Linear(n, k) [-> ReLU] -> Linear(k, m)`` from
    :func:`afm_linear_factors`; without the ReLU it computes the PCA reconstruction of the output."""
    return two_linear_layers(*afm_linear_factors(weight, bias, u_k, mu), relu_between=relu_between)


def svd_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], k: int, relu_between: bool) -> nn.Sequential:
    """The SVD replacement of ``Linear(n, m)`` in the same structure (:func:`svd_linear_factors`)."""
    return two_linear_layers(*svd_linear_factors(weight, bias, k), relu_between=relu_between)


# ---------------------------------------------------------------- embedding tables


def afm_up_bias(u_k: torch.Tensor, mu: torch.Tensor, centered: bool = True) -> torch.Tensor:
    r"""The up-projection's bias: :math:`\mu` (centered tables) or :math:`(I - U_k U_k^T) \mu`."""
    u, mean = u_k.to(_F64), mu.to(_F64)
    return mean if centered else mean - u @ (u.t() @ mean)


def afm_embedding_rows(
    rows: torch.Tensor, u_k: torch.Tensor, mu: torch.Tensor, centered: bool = True
) -> torch.Tensor:
    r"""The compressed rows of any row block of a table: :math:`(E_{rows} - 1 \mu^T) U_k` (centered) or
    :math:`E_{rows} U_k`; ``[r, d] -> [r, k]`` in the rows' dtype."""
    _check_basis(u_k, rows.shape[1], "afm_embedding_rows")
    e = rows.to(_F64)
    if centered:
        e = e - mu.to(_F64)
    return (e @ u_k.to(_F64)).to(rows.dtype)


def afm_embedding_columns(
    columns: torch.Tensor, u_k_rows: torch.Tensor, mu_columns: torch.Tensor, centered: bool = True
) -> torch.Tensor:
    r"""
    One column block's partial of the compressed table, for column-wise shards: with the table's
    columns ``c`` (``E[:, c]`` ``[V, |c|]``), the matching rows of the basis ``U_k[c, :]`` and of the mean
    ``mu[c]``, returns :math:`(E_{:,c} - 1 \mu_c^T) U_{k,c}` (centered) or :math:`E_{:,c} U_{k,c}`,
    ``[V, k]``. Summed over a partition of the columns it is :func:`afm_embedding_rows` of the table.
    Returned in float64 so that the sum over column blocks rounds once.
    """
    if u_k_rows.shape[0] != columns.shape[1] or mu_columns.shape[-1] != columns.shape[1]:
        raise ValueError(
            f"afm_embedding_columns: {columns.shape[1]} columns but U_k rows {list(u_k_rows.shape)}, "
            f"mu {list(mu_columns.shape)}"
        )
    e = columns.to(_F64)
    if centered:
        e = e - mu_columns.to(_F64)
    return e @ u_k_rows.to(_F64)


def afm_embedding(
    table: torch.Tensor, u_k: torch.Tensor, mu: torch.Tensor, centered: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    AFM of one field's table :math:`E` ``[V, d]`` from the statistics of that field's (pooled)
    embedding: ``(E' [V, k], up weight U_k [d, k], up bias [d])`` with the up-projection
    ``Linear(k, d)``. ``centered=True`` is the reference code's form (:math:`E' = (E - \mu^T) U_k`, bias
    :math:`\mu`), exact PCA reconstruction for bags of exactly one id; ``centered=False`` is the paper's
    (:math:`E' = E U_k`, bias :math:`(I - U_k U_k^T) \mu`), exact for sum-pooled bags of any size.
    """
    compressed = afm_embedding_rows(table, u_k, mu, centered)
    return compressed, u_k.to(table.dtype), afm_up_bias(u_k, mu, centered).to(table.dtype)


def embedding_gram(rows: torch.Tensor) -> torch.Tensor:
    """:math:`E^T E` (float64 ``[d, d]``) of a row block; sums over row blocks (row-wise shards) to the
    whole table's, from which :func:`svd_embedding` takes its basis."""
    e = rows.to(_F64)
    return e.t() @ e


def svd_embedding(
    table: torch.Tensor, k: int, gram: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    The SVD baseline of a table in the AFM structure: :math:`E = U S V^T \approx (U_k S_k) V_k^T`;
    returns ``(E' = E V_k = U_k S_k [V, k], up weight V_k [d, k], up bias 0 [d])``. ``V_k`` are the top
    eigenvectors of :math:`E^T E` (``gram``, computed from ``table`` when not given: a sharded caller
    sums :func:`embedding_gram` over its row blocks), so no V x V factor is ever formed. Exact at k = d.
    Unlike AFM every row weighs the same, however often it is looked up, and nothing is centred.
    """
    d = table.shape[1]
    if not 1 <= k <= d:
        raise ValueError(f"svd_embedding: k must be in [1, {d}], got {k}")
    _, vectors = pca(embedding_gram(table) if gram is None else gram)
    v_k = vectors[:, :k]
    compressed = (table.to(_F64) @ v_k).to(table.dtype)
    return compressed, v_k.to(table.dtype), torch.zeros(d, dtype=table.dtype, device=table.device)


def fuse_into_first_linear(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    up_weights: Sequence[Optional[torch.Tensor]],
    up_biases: Sequence[Optional[torch.Tensor]],
    field_dims: Optional[Sequence[int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""
    Folds per-field up-projections :math:`e_f = U_f e'_f + c_f` into the first layer of an MLP that
    reads the concatenated fields :math:`[e_1, \dots, e_F]`: :math:`W'_f = W_f U_f`,
    :math:`b' = b + \sum_f W_f c_f`.

    Args:
        weight (torch.Tensor): ``[o, sum(field_dims)]``, column block f reading field f.
        bias (Optional[torch.Tensor]): ``[o]``.
        up_weights (Sequence[Optional[torch.Tensor]]): per field ``U_f [d_f, k_f]``; None for a field
            kept as it is (its block is copied).
        up_biases (Sequence[Optional[torch.Tensor]]): per field ``c_f [d_f]`` (None = 0).
        field_dims (Optional[Sequence[int]]): the fields' widths in ``weight``'s input; equal widths
            when None.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: ``W' [o, sum of (k_f, or d_f for kept fields)]`` and
        ``b' [o]``, in W's dtype.
    """
    num_fields = len(up_weights)
    if len(up_biases) != num_fields:
        raise ValueError(f"{num_fields} up-projection weights but {len(up_biases)} biases")
    if field_dims is None:
        if weight.shape[1] % num_fields:
            raise ValueError(f"{weight.shape[1]} input columns do not split into {num_fields} equal fields")
        field_dims = [weight.shape[1] // num_fields] * num_fields
    if sum(field_dims) != weight.shape[1] or len(field_dims) != num_fields:
        raise ValueError(f"field widths {list(field_dims)} do not cover the {weight.shape[1]} input columns")
    w = weight.to(_F64)
    b = bias.to(_F64) if bias is not None else torch.zeros(w.shape[0], dtype=_F64, device=w.device)
    blocks = []
    offset = 0
    for dim, up, up_bias in zip(field_dims, up_weights, up_biases):
        block = w[:, offset : offset + dim]
        offset += dim
        if up is None:
            blocks.append(block)
        else:
            if up.shape[0] != dim:
                raise ValueError(f"an up-projection of shape {list(up.shape)} for a field of width {dim}")
            blocks.append(block @ up.to(_F64))
        if up_bias is not None:
            b = b + block @ up_bias.to(_F64)
    return torch.cat(blocks, dim=1).to(weight.dtype), b.to(weight.dtype)
