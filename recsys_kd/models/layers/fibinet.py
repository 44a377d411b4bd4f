"""FiBiNet's SENET field re-weighting and bilinear interaction."""

import torch
from torch import nn


class SENETLayer(nn.Module):
    r"""
    The Squeeze-Excitation network of `FiBiNet <https://arxiv.org/abs/1905.09433>`_: per example,

    .. math:: z_f = \mathrm{mean}_d(x_{f,d}), \quad
        A = \sigma_2(W_2 \, \sigma_1(W_1 z)), \quad v_f = a_f \, x_f

    with :math:`W_1 \in R^{F/r \times F}`, :math:`W_2 \in R^{F \times F/r}` (no bias) for reduction ratio
    r (at least one hidden unit) and :math:`\sigma_1 = \sigma_2 = \mathrm{ReLU}` as in the paper's code
    (DeepCTR, FuxiCTR default).

    Args:
        num_fields (int): F.
        embedding_dim (int): D, used for the FLOP count only.
        reduction_ratio (int): r.

    Shapes: ``[B, F, D] -> [B, F, D]``.

    Example::

        senet = SENETLayer(num_fields=5, embedding_dim=4, reduction_ratio=3)
        v = senet(torch.randn(3, 5, 4))  # [3, 5, 4]
    """

    def __init__(self, num_fields: int, embedding_dim: int, reduction_ratio: int = 3) -> None:
        super().__init__()
        self._num_fields = num_fields
        self._embedding_dim = embedding_dim
        self._reduced = max(1, num_fields // reduction_ratio)
        self.excitation = nn.Sequential(
            nn.Linear(num_fields, self._reduced, bias=False),
            nn.ReLU(),
            nn.Linear(self._reduced, num_fields, bias=False),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): field embeddings, shape [B, F, D].

        Returns:
            torch.Tensor: re-weighted field embeddings, shape [B, F, D].
        """
        weights = self.excitation(x.mean(dim=2))  # [B, F]
        return x * weights.unsqueeze(2)

    def flops_per_example(self) -> int:
        f, d, r = self._num_fields, self._embedding_dim, self._reduced
        # mean (sum and divide), W_1 and ReLU, W_2 and ReLU, re-weighting
        return (f * d + f) + (2 * f * r + r) + (2 * r * f + f) + f * d


class BilinearInteraction(nn.Module):
    r"""
    FiBiNet's bilinear interaction: for every field pair i < j (row-major order),

    .. math:: p_{ij} = (v_i W) \odot v_j

    with one ``D x D`` matrix W shared by all pairs (``"field_all"``), one per left field i
    (``"field_each"``; F - 1 of them, the last field is never on the left) or one per pair
    (``"field_interaction"``). Each W starts Xavier-normal, std :math:`1/\sqrt{D}`.

    Args:
        num_fields (int): F.
        embedding_dim (int): D.
        bilinear_type (str): ``"field_all"``, ``"field_each"`` or ``"field_interaction"``.

    Shapes: ``[B, F, D] -> [B, F(F-1)/2, D]``.

    Example::

        bilinear = BilinearInteraction(num_fields=5, embedding_dim=4, bilinear_type="field_each")
        p = bilinear(torch.randn(3, 5, 4))  # [3, 10, 4]
    """

    def __init__(
        self, num_fields: int, embedding_dim: int, bilinear_type: str = "field_interaction"
    ) -> None:
        super().__init__()
        num_pairs = num_fields * (num_fields - 1) // 2
        shapes = {
            "field_all": (embedding_dim, embedding_dim),
            "field_each": (num_fields - 1, embedding_dim, embedding_dim),
            "field_interaction": (num_pairs, embedding_dim, embedding_dim),
        }
        if bilinear_type not in shapes:
            raise ValueError(f"bilinear_type must be one of {sorted(shapes)}, got {bilinear_type!r}")
        self._num_fields = num_fields
        self._embedding_dim = embedding_dim
        self._bilinear_type = bilinear_type
        self.num_pairs: int = num_pairs
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        # Xavier-normal per D x D matrix; xavier_normal_ on the stacked 3-d tensor would use the
        # wrong fans
        self.weight = nn.Parameter(torch.randn(shapes[bilinear_type]) / embedding_dim**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): field embeddings, shape [B, F, D].

        Returns:
            torch.Tensor: shape [B, F(F-1)/2, D].
        """
        if self._bilinear_type == "field_interaction":
            left = torch.einsum("bpd,pde->bpe", x.index_select(1, self._rows), self.weight)
        else:
            # transform each left field once, then gather its copies for the pairs
            heads = x[:, :-1]  # [B, F-1, D]
            if self._bilinear_type == "field_all":
                transformed = torch.matmul(heads, self.weight)
            else:
                transformed = torch.einsum("bfd,fde->bfe", heads, self.weight)
            left = transformed.index_select(1, self._rows)
        return left * x.index_select(1, self._cols)

    def flops_per_example(self) -> int:
        f, d, p = self._num_fields, self._embedding_dim, self.num_pairs
        transformed = p if self._bilinear_type == "field_interaction" else f - 1
        return 2 * transformed * d * d + p * d
