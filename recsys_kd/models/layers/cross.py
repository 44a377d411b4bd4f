"""Cross networks of DCN and DCNv2 on the flat input ``[B, N]`` (N = F*D), built on torchrec's modules.

Each class subclasses its torchrec counterpart in ``torchrec.modules.crossnet`` and keeps its parameters
(names, shapes, initialisation), so state dicts are interchangeable with torchrec's. Only ``forward`` is
rewritten, computing the same function: torchrec's forwards index a ``ParameterList`` with a loop
variable, which ``torch.jit.script`` rejects, and the serving artifact is scripted.

Name map: our ``CrossNet`` is DCN v1 (torchrec's ``VectorCrossNet``); our ``CrossNetV2`` is the
full-matrix DCNv2 cross network (torchrec's ``CrossNet``, the KD-DAGFM "CrossNet" teacher).
"""

from typing import Callable, List, Union

import torch
import torch.nn.functional as F
from torchrec.modules import crossnet as trc


class CrossNet(trc.VectorCrossNet):
    r"""
    `DCN <https://arxiv.org/abs/1708.05123>`_ (v1) cross network, on each layer

    .. math:: x_{l+1} = x_0 \, (x_l \cdot w_l) + b_l + x_l

    with a vector :math:`w_l \in R^N`; torchrec's ``VectorCrossNet``.

    Args:
        in_features (int): N.
        num_layers (int): number of cross layers.

    Shapes: ``[B, N] -> [B, N]``.

    Example::

        dcn = CrossNet(in_features=20, num_layers=3)
        y = dcn(torch.randn(3, 20))  # [3, 20]
    """

    def __init__(self, in_features: int, num_layers: int) -> None:
        super().__init__(in_features, num_layers)
        self._in_features = in_features

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input (torch.Tensor): shape [B, N].

        Returns:
            torch.Tensor: shape [B, N].
        """
        x_0 = input
        x_l = input
        for w, b in zip(self.kernels, self.bias):
            x_l = x_0 * torch.matmul(x_l, w) + b.squeeze(1) + x_l  # w: [N, 1], b: [N, 1]
        return x_l

    def flops_per_example(self) -> int:
        n = self._in_features
        # dot product, scale x_0, add bias, add x_l
        return self._num_layers * (2 * n + 3 * n)


class CrossNetV2(trc.CrossNet):
    r"""
    `DCNv2 <https://arxiv.org/abs/2008.13535>`_ cross network with full-rank ``N x N`` matrices,

    .. math:: x_{l+1} = x_0 \odot (W_l x_l + b_l) + x_l

    torchrec's ``CrossNet``; the "CrossNet" teacher of KD-DAGFM.

    Args:
        in_features (int): N.
        num_layers (int): number of cross layers.

    Shapes: ``[B, N] -> [B, N]``.

    Example::

        dcn = CrossNetV2(in_features=20, num_layers=3)
        y = dcn(torch.randn(3, 20))  # [3, 20]
    """

    def __init__(self, in_features: int, num_layers: int) -> None:
        super().__init__(in_features, num_layers)
        self._in_features = in_features

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input (torch.Tensor): shape [B, N].

        Returns:
            torch.Tensor: shape [B, N].
        """
        x_0 = input
        x_l = input
        for w, b in zip(self.kernels, self.bias):
            # F.linear computes x_l W^T, i.e. (W x_l) per row, with the bias fused in
            x_l = x_0 * F.linear(x_l, w, b.squeeze(1)) + x_l
        return x_l

    def flops_per_example(self) -> int:
        n = self._in_features
        return self._num_layers * (2 * n * n + 3 * n)


