"""The dense part of every model: field embeddings ``[B, F, D]`` (and the first-order term) -> logits.

A model is ``FieldEmbedding`` (+ ``FirstOrder``) followed by one of these heads (see ``zoo.py``). The head
holds every parameter that is not an embedding table, so it can be scripted alone for serving and
rewritten by AFM compression, which looks for the ``nn.Linear`` layers inside the ``MLP`` layers.

Each head returns the logit and its hidden vector: the input of the model's final output layer, or for
models whose output is a fixed sum (LR, the FM family) the terms of that sum. ECKD's hint regression
reads it. ``flops_per_example()`` follows the convention of ``recsys_kd.models.layers``.
"""

from typing import List, Optional, Tuple

import torch
from torch import nn

from recsys_kd.models.layers import CIN, DAGFM, FM, MLP, BilinearInteraction, InteractingLayer, SENETLayer


def _linear_flops(in_features: int, out_features: int) -> int:
    return 2 * in_features * out_features + out_features


def _require_first_order(first_order: Optional[torch.Tensor]) -> torch.Tensor:
    if first_order is None:
        raise ValueError("this model adds a first-order term: pass FirstOrder's output, shape [B, 1]")
    return first_order


class CTRHead(nn.Module):
    """
    Base class of the heads: ``forward(fields, first_order) -> logits [B]``; subclasses implement
    :meth:`forward_with_hidden` and :meth:`flops_per_example`.

    Args:
        hidden_dim (int): width of the hidden vector.
        uses_first_order (bool): whether the head adds a :class:`FirstOrder` term, which the model then
            computes and passes as ``first_order`` ([B, 1]); other heads ignore that argument.
    """

    def __init__(self, hidden_dim: int, uses_first_order: bool) -> None:
        super().__init__()
        self.hidden_dim: int = hidden_dim
        self.uses_first_order: bool = uses_first_order

    def forward(self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            fields (torch.Tensor): field embeddings, shape [B, F, D].
            first_order (Optional[torch.Tensor]): the first-order term, shape [B, 1], for the heads that
                use it.

        Returns:
            torch.Tensor: logits, shape [B].
        """
        return self.forward_with_hidden(fields, first_order)[0]

    def forward_with_hidden(
        self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits [B], hidden [B, hidden_dim])."""
        raise NotImplementedError

    def flops_per_example(self) -> int:
        raise NotImplementedError


class LRHead(CTRHead):
    r"""
    ``lr``: logistic regression, the baseline,

    .. math:: z = w_0 + \sum_f w_f

    Its field "embeddings" are the first-order weights themselves (``[B, F, 1]``, tables ``w_*``); the
    hidden vector is those F terms.

    Args:
        num_fields (int): F.

    Shapes: ``[B, F, 1] -> [B]``, hidden ``[B, F]``.

    Example::

        head = LRHead(num_fields=39)
        logits = head(torch.randn(8, 39, 1))  # [8]
    """

    def __init__(self, num_fields: int) -> None:
        super().__init__(hidden_dim=num_fields, uses_first_order=False)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward_with_hidden(
        self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = fields.flatten(1)
        return hidden.sum(dim=1) + self.bias, hidden

    def flops_per_example(self) -> int:
        return self.hidden_dim + 1


class FactorizationMachineHead(CTRHead):
    r"""
    ``fm``, ``fwfm``, ``fmfm``: first-order term plus a second-order interaction,

    .. math:: z = w_0 + \sum_f w_f + \sum_{i<j} \phi(x_i, x_j)

    with :math:`\phi = \langle x_i, x_j \rangle` (FM, Rendle 2010), :math:`r_{ij} \langle x_i, x_j
    \rangle` (FwFM, Pan et al. WWW 2018) or :math:`(x_i M_{ij}) \cdot x_j` (FmFM, Sun et al. WWW 2021),
    the interaction layer given. The hidden vector is the two terms ``[first order, second order]``.

    Args:
        interaction (nn.Module): ``FM``, ``FwFM`` or ``FmFM`` (``[B, F, D] -> [B, 1]``).

    Shapes: ``[B, F, D]``, first order ``[B, 1] -> [B]``, hidden ``[B, 2]``.

    Example::

        head = FactorizationMachineHead(FwFM(num_fields=39, embedding_dim=16))
        logits = head(torch.randn(8, 39, 16), torch.randn(8, 1))  # [8]
    """

    def __init__(self, interaction: nn.Module) -> None:
        super().__init__(hidden_dim=2, uses_first_order=True)
        self.interaction = interaction

    def forward_with_hidden(
        self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.cat([_require_first_order(first_order), self.interaction(fields)], dim=1)
        return hidden.sum(dim=1), hidden

    def flops_per_example(self) -> int:
        return self.interaction.flops_per_example() + 2


class DNNHead(CTRHead):
    r"""
    ``dnn`` (the plain DNN teacher and the ECKD student), ``tiny_mlp`` (KD-DAGFM's Tiny MLP student) and
    ``wide_deep`` (Wide & Deep, Cheng et al. DLRS 2016): an MLP on the concatenated field embeddings,

    .. math:: z = w^T \mathrm{MLP}([x_1, \dots, x_F]) + b \; (+ \text{first order for Wide \& Deep})

    Args:
        mlp (MLP): the hidden layers, reading F * D (activation on the last); its output is the hidden
            vector.
        uses_first_order (bool): add the first-order ("wide") term.

    Shapes: ``[B, F, D] -> [B]``, hidden ``[B, mlp.out_features]``.

    Example::

        head = DNNHead(MLP(39 * 16, [400, 400, 400]))
        logits = head(torch.randn(8, 39, 16))  # [8]
    """

    def __init__(self, mlp: MLP, uses_first_order: bool = False) -> None:
        super().__init__(hidden_dim=mlp.out_features, uses_first_order=uses_first_order)
        self.mlp = mlp
        self.output = nn.Linear(mlp.out_features, 1)

    def forward_with_hidden(
        self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.mlp(fields.flatten(1))
        logit = self.output(hidden)
        if self.uses_first_order:
            logit = logit + _require_first_order(first_order)
        return logit.squeeze(1), hidden

    def flops_per_example(self) -> int:
        flops = self.mlp.flops_per_example() + _linear_flops(self.hidden_dim, 1)
        return flops + (1 if self.uses_first_order else 0)


class DeepFMHead(CTRHead):
    r"""
    ``deepfm``: `DeepFM <https://arxiv.org/abs/1703.04247>`_ (Guo et al., IJCAI 2017), FM and DNN on
    shared embeddings,

    .. math:: z = w_0 + \sum_f w_f + \sum_{i<j} \langle x_i, x_j \rangle
        + w^T \mathrm{MLP}([x_1, \dots, x_F]) + b

    The hidden vector is the MLP output.

    Args:
        num_fields (int): F.
        embedding_dim (int): D.
        mlp (MLP): the hidden layers, reading F * D.

    Shapes: ``[B, F, D]``, first order ``[B, 1] -> [B]``, hidden ``[B, mlp.out_features]``.

    Example::

        head = DeepFMHead(39, 16, MLP(39 * 16, [400, 400, 400]))
        logits = head(torch.randn(8, 39, 16), torch.randn(8, 1))  # [8]
    """

    def __init__(self, num_fields: int, embedding_dim: int, mlp: MLP) -> None:
        super().__init__(hidden_dim=mlp.out_features, uses_first_order=True)
        self.fm = FM(num_fields, embedding_dim)
        self.mlp = mlp
        self.output = nn.Linear(mlp.out_features, 1)

    def forward_with_hidden(
        self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.mlp(fields.flatten(1))
        logit = self.output(hidden) + self.fm(fields) + _require_first_order(first_order)
        return logit.squeeze(1), hidden

    def flops_per_example(self) -> int:
        deep = self.mlp.flops_per_example() + _linear_flops(self.hidden_dim, 1)
        return deep + self.fm.flops_per_example() + 2


class CrossNetHead(CTRHead):
    r"""
    Cross networks on the flat input :math:`x_0 = [x_1, \dots, x_F] \in R^{FD}`:

    - ``dcn``: `DCN <https://arxiv.org/abs/1708.05123>`_ (Wang et al., ADKDD 2017), CrossNet v1
      :math:`x_{l+1} = x_0 (x_l \cdot w_l) + b_l + x_l` beside an MLP, :math:`z = w^T [x_L,
      \mathrm{MLP}(x_0)] + b`;
    - ``dcnv2``: `DCNv2 <https://arxiv.org/abs/2008.13535>`_ (Wang et al., WWW 2021), the cross layer
      :math:`x_{l+1} = x_0 \odot (W_l x_l + b_l) + x_l` (full, low-rank or mixture of low-rank experts),
      parallel (as DCN) or stacked, :math:`z = w^T \mathrm{MLP}(x_L) + b`;
    - ``crossnet``: the full-matrix cross network alone, :math:`z = w^T x_L + b`, the CrossNet teacher
      of KD-DAGFM.

    The hidden vector is the input of the output layer (``[x_L, MLP(x_0)]``, ``MLP(x_L)`` or
    :math:`x_L`).

    Args:
        cross (nn.Module): a cross network ``[B, N] -> [B, N]`` with ``flops_per_example()``.
        in_features (int): N = F * D.
        mlp (Optional[MLP]): the deep part; None for the cross network alone.
        stacked (bool): feed the cross network's output to the MLP instead of running them in parallel.

    Shapes: ``[B, F, D] -> [B]``.

    Example::

        head = CrossNetHead(CrossNetV2(624, 3), 624, MLP(624, [400, 400, 400]))
        logits = head(torch.randn(8, 39, 16))  # [8]
    """

    def __init__(
        self, cross: nn.Module, in_features: int, mlp: Optional[MLP] = None, stacked: bool = False
    ) -> None:
        if stacked and mlp is None:
            raise ValueError("a stacked cross network needs an MLP")
        if mlp is None:
            hidden_dim = in_features
        elif stacked:
            hidden_dim = mlp.out_features
        else:
            hidden_dim = in_features + mlp.out_features
        super().__init__(hidden_dim=hidden_dim, uses_first_order=False)
        self.cross = cross
        self.mlp = mlp
        self._stacked = stacked
        self.output = nn.Linear(hidden_dim, 1)

    def forward_with_hidden(
        self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        flat = fields.flatten(1)
        crossed = self.cross(flat)
        if self.mlp is None:
            hidden = crossed
        elif self._stacked:
            hidden = self.mlp(crossed)
        else:
            hidden = torch.cat([crossed, self.mlp(flat)], dim=1)
        return self.output(hidden).squeeze(1), hidden

    def flops_per_example(self) -> int:
        flops = self.cross.flops_per_example() + _linear_flops(self.hidden_dim, 1)
        return flops + (self.mlp.flops_per_example() if self.mlp is not None else 0)


class CINHead(CTRHead):
    r"""
    ``xdeepfm``: `xDeepFM <https://arxiv.org/abs/1803.05170>`_ (Lian et al., KDD 2018), CIN and DNN on
    shared embeddings plus the linear term,

    .. math:: z = w_0 + \sum_f w_f + w^T [p^+, \mathrm{MLP}([x_1, \dots, x_F])] + b

    with :math:`p^+` the sum-pooled CIN feature maps; ``cin``: the CIN alone, :math:`z = w^T p^+ + b`,
    the CIN teacher of KD-DAGFM. The hidden vector is the input of the output layer.

    Args:
        cin (CIN): the compressed interaction network.
        mlp (Optional[MLP]): the deep part, reading F * D; None for the CIN alone.
        uses_first_order (bool): add the first-order term.

    Shapes: ``[B, F, D] -> [B]``.

    Example::

        head = CINHead(CIN(39, 16, (200, 200, 200)), MLP(39 * 16, [400, 400, 400]), uses_first_order=True)
        logits = head(torch.randn(8, 39, 16), torch.randn(8, 1))  # [8]
    """

    def __init__(self, cin: CIN, mlp: Optional[MLP] = None, uses_first_order: bool = False) -> None:
        hidden_dim = cin.output_dim + (mlp.out_features if mlp is not None else 0)
        super().__init__(hidden_dim=hidden_dim, uses_first_order=uses_first_order)
        self.cin = cin
        self.mlp = mlp
        self.output = nn.Linear(hidden_dim, 1)

    def forward_with_hidden(
        self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.cin(fields)
        if self.mlp is not None:
            hidden = torch.cat([hidden, self.mlp(fields.flatten(1))], dim=1)
        logit = self.output(hidden)
        if self.uses_first_order:
            logit = logit + _require_first_order(first_order)
        return logit.squeeze(1), hidden

    def flops_per_example(self) -> int:
        flops = self.cin.flops_per_example() + _linear_flops(self.hidden_dim, 1)
        flops += self.mlp.flops_per_example() if self.mlp is not None else 0
        return flops + (1 if self.uses_first_order else 0)


class AutoIntPlusHead(CTRHead):
    r"""
    ``autoint_plus``: `AutoInt+ <https://arxiv.org/abs/1810.11921>`_ (Song et al., CIKM 2019), a stack of
    multi-head self-attention (interacting) layers beside an MLP,

    .. math:: z = w^T [\mathrm{vec}(\mathrm{Att}_L \circ \dots \circ \mathrm{Att}_1(X)),
        \mathrm{MLP}([x_1, \dots, x_F])] + b

    (FuxiCTR sums a Linear of each branch; one Linear over the concatenation is the same function with
    one bias). The hidden vector is that concatenation.

    Args:
        num_fields (int): F.
        embedding_dim (int): D.
        num_layers (int): number of interacting layers.
        attention_dim (int): width per head.
        num_heads (int): heads per layer.
        use_residual (bool): residual projection in each layer.
        use_scale (bool): scale attention logits by :math:`1/\sqrt{d}`.
        mlp (MLP): the deep part, reading F * D.

    Shapes: ``[B, F, D] -> [B]``.

    Example::

        head = AutoIntPlusHead(39, 16, 3, 16, 2, True, False, MLP(39 * 16, [400, 400, 400]))
        logits = head(torch.randn(8, 39, 16))  # [8]
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        num_layers: int,
        attention_dim: int,
        num_heads: int,
        use_residual: bool,
        use_scale: bool,
        mlp: MLP,
    ) -> None:
        layers: List[InteractingLayer] = []
        width = embedding_dim
        for _ in range(num_layers):
            layers.append(
                InteractingLayer(width, attention_dim, num_heads, num_fields, use_residual, use_scale)
            )
            width = layers[-1].output_dim
        super().__init__(hidden_dim=num_fields * width + mlp.out_features, uses_first_order=False)
        self.attention = nn.Sequential(*layers)
        self.mlp = mlp
        self.output = nn.Linear(self.hidden_dim, 1)

    def forward_with_hidden(
        self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        attended = self.attention(fields).flatten(1)
        hidden = torch.cat([attended, self.mlp(fields.flatten(1))], dim=1)
        return self.output(hidden).squeeze(1), hidden

    def flops_per_example(self) -> int:
        attention = sum(layer.flops_per_example() for layer in self.attention)
        return attention + self.mlp.flops_per_example() + _linear_flops(self.hidden_dim, 1)


class FiBiNetHead(CTRHead):
    r"""
    ``fibinet``: `FiBiNET <https://arxiv.org/abs/1905.09433>`_ (Huang et al., RecSys 2019). SENET
    re-weights the fields, :math:`V = \mathrm{SENET}(X)`; bilinear interactions of the raw and of the
    re-weighted embeddings (two bilinear layers, as FuxiCTR) are concatenated and fed to an MLP, and the
    linear term is added (the paper's equation 14):

    .. math:: z = w_0 + \sum_f w_f + w^T \mathrm{MLP}([\mathrm{vec}(\mathrm{Bi}(X)),
        \mathrm{vec}(\mathrm{Bi}'(V))]) + b

    The hidden vector is the MLP output.

    Args:
        num_fields (int): F.
        embedding_dim (int): D.
        reduction_ratio (int): SENET's reduction ratio.
        bilinear_type (str): ``"field_all"``, ``"field_each"`` or ``"field_interaction"``.
        mlp (MLP): the hidden layers, reading ``2 * F(F-1)/2 * D``.

    Shapes: ``[B, F, D]``, first order ``[B, 1] -> [B]``.

    Example::

        head = FiBiNetHead(39, 16, 3, "field_interaction", MLP(2 * 741 * 16, [400, 400, 400]))
        logits = head(torch.randn(8, 39, 16), torch.randn(8, 1))  # [8]
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        reduction_ratio: int,
        bilinear_type: str,
        mlp: MLP,
    ) -> None:
        super().__init__(hidden_dim=mlp.out_features, uses_first_order=True)
        self.senet = SENETLayer(num_fields, embedding_dim, reduction_ratio)
        self.bilinear = BilinearInteraction(num_fields, embedding_dim, bilinear_type)
        self.bilinear_senet = BilinearInteraction(num_fields, embedding_dim, bilinear_type)
        self.mlp = mlp
        self.output = nn.Linear(self.hidden_dim, 1)

    def forward_with_hidden(
        self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        raw = self.bilinear(fields).flatten(1)
        reweighted = self.bilinear_senet(self.senet(fields)).flatten(1)
        hidden = self.mlp(torch.cat([raw, reweighted], dim=1))
        logit = self.output(hidden) + _require_first_order(first_order)
        return logit.squeeze(1), hidden

    def flops_per_example(self) -> int:
        flops = self.senet.flops_per_example() + self.bilinear.flops_per_example()
        flops += self.bilinear_senet.flops_per_example() + self.mlp.flops_per_example()
        return flops + _linear_flops(self.hidden_dim, 1) + 1


class DAGFMHead(CTRHead):
    r"""
    ``dagfm_inner``, ``dagfm_outer``: the `DAGFM <https://arxiv.org/abs/2211.11159>`_ student of KD-DAGFM
    (Tian et al., WSDM 2023), :math:`z = w^T [\sum_d h^0, \dots, \sum_d h^L] + b` over its DAG
    propagation states (see :class:`~recsys_kd.models.layers.DAGFM`); ``dagfm_plus``: the KD-DAGFM+
    student, DAGFM beside an MLP,

    .. math:: z = w^T [\sum_d h^0, \dots, \sum_d h^L] + b + w'^T \mathrm{MLP}([x_1, \dots, x_F]) + b'

    The hidden vector is ``[B, F(L+1)]`` (and the MLP output concatenated for ``dagfm_plus``). The
    authors' released ``DeepDAGFM`` stacks instead: the MLP reads the summed states
    :math:`h^0 + \dots + h^L` (``[B, F, D]``) and alone gives the logit; this is the parallel form.

    Args:
        dagfm (DAGFM): the DAGFM layer, whose own Linear gives the DAGFM logit.
        mlp (Optional[MLP]): the parallel deep part, reading F * D; None for plain DAGFM.

    Shapes: ``[B, F, D] -> [B]``.

    Example::

        head = DAGFMHead(DAGFM(39, 16, 3, "outer"))
        logits = head(torch.randn(8, 39, 16))  # [8]
    """

    def __init__(self, dagfm: DAGFM, mlp: Optional[MLP] = None) -> None:
        pooled_dim = dagfm.linear.in_features
        super().__init__(
            hidden_dim=pooled_dim + (mlp.out_features if mlp is not None else 0), uses_first_order=False
        )
        self.dagfm = dagfm
        self.mlp = mlp
        self.output = nn.Linear(mlp.out_features, 1) if mlp is not None else None

    def forward_with_hidden(
        self, fields: torch.Tensor, first_order: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden = self.dagfm.hidden(fields)
        logit = self.dagfm.linear(hidden)
        if self.mlp is not None and self.output is not None:
            deep = self.mlp(fields.flatten(1))
            logit = logit + self.output(deep)
            hidden = torch.cat([hidden, deep], dim=1)
        return logit.squeeze(1), hidden

    def flops_per_example(self) -> int:
        flops = self.dagfm.flops_per_example()
        if self.mlp is not None:
            flops += self.mlp.flops_per_example() + _linear_flops(self.mlp.out_features, 1) + 1
        return flops
