"""DAGFM for CPU serving: the training head's function with fewer, larger and cache-sized operations.

The training module (:class:`~recsys_kd.models.layers.DAGFM`) runs each propagation layer as batched
products over the whole batch. On one CPU thread that is slow twice over:

- at batch 4096 the outer layer's edge scores ``[F, F, B]`` (23 MiB at F = 39) and the connection
  product leave the cache: the batched products with inner dimension 16 ran at ~22 GFLOP/s, against
  ~72 GFLOP/s for the same products on blocks of 256 examples (one thread, idle machine;
  ``tools/bench_serving.py`` prints a model's share of the machine's GEMM rate). So
  :class:`DAGFMServingHead` runs the whole network block by block (``block_rows`` examples, every
  intermediate of a block in cache);
- at batch 1 a batched product of 39 tiny matrices costs ~20 us of call overhead and the pooling,
  concatenation and final Linear are more small ops. Below ``small_batch`` rows the layers run as
  broadcast multiplies with contiguous inner reductions instead, on layouts chosen once at build time.

Both forms fold the masks into the edge parameters once (``p * mask``; the masked edges are zeros),
and fold the final Linear into each layer's pooling: ``w^T [sum_d h^0, ..., sum_d h^L]`` is
``sum_l <w_l (x) 1_D, h^l>``, one matrix-vector product per layer accumulated into the logit, so no
pooled ``[B, F(L+1)]`` tensor and no concatenation exist. The result equals the training head's up to
float rounding (``tests/test_export.py`` checks it). For ``torch.export`` + AOTInductor,
:class:`CompilerDAGFMHead` picks between a fused broadcast form (one row) and one block with
``torch.cond`` (:func:`compiled_form`).

Layouts (F fields, D dims, S = F target fields, b rows of a block):

- outer, blocks: ``h [F, D, b]``; scores ``bmm(P [F, S, D], h) -> [F, S, b]``; messages
  ``bmm(Q [S, D, F], scores^T [S, F, b]) -> [S, D, b]``;
- outer, small: ``h [b, F*D]``; scores ``(P2 [S, F*D] * h) @ 1_D -> [b, S, F]``; messages
  ``(Q [S, D, F] * scores[:, :, None, :]) @ 1_F -> [b, S, D]``;
- inner, blocks: ``h [D, F, b]``, ``h' = h0 * bmm(E [D, S, F], h)``; inner, small: ``h [b, 1, F, D]``,
  ``h' = h0 * (E3 [S, F, D] * h).sum(-2)``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

BLOCK_ROWS = 256
SMALL_BATCH = 1


class DAGFMServingHead(nn.Module):
    """
    A :class:`~recsys_kd.models.heads.DAGFMHead` (``dagfm_inner``, ``dagfm_outer``, ``dagfm_plus``) as
    a serving head: ``(fields [B, F, D], first_order) -> logits [B]``, the training head's function.

    Args:
        head (nn.Module): the trained ``DAGFMHead`` (read, not modified; its parameters are copied).
        block_rows (int): examples per block of the blocked form (every intermediate of a block fits
            the cache).
        small_batch (int): batches of at most this many rows take the broadcast form.

    Shapes: ``[B, F, D] -> [B]``.

    Example::

        serving_head = DAGFMServingHead(DAGFMHead(DAGFM(39, 16, 3, "outer")).eval())
        logits = serving_head(torch.randn(8, 39, 16), None)  # [8]
    """

    def __init__(self, head: nn.Module, block_rows: int = BLOCK_ROWS, small_batch: int = SMALL_BATCH) -> None:
        super().__init__()
        if block_rows < 1 or small_batch < 0:
            raise ValueError(f"block_rows must be >= 1 and small_batch >= 0, got {block_rows}, {small_batch}")
        dagfm = head.dagfm
        fields, dim, layers = dagfm._num_fields, dagfm._embedding_dim, dagfm._num_layers
        self.num_fields: int = fields
        self.embedding_dim: int = dim
        self.outer: bool = dagfm._outer
        self.block_rows: int = block_rows
        self.small_batch: int = small_batch
        with torch.no_grad():
            mask = dagfm.edge_mask.float()  # [F, S, 1], 1 where f <= s
            edges = [p.detach().float() * mask for p in dagfm.p]  # [F, S, D], masked edges are zeros
            weight = dagfm.linear.weight.detach().float().reshape(layers + 1, fields)  # w_l [F] per state
            self.register_buffer("connection", dagfm.connection.detach().float().clone())
            self.register_buffer("bias", dagfm.linear.bias.detach().float().reshape(1).clone())
            self.register_buffer("ones_dim", torch.ones(dim))
            self.register_buffer("ones_fields", torch.ones(fields))
            if self.outer:
                messages = [q.detach().float().permute(1, 2, 0).contiguous() for q in dagfm.q]  # [S, D, F]
                # blocks: P [F, S, D]; small: P2 [S, F * D], P2[s, f * D + d] = P[f, s, d]
                self.register_buffer("edges_blocked", torch.stack(edges))
                self.register_buffer(
                    "edges_small", torch.stack([e.permute(1, 0, 2).reshape(fields, fields * dim) for e in edges])
                )
                self.register_buffer("messages", torch.stack(messages))  # [L, S, D, F], both forms
                # blocks: h [F, D, b] flattened (f, d); small: h [b, F * D], the same (f, d) order
                pooling = weight.repeat_interleave(dim, dim=1)  # [L + 1, F * D]
                self.register_buffer("pooling_blocked", pooling.clone())
                self.register_buffer("pooling_small", pooling.clone())
            else:
                # blocks: E [D, S, F] (E[d, s, f] = P[f, s, d]); small: E3 [S, F, D]
                self.register_buffer("edges_blocked", torch.stack([e.permute(2, 1, 0).contiguous() for e in edges]))
                self.register_buffer("edges_small", torch.stack([e.permute(1, 0, 2).contiguous() for e in edges]))
                self.register_buffer("messages", torch.zeros(layers, 0))
                # blocks: h [D, F, b] flattened (d, f); small: h [b, F, D] flattened (f, d)
                self.register_buffer("pooling_blocked", weight.repeat(1, dim).contiguous())
                self.register_buffer("pooling_small", weight.repeat_interleave(dim, dim=1).contiguous())
        self.mlp = head.mlp
        self.output = head.output

    def forward(self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            fields (torch.Tensor): field embeddings, shape [B, F, D] (any strides).
            first_order (Optional[torch.Tensor]): ignored (DAGFM has no first-order term).

        Returns:
            torch.Tensor: logits, shape [B].
        """
        batch_size = fields.size(0)
        if batch_size <= self.small_batch:
            logits = self._small(fields)
        elif batch_size <= self.block_rows:
            logits = self._block(fields)
        else:
            blocks: List[torch.Tensor] = []
            for start in range(0, batch_size, self.block_rows):
                blocks.append(self._block(fields.narrow(0, start, min(self.block_rows, batch_size - start))))
            logits = torch.cat(blocks)
        return self._with_mlp(fields, logits)

    def _with_mlp(self, fields: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``dagfm_plus``: the parallel MLP's logit added (the others: ``logits`` as they are)."""
        if self.mlp is not None and self.output is not None:
            logits = logits + self.output(self.mlp(fields.reshape(fields.size(0), -1))).squeeze(1)
        return logits

    def _block(self, fields: torch.Tensor) -> torch.Tensor:
        """The blocked form on one block ``[b, F, D]`` -> logits [b]."""
        rows = fields.size(0)
        flat = self.num_fields * self.embedding_dim
        if self.outer:
            x = fields.permute(1, 2, 0).contiguous()  # [F, D, b]
            h0 = torch.mm(self.connection, x.view(self.num_fields, -1)).view(x.shape)
        else:
            h0 = torch.matmul(self.connection, fields.permute(2, 1, 0))  # [D, F, b]
        logits = torch.addmv(self.bias, h0.view(flat, rows).t(), self.pooling_blocked[0])
        h = h0
        for layer in range(self.edges_blocked.size(0)):
            if self.outer:
                scores = torch.bmm(self.edges_blocked[layer], h)  # [F, S, b]
                h = h0 * torch.bmm(self.messages[layer], scores.transpose(0, 1))  # [S, D, b]
            else:
                h = h0 * torch.bmm(self.edges_blocked[layer], h)  # [D, S, b]
            logits = torch.addmv(logits, h.view(flat, rows).t(), self.pooling_blocked[layer + 1])
        return logits

    def _small(self, fields: torch.Tensor) -> torch.Tensor:
        """The broadcast form for a few rows ``[b, F, D]`` -> logits [b]."""
        rows = fields.size(0)
        num_fields, dim = self.num_fields, self.embedding_dim
        if rows == 1:  # one mm: matmul would broadcast C into a batched product (~20 us more here)
            h0 = torch.mm(self.connection, fields.reshape(num_fields, dim)).view(1, num_fields, dim)
        else:
            h0 = torch.matmul(self.connection, fields)  # [b, F, D]
        logits = torch.addmv(self.bias, h0.view(rows, -1), self.pooling_small[0])
        h = h0
        for layer in range(self.edges_small.size(0)):
            if self.outer:  # the sums over d and f as products with ones: a third faster than sum(-1) here
                products = self.edges_small[layer] * h.view(rows, 1, -1)  # [b, S, F * D]
                scores = torch.mv(products.view(-1, dim), self.ones_dim).view(rows, num_fields, 1, num_fields)
                messages = self.messages[layer] * scores  # [b, S, D, F]
                h = h0 * torch.mv(messages.view(-1, num_fields), self.ones_fields).view(rows, num_fields, dim)
            else:
                h = h0 * (self.edges_small[layer] * h.view(rows, 1, num_fields, dim)).sum(-2)  # [b, S, D]
            logits = torch.addmv(logits, h.view(rows, -1), self.pooling_small[layer + 1])
        return logits


    def _fused(self, fields: torch.Tensor) -> torch.Tensor:
        """The broadcast form with plain sums, for a compiler (Inductor) that fuses each multiply with
        its reduction into one loop: no ``[B, S, F, D]`` product is materialised (:class:`CompilerDAGFMHead`)."""
        rows = fields.size(0)
        num_fields, dim = self.num_fields, self.embedding_dim
        h0 = torch.matmul(self.connection, fields)  # [b, F, D]
        logits = torch.addmv(self.bias, h0.reshape(rows, -1), self.pooling_small[0])
        h = h0
        for layer in range(self.edges_small.size(0)):
            if self.outer:
                products = self.edges_small[layer].view(num_fields, num_fields, dim) * h.view(rows, 1, num_fields, dim)
                scores = products.sum(-1)  # [b, S, F]
                h = h0 * (self.messages[layer] * scores.unsqueeze(2)).sum(-1)  # [b, S, D]
            else:
                h = h0 * (self.edges_small[layer] * h.view(rows, 1, num_fields, dim)).sum(-2)  # [b, S, D]
            logits = torch.addmv(logits, h.reshape(rows, -1), self.pooling_small[layer + 1])
        return logits


class CompilerDAGFMHead(nn.Module):
    """
    A :class:`DAGFMServingHead` as ``torch.export`` takes it: ``torch.cond`` on the batch size picks the
    broadcast form with plain sums for one row (a compiler fuses each multiply with its reduction) or
    the blocked form for more; the caller hands it at most ``block_rows`` rows at a time
    (:class:`~recsys_kd.export.compiled.CompiledServing` splits larger batches), so every block's
    intermediates stay in cache. Not scriptable (``torch.cond``); the TorchScript artifact uses the
    head itself.

    Shapes: ``[B, F, D] -> [B]``.

    Example::

        head = CompilerDAGFMHead(DAGFMServingHead(DAGFMHead(DAGFM(39, 16, 3, "outer")).eval()))
        logits = head(torch.randn(8, 39, 16))  # [8]
    """

    def __init__(self, head: DAGFMServingHead) -> None:
        super().__init__()
        self.head = head
        self.block_rows = head.block_rows

    def forward(self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fields [B, F, D] (B <= ``block_rows`` for cache-sized blocks) -> logits [B]."""
        logits = torch.cond(fields.size(0) <= 1, self.head._fused, self.head._block, (fields,))
        return self.head._with_mlp(fields, logits)


def compiled_form(module: nn.Module) -> Tuple[nn.Module, int]:
    """
    The form of ``module`` (a serving module, or a head) for ``torch.export`` + AOTInductor: every
    :class:`DAGFMServingHead` inside wrapped in a :class:`CompilerDAGFMHead` (in place). Returns the
    module and the rows per call its callers should keep to (0: any).
    """
    if isinstance(module, DAGFMServingHead):
        return CompilerDAGFMHead(module), module.block_rows
    block_rows = 0
    for name, child in list(module.named_children()):
        if isinstance(child, DAGFMServingHead):
            setattr(module, name, CompilerDAGFMHead(child))
            block_rows = child.block_rows
    return module, block_rows


def serving_head(head: nn.Module) -> Tuple[nn.Module, bool]:
    """The serving form of a trained head: a :class:`DAGFMServingHead` for a ``DAGFMHead``, else the
    head itself. Returns (head, whether it was rewritten)."""
    from recsys_kd.models.heads import DAGFMHead  # models imports torch only

    if isinstance(head, DAGFMHead):
        return DAGFMServingHead(head).eval(), True
    return head, False
