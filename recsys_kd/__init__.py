"""recsys_kd: click logs -> sharded TorchRec teachers -> distilled, AFM-compressed, TorchScript-served CTR models."""
__version__ = "0.1.0"
