"""The serving module's input checks (:mod:`recsys_kd.export.serving`'s contract): ids inside their
tables, bag offsets, and the weights of a model of weighted features. Errors name the feature, the
example and the value. Used by the TorchScript module and the compiled artifact alike.
"""

from typing import List, Optional, Tuple

import torch

# The checks are free functions the exported methods call, never private methods of the module: a frozen
# module drops its non-preserved methods, and an error raised in code inlined from one of them made
# torch 2.13's interpreter crash (a dangling call-stack entry) in the second frozen instance of the
# class in a process. Artifacts loaded with torch.jit.load are not affected.


def check_weights(weights: Optional[torch.Tensor], ids: torch.Tensor, weighted: bool) -> None:
    """Weights [N] float32, one per id, exactly when the model is weighted."""
    if weights is None:
        if weighted:
            raise ValueError("this model's features are weighted (libSVM/libFM values): pass weights, float32 [N], one per id")
        return
    if not weighted:
        raise ValueError("this model's features are not weighted: pass no weights")
    if weights.dim() != 1 or weights.dtype != torch.float32 or weights.size(0) != ids.size(0):
        raise ValueError(
            f"weights must be a 1-D float32 tensor with one weight per id ({ids.size(0)}), got shape {list(weights.shape)}"
        )


def bag_rows(
    ids: torch.Tensor,
    offsets: torch.Tensor,
    batch_size: int,
    num_embeddings: torch.Tensor,
    row_offsets: torch.Tensor,
    bag_feature: torch.Tensor,
    sparse_names: List[str],
) -> Tuple[torch.Tensor, bool]:
    """Checks ids and bag offsets; returns the fused-table rows of the ids [N] and whether every bag
    holds exactly one id (then the rows are example-major [B * F_sparse] and need no pooling)."""
    num_features = len(sparse_names)
    num_bags = batch_size * num_features
    if ids.dim() != 1 or ids.dtype != torch.int64:
        raise ValueError(f"ids must be a 1-D int64 (torch.long) tensor, got shape {list(ids.shape)}")
    if offsets.dim() != 1 or offsets.dtype != torch.int64 or offsets.size(0) != num_bags + 1:
        raise ValueError(
            f"offsets must be a 1-D int64 tensor of B * F_sparse + 1 = {batch_size} * {num_features} + 1 = "
            f"{num_bags + 1} bag boundaries (example-major), got shape {list(offsets.shape)}"
        )
    num_ids = ids.size(0)
    single = num_ids == num_bags and bool(torch.equal(offsets, torch.arange(num_bags + 1, dtype=torch.int64)))
    if single:
        # one id per bag: ids is the [B, F_sparse] id matrix, row by row
        by_example = ids.view(batch_size, num_features)
        check_ids(by_example, num_embeddings, sparse_names)
        return (by_example + row_offsets).view(-1), True
    if int(offsets[0]) != 0 or int(offsets[-1]) != num_ids:
        raise ValueError(
            f"offsets must start at 0 and end at len(ids) = {num_ids}, got {int(offsets[0])} and {int(offsets[-1])}"
        )
    lengths = offsets[1:] - offsets[:-1]
    if num_bags > 0 and int(lengths.min()) < 0:
        raise ValueError("offsets must be non-decreasing")
    feature = torch.repeat_interleave(bag_feature.repeat(batch_size), lengths, output_size=num_ids)
    check_ids(ids, num_embeddings[feature], sparse_names, offsets, feature)
    return ids + row_offsets[feature], False


def check_ids(
    ids: torch.Tensor,
    limits: torch.Tensor,
    sparse_names: List[str],
    offsets: Optional[torch.Tensor] = None,
    feature: Optional[torch.Tensor] = None,
) -> None:
    """Raises a ValueError naming feature, example and id for the first id outside [0, limit)."""
    bad = (ids < 0) | (ids >= limits)
    if bool(bad.any()):
        num_features = len(sparse_names)
        position = int(torch.nonzero(bad.reshape(-1))[0, 0])
        value = int(ids.reshape(-1)[position])
        if offsets is None or feature is None:
            example = position // num_features
            f = position % num_features
            limit = int(limits[f])
        else:
            bag = int(torch.searchsorted(offsets, torch.tensor([position]), right=True)[0]) - 1
            example = bag // num_features
            f = int(feature[position])
            limit = int(limits[position])
        raise ValueError(
            f"sparse feature '{sparse_names[f]}' of example {example} has id {value}, "
            f"outside [0, {limit}) (num_embeddings={limit}); ids 0 and 1 mean missing and out of vocabulary"
        )
