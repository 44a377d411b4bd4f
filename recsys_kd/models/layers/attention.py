"""AutoInt's interacting layer: multi-head self-attention over fields with a residual connection."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class InteractingLayer(nn.Module):
    r"""
    One interacting layer of `AutoInt <https://arxiv.org/abs/1810.11921>`_. Per head h, over the F
    field embeddings of one example,

    .. math:: \mathrm{head}_h = \mathrm{softmax}(Q_h K_h^T / s) V_h, \quad
        Q_h = x W_Q^h,\; K_h = x W_K^h,\; V_h = x W_V^h

    with :math:`s = 1` as in the paper, or :math:`s = \sqrt{d_{attn}}` with ``use_scale`` (FuxiCTR's
    ``use_scale``); then

    .. math:: y = \mathrm{ReLU}([\mathrm{head}_1, \dots, \mathrm{head}_H] + x W_R)

    (the residual :math:`x W_R` only with ``use_residual``). No projection has a bias, as in the paper.
    Stack layers with ``embedding_dim`` of the next = ``output_dim`` of the previous.

    Args:
        embedding_dim (int): D, the input width per field.
        attention_dim (int): :math:`d_{attn}`, the width per head.
        num_heads (int): H.
        num_fields (int): F, used for the FLOP count only.
        use_residual (bool): add :math:`x W_R` before the ReLU.
        use_scale (bool): scale the attention logits by :math:`1/\sqrt{d_{attn}}`.

    Shapes: ``[B, F, D] -> [B, F, output_dim]``, ``output_dim = num_heads * attention_dim``.

    Example::

        layer = InteractingLayer(embedding_dim=4, attention_dim=8, num_heads=2, num_fields=5)
        y = layer(torch.randn(3, 5, 4))  # [3, 5, 16]
    """

    def __init__(
        self,
        embedding_dim: int,
        attention_dim: int,
        num_heads: int,
        num_fields: int,
        use_residual: bool = True,
        use_scale: bool = False,
    ) -> None:
        super().__init__()
        self._embedding_dim = embedding_dim
        self._attention_dim = attention_dim
        self._num_heads = num_heads
        self._num_fields = num_fields
        self._use_residual = use_residual
        self._use_scale = use_scale
        self._scale: float = 1.0 / math.sqrt(attention_dim) if use_scale else 1.0
        self.output_dim: int = num_heads * attention_dim
        # W_Q, W_K, W_V of all heads as one matrix: one GEMM instead of three
        self.qkv = nn.Linear(embedding_dim, 3 * self.output_dim, bias=False)
        self.residual = nn.Linear(embedding_dim, self.output_dim, bias=False) if use_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): field embeddings, shape [B, F, D].

        Returns:
            torch.Tensor: shape [B, F, num_heads * attention_dim].
        """
        batch_size, num_fields, _ = x.shape
        qkv = self.qkv(x).view(batch_size, num_fields, 3, self._num_heads, self._attention_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, F, d_attn]
        heads = F.scaled_dot_product_attention(q, k, v, scale=self._scale)  # [B, H, F, d_attn]
        out = heads.transpose(1, 2).reshape(batch_size, num_fields, self.output_dim)
        if self.residual is not None:
            out = out + self.residual(x)
        return torch.relu(out)

    def flops_per_example(self) -> int:
        f, d, h, a = self._num_fields, self._embedding_dim, self._num_heads, self._attention_dim
        width = h * a
        flops = 3 * 2 * f * d * width  # Q, K, V
        flops += 2 * f * f * width  # Q K^T of every head
        flops += h * f * f if self._use_scale else 0
        flops += 3 * h * f * f  # softmax: exp, sum, divide
        flops += 2 * f * f * width  # attention-weighted V
        if self._use_residual:
            flops += 2 * f * d * width + f * width
        return flops + f * width  # ReLU
