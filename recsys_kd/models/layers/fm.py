"""Second-order factorization-machine interactions: FM, FwFM and FmFM.

All three read field embeddings ``[B, F, D]`` and return the second-order term ``[B, 1]``; first-order
(linear) terms and the global bias are left to the model.
"""

import torch
from torch import nn


class FM(nn.Module):
    r"""
    The second-order term of a `Factorization Machine <https://doi.org/10.1109/ICDM.2010.127>`_
    (Rendle, 2010) on field embeddings:

    .. math:: y = \sum_{i<j} \langle x_i, x_j \rangle
        = \frac{1}{2} \sum_d \Big[ \big(\sum_f x_{fd}\big)^2 - \sum_f x_{fd}^2 \Big]

    ``torchrec.modules.deepfm.FactorizationMachine`` computes a different function: it flattens the
    input to ``[B, F*D]`` and squares the sum over all ``F*D`` scalars, which also multiplies different
    embedding dimensions with each other. Hence this module.

    Args:
        num_fields (int): F, used for the FLOP count only (the module has no parameters).
        embedding_dim (int): D, likewise.

    Shapes: ``[B, F, D] -> [B, 1]``.

    Example::

        fm = FM(num_fields=5, embedding_dim=4)
        y = fm(torch.randn(3, 5, 4))  # [3, 1]
    """

    def __init__(self, num_fields: int, embedding_dim: int) -> None:
        super().__init__()
        self._num_fields = num_fields
        self._embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): field embeddings, shape [B, F, D].

        Returns:
            torch.Tensor: shape [B, 1].
        """
        square_of_sum = x.sum(dim=1).square()  # [B, D]
        sum_of_square = x.square().sum(dim=1)  # [B, D]
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1, keepdim=True)

    def flops_per_example(self) -> int:
        f, d = self._num_fields, self._embedding_dim
        # sum over fields and square; squares and their sum; subtract, sum over d, halve
        return (f * d + d) + (2 * f * d) + (d + d + 1)


class FwFM(nn.Module):
    r"""
    `Field-weighted Factorization Machine <https://arxiv.org/abs/1806.03514>`_: one learnable scalar
    per field pair,

    .. math:: y = \sum_{i<j} r_{ij} \langle x_i, x_j \rangle

    computed as :math:`\sum_i \langle x_i, (R x)_i \rangle` with :math:`R` the strictly upper-triangular
    ``F x F`` matrix of the :math:`r_{ij}`: one ``[F, F] x [F, D]`` product per example instead of a
    gather of ``F(F-1)/2`` pairs. ``r`` starts at 1, so an untrained FwFM is an FM.

    Args:
        num_fields (int): F.
        embedding_dim (int): D.

    Shapes: ``[B, F, D] -> [B, 1]``.

    Example::

        fwfm = FwFM(num_fields=5, embedding_dim=4)
        y = fwfm(torch.randn(3, 5, 4))  # [3, 1]
    """

    def __init__(self, num_fields: int, embedding_dim: int) -> None:
        super().__init__()
        self._num_fields = num_fields
        self._embedding_dim = embedding_dim
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        # r[p] belongs to the pair (rows[p], cols[p]), i < j, in row-major order
        self.r = nn.Parameter(torch.ones(rows.numel()))
        self.register_buffer("_flat_pair_index", rows * num_fields + cols, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): field embeddings, shape [B, F, D].

        Returns:
            torch.Tensor: shape [B, 1].
        """
        f = self._num_fields
        weights = self.r.new_zeros(f * f).scatter(0, self._flat_pair_index, self.r).view(f, f)
        weighted = torch.matmul(weights, x)  # [B, F, D]: sum_{j>i} r_ij x_j
        return (x * weighted).sum(dim=(1, 2)).unsqueeze(1)

    def flops_per_example(self) -> int:
        f, d = self._num_fields, self._embedding_dim
        return 2 * f * f * d + 2 * f * d


class FmFM(nn.Module):
    r"""
    `Field-matrixed Factorization Machine <https://arxiv.org/abs/2102.12994>`_: one learnable
    ``D x D`` matrix per field pair, initialised to the identity (so an untrained FmFM is an FM),

    .. math:: y = \sum_{i<j} (x_i M_{ij}) \cdot x_j

    Args:
        num_fields (int): F.
        embedding_dim (int): D.

    Shapes: ``[B, F, D] -> [B, 1]``.

    Example::

        fmfm = FmFM(num_fields=5, embedding_dim=4)
        y = fmfm(torch.randn(3, 5, 4))  # [3, 1]
    """

    def __init__(self, num_fields: int, embedding_dim: int) -> None:
        super().__init__()
        self._num_fields = num_fields
        self._embedding_dim = embedding_dim
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        # M[p] belongs to the pair (rows[p], cols[p]), i < j, in row-major order
        self.M = nn.Parameter(torch.eye(embedding_dim).repeat(rows.numel(), 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): field embeddings, shape [B, F, D].

        Returns:
            torch.Tensor: shape [B, 1].
        """
        left = torch.einsum("bpd,pde->bpe", x.index_select(1, self._rows), self.M)  # [B, P, D]
        right = x.index_select(1, self._cols)  # [B, P, D]
        return (left * right).sum(dim=(1, 2)).unsqueeze(1)

    def flops_per_example(self) -> int:
        d = self._embedding_dim
        pairs = self._num_fields * (self._num_fields - 1) // 2
        return 2 * pairs * d * d + 2 * pairs * d
