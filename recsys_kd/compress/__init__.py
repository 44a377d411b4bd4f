"""Low-rank compression of trained CTR models: AFM (Yu et al., KDD 2024) and the SVD baseline.

``afm``: the math on tensors (statistics, PCA, rank choice, the transforms, their row-block and
column-partial forms for sharded tables). ``statistics``: the statistics of a whole ``CTRModel``,
collected by forward hooks (``collect_statistics``). ``surgery``: the transforms applied to a plain
``CTRModel`` (``compress_mlp``, ``compress_embeddings``), returning new models. ``sharded``: the same
on a DistributedModelParallel-sharded model, shard by shard. The compressed models' modules
(``CompressedMLP``, ``LowRankFieldEmbedding``, ``LowRankStep``) live in ``recsys_kd.models.low_rank``.
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
    singular_value_spectrum,
    spectrum_report,
    svd_embedding,
    svd_linear,
    svd_linear_factors,
    two_linear_layers,
)
from recsys_kd.compress.statistics import ModelStatistics, StatisticsHooks, collect_statistics, mlp_linear_names
from recsys_kd.compress.surgery import compress_embeddings, compress_mlp

__all__ = [
    "LayerStatistics",
    "ModelStatistics",
    "StatisticsHooks",
    "afm_embedding",
    "afm_embedding_columns",
    "afm_embedding_rows",
    "afm_linear",
    "afm_linear_factors",
    "afm_up_bias",
    "choose_rank",
    "collect_statistics",
    "compress_embeddings",
    "compress_mlp",
    "embedding_gram",
    "explained_variance_ratio",
    "fuse_into_first_linear",
    "mlp_linear_names",
    "pca",
    "singular_value_spectrum",
    "spectrum_report",
    "svd_embedding",
    "svd_linear",
    "svd_linear_factors",
    "two_linear_layers",
]
