"""Teachers and students by name: ``ModelConfig`` -> ``build_model(schema, config)`` -> ``CTRModel``.

Every model is ``FieldEmbedding`` (+ ``FirstOrder``) followed by a head from ``heads.py``:

============== ================================================ ==================================
name           architecture                                     paper
============== ================================================ ==================================
lr             w0 + sum of first-order weights                  logistic regression
fm             first order + FM                                 Rendle, ICDM 2010
dnn            MLP -> Linear (teacher; also the ECKD student)   ECKD, CIKM 2020
wide_deep      first order + MLP -> Linear                      Cheng et al., DLRS 2016
deepfm         first order + FM + MLP -> Linear                 Guo et al., IJCAI 2017
dcn            [CrossNet v1, MLP] -> Linear                     Wang et al., ADKDD 2017
dcnv2          [CrossNetV2, MLP] or CrossNetV2 -> MLP -> Linear Wang et al., WWW 2021
xdeepfm        first order + [CIN, MLP] -> Linear               Lian et al., KDD 2018
autoint_plus   [self-attention x L, MLP] -> Linear              Song et al., CIKM 2019
fibinet        first order + [Bi(X), Bi(SENET(X))] -> MLP       Huang et al., RecSys 2019
cin            CIN -> Linear (KD-DAGFM teacher)                 Tian et al., WSDM 2023
crossnet       CrossNetV2 (full) -> Linear (KD-DAGFM teacher)   Tian et al., WSDM 2023
dagfm_inner    DAGFM, inner-product edges (student)             Tian et al., WSDM 2023
dagfm_outer    DAGFM, outer-product edges (student)             Tian et al., WSDM 2023
dagfm_plus     [DAGFM, MLP] (KD-DAGFM+ student)                 Tian et al., WSDM 2023
fwfm           first order + FwFM (student)                     Pan et al., WWW 2018
fmfm           first order + FmFM (student)                     Sun et al., WWW 2021
tiny_mlp       small MLP -> Linear (student)                    Tian et al., WSDM 2023
============== ================================================ ==================================

Example::

    model = build_model(schema, ModelConfig(name="dcnv2", cross_type="low_rank"))
    logits = model(batch.dense, batch.sparse)  # [B]
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Literal, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_kd.data.schema import Schema
from recsys_kd.models.embedding import FieldEmbedding, FirstOrder
from recsys_kd.models.heads import (
    AutoIntPlusHead,
    CINHead,
    CrossNetHead,
    CTRHead,
    DAGFMHead,
    DeepFMHead,
    DNNHead,
    FactorizationMachineHead,
    FiBiNetHead,
    LRHead,
)
from recsys_kd.models.layers import (
    CIN,
    DAGFM,
    FM,
    MLP,
    CrossNet,
    CrossNetV2,
    FmFM,
    FwFM,
    LowRankCrossNet,
    LowRankMixtureCrossNet,
)
from recsys_kd.models.low_rank import LowRankStep, apply_low_rank_structure


@dataclass
class ModelConfig:
    """Which model and its hyperparameters; each model reads only the fields that concern it.

    Defaults follow FuxiCTR's models and the papers: D = 16 and depth 3 (KD-DAGFM's released settings),
    MLP 400-400-400 (FuxiCTR's Criteo benchmark and the AFM paper), CIN 200-200-200 (xDeepFM, KD-DAGFM's
    CIN teacher), DCNv2 low rank 32 with 4 experts (FuxiCTR), AutoInt+ 3 layers of 2 heads x 16,
    FiBiNET reduction ratio 3 with field-interaction bilinear weights (FuxiCTR). Dropout 0 and no batch
    norm are the models' defaults; recipes tune them per dataset.

    Attributes:
        name: one of :data:`MODEL_NAMES`.
        embedding_dim: D (``lr`` uses D = 1: its field embeddings are its weights).
        dense_mode: ``"projected"`` (one field x_j v_j per dense feature) or ``"none"`` (ignore dense).
        mlp_layers: hidden MLP widths of the deep models (and the MLP of ``dagfm_plus``).
        tiny_mlp_layers: hidden widths of ``tiny_mlp``.
        dropout, batch_norm: of every MLP.
        cross_layers: depth of the cross networks (``dcn``, ``dcnv2``, ``crossnet``).
        cross_type: ``dcnv2``'s cross layer: ``"full"`` N x N, ``"low_rank"`` U V^T, or ``"mixture"`` of
            ``num_experts`` low-rank experts.
        low_rank, num_experts: for ``cross_type`` low_rank / mixture.
        dcn_structure: ``dcnv2``'s cross network and MLP ``"parallel"`` or ``"stacked"``.
        cin_layers: feature maps per CIN layer (``xdeepfm``, ``cin``).
        cin_split_half: xDeepFM's split-half option (off in FuxiCTR and the KD-DAGFM CIN teacher).
        attention_layers, attention_heads, attention_dim, use_residual, use_scale: ``autoint_plus``.
        reduction_ratio, bilinear_type: ``fibinet``.
        dagfm_layers: DAGFM propagation depth L.
        dagfm_type: ``dagfm_plus``'s edge type (default ``"outer"``); ``dagfm_inner`` and
            ``dagfm_outer`` take it from their name, and a contradicting value is an error.
        linear_init: the head's ``nn.Linear`` weights: ``"torch"`` (PyTorch's default, uniform with
            bound 1/sqrt(fan_in)) or ``"xavier_normal"`` (N(0, 2 / (fan_in + fan_out)), zero biases:
            FuxiCTR's default). Embedding tables and other layers keep their own initialisation.
        compression: low-rank steps applied after building, in order (see :class:`LowRankStep`).
    """

    name: str = "dnn"
    embedding_dim: int = 16
    dense_mode: Literal["projected", "none"] = "projected"
    mlp_layers: List[int] = field(default_factory=lambda: [400, 400, 400])
    tiny_mlp_layers: List[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0
    batch_norm: bool = False
    cross_layers: int = 3
    cross_type: Literal["full", "low_rank", "mixture"] = "full"
    low_rank: int = 32
    num_experts: int = 4
    dcn_structure: Literal["parallel", "stacked"] = "parallel"
    cin_layers: List[int] = field(default_factory=lambda: [200, 200, 200])
    cin_split_half: bool = False
    attention_layers: int = 3
    attention_heads: int = 2
    attention_dim: int = 16
    use_residual: bool = True
    use_scale: bool = False
    reduction_ratio: int = 3
    bilinear_type: Literal["field_all", "field_each", "field_interaction"] = "field_interaction"
    dagfm_layers: int = 3
    dagfm_type: Optional[Literal["inner", "outer"]] = None
    linear_init: Literal["torch", "xavier_normal"] = "torch"
    compression: List[LowRankStep] = field(default_factory=list)

    def validate(self) -> None:
        if self.name not in _HEADS:
            raise ValueError(f"unknown model {self.name!r}; known models: {', '.join(MODEL_NAMES)}")
        positive = {
            "embedding_dim": self.embedding_dim,
            "cross_layers": self.cross_layers,
            "low_rank": self.low_rank,
            "num_experts": self.num_experts,
            "attention_layers": self.attention_layers,
            "attention_heads": self.attention_heads,
            "attention_dim": self.attention_dim,
            "reduction_ratio": self.reduction_ratio,
            "dagfm_layers": self.dagfm_layers,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        for key in ("mlp_layers", "tiny_mlp_layers", "cin_layers"):
            sizes = getattr(self, key)
            if not sizes or min(sizes) < 1:
                raise ValueError(f"{key} must be a non-empty list of positive widths, got {sizes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.cin_split_half and any(h % 2 for h in self.cin_layers[:-1]):
            raise ValueError(f"cin_split_half needs even cin_layers but the last, got {self.cin_layers}")
        implied = {"dagfm_inner": "inner", "dagfm_outer": "outer"}.get(self.name)
        if implied is not None and self.dagfm_type not in (None, implied):
            raise ValueError(
                f"model {self.name!r} has dagfm_type {implied!r}, got dagfm_type {self.dagfm_type!r}"
            )


class CTRModel(nn.Module):
    """
    A CTR model: field embeddings (a torchrec ``EmbeddingBagCollection``), the first-order term when the
    head uses one, and the head holding every other parameter.

    Args:
        name (str): the model's name in :data:`MODEL_NAMES`.
        embedding (FieldEmbedding): the field embeddings.
        head (CTRHead): the dense part, ``(fields, first_order) -> logits``.
        first_order (Optional[FirstOrder]): required exactly when ``head.uses_first_order``.

    Shapes: ``dense [B, n_dense]``, ``sparse`` KJT with the schema's sparse keys ``-> [B]`` logits.

    Example::

        model = build_model(schema, ModelConfig(name="deepfm"))
        logits, hidden, fields = model.forward_with_hidden(batch.dense, batch.sparse)
        # [B], [B, model.hidden_dim], [B, F, D]
    """

    def __init__(
        self, name: str, embedding: FieldEmbedding, head: CTRHead, first_order: Optional[FirstOrder] = None
    ) -> None:
        super().__init__()
        if head.uses_first_order != (first_order is not None):
            need = "needs a" if head.uses_first_order else "takes no"
            raise ValueError(f"model {name!r}: its head {need} first-order term")
        self.name = name
        self.embedding = embedding
        self.first_order = first_order
        self.head = head

    @property
    def hidden_dim(self) -> int:
        return self.head.hidden_dim

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            dense (torch.Tensor): dense features, shape [B, n_dense].
            sparse (KeyedJaggedTensor): sparse features, stride B.

        Returns:
            torch.Tensor: logits, shape [B].
        """
        return self.forward_with_hidden(dense, sparse)[0]

    def forward_with_hidden(
        self, dense: torch.Tensor, sparse: KeyedJaggedTensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Returns:
            Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: logits [B]; the hidden vector that feeds
            the output layer [B, hidden_dim] (ECKD hint regression); the field embeddings [B, F, D]
            (L2 regularisation on the looked-up embeddings).
        """
        fields = self.embedding(dense, sparse)
        first_order = self.first_order(dense, sparse) if self.first_order is not None else None
        logits, hidden = self.head.forward_with_hidden(fields, first_order)
        return logits, hidden, fields

    def num_parameters(self) -> Dict[str, int]:
        """``embedding``: every embedding-table parameter; ``dense``: all others; ``total``."""
        tables = {
            id(p)
            for module in self.modules()
            if isinstance(module, EmbeddingBagCollection)
            for p in module.parameters()
        }
        embedding = sum(p.numel() for p in self.parameters() if id(p) in tables)
        total = sum(p.numel() for p in self.parameters())
        return {"embedding": embedding, "dense": total - embedding, "total": total}

    def flops_per_example(self) -> int:
        """Inference FLOPs per example; embedding lookups and bag pooling count 0 (memory-bound gathers)."""
        flops = self.embedding.flops_per_example() + self.head.flops_per_example()
        return flops + (self.first_order.flops_per_example() if self.first_order is not None else 0)


# ---------------------------------------------------------------- heads by name: (config, F, D) -> head


def _mlp(config: ModelConfig, in_features: int, layers: Optional[List[int]] = None) -> MLP:
    sizes = config.mlp_layers if layers is None else layers
    return MLP(in_features, sizes, dropout=config.dropout, batch_norm=config.batch_norm)


def _dcnv2_cross(config: ModelConfig, n: int) -> nn.Module:
    if config.cross_type == "full":
        return CrossNetV2(n, config.cross_layers)
    if config.cross_type == "low_rank":
        return LowRankCrossNet(n, config.cross_layers, config.low_rank)
    return LowRankMixtureCrossNet(n, config.cross_layers, config.num_experts, config.low_rank)


def _dcnv2(config: ModelConfig, f: int, d: int) -> CTRHead:
    n = f * d
    stacked = config.dcn_structure == "stacked"
    return CrossNetHead(_dcnv2_cross(config, n), n, _mlp(config, n), stacked=stacked)


def _dagfm(interaction: str, with_mlp: bool = False) -> Callable[[ModelConfig, int, int], CTRHead]:
    def build(config: ModelConfig, f: int, d: int) -> CTRHead:
        dagfm = DAGFM(f, d, config.dagfm_layers, config.dagfm_type or interaction)
        return DAGFMHead(dagfm, _mlp(config, f * d) if with_mlp else None)

    return build


def _cin(config: ModelConfig, f: int, d: int) -> CIN:
    return CIN(f, d, config.cin_layers, split_half=config.cin_split_half)


_HEADS: Dict[str, Callable[[ModelConfig, int, int], CTRHead]] = {
    # teachers
    "lr": lambda c, f, d: LRHead(f),
    "fm": lambda c, f, d: FactorizationMachineHead(FM(f, d)),
    "dnn": lambda c, f, d: DNNHead(_mlp(c, f * d)),
    "wide_deep": lambda c, f, d: DNNHead(_mlp(c, f * d), uses_first_order=True),
    "deepfm": lambda c, f, d: DeepFMHead(f, d, _mlp(c, f * d)),
    "dcn": lambda c, f, d: CrossNetHead(CrossNet(f * d, c.cross_layers), f * d, _mlp(c, f * d)),
    "dcnv2": _dcnv2,
    "xdeepfm": lambda c, f, d: CINHead(_cin(c, f, d), _mlp(c, f * d), uses_first_order=True),
    "autoint_plus": lambda c, f, d: AutoIntPlusHead(
        num_fields=f,
        embedding_dim=d,
        num_layers=c.attention_layers,
        attention_dim=c.attention_dim,
        num_heads=c.attention_heads,
        use_residual=c.use_residual,
        use_scale=c.use_scale,
        mlp=_mlp(c, f * d),
    ),
    # the MLP reads the bilinear products of all F(F-1)/2 pairs, raw and SENET-weighted
    "fibinet": lambda c, f, d: FiBiNetHead(
        f, d, c.reduction_ratio, c.bilinear_type, _mlp(c, f * (f - 1) * d)
    ),
    "cin": lambda c, f, d: CINHead(_cin(c, f, d)),
    "crossnet": lambda c, f, d: CrossNetHead(CrossNetV2(f * d, c.cross_layers), f * d),
    # students
    "dagfm_inner": _dagfm("inner"),
    "dagfm_outer": _dagfm("outer"),
    "dagfm_plus": _dagfm("outer", with_mlp=True),
    "fwfm": lambda c, f, d: FactorizationMachineHead(FwFM(f, d)),
    "fmfm": lambda c, f, d: FactorizationMachineHead(FmFM(f, d)),
    "tiny_mlp": lambda c, f, d: DNNHead(_mlp(c, f * d, c.tiny_mlp_layers)),
}

MODEL_NAMES: Tuple[str, ...] = tuple(_HEADS)

# lr's field embeddings are its first-order weights: D = 1, tables named like FirstOrder's
_LR_EMBEDDING_DIM = 1


@torch.no_grad()
def xavier_normal_linears(module: nn.Module) -> None:
    """Every ``nn.Linear`` in ``module``: weight ~ N(0, 2 / (fan_in + fan_out)), bias 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
            if layer.bias is not None:
                layer.bias.zero_()


def build_model(
    schema: Schema, config: ModelConfig, embedding_device: Optional[torch.device] = None
) -> CTRModel:
    """
    Builds model ``config.name`` for ``schema``'s features.

    Args:
        schema (Schema): the dataset's features (sparse tables, dense columns).
        config (ModelConfig): the model and its hyperparameters.
        embedding_device (Optional[torch.device]): where the embedding tables are created, e.g.
            ``torch.device("meta")`` when DistributedModelParallel will materialise them sharded.

    Returns:
        CTRModel: the model, parameters initialised (tables on ``embedding_device``).

    Raises:
        ValueError: unknown model name (the message lists the known ones) or invalid hyperparameters.
    """
    config.validate()
    if config.name == "lr":
        embedding = FieldEmbedding(
            schema, _LR_EMBEDDING_DIM, config.dense_mode, table_prefix="w_", device=embedding_device
        )
    else:
        embedding = FieldEmbedding(schema, config.embedding_dim, config.dense_mode, device=embedding_device)
    head = _HEADS[config.name](config, embedding.num_fields, embedding.embedding_dim)
    if config.linear_init == "xavier_normal":
        xavier_normal_linears(head)
    first_order = FirstOrder(schema, config.dense_mode, embedding_device) if head.uses_first_order else None
    model = CTRModel(config.name, embedding, head, first_order)
    if config.compression:
        model = apply_low_rank_structure(model, config.compression)
    return model