class LowRankCrossNet(trc.LowRankCrossNet):
    r"""
    DCNv2 cross network with low-rank matrices :math:`W_l = U_l V_l^T` (rank r):

    .. math:: x_{l+1} = x_0 \odot (U_l (V_l^T x_l) + b_l) + x_l

    torchrec's ``LowRankCrossNet`` (its ``W_kernels`` are U, ``[N, r]``; ``V_kernels`` are V^T,
    ``[r, N]``).

    Args:
        in_features (int): N.
        num_layers (int): number of cross layers.
        low_rank (int): r >= 1.

    Shapes: ``[B, N] -> [B, N]``.

    Example::

        dcn = LowRankCrossNet(in_features=20, num_layers=3, low_rank=4)
        y = dcn(torch.randn(3, 20))  # [3, 20]
    """

    def __init__(self, in_features: int, num_layers: int, low_rank: int = 1) -> None:
        super().__init__(in_features, num_layers, low_rank)
        self._in_features = in_features

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input (torch.Tensor): shape [B, N].

        Returns:
            torch.Tensor: shape [B, N].
        """
        x_0 = input
        x_l = input
        for u, v, b in zip(self.W_kernels, self.V_kernels, self.bias):
            x_l = x_0 * F.linear(F.linear(x_l, v), u, b) + x_l
        return x_l

    def flops_per_example(self) -> int:
        n, r = self._in_features, self._low_rank
        return self._num_layers * (4 * r * n + 3 * n)


class LowRankMixtureCrossNet(trc.LowRankMixtureCrossNet):
    r"""
    DCNv2 mixture of K low-rank experts (DCN-Mix, DCNv2 paper section 5), on each layer

    .. math::
        E_i(x_l) = x_0 \odot (U_{li} \, g(C_{li} \, g(V_{li}^T x_l)) + b_l), \qquad
        x_{l+1} = \sum_{i=1}^K \mathrm{softmax}_i(G_i^T x_l) \, E_i(x_l) + x_l

    with gates :math:`G_i \in R^N` (no gating when K = 1) and activation g; torchrec's
    ``LowRankMixtureCrossNet``. The experts are evaluated together as batched products rather than
    one after another.

    Args:
        in_features (int): N.
        num_layers (int): number of cross layers.
        num_experts (int): K >= 1.
        low_rank (int): r >= 1.
        activation (Union[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]): g, default ReLU;
            counted as 1 FLOP per element.

    Shapes: ``[B, N] -> [B, N]``.

    Example::

        dcn = LowRankMixtureCrossNet(in_features=20, num_layers=2, num_experts=4, low_rank=3)
        y = dcn(torch.randn(3, 20))  # [3, 20]
    """

    def __init__(
        self,
        in_features: int,
        num_layers: int,
        num_experts: int = 1,
        low_rank: int = 1,
        activation: Union[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]] = torch.relu,
    ) -> None:
        super().__init__(in_features, num_layers, num_experts, low_rank, activation)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input (torch.Tensor): shape [B, N].

        Returns:
            torch.Tensor: shape [B, N].
        """
        x_0 = input
        x_l = input
        x_0_experts = x_0.unsqueeze(1)  # [B, 1, N]
        for u, c, v, b in zip(self.U_kernels, self.C_kernels, self.V_kernels, self.bias):
            # u: [K, N, r], c: [K, r, r], v: [K, r, N], b: [N, 1]
            e = self._activation(torch.einsum("krn,bn->bkr", v, x_l))
            e = self._activation(torch.einsum("kst,bkt->bks", c, e))
            e = torch.einsum("knr,bkr->bkn", u, e)
            experts = x_0_experts * (e + b.squeeze(1))  # [B, K, N]
            if self.gates is not None:
                gate_logits: List[torch.Tensor] = []
                for gate in self.gates:
                    gate_logits.append(gate(x_l))
                gating = torch.softmax(torch.cat(gate_logits, dim=1), dim=1)  # [B, K]
                x_l = torch.einsum("bkn,bk->bn", experts, gating) + x_l
            else:
                x_l = experts.squeeze(1) + x_l
        return x_l

    def flops_per_example(self) -> int:
        n, k, r = self._in_features, self._num_experts, self._low_rank
        # V, g, C, g, U, add bias, scale by x_0
        experts = k * (2 * r * n + r + 2 * r * r + r + 2 * r * n + n + n)
        # K gate dot products, softmax (exp, sum, divide), weighted sum of experts
        mixture = k * 2 * n + 3 * k + 2 * k * n if k > 1 else 0
        return self._num_layers * (experts + mixture + n)
