"""Feature-interaction layers: small ``nn.Module`` s that models compose.

Inputs are field embeddings ``[B, F, D]``, except the cross networks and the MLP, which read the flat
``[B, N]`` (N = F*D). Every layer scripts with ``torch.jit.script``.

``flops_per_example()`` counts the floating-point operations of one example's inference forward as the
layer computes it (masked-out entries that are still multiplied count). Each multiply and each add is 1
FLOP; a sum of K terms counts K adds, so a length-K dot product is 2K (one multiply-add = 2 FLOPs) and
``Linear(i, o)`` is ``2*i*o + o``; an activation, exp or division is 1 per element. Operations on
parameters alone (masking, building a weight matrix) run once per batch and are not counted.
"""

from recsys_kd.models.layers.attention import InteractingLayer
from recsys_kd.models.layers.cin import CIN
from recsys_kd.models.layers.cross import CrossNet, CrossNetV2, LowRankCrossNet, LowRankMixtureCrossNet
from recsys_kd.models.layers.dagfm import DAGFM
from recsys_kd.models.layers.fibinet import BilinearInteraction, SENETLayer
from recsys_kd.models.layers.fm import FM, FmFM, FwFM
from recsys_kd.models.layers.mlp import MLP

__all__ = [
    "BilinearInteraction",
    "CIN",
    "CrossNet",
    "CrossNetV2",
    "DAGFM",
    "FM",
    "FmFM",
    "FwFM",
    "InteractingLayer",
    "LowRankCrossNet",
    "LowRankMixtureCrossNet",
    "MLP",
    "SENETLayer",
]
