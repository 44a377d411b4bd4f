"""Models: the embedding front end, the feature-interaction layers (``layers``), teachers and students."""

from recsys_kd.models.embedding import FieldEmbedding, FirstOrder
from recsys_kd.models.heads import CTRHead
from recsys_kd.models.zoo import MODEL_NAMES, CTRModel, ModelConfig, build_model

__all__ = ["CTRHead", "CTRModel", "FieldEmbedding", "FirstOrder", "MODEL_NAMES", "ModelConfig", "build_model"]
