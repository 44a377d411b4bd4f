"""Low-rank compression of trained CTR models: AFM (Yu et al., KDD 2024) and the SVD baseline.

``afm``: the math on tensors (statistics, PCA, rank choice, the transforms, their row-block and
column-partial forms for sharded tables). ``surgery``: the same applied to a plain ``CTRModel``
(``collect_statistics``, ``compress_mlp``, ``compress_embeddings``), returning new models.
"""

from recsys_kd.compress.afm import (
    LayerStatistics,
    afm_embedding,
    afm_embedding_columns,
    afm_embedding_rows,
    afm_linear,
    afm_linear_factors,
    afm_up_bias,
    choose_rank,
    embedding_gram,
    explained_variance_ratio,
    fuse_into_first_linear,
    pca,
    principal_subspace,
    singular_value_spectrum,
    spectrum_report,
    svd_embedding,
    svd_linear,
    svd_linear_factors,
    two_linear_layers,
)
from recsys_kd.compress.surgery import (
    CompressedMLP,
    LowRankFieldEmbedding,
    ModelStatistics,
    StatisticsHooks,
    can_fuse,
    collect_statistics,
    compress_embeddings,
    compress_mlp,
    find_mlp,
    mlp_linear_names,
)

__all__ = [
    "CompressedMLP",
    "LayerStatistics",
    "LowRankFieldEmbedding",
    "ModelStatistics",
    "StatisticsHooks",
    "afm_embedding",
    "afm_embedding_columns",
    "afm_embedding_rows",
    "afm_linear",
    "afm_linear_factors",
    "afm_up_bias",
    "can_fuse",
    "choose_rank",
    "collect_statistics",
    "compress_embeddings",
    "compress_mlp",
    "embedding_gram",
    "explained_variance_ratio",
    "find_mlp",
    "fuse_into_first_linear",
    "mlp_linear_names",
    "pca",
    "principal_subspace",
    "singular_value_spectrum",
    "spectrum_report",
    "svd_embedding",
    "svd_linear",
    "svd_linear_factors",
    "two_linear_layers",
]
