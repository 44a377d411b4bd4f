"""Multi-layer perceptron with optional batch norm and dropout."""

from typing import Dict, List, Sequence, Type

import torch
from torch import nn

_ACTIVATIONS: Dict[str, Type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class MLP(nn.Module):
    r"""
    A stack of ``Linear -> [BatchNorm1d] -> activation -> [Dropout]`` blocks. The last block is a bare
    ``Linear`` when ``activation_on_last`` is False (an output layer, e.g. ``layer_sizes=[400, 400, 1]``).

    ``torchrec.modules.mlp.MLP`` has neither batch norm nor dropout, hence this module. The blocks are
    flat in ``self.layers`` (an ``nn.Sequential``) so that AFM compression can find each ``nn.Linear``
    and replace it by two.

    Args:
        in_features (int): input width.
        layer_sizes (Sequence[int]): output width of each Linear.
        activation (str): ``"relu"``, ``"sigmoid"`` or ``"tanh"``.
        dropout (float): dropout probability after each activation; 0 for none.
        batch_norm (bool): BatchNorm1d between each Linear and its activation.
        activation_on_last (bool): whether the last Linear gets batch norm, activation and dropout too.

    Shapes: ``[B, in_features] -> [B, layer_sizes[-1]]``.

    Example::

        mlp = MLP(in_features=20, layer_sizes=[16, 8, 1], dropout=0.1, activation_on_last=False)
        y = mlp(torch.randn(3, 20))  # [3, 1]
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        activation_on_last: bool = True,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self._in_features = in_features
        self._layer_sizes: List[int] = list(layer_sizes)
        self._batch_norm = batch_norm
        self._activation_on_last = activation_on_last
        self.out_features: int = self._layer_sizes[-1]
        blocks: List[nn.Module] = []
        width = in_features
        for i, size in enumerate(self._layer_sizes):
            blocks.append(nn.Linear(width, size))
            if activation_on_last or i < len(self._layer_sizes) - 1:
                if batch_norm:
                    blocks.append(nn.BatchNorm1d(size))
                blocks.append(_ACTIVATIONS[activation]())
                if dropout > 0:
                    blocks.append(nn.Dropout(dropout))
            width = size
        self.layers = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): shape [B, in_features].

        Returns:
            torch.Tensor: shape [B, layer_sizes[-1]].
        """
        return self.layers(x)

    def flops_per_example(self) -> int:
        """FLOPs of the inference forward: dropout is the identity, batch norm an affine map."""
        flops = 0
        width = self._in_features
        for i, size in enumerate(self._layer_sizes):
            flops += 2 * width * size + size
            if self._activation_on_last or i < len(self._layer_sizes) - 1:
                flops += (2 * size if self._batch_norm else 0) + size
            width = size
        return flops
