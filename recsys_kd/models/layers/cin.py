"""Compressed Interaction Network (CIN) of xDeepFM."""

from typing import List, Sequence

import torch
from torch import nn


class CIN(nn.Module):
    r"""
    `xDeepFM <https://arxiv.org/abs/1803.05170>`_'s Compressed Interaction Network. With
    :math:`X^0 = x` (``[F, D]`` per example), hidden layer k has :math:`H_k` feature maps

    .. math:: X^k_{h,*} = \sum_{i=1}^{H_{k-1}} \sum_{j=1}^{F} W^{k,h}_{ij}
        \, (X^{k-1}_{i,*} \odot X^0_{j,*})

    (no bias, no activation, as in the paper). Each layer's output maps are sum-pooled over D and
    concatenated. With ``split_half`` (the paper's option), every layer but the last sends its first
    :math:`H_k/2` maps to the next layer and its other :math:`H_k/2` maps to the output; otherwise every
    map goes to both (as the KD-DAGFM reference CIN teacher does).

    Args:
        num_fields (int): F.
        embedding_dim (int): D.
        layer_sizes (Sequence[int]): :math:`H_1, \dots, H_L`, e.g. ``(200, 200, 200)``; with
            ``split_half`` all but the last must be even.
        split_half (bool): see above.

    Shapes: ``[B, F, D] -> [B, output_dim]``, ``output_dim`` = :math:`\sum_k H_k`, or
    :math:`\sum_{k<L} H_k/2 + H_L` with ``split_half``.

    Example::

        cin = CIN(num_fields=5, embedding_dim=4, layer_sizes=(8, 8), split_half=True)
        y = cin(torch.randn(3, 5, 4))  # [3, 12]
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        layer_sizes: Sequence[int] = (200, 200, 200),
        split_half: bool = False,
    ) -> None:
        super().__init__()
        if split_half and any(h % 2 for h in layer_sizes[:-1]):
            raise ValueError(f"split_half needs even layer sizes but the last, got {list(layer_sizes)}")
        self._num_fields = num_fields
        self._embedding_dim = embedding_dim
        self._layer_sizes: List[int] = list(layer_sizes)
        last = len(layer_sizes) - 1
        # with split_half, maps [0, H_k/2) go on to the next layer and [H_k/2, H_k) to the output
        halves = [split_half and k < last for k in range(len(layer_sizes))]
        self._next_sizes: List[int] = [h // 2 if half else h for h, half in zip(layer_sizes, halves)]
        self._output_starts: List[int] = [h // 2 if half else 0 for h, half in zip(layer_sizes, halves)]
        self.output_dim: int = sum(h - s for h, s in zip(layer_sizes, self._output_starts))
        in_maps = [num_fields] + self._next_sizes[:-1]
        # a kernel-size-1 convolution over D is the per-position sum over (i, j) with weights
        # W^{k,h}_{ij} at channel i * F + j; it also gives the reference code's initialisation
        self.convs = nn.ModuleList(
            nn.Conv1d(h_in * num_fields, h, kernel_size=1, bias=False)
            for h_in, h in zip(in_maps, layer_sizes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): field embeddings, shape [B, F, D].

        Returns:
            torch.Tensor: shape [B, output_dim].
        """
        batch_size, _, dim = x.shape
        hidden = x
        pooled: List[torch.Tensor] = []
        for k, conv in enumerate(self.convs):
            products = (hidden.unsqueeze(2) * x.unsqueeze(1)).reshape(batch_size, -1, dim)  # [B, H*F, D]
            maps = conv(products)  # [B, H_k, D]
            pooled.append(maps[:, self._output_starts[k] :].sum(dim=2))
            hidden = maps[:, : self._next_sizes[k]]
        return torch.cat(pooled, dim=1)

    def flops_per_example(self) -> int:
        f, d = self._num_fields, self._embedding_dim
        total = 0
        h_in = f
        for h, n, start in zip(self._layer_sizes, self._next_sizes, self._output_starts):
            total += h_in * f * d  # outer products
            total += 2 * h * h_in * f * d  # compression
            total += (h - start) * d  # sum pooling
            h_in = n
        return total
